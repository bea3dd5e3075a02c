// SPDX-License-Identifier: Apache-2.0
//! PCI root bus 0: the functions on it, the host bridge at 00:00.0, and the two ways a guest
//! reaches configuration space (ports 0xCF8/0xCFC and the ECAM window).

use std::sync::{Arc, Mutex, RwLock};

use vm_device::MutDeviceMmio;
use vm_device::MutDevicePio;
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};

use super::configuration::{PciConfiguration, PciHeader};

pub const DEVICES_PER_BUS: usize = 32;

/// A function's configuration space as the guest sees it.
pub trait PciDevice: Send {
    /// The 32-bit register `reg_idx` (byte offset / 4).
    fn read_config_register(&mut self, reg_idx: usize) -> u32;
    /// A 1, 2 or 4-byte write at byte `offset` within register `reg_idx`.
    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]);
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// The functions on bus 0, function 0 of each device slot only.
pub struct PciBus {
    slots: RwLock<Vec<Option<SharedPciDevice>>>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    pub fn new() -> Self {
        Self {
            slots: RwLock::new(vec![None; DEVICES_PER_BUS]),
        }
    }

    /// Put `dev` in the first free slot; returns the slot (device number).
    pub fn add_device(&self, dev: SharedPciDevice) -> Option<u8> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = slots.iter().position(Option::is_none)?;
        slots[slot] = Some(dev);
        Some(slot as u8)
    }

    /// Whether `slot` exists and holds no device.
    pub fn is_free(&self, slot: u8) -> bool {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(usize::from(slot)).is_some_and(Option::is_none)
    }

    /// Put `dev` in `slot` if that slot is free; returns whether it was.
    pub fn add_device_at(&self, slot: u8, dev: SharedPciDevice) -> bool {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        match slots.get_mut(usize::from(slot)) {
            Some(free @ None) => {
                *free = Some(dev);
                true
            }
            _ => false,
        }
    }

    fn device(&self, bus: u8, dev: u8, func: u8) -> Option<SharedPciDevice> {
        if bus != 0 || func != 0 {
            return None;
        }
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(usize::from(dev))?.clone()
    }

    /// Read register `reg_idx` of bus:dev.func; absent functions read as all ones.
    pub fn read_config(&self, bus: u8, dev: u8, func: u8, reg_idx: usize) -> u32 {
        match self.device(bus, dev, func) {
            Some(d) => d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_config_register(reg_idx),
            None => 0xffff_ffff,
        }
    }

    pub fn write_config(&self, bus: u8, dev: u8, func: u8, reg_idx: usize, off: u64, data: &[u8]) {
        if let Some(d) = self.device(bus, dev, func) {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_config_register(reg_idx, off, data);
        }
    }
}

/// Copy the bytes `[offset, offset + data.len())` of a 32-bit register into `data`; invalid
/// widths or offsets read as all ones.
fn read_register_bytes(value: u32, offset: u64, data: &mut [u8]) {
    let bytes = value.to_le_bytes();
    let range = usize::try_from(offset)
        .ok()
        .and_then(|o| Some(o..o.checked_add(data.len())?))
        .filter(|r| r.end <= 4 && !r.is_empty());
    match range {
        Some(r) => data.copy_from_slice(&bytes[r]),
        None => data.fill(0xff),
    }
}

/// Configuration mechanism #1: the address latch at 0xCF8 and the data window at 0xCFC.
pub struct PciConfigIo {
    bus: Arc<PciBus>,
    address: u32,
}

impl PciConfigIo {
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus, address: 0 }
    }

    /// (bus, device, function, register) selected by the latch, if enabled.
    fn selected(&self) -> Option<(u8, u8, u8, usize)> {
        if self.address & 0x8000_0000 == 0 {
            return None;
        }
        let bus = ((self.address >> 16) & 0xff) as u8;
        let dev = ((self.address >> 11) & 0x1f) as u8;
        let func = ((self.address >> 8) & 0x7) as u8;
        let reg = ((self.address >> 2) & 0x3f) as usize;
        Some((bus, dev, func, reg))
    }
}

impl MutDevicePio for PciConfigIo {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let offset = u64::from(offset);
        if offset < 4 {
            read_register_bytes(self.address, offset, data);
            return;
        }
        match self.selected() {
            Some((b, d, f, reg)) => {
                let value = self.bus.read_config(b, d, f, reg);
                read_register_bytes(value, offset - 4, data);
            }
            None => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let offset = u64::from(offset);
        if offset < 4 {
            // Only whole-dword writes move the latch; byte writes to 0xCF9 are the PCI reset
            // control register on real chipsets, which this VM does not have.
            if offset == 0 && data.len() == 4 {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            return;
        }
        if let Some((b, d, f, reg)) = self.selected() {
            self.bus.write_config(b, d, f, reg, offset - 4, data);
        }
    }
}

/// The ECAM window for bus 0: offset = dev << 15 | func << 12 | register byte.
pub struct PciEcam {
    bus: Arc<PciBus>,
}

impl PciEcam {
    pub fn new(bus: Arc<PciBus>) -> Self {
        Self { bus }
    }

    fn decode(offset: u64) -> (u8, u8, u8, usize, u64) {
        let bus = ((offset >> 20) & 0xff) as u8;
        let dev = ((offset >> 15) & 0x1f) as u8;
        let func = ((offset >> 12) & 0x7) as u8;
        let reg = ((offset & 0xfff) >> 2) as usize;
        (bus, dev, func, reg, offset & 0x3)
    }
}

impl MutDeviceMmio for PciEcam {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        let (b, d, f, reg, off) = Self::decode(offset);
        let value = self.bus.read_config(b, d, f, reg);
        read_register_bytes(value, off, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let (b, d, f, reg, off) = Self::decode(offset);
        self.bus.write_config(b, d, f, reg, off, data);
    }
}

/// The host bridge at 00:00.0: identity only, no BARs.
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciHostBridge {
    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new(&PciHeader {
                // Red Hat, "QEMU PCIe host bridge": Linux binds no driver and needs none.
                vendor_id: 0x1b36,
                device_id: 0x0008,
                revision: 0,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                subsystem_vendor_id: 0x1b36,
                subsystem_id: 0,
            }),
        }
    }
}

impl PciDevice for PciHostBridge {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_reg(reg_idx)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        self.config.write_reg(reg_idx, offset, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cf8(dev: u8, reg_byte: u8) -> [u8; 4] {
        (0x8000_0000u32 | (u32::from(dev) << 11) | u32::from(reg_byte & 0xfc)).to_le_bytes()
    }

    #[test]
    fn test_cf8_and_ecam_agree() {
        let bus = Arc::new(PciBus::new());
        assert_eq!(
            bus.add_device(Arc::new(Mutex::new(PciHostBridge::new()))),
            Some(0)
        );
        let mut io = PciConfigIo::new(bus.clone());
        let mut ecam = PciEcam::new(bus.clone());
        let p = PioAddress(0xcf8);
        let m = MmioAddress(0xe000_0000);

        io.pio_write(p, 0, &cf8(0, 0));
        let mut id = [0u8; 4];
        io.pio_read(p, 4, &mut id);
        let mut id2 = [0u8; 4];
        ecam.mmio_read(m, 0, &mut id2);
        assert_eq!(id, id2);
        assert_eq!(u32::from_le_bytes(id), 0x0008_1b36);

        // Write the interrupt line through CF8, read it back through ECAM (byte access).
        io.pio_write(p, 0, &cf8(0, 0x3c));
        io.pio_write(p, 4, &[0x5a]);
        let mut line = [0u8; 1];
        ecam.mmio_read(m, 0x3c, &mut line);
        assert_eq!(line[0], 0x5a);
        // And the other way: 16-bit command write through ECAM at offset 4.
        ecam.mmio_write(m, 4, &[0x06, 0x00]);
        io.pio_write(p, 0, &cf8(0, 4));
        let mut cmd = [0u8; 2];
        io.pio_read(p, 4, &mut cmd);
        assert_eq!(cmd, [0x06, 0x00]);
        // 16-bit access at 0xCFE reads the upper half.
        let mut status = [0u8; 2];
        io.pio_read(p, 6, &mut status);
        let mut status2 = [0u8; 2];
        ecam.mmio_read(m, 6, &mut status2);
        assert_eq!(status, status2);
    }

    #[test]
    fn test_absent_functions_and_disabled_latch_read_all_ones() {
        let bus = Arc::new(PciBus::new());
        bus.add_device(Arc::new(Mutex::new(PciHostBridge::new())));
        let mut io = PciConfigIo::new(bus.clone());
        let mut ecam = PciEcam::new(bus);
        let p = PioAddress(0xcf8);
        let mut v = [0u8; 4];
        io.pio_write(p, 0, &0u32.to_le_bytes());
        io.pio_read(p, 4, &mut v);
        assert_eq!(v, [0xff; 4]);
        io.pio_write(p, 0, &cf8(5, 0));
        io.pio_read(p, 4, &mut v);
        assert_eq!(v, [0xff; 4]);
        // Function 1 of slot 0, and bus 1.
        ecam.mmio_read(MmioAddress(0), 1 << 12, &mut v);
        assert_eq!(v, [0xff; 4]);
        ecam.mmio_read(MmioAddress(0), 1 << 20, &mut v);
        assert_eq!(v, [0xff; 4]);
        // A latch read returns what was written.
        io.pio_write(p, 0, &cf8(3, 8));
        io.pio_read(p, 0, &mut v);
        assert_eq!(v, cf8(3, 8));
        // Oversized accesses do not panic.
        let mut big = [0u8; 8];
        io.pio_read(p, 4, &mut big);
        ecam.mmio_read(MmioAddress(0), 0xffe, &mut big);
        ecam.mmio_write(MmioAddress(0), u64::MAX, &big);
    }
}
