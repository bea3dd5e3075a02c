// SPDX-License-Identifier: Apache-2.0
//! The VMM's PCI root and virtio-pci transport without a VM, for testing guest drivers on
//! the host (`test-utils` feature).
//!
//! [`PciBench`] is what a guest sees of ism-vmm's PCI: the host bridge and virtio functions on
//! bus 0, configuration space through ports 0xCF8/0xCFC and ECAM, each function's settings BAR
//! (common configuration, ISR, device configuration, notifications, MSI-X table and PBA) in
//! the 32-bit MMIO window and its shared-memory BAR in the 64-bit one. KVM is a recording
//! fake: MSI routes and irqfds are kept, not delivered, and a notification reaches the
//! device's queue eventfd through the MMIO path. Device activation and reset run on the
//! thread that writes the status (no device-manager thread).

use std::sync::{Arc, Mutex};

use virtio_device::VirtioDevice;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::bus::IoBuses;
use crate::interrupt::fake::FakeKvm;
use crate::layout;
use crate::pci::{PciError, PciManager};

/// Where the bench places BARs: the 32-bit window (settings BARs) and the 64-bit one
/// (shared-memory BARs), as in a VM.
pub const MMIO32_START: u64 = layout::MMIO32_START;
pub const MMIO32_SIZE: u64 = layout::MMIO32_SIZE;
pub const MMIO64_START: u64 = layout::MMIO64_MIN_START;
pub const MMIO64_SIZE: u64 = layout::MMIO64_SIZE;
/// Where the PCI Express configuration space (ECAM, bus 0) is.
pub const ECAM_START: u64 = layout::PCI_ECAM_START;
pub const ECAM_SIZE: u64 = layout::PCI_ECAM_SIZE;

/// Why a device could not be plugged.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct PlugError(#[from] PciError);

/// ism-vmm's PCI root with virtio devices on its transport, driven through port and MMIO
/// accesses as a guest driver makes them.
pub struct PciBench {
    buses: Arc<IoBuses>,
    pci: PciManager,
}

impl PciBench {
    /// A bus with only the host bridge; queues live in `mem`.
    pub fn new(mem: GuestMemoryAtomic<GuestMemoryMmap>) -> Result<Self, PlugError> {
        let kvm = Arc::new(FakeKvm::default());
        let buses = Arc::new(IoBuses::new());
        let pci = PciManager::with_backend(kvm.clone(), kvm, mem, buses.clone(), MMIO64_START)?;
        Ok(Self { buses, pci })
    }

    /// Plug `device` into `slot` with `msix_vectors` MSI-X vectors, on the virtio-pci
    /// transport ism-vmm uses.
    pub fn add_virtio_device(
        &mut self,
        id: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        msix_vectors: usize,
        slot: u8,
    ) -> Result<(), PlugError> {
        self.pci
            .add_virtio_device_at(id, device, msix_vectors, Some(slot))?;
        Ok(())
    }

    /// A port read; false when no device claims the port (the data is then left as is).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        self.buses.pio_read(port, data)
    }

    /// A port write; false when no device claims the port.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        self.buses.pio_write(port, data)
    }

    /// An MMIO read; false when no device claims the address.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.buses.mmio_read(addr, data)
    }

    /// An MMIO write; false when no device claims the address.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        self.buses.mmio_write(addr, data)
    }
}
