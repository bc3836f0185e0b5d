//! Intel MultiProcessor Specification 1.4 table. Our kernel has no ACPI, so the MP table is how
//! it learns about the vCPUs, the IOAPIC and the ISA IRQ routing.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IOAPIC_PINS};
use crate::vstate::memory::GuestMemoryMmap;

const MPF_SIZE: usize = 16;
const MPC_HEADER_SIZE: usize = 44;
const MPC_CPU_SIZE: usize = 20;
const MPC_ENTRY_SIZE: usize = 8;

const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_TYPE_INT: u8 = 0;
const MP_IRQ_TYPE_NMI: u8 = 1;
const MP_IRQ_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

/// Most vCPUs an MP table can describe here (APIC ids are 8 bits and the IOAPIC takes one).
pub const MAX_CPUS: u8 = 254;
// The contract (what the shim may ask for) and this table must agree; a mismatch breaks the build.
const _: () = assert!(MAX_CPUS == kata_like_vmm_contract::limits::MAX_VCPUS);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} vCPUs do not fit in an MP table (max {MAX_CPUS})")]
    TooManyCpus(u8),
    #[error("writing the MP table: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b)))
}

/// Builds the floating pointer structure followed by the configuration table, as bytes,
/// for placement at `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, Error> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(Error::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..IOAPIC_PINS as u8 {
        // type, irq type, flags (u16: conforming polarity/trigger), bus, bus irq, apic, pin
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_TYPE_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;
    debug_assert_eq!(
        entries.len(),
        usize::from(num_cpus) * MPC_CPU_SIZE
            + (count as usize - usize::from(num_cpus)) * MPC_ENTRY_SIZE
    );

    let table_base = base + MPF_SIZE as u64;
    let table_len = (MPC_HEADER_SIZE + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(table_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&table_len.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, patched below
    table.extend_from_slice(b"KATALIKE");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(MPF_SIZE + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_base as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // spec revision
    out.push(0); // checksum, patched below
    out.extend_from_slice(&[0u8; 5]); // feature bytes: 0 = a configuration table is present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs at the start of the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), Error> {
    let bytes = build(EBDA_START, num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_add_up_to_zero() {
        let bytes = build(EBDA_START, 3).unwrap();
        assert_eq!(&bytes[0..4], b"_MP_");
        assert_eq!(sum(&bytes[..MPF_SIZE]), 0);
        let table = &bytes[MPF_SIZE..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn table_lists_every_cpu_and_the_ioapic() {
        let bytes = build(EBDA_START, 4).unwrap();
        let table = &bytes[MPF_SIZE..];
        let ptr = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        assert_eq!(u64::from(ptr), EBDA_START + MPF_SIZE as u64);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        let mut off = MPC_HEADER_SIZE;
        let mut cpus = Vec::new();
        let mut ioapic = None;
        while off < table.len() {
            match table[off] {
                MP_PROCESSOR => {
                    cpus.push((table[off + 1], table[off + 3]));
                    off += MPC_CPU_SIZE;
                }
                MP_IOAPIC => {
                    ioapic = Some(table[off + 1]);
                    off += MPC_ENTRY_SIZE;
                }
                _ => off += MPC_ENTRY_SIZE,
            }
        }
        assert_eq!(off, table.len());
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
        assert_eq!(ioapic, Some(5));
    }

    #[test]
    fn rejects_zero_and_too_many_cpus() {
        assert!(build(EBDA_START, 0).is_err());
        assert!(build(EBDA_START, 255).is_err());
    }
}
