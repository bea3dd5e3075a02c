// SPDX-License-Identifier: Apache-2.0
//! Every number of the virtio-ism wire protocol, in one place.
//!
//! Sources ("Gen B" of the draft, see docs/protocol.md):
//! - [D] the virtio-ism draft as carried by the Linux PoC header
//!   `include/linux/virtio_ism.h` and uapi `include/uapi/linux/virtio_ism.h`
//!   (fengidri/linux-kernel-virtio-ism @ 19acb39831be);
//! - [S] the virtio specification (`content.tex` device ID table, `transport-pci.tex`);
//! - [X] this project's extensions, each behind a feature bit (docs/protocol.md, "Extensions").

/// Virtio device ID of the ISM device. [S] (commit 985bbf397db4)
pub const VIRTIO_ID_ISM: u32 = device_type::ISM as u32;
/// PCI vendor ID of virtio devices. [S]
pub const PCI_VENDOR_ID_VIRTIO: u16 = 0x1af4;
/// Modern virtio PCI device IDs are this plus the virtio device type. [S] 4.1.2.1
pub const PCI_MODERN_DEVICE_ID_BASE: u16 = 0x1040;
/// Modern PCI device ID: 0x1040 + 44. [S]
pub const PCI_DEVICE_ID_ISM: u16 = PCI_MODERN_DEVICE_ID_BASE + device_type::ISM;

/// The virtio device type behind a modern PCI device ID, if it is one. [S] 4.1.2.1
pub const fn modern_device_type(vendor_id: u16, device_id: u16) -> Option<u16> {
    if vendor_id != PCI_VENDOR_ID_VIRTIO {
        return None;
    }
    match device_id.checked_sub(PCI_MODERN_DEVICE_ID_BASE) {
        Some(t) if t <= 0x3f => Some(t),
        _ => None,
    }
}

/// Virtio device types the drivers of this project look for. [S] 5
pub mod device_type {
    /// Entropy source.
    pub const RNG: u16 = 4;
    /// Inter-VM shared memory (virtio-ism draft).
    pub const ISM: u16 = 44;
}

/// Device status bits. [S] 2.1
pub mod device_status {
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

/// The layout of the modern virtio-pci transport, shared by the device's VMM and drivers.
/// [S] 4.1.4 (`linux/virtio_pci.h`)
pub mod pci {
    /// PCI capability ID of vendor-specific capabilities, which virtio's all are.
    pub const PCI_CAP_ID_VNDR: u8 = 0x09;

    /// `virtio_pci_cap.cfg_type`: the common configuration.
    pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
    /// `virtio_pci_cap.cfg_type`: notifications.
    pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
    /// `virtio_pci_cap.cfg_type`: the ISR status byte.
    pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
    /// `virtio_pci_cap.cfg_type`: the device-specific configuration.
    pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
    /// `virtio_pci_cap.cfg_type`: a shared-memory region (`virtio_pci_cap64`).
    pub const VIRTIO_PCI_CAP_SHARED_MEMORY_CFG: u8 = 8;

    /// Size of `struct virtio_pci_cap`.
    pub const VIRTIO_PCI_CAP_LEN: u8 = 16;
    /// Size of `struct virtio_pci_notify_cap`.
    pub const VIRTIO_PCI_NOTIFY_CAP_LEN: u8 = 20;
    /// Size of `struct virtio_pci_cap64`.
    pub const VIRTIO_PCI_CAP64_LEN: u8 = 24;

    /// Register offsets in `struct virtio_pci_common_cfg`.
    pub mod common_cfg {
        pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
        pub const DEVICE_FEATURE: u64 = 0x04;
        pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
        pub const DRIVER_FEATURE: u64 = 0x0c;
        pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
        pub const NUM_QUEUES: u64 = 0x12;
        pub const DEVICE_STATUS: u64 = 0x14;
        pub const CONFIG_GENERATION: u64 = 0x15;
        pub const QUEUE_SELECT: u64 = 0x16;
        pub const QUEUE_SIZE: u64 = 0x18;
        pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
        pub const QUEUE_ENABLE: u64 = 0x1c;
        pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
        pub const QUEUE_DESC: u64 = 0x20;
        pub const QUEUE_DRIVER: u64 = 0x28;
        pub const QUEUE_DEVICE: u64 = 0x30;
        /// Size of the structure, up to and including `queue_device`.
        pub const LEN: u64 = 0x38;
    }
}

/// Feature bits (device-specific bits 0..=23).
pub mod features {
    /// Draft's only feature bit; its meaning was never specified and no PoC device offered it.
    /// Reserved: this device never offers it. [D]
    pub const VIRTIO_ISM_F_EVENT_IRQ: u32 = 0;
    /// Queue 1 is an event queue reporting attach/detach/update/revoke/hot-add. [X]
    pub const VIRTIO_ISM_F_EVENT_QUEUE: u32 = 1;
    /// The QUERY control class (list held regions, describe one region). [X]
    pub const VIRTIO_ISM_F_QUERY: u32 = 2;
    /// The permissions extension: regions are owner-only until GRANTed. A driver that
    /// negotiates it sends GRANT; regions allocated by one that does not get the operator's
    /// draft policy (`draft_default_perm`). [X]
    pub const VIRTIO_ISM_F_GRANT: u32 = 3;
    /// A region's bound vector is also raised for that region's events (peer attach, detach,
    /// grant update, revoke) when the event queue is not in use. Without it the vector fires
    /// for kicks only, as the draft says. [X]
    pub const VIRTIO_ISM_F_VECTOR_EVENTS: u32 = 4;
    /// EVENT_VECTOR_PENDING_SET: before raising a region's vector for a peer's kick, the
    /// device sets a driver-chosen bit in driver memory, so regions that share a vector
    /// (a transport without a vector per region) still learn which region was kicked. [X]
    pub const VIRTIO_ISM_F_KICK_PENDING: u32 = 5;
    /// The device may answer EAGAIN (11) when its host pool is temporarily unavailable
    /// (broker down, reconnecting or not answering); without it such commands answer ERR,
    /// the draft's generic failure. [X]
    pub const VIRTIO_ISM_F_EAGAIN: u32 = 6;
    /// VIRTIO_F_VERSION_1. [S]
    pub const VIRTIO_F_VERSION_1: u32 = 32;

    /// The 64-bit mask of a feature bit number.
    pub const fn bit(nr: u32) -> u64 {
        1u64 << nr
    }
}

/// Queue indices and sizes.
pub mod queues {
    /// The control queue. [D]
    pub const CTRL_QUEUE_INDEX: u16 = 0;
    /// The event queue, present only with VIRTIO_ISM_F_EVENT_QUEUE. [X]
    pub const EVENT_QUEUE_INDEX: u16 = 1;
    /// Maximum queue size offered (the QEMU PoC used 64 for the control queue). [D]
    pub const QUEUE_SIZE: u16 = 64;
}

/// Shared-memory region ids (`virtio_pci_cap64.cap.id`). [D]
pub mod shm {
    pub const VIRTIO_ISM_SHM_ID_UNDEFINED: u8 = 0;
    /// The sharable memory: regions are mapped at offsets of this region.
    pub const VIRTIO_ISM_SHM_ID_REGIONS: u8 = 1;
    /// The notify (doorbell) area: one `notify_size` slot per chunk.
    pub const VIRTIO_ISM_SHM_ID_NOTIFY: u8 = 2;
}

/// Control classes and commands. [D] except QUERY [X].
pub mod ctrl {
    pub const VIRTIO_ISM_CTRL_ALLOC: u8 = 0;
    pub const VIRTIO_ISM_CTRL_ALLOC_REGION: u8 = 0;

    pub const VIRTIO_ISM_CTRL_ATTACH: u8 = 1;
    pub const VIRTIO_ISM_CTRL_ATTACH_REGION: u8 = 0;

    pub const VIRTIO_ISM_CTRL_DETACH: u8 = 2;
    pub const VIRTIO_ISM_CTRL_DETACH_REGION: u8 = 0;

    pub const VIRTIO_ISM_CTRL_GRANT: u8 = 3;
    pub const VIRTIO_ISM_CTRL_GRANT_SET_DEFAULT: u8 = 0;
    pub const VIRTIO_ISM_CTRL_GRANT_SET_FOR_DEVICE: u8 = 1;

    pub const VIRTIO_ISM_CTRL_EVENT_VECTOR: u8 = 4;
    pub const VIRTIO_ISM_CTRL_EVENT_VECTOR_SET: u8 = 0;
    /// [X] needs VIRTIO_ISM_F_KICK_PENDING: bind a vector plus a pending bit in driver memory.
    pub const VIRTIO_ISM_CTRL_EVENT_VECTOR_PENDING_SET: u8 = 1;

    /// [X] needs VIRTIO_ISM_F_QUERY.
    pub const VIRTIO_ISM_CTRL_QUERY: u8 = 5;
    /// [X] list the tokens of every region this device holds.
    pub const VIRTIO_ISM_CTRL_QUERY_LIST: u8 = 0;
    /// [X] size, access and areas of one held region.
    pub const VIRTIO_ISM_CTRL_QUERY_REGION: u8 = 1;
}

/// Status byte values, written first in the device-writable part of a request. [D]
pub mod status {
    pub const VIRTIO_ISM_OK: u8 = 0;
    pub const VIRTIO_ISM_ENOENT: u8 = 2;
    pub const VIRTIO_ISM_E2BIG: u8 = 7;
    /// Extension (not in the draft): the host pool is temporarily unavailable (its broker
    /// is restarting or does not answer); nothing changed, the same command may succeed
    /// when retried later.
    pub const VIRTIO_ISM_EAGAIN: u8 = 11;
    pub const VIRTIO_ISM_ENOMEM: u8 = 12;
    /// Spelled `VIRTIO_ISM_ENOSPEC` in the draft header.
    pub const VIRTIO_ISM_ENOSPC: u8 = 28;
    pub const VIRTIO_ISM_PERM_EATTACH: u8 = 100;
    pub const VIRTIO_ISM_PERM_EREAD: u8 = 101;
    pub const VIRTIO_ISM_PERM_EWRITE: u8 = 102;
    pub const VIRTIO_ISM_ERR: u8 = 255;
}

/// Permission bits of GRANT and ATTACH's `rw_perm`. [D]
pub mod perm {
    pub const VIRTIO_ISM_PERM_READ: u64 = 1 << 0;
    pub const VIRTIO_ISM_PERM_WRITE: u64 = 1 << 1;
    pub const VIRTIO_ISM_PERM_ATTACH: u64 = 1 << 2;
    pub const VIRTIO_ISM_PERM_MANAGE: u64 = 1 << 3;
    pub const VIRTIO_ISM_PERM_CLEAN_DEFAULT: u64 = 1 << 4;
    /// Every bit a GRANT may carry.
    pub const VIRTIO_ISM_PERM_ALL: u64 = VIRTIO_ISM_PERM_READ
        | VIRTIO_ISM_PERM_WRITE
        | VIRTIO_ISM_PERM_ATTACH
        | VIRTIO_ISM_PERM_MANAGE
        | VIRTIO_ISM_PERM_CLEAN_DEFAULT;
}

/// Event types: [D] declares UPDATE/ATTACH/DETACH as bit values; REVOKE, REGION_ADDED and
/// OVERFLOW are [X].
pub mod event {
    pub const VIRTIO_ISM_EVENT_UPDATE: u64 = 1 << 0;
    pub const VIRTIO_ISM_EVENT_ATTACH: u64 = 1 << 1;
    pub const VIRTIO_ISM_EVENT_DETACH: u64 = 1 << 2;
    /// [X] the host took the region away; the device has already unmapped it.
    pub const VIRTIO_ISM_EVENT_REVOKE: u64 = 1 << 3;
    /// [X] the host attached a region to this device (hotplug); describe it with QUERY_REGION.
    pub const VIRTIO_ISM_EVENT_REGION_ADDED: u64 = 1 << 4;
    /// [X] events were dropped because the driver did not post buffers; re-sync with QUERY.
    pub const VIRTIO_ISM_EVENT_OVERFLOW: u64 = 1 << 5;
}

/// QUERY_REGION `flags` bits. [X]
pub mod region_flags {
    /// The region is mapped readable (always set).
    pub const VIRTIO_ISM_REGION_READ: u64 = 1 << 0;
    /// The region is mapped writable.
    pub const VIRTIO_ISM_REGION_WRITE: u64 = 1 << 1;
    /// This device allocated the region.
    pub const VIRTIO_ISM_REGION_OWNER: u64 = 1 << 8;
    /// The host attached the region to this device (hotplug), not the driver.
    pub const VIRTIO_ISM_REGION_HOTPLUGGED: u64 = 1 << 9;
}

/// MSI-X "no vector": EVENT_VECTOR with this value unbinds the region's vector. [S]
pub const VIRTIO_MSI_NO_VECTOR: u64 = 0xffff;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_modern_device_type_accepts_only_modern_virtio_ids() {
        assert_eq!(
            modern_device_type(PCI_VENDOR_ID_VIRTIO, PCI_DEVICE_ID_ISM),
            Some(device_type::ISM)
        );
        assert_eq!(
            modern_device_type(PCI_VENDOR_ID_VIRTIO, 0x1044),
            Some(device_type::RNG)
        );
        // Transitional IDs, IDs past the modern range and other vendors are not virtio 1.x.
        assert_eq!(modern_device_type(PCI_VENDOR_ID_VIRTIO, 0x1005), None);
        assert_eq!(modern_device_type(PCI_VENDOR_ID_VIRTIO, 0x1080), None);
        assert_eq!(modern_device_type(0x8086, PCI_DEVICE_ID_ISM), None);
    }
}
