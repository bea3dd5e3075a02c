// SPDX-License-Identifier: Apache-2.0
//! Regions as the driver keeps them (token, size, validated areas) and access to their bytes
//! through the device's shared-memory window.
//!
//! Region memory is memory a peer can write at any time, so it is never a Rust slice: every
//! access is a volatile load or store through the [`Platform`], bounds-checked against the
//! region, and a region made of several areas is walked piece by piece.

use virtio_ism_proto::Area;
use virtio_ism_proto::ctrl::decode_areas;

use super::error::{IsmError, ProtocolError};
use crate::platform::{Platform, Width};

/// Most areas one region may have in this driver (its bookkeeping is fixed-size, no heap).
pub const MAX_AREAS: usize = 64;
/// Area sizes are multiples of this.
pub const PAGE_SIZE: u64 = 4096;

/// Where shmid 1 and shmid 2 are and how they are cut, validated at setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowGeometry {
    /// Guest-physical address of shmid 1 (the regions).
    pub regions_addr: u64,
    /// Length of shmid 1.
    pub regions_len: u64,
    /// Guest-physical address of shmid 2 (the notify area).
    pub notify_addr: u64,
    /// Length of shmid 2.
    pub notify_len: u64,
    /// Allocation granule of shmid 1.
    pub chunk_size: u64,
    /// Notify bytes per chunk.
    pub notify_size: u64,
}

impl WindowGeometry {
    /// Check areas the device returned for one region and copy them: `num` in 1..=`capacity`
    /// (capacity at most [`MAX_AREAS`]), each non-empty, page-sized, chunk-aligned and inside
    /// shmid 1, all but the last whole chunks, no two overlapping. Returns the areas and their
    /// total size.
    pub(crate) fn check_areas(
        &self,
        raw: &[u8],
        num: u64,
        capacity: usize,
    ) -> Result<([Area; MAX_AREAS], usize, u64), ProtocolError> {
        let capacity = capacity.min(MAX_AREAS);
        if num == 0 || num > capacity as u64 {
            return Err(ProtocolError::AreaCount { num, capacity });
        }
        let iter =
            decode_areas(raw, num).map_err(|_| ProtocolError::AreaCount { num, capacity })?;
        let mut areas = [Area::default(); MAX_AREAS];
        let count = num as usize;
        let mut total = 0u64;
        for (index, area) in iter.enumerate() {
            if area.size == 0 || !area.size.is_multiple_of(PAGE_SIZE) {
                return Err(ProtocolError::AreaSize {
                    offset: area.offset,
                    size: area.size,
                });
            }
            if !area.offset.is_multiple_of(self.chunk_size) {
                return Err(ProtocolError::AreaMisaligned(area.offset));
            }
            if area
                .offset
                .checked_add(area.size)
                .is_none_or(|end| end > self.regions_len)
            {
                return Err(ProtocolError::AreaOutsideWindow {
                    offset: area.offset,
                    size: area.size,
                    window: self.regions_len,
                });
            }
            if index + 1 < count && !area.size.is_multiple_of(self.chunk_size) {
                return Err(ProtocolError::PartialChunk { index });
            }
            for (other_index, other) in areas[..index].iter().enumerate() {
                // Both ranges are inside the window, so the ends cannot overflow.
                if area.offset < other.offset + other.size && other.offset < area.offset + area.size
                {
                    return Err(ProtocolError::AreasOverlap(other_index, index));
                }
            }
            areas[index] = area;
            // Each size is at most the window length, and there are at most MAX_AREAS of them.
            total += area.size;
        }
        Ok((areas, count, total))
    }

    /// Offset in shmid 2 of the doorbell of the chunk at shmid-1 `offset`, if it exists.
    pub(crate) fn notify_slot(&self, offset: u64) -> Option<u64> {
        let slot = (offset / self.chunk_size).checked_mul(self.notify_size)?;
        (slot.checked_add(1)? <= self.notify_len).then_some(slot)
    }

    /// Whether `offset` names a chunk of shmid 1.
    pub(crate) fn is_chunk(&self, offset: u64) -> bool {
        offset.is_multiple_of(self.chunk_size) && offset < self.regions_len
    }
}

/// A region mapped into this device's window: its token, its size and where its bytes are.
/// Only the driver creates these, from replies it validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    token: u64,
    size: u64,
    areas: [Area; MAX_AREAS],
    count: usize,
    writable: bool,
}

impl Region {
    pub(crate) fn new(
        token: u64,
        areas: [Area; MAX_AREAS],
        count: usize,
        size: u64,
        writable: bool,
    ) -> Self {
        Self {
            token,
            size,
            areas,
            count,
            writable,
        }
    }

    /// The region's token (what peers attach with).
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Size in bytes (a multiple of 4096).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The areas, in order: the region is their concatenation.
    pub fn areas(&self) -> &[Area] {
        &self.areas[..self.count]
    }

    /// Whether this device mapped it writable (false when not known to be).
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// Offset in shmid 1 of the first area: the region's key in events and for doorbells.
    pub fn first_offset(&self) -> u64 {
        self.areas[0].offset
    }
}

/// Access to the bytes of regions in one device's window.
pub struct RegionWindow<'p, P: Platform> {
    platform: &'p P,
    geometry: WindowGeometry,
}

impl<'p, P: Platform> RegionWindow<'p, P> {
    /// Access through `geometry`.
    ///
    /// # Safety
    /// `geometry` must describe the device's shared-memory window as validated at setup: the
    /// region and notify windows lie in the device's 64-bit memory BAR, which the platform
    /// reaches with `mmio_read`/`mmio_write`.
    pub(crate) unsafe fn new(platform: &'p P, geometry: WindowGeometry) -> Self {
        Self { platform, geometry }
    }

    /// The window layout.
    pub fn geometry(&self) -> &WindowGeometry {
        &self.geometry
    }

    /// Check `[offset, offset + len)` lies in `region` and every area of `region` in shmid 1
    /// (a region from another device's driver would not).
    fn check(&self, region: &Region, offset: u64, len: usize) -> Result<(), IsmError> {
        let len = len as u64;
        if offset.checked_add(len).is_none_or(|end| end > region.size) {
            return Err(IsmError::OutOfBounds {
                offset,
                len,
                size: region.size,
            });
        }
        let inside = region.areas().iter().all(|a| {
            a.offset
                .checked_add(a.size)
                .is_some_and(|end| end <= self.geometry.regions_len)
        });
        if inside {
            Ok(())
        } else {
            Err(IsmError::ForeignRegion)
        }
    }

    /// Call `f(window_address, range_in_buffer)` for each piece of `[offset, offset + len)` of
    /// `region`, in order. The range was checked.
    fn for_each_piece(
        &self,
        region: &Region,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, core::ops::Range<usize>),
    ) {
        let end = offset + len as u64;
        let mut area_start = 0u64;
        for area in region.areas() {
            let area_end = area_start + area.size;
            let lo = offset.max(area_start);
            let hi = end.min(area_end);
            if lo < hi {
                let addr = self.geometry.regions_addr + area.offset + (lo - area_start);
                let buf_lo = (lo - offset) as usize;
                let buf_hi = (hi - offset) as usize;
                f(addr, buf_lo..buf_hi);
            }
            area_start = area_end;
            if area_start >= end {
                break;
            }
        }
    }

    /// Copy `out.len()` bytes at `offset` of `region` out of shared memory.
    pub fn read(&self, region: &Region, offset: u64, out: &mut [u8]) -> Result<(), IsmError> {
        self.check(region, offset, out.len())?;
        self.for_each_piece(region, offset, out.len(), |addr, range| {
            // SAFETY: addr..addr + range.len() lies in an area of the region, inside shmid 1
            // (checked), which the constructor's caller vouched for.
            unsafe { copy_from_window(self.platform, addr, &mut out[range]) }
        });
        Ok(())
    }

    /// Copy `data` into shared memory at `offset` of `region`. Refused for regions not
    /// mapped writable (a store would fault).
    pub fn write(&self, region: &Region, offset: u64, data: &[u8]) -> Result<(), IsmError> {
        if !region.writable {
            return Err(IsmError::ReadOnly);
        }
        self.check(region, offset, data.len())?;
        self.for_each_piece(region, offset, data.len(), |addr, range| {
            // SAFETY: as in read; the region is mapped writable.
            unsafe { copy_to_window(self.platform, addr, &data[range]) }
        });
        Ok(())
    }

    /// One 8-byte volatile load at `offset` (8-aligned) of `region`: a single access, so a
    /// peer's single 8-byte store is seen whole.
    pub fn read_u64(&self, region: &Region, offset: u64) -> Result<u64, IsmError> {
        let addr = self.word_address(region, offset)?;
        // SAFETY: inside the region (checked by word_address).
        Ok(unsafe { self.platform.mmio_read(addr, Width::U64) })
    }

    /// One 8-byte volatile store at `offset` (8-aligned) of `region`.
    pub fn write_u64(&self, region: &Region, offset: u64, value: u64) -> Result<(), IsmError> {
        if !region.writable {
            return Err(IsmError::ReadOnly);
        }
        let addr = self.word_address(region, offset)?;
        // SAFETY: inside a writable region (checked).
        unsafe { self.platform.mmio_write(addr, Width::U64, value) };
        Ok(())
    }

    fn word_address(&self, region: &Region, offset: u64) -> Result<u64, IsmError> {
        if !offset.is_multiple_of(8) {
            return Err(IsmError::OutOfBounds {
                offset,
                len: 8,
                size: region.size,
            });
        }
        self.check(region, offset, 8)?;
        // Areas are page multiples, so an aligned word never straddles two.
        let mut address = 0;
        self.for_each_piece(region, offset, 8, |addr, _| address = addr);
        Ok(address)
    }

    /// Ring the doorbell of `region`: write to the notify slot of its first chunk.
    pub fn kick(&self, region: &Region) -> Result<(), IsmError> {
        self.check(region, 0, 0)?;
        let slot = self
            .geometry
            .notify_slot(region.first_offset())
            .ok_or(IsmError::ForeignRegion)?;
        // SAFETY: the slot lies inside shmid 2 (checked by notify_slot), device memory the
        // constructor's caller vouched for.
        unsafe {
            self.platform
                .mmio_write(self.geometry.notify_addr + slot, Width::U8, 1)
        };
        Ok(())
    }
}

/// Copy from window memory at `addr` with 8-byte loads where aligned, bytes elsewhere.
///
/// # Safety
/// `addr..addr + out.len()` must be mapped shared memory the platform can read.
unsafe fn copy_from_window<P: Platform>(platform: &P, mut addr: u64, out: &mut [u8]) {
    let mut i = 0;
    while i < out.len() {
        if addr.is_multiple_of(8) && out.len() - i >= 8 {
            // SAFETY: inside the range the caller vouched for, aligned.
            let v = unsafe { platform.mmio_read(addr, Width::U64) };
            out[i..i + 8].copy_from_slice(&v.to_le_bytes());
            i += 8;
            addr += 8;
        } else {
            // SAFETY: as above.
            out[i] = unsafe { platform.mmio_read(addr, Width::U8) } as u8;
            i += 1;
            addr += 1;
        }
    }
}

/// Copy into window memory at `addr` with 8-byte stores where aligned, bytes elsewhere.
///
/// # Safety
/// `addr..addr + data.len()` must be mapped writable shared memory.
unsafe fn copy_to_window<P: Platform>(platform: &P, mut addr: u64, data: &[u8]) {
    let mut i = 0;
    while i < data.len() {
        if addr.is_multiple_of(8) && data.len() - i >= 8 {
            let mut word = [0u8; 8];
            word.copy_from_slice(&data[i..i + 8]);
            // SAFETY: inside the range the caller vouched for, aligned.
            unsafe { platform.mmio_write(addr, Width::U64, u64::from_le_bytes(word)) };
            i += 8;
            addr += 8;
        } else {
            // SAFETY: as above.
            unsafe { platform.mmio_write(addr, Width::U8, data[i].into()) };
            i += 1;
            addr += 1;
        }
    }
}
