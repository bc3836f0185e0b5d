//! virtio-net device state: TAP, MAC, queues.

use std::any::Any;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;

use super::metrics::NetMetrics;
use super::packet::{MAX_FRAME_LEN, VNET_HDR_LEN};
use super::tap::Tap;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, EventRegistrar, IrqTrigger, VirtioDevice,
    DEVICE_TOKEN_BASE, TYPE_NET,
};
use crate::vstate::memory::GuestMemoryMmap;
use kata_like_vmm_contract::DeviceCounters;

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const TAP_TOKEN: u32 = DEVICE_TOKEN_BASE;
const QUEUE_SIZES: [u16; 2] = [256, 256];

pub(super) struct ActiveState {
    pub mem: GuestMemoryMmap,
    pub rx: Queue,
    pub tx: Queue,
    pub irq: Arc<IrqTrigger>,
    pub events: EventRegistrar,
}

pub struct Net {
    pub(super) tap: Tap,
    pub(super) mac: [u8; 6],
    pub(super) active: Option<ActiveState>,
    pub(super) broken: bool,
    /// A frame read from the TAP that found no receive buffer yet (header included).
    pub(super) pending_rx: Option<Vec<u8>>,
    /// Whether the TAP is armed in the event loop (disarmed while the guest has no buffers).
    pub(super) tap_armed: bool,
    pub(super) buf: Vec<u8>,
    pub metrics: NetMetrics,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap,
            mac,
            active: None,
            broken: false,
            pending_rx: None,
            tap_armed: false,
            buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            metrics: NetMetrics::default(),
        }
    }

    pub(super) fn arm_tap(&mut self, armed: bool) {
        if self.tap_armed == armed {
            return;
        }
        if let Some(a) = self.active.as_ref() {
            let events = if armed {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            if a.events
                .modify(self.tap.as_raw_fd(), TAP_TOKEN, events)
                .is_ok()
            {
                self.tap_armed = armed;
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_NET_F_MAC
    }
    fn set_acked_features(&mut self, _features: u64) {}
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadQueue(
                "virtio-net needs two queues".into(),
            ));
        };
        ctx.events
            .add(self.tap.as_raw_fd(), TAP_TOKEN, EventSet::IN)?;
        self.tap_armed = true;
        self.active = Some(ActiveState {
            mem: ctx.mem,
            rx,
            tx,
            irq: ctx.irq,
            events: ctx.events,
        });
        self.broken = false;
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
    fn process_queue(&mut self, index: usize) {
        match index {
            RX_QUEUE => self.process_rx(),
            TX_QUEUE => self.process_tx(),
            _ => {}
        }
    }
    fn process_event(&mut self, sub: u32, _events: u32) {
        if sub == TAP_TOKEN {
            self.process_rx();
        }
    }
    fn reset(&mut self) {
        if let Some(a) = self.active.take() {
            a.events.remove(self.tap.as_raw_fd());
        }
        self.tap_armed = false;
        self.pending_rx = None;
        self.broken = false;
    }
    fn is_broken(&self) -> bool {
        self.broken
    }
    fn metrics(&self) -> DeviceCounters {
        DeviceCounters::Net(self.metrics.clone())
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
