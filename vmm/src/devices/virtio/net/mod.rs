//! virtio-net over a TAP device.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod packet;
pub mod tap;

pub use device::Net;
pub use tap::Tap;
