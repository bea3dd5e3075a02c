// SPDX-License-Identifier: Apache-2.0
//! The virtio-ism wire protocol, for the device and for drivers (no_std, no dependencies).
//!
//! Wire-compatible with the latest virtio-ism draft as its proof of concept implements it
//! ("Gen B"); extensions exist only behind feature bits. docs/protocol.md is the
//! specification; this crate is its typed form. Every structure is little-endian and encoded
//! explicitly through [`wire::WireStruct`] (`decode`/`encode`), with its field offsets named as
//! associated constants.
//!
//! A driver allocating a region:
//!
//! ```
//! use virtio_ism_proto::ctrl::{decode_areas, reply_len};
//! use virtio_ism_proto::{AllocReplyHeader, AllocRequest, Area, Request, Status, WireStruct};
//!
//! // Device-readable part of the chain.
//! let mut out = [0u8; 16];
//! let n = Request::Alloc(AllocRequest { size: 1 << 20 }).encode(&mut out).unwrap();
//! assert_eq!(&out[..2], &[0, 0]); // class ALLOC, cmd ALLOC_REGION
//!
//! // Device-writable part: status + reply with room for 4 areas.
//! let mut reply = [0u8; reply_len(AllocReplyHeader::SIZE, Area::SIZE, 4)];
//! # // What a device would write back:
//! # reply[0] = 0;
//! # AllocReplyHeader { token: 0x1234, num: 1 }.encode(&mut reply[1..]).unwrap();
//! # Area { offset: 0, size: 1 << 20 }.encode(&mut reply[17..]).unwrap();
//! match Status::from_raw(reply[0]) {
//!     Status::Ok => {
//!         let header = AllocReplyHeader::decode(&reply[1..]).unwrap();
//!         let areas = decode_areas(&reply[1 + AllocReplyHeader::SIZE..], header.num).unwrap();
//!         assert_eq!(areas.map(|a| a.size).sum::<u64>(), 1 << 20);
//!     }
//!     Status::TooBig => { /* retry with room for AllocReplyHeader::num areas */ }
//!     other => panic!("alloc failed: {other:?}"),
//! }
//! # let _ = n;
//! ```
#![no_std]

pub mod config;
pub mod ctrl;
pub mod defs;
pub mod event;
pub mod wire;

pub use config::ConfigSpace;
pub use ctrl::{
    AllocReplyHeader, AllocRequest, Area, AttachReplyHeader, AttachRequest, Command, CtrlClass,
    CtrlHeader, DetachRequest, EventVectorPendingRequest, EventVectorRequest, GrantDefaultRequest,
    GrantDeviceRequest, QueryListReplyHeader, QueryRegionReplyHeader, QueryRegionRequest, Request,
    Status,
};
pub use event::{Event, EventType};
pub use wire::{ShortBuffer, WireStruct};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::defs::{ctrl as c, event as e, status as s};

    #[test]
    fn test_config_space_layout_matches_draft() {
        let cfg = ConfigSpace {
            gid: 0x0102_0304_0506_0708,
            devid: 0x1112_1314_1516_1718,
            chunk_size: 0x40_0000,
            notify_size: 4,
        };
        let bytes: [u8; 32] = cfg.to_bytes().unwrap();
        assert_eq!(&bytes[0..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(&bytes[8..16], &0x1112_1314_1516_1718u64.to_le_bytes());
        assert_eq!(&bytes[16..24], &0x40_0000u64.to_le_bytes());
        assert_eq!(&bytes[24..32], &4u64.to_le_bytes());
        assert_eq!(ConfigSpace::decode(&bytes).unwrap(), cfg);
        assert_eq!(ConfigSpace::chunk_size, 16);
    }

    #[test]
    fn test_attach_request_encodes_c_padding_and_decodes_12_bytes() {
        let req = Request::Attach(AttachRequest {
            token: 0xdead_beef_0000_0001,
            rw_perm: 3,
        });
        let mut buf = [0xaau8; 32];
        let n = req.encode(&mut buf).unwrap();
        assert_eq!(n, 2 + 16);
        assert_eq!(buf[0], c::VIRTIO_ISM_CTRL_ATTACH);
        assert_eq!(buf[1], c::VIRTIO_ISM_CTRL_ATTACH_REGION);
        assert_eq!(&buf[2..10], &0xdead_beef_0000_0001u64.to_le_bytes());
        assert_eq!(&buf[10..14], &3u32.to_le_bytes());
        assert_eq!(&buf[14..18], &[0, 0, 0, 0]);
        // A driver that sends only the meaningful 12 bytes is understood too.
        assert_eq!(Request::decode(&buf[..14]).unwrap(), req);
        assert_eq!(
            Request::decode(&buf[..13]),
            Err(ShortBuffer {
                needed: 12,
                got: 11
            })
        );
    }

    #[test]
    fn test_every_request_round_trips() {
        let reqs = [
            Request::Alloc(AllocRequest { size: 1 << 20 }),
            Request::Attach(AttachRequest {
                token: 7,
                rw_perm: 1,
            }),
            Request::Detach(DetachRequest { token: 9 }),
            Request::GrantDefault(GrantDefaultRequest {
                token: 9,
                permissions: 5,
            }),
            Request::GrantDevice(GrantDeviceRequest {
                token: 9,
                permissions: 7,
                peer_devid: 3,
            }),
            Request::EventVector(EventVectorRequest {
                token: 9,
                vector: 2,
            }),
            Request::EventVectorPending(EventVectorPendingRequest {
                token: 9,
                vector: 0,
                pending_addr: 0x1000,
                pending_bit: 63,
            }),
            Request::QueryList,
            Request::QueryRegion(QueryRegionRequest { token: 11 }),
            Request::Unknown { class: 9, cmd: 9 },
        ];
        for req in reqs {
            let mut buf = [0u8; 64];
            let n = req.encode(&mut buf).unwrap();
            assert_eq!(n, req.encoded_len());
            assert_eq!(Request::decode(&buf[..n]).unwrap(), req, "{req:?}");
            assert!(req.encode(&mut buf[..n - 1]).is_err());
        }
    }

    #[test]
    fn test_grant_for_device_field_order() {
        let mut buf = [0u8; 26];
        Request::GrantDevice(GrantDeviceRequest {
            token: 1,
            permissions: 2,
            peer_devid: 3,
        })
        .encode(&mut buf)
        .unwrap();
        assert_eq!(&buf[..2], &[3, 1]);
        assert_eq!(buf[2], 1);
        assert_eq!(buf[10], 2);
        assert_eq!(buf[18], 3);
    }

    #[test]
    fn test_status_codes_match_draft() {
        let table = [
            (Status::Ok, 0u8),
            (Status::NoEnt, 2),
            (Status::TooBig, 7),
            (Status::NoMem, 12),
            (Status::NoSpc, 28),
            (Status::Again, 11),
            (Status::PermAttach, 100),
            (Status::PermRead, 101),
            (Status::PermWrite, 102),
            (Status::Err, 255),
        ];
        for (status, raw) in table {
            assert_eq!(status.raw(), raw);
            assert_eq!(Status::from_raw(raw), status);
        }
        assert_eq!(Status::from_raw(1), Status::Unknown(1));
        assert_eq!(s::VIRTIO_ISM_ENOSPC, 28);
    }

    #[test]
    fn test_reply_capacity_and_areas() {
        // status + token + num + 2 areas
        let len = reply_len_alloc(2);
        assert_eq!(len, 1 + 16 + 32);
        assert_eq!(
            ctrl::reply_capacity(len as u64, AllocReplyHeader::SIZE, Area::SIZE),
            Some(2)
        );
        assert_eq!(
            ctrl::reply_capacity(16, AllocReplyHeader::SIZE, Area::SIZE),
            None
        );
        let mut buf = [0u8; 48];
        Area {
            offset: 0x1000,
            size: 0x2000,
        }
        .encode(&mut buf)
        .unwrap();
        Area {
            offset: 0x8000,
            size: 0x1000,
        }
        .encode(&mut buf[16..])
        .unwrap();
        let areas: [Area; 2] = {
            let mut it = ctrl::decode_areas(&buf, 2).unwrap();
            [it.next().unwrap(), it.next().unwrap()]
        };
        assert_eq!(
            areas[1],
            Area {
                offset: 0x8000,
                size: 0x1000
            }
        );
        assert!(ctrl::decode_areas(&buf, 4).is_err());
        assert!(ctrl::decode_areas(&buf, u64::MAX).is_err());
    }

    fn reply_len_alloc(n: usize) -> usize {
        ctrl::reply_len(AllocReplyHeader::SIZE, Area::SIZE, n)
    }

    #[test]
    fn test_event_prefix_matches_draft_structs() {
        let ev = Event {
            ev_type: e::VIRTIO_ISM_EVENT_DETACH,
            offset: 0x20_0000,
            devid: 5,
            peers: 1,
            token: 0xabc,
        };
        let bytes: [u8; 40] = ev.to_bytes().unwrap();
        assert_eq!(&bytes[0..8], &4u64.to_le_bytes());
        assert_eq!(&bytes[8..16], &0x20_0000u64.to_le_bytes());
        assert_eq!(&bytes[16..24], &5u64.to_le_bytes());
        assert_eq!(&bytes[24..32], &1u64.to_le_bytes());
        assert_eq!(&bytes[32..40], &0xabcu64.to_le_bytes());
        assert_eq!(Event::decode(&bytes).unwrap().kind(), EventType::Detach);
    }

    #[test]
    fn test_command_from_header_unknown_arm() {
        // Class 4 has commands 0 (EVENT_VECTOR_SET) and 1 (EVENT_VECTOR_PENDING_SET).
        let cmd = Command::from_header(CtrlHeader { class: 4, cmd: 2 });
        assert_eq!(cmd, Command::Unknown { class: 4, cmd: 2 });
        assert_eq!(cmd.header(), CtrlHeader { class: 4, cmd: 2 });
        assert_eq!(
            Command::from_header(Command::QueryRegion.header()),
            Command::QueryRegion
        );
        assert_eq!(Command::GrantSetForDevice.class(), CtrlClass::Grant);
        assert_eq!(CtrlClass::from_raw(200), CtrlClass::Unknown(200));
        for raw in 0..=5 {
            assert_eq!(CtrlClass::from_raw(raw).raw(), raw);
            assert_ne!(CtrlClass::from_raw(raw), CtrlClass::Unknown(raw));
        }
        assert_eq!(
            Command::QueryList.required_feature(),
            Some(defs::features::VIRTIO_ISM_F_QUERY)
        );
    }
}
