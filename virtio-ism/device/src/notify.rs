// SPDX-License-Identifier: Apache-2.0
//! How a guest's doorbell write reaches its peers without a userspace hop.
//!
//! Per region the device picks a route for the notify slot of the region's first chunk (the
//! slot drivers ring) and asks the VMM to wire it through [`NotifyWiring`]:
//!
//! - **zero hop**: exactly one peer published a doorbell (its irqfd for the region's vector).
//!   The VMM registers a KVM ioeventfd on the slot with that eventfd: the guest's write
//!   raises the peer's interrupt inside the host kernel, neither VMM runs.
//! - **one hop**: several peers published doorbells. The slot's ioeventfd is the device's own
//!   eventfd; the device worker wakes and writes every peer doorbell (a hop in the sender's
//!   VMM, none in the receivers').
//! - **trap**: no peer doorbell, the VMM could not register (KVM limits), or no wiring at
//!   all. The write is an ordinary MMIO exit that the VMM hands to
//!   [`crate::IsmHandle::handle_notify`], which writes the peer doorbells and calls the
//!   [`crate::KickSink`].
//!
//! Fallbacks are counted in `kick_fallbacks`; semantics are the same on every route.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What became of a [`NotifyWiring::wire`] request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireOutcome {
    /// Guest writes to the slot now signal the eventfd in the kernel.
    Wired,
    /// The VMM is out of a resource (KVM ioeventfds per bus, and the like); the device falls
    /// back to a slower route and counts it. Writes to the slot must keep trapping.
    NoResources,
}

/// The VMM's side of the kick fast path: binding a notify slot of the device's
/// shared-memory window to an eventfd (with KVM: `KVM_IOEVENTFD` on the BAR address of the
/// slot, any access width, no datamatch).
///
/// Offsets are relative to the start of the window (the BAR), like [`crate::ShmWindow`]'s.
/// An implementation remembers the guest address it registered for each offset, so that
/// [`NotifyWiring::unwire`] after a BAR move removes the old registration; on a BAR move the
/// VMM calls [`crate::IsmHandle::rewire_all`] once the new base is in effect.
///
/// At most one wiring exists per offset: the device always unwires before wiring the same
/// offset again.
pub trait NotifyWiring: Send + Sync {
    /// Make guest writes of any width to `window_offset` signal `eventfd` (the implementation
    /// keeps its own duplicate). `len` is the slot's size (the notify size); a write
    /// elsewhere in the slot may still trap.
    fn wire(
        &self,
        window_offset: u64,
        len: u64,
        eventfd: BorrowedFd<'_>,
    ) -> io::Result<WireOutcome>;

    /// Undo [`NotifyWiring::wire`] at `window_offset`; writes there trap again.
    fn unwire(&self, window_offset: u64, len: u64) -> io::Result<()>;
}

/// An in-memory [`NotifyWiring`] for tests: remembers which eventfd each offset is wired to,
/// refuses beyond `capacity` wirings (as KVM refuses beyond its ioeventfd limit), and plays
/// the kernel's part with [`MemoryWiring::guest_write`].
///
/// ```
/// use std::os::fd::AsFd;
/// use virtio_ism::{MemoryWiring, NotifyWiring, WireOutcome};
///
/// let wiring = MemoryWiring::new(1);
/// let doorbell = rustix::event::eventfd(0, rustix::event::EventfdFlags::NONBLOCK).unwrap();
/// assert_eq!(wiring.wire(0x1000, 4, doorbell.as_fd()).unwrap(), WireOutcome::Wired);
/// // Out of room, as KVM would be: the device falls back to a slower route.
/// assert_eq!(wiring.wire(0x1004, 4, doorbell.as_fd()).unwrap(), WireOutcome::NoResources);
/// // The guest writes the slot: the eventfd fires without any userspace code in between.
/// assert!(wiring.guest_write(0x1000));
/// let mut count = [0u8; 8];
/// rustix::io::read(&doorbell, &mut count).unwrap();
/// assert_eq!(u64::from_ne_bytes(count), 1);
/// wiring.unwire(0x1000, 4).unwrap();
/// assert!(!wiring.guest_write(0x1000));
/// ```
#[derive(Debug)]
pub struct MemoryWiring {
    capacity: usize,
    wired: Mutex<BTreeMap<u64, OwnedFd>>,
    wire_calls: AtomicUsize,
}

impl MemoryWiring {
    /// A wiring that accepts at most `capacity` slots at once.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            wired: Mutex::new(BTreeMap::new()),
            wire_calls: AtomicUsize::new(0),
        }
    }

    /// How many times [`NotifyWiring::wire`] was called, successful or not.
    pub fn wire_calls(&self) -> usize {
        self.wire_calls.load(Ordering::Relaxed)
    }

    /// The guest wrote to `window_offset`: signal the wired eventfd as KVM would. Returns
    /// false when the offset is not wired (the write would trap to the VMM instead).
    pub fn guest_write(&self, window_offset: u64) -> bool {
        let wired = self.wired.lock().unwrap_or_else(|e| e.into_inner());
        match wired.get(&window_offset) {
            Some(fd) => {
                let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
                true
            }
            None => false,
        }
    }

    /// Offsets wired now.
    pub fn wired_offsets(&self) -> Vec<u64> {
        let wired = self.wired.lock().unwrap_or_else(|e| e.into_inner());
        wired.keys().copied().collect()
    }
}

impl NotifyWiring for MemoryWiring {
    fn wire(
        &self,
        window_offset: u64,
        _len: u64,
        eventfd: BorrowedFd<'_>,
    ) -> io::Result<WireOutcome> {
        self.wire_calls.fetch_add(1, Ordering::Relaxed);
        let mut wired = self.wired.lock().unwrap_or_else(|e| e.into_inner());
        if wired.contains_key(&window_offset) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "Slot is already wired",
            ));
        }
        if wired.len() >= self.capacity {
            return Ok(WireOutcome::NoResources);
        }
        wired.insert(window_offset, eventfd.as_fd().try_clone_to_owned()?);
        Ok(WireOutcome::Wired)
    }

    fn unwire(&self, window_offset: u64, _len: u64) -> io::Result<()> {
        let mut wired = self.wired.lock().unwrap_or_else(|e| e.into_inner());
        wired
            .remove(&window_offset)
            .map(drop)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "Slot is not wired"))
    }
}
