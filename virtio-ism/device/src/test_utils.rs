// SPDX-License-Identifier: Apache-2.0
//! Test helpers for the device and for drivers tested against it (feature `test-utils`).

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{Reservation, ShmWindow};

/// A mapping: window offset, length, writable.
pub type Mapping = (u64, u64, bool);

/// A [`ShmWindow`] that maps region memory for real: a [`Reservation`] with pool memory
/// mapped over it, so what one device's window shows another's does too. It keeps a list of
/// what is mapped, so a test fails on an access outside a mapping rather than faulting.
pub struct MemWindow {
    reservation: Reservation,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// What is mapped now (unmapping part of a mapping keeps the rest).
    maps: Vec<Mapping>,
    /// The last `map` call.
    last: Option<Mapping>,
}

impl MemWindow {
    /// A window of `len` bytes with nothing mapped.
    pub fn new(len: u64) -> Arc<Self> {
        Arc::new(Self {
            reservation: Reservation::new(len).expect("reserving the test window"),
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the byte at `offset` is mapped.
    pub fn is_mapped(&self, offset: u64) -> bool {
        self.covered(offset, 1, false)
    }

    /// The last mapping the device asked for (it may be unmapped by now).
    pub fn last_map(&self) -> Mapping {
        self.lock().last.expect("nothing was mapped")
    }

    /// Whether one mapping holds all of `offset..offset + len` (and is writable, if `write`).
    fn covered(&self, offset: u64, len: u64, write: bool) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        self.lock()
            .maps
            .iter()
            .any(|&(o, l, w)| offset >= o && end <= o + l && (w || !write))
    }

    /// Host address of `offset..offset + len`. Panics unless one mapping holds the range
    /// (writable, if `write`).
    pub fn host(&self, offset: u64, len: u64, write: bool) -> *mut u8 {
        assert!(
            self.covered(offset, len, write),
            "window access {offset:#x}+{len:#x} (write {write}) outside a mapping"
        );
        (self.reservation.base() + offset) as *mut u8
    }

    /// Copy `data` into the window at `offset` (a writable mapping).
    pub fn write(&self, offset: u64, data: &[u8]) {
        let dst = self.host(offset, data.len() as u64, true);
        // SAFETY: `host` checked that a writable mapping holds the whole range.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
    }

    /// `len` bytes of the window at `offset` (a mapping).
    pub fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let src = self.host(offset, len as u64, false);
        let mut out = vec![0u8; len];
        // SAFETY: `host` checked that a readable mapping holds the whole range.
        unsafe { std::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), len) };
        out
    }
}

impl ShmWindow for MemWindow {
    fn map(
        &self,
        window_offset: u64,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        len: u64,
        writable: bool,
    ) -> io::Result<()> {
        let mut state = self.lock();
        self.reservation
            .map(window_offset, fd, fd_offset, len, writable)?;
        let mapping = (window_offset, len, writable);
        state.maps.push(mapping);
        state.last = Some(mapping);
        Ok(())
    }

    fn unmap(&self, window_offset: u64, len: u64) -> io::Result<()> {
        let mut state = self.lock();
        self.reservation.unmap(window_offset, len)?;
        let end = window_offset + len;
        let mut kept = Vec::new();
        for (o, l, w) in state.maps.drain(..) {
            if o + l <= window_offset || o >= end {
                kept.push((o, l, w));
                continue;
            }
            if o < window_offset {
                kept.push((o, window_offset - o, w));
            }
            if o + l > end {
                kept.push((end, o + l - end, w));
            }
        }
        state.maps = kept;
        Ok(())
    }
}
