//! virtio-console (virtio 1.x, section 5.3): one port, the guest's `hvc0`, output only. The
//! guest's console through it costs one VM exit per buffer (up to a page from the kernel's hvc
//! driver) instead of one per byte as on the 8250; its output goes to the console sink the
//! 8250 also writes to (`devices/console_sink.rs`). No multiport, no emergency write, no
//! console size: none are offered, so the driver uses none.

pub mod device;
pub mod event_handler;
pub mod metrics;

pub use device::Console;
