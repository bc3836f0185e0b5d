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
    let short = time(SHORT)?;
    let long = time(LONG)?;
    let per_iteration = ((long - short) / f64::from(LONG - SHORT)).max(0.0);
    Ok(ProbeResult {
        cpl0_loop_ns: per_iteration,
        linux_capable: per_iteration < LINUX_CAPABLE_MAX_LOOP_NS,
    })
}
