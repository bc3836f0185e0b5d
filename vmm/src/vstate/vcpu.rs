//! vCPUs: setup for boot and the run loop that dispatches exits to the device buses.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::{EXIT_PORT, I8042_COMMAND_PORT};
use crate::arch::{cpuid, msr, regs};
use crate::devices::bus::{lock, Bus};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_CREATE_VCPU: {0}")]
    Create(kvm_ioctls::Error),
    #[error("building CPUID: {0:?}")]
    Cpuid(vmm_sys_util::fam::Error),
    #[error("vCPU setup ioctl {0}: {1}")]
    Setup(&'static str, kvm_ioctls::Error),
    #[error("only {0} of the boot MSRs were accepted")]
    Msrs(usize),
    #[error("boot registers: {0}")]
    Regs(#[from] regs::Error),
}

/// Why the VM stopped, and the VMM's exit status for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote this byte to the exit port.
    GuestStatus(u8),
    /// Triple fault, reset request or panic-reboot: the guest died without an exit status.
    GuestReset,
    /// A KVM error or an exit the VMM cannot handle.
    VmmError,
    /// Stopped through the API.
    Stopped,
}

impl ExitReason {
    pub fn status(self) -> i32 {
        match self {
            ExitReason::GuestStatus(n) => i32::from(n),
            ExitReason::GuestReset => 3,
            ExitReason::VmmError => 1,
            ExitReason::Stopped => 0,
        }
    }
}

/// Shared "the VM is over" flag: the first reason wins; `evt` wakes the VMM thread, `cond`
/// other threads waiting for the end (`wait_timeout`).
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    cond: Condvar,
    pub evt: EventFd,
    /// CLOCK_MONOTONIC time of the first exit to user space (benchmarks: exec to first exit).
    pub first_exit_ns: AtomicU64,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            cond: Condvar::new(),
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            first_exit_ns: AtomicU64::new(0),
        })
    }

    pub fn request(&self, reason: ExitReason) {
        let mut r = lock(&self.reason);
        if r.is_none() {
            *r = Some(reason);
            let _ = self.evt.write(1);
            self.cond.notify_all();
        }
    }

    /// Waits until the VM is over or `timeout` has passed; returns the reason if over.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<ExitReason> {
        let deadline = std::time::Instant::now() + timeout;
        let mut r = lock(&self.reason);
        while r.is_none() {
            let now = std::time::Instant::now();
            if now >= deadline {
                break;
            }
            r = self
                .cond
                .wait_timeout(r, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        *r
    }

    pub fn reason(&self) -> Option<ExitReason> {
        *lock(&self.reason)
    }
}

/// Pause/resume/stop coordination between the VMM and the vCPU threads.
#[derive(Default)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    cond: Condvar,
}

#[derive(Default)]
struct ControlState {
    pause: bool,
    paused_vcpus: usize,
    stop: bool,
    /// Bumped by `save_vcpus`: each parked vCPU whose last save is older saves its state.
    save_generation: u64,
    /// The states parked vCPUs saved for the current generation.
    saved: Vec<Result<VcpuState, String>>,
}

impl VcpuControl {
    pub fn request_pause(&self, pause: bool) {
        lock(&self.state).pause = pause;
        self.cond.notify_all();
    }

    pub fn request_stop(&self) {
        lock(&self.state).stop = true;
        self.cond.notify_all();
    }

    /// Waits until `count` vCPUs sit paused (or the VM stops).
    pub fn wait_paused(&self, count: usize) {
        let mut s = lock(&self.state);
        while s.pause && !s.stop && s.paused_vcpus < count {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Called by a vCPU between runs: blocks while paused. Returns false when it must stop.
    /// As it parks the vCPU logs where the guest was, before the pauser is told it is parked;
    /// while parked it saves its state each time `save_vcpus` asks.
    fn checkpoint(&self, vcpu: &mut Vcpu) -> bool {
        let mut s = lock(&self.state);
        if s.pause && !s.stop {
            // A paused vCPU logs where the guest was: the shim pauses a pod VM whose agent
            // never answered before killing it, so these lines say where the guest was stuck.
            tracing::info!(vcpu = vcpu.index, state = %vcpu.describe_state(), "vCPU paused");
            s.paused_vcpus += 1;
            // Only saves asked for from now on concern this vCPU.
            let mut saved_generation = s.save_generation;
            self.cond.notify_all();
            while s.pause && !s.stop {
                if s.save_generation != saved_generation {
                    saved_generation = s.save_generation;
                    // The state ioctls run with the lock held: every vCPU is parked anyway,
                    // and they take milliseconds.
                    let state = vcpu.save_state().map_err(|e| e.to_string());
                    s.saved.push(state);
                    self.cond.notify_all();
                    continue;
                }
                s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.paused_vcpus -= 1;
        }
        !s.stop
    }

    /// Has each of the `count` parked vCPUs save its state on its own thread; returns the
    /// states in vCPU order. Refused unless all of them are parked.
    pub fn save_vcpus(&self, count: usize) -> Result<Vec<VcpuState>, String> {
        let mut s = lock(&self.state);
        if !s.pause || s.paused_vcpus != count {
            return Err(format!(
                "the VM is not paused ({} of {count} vCPUs parked): pause it first",
                if s.pause { s.paused_vcpus } else { 0 }
            ));
        }
        s.saved.clear();
        s.save_generation = s.save_generation.wrapping_add(1);
        self.cond.notify_all();
        while s.saved.len() < count && !s.stop {
            s = self.cond.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        if s.saved.len() < count {
            return Err("the VM stopped while its vCPUs were being saved".into());
        }
        let mut states = std::mem::take(&mut s.saved)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        states.sort_by_key(|v| v.index);
        Ok(states)
    }

    pub fn is_paused(&self) -> bool {
        lock(&self.state).pause
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, set by the kick signal handler so that a
    /// signal arriving just before KVM_RUN still makes it return at once.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Handler for the vCPU kick signal: only an atomic-enough byte store, async-signal-safe.
pub extern "C" fn kick_signal_handler(
    _: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    IMMEDIATE_EXIT.with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: the pointer targets this thread's live kvm_run mapping (set in `run`).
            unsafe { std::ptr::write_volatile(ptr, 1) };
        }
    });
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

pub struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    /// The MSRs a snapshot saves (KVM_GET_MSR_INDEX_LIST of the VM's host).
    pub msrs_to_save: Arc<[u32]>,
}

/// Buses and shared state a vCPU thread needs.
#[derive(Clone)]
pub struct VcpuContext {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<ExitSignal>,
    pub control: Arc<VcpuControl>,
}

/// CLOCK_MONOTONIC in nanoseconds (the bench times exits with the same clock).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl Vcpu {
    pub fn new(vm: &Vm, index: u8) -> Result<Self, Error> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(index))
            .map_err(Error::Create)?;
        Ok(Vcpu {
            index,
            fd,
            msrs_to_save: vm.msrs_to_save().clone(),
        })
    }

    /// CPUID, MSRs, FPU and LAPIC LINT pins for every vCPU.
    pub fn configure_cpu(&self, supported: &CpuId, count: u8) -> Result<(), Error> {
        let cpuid = cpuid::normalize(supported, self.index, count).map_err(Error::Cpuid)?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::Setup("SET_CPUID2", e))?;
        let msrs = msr::boot_msrs().map_err(Error::Cpuid)?;
        let n = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| Error::Setup("SET_MSRS", e))?;
        if n != msrs.as_slice().len() {
            return Err(Error::Msrs(n));
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(|e| Error::Setup("SET_FPU", e))?;
        self.set_lint()
    }

    /// LINT0 = ExtINT (the PIC), LINT1 = NMI, as a BIOS leaves them.
    fn set_lint(&self) -> Result<(), Error> {
        const APIC_LVT0: usize = 0x350;
        const APIC_LVT1: usize = 0x360;
        const DM_EXTINT: u32 = 7;
        const DM_NMI: u32 = 4;
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| Error::Setup("GET_LAPIC", e))?;
        for (reg, mode) in [(APIC_LVT0, DM_EXTINT), (APIC_LVT1, DM_NMI)] {
            let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (i, b) in value.to_le_bytes().iter().enumerate() {
                lapic.regs[reg + i] = *b as i8;
            }
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| Error::Setup("SET_LAPIC", e))
    }

    /// Boot vCPU only: registers for the kernel entry.
    pub fn configure_boot(
        &self,
        mem: &GuestMemoryMmap,
        entry: regs::EntryPoint,
    ) -> Result<(), Error> {
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| Error::Setup("GET_SREGS", e))?;
        regs::setup_sregs(mem, entry, &mut sregs)?;
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| Error::Setup("SET_SREGS", e))?;
        self.fd
            .set_regs(&regs::boot_regs(entry))
            .map_err(|e| Error::Setup("SET_REGS", e))
    }

    /// Runs until the VM exits or the VMM stops it.
    pub fn run(mut self, ctx: VcpuContext) {
        let ptr: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(ptr));
        loop {
            if ctx.exit.reason().is_some() || !ctx.control.checkpoint(&mut self) {
                break;
            }
            if let Some(reason) = self.run_once(&ctx) {
                ctx.exit.request(reason);
                break;
            }
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }

    /// Key registers, for logs when a guest dies.
    pub fn describe_state(&self) -> String {
        // mp_state 3 is KVM_MP_STATE_HALTED: a guest waiting for an interrupt.
        let mp_state = match self.fd.get_mp_state() {
            Ok(m) => m.mp_state.to_string(),
            Err(_) => "?".into(),
        };
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/{:#x} mp_state={mp_state}",
                r.rip, r.rsp, r.rflags, s.cr0, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base
            ),
            _ => "unavailable".into(),
        }
    }

    /// One KVM_RUN; returns a reason when the VM must stop.
    pub fn run_once(&mut self, ctx: &VcpuContext) -> Option<ExitReason> {
        let index = self.index;
        let result = self.fd.run();
        if ctx.exit.first_exit_ns.load(Ordering::Relaxed) == 0 {
            ctx.exit
                .first_exit_ns
                .store(monotonic_ns(), Ordering::Relaxed);
        }
        match result {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == EXIT_PORT {
                    let status = data.first().copied().unwrap_or(0);
                    tracing::info!(vcpu = index, status, "guest wrote the exit port");
                    return Some(ExitReason::GuestStatus(status));
                }
                if port == I8042_COMMAND_PORT && data.first() == Some(&0xfe) {
                    tracing::info!(vcpu = index, "guest reset through the i8042");
                    return Some(ExitReason::GuestReset);
                }
                tracing::trace!(vcpu = index, port, ?data, "port write");
                ctx.pio.write(u64::from(port), data);
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                tracing::trace!(vcpu = index, port, ?data, "port read");
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                tracing::trace!(vcpu = index, addr, ?data, "mmio write");
                ctx.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) => {
                // Only reachable without an in-kernel irqchip (hand-made guests): a halted
                // CPU with nothing to wake it is the end of the program.
                tracing::info!(vcpu = index, "vCPU halted");
                Some(ExitReason::GuestReset)
            }
            Ok(VcpuExit::Shutdown) => {
                // A warning, so that it reaches every log at the default level: a pod VM that
                // resets is gone (`reboot=t` reboots are triple faults too), and tests/run-e2e
                // recognises the nested test host's spurious ones by this line.
                tracing::warn!(vcpu = index, state = %self.describe_state(), "guest shutdown (triple fault or reset)");
                Some(ExitReason::GuestReset)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                tracing::info!(vcpu = index, kind, "guest system event");
                Some(ExitReason::GuestReset)
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                tracing::error!(vcpu = index, reason, cpu, "KVM entry failed");
                Some(ExitReason::VmmError)
            }
            Ok(VcpuExit::InternalError) => {
                tracing::error!(vcpu = index, state = %self.describe_state(), "KVM internal error (emulation failure)");
                Some(ExitReason::VmmError)
            }
            Ok(other) => {
                tracing::error!(vcpu = index, exit = ?other, "unexpected vCPU exit");
                Some(ExitReason::VmmError)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => {
                tracing::error!(vcpu = index, error = %e, "KVM_RUN failed");
                Some(ExitReason::VmmError)
            }
        }
    }
}
