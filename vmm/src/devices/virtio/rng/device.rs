//! virtio-rng device state.

use std::any::Any;
use std::sync::Arc;

use virtio_queue::Queue;

use super::metrics::RngMetrics;
use crate::devices::virtio::{ActivateContext, ActivateError, IrqTrigger, VirtioDevice, TYPE_RNG};
use crate::vstate::memory::GuestMemoryMmap;
use kata_like_vmm_contract::DeviceCounters;

const QUEUE_SIZES: [u16; 1] = [64];

pub(super) struct ActiveState {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub irq: Arc<IrqTrigger>,
}

#[derive(Default)]
pub struct Rng {
    pub(super) active: Option<ActiveState>,
    pub(super) broken: bool,
    pub metrics: RngMetrics,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn avail_features(&self) -> u64 {
        0
    }
    fn set_acked_features(&mut self, _features: u64) {}
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue = ctx
            .queues
            .pop()
            .ok_or_else(|| ActivateError::BadQueue("virtio-rng needs one queue".into()))?;
        self.active = Some(ActiveState {
            mem: ctx.mem,
            queue,
            irq: ctx.irq,
        });
        self.broken = false;
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
    fn process_queue(&mut self, index: usize) {
        if index == 0 {
            self.process_requests();
        }
    }
    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
    }
    fn is_broken(&self) -> bool {
        self.broken
    }
    fn metrics(&self) -> DeviceCounters {
        DeviceCounters::Rng(self.metrics.clone())
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
