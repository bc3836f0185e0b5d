//! A vCPU's KVM state for snapshots: saved on the vCPU's own thread while it is parked, and
//! restored on a fresh vCPU before it first runs (instead of the boot-time setup). The ioctl
//! orders follow Firecracker's (src/vmm/src/arch/x86_64/vcpu.rs), whose comments give why.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use serde::{Deserialize, Serialize};

use super::vcpu::Vcpu;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("saving vCPU {0}: {1} failed: {2}")]
    Save(u8, &'static str, kvm_ioctls::Error),
    #[error("restoring vCPU {0}: {1} failed: {2}")]
    Restore(u8, &'static str, kvm_ioctls::Error),
    #[error(
        "restoring vCPU {0}: KVM refused MSR {1:#x} (the snapshot comes from another host or KVM)"
    )]
    MsrRefused(u8, u32),
    #[error("vCPU {0}: building the {1} list: {2:?}")]
    Fam(u8, &'static str, vmm_sys_util::fam::Error),
}

/// Everything KVM keeps for one vCPU that the guest can observe.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub index: u8,
    /// The CPUID the VMM set at boot (KVM_GET_CPUID2), set again first on restore.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR of KVM_GET_MSR_INDEX_LIST this vCPU reads, kvmclock's included, by index.
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// The guest's TSC frequency; a host with another one scales to it on restore.
    pub tsc_khz: Option<u32>,
}

impl Vcpu {
    /// Completes an I/O or MMIO exit the guest is still inside: KVM finishes it only on the
    /// next KVM_RUN, and that pending part is in no state userspace can read. With
    /// immediate_exit set KVM_RUN completes it and returns at once (EINTR) without running
    /// guest code.
    fn complete_pending_exit(&mut self) -> Result<(), StateError> {
        self.fd.set_kvm_immediate_exit(1);
        let result = self.fd.run().map(|_| ());
        self.fd.set_kvm_immediate_exit(0);
        match result {
            Err(e) if e.errno() != libc::EINTR && e.errno() != libc::EAGAIN => Err(
                StateError::Save(self.index, "KVM_RUN (completing the last exit)", e),
            ),
            _ => Ok(()),
        }
    }

    /// Reads the vCPU's state. Only on its own thread while parked (the other vCPUs parked
    /// too): KVM_GET_VCPU_EVENTS is unsafe while other vCPUs run.
    pub fn save_state(&mut self) -> Result<VcpuState, StateError> {
        self.complete_pending_exit()?;
        let i = self.index;
        let save = |what, e| StateError::Save(i, what, e);
        // GET_MP_STATE may change the LAPIC state (it accepts pending events): first.
        let mp_state = self
            .fd
            .get_mp_state()
            .map_err(|e| save("GET_MP_STATE", e))?;
        let regs = self.fd.get_regs().map_err(|e| save("GET_REGS", e))?;
        let sregs = self.fd.get_sregs().map_err(|e| save("GET_SREGS", e))?;
        let xsave = self.fd.get_xsave().map_err(|e| save("GET_XSAVE", e))?;
        let xcrs = self.fd.get_xcrs().map_err(|e| save("GET_XCRS", e))?;
        let debugregs = self
            .fd
            .get_debug_regs()
            .map_err(|e| save("GET_DEBUGREGS", e))?;
        let lapic = self.fd.get_lapic().map_err(|e| save("GET_LAPIC", e))?;
        let tsc_khz = self.fd.get_tsc_khz().ok();
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| save("GET_CPUID2", e))?
            .as_slice()
            .to_vec();
        let msrs = self.read_msrs()?;
        // Last: the GET ioctls above may change what it reports.
        let vcpu_events = self
            .fd
            .get_vcpu_events()
            .map_err(|e| save("GET_VCPU_EVENTS", e))?;
        Ok(VcpuState {
            index: i,
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            mp_state,
            vcpu_events,
            tsc_khz,
        })
    }

    /// The MSRs of KVM's save list that this vCPU has. KVM_GET_MSRS stops at the first MSR it
    /// cannot read (one whose CPU feature the guest lacks): that one is left out and the read
    /// goes on after it.
    fn read_msrs(&self) -> Result<Vec<kvm_msr_entry>, StateError> {
        let mut saved = Vec::with_capacity(self.msrs_to_save.len());
        let mut rest: &[u32] = &self.msrs_to_save;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> = rest
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs =
                Msrs::from_entries(&entries).map_err(|e| StateError::Fam(self.index, "MSR", e))?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(|e| StateError::Save(self.index, "GET_MSRS", e))?;
            saved.extend_from_slice(&msrs.as_slice()[..n.min(rest.len())]);
            if n < rest.len() {
                tracing::debug!(
                    vcpu = self.index,
                    msr = rest[n],
                    "MSR not readable: not saved"
                );
                rest = &rest[n + 1..];
            } else {
                rest = &[];
            }
        }
        Ok(saved)
    }

    /// Puts a saved state into this fresh vCPU (in place of `configure_cpu`/`configure_boot`).
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), StateError> {
        let i = self.index;
        let restore = |what, e| StateError::Restore(i, what, e);
        let cpuid =
            CpuId::from_entries(&state.cpuid).map_err(|e| StateError::Fam(i, "CPUID", e))?;
        // CPUID first: what the later SETs accept depends on it.
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| restore("SET_CPUID2", e))?;
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                self.fd.set_tsc_khz(khz).map_err(|e| {
                    restore("SET_TSC_KHZ (the host's TSC runs at another frequency)", e)
                })?;
            }
        }
        self.fd
            .set_mp_state(state.mp_state)
            .map_err(|e| restore("SET_MP_STATE", e))?;
        // SET_REGS clears pending exceptions: before SET_VCPU_EVENTS, which restores them.
        self.fd
            .set_regs(&state.regs)
            .map_err(|e| restore("SET_REGS", e))?;
        self.fd
            .set_sregs(&state.sregs)
            .map_err(|e| restore("SET_SREGS", e))?;
        // SAFETY: `kvm_xsave` is the fixed 4 KiB legacy layout KVM_GET_XSAVE returned on the
        // host that made the snapshot; KVM validates its contents against this vCPU's CPUID.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(|e| restore("SET_XSAVE", e))?;
        self.fd
            .set_xcrs(&state.xcrs)
            .map_err(|e| restore("SET_XCRS", e))?;
        self.fd
            .set_debug_regs(&state.debugregs)
            .map_err(|e| restore("SET_DEBUGREGS", e))?;
        // After SET_SREGS (which sets the APIC base) and before SET_MSRS (the TSC deadline
        // MSR only takes with the LAPIC configured).
        self.fd
            .set_lapic(&state.lapic)
            .map_err(|e| restore("SET_LAPIC", e))?;
        let msrs = Msrs::from_entries(&state.msrs).map_err(|e| StateError::Fam(i, "MSR", e))?;
        let n = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| restore("SET_MSRS", e))?;
        if let Some(refused) = state.msrs.get(n) {
            return Err(StateError::MsrRefused(i, refused.index));
        }
        self.fd
            .set_vcpu_events(&state.vcpu_events)
            .map_err(|e| restore("SET_VCPU_EVENTS", e))?;
        // Tells a kvmclock guest it was stopped, so its watchdogs do not fire on the gap.
        if let Err(e) = self.fd.kvmclock_ctrl() {
            tracing::debug!(vcpu = i, error = %e, "KVM_KVMCLOCK_CTRL not applied");
        }
        Ok(())
    }
}
