//! A minimal virtio driver for tests: lays out split queues in guest memory and publishes
//! descriptor chains exactly as a guest would, including malformed ones.

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::Epoll;

use super::{ActivateContext, EventRegistrar, IrqTrigger, VirtioDevice};
use crate::vstate::memory::GuestMemoryMmap;

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

/// One split queue at `base`: descriptor table, avail ring, used ring.
pub struct TestQueue {
    pub mem: GuestMemoryMmap,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_free: u16,
    avail_idx: u16,
}

/// A descriptor as the test wants it: address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct TestDesc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

impl TestDesc {
    pub fn read(addr: u64, len: u32) -> Self {
        TestDesc {
            addr,
            len,
            write: false,
        }
    }
    pub fn write(addr: u64, len: u32) -> Self {
        TestDesc {
            addr,
            len,
            write: true,
        }
    }
}

/// A descriptor as a request or packet parser receives it, for parser tests.
pub fn descriptor(addr: u64, len: u32, write: bool) -> Descriptor {
    let flags = if write { VIRTQ_DESC_F_WRITE } else { 0 };
    Descriptor::new(addr, len, flags, 0)
}

impl TestQueue {
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        TestQueue {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_free: 0,
            avail_idx: 0,
        }
    }

    /// A driver-configured, ready `Queue` for this layout.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size.max(1).next_power_of_two()).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    pub fn write_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        self.mem.write_obj(addr, at).unwrap();
        self.mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Writes a chain into free descriptors and makes it available; returns its head.
    pub fn add_chain(&mut self, descs: &[TestDesc]) -> u16 {
        let head = self.next_free;
        for (i, d) in descs.iter().enumerate() {
            let index = (self.next_free + i as u16) % self.size;
            let last = i + 1 == descs.len();
            let mut flags = if d.write { VIRTQ_DESC_F_WRITE } else { 0 };
            if !last {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_desc(index, d.addr, d.len, flags, (index + 1) % self.size);
        }
        self.next_free = (self.next_free + descs.len() as u16) % self.size;
        self.publish(head);
        head
    }

    /// Puts `head` in the avail ring and bumps the avail index.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (descriptor id, written length) of used ring entry `i`.
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// Memory for device tests and the fuzz targets: 16 MiB, queues from 0x10000, buffers from
/// 0x100000. A plain mapping the regions own, unmapped when the last clone is dropped: the
/// VMM's own guest RAM (`create_guest_memory`) is a 2 MiB-aligned mapping that lives as long
/// as the VMM process and is never unmapped, which leaked 16 MiB per fuzz iteration until
/// libFuzzer stopped on its memory limit. Devices see no difference.
pub fn test_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

/// Activates `device` with `queues`, returning the interrupt to observe.
pub fn activate(
    device: &mut dyn VirtioDevice,
    mem: &GuestMemoryMmap,
    queues: &[&TestQueue],
) -> Arc<IrqTrigger> {
    let irq = Arc::new(IrqTrigger::new().unwrap());
    let epoll = Arc::new(Epoll::new().unwrap());
    device
        .activate(ActivateContext {
            mem: mem.clone(),
            queues: queues.iter().map(|q| q.queue()).collect(),
            irq: irq.clone(),
            events: EventRegistrar::new(epoll, 0),
        })
        .unwrap();
    irq
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn test_memory_owns_its_mapping_so_a_fuzz_iteration_frees_it() {
        let mem = test_memory();
        assert!(mem.iter().all(|region| region.owned()));
        assert_eq!(mem.iter().map(|region| region.len()).sum::<u64>(), 16 << 20);
    }
}
