//! virtio-rng: entropy from the host's getrandom.

pub mod device;
pub mod event_handler;
pub mod metrics;

pub use device::Rng;
