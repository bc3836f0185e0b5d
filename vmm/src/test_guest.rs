//! Tiny hand-assembled guests: the `probe` command and tests that exercise exits, buses and
//! devices on any KVM, including ones too slow to boot Linux.

use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress};

use crate::vstate::memory::{create_guest_memory, GuestMemoryMmap};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::Vm;

/// Where real-mode test code is loaded and entered (CS=0, IP=CODE_START).
pub const CODE_START: u64 = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM: {0}")]
    Vm(#[from] crate::vstate::vm::Error),
    #[error("vCPU: {0}")]
    Vcpu(#[from] crate::vstate::vcpu::Error),
    #[error("memory: {0}")]
    Memory(#[from] crate::vstate::memory::Error),
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM ioctl: {0}")]
    Kvm(#[from] kvm_ioctls::Error),
    #[error("unexpected exit: {0}")]
    UnexpectedExit(String),
}

/// One vCPU in 16-bit real mode over `mem_size` bytes of RAM.
pub struct RealModeGuest {
    pub vm: Vm,
    pub vcpu: Vcpu,
    pub mem: GuestMemoryMmap,
}

impl RealModeGuest {
    pub fn new(kvm: &Kvm, mem_size: u64, irqchip: bool) -> Result<Self, Error> {
        let vm = if irqchip {
            Vm::new(kvm)?
        } else {
            Vm::new_bare(kvm)?
        };
        let mem = create_guest_memory(mem_size, false)?;
        vm.register_memory(&mem)?;
        let vcpu = Vcpu::new(&vm, 0)?;
        Ok(RealModeGuest { vm, vcpu, mem })
    }

    /// Loads `code` at `CODE_START` and points the vCPU at it.
    pub fn load(&self, code: &[u8]) -> Result<(), Error> {
        self.mem.write_slice(code, GuestAddress(CODE_START))?;
        let mut sregs = self.vcpu.fd.get_sregs()?;
        for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
            seg.base = 0;
            seg.selector = 0;
        }
        self.vcpu.fd.set_sregs(&sregs)?;
        let regs = kvm_bindings::kvm_regs {
            rip: CODE_START,
            rflags: 2,
            ..Default::default()
        };
        self.vcpu.fd.set_regs(&regs)?;
        Ok(())
    }

    /// Runs until the guest writes `port`; returns the byte written.
    pub fn run_until_out(&mut self, port: u16) -> Result<u8, Error> {
        loop {
            match self.vcpu.fd.run()? {
                VcpuExit::IoOut(p, data) if p == port => {
                    return Ok(data.first().copied().unwrap_or(0))
                }
                VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => {}
                other => return Err(Error::UnexpectedExit(format!("{other:?}"))),
            }
        }
    }
}

/// `mov ecx, n; l: dec ecx; jnz l; out 0xf4, al; hlt` in 16-bit code.
pub fn cpl0_loop_code(iterations: u32) -> Vec<u8> {
    let mut code = vec![0x66, 0xb9];
    code.extend_from_slice(&iterations.to_le_bytes());
    code.extend_from_slice(&[0x66, 0x49, 0x75, 0xfc, 0xe6, 0xf4, 0xf4]);
    code
}

/// Result of `kata-like-vmm probe`.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ProbeResult {
    pub cpl0_loop_ns: f64,
    pub linux_capable: bool,
}

/// Above this many ns per guest-kernel loop iteration, CPL0 code is emulated rather than run
/// natively and Linux cannot boot usefully (real KVM: ~1-5 ns; the PVM emulator: ~1000 ns).
pub const LINUX_CAPABLE_MAX_LOOP_NS: f64 = 100.0;

/// Times a CPL0 `dec/jnz` loop at two lengths; the difference cancels the exit overhead.
pub fn probe() -> Result<ProbeResult, Error> {
    let kvm = crate::vstate::vm::open_kvm()?;
    let mut guest = RealModeGuest::new(&kvm, 2 << 20, false)?;
    let mut time = |n: u32| -> Result<f64, Error> {
        guest.load(&cpl0_loop_code(n))?;
        let start = std::time::Instant::now();
        guest.run_until_out(crate::arch::layout::EXIT_PORT)?;
        Ok(start.elapsed().as_nanos() as f64)
    };
    const SHORT: u32 = 1_000;
    const LONG: u32 = 21_000;
    // Fast KVMs need a much longer loop for the difference to rise above the exit cost.
    const FAST_LONG: u32 = 2_001_000;
    // The first run pays one-time costs (faulting in memory, building page tables).
    time(SHORT)?;
    let short = time(SHORT)?;
    let long = time(LONG)?;
    let mut per_iteration = ((long - short) / f64::from(LONG - SHORT)).max(0.0);
    if per_iteration < LINUX_CAPABLE_MAX_LOOP_NS {
        let long = time(FAST_LONG)?;
        per_iteration = ((long - short) / f64::from(FAST_LONG - SHORT)).max(0.0);
    }
    Ok(ProbeResult {
        cpl0_loop_ns: per_iteration,
        linux_capable: per_iteration < LINUX_CAPABLE_MAX_LOOP_NS,
    })
}

/// Where `tiny_elf` images load and start.
pub const TINY_ELF_LOAD_ADDR: u64 = 0x10_0000;

/// Packs `code` into an ELF64 "kernel" loaded at 1 MiB. With `pvh` the image carries a Xen
/// PVH entry note (32-bit protected mode entry); without, the VMM enters at e_entry in
/// 64-bit long mode.
pub fn tiny_elf(code: &[u8], pvh: bool) -> Vec<u8> {
    const CODE_OFF: usize = 0x1000;
    const NOTE_OFF: usize = 0x200;
    let load = TINY_ELF_LOAD_ADDR;
    let phnum: u16 = if pvh { 2 } else { 1 };
    let mut f = vec![0u8; CODE_OFF + code.len()];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // ELF version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86_64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&load.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&phnum.to_le_bytes());
    let mut program_header = |i: usize, p_type: u32, off: usize, addr: u64, size: usize| {
        let b = 64 + i * 56;
        f[b..b + 4].copy_from_slice(&p_type.to_le_bytes());
        f[b + 4..b + 8].copy_from_slice(&7u32.to_le_bytes());
        f[b + 8..b + 16].copy_from_slice(&(off as u64).to_le_bytes());
        f[b + 16..b + 24].copy_from_slice(&addr.to_le_bytes());
        f[b + 24..b + 32].copy_from_slice(&addr.to_le_bytes());
        f[b + 32..b + 40].copy_from_slice(&(size as u64).to_le_bytes());
        f[b + 40..b + 48].copy_from_slice(&(size as u64).to_le_bytes());
        f[b + 48..b + 56].copy_from_slice(&4u64.to_le_bytes());
    };
    program_header(0, 1, CODE_OFF, load, code.len()); // PT_LOAD
    if pvh {
        program_header(1, 4, NOTE_OFF, 0, 20); // PT_NOTE
        f[NOTE_OFF..NOTE_OFF + 4].copy_from_slice(&4u32.to_le_bytes()); // namesz
        f[NOTE_OFF + 4..NOTE_OFF + 8].copy_from_slice(&4u32.to_le_bytes()); // descsz
        f[NOTE_OFF + 8..NOTE_OFF + 12].copy_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        f[NOTE_OFF + 12..NOTE_OFF + 16].copy_from_slice(b"Xen\0");
        f[NOTE_OFF + 16..NOTE_OFF + 20].copy_from_slice(&(load as u32).to_le_bytes());
    }
    f[CODE_OFF..].copy_from_slice(code);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn tiny_elf_loads_with_and_without_a_pvh_note() {
        use crate::arch::regs::EntryPoint;
        for pvh in [true, false] {
            let mem = create_guest_memory(4 << 20, false).unwrap();
            let mut f = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut f, &tiny_elf(&[0xe6, 0xf4], pvh)).unwrap();
            let k = crate::arch::boot::load_kernel(&mem, &mut f).unwrap();
            let expected = if pvh {
                EntryPoint::Pvh(TINY_ELF_LOAD_ADDR)
            } else {
                EntryPoint::Linux64(TINY_ELF_LOAD_ADDR)
            };
            assert_eq!(k.entry, expected);
            let mut code = [0u8; 2];
            vm_memory::Bytes::read_slice(&mem, &mut code, GuestAddress(TINY_ELF_LOAD_ADDR))
                .unwrap();
            assert_eq!(code, [0xe6, 0xf4]);
        }
    }
}
