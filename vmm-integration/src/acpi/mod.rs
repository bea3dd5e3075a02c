// SPDX-License-Identifier: Apache-2.0
//! ACPI tables for a hardware-reduced x86_64 VM: RSDP -> XSDT -> {FADT -> DSDT, MADT, MCFG},
//! placed in guest memory from RSDP_START up.

mod dsdt;

use acpi_tables::Aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

const OEM_ID: [u8; 6] = *b"ISMVMM";
const OEM_TABLE_ID: [u8; 8] = *b"ISMVMM01";
const OEM_REVISION: u32 = 1;

/// FADT IA-PC boot architecture flags: no VGA (the CMOS RTC is emulated, legacy/cmos.rs).
const IAPC_BOOT_ARCH_NO_VGA: u16 = 1 << 2;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables need {0} bytes, more than the space below 1 MiB")]
    TooLarge(u64),
    #[error("Failed to write ACPI table {0} to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// What the tables describe.
#[derive(Clone, Copy, Debug)]
pub struct AcpiInputs {
    pub vcpus: u8,
    /// Start of the 64-bit PCI window.
    pub mmio64_start: u64,
}

/// The serialised tables, each with the guest address it goes to.
pub struct AcpiTables {
    pub tables: Vec<(&'static str, u64, Vec<u8>)>,
    pub rsdp_addr: u64,
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

fn io_port_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

pub fn build_fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    fadt.reset_reg = io_port_gas(layout::ACPI_SLEEP_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_port_gas(layout::ACPI_SLEEP_PORT);
    fadt.sleep_status_reg = io_port_gas(layout::ACPI_SLEEP_PORT);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_NO_VGA.into();
    to_bytes(&fadt.finalize())
}

pub fn build_madt(vcpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    // The IOAPIC's id follows the vCPUs' APIC ids; its pins are GSIs 0..24.
    madt.add_structure(IoApic::new(vcpus, layout::IOAPIC_START as u32, 0));
    let mut bytes = to_bytes(&madt);
    // The in-kernel irqchip includes the dual 8259 PIC: say so (PCAT_COMPAT), so guests keep
    // ISA IRQs 0-15 identity-mapped. acpi_tables has no setter for the MADT flags.
    bytes[MADT_FLAGS_OFFSET..MADT_FLAGS_OFFSET + 4]
        .copy_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

/// Offset of the MADT's flags, after the header and the local APIC address.
const MADT_FLAGS_OFFSET: usize = 40;
const MADT_PCAT_COMPAT: u32 = 1;
/// Offset of the checksum byte in every ACPI table header.
const CHECKSUM_OFFSET: usize = 9;

/// Recompute a table's checksum after its bytes were edited.
fn fix_checksum(table: &mut [u8]) {
    table[CHECKSUM_OFFSET] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[CHECKSUM_OFFSET] = 0u8.wrapping_sub(sum);
}

pub fn build_mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let last_bus = ((layout::PCI_ECAM_SIZE >> 20) - 1) as u8;
    mcfg.add_ecam(layout::PCI_ECAM_START, 0, 0, last_bus);
    to_bytes(&mcfg)
}

/// Lay the tables out from RSDP_START, 8-byte aligned, and return them with their addresses.
pub fn build_tables(inputs: &AcpiInputs) -> Result<AcpiTables, AcpiError> {
    let align = |a: u64| a.div_ceil(8) * 8;
    let rsdp_addr = layout::RSDP_START;
    let mut next = align(rsdp_addr + Rsdp::len() as u64);

    let dsdt = dsdt::build_dsdt(inputs.mmio64_start);
    let dsdt_addr = next;
    next = align(next + dsdt.len() as u64);

    let fadt = build_fadt(dsdt_addr);
    let fadt_addr = next;
    next = align(next + fadt.len() as u64);

    let madt = build_madt(inputs.vcpus);
    let madt_addr = next;
    next = align(next + madt.len() as u64);

    let mcfg = build_mcfg();
    let mcfg_addr = next;
    next = align(next + mcfg.len() as u64);

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt = to_bytes(&xsdt);
    let xsdt_addr = next;
    next += xsdt.len() as u64;
    if next > layout::ACPI_TABLES_END {
        return Err(AcpiError::TooLarge(next - layout::RSDP_START));
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    Ok(AcpiTables {
        tables: vec![
            ("RSDP", rsdp_addr, rsdp),
            ("DSDT", dsdt_addr, dsdt),
            ("FACP", fadt_addr, fadt),
            ("APIC", madt_addr, madt),
            ("MCFG", mcfg_addr, mcfg),
            ("XSDT", xsdt_addr, xsdt),
        ],
        rsdp_addr,
    })
}

/// Build the tables and write them to guest memory; returns the RSDP address.
pub fn create_acpi_tables(mem: &GuestMemoryMmap, inputs: &AcpiInputs) -> Result<u64, AcpiError> {
    let tables = build_tables(inputs)?;
    for (name, addr, bytes) in &tables.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| AcpiError::Write(name, e))?;
    }
    Ok(tables.rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn table<'a>(t: &'a AcpiTables, name: &str) -> &'a (&'static str, u64, Vec<u8>) {
        t.tables.iter().find(|(n, _, _)| *n == name).unwrap()
    }

    fn inputs(vcpus: u8) -> AcpiInputs {
        AcpiInputs {
            vcpus,
            mmio64_start: layout::mmio64_start(1 << 30),
        }
    }

    #[test]
    fn test_every_table_checksums_to_zero_and_has_its_length() {
        let t = build_tables(&inputs(4)).unwrap();
        for (name, _, bytes) in &t.tables {
            if *name == "RSDP" {
                assert_eq!(sum(&bytes[..20]), 0, "RSDP v1 checksum");
                assert_eq!(sum(bytes), 0, "RSDP extended checksum");
                continue;
            }
            assert_eq!(&bytes[..4], name.as_bytes());
            assert_eq!(sum(bytes), 0, "{name} checksum");
            let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, bytes.len(), "{name} length");
        }
    }

    #[test]
    fn test_madt_has_one_lapic_per_vcpu_and_the_ioapic() {
        for vcpus in [1u8, 2, 7] {
            let madt = build_madt(vcpus);
            // Walk the interrupt controller structures after the 44-byte header.
            let mut at = 44;
            let (mut lapics, mut ioapics) = (0, 0);
            while at < madt.len() {
                match madt[at] {
                    0 => {
                        assert_eq!(madt[at + 3], lapics, "APIC id follows vCPU index");
                        lapics += 1;
                    }
                    1 => ioapics += 1,
                    t => panic!("unexpected MADT structure {t}"),
                }
                at += usize::from(madt[at + 1]);
            }
            assert_eq!(lapics, vcpus);
            assert_eq!(ioapics, 1);
            assert_eq!(madt[MADT_FLAGS_OFFSET] & 1, 1, "PCAT_COMPAT");
            assert_eq!(sum(&madt), 0);
        }
    }

    #[test]
    fn test_rsdp_points_at_xsdt_which_lists_fadt_madt_mcfg() {
        let t = build_tables(&inputs(1)).unwrap();
        let rsdp = &table(&t, "RSDP").2;
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let xsdt = table(&t, "XSDT");
        assert_eq!(xsdt.1, xsdt_addr);
        let entries: Vec<u64> = xsdt.2[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let want: Vec<u64> = ["FACP", "APIC", "MCFG"]
            .iter()
            .map(|n| table(&t, n).1)
            .collect();
        assert_eq!(entries, want);
        // FADT's X_DSDT (offset 140) points at the DSDT; HW_REDUCED and the reset register.
        let fadt = &table(&t, "FACP").2;
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(x_dsdt, table(&t, "DSDT").1);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        assert_eq!(fadt[116], 1, "reset register is in system I/O space");
        let reset_port = u64::from_le_bytes(fadt[120..128].try_into().unwrap());
        assert_eq!(reset_port, u64::from(layout::ACPI_SLEEP_PORT));
        assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
        // SLEEP_CONTROL_REG at offset 244.
        let sleep_port = u64::from_le_bytes(fadt[248..256].try_into().unwrap());
        assert_eq!(sleep_port, u64::from(layout::ACPI_SLEEP_PORT));
    }

    #[test]
    fn test_mcfg_describes_the_ecam_window() {
        let mcfg = build_mcfg();
        // One allocation entry after the 44-byte header: base, segment, start bus, end bus.
        assert_eq!(mcfg.len(), 44 + 16);
        let base = u64::from_le_bytes(mcfg[44..52].try_into().unwrap());
        assert_eq!(base, layout::PCI_ECAM_START);
        assert_eq!((mcfg[54], mcfg[55]), (0, 0));
    }

    #[test]
    fn test_tables_fit_below_1mib_even_with_many_vcpus() {
        let t = build_tables(&inputs(254)).unwrap();
        for (_, addr, bytes) in &t.tables {
            assert!(*addr + bytes.len() as u64 <= layout::ACPI_TABLES_END);
        }
    }
}
