// SPDX-License-Identifier: Apache-2.0
//! Virtio 1.x driver side: the modern PCI transport, split virtqueues and device clients.

mod pci_transport;
pub mod rng;
mod virtqueue;

pub use pci_transport::{
    MAX_SHM_REGIONS, NO_VECTOR, ShmRegion, TransportError, VirtioPciCaps, VirtioPciDevice,
    find_virtio_caps,
};
pub use virtqueue::{Buffer, MAX_QUEUE_SIZE, QueueError, SplitQueue, UsedElem};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio PCI device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_MODERN_DEVICE_ID_BASE: u16 = 0x1040;

/// Virtio device types (virtio 1.2, 5).
pub mod device_type {
    /// Network card.
    pub const NET: u16 = 1;
    /// Block device.
    pub const BLOCK: u16 = 2;
    /// Entropy source.
    pub const RNG: u16 = 4;
    /// Inter-VM shared memory (virtio-ism draft).
    pub const ISM: u16 = 44;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// Transport feature bits (virtio 1.2, 6).
pub mod features {
    /// Modern device (mandatory for the modern transport).
    pub const VERSION_1: u64 = 1 << 32;
    /// The device may access memory through an IOMMU / platform restrictions.
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
}

/// The virtio device type behind a modern PCI device ID, if it is one.
pub fn modern_device_type(vendor_id: u16, device_id: u16) -> Option<u16> {
    if vendor_id != VIRTIO_PCI_VENDOR_ID {
        return None;
    }
    device_id
        .checked_sub(VIRTIO_PCI_MODERN_DEVICE_ID_BASE)
        .filter(|t| *t <= 0x3f)
}
