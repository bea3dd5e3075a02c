// SPDX-License-Identifier: Apache-2.0
//! Guest-physical and port layout of an x86_64 VM. Everything that places something in the
//! guest's address space takes its numbers from here.

/// Guest RAM below 4 GiB ends here at most; the rest of RAM starts at [`HIGH_RAM_START`].
pub const LOW_RAM_END: u64 = 0xC000_0000;
/// 32-bit PCI MMIO window (non-prefetchable BARs).
pub const MMIO32_START: u64 = 0xC000_0000;
pub const MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express ECAM (MCFG) for segment 0, bus 0 only: 1 MiB.
pub const PCI_ECAM_START: u64 = 0xE000_0000;
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// IOAPIC and local APIC, where the MADT says they are.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
pub const APIC_START: u64 = 0xFEE0_0000;
/// RAM above the 32-bit hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// The 64-bit PCI window (64-bit BARs, the virtio-ism shared-memory window among them)
/// starts at this address or after the end of RAM, whichever is higher, aligned to 1 GiB.
pub const MMIO64_MIN_START: u64 = 0x10_0000_0000;
pub const MMIO64_SIZE: u64 = 0x10_0000_0000;

/// Where boot structures go in low RAM.
pub const PVH_START_INFO: u64 = 0x6000;
/// The PVH module list (the initramfs entry), after the 56-byte start info.
pub const PVH_MODLIST_START: u64 = 0x6100;
pub const MEMMAP_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// ACPI tables (RSDP first) live in the EBDA-style area below 1 MiB.
pub const RSDP_START: u64 = 0xe_0000;
pub const ACPI_TABLES_END: u64 = 0x10_0000;
/// Kernels are loaded at or above 1 MiB.
pub const KERNEL_START: u64 = 0x10_0000;

/// I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// ACPI hardware-reduced sleep control, sleep status and reset register (one byte).
/// Write `(5 << 2) | (1 << 5)` (SLP_TYP=S5, SLP_EN) to power off, [`ACPI_RESET_VALUE`] to reboot.
pub const ACPI_SLEEP_PORT: u16 = 0x3c0;
pub const ACPI_RESET_VALUE: u8 = 0x1;
pub const ACPI_S5_SLP_TYP: u8 = 5;
/// PCI configuration mechanism #1.
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_PORT_SIZE: u16 = 8;
/// CMOS RTC index and data ports.
pub const CMOS_PORT: u16 = 0x70;
/// i8042 command port: 0xfe is the legacy reset a Linux guest falls back to.
pub const I8042_PORT: u16 = 0x64;

/// First GSI handed out for MSI routes; 0..24 are the IOAPIC pins.
pub const MSI_GSI_START: u32 = 24;

/// Start of the 64-bit PCI window for a VM whose RAM ends at `ram_end` (exclusive).
pub fn mmio64_start(ram_end: u64) -> u64 {
    const GIB: u64 = 1 << 30;
    let after_ram = ram_end.div_ceil(GIB) * GIB;
    after_ram.max(MMIO64_MIN_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_mmio64_window_never_overlaps_ram() {
        assert_eq!(mmio64_start(HIGH_RAM_START + (1 << 30)), MMIO64_MIN_START);
        let big = MMIO64_MIN_START + 5;
        assert!(mmio64_start(big) >= big);
        assert_eq!(mmio64_start(big) % (1 << 30), 0);
    }

    #[test]
    fn test_fixed_windows_do_not_overlap() {
        const {
            assert!(MMIO32_START + MMIO32_SIZE <= PCI_ECAM_START);
            assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
            assert!(LOW_RAM_END <= MMIO32_START);
        }
    }
}
