// SPDX-License-Identifier: Apache-2.0
//! Events read from /dev/ismN.

pub use virtio_ism_proto::EventType;

use crate::uapi;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// An event of the device's event queue, which the driver passes through unchanged
    /// (including types this crate does not know, as [`EventType::Unknown`]).
    Device(EventType),
    /// A peer kicked the bound region `token`. With per-region vectors
    /// ([`crate::Info::kick_vectors`]) or pending bits ([`crate::Info::kick_pending`]) only
    /// the kicked region is reported; otherwise every region on the shared config vector is.
    Kick,
    /// This file's event queue overflowed in the driver; events were lost.
    Lost,
}

impl EventKind {
    /// Decode the record's `type`.
    pub fn from_raw(raw: u64) -> Self {
        match raw {
            uapi::VIRTIO_ISM_EV_KICK => Self::Kick,
            uapi::VIRTIO_ISM_EV_LOST => Self::Lost,
            other => Self::Device(EventType::from_raw(other)),
        }
    }
}

/// One event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// The region, or 0.
    pub token: u64,
    /// The peer device for Attach/Detach, else 0.
    pub devid: u64,
    /// Other holders of the region known after the event.
    pub peers: u64,
}

impl From<uapi::virtio_ism_event_record> for Event {
    fn from(rec: uapi::virtio_ism_event_record) -> Self {
        Self {
            kind: EventKind::from_raw(rec.r#type),
            token: rec.token,
            devid: rec.devid,
            peers: rec.peers,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_ism_proto::defs::event as wire;

    #[test]
    fn test_device_event_types_decode_with_wire_values() {
        // The driver passes the device's ev_type through unchanged.
        let table = [
            (wire::VIRTIO_ISM_EVENT_UPDATE, EventType::Update),
            (wire::VIRTIO_ISM_EVENT_ATTACH, EventType::Attach),
            (wire::VIRTIO_ISM_EVENT_DETACH, EventType::Detach),
            (wire::VIRTIO_ISM_EVENT_REVOKE, EventType::Revoke),
            (wire::VIRTIO_ISM_EVENT_REGION_ADDED, EventType::RegionAdded),
            (wire::VIRTIO_ISM_EVENT_OVERFLOW, EventType::Overflow),
        ];
        for (raw, kind) in table {
            assert_eq!(EventKind::from_raw(raw), EventKind::Device(kind));
        }
        assert_eq!(
            EventKind::from_raw(uapi::VIRTIO_ISM_EV_KICK),
            EventKind::Kick
        );
        assert_eq!(
            EventKind::from_raw(uapi::VIRTIO_ISM_EV_LOST),
            EventKind::Lost
        );
        assert_eq!(
            EventKind::from_raw(1 << 40),
            EventKind::Device(EventType::Unknown(1 << 40))
        );
    }

    #[test]
    fn test_record_converts_every_field() {
        let ev = Event::from(uapi::virtio_ism_event_record {
            r#type: uapi::VIRTIO_ISM_EV_DETACH,
            token: 0xfeed,
            devid: 7,
            peers: 2,
        });
        assert_eq!(
            ev,
            Event {
                kind: EventKind::Device(EventType::Detach),
                token: 0xfeed,
                devid: 7,
                peers: 2
            }
        );
    }
}
