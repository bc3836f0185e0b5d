//! The state every virtio device keeps the same way: the features the driver acked, what
//! activation handed over (guest memory, the queues, the interrupt, the event registrar) and
//! whether the driver broke the ring protocol. Each device embeds one `DeviceState` next to
//! its own fields; the queue helpers in `queue.rs` reach it through
//! `VirtioDevice::device_state_mut`.

use std::os::unix::io::RawFd;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;

use super::{ActivateContext, ActivateError, EventRegistrar, IrqTrigger};
use crate::vstate::memory::GuestMemoryMmap;

/// What a device holds between DRIVER_OK and reset.
pub struct ActiveState {
    pub mem: GuestMemoryMmap,
    /// In the device's queue order (the index the driver notifies).
    pub queues: Vec<Queue>,
    pub irq: Arc<IrqTrigger>,
    pub events: EventRegistrar,
}

#[derive(Default)]
pub struct DeviceState {
    pub acked_features: u64,
    pub active: Option<ActiveState>,
    /// Set when the driver broke the ring protocol; the transport then asks for a reset.
    pub broken: bool,
}

impl DeviceState {
    /// Takes over what activation hands the device. `queues_needed` is how many queues the
    /// device uses; fewer is a driver error reported as `missing`. `watch` is the device's
    /// own fd (TAP, listening socket) and its sub token, added to the event loop for input
    /// before the device counts as active.
    pub fn activate(
        &mut self,
        ctx: ActivateContext,
        queues_needed: usize,
        missing: &str,
        watch: Option<(RawFd, u32)>,
    ) -> Result<(), ActivateError> {
        if ctx.queues.len() < queues_needed {
            return Err(ActivateError::BadQueue(missing.into()));
        }
        if let Some((fd, sub)) = watch {
            ctx.events.add(fd, sub, EventSet::IN)?;
        }
        self.active = Some(ActiveState {
            mem: ctx.mem,
            queues: ctx.queues,
            irq: ctx.irq,
            events: ctx.events,
        });
        self.broken = false;
        Ok(())
    }

    /// Back to the pre-activation state; returns what activation had handed over so that
    /// the device can unregister its fds.
    pub fn reset(&mut self) -> Option<ActiveState> {
        self.broken = false;
        self.acked_features = 0;
        self.active.take()
    }
}
