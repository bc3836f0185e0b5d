//! Guest memory: anonymous private mappings (optionally 2 MiB hugetlbfs pages), not dumped
//! in cores (KSM merges only pages marked MADV_MERGEABLE, which we never set). A VM restored
//! from a snapshot maps the snapshot's memory file instead (`map_snapshot_memory`), and a
//! snapshot writes the RAM to that file (`write_snapshot_memory`). When a vhost-user device's
//! backend must map guest RAM too, it is one memfd mapped MAP_SHARED instead.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::FromRawFd;

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MmapRegion,
};

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
    #[error("snapshot memory file: {0}")]
    File(std::io::Error),
    #[error("memory file is {file} bytes, the snapshot state says {state}: it is truncated or belongs to another snapshot")]
    FileSize { file: u64, state: u64 },
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

/// Maps a snapshot's memory file as guest RAM of `size` bytes: MAP_PRIVATE, so the guest's
/// writes go to private copies and every page it only reads stays the file's page in the
/// host's page cache, shared by every VM restored from the same file. The file holds the
/// regions one after the other, as `write_snapshot_memory` wrote them.
pub fn map_snapshot_memory(file: &File, size: u64) -> Result<GuestMemoryMmap, Error> {
    let file_len = file.metadata().map_err(Error::File)?.len();
    if file_len != size {
        return Err(Error::FileSize {
            file: file_len,
            state: size,
        });
    }
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(Error::InvalidSize(size >> 20));
    }
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in arch_memory_regions(size) {
        let ulen = usize::try_from(len).map_err(|_| Error::InvalidSize(size >> 20))?;
        let fd = file.try_clone().map_err(Error::File)?;
        let mapping = MmapRegion::<()>::build(
            Some(FileOffset::new(fd, offset)),
            ulen,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )?;
        // SAFETY: the mapping is ours, `ulen` bytes long; madvise only sets a hint on it.
        unsafe {
            libc::madvise(mapping.as_ptr().cast(), ulen, libc::MADV_DONTDUMP);
        }
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(start)).ok_or(Error::Region(start))?;
        regions.push(region);
        offset += len;
    }
    Ok(GuestMemoryMmap::from_regions(regions)?)
}

/// What writing the memory file did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryDump {
    /// The file's length: the guest's RAM size.
    pub size: u64,
    /// Bytes actually written: the non-zero pages; the rest are holes.
    pub written: u64,
}

const PAGE: usize = 4096;
/// Guest RAM is copied out this much at a time.
const DUMP_CHUNK: usize = 1 << 20;

/// Writes guest RAM to `file` (empty, opened for writing), regions one after the other.
/// Only pages with a non-zero byte are written: the others stay holes of a sparse file, so
/// a guest that used little of its RAM gives a small file that reads back as all of it.
/// Called with the vCPUs parked and on the thread that runs the devices, so nothing writes
/// guest memory meanwhile.
pub fn write_snapshot_memory(mem: &GuestMemoryMmap, file: &File) -> Result<MemoryDump, Error> {
    let size: u64 = mem.iter().map(|r| r.len()).sum();
    // The length first: a full disk fails here or at the first write, never silently.
    file.set_len(size).map_err(Error::File)?;
    let mut written = 0u64;
    let mut file_offset = 0u64;
    let mut buf = vec![0u8; DUMP_CHUNK];
    for region in mem.iter() {
        let mut done = 0u64;
        while done < region.len() {
            let n = usize::try_from((region.len() - done).min(DUMP_CHUNK as u64))
                .map_err(|_| Error::Region(region.start_addr().0))?;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(region.start_addr().0 + done))
                .map_err(|_| Error::Region(region.start_addr().0 + done))?;
            // Runs of non-zero pages go out in one write each.
            let mut page = 0;
            while page < n {
                let is_data = |p: usize| chunk[p..(p + PAGE).min(n)].iter().any(|b| *b != 0);
                if !is_data(page) {
                    page += PAGE;
                    continue;
                }
                let run_start = page;
                while page < n && is_data(page) {
                    page += PAGE;
                }
                let run_end = page.min(n);
                file.write_all_at(
                    &chunk[run_start..run_end],
                    file_offset + done + run_start as u64,
                )
                .map_err(Error::File)?;
                written += (run_end - run_start) as u64;
            }
            done += n as u64;
        }
        file_offset += region.len();
    }
    file.sync_all().map_err(Error::File)?;
    Ok(MemoryDump { size, written })
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
    fn snapshot_memory_round_trips_sparsely_and_maps_private() {
        let mem = create_guest_memory(64 << 20, false).unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0xabcdu16, GuestAddress((64 << 20) - 2))
            .unwrap();
        let file = tempfile::tempfile().unwrap();
        let dump = write_snapshot_memory(&mem, &file).unwrap();
        assert_eq!(dump.size, 64 << 20);
        assert_eq!(
            dump.written,
            2 * 4096,
            "only the two non-zero pages are written"
        );
        assert_eq!(file.metadata().unwrap().len(), 64 << 20);

        let restored = map_snapshot_memory(&file, 64 << 20).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1234_5678
        );
        assert_eq!(
            restored
                .read_obj::<u16>(GuestAddress((64 << 20) - 2))
                .unwrap(),
            0xabcd
        );
        assert_eq!(restored.read_obj::<u64>(GuestAddress(0x8000)).unwrap(), 0);
        // MAP_PRIVATE: the restored guest's writes never reach the file.
        restored.write_obj(7u32, GuestAddress(0x1000)).unwrap();
        let mut on_disk = [0u8; 4];
        file.read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(on_disk), 0x1234_5678);
    }

    #[test]
    fn a_memory_file_of_another_size_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(32 << 20).unwrap();
        let err = map_snapshot_memory(&file, 64 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("memory file is 33554432 bytes, the snapshot state says 67108864"),
            "{err}"
        );
    }

    #[test]
    fn zero_or_unaligned_sizes_are_rejected() {
        assert!(create_guest_memory(0, false).is_err());
        assert!(create_guest_memory(4097, false).is_err());
        assert!(create_guest_memory(3 << 20, true).is_err());
    }
}
