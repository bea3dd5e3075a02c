// SPDX-License-Identifier: Apache-2.0
//! Events read from /dev/ismN.

use crate::uapi;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A grant on a held region changed.
    Update,
    /// A peer attached a held region.
    Attach,
    /// A peer detached a held region (or its VM went away).
    Detach,
    /// The host took the region away; it is already unmapped.
    Revoke,
    /// The host attached a region to this device; `ATTACH` its token to use it.
    RegionAdded,
    /// The device dropped events; re-read the region list.
    Overflow,
    /// A peer kicked a bound region. Kicks share one interrupt, so the token is 0.
    Kick,
    /// This file's event queue overflowed in the driver; events were lost.
    Lost,
    /// A type this crate does not know.
    Unknown(u64),
}

impl EventKind {
    /// Decode the record's `type`.
    pub fn from_raw(raw: u64) -> Self {
        match raw {
            uapi::VIRTIO_ISM_EV_UPDATE => Self::Update,
            uapi::VIRTIO_ISM_EV_ATTACH => Self::Attach,
            uapi::VIRTIO_ISM_EV_DETACH => Self::Detach,
            uapi::VIRTIO_ISM_EV_REVOKE => Self::Revoke,
            uapi::VIRTIO_ISM_EV_REGION_ADDED => Self::RegionAdded,
            uapi::VIRTIO_ISM_EV_OVERFLOW => Self::Overflow,
            uapi::VIRTIO_ISM_EV_KICK => Self::Kick,
            uapi::VIRTIO_ISM_EV_LOST => Self::Lost,
            other => Self::Unknown(other),
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
            (wire::VIRTIO_ISM_EVENT_UPDATE, EventKind::Update),
            (wire::VIRTIO_ISM_EVENT_ATTACH, EventKind::Attach),
            (wire::VIRTIO_ISM_EVENT_DETACH, EventKind::Detach),
            (wire::VIRTIO_ISM_EVENT_REVOKE, EventKind::Revoke),
            (wire::VIRTIO_ISM_EVENT_REGION_ADDED, EventKind::RegionAdded),
            (wire::VIRTIO_ISM_EVENT_OVERFLOW, EventKind::Overflow),
        ];
        for (raw, kind) in table {
            assert_eq!(EventKind::from_raw(raw), kind);
        }
        assert_eq!(
            EventKind::from_raw(uapi::VIRTIO_ISM_EV_KICK),
            EventKind::Kick
        );
        assert_eq!(EventKind::from_raw(1 << 40), EventKind::Unknown(1 << 40));
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
                kind: EventKind::Detach,
                token: 0xfeed,
                devid: 7,
                peers: 2
            }
        );
    }
}
