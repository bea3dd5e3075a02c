// SPDX-License-Identifier: Apache-2.0
//! The control queue, driver side: one request in flight at a time, in a DMA buffer laid out
//! as `[request (device-readable) | status + reply (device-writable)]`.
//!
//! The reply is copied out of DMA memory once, within the used length, before anything looks
//! at it; the used length itself was checked by the queue against what was offered.

use virtio_ism_proto::ctrl::reply_len;
use virtio_ism_proto::{
    Area, QueryListReplyHeader, QueryRegionReplyHeader, Request, Status, WireStruct,
};

use super::error::{IsmError, Perm, ProtocolError};
use super::region::MAX_AREAS;
use crate::platform::{DmaRegion, Platform};
use crate::virtio::{Buffer, SplitQueue, VirtioPciDevice};

/// Entries of the control queue (one request is in flight at a time).
pub const CTRL_QUEUE_SIZE: u16 = 8;
/// Most tokens QUERY_LIST returns through this driver.
pub const MAX_LIST_TOKENS: usize = 128;
/// Device-readable bytes reserved for a request (the largest is 2 + 24).
const REQUEST_ROOM: usize = 64;
/// Largest device-writable part the driver offers: status + the largest reply it accepts.
pub(crate) const REPLY_ROOM: usize = max(
    reply_len(QueryRegionReplyHeader::SIZE, Area::SIZE, MAX_AREAS),
    reply_len(QueryListReplyHeader::SIZE, 8, MAX_LIST_TOKENS),
);

const fn max(a: usize, b: usize) -> usize {
    if a > b { a } else { b }
}

/// A completed request, copied out of DMA memory.
pub(crate) struct Reply {
    /// The status byte, decoded.
    pub status: Status,
    /// Bytes the device wrote (status included), at most what was offered.
    pub used: usize,
    bytes: [u8; REPLY_ROOM],
}

impl Reply {
    /// The reply after the status byte, as far as the device wrote it.
    pub fn body(&self) -> &[u8] {
        &self.bytes[1..self.used]
    }

    /// Fail unless the device wrote at least `len` reply bytes after the status byte.
    pub fn need(&self, len: usize) -> Result<&[u8], ProtocolError> {
        if self.used < 1 + len {
            return Err(ProtocolError::ShortReply {
                used: self.used as u32,
                needed: 1 + len,
            });
        }
        Ok(self.body())
    }

    /// The status as a result: Ok for OK, the typed error otherwise. E2BIG is handled by the
    /// callers that expect it; anywhere else it is a protocol violation.
    pub fn check(&self) -> Result<(), IsmError> {
        status_result(self.status)
    }
}

/// Map a status to the driver's result.
pub(crate) fn status_result(status: Status) -> Result<(), IsmError> {
    match status {
        Status::Ok => Ok(()),
        Status::NoEnt => Err(IsmError::NoEntry),
        Status::NoSpc => Err(IsmError::NoSpace),
        Status::NoMem => Err(IsmError::NoMem),
        Status::Again => Err(IsmError::Again),
        Status::PermAttach => Err(IsmError::Perm(Perm::Attach)),
        Status::PermRead => Err(IsmError::Perm(Perm::Read)),
        Status::PermWrite => Err(IsmError::Perm(Perm::Write)),
        Status::Err => Err(IsmError::DeviceError(status.raw())),
        Status::TooBig => Err(IsmError::Protocol(ProtocolError::UnexpectedTooBig)),
        Status::Unknown(raw) => Err(IsmError::Protocol(ProtocolError::UnknownStatus(raw))),
    }
}

/// The control queue and its request buffer.
pub(crate) struct CtrlQueue {
    queue: SplitQueue,
    buffer: DmaRegion,
    max_waits: u32,
    broken: bool,
}

impl CtrlQueue {
    /// Allocate the queue and its buffer.
    pub fn new<P: Platform>(platform: &P, max_waits: u32) -> Result<Self, IsmError> {
        let queue = SplitQueue::new(platform, CTRL_QUEUE_SIZE)?;
        let buffer = platform
            .dma_alloc(REQUEST_ROOM + REPLY_ROOM, 64)
            .ok_or(IsmError::NoDmaMemory)?;
        Ok(Self {
            queue,
            buffer,
            max_waits,
            broken: false,
        })
    }

    pub fn queue(&self) -> &SplitQueue {
        &self.queue
    }

    /// Send `request` with `writable` device-writable bytes (status included, at most
    /// [`REPLY_ROOM`]) and wait for its completion, polling with the platform's `wait`.
    pub fn execute<P: Platform>(
        &mut self,
        platform: &P,
        transport: &VirtioPciDevice<'_, P>,
        request: &Request,
        writable: usize,
    ) -> Result<Reply, IsmError> {
        if self.broken {
            return Err(IsmError::Broken);
        }
        if writable == 0 || writable > REPLY_ROOM {
            return Err(IsmError::Unsupported);
        }
        let mut out = [0u8; REQUEST_ROOM];
        let len = request
            .encode(&mut out)
            .map_err(|_| IsmError::Unsupported)?;
        // The buffer is 64-aligned; whole words keep the copy simple.
        for (i, word) in out.chunks_exact(8).enumerate() {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(word);
            self.buffer.write_u64(8 * i, u64::from_le_bytes(raw));
        }
        let phys = self.buffer.phys();
        let head = self.queue.add(&[
            Buffer {
                addr: phys,
                len: len as u32,
                device_writable: false,
            },
            Buffer {
                addr: phys + REQUEST_ROOM as u64,
                len: writable as u32,
                device_writable: true,
            },
        ])?;
        if self.queue.should_notify() {
            transport.notify(virtio_ism_proto::defs::queues::CTRL_QUEUE_INDEX)?;
        }
        for _ in 0..self.max_waits {
            let Some(used) = self.queue.pop_used()? else {
                platform.wait();
                continue;
            };
            if used.head != head {
                // Only one request is ever in flight, so the queue's own checks make this
                // unreachable; stay safe if they change.
                self.broken = true;
                return Err(ProtocolError::UnexpectedHead {
                    expected: head,
                    got: used.head,
                }
                .into());
            }
            // pop_used checked used.len <= writable.
            let used = used.len as usize;
            let mut bytes = [0u8; REPLY_ROOM];
            self.buffer.read_bytes(REQUEST_ROOM, &mut bytes[..used]);
            if used == 0 {
                return Err(ProtocolError::ShortReply { used: 0, needed: 1 }.into());
            }
            return Ok(Reply {
                status: Status::from_raw(bytes[0]),
                used,
                bytes,
            });
        }
        // The request stays in flight and its buffer may still be written: stop here.
        self.broken = true;
        Err(IsmError::Timeout)
    }
}
