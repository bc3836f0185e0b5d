//! virtio-blk device state: backing file, features, config space.

use std::any::Any;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::sync::Arc;

use virtio_queue::Queue;

use super::metrics::BlockMetrics;
use super::request::{DEVICE_ID_LEN, SECTOR_SHIFT};
use crate::devices::virtio::{
    read_config_bytes, ActivateContext, ActivateError, IrqTrigger, VirtioDevice, TYPE_BLOCK,
};
use crate::vstate::memory::GuestMemoryMmap;
use kata_like_vmm_contract::DeviceCounters;

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];

/// Static configuration of one drive (from `--drive`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    pub id: String,
    /// Read-only as the guest sees it (VIRTIO_BLK_F_RO); fixed at boot.
    pub read_only: bool,
}

/// The backing file of a drive.
pub struct Backing {
    pub file: File,
    pub read_only: bool,
    /// Size in 512-byte sectors (a trailing partial sector is not exposed).
    pub sectors: u64,
}

impl Backing {
    pub fn new(mut file: File, read_only: bool) -> std::io::Result<Self> {
        let len = file.seek(SeekFrom::End(0))?;
        Ok(Backing {
            file,
            read_only,
            sectors: len >> SECTOR_SHIFT,
        })
    }
}

pub(super) struct ActiveState {
    pub mem: GuestMemoryMmap,
    pub queue: Queue,
    pub irq: Arc<IrqTrigger>,
}

pub struct Block {
    pub config: BlockConfig,
    pub(super) serial: [u8; DEVICE_ID_LEN as usize],
    pub(super) backing: Option<Backing>,
    pub(super) acked_features: u64,
    pub(super) active: Option<ActiveState>,
    pub(super) broken: bool,
    pub metrics: BlockMetrics,
}

impl Block {
    /// A drive; `backing` None is an empty slot (capacity 0) to be filled through the API.
    pub fn new(config: BlockConfig, backing: Option<Backing>) -> Self {
        let mut serial = [0u8; DEVICE_ID_LEN as usize];
        let id = config.id.as_bytes();
        let n = id.len().min(serial.len());
        serial[..n].copy_from_slice(&id[..n]);
        Block {
            config,
            serial,
            backing,
            acked_features: 0,
            active: None,
            broken: false,
            metrics: BlockMetrics::default(),
        }
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.backing.as_ref().map_or(0, |b| b.sectors)
    }

    /// Replaces (or removes) the backing file. The caller tells the transport, which raises
    /// the config-change interrupt so the guest rereads the capacity.
    pub fn set_backing(&mut self, backing: Option<Backing>) {
        self.backing = backing;
        self.metrics.backing_changes += 1;
    }

    fn config_space(&self) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[0..8].copy_from_slice(&self.capacity().to_le_bytes());
        // size_max: 0 (no limit); seg_max: what one chain can carry besides header and status.
        c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
        c
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn avail_features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX;
        if self.config.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue = ctx
            .queues
            .pop()
            .ok_or_else(|| ActivateError::BadQueue("virtio-blk needs one queue".into()))?;
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
        self.acked_features = 0;
    }

    fn is_broken(&self) -> bool {
        self.broken
    }

    fn metrics(&self) -> DeviceCounters {
        DeviceCounters::Block {
            id: self.config.id.clone(),
            capacity_sectors: self.capacity(),
            counters: self.metrics.clone(),
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
