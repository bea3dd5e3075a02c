// SPDX-License-Identifier: Apache-2.0
//! The control queue: request header, commands, request payloads, statuses and replies.
//!
//! A request is one descriptor chain: device-readable `CtrlHeader` + command payload, then
//! device-writable `u8 status` followed by the command's reply (status first, as in the draft).

use crate::defs::{ctrl as c, features, status as s};
use crate::wire::{
    ShortBuffer, WireStruct, check_len, get_u32, get_u64, le64_struct, put_u32, put_u64,
};

/// `struct virtio_ism_ctrl_hdr { u8 class; u8 cmd; }` (packed, 2 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtrlHeader {
    pub class: u8,
    pub cmd: u8,
}

impl CtrlHeader {
    pub const CLASS: usize = 0;
    pub const CMD: usize = 1;
}

impl WireStruct for CtrlHeader {
    const SIZE: usize = 2;

    fn decode(buf: &[u8]) -> Result<Self, ShortBuffer> {
        check_len(buf, Self::SIZE)?;
        Ok(Self {
            class: buf[Self::CLASS],
            cmd: buf[Self::CMD],
        })
    }

    fn encode(&self, buf: &mut [u8]) -> Result<usize, ShortBuffer> {
        check_len(buf, Self::SIZE)?;
        buf[Self::CLASS] = self.class;
        buf[Self::CMD] = self.cmd;
        Ok(Self::SIZE)
    }
}

/// Control classes (the header's first byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlClass {
    Alloc,
    Attach,
    Detach,
    Grant,
    EventVector,
    /// Extension, needs VIRTIO_ISM_F_QUERY.
    Query,
    Unknown(u8),
}

impl CtrlClass {
    pub fn from_raw(raw: u8) -> Self {
        match raw {
            c::VIRTIO_ISM_CTRL_ALLOC => Self::Alloc,
            c::VIRTIO_ISM_CTRL_ATTACH => Self::Attach,
            c::VIRTIO_ISM_CTRL_DETACH => Self::Detach,
            c::VIRTIO_ISM_CTRL_GRANT => Self::Grant,
            c::VIRTIO_ISM_CTRL_EVENT_VECTOR => Self::EventVector,
            c::VIRTIO_ISM_CTRL_QUERY => Self::Query,
            other => Self::Unknown(other),
        }
    }

    pub fn raw(self) -> u8 {
        match self {
            Self::Alloc => c::VIRTIO_ISM_CTRL_ALLOC,
            Self::Attach => c::VIRTIO_ISM_CTRL_ATTACH,
            Self::Detach => c::VIRTIO_ISM_CTRL_DETACH,
            Self::Grant => c::VIRTIO_ISM_CTRL_GRANT,
            Self::EventVector => c::VIRTIO_ISM_CTRL_EVENT_VECTOR,
            Self::Query => c::VIRTIO_ISM_CTRL_QUERY,
            Self::Unknown(raw) => raw,
        }
    }
}

/// Every control command this crate knows, decoded from the header (class + cmd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    AllocRegion,
    AttachRegion,
    DetachRegion,
    GrantSetDefault,
    GrantSetForDevice,
    EventVectorSet,
    /// Extension, needs VIRTIO_ISM_F_KICK_PENDING.
    EventVectorPendingSet,
    /// Extension, needs VIRTIO_ISM_F_QUERY.
    QueryList,
    /// Extension, needs VIRTIO_ISM_F_QUERY.
    QueryRegion,
    Unknown {
        class: u8,
        cmd: u8,
    },
}

impl Command {
    pub fn from_header(hdr: CtrlHeader) -> Self {
        match (hdr.class, hdr.cmd) {
            (c::VIRTIO_ISM_CTRL_ALLOC, c::VIRTIO_ISM_CTRL_ALLOC_REGION) => Self::AllocRegion,
            (c::VIRTIO_ISM_CTRL_ATTACH, c::VIRTIO_ISM_CTRL_ATTACH_REGION) => Self::AttachRegion,
            (c::VIRTIO_ISM_CTRL_DETACH, c::VIRTIO_ISM_CTRL_DETACH_REGION) => Self::DetachRegion,
            (c::VIRTIO_ISM_CTRL_GRANT, c::VIRTIO_ISM_CTRL_GRANT_SET_DEFAULT) => {
                Self::GrantSetDefault
            }
            (c::VIRTIO_ISM_CTRL_GRANT, c::VIRTIO_ISM_CTRL_GRANT_SET_FOR_DEVICE) => {
                Self::GrantSetForDevice
            }
            (c::VIRTIO_ISM_CTRL_EVENT_VECTOR, c::VIRTIO_ISM_CTRL_EVENT_VECTOR_SET) => {
                Self::EventVectorSet
            }
            (c::VIRTIO_ISM_CTRL_EVENT_VECTOR, c::VIRTIO_ISM_CTRL_EVENT_VECTOR_PENDING_SET) => {
                Self::EventVectorPendingSet
            }
            (c::VIRTIO_ISM_CTRL_QUERY, c::VIRTIO_ISM_CTRL_QUERY_LIST) => Self::QueryList,
            (c::VIRTIO_ISM_CTRL_QUERY, c::VIRTIO_ISM_CTRL_QUERY_REGION) => Self::QueryRegion,
            (class, cmd) => Self::Unknown { class, cmd },
        }
    }

    pub fn class(self) -> CtrlClass {
        CtrlClass::from_raw(self.header().class)
    }

    pub fn header(self) -> CtrlHeader {
        let (class, cmd) = match self {
            Self::AllocRegion => (c::VIRTIO_ISM_CTRL_ALLOC, c::VIRTIO_ISM_CTRL_ALLOC_REGION),
            Self::AttachRegion => (c::VIRTIO_ISM_CTRL_ATTACH, c::VIRTIO_ISM_CTRL_ATTACH_REGION),
            Self::DetachRegion => (c::VIRTIO_ISM_CTRL_DETACH, c::VIRTIO_ISM_CTRL_DETACH_REGION),
            Self::GrantSetDefault => (
                c::VIRTIO_ISM_CTRL_GRANT,
                c::VIRTIO_ISM_CTRL_GRANT_SET_DEFAULT,
            ),
            Self::GrantSetForDevice => (
                c::VIRTIO_ISM_CTRL_GRANT,
                c::VIRTIO_ISM_CTRL_GRANT_SET_FOR_DEVICE,
            ),
            Self::EventVectorSet => (
                c::VIRTIO_ISM_CTRL_EVENT_VECTOR,
                c::VIRTIO_ISM_CTRL_EVENT_VECTOR_SET,
            ),
            Self::EventVectorPendingSet => (
                c::VIRTIO_ISM_CTRL_EVENT_VECTOR,
                c::VIRTIO_ISM_CTRL_EVENT_VECTOR_PENDING_SET,
            ),
            Self::QueryList => (c::VIRTIO_ISM_CTRL_QUERY, c::VIRTIO_ISM_CTRL_QUERY_LIST),
            Self::QueryRegion => (c::VIRTIO_ISM_CTRL_QUERY, c::VIRTIO_ISM_CTRL_QUERY_REGION),
            Self::Unknown { class, cmd } => (class, cmd),
        };
        CtrlHeader { class, cmd }
    }

    /// The feature bit that must be negotiated for the command to exist, if any.
    pub fn required_feature(self) -> Option<u32> {
        match self {
            Self::QueryList | Self::QueryRegion => Some(features::VIRTIO_ISM_F_QUERY),
            Self::EventVectorPendingSet => Some(features::VIRTIO_ISM_F_KICK_PENDING),
            _ => None,
        }
    }

    /// Fewest payload bytes (after the header) the command needs.
    pub fn min_payload(self) -> usize {
        match self {
            Self::AllocRegion => AllocRequest::SIZE,
            Self::AttachRegion => AttachRequest::MIN_SIZE,
            Self::DetachRegion => DetachRequest::SIZE,
            Self::GrantSetDefault => GrantDefaultRequest::SIZE,
            Self::GrantSetForDevice => GrantDeviceRequest::SIZE,
            Self::EventVectorSet => EventVectorRequest::SIZE,
            Self::EventVectorPendingSet => EventVectorPendingRequest::SIZE,
            Self::QueryList => 0,
            Self::QueryRegion => QueryRegionRequest::SIZE,
            Self::Unknown { .. } => 0,
        }
    }
}

/// The status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Generic failure (malformed request, unknown command, ...).
    Err,
    /// No such region (or not held by this device).
    NoEnt,
    /// The reply buffer is too small; `num` in the reply says how many entries are needed.
    TooBig,
    /// The pool has no memory left (or the VM's quota is used up).
    NoMem,
    /// No free chunks left in this device's shared-memory window.
    NoSpc,
    /// The host pool is temporarily unavailable; retrying later may succeed (extension).
    Again,
    PermAttach,
    PermRead,
    PermWrite,
    Unknown(u8),
}

impl Status {
    pub fn from_raw(raw: u8) -> Self {
        match raw {
            s::VIRTIO_ISM_OK => Self::Ok,
            s::VIRTIO_ISM_ERR => Self::Err,
            s::VIRTIO_ISM_ENOENT => Self::NoEnt,
            s::VIRTIO_ISM_E2BIG => Self::TooBig,
            s::VIRTIO_ISM_ENOMEM => Self::NoMem,
            s::VIRTIO_ISM_ENOSPC => Self::NoSpc,
            s::VIRTIO_ISM_EAGAIN => Self::Again,
            s::VIRTIO_ISM_PERM_EATTACH => Self::PermAttach,
            s::VIRTIO_ISM_PERM_EREAD => Self::PermRead,
            s::VIRTIO_ISM_PERM_EWRITE => Self::PermWrite,
            other => Self::Unknown(other),
        }
    }

    pub fn raw(self) -> u8 {
        match self {
            Self::Ok => s::VIRTIO_ISM_OK,
            Self::Err => s::VIRTIO_ISM_ERR,
            Self::NoEnt => s::VIRTIO_ISM_ENOENT,
            Self::TooBig => s::VIRTIO_ISM_E2BIG,
            Self::NoMem => s::VIRTIO_ISM_ENOMEM,
            Self::NoSpc => s::VIRTIO_ISM_ENOSPC,
            Self::Again => s::VIRTIO_ISM_EAGAIN,
            Self::PermAttach => s::VIRTIO_ISM_PERM_EATTACH,
            Self::PermRead => s::VIRTIO_ISM_PERM_EREAD,
            Self::PermWrite => s::VIRTIO_ISM_PERM_EWRITE,
            Self::Unknown(raw) => raw,
        }
    }
}

le64_struct! {
    /// ALLOC_REGION payload: `struct virtio_ism_ctrl_alloc { le64 size; }`.
    AllocRequest { size @ 0 } size 8
}

/// ATTACH_REGION payload: `struct virtio_ism_ctrl_attach { le64 token; le32 rw_perm; }`.
/// C gives it size 16 (4 bytes of tail padding) and the Linux PoC sends 16 bytes; the device
/// needs only the first 12. `rw_perm` 0 means "whatever is granted".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttachRequest {
    pub token: u64,
    pub rw_perm: u32,
}

impl AttachRequest {
    pub const TOKEN: usize = 0;
    pub const RW_PERM: usize = 8;
    /// Bytes the device needs.
    pub const MIN_SIZE: usize = 12;
}

impl WireStruct for AttachRequest {
    /// Encoded size, padding included (what C drivers send).
    const SIZE: usize = 16;

    fn decode(buf: &[u8]) -> Result<Self, ShortBuffer> {
        check_len(buf, Self::MIN_SIZE)?;
        Ok(Self {
            token: get_u64(buf, Self::TOKEN),
            rw_perm: get_u32(buf, Self::RW_PERM),
        })
    }

    fn encode(&self, buf: &mut [u8]) -> Result<usize, ShortBuffer> {
        check_len(buf, Self::SIZE)?;
        put_u64(buf, Self::TOKEN, self.token);
        put_u32(buf, Self::RW_PERM, self.rw_perm);
        buf[Self::MIN_SIZE..Self::SIZE].fill(0);
        Ok(Self::SIZE)
    }
}

le64_struct! {
    /// DETACH_REGION payload: `struct virtio_ism_ctrl_detach { le64 token; }`.
    DetachRequest { token @ 0 } size 8
}

le64_struct! {
    /// GRANT_SET_DEFAULT payload: `{ le64 token; le64 permissions; }`.
    GrantDefaultRequest { token @ 0, permissions @ 8 } size 16
}

le64_struct! {
    /// GRANT_SET_FOR_DEVICE payload: `{ le64 token; le64 permissions; le64 peer_devid; }`.
    GrantDeviceRequest { token @ 0, permissions @ 8, peer_devid @ 16 } size 24
}

le64_struct! {
    /// EVENT_VECTOR_SET payload: `struct virtio_ism_ctrl_irq_vector { le64 token; le64 vector; }`.
    EventVectorRequest { token @ 0, vector @ 8 } size 16
}

le64_struct! {
    /// EVENT_VECTOR_PENDING_SET payload (extension):
    /// `{ le64 token; le64 vector; le64 pending_addr; le64 pending_bit; }`. Binds `vector` like
    /// EVENT_VECTOR_SET; before raising it for a peer's kick the device sets bit `pending_bit`
    /// (0..=63) of the le64 at guest-physical `pending_addr` (8-byte aligned) atomically.
    EventVectorPendingRequest { token @ 0, vector @ 8, pending_addr @ 16, pending_bit @ 24 } size 32
}

le64_struct! {
    /// QUERY_REGION payload (extension): `{ le64 token; }`.
    QueryRegionRequest { token @ 0 } size 8
}

/// A decoded control request (header + payload).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Alloc(AllocRequest),
    Attach(AttachRequest),
    Detach(DetachRequest),
    GrantDefault(GrantDefaultRequest),
    GrantDevice(GrantDeviceRequest),
    EventVector(EventVectorRequest),
    EventVectorPending(EventVectorPendingRequest),
    QueryList,
    QueryRegion(QueryRegionRequest),
    Unknown { class: u8, cmd: u8 },
}

impl Request {
    /// Decode header + payload from the device-readable bytes of a request. Extra trailing
    /// bytes are ignored (drivers may pad).
    pub fn decode(buf: &[u8]) -> Result<Self, ShortBuffer> {
        let hdr = CtrlHeader::decode(buf)?;
        let payload = &buf[CtrlHeader::SIZE..];
        Ok(match Command::from_header(hdr) {
            Command::AllocRegion => Self::Alloc(AllocRequest::decode(payload)?),
            Command::AttachRegion => Self::Attach(AttachRequest::decode(payload)?),
            Command::DetachRegion => Self::Detach(DetachRequest::decode(payload)?),
            Command::GrantSetDefault => Self::GrantDefault(GrantDefaultRequest::decode(payload)?),
            Command::GrantSetForDevice => Self::GrantDevice(GrantDeviceRequest::decode(payload)?),
            Command::EventVectorSet => Self::EventVector(EventVectorRequest::decode(payload)?),
            Command::EventVectorPendingSet => {
                Self::EventVectorPending(EventVectorPendingRequest::decode(payload)?)
            }
            Command::QueryList => Self::QueryList,
            Command::QueryRegion => Self::QueryRegion(QueryRegionRequest::decode(payload)?),
            Command::Unknown { class, cmd } => Self::Unknown { class, cmd },
        })
    }

    pub fn command(&self) -> Command {
        match self {
            Self::Alloc(_) => Command::AllocRegion,
            Self::Attach(_) => Command::AttachRegion,
            Self::Detach(_) => Command::DetachRegion,
            Self::GrantDefault(_) => Command::GrantSetDefault,
            Self::GrantDevice(_) => Command::GrantSetForDevice,
            Self::EventVector(_) => Command::EventVectorSet,
            Self::EventVectorPending(_) => Command::EventVectorPendingSet,
            Self::QueryList => Command::QueryList,
            Self::QueryRegion(_) => Command::QueryRegion,
            Self::Unknown { class, cmd } => Command::Unknown {
                class: *class,
                cmd: *cmd,
            },
        }
    }

    /// Bytes `encode` writes.
    pub fn encoded_len(&self) -> usize {
        CtrlHeader::SIZE
            + match self {
                Self::Alloc(_) => AllocRequest::SIZE,
                Self::Attach(_) => AttachRequest::SIZE,
                Self::Detach(_) => DetachRequest::SIZE,
                Self::GrantDefault(_) => GrantDefaultRequest::SIZE,
                Self::GrantDevice(_) => GrantDeviceRequest::SIZE,
                Self::EventVector(_) => EventVectorRequest::SIZE,
                Self::EventVectorPending(_) => EventVectorPendingRequest::SIZE,
                Self::QueryList | Self::Unknown { .. } => 0,
                Self::QueryRegion(_) => QueryRegionRequest::SIZE,
            }
    }

    /// Encode header + payload (the driver side); returns the bytes written.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, ShortBuffer> {
        check_len(buf, self.encoded_len())?;
        self.command().header().encode(buf)?;
        let payload = &mut buf[CtrlHeader::SIZE..];
        let n = match self {
            Self::Alloc(r) => r.encode(payload)?,
            Self::Attach(r) => r.encode(payload)?,
            Self::Detach(r) => r.encode(payload)?,
            Self::GrantDefault(r) => r.encode(payload)?,
            Self::GrantDevice(r) => r.encode(payload)?,
            Self::EventVector(r) => r.encode(payload)?,
            Self::EventVectorPending(r) => r.encode(payload)?,
            Self::QueryList | Self::Unknown { .. } => 0,
            Self::QueryRegion(r) => r.encode(payload)?,
        };
        Ok(CtrlHeader::SIZE + n)
    }
}

le64_struct! {
    /// `struct virtio_ism_area { le64 offset; le64 size; }`: a piece of a region, at `offset`
    /// of shmid 1. A region is the concatenation of its areas, in reply order.
    Area { offset @ 0, size @ 8 } size 16
}

le64_struct! {
    /// Start of the ALLOC_REGION reply (after the status byte): `{ le64 token; le64 num; }`
    /// followed by `num` areas. On E2BIG, `num` is the number of areas needed.
    AllocReplyHeader { token @ 0, num @ 8 } size 16
}

le64_struct! {
    /// Start of the ATTACH_REGION reply (after the status byte): `{ le64 num; }` followed by
    /// `num` areas. On E2BIG, `num` is the number of areas needed.
    AttachReplyHeader { num @ 0 } size 8
}

le64_struct! {
    /// Start of the QUERY_LIST reply (extension): `{ le64 num; }` followed by `num` le64
    /// tokens. On E2BIG, `num` is the number of tokens needed.
    QueryListReplyHeader { num @ 0 } size 8
}

le64_struct! {
    /// Start of the QUERY_REGION reply (extension): `{ le64 size; le64 flags; le64 vector;
    /// le64 num; }` followed by `num` areas. `flags` holds `region_flags` bits; `vector` is the
    /// bound MSI-X vector or 0xffff.
    QueryRegionReplyHeader { size @ 0, flags @ 8, vector @ 16, num @ 24 } size 32
}

/// Byte offset of the status byte in the device-writable part.
pub const STATUS_OFFSET: usize = 0;
/// Byte offset of the reply in the device-writable part.
pub const REPLY_OFFSET: usize = 1;

/// How many `entry_size` entries fit after a reply header of `header_size` bytes in a
/// device-writable buffer of `writable_len` bytes (status byte included). None if not even the
/// header fits.
pub fn reply_capacity(writable_len: u64, header_size: usize, entry_size: usize) -> Option<u64> {
    let fixed = (REPLY_OFFSET + header_size) as u64;
    let rest = writable_len.checked_sub(fixed)?;
    Some(rest / entry_size as u64)
}

/// The device-writable buffer size a driver must give to receive `entries` entries after a
/// header of `header_size` bytes (status byte included).
pub const fn reply_len(header_size: usize, entry_size: usize, entries: usize) -> usize {
    REPLY_OFFSET + header_size + entry_size * entries
}

/// Iterate `num` areas encoded back to back in `buf` (the driver side).
pub fn decode_areas(buf: &[u8], num: u64) -> Result<impl Iterator<Item = Area> + '_, ShortBuffer> {
    let needed = usize::try_from(num)
        .ok()
        .and_then(|n| n.checked_mul(Area::SIZE))
        .ok_or(ShortBuffer {
            needed: usize::MAX,
            got: buf.len(),
        })?;
    check_len(buf, needed)?;
    Ok(buf[..needed]
        .chunks_exact(Area::SIZE)
        .map(|raw| Area::decode(raw).unwrap_or_default()))
}

/// Iterate `num` le64 tokens encoded back to back in `buf` (QUERY_LIST, driver side).
pub fn decode_tokens(buf: &[u8], num: u64) -> Result<impl Iterator<Item = u64> + '_, ShortBuffer> {
    let needed = usize::try_from(num)
        .ok()
        .and_then(|n| n.checked_mul(8))
        .ok_or(ShortBuffer {
            needed: usize::MAX,
            got: buf.len(),
        })?;
    check_len(buf, needed)?;
    Ok(buf[..needed].chunks_exact(8).map(|raw| get_u64(raw, 0)))
}
