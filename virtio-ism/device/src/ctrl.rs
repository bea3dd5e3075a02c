// SPDX-License-Identifier: Apache-2.0
//! The control queue: validate one descriptor chain, copy the request out of guest memory
//! once, run it against the region table and write `status` + reply back, only inside the
//! chain's device-writable buffers.

use log::debug;
use virtio_ism_pool_api::{DevId, GrantTarget, Perms, Token};
use virtio_ism_proto::ctrl::{REPLY_OFFSET, reply_capacity};
use virtio_ism_proto::defs::features::{VIRTIO_ISM_F_EAGAIN, bit};
use virtio_ism_proto::{
    AllocReplyHeader, Area, AttachReplyHeader, QueryListReplyHeader, QueryRegionReplyHeader,
    Request, Status, WireStruct,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::observer::IsmEvent;
use crate::regions::{Refusal, RegionTable, Regions};

/// Most descriptors one control request may use (the Linux driver uses 4).
pub const MAX_CHAIN_DESCRIPTORS: usize = 32;
/// Most device-readable bytes a control request may carry (the largest request is 26).
pub const MAX_REQUEST_BYTES: usize = 256;

/// Why a chain could not be served as a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainFault {
    /// More than MAX_CHAIN_DESCRIPTORS descriptors.
    TooManyDescriptors,
    /// A device-readable descriptor after a device-writable one.
    ReadableAfterWritable,
    /// More than MAX_REQUEST_BYTES readable bytes.
    RequestTooLong,
    /// A readable buffer lies outside guest memory.
    BadReadable,
    /// The request is shorter than its command needs.
    Truncated,
    /// The command is unknown or its feature was not negotiated.
    UnknownCommand,
}

/// A control chain split into what the device reads and where it may write.
pub struct ParsedChain {
    request: [u8; MAX_REQUEST_BYTES],
    request_len: usize,
    /// Device-writable buffers, each checked to lie inside guest memory.
    writable: Vec<(GuestAddress, usize)>,
    writable_len: u64,
    fault: Option<ChainFault>,
}

impl ParsedChain {
    /// Walk the descriptors of one chain. Returns None when no device-writable byte can be
    /// written safely (no writable buffer, or one outside guest memory): such a chain is
    /// returned with used length 0.
    pub fn parse<M, I>(mem: &M, descriptors: I) -> Option<Self>
    where
        M: GuestMemoryBackend,
        I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
    {
        let mut readable: Vec<(GuestAddress, usize)> = Vec::new();
        let mut writable: Vec<(GuestAddress, usize)> = Vec::new();
        let mut readable_len = 0usize;
        let mut writable_len = 0u64;
        let mut fault = None;
        for (index, desc) in descriptors.into_iter().enumerate() {
            if index == MAX_CHAIN_DESCRIPTORS {
                fault.get_or_insert(ChainFault::TooManyDescriptors);
                break;
            }
            let len = desc.len() as usize;
            if desc.is_write_only() {
                if !mem.check_range(desc.addr(), len) {
                    return None;
                }
                writable.push((desc.addr(), len));
                writable_len += len as u64;
            } else {
                if !writable.is_empty() {
                    fault.get_or_insert(ChainFault::ReadableAfterWritable);
                }
                readable_len = readable_len.saturating_add(len);
                readable.push((desc.addr(), len));
            }
        }
        if writable_len == 0 {
            return None;
        }
        let mut parsed = Self {
            request: [0; MAX_REQUEST_BYTES],
            request_len: 0,
            writable,
            writable_len,
            fault,
        };
        if parsed.fault.is_none() && readable_len > MAX_REQUEST_BYTES {
            parsed.fault = Some(ChainFault::RequestTooLong);
        }
        if parsed.fault.is_none() {
            // The one and only read of the request from guest memory.
            for (addr, len) in readable {
                let dst = &mut parsed.request[parsed.request_len..parsed.request_len + len];
                if mem.read_slice(dst, addr).is_err() {
                    parsed.fault = Some(ChainFault::BadReadable);
                    break;
                }
                parsed.request_len += len;
            }
        }
        Some(parsed)
    }

    pub fn writable_len(&self) -> u64 {
        self.writable_len
    }

    /// Decode the request copied by `parse`.
    pub fn request(&self, features: u64) -> Result<Request, ChainFault> {
        if let Some(fault) = self.fault {
            return Err(fault);
        }
        let request = Request::decode(&self.request[..self.request_len])
            .map_err(|_| ChainFault::Truncated)?;
        match request.command().required_feature() {
            Some(nr) if features & bit(nr) == 0 => Err(ChainFault::UnknownCommand),
            _ => match request {
                Request::Unknown { .. } => Err(ChainFault::UnknownCommand),
                _ => Ok(request),
            },
        }
    }

    /// Write `bytes` at the start of the device-writable part, truncated to its length.
    /// Returns the bytes written (the used length).
    pub fn write_reply<M: GuestMemoryBackend>(&self, mem: &M, bytes: &[u8]) -> u32 {
        let mut done = 0usize;
        for &(addr, len) in &self.writable {
            if done == bytes.len() {
                break;
            }
            let take = len.min(bytes.len() - done);
            // Ranges were checked in `parse`; a failure here means memory went away.
            if mem.write_slice(&bytes[done..done + take], addr).is_err() {
                break;
            }
            done += take;
        }
        u32::try_from(done).unwrap_or(u32::MAX)
    }
}

/// The status and reply bytes of one request (status byte first).
pub struct Response {
    bytes: Vec<u8>,
}

impl Response {
    fn status(status: Status) -> Self {
        Self {
            bytes: vec![status.raw()],
        }
    }

    fn with<H: WireStruct>(status: Status, header: H, entries: &[[u8; 16]]) -> Self {
        let mut bytes = vec![0u8; REPLY_OFFSET + H::SIZE + 16 * entries.len()];
        bytes[0] = status.raw();
        // The buffer was sized for the header above.
        let _ = header.encode(&mut bytes[REPLY_OFFSET..]);
        for (i, entry) in entries.iter().enumerate() {
            let at = REPLY_OFFSET + H::SIZE + 16 * i;
            bytes[at..at + 16].copy_from_slice(entry);
        }
        Self { bytes }
    }

    pub fn status_byte(&self) -> Status {
        Status::from_raw(self.bytes[0])
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

fn area_entries(areas: &[Area]) -> Vec<[u8; 16]> {
    areas
        .iter()
        .map(|a| a.to_bytes::<16>().unwrap_or([0; 16]))
        .collect()
}

/// E2BIG replies carry the needed count in `num`; other refusals are the status alone.
fn refused<H: WireStruct>(refusal: Refusal, header: impl FnOnce(u64) -> H) -> Response {
    match refusal.needed {
        Some(needed) => Response::with(refusal.status, header(needed), &[]),
        None => Response::status(refusal.status),
    }
}

/// Run one decoded request. `writable_len` is the size of the driver's reply buffer, status
/// byte included; replies never exceed it. Returns the reply and, when the command changed
/// a region (allocated, attached, detached, granted), what happened.
pub fn execute(
    regions: &Regions,
    request: Request,
    writable_len: u64,
) -> (Response, Option<IsmEvent>) {
    let mut event = None;
    let response = run_request(regions, request, writable_len, &mut event);
    if response.status_byte() != Status::Ok {
        event = None;
    }
    (response, event)
}

/// The size and writability of a region the device holds now.
fn held(regions: &Regions, token: Token) -> Option<(u64, bool)> {
    regions
        .lock()
        .region(token)
        .map(|region| (region.size, region.writable))
}

fn run_request(
    regions: &Regions,
    request: Request,
    writable_len: u64,
    event: &mut Option<IsmEvent>,
) -> Response {
    let area_capacity =
        |header: usize| reply_capacity(writable_len, header, Area::SIZE).unwrap_or(0);
    match request {
        Request::Alloc(req) => {
            if reply_capacity(writable_len, AllocReplyHeader::SIZE, Area::SIZE).is_none() {
                return Response::status(Status::Err);
            }
            match regions.alloc(req.size, area_capacity(AllocReplyHeader::SIZE)) {
                Ok((token, areas)) => {
                    *event = held(regions, token)
                        .map(|(size, _)| IsmEvent::RegionAllocated { token, size });
                    Response::with(
                        Status::Ok,
                        AllocReplyHeader {
                            token: token.0,
                            num: areas.len() as u64,
                        },
                        &area_entries(&areas),
                    )
                }
                Err(r) => refused(r, |num| AllocReplyHeader { token: 0, num }),
            }
        }
        Request::Attach(req) => {
            if reply_capacity(writable_len, AttachReplyHeader::SIZE, Area::SIZE).is_none() {
                return Response::status(Status::Err);
            }
            let capacity = area_capacity(AttachReplyHeader::SIZE);
            let token = Token(req.token);
            match regions.attach(token, u64::from(req.rw_perm), capacity, false) {
                Ok(areas) => {
                    *event =
                        held(regions, token).map(|(size, writable)| IsmEvent::RegionAttached {
                            token,
                            size,
                            writable,
                        });
                    Response::with(
                        Status::Ok,
                        AttachReplyHeader {
                            num: areas.len() as u64,
                        },
                        &area_entries(&areas),
                    )
                }
                Err(r) => refused(r, |num| AttachReplyHeader { num }),
            }
        }
        Request::Detach(req) => {
            let token = Token(req.token);
            *event = Some(IsmEvent::RegionDetached { token });
            outcome(regions.detach(token))
        }
        Request::GrantDefault(req) => {
            let token = Token(req.token);
            *event = Some(IsmEvent::RegionGranted {
                token,
                peer: None,
                perms: Perms(req.permissions),
            });
            outcome(regions.grant(token, GrantTarget::Default, req.permissions))
        }
        Request::GrantDevice(req) => {
            let (token, peer) = (Token(req.token), DevId(req.peer_devid));
            *event = Some(IsmEvent::RegionGranted {
                token,
                peer: Some(peer),
                perms: Perms(req.permissions),
            });
            outcome(regions.grant(token, GrantTarget::Device(peer), req.permissions))
        }
        Request::EventVector(req) => outcome(regions.set_vector(Token(req.token), req.vector)),
        Request::EventVectorPending(req) => outcome(regions.set_vector_pending(
            Token(req.token),
            req.vector,
            req.pending_addr,
            req.pending_bit,
        )),
        Request::QueryList => {
            let Some(capacity) = reply_capacity(writable_len, QueryListReplyHeader::SIZE, 8) else {
                return Response::status(Status::Err);
            };
            let tokens = regions.lock().tokens();
            let header = QueryListReplyHeader {
                num: tokens.len() as u64,
            };
            if tokens.len() as u64 > capacity {
                return Response::with(Status::TooBig, header, &[]);
            }
            let mut response = Response::with(Status::Ok, header, &[]);
            for token in tokens {
                response.bytes.extend_from_slice(&token.0.to_le_bytes());
            }
            response
        }
        Request::QueryRegion(req) => {
            let Some(capacity) =
                reply_capacity(writable_len, QueryRegionReplyHeader::SIZE, Area::SIZE)
            else {
                return Response::status(Status::Err);
            };
            let table = regions.lock();
            let Some(region) = table.region(Token(req.token)) else {
                return Response::status(Status::NoEnt);
            };
            let areas = table.areas(region);
            let header = QueryRegionReplyHeader {
                size: region.size,
                flags: RegionTable::flags(region),
                vector: region
                    .vector
                    .map_or(virtio_ism_proto::defs::VIRTIO_MSI_NO_VECTOR, u64::from),
                num: areas.len() as u64,
            };
            if areas.len() as u64 > capacity {
                return Response::with(Status::TooBig, header, &[]);
            }
            Response::with(Status::Ok, header, &area_entries(&areas))
        }
        Request::Unknown { .. } => Response::status(Status::Err),
    }
}

fn outcome(result: Result<(), Refusal>) -> Response {
    match result {
        Ok(()) => Response::status(Status::Ok),
        Err(r) => Response::status(r.status),
    }
}

/// What serving one chain did.
pub struct Served {
    /// Bytes written (the used length).
    pub used: u32,
    /// The status written; None when nothing could be written.
    pub status: Option<Status>,
    /// The region change the command made, if it succeeded and made one.
    pub event: Option<IsmEvent>,
}

/// Serve one chain: parse, execute, reply.
pub fn serve_chain<M, I>(mem: &M, descriptors: I, regions: &Regions, features: u64) -> Served
where
    M: GuestMemoryBackend,
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let Some(chain) = ParsedChain::parse(mem, descriptors) else {
        return Served {
            used: 0,
            status: None,
            event: None,
        };
    };
    let (response, event) = match chain.request(features) {
        // Guest memory is not touched while the request runs: it was copied out above and
        // the reply is written below.
        Ok(Request::EventVectorPending(req))
            if !mem.check_range(GuestAddress(req.pending_addr), 8) =>
        {
            debug!(
                "virtio-ism: pending bit at {:#x} is outside guest memory",
                req.pending_addr
            );
            (Response::status(Status::Err), None)
        }
        Ok(request) => {
            let (response, event) = execute(regions, request, chain.writable_len());
            // EAGAIN is an extension: a driver that did not negotiate it gets the draft's
            // generic failure (the command changed nothing either way).
            if response.status_byte() == Status::Again && features & bit(VIRTIO_ISM_F_EAGAIN) == 0 {
                (Response::status(Status::Err), None)
            } else {
                (response, event)
            }
        }
        Err(fault) => {
            debug!("virtio-ism: refusing control request: {fault:?}");
            (Response::status(Status::Err), None)
        }
    };
    let used = chain.write_reply(mem, response.bytes());
    Served {
        used,
        status: Some(response.status_byte()),
        event,
    }
}
