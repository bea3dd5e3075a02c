// SPDX-License-Identifier: Apache-2.0
//! The event queue (extension `VIRTIO_ISM_F_EVENT_QUEUE`), driver side: a ring of 40-byte
//! device-writable buffers, each reposted as soon as its event is copied out, and the events
//! decoded and checked.

use virtio_ism_proto::defs::queues::EVENT_QUEUE_INDEX;
use virtio_ism_proto::{Event, EventType, WireStruct};

use super::error::{IsmError, ProtocolError};
use super::region::WindowGeometry;
use crate::platform::{DmaRegion, Platform};
use crate::virtio::{Buffer, MAX_QUEUE_SIZE, SplitQueue, VirtioPciDevice};

/// Entries of the event queue; every one holds a posted buffer.
pub const EVENT_QUEUE_SIZE: u16 = 16;
/// Bytes between event buffers.
const STRIDE: usize = 64;
const NO_SLOT: u16 = u16::MAX;

/// One event from the device, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsmEvent {
    /// A grant on a held region changed.
    Update {
        /// The region.
        token: u64,
        /// Offset of its first area in shmid 1.
        offset: u64,
    },
    /// A peer attached a held region.
    Attach {
        /// The region.
        token: u64,
        /// Offset of its first area in shmid 1.
        offset: u64,
        /// The peer's device id.
        peer: u64,
        /// Other holders known after the event.
        peers: u64,
    },
    /// A peer detached a held region (or went away).
    Detach {
        /// The region.
        token: u64,
        /// Offset of its first area in shmid 1.
        offset: u64,
        /// The peer's device id.
        peer: u64,
        /// Other holders known after the event.
        peers: u64,
    },
    /// The host took the region away; it is already unmapped. Forget the `Region`.
    Revoke {
        /// The region.
        token: u64,
        /// Offset its first area had in shmid 1.
        offset: u64,
    },
    /// The host attached a region to this device; `query_region` describes it.
    RegionAdded {
        /// The region.
        token: u64,
        /// Offset of its first area in shmid 1.
        offset: u64,
    },
    /// Events were dropped; re-sync with `query_list`.
    Overflow,
}

impl IsmEvent {
    /// Decode and check one event: a known type, a non-zero token, an offset naming a chunk of
    /// shmid 1 and, for peer events, the peer's id.
    pub fn decode(raw: &Event, geometry: &WindowGeometry) -> Result<Self, ProtocolError> {
        let kind = raw.kind();
        if kind == EventType::Overflow {
            return Ok(Self::Overflow);
        }
        if let EventType::Unknown(other) = kind {
            return Err(ProtocolError::UnknownEvent(other));
        }
        if raw.token == 0 {
            return Err(ProtocolError::ZeroToken);
        }
        if !geometry.is_chunk(raw.offset) {
            return Err(ProtocolError::EventOffset(raw.offset));
        }
        let (token, offset) = (raw.token, raw.offset);
        let peer_event = || {
            if raw.devid == 0 {
                Err(ProtocolError::EventNoPeer)
            } else {
                Ok((raw.devid, raw.peers))
            }
        };
        Ok(match kind {
            EventType::Update => Self::Update { token, offset },
            EventType::Attach => {
                let (peer, peers) = peer_event()?;
                Self::Attach {
                    token,
                    offset,
                    peer,
                    peers,
                }
            }
            EventType::Detach => {
                let (peer, peers) = peer_event()?;
                Self::Detach {
                    token,
                    offset,
                    peer,
                    peers,
                }
            }
            EventType::Revoke => Self::Revoke { token, offset },
            EventType::RegionAdded => Self::RegionAdded { token, offset },
            EventType::Overflow | EventType::Unknown(_) => unreachable!("handled above"),
        })
    }
}

/// The event queue with its buffers.
pub(crate) struct EventQueue {
    queue: SplitQueue,
    buffers: DmaRegion,
    /// Buffer slot of each descriptor head in flight.
    slot_of_head: [u16; MAX_QUEUE_SIZE as usize],
}

impl EventQueue {
    /// Allocate the queue and one buffer per entry.
    pub fn new<P: Platform>(platform: &P) -> Result<Self, IsmError> {
        let queue = SplitQueue::new(platform, EVENT_QUEUE_SIZE)?;
        let buffers = platform
            .dma_alloc(usize::from(EVENT_QUEUE_SIZE) * STRIDE, 64)
            .ok_or(IsmError::NoDmaMemory)?;
        Ok(Self {
            queue,
            buffers,
            slot_of_head: [NO_SLOT; MAX_QUEUE_SIZE as usize],
        })
    }

    pub fn queue(&self) -> &SplitQueue {
        &self.queue
    }

    fn post(&mut self, slot: u16) -> Result<(), IsmError> {
        let head = self.queue.add(&[Buffer {
            addr: self.buffers.phys() + u64::from(slot) * STRIDE as u64,
            len: Event::SIZE as u32,
            device_writable: true,
        }])?;
        self.slot_of_head[usize::from(head)] = slot;
        Ok(())
    }

    fn kick<P: Platform>(&self, transport: &VirtioPciDevice<'_, P>) -> Result<(), IsmError> {
        if self.queue.should_notify() {
            transport.notify(EVENT_QUEUE_INDEX)?;
        }
        Ok(())
    }

    /// Post every buffer (after DRIVER_OK).
    pub fn fill<P: Platform>(
        &mut self,
        transport: &VirtioPciDevice<'_, P>,
    ) -> Result<(), IsmError> {
        for slot in 0..EVENT_QUEUE_SIZE {
            self.post(slot)?;
        }
        self.kick(transport)
    }

    /// Take the next event, if the device delivered one. The buffer is reposted before the
    /// event is checked, so a bad event does not cost a buffer.
    pub fn poll<P: Platform>(
        &mut self,
        transport: &VirtioPciDevice<'_, P>,
        geometry: &WindowGeometry,
    ) -> Result<Option<IsmEvent>, IsmError> {
        let Some(used) = self.queue.pop_used()? else {
            return Ok(None);
        };
        let slot = core::mem::replace(&mut self.slot_of_head[usize::from(used.head)], NO_SLOT);
        if slot == NO_SLOT {
            return Err(ProtocolError::EventHead(used.head).into());
        }
        let mut raw = [0u8; Event::SIZE];
        self.buffers
            .read_bytes(usize::from(slot) * STRIDE, &mut raw);
        self.post(slot)?;
        self.kick(transport)?;
        if used.len as usize != Event::SIZE {
            return Err(ProtocolError::EventLength(used.len).into());
        }
        let event = Event::decode(&raw).map_err(|_| ProtocolError::EventLength(used.len))?;
        Ok(Some(IsmEvent::decode(&event, geometry)?))
    }
}
