// SPDX-License-Identifier: Apache-2.0
//! The whole shared-memory BAR of one virtio-ism device: where it sits, and what the VMM does
//! with the guest accesses that no memory slot or ioeventfd takes.
//!
//! - region area (shmid 1): emulated mappings are served from the host mapping; writes to
//!   read-only memory are dropped and counted; where nothing is mapped, reads return
//!   all-ones (like an unclaimed PCI read) and writes are ignored.
//! - notify area (shmid 2): a write of any width rings the slot's doorbell through
//!   [`IsmHandle::handle_notify`] (the slow path, used when no ioeventfd covers the slot);
//!   reads return zeros.
//! - the padding after shmid 2 up to the power-of-two BAR size: as unmapped.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use virtio_ism::{IsmHandle, NotifyWiring, ShmWindow, WindowLayout};

use crate::notify::{IoEventRegistrar, IoEventWiring};
use crate::window::{SlotBackend, SlotWindow, WriteOutcome};

/// One device's BAR: its region slots ([`SlotWindow`]), its doorbell ioeventfds
/// ([`IoEventWiring`]) and its trapped accesses.
///
/// Made before the device (the device maps through [`IsmBar::window`] and wires through
/// [`IsmBar::wiring`]); [`IsmBar::set_handle`] then connects trapped doorbells to the device.
pub struct IsmBar {
    layout: WindowLayout,
    window: Arc<SlotWindow>,
    wiring: Arc<IoEventWiring>,
    handle: OnceLock<IsmHandle>,
    base: Mutex<Option<u64>>,
}

impl IsmBar {
    /// Reserve host VA for the region area of `layout` and prepare the doorbell wiring.
    pub fn new(
        layout: WindowLayout,
        slots: Arc<dyn SlotBackend>,
        ioevents: Arc<dyn IoEventRegistrar>,
    ) -> io::Result<Self> {
        Ok(Self {
            layout,
            window: Arc::new(SlotWindow::new(layout.shm_size, slots)?),
            wiring: Arc::new(IoEventWiring::new(ioevents)),
            handle: OnceLock::new(),
            base: Mutex::new(None),
        })
    }

    /// What the device maps regions through.
    pub fn window(&self) -> Arc<dyn ShmWindow> {
        self.window.clone()
    }

    /// What the device wires doorbells through.
    pub fn wiring(&self) -> Arc<dyn NotifyWiring> {
        self.wiring.clone()
    }

    /// The device's handle, for trapped doorbells and rewiring after moves. Set once.
    pub fn set_handle(&self, handle: IsmHandle) {
        let _ = self.handle.set(handle);
    }

    pub fn layout(&self) -> WindowLayout {
        self.layout
    }

    /// Where the BAR is, once placed.
    pub fn base(&self) -> Option<u64> {
        *self.base.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The BAR is at `base` now (its first placement, or the guest moved it): move every
    /// region slot, then every doorbell registration. Returns whether it moved.
    pub fn place(&self, base: u64) -> bool {
        let old = self
            .base
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(base);
        if old == Some(base) {
            return false;
        }
        self.window.relocate(base);
        self.wiring.set_base(base);
        let moved = old.is_some();
        if moved && let Some(handle) = self.handle.get() {
            // Every wired doorbell slot is registered at the old address.
            handle.rewire_all();
        }
        moved
    }

    fn notify_offset(&self, offset: u64) -> Option<u64> {
        offset
            .checked_sub(self.layout.notify_offset)
            .filter(|o| *o < self.layout.notify_len)
    }

    /// A guest read at `offset` in the BAR that exited to the VMM.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset < self.layout.shm_size {
            if !self.window.read(offset, data) {
                data.fill(0xff);
            }
        } else if self.notify_offset(offset).is_some() {
            data.fill(0);
        } else {
            self.count_unmapped();
            data.fill(0xff);
        }
    }

    /// A guest write at `offset` in the BAR that exited to the VMM.
    pub fn write(&self, offset: u64, data: &[u8]) {
        if offset < self.layout.shm_size {
            if self.window.write(offset, data) == WriteOutcome::ReadOnlyDropped {
                log::debug!("ism window: dropped a guest write to read-only memory at {offset:#x}");
            }
        } else if let Some(slot_offset) = self.notify_offset(offset) {
            let kicked = self.handle.get().and_then(|h| h.handle_notify(slot_offset));
            if kicked.is_none() {
                log::debug!("ism window: doorbell write at {slot_offset:#x} hits no region");
            }
        } else {
            self.count_unmapped();
        }
    }

    fn count_unmapped(&self) {
        self.window
            .counters()
            .unmapped_accesses
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The BAR's counters, added to the device's.
    pub fn add_counters(&self, counters: &mut virtio_device::Counters) {
        self.window.counters().add_to(counters);
    }

    /// Whether the region at `offset` is served by a memory slot (for tests and logs).
    pub fn slot_at(&self, offset: u64) -> Option<u32> {
        self.window.slot_at(offset)
    }

    /// Doorbell registrations now, as (BAR offset, guest address).
    pub fn wired(&self) -> Vec<(u64, u64)> {
        self.wiring.wired()
    }
}
