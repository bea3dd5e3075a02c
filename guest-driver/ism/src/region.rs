// SPDX-License-Identifier: Apache-2.0
//! A region mapped into this process.
//!
//! The memory is shared with other VMs, which may write it at any moment. Rust references
//! to plain bytes (`&[u8]`, `&mut [u8]`) promise that nobody else writes them while they
//! live, which a peer VM breaks, so this type never hands them out. It offers instead:
//! - [`Region::read_at`] / [`Region::write_at`]: copies with volatile accesses, which the
//!   compiler may neither elide, merge nor assume stable between two reads;
//! - [`Region::atomic_bytes`] / [`Region::atomic_u64`]: `&[AtomicU8]` / `&AtomicU64` views
//!   (atomics are interior-mutable, so concurrent writes by others are allowed), for flags
//!   and counters that need ordering. Only on writable mappings: a store through them on a
//!   read-only mapping would fault.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, AtomicU64};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::uapi;

/// A region held by a [`Device`]'s open file and mapped here. Dropping it unmaps it;
/// the file keeps holding the region until [`Region::detach`], [`Region::keep`] or close.
#[derive(Debug)]
pub struct Region<'d> {
    device: &'d Device,
    token: u64,
    flags: u32,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access is volatile
// or atomic, so using it from several threads is as sound as from one.
unsafe impl Send for Region<'_> {}
// SAFETY: as above; `&Region` only allows volatile or atomic access.
unsafe impl Sync for Region<'_> {}

impl<'d> Region<'d> {
    /// Map `len` bytes of the region described by `raw` (from ALLOC or ATTACH).
    pub(crate) fn map(device: &'d Device, raw: &uapi::virtio_ism_region) -> Result<Self> {
        let len = usize::try_from(raw.size).map_err(|_| Error::TooLarge { size: raw.size })?;
        let offset = libc::off_t::try_from(raw.map_offset)
            .map_err(|_| Error::TooLarge { size: raw.size })?;
        let writable = raw.region_flags & uapi::VIRTIO_ISM_REGION_F_WRITE != 0;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of the device file at a kernel-chosen address; it
        // overlaps no Rust object. The driver checks offset and length.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                device.raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Error::Map {
                token: raw.token,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or(Error::Map {
            token: raw.token,
            source: std::io::Error::other("mmap returned NULL"),
        })?;
        Ok(Self {
            device,
            token: raw.token,
            flags: raw.region_flags,
            ptr,
            len,
        })
    }

    /// The region's token: give it to peers so they can attach.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: regions are at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the mapping is writable.
    pub fn is_writable(&self) -> bool {
        self.flags & uapi::VIRTIO_ISM_REGION_F_WRITE != 0
    }

    /// Whether this device allocated the region.
    pub fn is_owner(&self) -> bool {
        self.flags & uapi::VIRTIO_ISM_REGION_F_OWNER != 0
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copy `buf.len()` bytes at `offset` out of the region.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: offset..offset+len lies inside the live mapping (checked above).
        unsafe { volatile_copy(self.ptr.as_ptr().add(offset), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copy `data` into the region at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<()> {
        if !self.is_writable() {
            return Err(Error::ReadOnly { token: self.token });
        }
        self.check(offset, data.len())?;
        // SAFETY: offset..offset+len lies inside the live, writable mapping (checked above).
        unsafe { volatile_copy(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len()) };
        Ok(())
    }

    /// The whole region as atomic bytes (writable mappings only).
    pub fn atomic_bytes(&self) -> Result<&[AtomicU8]> {
        if !self.is_writable() {
            return Err(Error::ReadOnly { token: self.token });
        }
        // SAFETY: the mapping is live for &self's lifetime, writable, and AtomicU8 has the
        // size and alignment of u8; atomics tolerate concurrent writers (peers).
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<AtomicU8>(), self.len) })
    }

    /// An atomic u64 at `offset`, which must be 8-aligned (writable mappings only).
    pub fn atomic_u64(&self, offset: usize) -> Result<&AtomicU64> {
        if !self.is_writable() {
            return Err(Error::ReadOnly { token: self.token });
        }
        self.check(offset, 8)?;
        if !offset.is_multiple_of(8) {
            return Err(Error::OutOfBounds {
                offset,
                len: 8,
                size: self.len,
            });
        }
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); live for &self.
        Ok(unsafe { &*self.ptr.as_ptr().add(offset).cast::<AtomicU64>() })
    }

    /// Signal every other holder that bound the region.
    pub fn kick(&self) -> Result<()> {
        self.device.kick(self.token)
    }

    /// Unmap, and let the driver keep holding the region after this file closes.
    pub fn keep(self) -> Result<()> {
        let (device, token) = (self.device, self.token);
        drop(self);
        device.keep(token)
    }

    /// Unmap and stop holding the region.
    pub fn detach(self) -> Result<()> {
        let (device, token) = (self.device, self.token);
        drop(self);
        device.detach(token)
    }
}

impl Drop for Region<'_> {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in `map`, unmapped only here.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Copy `len` bytes with volatile accesses, 8 bytes at a time where both sides allow.
///
/// # Safety
/// `src` must be valid for `len` bytes of reads and `dst` for `len` bytes of writes.
unsafe fn volatile_copy(src: *const u8, dst: *mut u8, len: usize) {
    let mut i = 0;
    if (src as usize) % 8 == (dst as usize) % 8 {
        while i < len && !(src as usize + i).is_multiple_of(8) {
            // SAFETY: i < len, per the caller's contract.
            unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
            i += 1;
        }
        while i + 8 <= len {
            // SAFETY: 8-aligned on both sides (same residue) and inside len.
            unsafe {
                let word = src.add(i).cast::<u64>().read_volatile();
                dst.add(i).cast::<u64>().write_volatile(word);
            }
            i += 8;
        }
    }
    while i < len {
        // SAFETY: i < len, per the caller's contract.
        unsafe { dst.add(i).write_volatile(src.add(i).read_volatile()) };
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A Device over a memfd: mmap at offset 0 works like the driver's, without the driver.
    fn memfd_device(size: usize) -> Device {
        // SAFETY: a NUL-terminated name; the fd is checked and then owned.
        let fd = unsafe { libc::memfd_create(c"ism-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is fresh and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fd is a valid memfd.
        let ret = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
        assert_eq!(ret, 0);
        Device::from_fd(fd)
    }

    fn raw(size: u64, flags: u32) -> uapi::virtio_ism_region {
        uapi::virtio_ism_region {
            token: 0xabc,
            size,
            region_flags: flags,
            ..Default::default()
        }
    }

    #[test]
    fn test_region_bounds_checked_reads_and_writes() {
        let dev = memfd_device(8192);
        let region = Region::map(&dev, &raw(8192, uapi::VIRTIO_ISM_REGION_F_WRITE)).unwrap();
        region.write_at(8190, b"hi").unwrap();
        let mut buf = [0u8; 2];
        region.read_at(8190, &mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        assert!(matches!(
            region.write_at(8191, b"hi"),
            Err(Error::OutOfBounds {
                offset: 8191,
                len: 2,
                size: 8192
            })
        ));
        assert!(region.read_at(usize::MAX, &mut buf).is_err());
        let counter = region.atomic_u64(16).unwrap();
        counter.fetch_add(5, std::sync::atomic::Ordering::SeqCst);
        let mut word = [0u8; 8];
        region.read_at(16, &mut word).unwrap();
        assert_eq!(u64::from_le_bytes(word), 5);
        assert!(region.atomic_u64(12).is_err());
        assert_eq!(region.atomic_bytes().unwrap().len(), 8192);
    }

    #[test]
    fn test_read_only_region_refuses_writes_and_atomics() {
        let dev = memfd_device(4096);
        let region = Region::map(&dev, &raw(4096, 0)).unwrap();
        assert!(!region.is_writable());
        assert!(matches!(
            region.write_at(0, b"x"),
            Err(Error::ReadOnly { token: 0xabc })
        ));
        assert!(region.atomic_bytes().is_err());
        assert!(region.atomic_u64(0).is_err());
        let mut buf = [1u8; 4];
        region.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn test_map_failure_is_a_typed_error() {
        let dev = Device::open("/dev/null").unwrap();
        assert!(matches!(
            Region::map(&dev, &raw(4096, 0)),
            Err(Error::Map { token: 0xabc, .. })
        ));
    }

    #[test]
    fn test_volatile_copy_every_alignment_and_length() {
        let src: Vec<u8> = (0..64u8).collect();
        for s in 0..9 {
            for d in 0..9 {
                for len in [0, 1, 7, 8, 9, 23, 40] {
                    let mut dst = vec![0xffu8; 64];
                    // SAFETY: s + len <= 64 and d + len <= 64 for these values.
                    unsafe { volatile_copy(src.as_ptr().add(s), dst.as_mut_ptr().add(d), len) };
                    assert_eq!(&dst[d..d + len], &src[s..s + len], "s={s} d={d} len={len}");
                    assert!(dst[..d].iter().all(|&b| b == 0xff));
                    assert!(dst[d + len..].iter().all(|&b| b == 0xff));
                }
            }
        }
    }
}
