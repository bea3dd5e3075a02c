// SPDX-License-Identifier: Apache-2.0
//! The port-I/O and MMIO buses that vCPU exits are dispatched on.
//!
//! Built on vm-device's `Bus`. A device is looked up and its `Arc` cloned under a short read
//! lock, which is released before the device runs, so a device handler may itself change the
//! buses (a PCI config write that moves a BAR re-registers the BAR's range).

use std::sync::{Arc, RwLock};

use vm_device::bus::{Bus, BusRange, MmioAddress, PioAddress};
use vm_device::{DeviceMmio, DevicePio};

/// A device on the port-I/O bus.
pub type PioDevice = Arc<dyn DevicePio + Send + Sync>;
/// A device on the MMIO bus.
pub type MmioDevice = Arc<dyn DeviceMmio + Send + Sync>;

/// Why a range could not be (de)registered.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("Invalid bus range base {base:#x} size {size:#x}")]
    InvalidRange { base: u64, size: u64 },
    #[error("Bus range base {base:#x} size {size:#x} overlaps a registered device")]
    Overlap { base: u64, size: u64 },
    #[error("No device registered at {0:#x}")]
    NotRegistered(u64),
}

/// Both buses of a VM, shared by every vCPU thread.
#[derive(Default)]
pub struct IoBuses {
    pio: RwLock<Bus<PioAddress, PioDevice>>,
    mmio: RwLock<Bus<MmioAddress, MmioDevice>>,
}

impl IoBuses {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register_pio(&self, base: u16, size: u16, dev: PioDevice) -> Result<(), BusError> {
        let range = BusRange::new(PioAddress(base), size).map_err(|_| BusError::InvalidRange {
            base: base.into(),
            size: size.into(),
        })?;
        // A poisoned lock only means another vCPU panicked while holding it; the map itself
        // is never left half-updated by vm-device, so keep serving.
        let mut bus = self.pio.write().unwrap_or_else(|e| e.into_inner());
        bus.register(range, dev).map_err(|_| BusError::Overlap {
            base: base.into(),
            size: size.into(),
        })
    }

    pub fn register_mmio(&self, base: u64, size: u64, dev: MmioDevice) -> Result<(), BusError> {
        let range = BusRange::new(MmioAddress(base), size)
            .map_err(|_| BusError::InvalidRange { base, size })?;
        let mut bus = self.mmio.write().unwrap_or_else(|e| e.into_inner());
        bus.register(range, dev)
            .map_err(|_| BusError::Overlap { base, size })
    }

    /// Remove the MMIO device whose range contains `addr`; returns it.
    pub fn deregister_mmio(&self, addr: u64) -> Result<MmioDevice, BusError> {
        let mut bus = self.mmio.write().unwrap_or_else(|e| e.into_inner());
        bus.deregister(MmioAddress(addr))
            .map(|(_, dev)| dev)
            .ok_or(BusError::NotRegistered(addr))
    }

    /// Move the MMIO range starting at `old_base` to `new_base` (a BAR move).
    pub fn move_mmio(&self, old_base: u64, new_base: u64, size: u64) -> Result<(), BusError> {
        let mut bus = self.mmio.write().unwrap_or_else(|e| e.into_inner());
        let (range, dev) = bus
            .deregister(MmioAddress(old_base))
            .ok_or(BusError::NotRegistered(old_base))?;
        let new_range =
            BusRange::new(MmioAddress(new_base), size).map_err(|_| BusError::InvalidRange {
                base: new_base,
                size,
            })?;
        if let Err(_e) = bus.register(new_range, dev.clone()) {
            // Put it back where it was rather than lose the device.
            let _ = bus.register(range, dev);
            return Err(BusError::Overlap {
                base: new_base,
                size,
            });
        }
        Ok(())
    }

    fn pio_lookup(&self, port: u16, len: usize) -> Option<(PioAddress, PioDevice)> {
        let bus = self.pio.read().unwrap_or_else(|e| e.into_inner());
        let (range, dev) = bus.check_access(PioAddress(port), len).ok()?;
        Some((range.base(), dev.clone()))
    }

    fn mmio_lookup(&self, addr: u64, len: usize) -> Option<(MmioAddress, MmioDevice)> {
        let bus = self.mmio.read().unwrap_or_else(|e| e.into_inner());
        let (range, dev) = bus.check_access(MmioAddress(addr), len).ok()?;
        Some((range.base(), dev.clone()))
    }

    /// Dispatch a port read; returns false if no device covers it (data is left as is).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.pio_lookup(port, data.len()) {
            Some((base, dev)) => {
                dev.pio_read(base, port - base.0, data);
                true
            }
            None => false,
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        match self.pio_lookup(port, data.len()) {
            Some((base, dev)) => {
                dev.pio_write(base, port - base.0, data);
                true
            }
            None => false,
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.mmio_lookup(addr, data.len()) {
            Some((base, dev)) => {
                dev.mmio_read(base, addr - base.0, data);
                true
            }
            None => false,
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.mmio_lookup(addr, data.len()) {
            Some((base, dev)) => {
                dev.mmio_write(base, addr - base.0, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_device::bus::{MmioAddressOffset, PioAddressOffset};
    use vm_device::{MutDeviceMmio, MutDevicePio};

    #[derive(Default)]
    struct Latch {
        last_offset: u64,
        value: u8,
    }

    impl MutDevicePio for Latch {
        fn pio_read(&mut self, _b: PioAddress, off: PioAddressOffset, data: &mut [u8]) {
            self.last_offset = off.into();
            data.fill(self.value);
        }
        fn pio_write(&mut self, _b: PioAddress, off: PioAddressOffset, data: &[u8]) {
            self.last_offset = off.into();
            self.value = data[0];
        }
    }

    impl MutDeviceMmio for Latch {
        fn mmio_read(&mut self, _b: MmioAddress, off: MmioAddressOffset, data: &mut [u8]) {
            self.last_offset = off;
            data.fill(self.value);
        }
        fn mmio_write(&mut self, _b: MmioAddress, off: MmioAddressOffset, data: &[u8]) {
            self.last_offset = off;
            self.value = data[0];
        }
    }

    #[test]
    fn test_pio_dispatch_passes_offset_and_misses_unmapped_ports() {
        let buses = IoBuses::new();
        let dev = Arc::new(Mutex::new(Latch::default()));
        buses.register_pio(0x3f8, 8, dev.clone()).unwrap();
        assert!(buses.pio_write(0x3fa, &[7]));
        assert_eq!(dev.lock().unwrap().last_offset, 2);
        let mut b = [0u8; 1];
        assert!(buses.pio_read(0x3f9, &mut b));
        assert_eq!(b[0], 7);
        assert!(!buses.pio_read(0x400, &mut b));
        // An access running past the end of the range is not dispatched.
        let mut w = [0u8; 4];
        assert!(!buses.pio_read(0x3fe, &mut w));
    }

    #[test]
    fn test_move_mmio_follows_bar_and_rejects_overlap() {
        let buses = IoBuses::new();
        let a = Arc::new(Mutex::new(Latch::default()));
        let b = Arc::new(Mutex::new(Latch::default()));
        buses.register_mmio(0x1000, 0x1000, a.clone()).unwrap();
        buses.register_mmio(0x4000, 0x1000, b).unwrap();
        buses.move_mmio(0x1000, 0x8000, 0x1000).unwrap();
        assert!(!buses.mmio_write(0x1000, &[1]));
        assert!(buses.mmio_write(0x8010, &[5]));
        assert_eq!(a.lock().unwrap().last_offset, 0x10);
        // Moving onto another device fails and leaves the device where it was.
        assert!(buses.move_mmio(0x8000, 0x4000, 0x1000).is_err());
        assert!(buses.mmio_write(0x8000, &[6]));
        assert_eq!(a.lock().unwrap().value, 6);
        assert!(buses.deregister_mmio(0x8000).is_ok());
        assert!(buses.deregister_mmio(0x8000).is_err());
    }
}
