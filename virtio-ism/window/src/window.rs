// SPDX-License-Identifier: Apache-2.0
//! The region area of the BAR: pool regions mapped into host VA and handed to the hypervisor
//! as memory slots.
//!
//! The region area (shmid 1) is reserved once in host VA as `PROT_NONE` anonymous memory;
//! attaching a region maps its memfd `MAP_SHARED | MAP_FIXED` over the reservation
//! (`PROT_READ` only for read-only grants) and gives the mapping to KVM as a memory slot at
//! `bar_base + offset` (`KVM_MEM_READONLY` for read-only grants). Detaching deletes the slot
//! and puts `PROT_NONE` back. Only pool region fds are ever mapped here; guest RAM never is.
//!
//! When KVM has no slot left (or refuses one, or cannot make read-only slots) the mapping is
//! kept but *emulated*: guest accesses exit as MMIO and [`SlotWindow::read`] /
//! [`SlotWindow::write`] serve them from the host mapping. Slower, same semantics; counted.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, warn};
use virtio_ism::{Reservation, ShmWindow};

const PAGE_SIZE: u64 = 4096;

/// The hypervisor's memory-slot operations the window needs (KVM_SET_USER_MEMORY_REGION and
/// a slot-number allocator), behind a trait so each VMM plugs in its own and the bookkeeping
/// is testable without /dev/kvm.
pub trait SlotBackend: Send + Sync {
    /// A free slot number, or `None` when the hypervisor has no more.
    fn allocate_slot(&self) -> Option<u32>;
    /// Give back a slot from [`SlotBackend::allocate_slot`] (already deleted).
    fn free_slot(&self, slot: u32);
    /// Make `len` bytes of host memory at `host_addr` guest memory at `gpa`, as `slot`.
    fn add_slot(
        &self,
        slot: u32,
        gpa: u64,
        len: u64,
        host_addr: u64,
        readonly: bool,
    ) -> io::Result<()>;
    /// Delete `slot`, placed at `gpa` with `len` bytes of host memory at `host_addr` (KVM
    /// needs only the slot number; other hypervisors want the rest).
    fn remove_slot(&self, slot: u32, gpa: u64, len: u64, host_addr: u64) -> io::Result<()>;
    /// Whether read-only slots exist (KVM_CAP_READONLY_MEM).
    fn readonly_supported(&self) -> bool;
}

/// Window counters, reported with the device's own.
#[derive(Debug, Default)]
pub struct WindowCounters {
    /// Region mappings now served by KVM memory slots.
    pub slot_mappings: AtomicU64,
    /// Region mappings now served by MMIO emulation (no slot could be had).
    pub emulated_mappings: AtomicU64,
    /// Times a mapping fell back to emulation (KVM slots exhausted or refused).
    pub slot_fallbacks: AtomicU64,
    /// Guest accesses served by emulation from the host mapping.
    pub emulated_accesses: AtomicU64,
    /// Guest writes to read-only region memory, dropped.
    pub readonly_writes_dropped: AtomicU64,
    /// Guest accesses to window parts where nothing is mapped.
    pub unmapped_accesses: AtomicU64,
}

impl WindowCounters {
    pub fn add_to(&self, counters: &mut virtio_device::Counters) {
        let get = |c: &AtomicU64| std::num::Wrapping(c.load(Ordering::Relaxed));
        counters.insert("window_slot_mappings", get(&self.slot_mappings));
        counters.insert("window_emulated_mappings", get(&self.emulated_mappings));
        counters.insert("window_slot_fallbacks", get(&self.slot_fallbacks));
        counters.insert("window_emulated_accesses", get(&self.emulated_accesses));
        counters.insert(
            "window_readonly_writes_dropped",
            get(&self.readonly_writes_dropped),
        );
        counters.insert("window_unmapped_accesses", get(&self.unmapped_accesses));
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn dec(c: &AtomicU64) {
    c.fetch_sub(1, Ordering::Relaxed);
}

/// One region mapping inside the window.
#[derive(Debug)]
struct Mapping {
    len: u64,
    writable: bool,
    /// `None`: emulated (accesses exit as MMIO).
    slot: Option<u32>,
}

#[derive(Debug, Default)]
struct State {
    /// Guest-physical base of the window (the BAR), once the transport placed it.
    base: Option<u64>,
    /// By window offset.
    mappings: BTreeMap<u64, Mapping>,
}

/// What a guest write into the region area became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    Written,
    ReadOnlyDropped,
    Unmapped,
}

/// [`ShmWindow`] on KVM (see the module doc).
pub struct SlotWindow {
    /// The `PROT_NONE` reservation of shmid 1, the only part regions go into.
    reservation: Reservation,
    backend: Arc<dyn SlotBackend>,
    state: Mutex<State>,
    counters: Arc<WindowCounters>,
}

impl SlotWindow {
    /// Reserve `len` bytes (the region area) of host VA.
    pub fn new(len: u64, backend: Arc<dyn SlotBackend>) -> io::Result<Self> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let reservation = Reservation::new(len)?;
        Ok(Self {
            reservation,
            backend,
            state: Mutex::new(State::default()),
            counters: Arc::new(WindowCounters::default()),
        })
    }

    pub fn counters(&self) -> &Arc<WindowCounters> {
        &self.counters
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The transport placed or moved the BAR to `new_base`: move every slot there. Every
    /// slot leaves the old place before any takes the new one (the ranges may overlap), and
    /// emulated mappings get another chance at a slot.
    pub fn relocate(&self, new_base: u64) {
        let mut state = self.lock();
        let old = state.base.replace(new_base);
        if old == Some(new_base) {
            return;
        }
        if let Some(old) = old {
            for (offset, m) in &state.mappings {
                if let Some(slot) = m.slot
                    && let Err(e) = self.backend.remove_slot(
                        slot,
                        old + offset,
                        m.len,
                        self.reservation.base() + offset,
                    )
                {
                    warn!(
                        "ism window: cannot delete slot {slot} at {:#x}: {e}",
                        old + offset
                    );
                }
            }
        }
        let readonly = self.backend.readonly_supported();
        for (offset, m) in state.mappings.iter_mut() {
            let was_emulated = m.slot.is_none();
            let slot = match m.slot {
                Some(slot) => Some(slot),
                None if m.writable || readonly => self.backend.allocate_slot(),
                None => None,
            };
            let Some(slot) = slot else { continue };
            let gpa = new_base + offset;
            let placed = self.backend.add_slot(
                slot,
                gpa,
                m.len,
                self.reservation.base() + offset,
                !m.writable,
            );
            match (placed, was_emulated) {
                (Ok(()), false) => {}
                (Ok(()), true) => {
                    m.slot = Some(slot);
                    dec(&self.counters.emulated_mappings);
                    inc(&self.counters.slot_mappings);
                }
                (Err(_), true) => self.backend.free_slot(slot),
                (Err(e), false) => {
                    warn!("ism window: cannot place slot {slot} at {gpa:#x} ({e}); emulating it");
                    self.backend.free_slot(slot);
                    m.slot = None;
                    inc(&self.counters.slot_fallbacks);
                    dec(&self.counters.slot_mappings);
                    inc(&self.counters.emulated_mappings);
                }
            }
        }
        debug!("ism window: base {old:x?} -> {new_base:#x}");
    }

    /// The mapping holding `[offset, offset + len)` whole, with its start.
    fn find(state: &State, offset: u64, len: u64) -> Option<(u64, &Mapping)> {
        let (start, m) = state.mappings.range(..=offset).next_back()?;
        let end = offset.checked_add(len)?;
        (end <= start + m.len).then_some((*start, m))
    }

    /// A guest read at `offset` that exited (emulated mapping, or nothing mapped). Returns
    /// false when nothing is mapped there (the caller decides what the guest reads).
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        let state = self.lock();
        if Self::find(&state, offset, data.len() as u64).is_none() {
            inc(&self.counters.unmapped_accesses);
            return false;
        }
        inc(&self.counters.emulated_accesses);
        // SAFETY: the bytes lie inside a live region mapping (checked under the state lock,
        // which unmap also takes), and the mapping is at least readable.
        unsafe { copy_from_host((self.reservation.base() + offset) as *const u8, data) };
        true
    }

    /// A guest write at `offset` that exited: a write to a read-only slot, an emulated
    /// mapping, or nothing mapped.
    pub fn write(&self, offset: u64, data: &[u8]) -> WriteOutcome {
        let state = self.lock();
        match Self::find(&state, offset, data.len() as u64) {
            None => {
                inc(&self.counters.unmapped_accesses);
                WriteOutcome::Unmapped
            }
            Some((_, m)) if !m.writable => {
                inc(&self.counters.readonly_writes_dropped);
                WriteOutcome::ReadOnlyDropped
            }
            Some(_) => {
                inc(&self.counters.emulated_accesses);
                // SAFETY: inside a live, writable region mapping (checked under the lock).
                unsafe { copy_to_host((self.reservation.base() + offset) as *mut u8, data) };
                WriteOutcome::Written
            }
        }
    }

    /// Whether the mapping at `offset` is served by a memory slot now (for tests and logs).
    pub fn slot_at(&self, offset: u64) -> Option<u32> {
        self.lock().mappings.get(&offset).and_then(|m| m.slot)
    }
}

/// Copy with the access width the guest used when it is a natural one, so a 4 or 8-byte
/// guest access stays one host access (peers may poll the same word).
///
/// # Safety
/// `src..src + data.len()` must be readable memory.
unsafe fn copy_from_host(src: *const u8, data: &mut [u8]) {
    let aligned = (src as usize).is_multiple_of(data.len().max(1));
    // SAFETY: per the function contract; the typed reads only happen when aligned.
    unsafe {
        match data.len() {
            2 if aligned => {
                data.copy_from_slice(&(src as *const u16).read_volatile().to_ne_bytes())
            }
            4 if aligned => {
                data.copy_from_slice(&(src as *const u32).read_volatile().to_ne_bytes())
            }
            8 if aligned => {
                data.copy_from_slice(&(src as *const u64).read_volatile().to_ne_bytes())
            }
            _ => {
                for (i, b) in data.iter_mut().enumerate() {
                    *b = src.add(i).read_volatile();
                }
            }
        }
    }
}

/// # Safety
/// `dst..dst + data.len()` must be writable memory.
unsafe fn copy_to_host(dst: *mut u8, data: &[u8]) {
    let aligned = (dst as usize).is_multiple_of(data.len().max(1));
    // SAFETY: per the function contract; the typed writes only happen when aligned, and the
    // slices have exactly the width converted.
    unsafe {
        match data.len() {
            2 if aligned => {
                (dst as *mut u16).write_volatile(u16::from_ne_bytes([data[0], data[1]]))
            }
            4 if aligned => (dst as *mut u32)
                .write_volatile(u32::from_ne_bytes(data.try_into().unwrap_or_default())),
            8 if aligned => (dst as *mut u64)
                .write_volatile(u64::from_ne_bytes(data.try_into().unwrap_or_default())),
            _ => {
                for (i, b) in data.iter().enumerate() {
                    dst.add(i).write_volatile(*b);
                }
            }
        }
    }
}

impl ShmWindow for SlotWindow {
    fn map(
        &self,
        window_offset: u64,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        len: u64,
        writable: bool,
    ) -> io::Result<()> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let end = window_offset.checked_add(len).ok_or_else(einval)?;
        if len == 0
            || !window_offset.is_multiple_of(PAGE_SIZE)
            || !len.is_multiple_of(PAGE_SIZE)
            || end > self.reservation.len()
        {
            return Err(einval());
        }
        let mut state = self.lock();
        let overlaps = state
            .mappings
            .range(..end)
            .next_back()
            .is_some_and(|(start, m)| start + m.len > window_offset);
        if overlaps {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        self.reservation
            .map(window_offset, fd, fd_offset, len, writable)?;
        let host = self.reservation.base() + window_offset;
        let mut slot = if writable || self.backend.readonly_supported() {
            self.backend.allocate_slot()
        } else {
            None
        };
        if let (Some(s), Some(base)) = (slot, state.base)
            && let Err(e) = self
                .backend
                .add_slot(s, base + window_offset, len, host, !writable)
        {
            warn!(
                "ism window: KVM refused slot {s} at {:#x}: {e}",
                base + window_offset
            );
            self.backend.free_slot(s);
            slot = None;
        }
        if slot.is_some() {
            inc(&self.counters.slot_mappings);
        } else {
            warn!(
                "ism window: no KVM memory slot for {len:#x} bytes at offset {window_offset:#x}; \
                 serving it by MMIO emulation"
            );
            inc(&self.counters.slot_fallbacks);
            inc(&self.counters.emulated_mappings);
        }
        debug!(
            "ism window: mapped {len:#x} bytes at {window_offset:#x} ({}, slot {slot:?})",
            if writable { "rw" } else { "ro" }
        );
        state.mappings.insert(
            window_offset,
            Mapping {
                len,
                writable,
                slot,
            },
        );
        Ok(())
    }

    fn unmap(&self, window_offset: u64, len: u64) -> io::Result<()> {
        let einval = || io::Error::from_raw_os_error(libc::EINVAL);
        let end = window_offset.checked_add(len).ok_or_else(einval)?;
        if end > self.reservation.len() {
            return Err(einval());
        }
        let mut state = self.lock();
        // Every mapping must lie wholly inside or wholly outside the range.
        let hit: Vec<u64> = state
            .mappings
            .iter()
            .filter(|(start, m)| **start < end && **start + m.len > window_offset)
            .map(|(start, _)| *start)
            .collect();
        let partial = hit.iter().any(|start| {
            let m = &state.mappings[start];
            *start < window_offset || start + m.len > end
        });
        if partial {
            return Err(einval());
        }
        if hit.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let base = state.base;
        for start in hit {
            let Some(m) = state.mappings.remove(&start) else {
                continue;
            };
            // The slot goes first, so the guest never reaches the PROT_NONE memory via KVM.
            match (m.slot, base) {
                (Some(slot), Some(base)) => {
                    if let Err(e) = self.backend.remove_slot(
                        slot,
                        base + start,
                        m.len,
                        self.reservation.base() + start,
                    ) {
                        warn!("ism window: cannot delete slot {slot}: {e}");
                    }
                    self.backend.free_slot(slot);
                    dec(&self.counters.slot_mappings);
                }
                (Some(slot), None) => {
                    self.backend.free_slot(slot);
                    dec(&self.counters.slot_mappings);
                }
                (None, _) => dec(&self.counters.emulated_mappings),
            }
            self.reservation.unmap(start, m.len)?;
        }
        Ok(())
    }
}

impl Drop for SlotWindow {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (start, m) in std::mem::take(&mut state.mappings) {
            if let (Some(slot), Some(base)) = (m.slot, state.base) {
                let _ = self.backend.remove_slot(
                    slot,
                    base + start,
                    m.len,
                    self.reservation.base() + start,
                );
                self.backend.free_slot(slot);
            }
        }
        // The reservation goes after this, with no KVM slot pointing into it any more.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{FakeKvm, memfd};
    use std::os::fd::AsFd;

    /// A 1 MiB window on `kvm`.
    fn window(kvm: &Arc<FakeKvm>) -> SlotWindow {
        SlotWindow::new(1 << 20, kvm.clone()).unwrap()
    }

    #[test]
    fn test_map_places_slots_at_bar_offsets_and_moves_them() {
        let kvm = Arc::new(FakeKvm::default());
        let w = window(&kvm);
        w.relocate(0x1_0000_0000);
        let rw = memfd(0x2000, 0xaa);
        let ro = memfd(0x1000, 0xbb);
        w.map(0x4000, rw.as_fd(), 0, 0x2000, true).unwrap();
        w.map(0x8000, ro.as_fd(), 0, 0x1000, false).unwrap();
        {
            let s = kvm.slots.lock().unwrap();
            assert_eq!(
                s[&2],
                (0x1_0000_4000, 0x2000, w.reservation.base() + 0x4000, false)
            );
            assert_eq!(
                s[&3],
                (0x1_0000_8000, 0x1000, w.reservation.base() + 0x8000, true)
            );
        }
        w.relocate(0x2_0000_0000);
        {
            let s = kvm.slots.lock().unwrap();
            assert_eq!(s[&2].0, 0x2_0000_4000);
            assert_eq!(s[&3].0, 0x2_0000_8000);
        }
        // A move by less than the window: no slot falls back for overlapping its old place.
        w.relocate(0x2_0000_4000);
        assert_eq!(kvm.slots.lock().unwrap()[&2].0, 0x2_0000_8000);
        assert_eq!(w.counters().slot_fallbacks.load(Ordering::Relaxed), 0);
        w.unmap(0x4000, 0x2000).unwrap();
        assert!(!kvm.slots.lock().unwrap().contains_key(&2));
        // The freed slot is reused, and unmapped memory is gone from the host view.
        let again = memfd(0x1000, 0xcc);
        w.map(0x0, again.as_fd(), 0, 0x1000, true).unwrap();
        assert_eq!(w.slot_at(0), Some(2));
        let mut buf = [0u8; 4];
        assert!(!w.read(0x4000, &mut buf));
    }

    #[test]
    fn test_overlapping_or_misaligned_maps_are_refused() {
        let kvm = Arc::new(FakeKvm::default());
        let w = window(&kvm);
        let fd = memfd(0x4000, 1);
        w.map(0x2000, fd.as_fd(), 0, 0x2000, true).unwrap();
        for (off, len) in [(0x1000, 0x2000), (0x3000, 0x1000), (0x0, 0x8000)] {
            assert_eq!(
                w.map(off, fd.as_fd(), 0, len, true)
                    .unwrap_err()
                    .raw_os_error(),
                Some(libc::EEXIST),
                "{off:#x}+{len:#x}"
            );
        }
        for (off, len) in [(0x100, 0x1000), (0x8000, 0x10), (0xff000, 0x2000), (0, 0)] {
            assert_eq!(
                w.map(off, fd.as_fd(), 0, len, true)
                    .unwrap_err()
                    .raw_os_error(),
                Some(libc::EINVAL)
            );
        }
        // Unmapping half a mapping is refused; the mapping stays whole.
        assert!(w.unmap(0x2000, 0x1000).is_err());
        assert!(w.unmap(0x6000, 0x1000).is_err());
        w.unmap(0x0, 0x8000).unwrap();
        assert!(kvm.slots.lock().unwrap().is_empty());
    }

    #[test]
    fn test_out_of_slots_falls_back_to_emulation() {
        let kvm = Arc::new(FakeKvm {
            limit: 1,
            ..Default::default()
        });
        let w = window(&kvm);
        w.relocate(0x1_0000_0000);
        let a = memfd(0x1000, 0x11);
        let b = memfd(0x1000, 0x22);
        w.map(0x0, a.as_fd(), 0, 0x1000, true).unwrap();
        w.map(0x1000, b.as_fd(), 0, 0x1000, true).unwrap();
        assert!(w.slot_at(0).is_some());
        assert_eq!(w.slot_at(0x1000), None);
        let c = w.counters();
        assert_eq!(c.slot_fallbacks.load(Ordering::Relaxed), 1);
        assert_eq!(c.emulated_mappings.load(Ordering::Relaxed), 1);
        // The emulated mapping reads and writes the region memory.
        let mut buf = [0u8; 4];
        assert!(w.read(0x1004, &mut buf));
        assert_eq!(buf, [0x22; 4]);
        assert_eq!(
            w.write(0x1004, &0xdead_beefu32.to_ne_bytes()),
            WriteOutcome::Written
        );
        let file = std::fs::File::from(b.try_clone().unwrap());
        let mut back = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 4).unwrap();
        assert_eq!(u32::from_ne_bytes(back), 0xdead_beef);
        // An access straddling the mapping's end is not served.
        assert!(!w.read(0x1ffe, &mut buf));
        // Once a slot is free again, the next placement gives the emulated mapping one.
        w.unmap(0x0, 0x1000).unwrap();
        w.relocate(0x2_0000_0000);
        assert!(w.slot_at(0x1000).is_some());
        assert_eq!(
            kvm.slots.lock().unwrap().values().next().unwrap().0,
            0x2_0000_1000
        );
        assert_eq!(c.emulated_mappings.load(Ordering::Relaxed), 0);
        assert_eq!(c.slot_mappings.load(Ordering::Relaxed), 1);
        w.unmap(0x1000, 0x1000).unwrap();
        assert_eq!(c.slot_mappings.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn test_readonly_writes_are_dropped_and_counted() {
        let kvm = Arc::new(FakeKvm {
            no_readonly: true,
            ..Default::default()
        });
        let w = window(&kvm);
        w.relocate(0x1_0000_0000);
        let fd = memfd(0x1000, 0x5a);
        w.map(0x0, fd.as_fd(), 0, 0x1000, false).unwrap();
        // No read-only slots: emulated, and the write is refused.
        assert_eq!(w.slot_at(0), None);
        assert_eq!(w.write(0x10, &[1, 2, 3, 4]), WriteOutcome::ReadOnlyDropped);
        let mut buf = [0u8; 4];
        assert!(w.read(0x10, &mut buf));
        assert_eq!(buf, [0x5a; 4]);
        assert_eq!(
            w.counters().readonly_writes_dropped.load(Ordering::Relaxed),
            1
        );
        assert_eq!(w.write(0x8000, &[1]), WriteOutcome::Unmapped);
    }

    #[test]
    fn test_refused_slot_on_move_falls_back() {
        let kvm = Arc::new(FakeKvm::default());
        let w = window(&kvm);
        let fd = memfd(0x1000, 7);
        // Mapped before the BAR is placed: the slot is kept and placed by relocate.
        w.map(0x0, fd.as_fd(), 0, 0x1000, true).unwrap();
        assert!(kvm.slots.lock().unwrap().is_empty());
        w.relocate(0x1_0000_0000);
        assert_eq!(kvm.slots.lock().unwrap()[&2].0, 0x1_0000_0000);
        let refusing = Arc::new(FakeKvm {
            refuse: true,
            ..Default::default()
        });
        let w2 = window(&refusing);
        w2.relocate(0x1000_0000);
        w2.map(0x0, fd.as_fd(), 0, 0x1000, true).unwrap();
        assert_eq!(w2.slot_at(0), None);
        let mut buf = [0u8; 1];
        assert!(w2.read(0, &mut buf));
        assert_eq!(buf, [7]);
    }
}
