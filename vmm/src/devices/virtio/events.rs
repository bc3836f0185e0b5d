//! How devices take part in the VMM event loop: epoll tokens and the registrar through which
//! a device adds and removes its own fds (TAP, sockets).

use std::os::unix::io::RawFd;
use std::sync::Arc;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// First token a device may use for its own fds; lower values are queue indices and
/// `WORK_TOKEN`.
pub const DEVICE_TOKEN_BASE: u32 = 0x1000;
/// The transport's `work_evt` (device activation and reset left by a vCPU thread).
pub const WORK_TOKEN: u32 = DEVICE_TOKEN_BASE - 1;

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
