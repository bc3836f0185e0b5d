//! Drives a `Block` through guest memory the way the Linux driver does.

use std::io::Write;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::device::{Backing, Block, BlockConfig};
use crate::devices::virtio::test_utils::{activate, test_memory, TestDesc, TestQueue};
use crate::devices::virtio::{IrqTrigger, VirtioDevice};
use crate::vstate::memory::GuestMemoryMmap;

pub const HDR_ADDR: u64 = 0x10_0000;
pub const DATA_ADDR: u64 = 0x20_0000;
pub const STATUS_ADDR: u64 = 0x30_0000;

pub struct BlockHarness {
    pub mem: GuestMemoryMmap,
    pub queue: TestQueue,
    pub block: Block,
    pub irq: Arc<IrqTrigger>,
    pub file: tempfile::NamedTempFile,
}

impl BlockHarness {
    /// An active drive `id` over a temp file holding `contents`.
    pub fn new(id: &str, contents: &[u8], read_only: bool) -> Self {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(contents).unwrap();
        let backing = Backing::new(file.reopen().unwrap(), read_only).unwrap();
        Self::with_backing(id, Some(backing), read_only, file)
    }

    /// An active empty slot.
    pub fn empty(id: &str) -> Self {
        Self::with_backing(id, None, false, tempfile::NamedTempFile::new().unwrap())
    }

    fn with_backing(
        id: &str,
        backing: Option<Backing>,
        read_only: bool,
        file: tempfile::NamedTempFile,
    ) -> Self {
        let mem = test_memory();
        let queue = TestQueue::new(&mem, 0x1_0000, 16);
        let mut block = Block::new(
            BlockConfig {
                id: id.into(),
                read_only,
            },
            backing,
        );
        let irq = activate(&mut block, &mem, &[&queue]);
        BlockHarness {
            mem,
            queue,
            block,
            irq,
            file,
        }
    }

    /// Submits one request with `data` buffers of the given lengths; returns the status byte
    /// and the used length, or None if the device did not complete it.
    pub fn request(
        &mut self,
        request_type: u32,
        sector: u64,
        data: &[(u32, bool)],
    ) -> Option<(u8, u32)> {
        self.mem
            .write_obj(request_type, GuestAddress(HDR_ADDR))
            .unwrap();
        self.mem
            .write_obj(0u32, GuestAddress(HDR_ADDR + 4))
            .unwrap();
        self.mem
            .write_obj(sector, GuestAddress(HDR_ADDR + 8))
            .unwrap();
        self.mem
            .write_obj(0xffu8, GuestAddress(STATUS_ADDR))
            .unwrap();
        let mut descs = vec![TestDesc::read(HDR_ADDR, 16)];
        let mut addr = DATA_ADDR;
        for (len, write) in data {
            descs.push(TestDesc {
                addr,
                len: *len,
                write: *write,
            });
            addr += u64::from(*len);
        }
        descs.push(TestDesc::write(STATUS_ADDR, 1));
        self.submit(&descs)
    }

    /// Publishes `descs` as one chain and runs the device.
    pub fn submit(&mut self, descs: &[TestDesc]) -> Option<(u8, u32)> {
        let before = self.queue.used_idx();
        let head = self.queue.add_chain(descs);
        self.block.process_queue(0);
        if self.queue.used_idx() == before {
            return None;
        }
        let (id, len) = self.queue.used_elem(before);
        assert_eq!(id, u32::from(head));
        Some((self.mem.read_obj(GuestAddress(STATUS_ADDR)).unwrap(), len))
    }
}
