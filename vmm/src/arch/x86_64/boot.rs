//! Loading the kernel and initramfs and writing what the kernel reads at entry: the PVH
//! `hvm_start_info` or the Linux `boot_params`, each with the E820 memory map.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, Cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;
use super::regs::EntryPoint;
use crate::vstate::memory::GuestMemoryMmap;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const PAGE_SIZE: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kernel is neither an ELF vmlinux nor a bzImage: {0}")]
    KernelLoad(linux_loader::loader::Error),
    #[error("reading the kernel: {0}")]
    KernelIo(std::io::Error),
    #[error("initramfs of {size} bytes does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("reading the initramfs: {0}")]
    InitrdIo(std::io::Error),
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("writing the command line: {0}")]
    CmdlineLoad(linux_loader::loader::Error),
    #[error("writing boot parameters: {0}")]
    BootParams(linux_loader::configurator::Error),
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Where the kernel went and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// Setup header of a bzImage, needed to fill `boot_params`.
    pub setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    pub kernel_end: u64,
}

/// Placed initramfs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdRegion {
    pub address: u64,
    pub size: u64,
}

/// Loads an ELF vmlinux (preferring its PVH entry) or a bzImage.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, Error> {
    match Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => {
            let entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr.raw_value()),
                _ => EntryPoint::Linux64(result.kernel_load.raw_value()),
            };
            Ok(LoadedKernel {
                entry,
                setup_header: None,
                kernel_end: result.kernel_end,
            })
        }
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {
            kernel.seek(SeekFrom::Start(0)).map_err(Error::KernelIo)?;
            let result = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
                .map_err(Error::KernelLoad)?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode code.
            Ok(LoadedKernel {
                entry: EntryPoint::Linux64(result.kernel_load.raw_value() + 0x200),
                setup_header: result.setup_header,
                kernel_end: result.kernel_end,
            })
        }
        Err(e) => Err(Error::KernelLoad(e)),
    }
}

/// End of RAM reachable below the MMIO gap (where the initramfs goes).
fn low_mem_end(mem: &GuestMemoryMmap) -> u64 {
    mem.iter()
        .filter(|r| r.start_addr().raw_value() < MMIO_GAP_START)
        .map(|r| r.start_addr().raw_value() + r.len())
        .max()
        .unwrap_or(0)
}

/// Copies the initramfs to the top of low memory, page aligned, above `kernel_end`.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    kernel_end: u64,
) -> Result<InitrdRegion, Error> {
    let size = initrd.seek(SeekFrom::End(0)).map_err(Error::InitrdIo)?;
    initrd.seek(SeekFrom::Start(0)).map_err(Error::InitrdIo)?;
    let limit = low_mem_end(mem);
    let address = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or(Error::InitrdTooLarge { size, limit })?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(address), initrd, len)?;
    Ok(InitrdRegion { address, size })
}

/// Builds the command line: the user's, then one `virtio_mmio.device=` per device.
pub fn build_cmdline(base: &str, devices: &[(u64, u32)]) -> Result<Cmdline, Error> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(Error::Cmdline)?;
    if !base.trim().is_empty() {
        cmdline.insert_str(base.trim()).map_err(Error::Cmdline)?;
    }
    for (addr, irq) in devices {
        cmdline
            .add_virtio_mmio_device(MMIO_DEVICE_SIZE, GuestAddress(*addr), *irq, None)
            .map_err(Error::Cmdline)?;
    }
    Ok(cmdline)
}

/// The guest's RAM as E820 entries: low memory up to the EBDA, the EBDA reserved (it holds
/// the MP table), then everything from 1 MiB.
pub fn e820_entries(mem: &GuestMemoryMmap) -> Vec<(u64, u64, u32)> {
    let mut entries = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            entries.push((start, end - start, E820_RAM));
        }
    }
    entries
}

/// Writes the command line and the boot information structure for `kernel`.
pub fn configure_boot(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
) -> Result<(), Error> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(Error::CmdlineLoad)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(Error::Cmdline)?
        .as_bytes()
        .len();
    let e820 = e820_entries(mem);
    match kernel.entry {
        EntryPoint::Pvh(_) => {
            let memmap: Vec<hvm_memmap_table_entry> = e820
                .iter()
                .map(|(addr, size, type_)| hvm_memmap_table_entry {
                    addr: *addr,
                    size: *size,
                    type_: *type_,
                    reserved: 0,
                })
                .collect();
            let mut start_info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries: memmap.len() as u32,
                ..Default::default()
            };
            let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
            if let Some(initrd) = initrd {
                start_info.nr_modules = 1;
                start_info.modlist_paddr = PVH_MODLIST_START;
                params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
                let module = hvm_modlist_entry {
                    paddr: initrd.address,
                    size: initrd.size,
                    ..Default::default()
                };
                params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
            }
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
                .map_err(Error::BootParams)?;
        }
        EntryPoint::Linux64(_) => {
            let mut zero_page = boot_params::default();
            if let Some(hdr) = kernel.setup_header {
                zero_page.hdr = hdr;
            }
            zero_page.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            zero_page.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            zero_page.hdr.header = KERNEL_HDR_MAGIC;
            zero_page.hdr.cmd_line_ptr = CMDLINE_START as u32;
            zero_page.hdr.cmdline_size = cmdline_len as u32;
            zero_page.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            if let Some(initrd) = initrd {
                zero_page.hdr.ramdisk_image = initrd.address as u32;
                zero_page.hdr.ramdisk_size = initrd.size as u32;
            }
            for (i, (addr, size, type_)) in e820.iter().enumerate().take(zero_page.e820_table.len())
            {
                zero_page.e820_table[i] = boot_e820_entry {
                    addr: *addr,
                    size: *size,
                    r#type: *type_,
                };
                zero_page.e820_entries = (i + 1) as u8;
            }
            let params = BootParams::new(&zero_page, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
                .map_err(Error::BootParams)?;
        }
    }
    Ok(())
}

/// Reads back the PVH start info (tests and debugging).
pub fn read_start_info(mem: &GuestMemoryMmap) -> Result<hvm_start_info, Error> {
    Ok(mem.read_obj(GuestAddress(PVH_INFO_START))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use std::io::Write;

    #[test]
    fn cmdline_appends_virtio_devices_in_order() {
        let c = build_cmdline("console=ttyS0", &[(0xd000_0000, 5), (0xd000_1000, 6)]).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
    }

    #[test]
    fn pvh_start_info_points_at_cmdline_memmap_and_initrd() {
        let mem = create_guest_memory(64 << 20, false).unwrap();
        let mut initrd = tempfile::tempfile().unwrap();
        initrd.write_all(&[0xab; 5000]).unwrap();
        let region = load_initrd(&mem, &mut initrd, 0x200_0000).unwrap();
        assert_eq!(region.address % PAGE_SIZE, 0);
        assert!(region.address + region.size <= 64 << 20);
        let mut back = [0u8; 5000];
        mem.read_slice(&mut back, GuestAddress(region.address))
            .unwrap();
        assert!(back.iter().all(|b| *b == 0xab));

        let kernel = LoadedKernel {
            entry: EntryPoint::Pvh(0x100_0000),
            setup_header: None,
            kernel_end: 0x200_0000,
        };
        let cmdline = build_cmdline("console=ttyS0", &[]).unwrap();
        configure_boot(&mem, &kernel, &cmdline, Some(region)).unwrap();
        let info = read_start_info(&mem).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (region.address, region.size));
        assert_eq!(info.memmap_entries, 3);
        let last: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!((last.addr, last.addr + last.size), (HIMEM_START, 64 << 20));
        let mut cmd = [0u8; 14];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
    }

    #[test]
    fn initrd_larger_than_memory_is_an_error() {
        let mem = create_guest_memory(4 << 20, false).unwrap();
        let mut initrd = tempfile::tempfile().unwrap();
        initrd.set_len(8 << 20).unwrap();
        assert!(matches!(
            load_initrd(&mem, &mut initrd, HIMEM_START),
            Err(Error::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let mut kernel = tempfile::tempfile().unwrap();
        kernel.write_all(&[0x55; 8192]).unwrap();
        assert!(load_kernel(&mem, &mut kernel).is_err());
    }
}
