//! virtio-fs as a vhost-user-fs frontend: the file system is served by a vhost-user backend
//! (virtiofsd) that maps guest memory itself and walks the queues itself; this device offers
//! the config space (tag, number of request queues), hands the backend the memory table and
//! the rings, forwards the guest's queue notifications and turns the backend's completion
//! signals into virtio-mmio interrupts.

pub mod device;
pub mod event_handler;
pub mod metrics;

pub use device::{Fs, FsBackendError};
