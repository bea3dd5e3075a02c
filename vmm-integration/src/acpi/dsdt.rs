// SPDX-License-Identifier: Apache-2.0
//! The DSDT: the PCI host bridge, COM1 and the S5 sleep state. Deliberately free of AML
//! methods with loops: on PVM the guest's AML interpreter runs emulated.

use acpi_tables::Aml;
use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, IO, Interrupt, Name, Package,
    Path, ResourceTemplate, Scope,
};
use acpi_tables::sdt::Sdt;

use crate::layout;

const OEM_ID: [u8; 6] = *b"ISMVMM";
const OEM_TABLE_ID: [u8; 8] = *b"ISMVMM01";

/// The PCI host bridge on segment 0, bus 0.
fn pci_host_bridge(mmio64_start: u64, sink: &mut Vec<u8>) {
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let bus = AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = IO::new(
        layout::PCI_CONFIG_ADDRESS_PORT,
        layout::PCI_CONFIG_ADDRESS_PORT,
        1,
        layout::PCI_CONFIG_PORT_SIZE as u8,
    );
    // Port I/O either side of the config ports is routed to the root bus.
    let io_low = AddressSpace::new_io(0u16, layout::PCI_CONFIG_ADDRESS_PORT - 1, None);
    let io_high = AddressSpace::new_io(
        layout::PCI_CONFIG_ADDRESS_PORT + layout::PCI_CONFIG_PORT_SIZE,
        0xffffu16,
        None,
    );
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        layout::MMIO32_START as u32,
        (layout::MMIO32_START + layout::MMIO32_SIZE - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio64_start,
        mmio64_start + layout::MMIO64_SIZE - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cfg_io, &io_low, &io_high, &mmio32, &mmio64]);
    let names = [
        Name::new("_HID".into(), &hid),
        Name::new("_CID".into(), &cid),
        Name::new("_ADR".into(), &aml::ZERO),
        Name::new("_SEG".into(), &aml::ZERO),
        Name::new("_UID".into(), &aml::ZERO),
        Name::new("_BBN".into(), &aml::ZERO),
        Name::new("_CRS".into(), &crs),
    ];
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    Device::new("PCI0".into(), children).to_aml_bytes(sink);
}

/// COM1: the 16550 at COM1_PORT, IRQ COM1_IRQ.
fn com1(sink: &mut Vec<u8>) {
    let hid = EISAName::new("PNP0501");
    let irq = Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let io = IO::new(layout::COM1_PORT, layout::COM1_PORT, 0, 8);
    let crs = ResourceTemplate::new(vec![&io, &irq]);
    Device::new(
        "COM1".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
}

pub fn build_dsdt(mmio64_start: u64) -> Vec<u8> {
    let mut sb = Vec::new();
    pci_host_bridge(mmio64_start, &mut sb);
    com1(&mut sb);
    let sb_devices = RawAml(sb);

    let slp_typ = layout::ACPI_S5_SLP_TYP;
    let s5 = Package::new(vec![&slp_typ, &slp_typ, &aml::ZERO, &aml::ZERO]);

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    Scope::new(Path::new("\\_SB_"), vec![&sb_devices]).to_aml_bytes(&mut dsdt);
    Name::new("_S5_".into(), &s5).to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    dsdt.as_slice().to_vec()
}

/// Already-serialised AML, to nest pieces built by separate functions.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn test_dsdt_checksum_length_and_objects() {
        let d = build_dsdt(layout::MMIO64_MIN_START);
        assert_eq!(&d[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(d[4..8].try_into().unwrap()) as usize,
            d.len()
        );
        assert_eq!(d.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        for name in [&b"_SB_"[..], b"PCI0", b"COM1", b"_S5_", b"_CRS", b"_SEG"] {
            assert!(contains(&d, name), "{}", String::from_utf8_lossy(name));
        }
        // PNP0A08 as an EISA id (0x080ad041 little-endian after the DWord prefix).
        assert!(contains(&d, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        // The 64-bit window's start appears in the QWordMemory descriptor.
        assert!(contains(&d, &layout::MMIO64_MIN_START.to_le_bytes()));
        // The _S5_ package: Name(_S5_, Package(4) { 5, 5, 0, 0 }).
        assert!(contains(&d, &[b'_', b'S', b'5', b'_', 0x12]));
    }
}
