// SPDX-License-Identifier: Apache-2.0
//! PCI configuration space: access mechanisms, enumeration, capabilities, BARs and MSI-X.

mod bar;
mod caps;
mod msix;

pub use bar::{Bar, BarError, BarKind, read_bars};
pub use caps::{CapabilityIter, PciCapability};
pub use msix::{MSIX_CAP_ID, MsixCapability, MsixError, MsixTable, x86_msi_address};

use crate::platform::{Platform, Width};

/// Standard config-space offsets and bits (PCI Local Bus 3.0, ch. 6).
pub mod regs {
    /// Vendor ID (u16).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (u16).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command (u16).
    pub const COMMAND: u16 = 0x04;
    /// Status (u16).
    pub const STATUS: u16 = 0x06;
    /// Revision ID (u8); class code follows in the upper three bytes of the dword.
    pub const CLASS_REVISION: u16 = 0x08;
    /// Header type (u8); bit 7 = multi-function.
    pub const HEADER_TYPE: u16 = 0x0e;
    /// First base address register.
    pub const BAR0: u16 = 0x10;
    /// Subsystem ID (u16).
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Capabilities pointer (u8).
    pub const CAP_PTR: u16 = 0x34;
    /// Command: I/O space decode.
    pub const COMMAND_IO: u16 = 1 << 0;
    /// Command: memory space decode.
    pub const COMMAND_MEMORY: u16 = 1 << 1;
    /// Command: bus master (DMA and MSI).
    pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
    /// Command: INTx disable.
    pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
    /// Status: a capability list exists.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
}

/// A PCI function's address on segment 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl core::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Access to configuration space. Offsets are naturally aligned for their width; readers of
/// absent functions see all ones.
pub trait ConfigAccess {
    /// Read a 32-bit dword.
    fn read_u32(&self, addr: PciAddress, offset: u16) -> u32;
    /// Write a 32-bit dword.
    fn write_u32(&self, addr: PciAddress, offset: u16, value: u32);
    /// Write a 16-bit word (used for the command register, so the status register's
    /// write-one-to-clear bits next to it are left alone).
    fn write_u16(&self, addr: PciAddress, offset: u16, value: u16);

    /// Read a 16-bit word.
    fn read_u16(&self, addr: PciAddress, offset: u16) -> u16 {
        (self.read_u32(addr, offset & !3) >> ((offset & 2) * 8)) as u16
    }

    /// Read a byte.
    fn read_u8(&self, addr: PciAddress, offset: u16) -> u8 {
        (self.read_u32(addr, offset & !3) >> ((offset & 3) * 8)) as u8
    }
}

/// Configuration mechanism #1: ports 0xcf8 (address) and 0xcfc (data). Reaches the first 256
/// bytes of each function.
pub struct PortConfig<'p, P: Platform> {
    platform: &'p P,
}

impl<'p, P: Platform> PortConfig<'p, P> {
    /// Address port.
    pub const ADDRESS_PORT: u16 = 0xcf8;
    /// Data port.
    pub const DATA_PORT: u16 = 0xcfc;

    /// Use the platform's I/O ports.
    pub fn new(platform: &'p P) -> Self {
        Self { platform }
    }

    fn select(&self, addr: PciAddress, offset: u16) {
        let value = (1u32 << 31)
            | (u32::from(addr.bus) << 16)
            | (u32::from(addr.device & 0x1f) << 11)
            | (u32::from(addr.function & 7) << 8)
            | u32::from(offset & 0xfc);
        self.platform.port_write_u32(Self::ADDRESS_PORT, value);
    }
}

impl<P: Platform> ConfigAccess for PortConfig<'_, P> {
    fn read_u32(&self, addr: PciAddress, offset: u16) -> u32 {
        if offset >= 0x100 {
            return u32::MAX;
        }
        self.select(addr, offset);
        self.platform.port_read_u32(Self::DATA_PORT)
    }

    fn write_u32(&self, addr: PciAddress, offset: u16, value: u32) {
        if offset >= 0x100 {
            return;
        }
        self.select(addr, offset);
        self.platform.port_write_u32(Self::DATA_PORT, value);
    }

    fn write_u16(&self, addr: PciAddress, offset: u16, value: u16) {
        if offset >= 0x100 {
            return;
        }
        self.select(addr, offset);
        self.platform
            .port_write_u16(Self::DATA_PORT + (offset & 2), value);
    }
}

/// Enhanced configuration access (ECAM, from the ACPI MCFG table): 4 KiB per function in an
/// MMIO window.
pub struct EcamConfig<'p, P: Platform> {
    platform: &'p P,
    base: u64,
    start_bus: u8,
    end_bus: u8,
}

impl<'p, P: Platform> EcamConfig<'p, P> {
    /// An ECAM window at `base` decoding buses `start_bus..=end_bus`.
    ///
    /// # Safety
    /// `base` must be the ECAM window the platform firmware (MCFG) describes for those buses.
    pub unsafe fn new(platform: &'p P, base: u64, start_bus: u8, end_bus: u8) -> Self {
        Self {
            platform,
            base,
            start_bus,
            end_bus,
        }
    }

    fn address(&self, addr: PciAddress, offset: u16, width: Width) -> Option<u64> {
        if addr.bus < self.start_bus
            || addr.bus > self.end_bus
            || addr.device >= 32
            || addr.function >= 8
            || u64::from(offset) + width.bytes() > 4096
        {
            return None;
        }
        let function_index = (u64::from(addr.bus - self.start_bus) << 8)
            | (u64::from(addr.device) << 3)
            | u64::from(addr.function);
        Some(self.base + (function_index << 12) + u64::from(offset))
    }
}

impl<P: Platform> ConfigAccess for EcamConfig<'_, P> {
    fn read_u32(&self, addr: PciAddress, offset: u16) -> u32 {
        match self.address(addr, offset & !3, Width::U32) {
            // SAFETY: the address is inside the ECAM window (checked by `address`), which the
            // constructor's caller vouched for.
            Some(a) => unsafe { self.platform.mmio_read(a, Width::U32) as u32 },
            None => u32::MAX,
        }
    }

    fn write_u32(&self, addr: PciAddress, offset: u16, value: u32) {
        if let Some(a) = self.address(addr, offset & !3, Width::U32) {
            // SAFETY: as in read_u32.
            unsafe { self.platform.mmio_write(a, Width::U32, value.into()) }
        }
    }

    fn write_u16(&self, addr: PciAddress, offset: u16, value: u16) {
        if let Some(a) = self.address(addr, offset & !1, Width::U16) {
            // SAFETY: as in read_u32.
            unsafe { self.platform.mmio_write(a, Width::U16, value.into()) }
        }
    }
}

/// One present PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Where it is.
    pub address: PciAddress,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code (base class << 16 | subclass << 8 | prog-if).
    pub class: u32,
    /// Header type without the multi-function bit.
    pub header_type: u8,
}

/// Iterator over the present functions of a range of buses, in address order.
pub struct Enumerator<'c, C: ConfigAccess> {
    config: &'c C,
    bus: u16,
    end_bus: u16,
    device: u8,
    function: u8,
}

/// Enumerate every present function on buses `start_bus..=end_bus` (no bridges are followed:
/// the VMM puts everything on the root bus).
pub fn enumerate<C: ConfigAccess>(config: &C, start_bus: u8, end_bus: u8) -> Enumerator<'_, C> {
    Enumerator {
        config,
        bus: start_bus.into(),
        end_bus: end_bus.into(),
        device: 0,
        function: 0,
    }
}

impl<C: ConfigAccess> Enumerator<'_, C> {
    fn advance(&mut self, multi_function: bool) {
        if self.function < 7 && multi_function {
            self.function += 1;
            return;
        }
        self.function = 0;
        if self.device < 31 {
            self.device += 1;
        } else {
            self.device = 0;
            self.bus += 1;
        }
    }
}

impl<C: ConfigAccess> Iterator for Enumerator<'_, C> {
    type Item = PciFunction;

    fn next(&mut self) -> Option<PciFunction> {
        while self.bus <= self.end_bus {
            let address = PciAddress {
                bus: self.bus as u8,
                device: self.device,
                function: self.function,
            };
            let id = self.config.read_u32(address, regs::VENDOR_ID);
            let vendor_id = id as u16;
            if vendor_id == 0xffff || vendor_id == 0 {
                // Function 0 absent: the whole device is absent. Other functions may have gaps.
                let multi = self.function != 0;
                self.advance(multi);
                continue;
            }
            let header = self.config.read_u8(address, regs::HEADER_TYPE);
            let multi = self.function != 0 || header & 0x80 != 0;
            let class = self.config.read_u32(address, regs::CLASS_REVISION) >> 8;
            self.advance(multi);
            return Some(PciFunction {
                address,
                vendor_id,
                device_id: (id >> 16) as u16,
                class,
                header_type: header & 0x7f,
            });
        }
        None
    }
}

/// Set bits in the command register (e.g. memory decode and bus mastering).
pub fn enable_command_bits<C: ConfigAccess>(config: &C, addr: PciAddress, bits: u16) {
    let command = config.read_u16(addr, regs::COMMAND);
    config.write_u16(addr, regs::COMMAND, command | bits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakeConfig, FakeFunction, FakePlatform};
    use std::vec;
    use std::vec::Vec;

    fn at(device: u8, function: u8) -> PciAddress {
        PciAddress {
            bus: 0,
            device,
            function,
        }
    }

    #[test]
    fn test_enumerate_finds_functions_and_respects_multifunction_bit() {
        let mut multi = FakeFunction::new(at(2, 0), 0x8086, 0x1);
        multi.set_u8(0x0e, 0x80);
        let mut single = FakeFunction::new(at(5, 0), 0x1af4, 0x1044);
        single.set_u32(0x08, 0x00ff_0001);
        let functions = vec![
            FakeFunction::new(at(0, 0), 0x8086, 0xd57),
            multi,
            FakeFunction::new(at(2, 3), 0x8086, 0x2),
            single,
            // Not reported: function 1 of a single-function device.
            FakeFunction::new(at(5, 1), 0x1234, 0x5),
        ];
        let config = FakeConfig::with(functions);
        let found: Vec<_> = enumerate(&config, 0, 0).collect();
        let addrs: Vec<_> = found.iter().map(|f| f.address).collect();
        assert_eq!(addrs, vec![at(0, 0), at(2, 0), at(2, 3), at(5, 0)]);
        assert_eq!(found[3].device_id, 0x1044);
        assert_eq!(found[3].class, 0x0000_ff00);
    }

    #[test]
    fn test_enumerate_is_bounded_on_empty_bus() {
        let config = FakeConfig::default();
        assert_eq!(enumerate(&config, 0, 0).count(), 0);
        // One vendor read per device slot.
        assert_eq!(config.reads.get(), 32);
    }

    #[test]
    fn test_port_config_selects_function_and_offset() {
        let platform = FakePlatform::new();
        let config = PortConfig::new(&platform);
        assert_eq!(config.read_u16(at(3, 0), regs::DEVICE_ID), 0x1044);
        assert_eq!(config.read_u32(at(4, 0), 0), u32::MAX);
        config.write_u16(at(3, 0), regs::COMMAND, 0x6);
        assert_eq!(config.read_u16(at(3, 0), regs::COMMAND), 0x6);
        assert_eq!(config.read_u32(at(3, 0), 0x100), u32::MAX);
    }

    #[test]
    fn test_capability_walk_stops_on_cycle() {
        let mut f = FakeFunction::new(at(1, 0), 1, 1);
        f.set_u16(0x06, 0x10);
        f.set_u8(0x34, 0x40);
        f.set_u16(0x40, 0x5009);
        f.set_u16(0x50, 0x4011);
        let config = FakeConfig::with(vec![f]);
        let caps: Vec<_> = CapabilityIter::new(&config, at(1, 0)).collect();
        assert_eq!(caps.len(), 2);
        assert_eq!((caps[0].offset, caps[0].id), (0x40, 0x09));
        assert_eq!((caps[1].offset, caps[1].id), (0x50, 0x11));
    }

    #[test]
    fn test_capability_walk_ignores_pointers_into_header() {
        let mut f = FakeFunction::new(at(1, 0), 1, 1);
        f.set_u16(0x06, 0x10);
        f.set_u8(0x34, 0x40);
        f.set_u16(0x40, 0x1009); // next = 0x10, inside the standard header
        let config = FakeConfig::with(vec![f]);
        assert_eq!(CapabilityIter::new(&config, at(1, 0)).count(), 1);
    }

    #[test]
    fn test_capability_walk_needs_status_bit() {
        let mut f = FakeFunction::new(at(1, 0), 1, 1);
        f.set_u8(0x34, 0x40);
        f.set_u16(0x40, 0x0009);
        let config = FakeConfig::with(vec![f]);
        assert_eq!(CapabilityIter::new(&config, at(1, 0)).count(), 0);
    }

    #[test]
    fn test_capability_walk_masks_low_pointer_bits_and_bounds_length() {
        let mut f = FakeFunction::new(at(1, 0), 1, 1);
        f.set_u16(0x06, 0x10);
        f.set_u8(0x34, 0x43);
        // A chain through every dword slot 0x40..0xfc: 48 entries, then back to the start.
        for slot in 0..48u16 {
            let off = 0x40 + slot * 4;
            let next = if slot == 47 { 0x40 } else { off + 4 };
            f.set_u16(off.into(), (next << 8) | 0x09);
        }
        let config = FakeConfig::with(vec![f]);
        assert_eq!(CapabilityIter::new(&config, at(1, 0)).count(), 48);
    }

    #[test]
    fn test_bars_are_sized_and_command_restored() {
        let mut f = FakeFunction::new(at(1, 0), 1, 1);
        f.set_bar32(0, 0xc000_1000, 0x1000);
        f.set_bar64(2, 0x10_0000_0000, 0x4000_0000);
        f.set_u32(0x20, 0x0000_c001);
        f.bar_sizes[4] = 0x20;
        f.set_u16(0x04, 0x6);
        let config = FakeConfig::with(vec![f]);
        let bars = read_bars(&config, at(1, 0)).unwrap();
        let b0 = bars[0].unwrap();
        assert_eq!(
            (b0.kind, b0.base, b0.size),
            (BarKind::Memory32, 0xc000_1000, 0x1000)
        );
        let b2 = bars[2].unwrap();
        assert_eq!(
            (b2.kind, b2.base, b2.size),
            (BarKind::Memory64, 0x10_0000_0000, 0x4000_0000)
        );
        let b4 = bars[4].unwrap();
        assert_eq!((b4.kind, b4.base, b4.size), (BarKind::Io, 0xc000, 0x20));
        assert!(bars[1].is_none() && bars[3].is_none() && bars[5].is_none());
        assert_eq!(config.read_u16(at(1, 0), regs::COMMAND), 0x6);
        // Original addresses restored after sizing.
        assert_eq!(config.read_u32(at(1, 0), 0x10), 0xc000_1000);
        assert!(b0.contains(0xff0, 0x10) && !b0.contains(0xff0, 0x11));
        assert!(!b0.contains(u64::MAX, 2));
    }

    #[test]
    fn test_16bit_io_bar_is_sized_and_noncontiguous_mask_refused() {
        // A 16-bit I/O decoder at 0xc040: the upper half of the BAR reads as zero.
        let mut f = FakeFunction::new(at(1, 0), 1, 1);
        f.set_u32(0x10, 0x0000_c041);
        let config = FakeConfig::with(vec![f]);
        // Size mask as a 16-bit decoder reports it after writing all ones.
        struct SixteenBit<'a>(&'a FakeConfig);
        impl ConfigAccess for SixteenBit<'_> {
            fn read_u32(&self, addr: PciAddress, offset: u16) -> u32 {
                let v = self.0.read_u32(addr, offset);
                if offset == 0x10 && v == u32::MAX {
                    0x0000_ffc1
                } else {
                    v
                }
            }
            fn write_u32(&self, addr: PciAddress, offset: u16, value: u32) {
                if offset == 0x10 {
                    self.0.functions.borrow_mut()[0].set_u32(0x10, value);
                } else {
                    self.0.write_u32(addr, offset, value);
                }
            }
            fn write_u16(&self, addr: PciAddress, offset: u16, value: u16) {
                self.0.write_u16(addr, offset, value);
            }
        }
        let bars = read_bars(&SixteenBit(&config), at(1, 0)).unwrap();
        let b0 = bars[0].unwrap();
        assert_eq!((b0.kind, b0.base, b0.size), (BarKind::Io, 0xc040, 0x40));

        // A mask with a hole in it is no BAR a device can have.
        let mut f = FakeFunction::new(at(1, 0), 1, 1);
        f.set_u32(0x10, 0xc000_0000);
        f.bar_sizes[0] = 0x1000;
        let config = FakeConfig::with(vec![f]);
        struct Holey<'a>(&'a FakeConfig);
        impl ConfigAccess for Holey<'_> {
            fn read_u32(&self, addr: PciAddress, offset: u16) -> u32 {
                let v = self.0.read_u32(addr, offset);
                if offset == 0x10 && v & 0xfff0_0000 == 0xfff0_0000 {
                    0xff0f_f000
                } else {
                    v
                }
            }
            fn write_u32(&self, addr: PciAddress, offset: u16, value: u32) {
                self.0.write_u32(addr, offset, value);
            }
            fn write_u16(&self, addr: PciAddress, offset: u16, value: u16) {
                self.0.write_u16(addr, offset, value);
            }
        }
        assert!(matches!(
            read_bars(&Holey(&config), at(1, 0)),
            Err(BarError::BadSizeMask(0, _))
        ));
    }

    #[test]
    fn test_64bit_bar_in_last_slot_is_refused() {
        let mut f = FakeFunction::new(at(1, 0), 1, 1);
        f.set_u32(0x24, 0x4);
        let config = FakeConfig::with(vec![f]);
        assert_eq!(
            read_bars(&config, at(1, 0)),
            Err(BarError::MissingUpperHalf(5))
        );
    }

    #[test]
    fn test_msix_table_is_bounded_by_bar_and_programmed() {
        let platform = FakePlatform::new();
        let config = PortConfig::new(&platform);
        let addr = at(3, 0);
        let bars = read_bars(&config, addr).unwrap();
        let cap = CapabilityIter::new(&config, addr)
            .find(|c| c.id == MSIX_CAP_ID)
            .unwrap();
        let msix = MsixCapability::parse(&config, addr, cap).unwrap();
        assert_eq!(msix.table_size, 2);
        // SAFETY: the BARs belong to the fake device.
        let table = unsafe { msix.map_table(&platform, &bars) }.unwrap();
        table.program(1, x86_msi_address(2), 0x41).unwrap();
        assert_eq!(table.program(2, 0, 0), Err(MsixError::NoSuchEntry(2)));
        assert_eq!(
            &platform.rng.borrow().msix_table[4..8],
            &[0xfee0_2000, 0, 0x41, 0]
        );
        msix.enable(&config, addr);
        assert_eq!(config.read_u16(addr, cap.offset + 2) >> 14, 0b10);

        // A table that would run past the BAR end is refused.
        let huge = MsixCapability {
            table_size: 2048,
            ..msix
        };
        assert!(matches!(
            // SAFETY: as above.
            unsafe { huge.map_table(&platform, &bars) }.err(),
            Some(MsixError::TableOutsideBar { .. })
        ));
        // A table the platform will not map as device memory is refused.
        let elsewhere = FakePlatform {
            mmio_window: (0xd000_0000, 0x1000_0000),
            ..FakePlatform::new()
        };
        assert!(matches!(
            // SAFETY: as above; the fake device is the same.
            unsafe { msix.map_table(&elsewhere, &bars) }.err(),
            Some(MsixError::TableNotMmio(_))
        ));
        let wrong_bar = MsixCapability {
            table_bar: 4,
            ..msix
        };
        assert!(matches!(
            // SAFETY: as above.
            unsafe { wrong_bar.map_table(&platform, &bars) }.err(),
            Some(MsixError::TableBar(4))
        ));
    }
}
