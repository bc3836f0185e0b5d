//! virtio-blk device state: backing file, features, config space.

use std::any::Any;
use std::fs::File;
use std::io::{Seek, SeekFrom};

use super::metrics::BlockMetrics;
use super::request::{DEVICE_ID_LEN, SECTOR_SHIFT};
use crate::devices::virtio::{
    read_config_bytes, DeviceSnapshot, DeviceState, VirtioDevice, TYPE_BLOCK,
};
use kata_like_vmm_contract::DeviceCounters;

pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const QUEUE_SIZE: u16 = 256;
pub const REQUEST_QUEUE: usize = 0;
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

pub struct Block {
    pub config: BlockConfig,
    pub(super) serial: [u8; DEVICE_ID_LEN as usize],
    pub(super) backing: Option<Backing>,
    pub(super) state: DeviceState,
    pub metrics: BlockMetrics,
}

impl Block {
    /// A drive; `backing` None is an empty slot (capacity 0) to be filled through the API.
    pub fn new(config: BlockConfig, backing: Option<Backing>) -> Self {
        let mut serial = [0u8; DEVICE_ID_LEN as usize];
        let id = config.id.as_bytes();
        let n = id.len().min(serial.len());
        serial[..n].copy_from_slice(&id[..n]);
        let mut features = VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX;
        if config.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        Block {
            config,
            serial,
            backing,
            state: DeviceState::new(features, &QUEUE_SIZES),
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

    fn device_state(&self) -> &DeviceState {
        &self.state
    }

    fn device_state_mut(&mut self) -> &mut DeviceState {
        &mut self.state
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data);
    }

    fn process_queue(&mut self, index: usize) {
        if index == REQUEST_QUEUE {
            self.process_requests();
        }
    }

    fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot::Block {
            read_only: self.config.read_only,
            capacity_sectors: self.capacity(),
        }
    }

    /// The slot keeps its new backing: a capacity other than the snapshot's reaches the
    /// driver as a config change (the transport compares).
    fn restore(&mut self, snapshot: &DeviceSnapshot) -> Result<(), String> {
        match snapshot {
            DeviceSnapshot::Block { read_only, .. } if *read_only == self.config.read_only => {
                Ok(())
            }
            DeviceSnapshot::Block { read_only, .. } => Err(format!(
                "drive {:?}: the snapshot's slot was {}, this one is {} (the driver acked the read-only feature as it was)",
                self.config.id,
                if *read_only { "read-only" } else { "read-write" },
                if self.config.read_only { "read-only" } else { "read-write" },
            )),
            other => Err(format!("drive {:?}: the snapshot has {other:?} in its slot", self.config.id)),
        }
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
