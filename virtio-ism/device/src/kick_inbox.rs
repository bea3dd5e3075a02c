// SPDX-License-Identifier: Apache-2.0
//! Incoming kicks of regions bound with a pending bit (`VIRTIO_ISM_F_KICK_PENDING`): such a
//! region publishes an eventfd of its own as its doorbell instead of its vector's irqfd; the
//! worker watches those eventfds, sets the region's bit in driver memory, then raises the
//! vector. That costs one hop in the receiver's VMM and tells a driver whose regions share a
//! vector which region was kicked.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use log::warn;
use virtio_ism_pool_api::Token;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::regions::Region;

/// Where a region's kicks are recorded before its vector is raised.
pub struct PendingKick {
    /// Guest-physical address of the le64 word holding the bit (8-byte aligned).
    pub addr: u64,
    /// The bit, as a mask.
    pub mask: u64,
    /// Published to the pool as this device's doorbell for the region.
    pub inbox: EventFd,
    /// Watches `inbox`; the registration is removed when this is dropped, so a peer that
    /// still holds a duplicate of `inbox` never wakes the worker for a stale region.
    epoll: Arc<Epoll>,
}

impl fmt::Debug for PendingKick {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingKick")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("mask", &format_args!("{:#x}", self.mask))
            .finish()
    }
}

impl Drop for PendingKick {
    fn drop(&mut self) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.inbox.as_raw_fd(),
            EpollEvent::default(),
        );
    }
}

/// A kick the worker must record and raise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FiredKick {
    pub addr: u64,
    pub mask: u64,
    pub vector: u16,
}

/// The epoll set over every pending-bit region's inbox.
pub struct KickInbox {
    epoll: Arc<Epoll>,
}

impl KickInbox {
    pub fn new(epoll: Epoll) -> Self {
        Self {
            epoll: Arc::new(epoll),
        }
    }

    /// The epoll instance the worker waits on.
    pub fn epoll_fd(&self) -> i32 {
        self.epoll.as_raw_fd()
    }

    /// A fresh inbox for `token`, watched from now on.
    pub fn open(&self, token: Token, addr: u64, bit: u32) -> io::Result<PendingKick> {
        let inbox = EventFd::new(EFD_NONBLOCK)?;
        // Edge-triggered: each write by a peer is one wake-up, and a registration that
        // outlived its region (impossible while `PendingKick` removes it) could never spin.
        self.epoll.ctl(
            ControlOperation::Add,
            inbox.as_raw_fd(),
            EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, token.0),
        )?;
        Ok(PendingKick {
            addr,
            mask: 1u64 << bit,
            inbox,
            epoll: self.epoll.clone(),
        })
    }

    /// Consume every inbox that fired and say what to record and raise for it.
    pub fn take_fired(&self, regions: &BTreeMap<Token, Region>) -> Vec<FiredKick> {
        let mut events = [EpollEvent::default(); 32];
        let mut fired = Vec::new();
        loop {
            let ready = match self.epoll.wait(0, &mut events) {
                Ok(ready) => ready,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("virtio-ism: waiting on kick inboxes failed: {e}");
                    return fired;
                }
            };
            for event in &events[..ready] {
                let Some(region) = regions.get(&Token(event.data())) else {
                    continue;
                };
                let (Some(pending), Some(vector)) = (&region.pending, region.vector) else {
                    continue;
                };
                // Nothing to read: an earlier pass consumed this kick already.
                if pending.inbox.read().is_ok() {
                    fired.push(FiredKick {
                        addr: pending.addr,
                        mask: pending.mask,
                        vector,
                    });
                }
            }
            if ready < events.len() {
                return fired;
            }
        }
    }
}

/// Set `mask` in the le64 at guest-physical `addr`, atomically (the driver clears bits with
/// an atomic exchange while the device may be setting others). False if `addr` is not in
/// guest memory (any more) or not 8-byte aligned.
pub fn set_pending_bit<M: GuestMemoryBackend>(mem: &M, addr: u64, mask: u64) -> bool {
    let Ok(slice) = mem.get_slice(GuestAddress(addr), 8) else {
        return false;
    };
    let Ok(word) = slice.get_atomic_ref::<AtomicU64>(0) else {
        return false;
    };
    word.fetch_or(mask.to_le(), Ordering::SeqCst);
    slice.bitmap().mark_dirty(0, 8);
    true
}
