// SPDX-License-Identifier: Apache-2.0
//! Region memory: one sealed memfd per region, and the read-write or read-only file
//! descriptors handed to holders.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use rustix::fs::{FallocateFlags, MemfdFlags, Mode, OFlags, SealFlags};

/// Page size of regular memfds.
pub const PAGE_SIZE: u64 = 4096;
/// Page size of MFD_HUGETLB memfds (the default huge page size on x86_64).
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;

/// Failures while making region memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Failed to create memfd")]
    Create(#[source] io::Error),
    #[error("Failed to set memfd size")]
    SetSize(#[source] io::Error),
    #[error("Failed to reserve huge pages")]
    ReserveHugePages(#[source] io::Error),
    #[error("Failed to restrict memfd mode")]
    Chmod(#[source] io::Error),
    #[error("Failed to seal memfd")]
    Seal(#[source] io::Error),
    #[error("Failed to duplicate memfd")]
    Duplicate(#[source] io::Error),
    #[error("Failed to reopen memfd read-only")]
    ReopenReadOnly(#[source] io::Error),
}

impl MemoryError {
    /// The OS error behind this failure.
    pub fn into_io(self) -> io::Error {
        match self {
            MemoryError::Create(e)
            | MemoryError::SetSize(e)
            | MemoryError::ReserveHugePages(e)
            | MemoryError::Chmod(e)
            | MemoryError::Seal(e)
            | MemoryError::Duplicate(e)
            | MemoryError::ReopenReadOnly(e) => e,
        }
    }
}

/// The memory of one region. Dropping it closes the pool's own descriptor; the pages go
/// away when every holder has closed theirs too.
#[derive(Debug)]
pub struct RegionMemory {
    fd: OwnedFd,
    size: u64,
    /// Whether `fd` is open read-write. Always for memory the pool made; a region restored
    /// from a holder's read-only lease after a broker restart has only a read-only one until
    /// a writer re-registers.
    writable: bool,
}

/// Which file a descriptor is: the device and inode number of its memfd. Recorded in the
/// broker's state file so that a restarted broker accepts only the very file it made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
}

impl FileIdentity {
    /// The identity of the file `fd` is open on.
    pub fn of(fd: impl AsFd) -> io::Result<Self> {
        let stat = rustix::fs::fstat(fd)?;
        Ok(FileIdentity {
            dev: stat.st_dev,
            ino: stat.st_ino,
        })
    }
}

impl RegionMemory {
    /// A zero-filled memfd of `size` bytes whose size can never change again.
    ///
    /// The seals (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) keep any holder from
    /// truncating the file under another holder's mapping (which would SIGBUS it) and from
    /// adding `F_SEAL_WRITE`, which would take write access away from every writer. The
    /// inode mode is 0400 so that a holder running under another uid cannot reopen its
    /// read-only descriptor read-write through `/proc/self/fd`.
    pub fn create(name: &str, size: u64, hugepages: bool) -> Result<Self, MemoryError> {
        let mut flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        if hugepages {
            flags |= MemfdFlags::HUGETLB;
        }
        // Region memory is data, never code: ask for the exec seal where the kernel has it
        // (6.3+), and fall back to a plain memfd on older kernels.
        let fd = match rustix::fs::memfd_create(name, flags | MemfdFlags::NOEXEC_SEAL) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::INVAL) => {
                rustix::fs::memfd_create(name, flags).map_err(|e| MemoryError::Create(e.into()))?
            }
            Err(e) => return Err(MemoryError::Create(e.into())),
        };
        rustix::fs::ftruncate(&fd, size).map_err(|e| MemoryError::SetSize(e.into()))?;
        if hugepages {
            // hugetlbfs hands out pages at fault time; without a reservation a holder that
            // touches a page the host cannot supply gets SIGBUS. Reserve them all now so that
            // a shortage is a clean allocation error instead.
            rustix::fs::fallocate(&fd, FallocateFlags::empty(), 0, size)
                .map_err(|e| MemoryError::ReserveHugePages(e.into()))?;
        }
        rustix::fs::fchmod(&fd, Mode::RUSR).map_err(|e| MemoryError::Chmod(e.into()))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)
            .map_err(|e| MemoryError::Seal(e.into()))?;
        Ok(RegionMemory {
            fd,
            size,
            writable: true,
        })
    }

    /// Region memory the pool made before a restart, handed back by a holder (checked by
    /// the caller: identity, size, owner, seals).
    pub fn adopt(fd: OwnedFd, size: u64, writable: bool) -> Self {
        RegionMemory { fd, size, writable }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether read-write descriptors can be made from this memory.
    pub fn writable(&self) -> bool {
        self.writable
    }

    /// The identity of the memfd.
    pub fn identity(&self) -> io::Result<FileIdentity> {
        FileIdentity::of(&self.fd)
    }

    /// A new read-write descriptor of the same memory.
    pub fn read_write_fd(&self) -> Result<OwnedFd, MemoryError> {
        if !self.writable {
            return Err(MemoryError::Duplicate(io::Error::from_raw_os_error(
                rustix::io::Errno::ACCESS.raw_os_error(),
            )));
        }
        self.fd.try_clone().map_err(MemoryError::Duplicate)
    }

    /// A new descriptor opened `O_RDONLY`: `mmap(PROT_WRITE, MAP_SHARED)`, `mprotect` to
    /// writable, `write` and `fallocate` all fail on it.
    ///
    /// A `dup` would share the read-write open file description, and `F_SEAL_FUTURE_WRITE`
    /// would stop the writers too, so the file is opened a second time through procfs.
    pub fn read_only_fd(&self) -> Result<OwnedFd, MemoryError> {
        let path = format!("/proc/self/fd/{}", self.fd.as_fd().as_raw_fd());
        // openat, not open: the VMMs' seccomp filters allow only openat (and only read-only).
        rustix::fs::openat(
            rustix::fs::CWD,
            path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| MemoryError::ReopenReadOnly(e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_region_memory_is_sealed_against_resizing() {
        let mem = RegionMemory::create("test", 2 * PAGE_SIZE, false).unwrap();
        let fd = mem.read_write_fd().unwrap();
        assert!(rustix::fs::ftruncate(&fd, PAGE_SIZE).is_err());
        assert!(rustix::fs::ftruncate(&fd, 4 * PAGE_SIZE).is_err());
        assert!(rustix::fs::fcntl_add_seals(&fd, SealFlags::WRITE).is_err());
        let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
        assert!(!seals.contains(SealFlags::WRITE));
        assert_eq!(
            rustix::fs::fstat(&fd).unwrap().st_size as u64,
            2 * PAGE_SIZE
        );
    }

    #[test]
    fn test_read_only_fd_refuses_writes() {
        let mem = RegionMemory::create("test", PAGE_SIZE, false).unwrap();
        let ro = mem.read_only_fd().unwrap();
        let flags = rustix::fs::fcntl_getfl(&ro).unwrap();
        assert_eq!(flags & OFlags::RWMODE, OFlags::RDONLY);
        assert!(rustix::io::write(&ro, b"x").is_err());
        let rw = mem.read_write_fd().unwrap();
        assert_eq!(rustix::io::pwrite(&rw, b"abc", 0).unwrap(), 3);
        let mut buf = [0u8; 3];
        assert_eq!(rustix::io::pread(&ro, &mut buf, 0).unwrap(), 3);
        assert_eq!(&buf, b"abc");
    }
}
