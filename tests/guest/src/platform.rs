// SPDX-License-Identifier: Apache-2.0
//! The driver core's `Platform` for this guest: ring-3 port I/O, identity-mapped MMIO (device
//! windows mapped on demand where the VMM placed them, paging.rs) and a bump allocator over a
//! static DMA pool.

use core::cell::{Cell, UnsafeCell};
use core::ptr::NonNull;

use ism_guest_driver::platform::Width;
use ism_guest_driver::{DmaRegion, Platform};

use crate::io;
use crate::paging::DeviceMap;
use crate::start_info::StartInfo;

const DMA_POOL_SIZE: usize = 1 << 20;

#[repr(C, align(4096))]
struct DmaPool(UnsafeCell<[u8; DMA_POOL_SIZE]>);

// SAFETY: the guest runs on one CPU and hands out each byte of the pool once.
unsafe impl Sync for DmaPool {}

/// Zeroed by the boot code with the rest of .bss.
static DMA_POOL: DmaPool = DmaPool(UnsafeCell::new([0; DMA_POOL_SIZE]));

/// The guest's platform. Only one may exist (it owns the DMA pool).
pub struct GuestPlatform {
    dma_next: Cell<usize>,
    devices: DeviceMap,
}

impl GuestPlatform {
    /// Take the platform.
    ///
    /// # Safety
    /// Call once: the DMA pool and the page-table pool are handed out from their starts.
    pub unsafe fn take(info: &StartInfo) -> Self {
        Self {
            dma_next: Cell::new(0),
            // SAFETY: the only call, from the only call of this function.
            devices: unsafe { DeviceMap::take(info) },
        }
    }

    /// Bytes of the DMA pool handed out.
    pub fn dma_used(&self) -> usize {
        self.dma_next.get()
    }
}

impl Platform for GuestPlatform {
    fn port_read_u8(&self, port: u16) -> u8 {
        io::inb(port)
    }
    fn port_read_u16(&self, port: u16) -> u16 {
        io::inw(port)
    }
    fn port_read_u32(&self, port: u16) -> u32 {
        io::inl(port)
    }
    fn port_write_u8(&self, port: u16, value: u8) {
        io::outb(port, value)
    }
    fn port_write_u16(&self, port: u16, value: u16) {
        io::outw(port, value)
    }
    fn port_write_u32(&self, port: u16, value: u32) {
        io::outl(port, value)
    }

    fn map_mmio(&self, base: u64, len: u64) -> bool {
        match self.devices.map(base, len) {
            Ok(()) => true,
            Err(e) => {
                report!("warn=map_mmio base={base:#x} len={len:#x} detail={e:?}");
                false
            }
        }
    }

    unsafe fn mmio_read(&self, addr: u64, width: Width) -> u64 {
        let ptr = addr as usize;
        // SAFETY: the caller guarantees device memory at addr; the identity map makes the
        // physical address a valid pointer.
        unsafe {
            match width {
                Width::U8 => (ptr as *const u8).read_volatile().into(),
                Width::U16 => (ptr as *const u16).read_volatile().into(),
                Width::U32 => (ptr as *const u32).read_volatile().into(),
                Width::U64 => (ptr as *const u64).read_volatile(),
            }
        }
    }

    unsafe fn mmio_write(&self, addr: u64, width: Width, value: u64) {
        let ptr = addr as usize;
        // SAFETY: as in mmio_read.
        unsafe {
            match width {
                Width::U8 => (ptr as *mut u8).write_volatile(value as u8),
                Width::U16 => (ptr as *mut u16).write_volatile(value as u16),
                Width::U32 => (ptr as *mut u32).write_volatile(value as u32),
                Width::U64 => (ptr as *mut u64).write_volatile(value),
            }
        }
    }

    fn dma_alloc(&self, len: usize, align: usize) -> Option<DmaRegion> {
        if !align.is_power_of_two() {
            return None;
        }
        let start = self.dma_next.get().checked_next_multiple_of(align)?;
        let end = start.checked_add(len)?;
        if end > DMA_POOL_SIZE {
            return None;
        }
        self.dma_next.set(end);
        let base = DMA_POOL.0.get().cast::<u8>();
        // SAFETY: start + len <= DMA_POOL_SIZE, so the pointer stays in the pool.
        let ptr = unsafe { base.add(start) };
        // SAFETY: the bytes [start, end) were never handed out before and are zero (.bss);
        // the identity map makes the virtual address the guest-physical address.
        Some(unsafe { DmaRegion::new(NonNull::new(ptr)?, ptr as u64, len) })
    }

    fn wait(&self) {
        for _ in 0..64 {
            core::hint::spin_loop();
        }
    }
}
