//! The state every virtio device keeps the same way: the features it offers and the driver
//! acked, its queue sizes, what activation handed over (guest memory, the queues, the
//! interrupt, the event registrar) and whether the driver broke the ring protocol. Each device embeds one `DeviceState` next to
//! its own fields; the queue helpers in `queue.rs` reach it through
//! `VirtioDevice::device_state_mut`.

use std::os::unix::io::RawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::epoll::EventSet;

use super::events::EventRegistrar;
use super::irq::IrqTrigger;
use crate::vstate::memory::GuestMemoryMmap;

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

/// What a device holds between DRIVER_OK and reset.
pub struct ActiveState {
    pub mem: GuestMemoryMmap,
    /// In the device's queue order (the index the driver notifies).
    pub queues: Vec<Queue>,
    pub irq: Arc<IrqTrigger>,
    pub events: EventRegistrar,
}

pub struct DeviceState {
    /// Features offered to the driver, fixed when the device is built.
    pub avail_features: u64,
    pub acked_features: u64,
    /// Largest size of each queue, in the device's queue order.
    pub queue_sizes: &'static [u16],
    pub active: Option<ActiveState>,
    /// Set when the driver broke the ring protocol; the transport then asks for a reset.
    pub broken: bool,
}

impl DeviceState {
    pub fn new(avail_features: u64, queue_sizes: &'static [u16]) -> Self {
        DeviceState {
            avail_features,
            acked_features: 0,
            queue_sizes,
            active: None,
            broken: false,
        }
    }

    /// Takes over what activation hands the device: one queue per entry of `queue_sizes`.
    /// `watch` is the device's own fd (TAP, listening socket) and its sub token, added to
    /// the event loop for input before the device counts as active.
    pub fn activate(
        &mut self,
        ctx: ActivateContext,
        watch: Option<(RawFd, u32)>,
    ) -> Result<(), ActivateError> {
        if ctx.queues.len() < self.queue_sizes.len() {
            return Err(ActivateError::BadQueue(format!(
                "the device uses {} queues, the driver set up {}: the transport must hand over all of them",
                self.queue_sizes.len(),
                ctx.queues.len()
            )));
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

/// What a snapshot keeps of one device beyond its transport and queues: only what the driver
/// has seen of the device (its config space). The backends (drive file, TAP, vsock socket)
/// are not in it: a restored VMM gets new ones on its command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeviceSnapshot {
    /// `read_only` fixed the features the driver acked; `capacity_sectors` is what it read.
    Block {
        read_only: bool,
        capacity_sectors: u64,
    },
    Net {
        mac: [u8; 6],
    },
    /// Live connections are not kept: the restored device tells the guest its transport
    /// was reset.
    Vsock {
        cid: u64,
    },
    Rng,
    /// The one port of virtio-console (`max_nr_ports` 1, output only).
    Console {
        ports: u32,
    },
    /// virtio-fs: its tag. A VM with one cannot be restored (its backend would need shared
    /// guest RAM; builder.rs refuses `--restore` with `--fs`), but it can be described.
    Fs {
        tag: String,
    },
}

/// One split virtqueue as the driver set it up, and how far the device got in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueSnapshot {
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// The queue again, validated by virtio-queue (size a power of two within the maximum,
    /// ring addresses aligned): a snapshot is input like any other.
    pub fn to_queue(&self) -> Result<Queue, String> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
        .map_err(|e| format!("queue state {self:?}: {e}"))
    }
}
