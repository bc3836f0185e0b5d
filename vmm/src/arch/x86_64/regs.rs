//! Initial vCPU register state for the two kernel entry protocols.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress};

use super::gdt::{gdt_entry, segment_from_gdt};
use super::layout::*;
use crate::vstate::memory::GuestMemoryMmap;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit protected mode, paging off, `rbx` = `hvm_start_info`.
    Pvh(u64),
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `rsi` = `boot_params`.
    Linux64(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing boot tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Floating point state Linux expects at entry (x87 default control word, SSE exceptions masked).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// General purpose registers for the boot vCPU.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    match entry {
        EntryPoint::Pvh(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
        EntryPoint::Linux64(rip) => kvm_regs {
            rflags: 0x2,
            rip,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
    }
}

/// Writes the GDT (and page tables for long mode) and fills `sregs` for `entry`.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
    sregs: &mut kvm_sregs,
) -> Result<(), Error> {
    let gdt: [u64; 4] = match entry {
        EntryPoint::Pvh(_) => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
        EntryPoint::Linux64(_) => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
    };
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match entry {
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::Linux64(_) => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// Identity maps the first GiB with 2 MiB pages: enough for the kernel's early boot code,
/// which builds its own tables right away.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), Error> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    for i in 0..512u64 {
        let addr = GuestAddress(PDE_START).unchecked_add(i * 8);
        mem.write_obj((i << 21) | 0x83, addr)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn pvh_entry_is_flat_protected_mode_without_paging() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, EntryPoint::Pvh(0x100_0000), &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.cr0 & X86_CR0_PE, 1);
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
        let regs = boot_regs(EntryPoint::Pvh(0x100_0000));
        assert_eq!(regs.rbx, PVH_INFO_START);
        assert_eq!(regs.rip, 0x100_0000);
    }

    #[test]
    fn linux64_entry_has_identity_page_tables() {
        let mem = create_guest_memory(16 << 20, false).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, EntryPoint::Linux64(0x20_0000), &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * 3)).unwrap();
        assert_eq!(pde, (3 << 21) | 0x83);
        let gdt_code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt_code, gdt_entry(0xa09b, 0, 0xfffff));
    }
}
