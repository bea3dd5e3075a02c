// SPDX-License-Identifier: Apache-2.0
//! The event queue (extension VIRTIO_ISM_F_EVENT_QUEUE, queue 1).
//!
//! The driver posts device-writable buffers of at least `Event::SIZE` bytes; the device fills
//! one event per buffer. The layout extends the draft's declared (never transported)
//! `struct virtio_ism_event_attach_detach { le64 ev_type, offset, devid, peers; }` with the
//! region's token, so the first 32 bytes read the same as the draft struct and the first 24
//! the same as `virtio_ism_event_update`.

use crate::defs::event as e;
use crate::wire::le64_struct;

le64_struct! {
    /// One event: 40 bytes.
    Event {
        /// One of the `defs::event` values.
        ev_type @ 0,
        /// Offset in shmid 1 of the region's first area (its notify slot key); 0 for OVERFLOW.
        offset @ 8,
        /// The peer that attached/detached, or 0.
        devid @ 16,
        /// Other holders this device knows of after the event (a lower bound: peers that
        /// attached before this device did are only counted once they act).
        peers @ 24,
        /// The region's token; 0 for OVERFLOW.
        token @ 32,
    } size 40
}

/// Decoded event type: what happened to a region this device holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// A grant on a held region changed.
    Update,
    /// A peer attached a held region.
    Attach,
    /// A peer detached a held region (or its VM went away).
    Detach,
    /// The host took the region away; the device has already unmapped it.
    Revoke,
    /// The host attached a region to this device; describe it with QUERY_REGION.
    RegionAdded,
    /// The device dropped events; re-read the region list.
    Overflow,
    /// A type this crate does not know.
    Unknown(u64),
}

impl EventType {
    /// Decode an `ev_type` value.
    pub fn from_raw(raw: u64) -> Self {
        match raw {
            e::VIRTIO_ISM_EVENT_UPDATE => Self::Update,
            e::VIRTIO_ISM_EVENT_ATTACH => Self::Attach,
            e::VIRTIO_ISM_EVENT_DETACH => Self::Detach,
            e::VIRTIO_ISM_EVENT_REVOKE => Self::Revoke,
            e::VIRTIO_ISM_EVENT_REGION_ADDED => Self::RegionAdded,
            e::VIRTIO_ISM_EVENT_OVERFLOW => Self::Overflow,
            other => Self::Unknown(other),
        }
    }

    /// The `ev_type` value.
    pub fn raw(self) -> u64 {
        match self {
            Self::Update => e::VIRTIO_ISM_EVENT_UPDATE,
            Self::Attach => e::VIRTIO_ISM_EVENT_ATTACH,
            Self::Detach => e::VIRTIO_ISM_EVENT_DETACH,
            Self::Revoke => e::VIRTIO_ISM_EVENT_REVOKE,
            Self::RegionAdded => e::VIRTIO_ISM_EVENT_REGION_ADDED,
            Self::Overflow => e::VIRTIO_ISM_EVENT_OVERFLOW,
            Self::Unknown(raw) => raw,
        }
    }
}

impl Event {
    /// The decoded `ev_type`.
    pub fn kind(&self) -> EventType {
        EventType::from_raw(self.ev_type)
    }
}
