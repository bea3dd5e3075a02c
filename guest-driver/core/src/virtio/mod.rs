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

// The generic virtio numbers live with the virtio-ism wire protocol, so that the device and
// every driver share one definition.
pub use virtio_ism_proto::defs::{device_status as status, device_type, modern_device_type};
