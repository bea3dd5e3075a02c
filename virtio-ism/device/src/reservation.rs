// SPDX-License-Identifier: Apache-2.0
//! The host side of a [`crate::ShmWindow`]: a `PROT_NONE` reservation of host address space
//! that region memory is mapped over and that takes the place of a region again when it
//! goes, so the window never has holes another host mapping could land in.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `len` bytes of host address space reserved `PROT_NONE` (anonymous, `MAP_NORESERVE`),
/// released on drop.
///
/// The reservation hands out addresses, never references: whoever reads or writes through
/// [`Reservation::base`] must know (from its own bookkeeping) that a mapping is there.
#[derive(Debug)]
pub struct Reservation {
    /// Host address of the first byte.
    base: u64,
    len: u64,
}

impl Reservation {
    /// Reserve `len` bytes at an address the kernel picks.
    pub fn new(len: u64) -> io::Result<Self> {
        let size = usize::try_from(len).map_err(|_| einval())?;
        if size == 0 {
            return Err(einval());
        }
        // SAFETY: a fresh anonymous PROT_NONE mapping at an address the kernel picks; it
        // touches no existing memory.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: addr as u64,
            len,
        })
    }

    /// Host address of the first reserved byte.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Reserved bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is reserved (never: [`Reservation::new`] refuses 0 bytes).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Map `len` bytes of `fd` from `fd_offset` shared at `offset`, replacing what was there
    /// (`PROT_READ`, plus `PROT_WRITE` when `writable`). On failure the range is reserved
    /// `PROT_NONE` again, since a failed `MAP_FIXED` may have removed the reservation.
    /// EINVAL when the range does not lie inside the reservation.
    pub fn map(
        &self,
        offset: u64,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        len: u64,
        writable: bool,
    ) -> io::Result<()> {
        let (addr, size) = self.range(offset, len)?;
        let file_offset = libc::off_t::try_from(fd_offset).map_err(|_| einval())?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: MAP_FIXED over a range inside our own reservation (checked by `range`), so
        // it replaces only memory this reservation owns; the fd is borrowed for the call.
        let mapped = unsafe {
            libc::mmap(
                addr,
                size,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            let err = io::Error::last_os_error();
            let _ = self.unmap(offset, len);
            return Err(err);
        }
        Ok(())
    }

    /// Put `PROT_NONE` reservation memory back over `[offset, offset + len)`. EINVAL when
    /// the range does not lie inside the reservation.
    pub fn unmap(&self, offset: u64, len: u64) -> io::Result<()> {
        let (addr, size) = self.range(offset, len)?;
        // SAFETY: MAP_FIXED over a range inside our own reservation (checked by `range`), so
        // it replaces only memory this reservation owns.
        let mapped = unsafe {
            libc::mmap(
                addr,
                size,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Host address and size of `[offset, offset + len)`, if it is a non-empty range inside
    /// the reservation.
    fn range(&self, offset: u64, len: u64) -> io::Result<(*mut libc::c_void, usize)> {
        let end = offset.checked_add(len).ok_or_else(einval)?;
        if len == 0 || end > self.len {
            return Err(einval());
        }
        // Both fit in usize: the reservation's length did.
        Ok(((self.base + offset) as *mut libc::c_void, len as usize))
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation made in `new` (and whatever was mapped over
        // it); nothing else lives in that range.
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len as usize) };
    }
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    const PAGE: u64 = 4096;

    fn memfd(len: u64, fill: u8) -> OwnedFd {
        // SAFETY: valid name and flags; returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"reservation-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: the fd was just created and nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let file = std::fs::File::from(fd.try_clone().unwrap());
        std::os::unix::fs::FileExt::write_all_at(&file, &vec![fill; len as usize], 0).unwrap();
        fd
    }

    /// Whether the page at `addr` is mapped at all (mincore fails with ENOMEM on holes).
    fn page_present(addr: u64) -> bool {
        let mut vec = 0u8;
        // SAFETY: mincore only inspects the page table for one page-aligned page and writes
        // one byte to `vec`.
        unsafe { libc::mincore(addr as *mut libc::c_void, PAGE as usize, &mut vec) == 0 }
    }

    #[test]
    fn test_map_shows_the_file_and_unmap_leaves_no_hole() {
        let r = Reservation::new(4 * PAGE).unwrap();
        let fd = memfd(PAGE, 0xab);
        r.map(2 * PAGE, fd.as_fd(), 0, PAGE, false).unwrap();
        // SAFETY: the page at 2 * PAGE is a readable mapping of the memfd (mapped above).
        let byte = unsafe { ((r.base() + 2 * PAGE + 17) as *const u8).read_volatile() };
        assert_eq!(byte, 0xab);
        r.unmap(2 * PAGE, PAGE).unwrap();
        // The range is reserved memory again, not a hole another mmap could take.
        assert!(page_present(r.base() + 2 * PAGE));
    }

    #[test]
    fn test_ranges_outside_the_reservation_are_refused() {
        let r = Reservation::new(2 * PAGE).unwrap();
        let fd = memfd(PAGE, 0);
        let einval = Some(libc::EINVAL);
        let err = r.map(2 * PAGE, fd.as_fd(), 0, PAGE, true).unwrap_err();
        assert_eq!(err.raw_os_error(), einval);
        let err = r.map(PAGE, fd.as_fd(), 0, 2 * PAGE, true).unwrap_err();
        assert_eq!(err.raw_os_error(), einval);
        assert_eq!(r.unmap(u64::MAX, 2).unwrap_err().raw_os_error(), einval);
        assert_eq!(r.unmap(0, 0).unwrap_err().raw_os_error(), einval);
        assert_eq!(Reservation::new(0).unwrap_err().raw_os_error(), einval);
    }

    #[test]
    fn test_failed_map_keeps_the_range_reserved() {
        let r = Reservation::new(2 * PAGE).unwrap();
        // A write-shared mapping of a read-only fd fails (EACCES) after MAP_FIXED had its go.
        let ro = std::fs::File::open("/proc/self/exe").unwrap();
        assert!(r.map(0, ro.as_fd(), 0, PAGE, true).is_err());
        assert!(page_present(r.base()));
    }
}
