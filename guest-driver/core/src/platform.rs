// SPDX-License-Identifier: Apache-2.0
//! What the drivers need from their environment.

use core::ptr::NonNull;

/// The services a guest environment gives the drivers: port I/O, MMIO by guest-physical
/// address, DMA-able memory and a way to wait while polling a device.
///
/// The freestanding test guest implements it with `in`/`out` instructions and an identity
/// map; host unit tests implement it with in-memory fakes.
///
/// # Example
///
/// A platform with no ports and one 4-byte register, driven through a bounds-checked
/// [`MmioRegion`](crate::mmio::MmioRegion):
///
/// ```
/// use core::cell::Cell;
/// use ism_guest_driver::mmio::MmioRegion;
/// use ism_guest_driver::platform::{DmaRegion, Platform, Width};
///
/// struct OneRegister(Cell<u32>);
///
/// impl Platform for OneRegister {
///     fn port_read_u8(&self, _: u16) -> u8 { 0xff }
///     fn port_read_u16(&self, _: u16) -> u16 { 0xffff }
///     fn port_read_u32(&self, _: u16) -> u32 { u32::MAX }
///     fn port_write_u8(&self, _: u16, _: u8) {}
///     fn port_write_u16(&self, _: u16, _: u16) {}
///     fn port_write_u32(&self, _: u16, _: u32) {}
///     fn map_mmio(&self, base: u64, len: u64) -> bool { base == 0x1000 && len <= 4 }
///     unsafe fn mmio_read(&self, _: u64, _: Width) -> u64 { self.0.get().into() }
///     unsafe fn mmio_write(&self, _: u64, _: Width, value: u64) { self.0.set(value as u32) }
///     fn dma_alloc(&self, _: usize, _: usize) -> Option<DmaRegion> { None }
/// }
///
/// let platform = OneRegister(Cell::new(0));
/// // SAFETY: the "device" is the Cell above; nothing else lives at 0x1000.
/// let regs = unsafe { MmioRegion::new(&platform, 0x1000, 4) };
/// regs.write_u32(0, 0xabcd).unwrap();
/// assert_eq!(regs.read_u32(0).unwrap(), 0xabcd);
/// assert!(regs.read_u32(4).is_err()); // outside the window
/// assert!(regs.read_u16(1).is_err()); // unaligned
/// ```
pub trait Platform {
    /// Read a byte from an I/O port.
    fn port_read_u8(&self, port: u16) -> u8;
    /// Read a 16-bit word from an I/O port.
    fn port_read_u16(&self, port: u16) -> u16;
    /// Read a 32-bit word from an I/O port.
    fn port_read_u32(&self, port: u16) -> u32;
    /// Write a byte to an I/O port.
    fn port_write_u8(&self, port: u16, value: u8);
    /// Write a 16-bit word to an I/O port.
    fn port_write_u16(&self, port: u16, value: u16);
    /// Write a 32-bit word to an I/O port.
    fn port_write_u32(&self, port: u16, value: u32);

    /// Make `[base, base + len)`, a window the driver found in a BAR, usable as device memory:
    /// check that device registers or shared memory may live there (not RAM, so a device
    /// cannot point a BAR at memory the program uses) and, if the platform needs it, map it so
    /// that [`Platform::mmio_read`] / [`Platform::mmio_write`] (and, for shared-memory
    /// windows, plain pointers to the guest-physical address) reach it. False if the range is
    /// refused or cannot be mapped. Drivers call it before the first access to each window;
    /// calling it again for a range already mapped must be cheap and harmless.
    fn map_mmio(&self, base: u64, len: u64) -> bool;

    /// Read `N` bytes (1, 2, 4 or 8) of device memory at guest-physical `addr`, as one access.
    ///
    /// # Safety
    /// `addr..addr + N` must be device MMIO (or memory) the caller owns, naturally aligned.
    unsafe fn mmio_read(&self, addr: u64, width: Width) -> u64;
    /// Write the low `width` bytes of `value` to device memory at guest-physical `addr`.
    ///
    /// # Safety
    /// As for [`Platform::mmio_read`]; the write must not break memory the program uses.
    unsafe fn mmio_write(&self, addr: u64, width: Width, value: u64);

    /// Allocate `len` bytes of zeroed memory a device can reach by DMA, aligned to `align`
    /// (a power of two). Regions are never given back: drivers allocate once at setup.
    fn dma_alloc(&self, len: usize, align: usize) -> Option<DmaRegion>;

    /// Called while polling for device progress. It may spin briefly or halt until the next
    /// interrupt; either way it returns, and the caller polls again.
    fn wait(&self) {
        core::hint::spin_loop();
    }
}

/// Width of one MMIO access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// 1 byte.
    U8 = 1,
    /// 2 bytes.
    U16 = 2,
    /// 4 bytes.
    U32 = 4,
    /// 8 bytes.
    U64 = 8,
}

impl Width {
    /// Size of the access in bytes.
    pub const fn bytes(self) -> u64 {
        self as u64
    }
}

/// A zeroed block of DMA-able memory: a pointer for the driver and the guest-physical address
/// the device sees.
#[derive(Debug)]
pub struct DmaRegion {
    virt: NonNull<u8>,
    phys: u64,
    len: usize,
}

impl DmaRegion {
    /// Wrap an allocation.
    ///
    /// # Safety
    /// `virt` must be valid for reads and writes of `len` bytes for as long as the region
    /// (or anything made from it) is used, must not be used by anything else, and `phys` must
    /// be the address at which a device sees the same bytes.
    pub unsafe fn new(virt: NonNull<u8>, phys: u64, len: usize) -> Self {
        Self { virt, phys, len }
    }

    /// Guest-physical address of the first byte.
    pub fn phys(&self) -> u64 {
        self.phys
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn ptr_at(&self, offset: usize, size: usize) -> *mut u8 {
        // Offsets come from the drivers' own layout arithmetic, never from a device.
        assert!(
            offset.checked_add(size).is_some_and(|end| end <= self.len),
            "DMA access out of range"
        );
        // SAFETY: offset + size <= len, so the result stays inside the allocation.
        unsafe { self.virt.as_ptr().add(offset) }
    }

    /// Volatile read of a `u16` at `offset` (must be 2-aligned in the region).
    pub fn read_u16(&self, offset: usize) -> u16 {
        let ptr = self.ptr_at(offset, 2).cast::<u16>();
        // SAFETY: in range (checked above) and valid per the constructor contract; alignment
        // is the caller's layout duty, checked by read_volatile in debug builds.
        unsafe { ptr.read_volatile() }
    }

    /// Volatile read of a `u32` at `offset`.
    pub fn read_u32(&self, offset: usize) -> u32 {
        let ptr = self.ptr_at(offset, 4).cast::<u32>();
        // SAFETY: as in read_u16.
        unsafe { ptr.read_volatile() }
    }

    /// Volatile write of a `u16` at `offset`.
    pub fn write_u16(&self, offset: usize, value: u16) {
        let ptr = self.ptr_at(offset, 2).cast::<u16>();
        // SAFETY: as in read_u16.
        unsafe { ptr.write_volatile(value) }
    }

    /// Volatile write of a `u32` at `offset`.
    pub fn write_u32(&self, offset: usize, value: u32) {
        let ptr = self.ptr_at(offset, 4).cast::<u32>();
        // SAFETY: as in read_u16.
        unsafe { ptr.write_volatile(value) }
    }

    /// Volatile write of a `u64` at `offset`.
    pub fn write_u64(&self, offset: usize, value: u64) {
        let ptr = self.ptr_at(offset, 8).cast::<u64>();
        // SAFETY: as in read_u16.
        unsafe { ptr.write_volatile(value) }
    }

    /// Copy `out.len()` bytes starting at `offset` out of the region, byte by byte (volatile:
    /// the device may be writing concurrently, the copy is what gets used).
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) {
        let base = self.ptr_at(offset, out.len());
        for (i, byte) in out.iter_mut().enumerate() {
            // SAFETY: base..base + out.len() is inside the region (checked by ptr_at).
            *byte = unsafe { base.add(i).read_volatile() };
        }
    }

    /// Split off a sub-region of `len` bytes at `offset` for a separate use (e.g. a buffer
    /// next to a queue). The caller must not use the same bytes through both.
    pub fn sub_region(&self, offset: usize, len: usize) -> DmaRegion {
        let ptr = self.ptr_at(offset, len);
        DmaRegion {
            // SAFETY: ptr_at returned a pointer into a non-null allocation.
            virt: unsafe { NonNull::new_unchecked(ptr) },
            phys: self.phys + offset as u64,
            len,
        }
    }
}
