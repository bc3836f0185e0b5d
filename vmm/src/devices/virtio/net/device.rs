//! virtio-net device state: TAP, MAC, queues.

use std::any::Any;
use std::os::unix::io::AsRawFd;

use vmm_sys_util::epoll::EventSet;

use super::metrics::NetMetrics;
use super::packet::{MAX_FRAME_LEN, VNET_HDR_LEN};
use super::tap::Tap;
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, DeviceSnapshot, DeviceState, VirtioDevice,
    DEVICE_TOKEN_BASE, TYPE_NET,
};
use kata_like_vmm_contract::DeviceCounters;

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const TAP_TOKEN: u32 = DEVICE_TOKEN_BASE;
const QUEUE_SIZES: [u16; 2] = [256, 256];

pub struct Net {
    pub(super) tap: Tap,
    pub(super) mac: [u8; 6],
    pub(super) state: DeviceState,
    /// A frame read from the TAP that found no receive buffer yet (header included).
    pub(super) pending_rx: Option<Vec<u8>>,
    /// Whether the TAP is armed in the event loop (disarmed while the guest has no buffers).
    pub(super) tap_armed: bool,
    pub(super) buf: Vec<u8>,
    /// Where a transmit chain is gathered; kept to reuse its allocation.
    pub(super) tx_frame: Vec<u8>,
    pub metrics: NetMetrics,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap,
            mac,
            state: DeviceState::new(VIRTIO_NET_F_MAC, &QUEUE_SIZES),
            pending_rx: None,
            tap_armed: false,
            buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            tx_frame: Vec::new(),
            metrics: NetMetrics::default(),
        }
    }

    pub(super) fn arm_tap(&mut self, armed: bool) {
        if self.tap_armed == armed {
            return;
        }
        if let Some(a) = self.state.active.as_ref() {
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
    fn device_state(&self) -> &DeviceState {
        &self.state
    }
    fn device_state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.state
            .activate(ctx, Some((self.tap.as_raw_fd(), TAP_TOKEN)))?;
        self.tap_armed = true;
        Ok(())
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
        if let Some(a) = self.state.reset() {
            a.events.remove(self.tap.as_raw_fd());
        }
        self.tap_armed = false;
        self.pending_rx = None;
    }
    fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot::Net { mac: self.mac }
    }
    /// The guest's interface has the snapshot's MAC: the device keeps answering with it.
    fn restore(&mut self, snapshot: &DeviceSnapshot) -> Result<(), String> {
        match snapshot {
            DeviceSnapshot::Net { mac } => {
                self.mac = *mac;
                Ok(())
            }
            other => Err(format!(
                "net device: the snapshot has {other:?} in its slot"
            )),
        }
    }
    fn metrics(&self) -> DeviceCounters {
        DeviceCounters::Net(self.metrics.clone())
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
