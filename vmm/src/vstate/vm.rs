//! The KVM VM: memory slots, in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.

use std::sync::Arc;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::layout::KVM_TSS_ADDRESS;
use crate::vstate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0:?}")]
    Capability(kvm_ioctls::Cap),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR: {0}")]
    SetTss(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP: {0}")]
    CreateIrqchip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2: {0}")]
    CreatePit(kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION: {0}")]
    SetMemory(kvm_ioctls::Error),
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("KVM_GET_MSR_INDEX_LIST: {0}")]
    MsrIndexList(kvm_ioctls::Error),
    #[error("saving the VM: {0} failed: {1}")]
    Save(&'static str, kvm_ioctls::Error),
    #[error("restoring the VM: {0} failed: {1}")]
    Restore(&'static str, kvm_ioctls::Error),
}

/// The VM-wide KVM state a snapshot keeps: the in-kernel interrupt controllers, the PIT and
/// the kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// Opens /dev/kvm and checks what the VMM relies on.
pub fn open_kvm() -> Result<Kvm, Error> {
    let kvm = Kvm::new().map_err(Error::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(Error::ApiVersion(version));
    }
    for cap in [
        kvm_ioctls::Cap::Irqchip,
        kvm_ioctls::Cap::Ioeventfd,
        kvm_ioctls::Cap::Irqfd,
        kvm_ioctls::Cap::UserMemory,
        kvm_ioctls::Cap::TscDeadlineTimer,
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::Capability(cap));
        }
    }
    Ok(kvm)
}

pub struct Vm {
    fd: VmFd,
    supported_cpuid: CpuId,
    msrs_to_save: Arc<[u32]>,
}

/// The MSRs KVM says a VMM must save and restore (KVM_GET_MSR_INDEX_LIST), in KVM's order
/// (MSR_IA32_TSC before the TSC deadline, which is relative to it).
fn msrs_to_save(kvm: &Kvm) -> Result<Arc<[u32]>, Error> {
    let list = kvm.get_msr_index_list().map_err(Error::MsrIndexList)?;
    Ok(list.as_slice().into())
}

impl Vm {
    /// Creates a VM with the in-kernel irqchip and PIT.
    pub fn new(kvm: &Kvm) -> Result<Self, Error> {
        let vm = Self::new_without_pit(kvm)?;
        vm.create_pit()?;
        Ok(vm)
    }

    /// A VM with the in-kernel irqchip; `create_pit` must follow before vCPUs run. Split so
    /// that the PIT (which starts a kernel thread) can be created while the kernel loads.
    pub fn new_without_pit(kvm: &Kvm) -> Result<Self, Error> {
        let fd = kvm.create_vm().map_err(Error::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(Error::SetTss)?;
        fd.create_irq_chip().map_err(Error::CreateIrqchip)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)?;
        Ok(Vm {
            fd,
            supported_cpuid,
            msrs_to_save: msrs_to_save(kvm)?,
        })
    }

    /// The in-kernel PIT (speaker port emulated as a dummy).
    pub fn create_pit(&self) -> Result<(), Error> {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(Error::CreatePit)
    }

    /// A VM without irqchip or PIT, for the probe and hand-made test guests.
    pub fn new_bare(kvm: &Kvm) -> Result<Self, Error> {
        let fd = kvm.create_vm().map_err(Error::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(Error::SetTss)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::SupportedCpuid)?;
        Ok(Vm {
            fd,
            supported_cpuid,
            msrs_to_save: msrs_to_save(kvm)?,
        })
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    pub fn msrs_to_save(&self) -> &Arc<[u32]> {
        &self.msrs_to_save
    }

    /// Reads the irqchip, PIT and clock (VMM thread, vCPUs parked).
    pub fn save_state(&self) -> Result<VmState, Error> {
        let chip = |chip_id| -> Result<kvm_irqchip, Error> {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut c)
                .map_err(|e| Error::Save("GET_IRQCHIP", e))?;
            Ok(c)
        };
        Ok(VmState {
            pit: self.fd.get_pit2().map_err(|e| Error::Save("GET_PIT2", e))?,
            clock: self
                .fd
                .get_clock()
                .map_err(|e| Error::Save("GET_CLOCK", e))?,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Puts a saved state into this fresh VM (irqchip and PIT created), after its vCPUs got
    /// theirs, as Firecracker orders it.
    pub fn restore_state(&self, state: &VmState) -> Result<(), Error> {
        self.fd
            .set_pit2(&state.pit)
            .map_err(|e| Error::Restore("SET_PIT2", e))?;
        // The guest clock carries on from where it was saved (flags 0: no jump by the time
        // the snapshot sat on disk), as Firecracker does by default.
        let clock = kvm_clock_data {
            flags: 0,
            ..state.clock
        };
        self.fd
            .set_clock(&clock)
            .map_err(|e| Error::Restore("SET_CLOCK", e))?;
        for (what, chip) in [
            ("SET_IRQCHIP (PIC master)", &state.pic_master),
            ("SET_IRQCHIP (PIC slave)", &state.pic_slave),
            ("SET_IRQCHIP (IOAPIC)", &state.ioapic),
        ] {
            self.fd
                .set_irqchip(chip)
                .map_err(|e| Error::Restore(what, e))?;
        }
        Ok(())
    }

    /// Registers every guest memory region as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), Error> {
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| Error::SetMemory(kvm_ioctls::Error::new(libc::EFAULT)))?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region stays mapped for the VM's lifetime: `GuestMemoryMmap` is
            // kept alive by the VMM until after the VM fd is closed.
            unsafe { self.fd.set_user_memory_region(mem_region) }.map_err(Error::SetMemory)?;
        }
        Ok(())
    }
}
