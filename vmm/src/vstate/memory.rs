//! Guest memory: anonymous private mappings (optionally 2 MiB hugetlbfs pages), not dumped
//! in cores (KSM merges only pages marked MADV_MERGEABLE, which we never set); or, when a
//! vhost-user device's backend must map guest RAM too, one memfd mapped MAP_SHARED.

use std::fs::File;
use std::os::unix::io::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

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
    #[error("reserving guest memory: {0}")]
    Reserve(std::io::Error),
    #[error("creating the shared guest memory file (memfd): {0}")]
    Memfd(std::io::Error),
}

/// What backs guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryBacking {
    /// Anonymous private memory: only the VMM maps it (the default).
    Anonymous,
    /// One memfd mapped MAP_SHARED, whose fd each region carries (`file_offset`), so that a
    /// vhost-user backend (virtiofsd) can map the same pages through SET_MEM_TABLE.
    SharedMemfd,
}

const MAP_HUGE_2MB: i32 = 21 << libc::MAP_HUGE_SHIFT;

/// Maps `size` bytes of anonymous guest RAM.
pub fn create_guest_memory(size: u64, hugepages: bool) -> Result<GuestMemoryMmap, Error> {
    create_guest_memory_with(size, hugepages, MemoryBacking::Anonymous)
}

/// Maps `size` bytes of guest RAM backed as `backing` says.
pub fn create_guest_memory_with(
    size: u64,
    hugepages: bool,
    backing: MemoryBacking,
) -> Result<GuestMemoryMmap, Error> {
    if size == 0 || (hugepages && !size.is_multiple_of(2 << 20)) || !size.is_multiple_of(4096) {
        return Err(Error::InvalidSize(size >> 20));
    }
    if backing == MemoryBacking::SharedMemfd {
        return create_shared_memory(size, hugepages);
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
        let mapping = if hugepages {
            MmapRegion::<()>::build(None, len, libc::PROT_READ | libc::PROT_WRITE, flags)?
        } else {
            map_thp_aligned(len, flags)?
        };
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

/// Guest RAM in one memfd (sealed against shrinking, so a mapping can never lose its pages),
/// each region mapped MAP_SHARED at its own offset of the file.
fn create_shared_memory(size: u64, hugepages: bool) -> Result<GuestMemoryMmap, Error> {
    let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    if hugepages {
        flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: the name is a NUL-terminated literal; memfd_create only returns a new fd.
    let fd = unsafe { libc::memfd_create(c"kata-like-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(Error::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh fd we own; the File closes it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(Error::Memfd)?;
    if !hugepages {
        // SAFETY: fcntl on our own fd with an integer argument.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
    }
    let mut regions = Vec::new();
    for (start, len) in arch_memory_regions(size) {
        let len_usize = usize::try_from(len).map_err(|_| Error::InvalidSize(size >> 20))?;
        // Regions are laid out back to back in the file, in guest address order.
        let offset: u64 = regions
            .iter()
            .map(|r: &GuestRegionMmap| vm_memory::GuestMemoryRegion::len(r))
            .sum();
        let file = file.try_clone().map_err(Error::Memfd)?;
        let mapping = MmapRegion::<()>::from_file(FileOffset::new(file, offset), len_usize)?;
        // SAFETY: the mapping is ours, `len` bytes long; madvise only sets a hint on it.
        unsafe {
            libc::madvise(mapping.as_ptr().cast(), len_usize, libc::MADV_DONTDUMP);
        }
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(Error::Region(start))?;
        regions.push(region);
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

const HUGE_PAGE: usize = 2 << 20;

/// Anonymous guest RAM whose host address is 2 MiB-aligned, with MADV_HUGEPAGE, as QEMU does.
/// KVM maps a guest 2 MiB range with one huge nested-page entry only when the host range behind
/// it is a transparent huge page at the same alignment. Unaligned (what mmap returns before Linux
/// 6.7) every 4 KiB page costs its own nested fault on first touch: measured in the test host,
/// boot to marker went from 0.96-0.98x QEMU microvm's time to 0.78-0.84x, with the same guest
/// RAM touched. The mapping stays for the life of the VMM (the region does not own it).
fn map_thp_aligned(len: usize, flags: i32) -> Result<MmapRegion<()>, Error> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let reserve = len
        .checked_add(HUGE_PAGE)
        .ok_or(Error::InvalidSize((len >> 20) as u64))?;
    // SAFETY: a fresh anonymous mapping; no existing memory is touched.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), reserve, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(Error::Reserve(std::io::Error::last_os_error()));
    }
    let start = raw as usize;
    // mmap never returns a mapping that ends past the address space, so this cannot overflow.
    let aligned = (start + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
    let head = aligned - start;
    let tail = reserve - head - len;
    // SAFETY: the head and tail are parts of our reservation outside [aligned, aligned + len);
    // madvise only sets a hint on the part we keep.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
        libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    // SAFETY: [aligned, aligned + len) is mapped read/write by us and never unmapped.
    Ok(unsafe { MmapRegion::<()>::build_raw(aligned as *mut u8, len, prot, flags)? })
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
    fn guest_ram_is_2_mib_aligned_on_the_host() {
        let mem = create_guest_memory(64 << 20, false).unwrap();
        for region in mem.iter() {
            assert_eq!(region.as_ptr() as usize % (2 << 20), 0);
        }
        mem.write_obj(7u64, GuestAddress((64 << 20) - 8)).unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress((64 << 20) - 8)).unwrap(),
            7
        );
    }

    #[test]
    fn shared_memory_is_one_memfd_that_another_mapping_sees() {
        use std::os::unix::fs::FileExt;
        let mem = create_guest_memory_with(32 << 20, false, MemoryBacking::SharedMemfd).unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        let region = mem.iter().next().unwrap();
        let file_offset = region.file_offset().unwrap();
        let mut got = [0u8; 4];
        file_offset
            .file()
            .read_exact_at(&mut got, file_offset.start() + 0x1000)
            .unwrap();
        assert_eq!(u32::from_le_bytes(got), 0x1234_5678);
    }

    #[test]
    fn zero_or_unaligned_sizes_are_rejected() {
        assert!(create_guest_memory(0, false).is_err());
        assert!(create_guest_memory(4097, false).is_err());
        assert!(create_guest_memory(3 << 20, true).is_err());
    }
}
