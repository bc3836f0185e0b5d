//! Guest memory: anonymous private mappings (optionally 2 MiB hugetlbfs pages), not dumped
//! in cores (KSM merges only pages marked MADV_MERGEABLE, which we never set).

use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};

use crate::arch::layout::arch_memory_regions;

pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("guest memory size {0} MiB is invalid")]
    InvalidSize(u64),
    #[error("mapping guest memory: {0}")]
    Mmap(#[from] vm_memory::mmap::MmapRegionError),
    #[error("building guest memory: {0}")]
    Regions(#[from] vm_memory::GuestRegionCollectionError),
    #[error("guest memory region at {0:#x} is invalid")]
    Region(u64),
}

const MAP_HUGE_2MB: i32 = 21 << libc::MAP_HUGE_SHIFT;

/// Maps `size` bytes of guest RAM.
pub fn create_guest_memory(size: u64, hugepages: bool) -> Result<GuestMemoryMmap, Error> {
    if size == 0 || (hugepages && !size.is_multiple_of(2 << 20)) || !size.is_multiple_of(4096) {
        return Err(Error::InvalidSize(size >> 20));
    }
    let mut regions = Vec::new();
    for (start, len) in arch_memory_regions(size) {
        let len = usize::try_from(len).map_err(|_| Error::InvalidSize(size >> 20))?;
        // Hugepages are reserved at mmap time (no MAP_NORESERVE), so a host without enough
        // free 2 MiB pages fails here with a clear error instead of SIGBUS later.
        let flags = if hugepages {
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | MAP_HUGE_2MB
        } else {
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE
        };
        let mapping =
            MmapRegion::<()>::build(None, len, libc::PROT_READ | libc::PROT_WRITE, flags)?;
        // SAFETY: the mapping is ours, `len` bytes long; madvise only sets hints on it.
        unsafe {
            libc::madvise(mapping.as_ptr().cast(), len, libc::MADV_DONTDUMP);
        }
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(Error::Region(start))?;
        regions.push(region);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn memory_is_readable_and_writable_across_its_range() {
        let mem = create_guest_memory(32 << 20, false).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress((32 << 20) - 4))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress((32 << 20) - 4)).unwrap(),
            0xdead_beef
        );
        assert!(mem.read_obj::<u32>(GuestAddress(32 << 20)).is_err());
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn zero_or_unaligned_sizes_are_rejected() {
        assert!(create_guest_memory(0, false).is_err());
        assert!(create_guest_memory(4097, false).is_err());
        assert!(create_guest_memory(3 << 20, true).is_err());
    }
}
