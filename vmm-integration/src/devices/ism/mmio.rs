// SPDX-License-Identifier: Apache-2.0
//! The MMIO handler behind the virtio-ism shared-memory BAR: what reaches userspace when
//! no KVM memory slot (or ioeventfd) takes the access.
//!
//! - region area (shmid 1): emulated mappings are served from the host mapping; writes to
//!   read-only memory are dropped and counted; where nothing is mapped, reads return
//!   all-ones (like an unclaimed PCI read) and writes are ignored.
//! - notify area (shmid 2): a write of any width rings the slot's doorbell through
//!   [`IsmHandle::handle_notify`] (the slow path, used when no ioeventfd covers the slot);
//!   reads return zeros.
//! - the padding after shmid 2 up to the power-of-two BAR size: as unmapped.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_ism::{IsmHandle, WindowLayout};
use vm_device::DeviceMmio;
use vm_device::bus::{MmioAddress, MmioAddressOffset};

use super::window::{ShmWindowKvm, WriteOutcome};

pub struct IsmWindowMmio {
    window: Arc<ShmWindowKvm>,
    handle: IsmHandle,
    layout: WindowLayout,
}

impl IsmWindowMmio {
    pub fn new(window: Arc<ShmWindowKvm>, handle: IsmHandle, layout: WindowLayout) -> Self {
        Self {
            window,
            handle,
            layout,
        }
    }

    fn notify_offset(&self, offset: u64) -> Option<u64> {
        offset
            .checked_sub(self.layout.notify_offset)
            .filter(|o| *o < self.layout.notify_len)
    }
}

impl DeviceMmio for IsmWindowMmio {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if offset < self.layout.shm_size {
            if !self.window.read(offset, data) {
                data.fill(0xff);
            }
        } else if self.notify_offset(offset).is_some() {
            data.fill(0);
        } else {
            self.window
                .counters()
                .unmapped_accesses
                .fetch_add(1, Ordering::Relaxed);
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if offset < self.layout.shm_size {
            if self.window.write(offset, data) == WriteOutcome::ReadOnlyDropped {
                log::debug!("ism window: dropped a guest write to read-only memory at {offset:#x}");
            }
        } else if let Some(slot_offset) = self.notify_offset(offset) {
            if self.handle.handle_notify(slot_offset).is_none() {
                log::debug!("ism window: doorbell write at {slot_offset:#x} hits no region");
            }
        } else {
            self.window
                .counters()
                .unmapped_accesses
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}
