//! Guest physical memory layout. Fixed addresses keep boot deterministic and let tests
//! and the MP table agree on where things live.

/// GDT used while entering the kernel.
pub const BOOT_GDT_START: u64 = 0x500;
/// Empty IDT: the kernel installs its own before enabling interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH E820-style memory map.
pub const PVH_MEMMAP_START: u64 = 0x7000;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x8000;
/// Stack for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit boot protocol (first 1 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux limits the x86 command line to 2048 bytes; newer kernels accept more through
/// boot_params, but we stay within what every kernel takes.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Extended BIOS data area: the MP table sits in its first KiB, where Linux scans for it.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of high memory; kernels load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: virtio-mmio windows, IOAPIC and LAPIC live here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio window; each device gets `MMIO_DEVICE_SIZE` bytes.
pub const MMIO_DEVICES_START: u64 = 0xd000_0000;
pub const MMIO_DEVICE_SIZE: u64 = 0x1000;
/// IOAPIC and local APIC default addresses.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map (Intel only), inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Legacy IRQs: 4 is COM1; virtio devices start at 5. The IOAPIC has 24 pins.
pub const SERIAL_IRQ: u32 = 4;
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;
// One IOAPIC pin per virtio device: the contract's device limit must be what the pins allow;
// a mismatch breaks the build.
const _: () = assert!(
    (IOAPIC_PINS - VIRTIO_IRQ_BASE) as usize == kata_like_vmm_contract::limits::MAX_VIRTIO_DEVICES
);
/// The guest writes its exit status to this port.
pub const EXIT_PORT: u16 = 0xf4;
pub const COM1_BASE: u16 = 0x3f8;
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// Guest RAM regions for `mem_size` bytes, leaving the 32-bit MMIO gap unbacked.
pub fn arch_memory_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(arch_memory_regions(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let regions = arch_memory_regions(4 << 30);
        assert_eq!(regions, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]);
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }
}
