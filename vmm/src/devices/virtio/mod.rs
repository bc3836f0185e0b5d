//! Virtio devices over the virtio-mmio transport (virtio 1.x, split queues).

pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
pub mod vsock;

use std::any::Any;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::memory::GuestMemoryMmap;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits (virtio-mmio InterruptStatus).
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// First token a device may use for its own fds; lower values are queue indices and
/// `WORK_TOKEN`.
pub const DEVICE_TOKEN_BASE: u32 = 0x1000;
/// The transport's `work_evt` (device activation and reset left by a vCPU thread).
pub const WORK_TOKEN: u32 = DEVICE_TOKEN_BASE - 1;

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

/// Lets a device add and remove its own fds (TAP, sockets) in the VMM event loop.
#[derive(Clone)]
pub struct EventRegistrar {
    epoll: Arc<Epoll>,
    device_index: u32,
}

impl EventRegistrar {
    pub fn new(epoll: Arc<Epoll>, device_index: u32) -> Self {
        EventRegistrar {
            epoll,
            device_index,
        }
    }

    /// The epoll token for `(device, sub)`; the loop decodes it with `decode_token`.
    pub fn token(device_index: u32, sub: u32) -> u64 {
        ((u64::from(device_index) + 1) << 32) | u64::from(sub)
    }

    pub fn add(&self, fd: RawFd, sub: u32, events: EventSet) -> std::io::Result<()> {
        let event = EpollEvent::new(events, Self::token(self.device_index, sub));
        self.epoll.ctl(ControlOperation::Add, fd, event)
    }

    pub fn modify(&self, fd: RawFd, sub: u32, events: EventSet) -> std::io::Result<()> {
        let event = EpollEvent::new(events, Self::token(self.device_index, sub));
        self.epoll.ctl(ControlOperation::Modify, fd, event)
    }

    pub fn remove(&self, fd: RawFd) {
        // The fd may already be closed (and so gone from the set): nothing to do then.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }
}

/// Splits an epoll token into (device index, sub token); None for VMM-level tokens.
pub fn decode_token(token: u64) -> Option<(usize, u32)> {
    let dev = token >> 32;
    if dev == 0 {
        None
    } else {
        Some(((dev - 1) as usize, token as u32))
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub irq: Arc<IrqTrigger>,
    pub events: EventRegistrar,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device setup failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad queue configuration: {0}")]
    BadQueue(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    fn avail_features(&self) -> u64;
    fn set_acked_features(&mut self, features: u64);
    fn queue_max_sizes(&self) -> &[u16];
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    fn is_activated(&self) -> bool;
    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize);
    /// A device-owned fd registered through `EventRegistrar` is ready.
    fn process_event(&mut self, _sub: u32, _events: u32) {}
    /// Back to the pre-activation state (driver reset).
    fn reset(&mut self);
    /// Set when the driver broke the protocol; the transport then asks for a reset.
    fn is_broken(&self) -> bool;
    /// The device's counters for the API's `metrics` op.
    fn metrics(&self) -> kata_like_vmm_contract::DeviceCounters;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Reads `data.len()` bytes at `offset` from a config space image; out-of-range bytes read
/// as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}
