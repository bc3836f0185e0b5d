//! CPUID normalisation: the guest sees the same CPU model on any host that supports the
//! features KVM reports, with a topology that matches the vCPU count and no features the
//! VMM does not emulate (monitor/mwait, nested virtualisation, PMU, thermal control).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Brand string the guest sees in leaves 0x8000_0002..=0x8000_0004 (48 bytes, NUL padded).
pub const BRAND_STRING: &[u8; 48] =
    b"kata-like virtual CPU\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

mod bits {
    // Leaf 1 ECX.
    pub const DTES64: u32 = 1 << 2;
    pub const MONITOR: u32 = 1 << 3;
    pub const DS_CPL: u32 = 1 << 4;
    pub const VMX: u32 = 1 << 5;
    pub const SMX: u32 = 1 << 6;
    pub const EST: u32 = 1 << 7;
    pub const TM2: u32 = 1 << 8;
    pub const PDCM: u32 = 1 << 15;
    pub const TSC_DEADLINE: u32 = 1 << 24;
    pub const HYPERVISOR: u32 = 1 << 31;
    // Leaf 1 EDX.
    pub const DS: u32 = 1 << 21;
    pub const ACPI: u32 = 1 << 22;
    pub const HTT: u32 = 1 << 28;
    pub const TM: u32 = 1 << 29;
    pub const PBE: u32 = 1 << 31;
    // Leaf 6 EAX.
    pub const ARAT: u32 = 1 << 2;
    // Leaf 0x8000_0001 ECX.
    pub const SVM: u32 = 1 << 2;
    pub const TOPOEXT: u32 = 1 << 22;
    pub const PERFCTR_CORE: u32 = 1 << 23;
}

/// Number of bits needed to hold an APIC id below `count`.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Patches one entry for vCPU `cpu_index` of `cpu_count`.
fn normalize_entry(entry: &mut kvm_cpuid_entry2, cpu_index: u8, cpu_count: u8) {
    let apic_id = u32::from(cpu_index);
    let count = u32::from(cpu_count);
    match entry.function {
        0x1 => {
            // EBX: [31:24] initial APIC id, [23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16);
            entry.ecx &= !(bits::DTES64
                | bits::MONITOR
                | bits::DS_CPL
                | bits::VMX
                | bits::SMX
                | bits::EST
                | bits::TM2
                | bits::PDCM);
            // KVM always emulates the TSC-deadline timer but leaves advertising it to us;
            // with it, Linux skips the LAPIC timer calibration (~100 ms of guest time).
            entry.ecx |= bits::HYPERVISOR | bits::TSC_DEADLINE;
            entry.edx &= !(bits::DS | bits::ACPI | bits::TM | bits::PBE);
            if count > 1 {
                entry.edx |= bits::HTT;
            } else {
                entry.edx &= !bits::HTT;
            }
        }
        0x4 => {
            // Deterministic cache parameters: all vCPUs are cores of one package, each
            // with private L1/L2 and a shared last level.
            let cache_level = (entry.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 { count - 1 } else { 0 };
            entry.eax = (entry.eax & 0x3fff) | ((count - 1) << 26) | (sharing << 14);
        }
        0x6 => {
            entry.eax = bits::ARAT;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        0xa => {
            // No virtual PMU.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        0xb | 0x1f => {
            // Extended topology: level 0 is SMT (one thread per core), level 1 the cores.
            entry.edx = apic_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                1 => {
                    entry.eax = id_bits(count);
                    entry.ebx = count;
                    entry.ecx = (2 << 8) | 1;
                }
                n => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = n;
                }
            }
        }
        0x8000_0001 => {
            entry.ecx &= !(bits::SVM | bits::TOPOEXT | bits::PERFCTR_CORE);
        }
        0x8000_0002..=0x8000_0004 => {
            let offset = ((entry.function - 0x8000_0002) * 16) as usize;
            let word = |i: usize| {
                let b = &BRAND_STRING[offset + 4 * i..offset + 4 * i + 4];
                u32::from_le_bytes([b[0], b[1], b[2], b[3]])
            };
            entry.eax = word(0);
            entry.ebx = word(1);
            entry.ecx = word(2);
            entry.edx = word(3);
        }
        0x8000_0008 => {
            // AMD core count: ECX[7:0] = cores - 1, ECX[15:12] = APIC id size.
            entry.ecx = (count - 1) | (id_bits(count) << 12);
        }
        _ => {}
    }
}

/// Returns the CPUID `supported` normalised for vCPU `cpu_index` of `cpu_count`. Leaves that
/// describe host-only facilities (AMD extended topology 0x8000_001e, SVM 0x8000_000a) are removed.
pub fn normalize(
    supported: &CpuId,
    cpu_index: u8,
    cpu_count: u8,
) -> Result<CpuId, vmm_sys_util::fam::Error> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .filter(|e| !matches!(e.function, 0x8000_000a | 0x8000_001e))
        .copied()
        .collect();
    for entry in entries.iter_mut() {
        normalize_entry(entry, cpu_index, cpu_count.max(1));
    }
    CpuId::from_entries(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn leaf1_reports_apic_id_count_and_hypervisor() {
        let host = CpuId::from_entries(&[leaf(1, 0)]).unwrap();
        let c = normalize(&host, 2, 4).unwrap();
        let e = find(&c, 1, 0);
        assert_eq!(e.ebx >> 24, 2);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & bits::HYPERVISOR, 0);
        assert_ne!(e.ecx & bits::TSC_DEADLINE, 0);
        assert_eq!(e.ecx & (bits::MONITOR | bits::VMX), 0);
        assert_eq!(e.edx & bits::ACPI, 0);
        assert_ne!(e.edx & bits::HTT, 0);
    }

    #[test]
    fn topology_leaf_describes_the_vcpu_count() {
        let host = CpuId::from_entries(&[leaf(0xb, 0), leaf(0xb, 1)]).unwrap();
        let c = normalize(&host, 3, 5).unwrap();
        let l1 = find(&c, 0xb, 1);
        assert_eq!(l1.ebx, 5);
        assert_eq!(l1.eax, 3);
        assert_eq!(l1.edx, 3);
        assert_eq!(find(&c, 0xb, 0).ebx, 1);
    }

    #[test]
    fn brand_string_and_host_only_leaves() {
        let host = CpuId::from_entries(&[
            leaf(0x8000_0002, 0),
            leaf(0x8000_001e, 0),
            leaf(0x8000_0001, 0),
        ])
        .unwrap();
        let c = normalize(&host, 0, 1).unwrap();
        assert_eq!(&find(&c, 0x8000_0002, 0).eax.to_le_bytes(), b"kata");
        assert!(c.as_slice().iter().all(|e| e.function != 0x8000_001e));
        assert_eq!(find(&c, 0x8000_0001, 0).ecx & bits::SVM, 0);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
