//! virtio-rng device state.

use std::any::Any;

use super::metrics::RngMetrics;
use crate::devices::virtio::{DeviceSnapshot, DeviceState, VirtioDevice, TYPE_RNG};
use kata_like_vmm_contract::DeviceCounters;

pub const REQUEST_QUEUE: usize = 0;
const QUEUE_SIZES: [u16; 1] = [64];

pub struct Rng {
    pub(super) state: DeviceState,
    pub metrics: RngMetrics,
}

impl Rng {
    pub fn new() -> Self {
        Rng {
            state: DeviceState::new(0, &QUEUE_SIZES),
            metrics: RngMetrics::default(),
        }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn device_state(&self) -> &DeviceState {
        &self.state
    }
    fn device_state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }
    fn process_queue(&mut self, index: usize) {
        if index == REQUEST_QUEUE {
            self.process_requests();
        }
    }
    fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot::Rng
    }
    fn metrics(&self) -> DeviceCounters {
        DeviceCounters::Rng(self.metrics.clone())
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
