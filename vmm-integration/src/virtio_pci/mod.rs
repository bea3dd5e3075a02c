// SPDX-License-Identifier: Apache-2.0
//! The virtio-pci modern transport (virtio 1.2, 4.1): a PCI function whose capabilities point
//! at the common configuration, notification, ISR and device configuration structures in its
//! settings BAR, plus MSI-X, plus shared-memory regions in a 64-bit prefetchable BAR.

mod common_config;
mod device;
mod interrupt;
mod lifecycle;
#[cfg(test)]
mod tests;

pub use device::{VirtioPciDevice, VirtioPciError, VirtioPciResources, settings_bar_size};
pub use lifecycle::{DeviceManager, Lifecycle};

use virtio_ism_proto::defs::{self, device_status};

/// Device status bits (virtio 1.2, 2.1), as the device interface crate defines them.
#[cfg(test)]
pub const STATUS_ACKNOWLEDGE: u8 = device_status::ACKNOWLEDGE;
#[cfg(test)]
pub const STATUS_DRIVER: u8 = device_status::DRIVER;
pub const STATUS_DRIVER_OK: u8 = device_status::DRIVER_OK;
pub const STATUS_FEATURES_OK: u8 = device_status::FEATURES_OK;
pub const STATUS_NEEDS_RESET: u8 = device_status::DEVICE_NEEDS_RESET;

/// Feature bits the transport itself looks at.
pub const VIRTIO_F_VERSION_1: u64 = 1 << defs::features::VIRTIO_F_VERSION_1;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// PCI IDs: modern virtio devices are 0x1040 + device type.
pub const VIRTIO_PCI_VENDOR_ID: u16 = defs::PCI_VENDOR_ID_VIRTIO;
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = defs::PCI_MODERN_DEVICE_ID_BASE;
