//! A device's interrupt: the InterruptStatus bits the driver reads and acks, and the irqfd
//! that raises it.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// Interrupt status bits (virtio-mmio InterruptStatus).
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The device's interrupt: status bits the driver reads and acks, and an irqfd.
pub struct IrqTrigger {
    pub status: AtomicU32,
    pub evt: EventFd,
}

impl IrqTrigger {
    pub fn new() -> std::io::Result<Self> {
        Ok(IrqTrigger {
            status: AtomicU32::new(0),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.evt.write(1) {
            tracing::warn!(error = %e, "raising a virtio interrupt failed");
        }
    }
}
