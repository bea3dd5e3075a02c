// SPDX-License-Identifier: Apache-2.0
//! Errors of the ism API. The driver turns each device status into one errno
//! (docs/guest-driver.md, "Errors"); [`CommandError::from_errno`] turns it back.

use std::io;
use std::path::PathBuf;

use virtio_ism_proto::Status;

/// Why one driver command (ioctl) failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("No such region held")]
    NoSuchRegion,
    #[error("No free chunk slots in the device window")]
    NoSpace,
    #[error("The host pool is out of memory or the quota is used up")]
    NoMemory,
    #[error("The host pool is temporarily unavailable; retry later")]
    Unavailable,
    #[error("ATTACH permission not granted")]
    AttachNotGranted,
    #[error("READ permission not granted")]
    ReadNotGranted,
    #[error("WRITE permission not granted")]
    WriteNotGranted,
    #[error("Refused: malformed request or operation not permitted")]
    Refused,
    #[error("Region is held by another open file")]
    Busy,
    #[error("Device did not answer in time")]
    Timeout,
    #[error("Device gave an invalid reply or is broken")]
    DeviceFailed,
    #[error("Device was removed")]
    DeviceGone,
    #[error("Driver does not know this command")]
    NotSupported,
    #[error("Bad address passed to the driver")]
    Fault,
    #[error("Interrupted by a signal")]
    Interrupted,
    #[error("Unexpected error")]
    Os(#[source] io::Error),
}

impl CommandError {
    /// The error for an errno the driver returned.
    pub fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ENOENT => Self::NoSuchRegion,
            libc::ENOSPC => Self::NoSpace,
            libc::ENOMEM => Self::NoMemory,
            libc::EAGAIN => Self::Unavailable,
            libc::EACCES => Self::AttachNotGranted,
            libc::EPERM => Self::ReadNotGranted,
            libc::EROFS => Self::WriteNotGranted,
            libc::EINVAL => Self::Refused,
            libc::EBUSY => Self::Busy,
            libc::ETIMEDOUT => Self::Timeout,
            libc::EIO | libc::EPROTO => Self::DeviceFailed,
            libc::ENODEV => Self::DeviceGone,
            libc::ENOTTY => Self::NotSupported,
            libc::EFAULT => Self::Fault,
            libc::EINTR => Self::Interrupted,
            other => Self::Os(io::Error::from_raw_os_error(other)),
        }
    }

    /// The device status this error stands for, when it came from the device.
    pub fn device_status(&self) -> Option<Status> {
        Some(match self {
            Self::NoSuchRegion => Status::NoEnt,
            Self::NoSpace => Status::NoSpc,
            Self::NoMemory => Status::NoMem,
            Self::Unavailable => Status::Again,
            Self::AttachNotGranted => Status::PermAttach,
            Self::ReadNotGranted => Status::PermRead,
            Self::WriteNotGranted => Status::PermWrite,
            Self::Refused => Status::Err,
            _ => return None,
        })
    }
}

/// Every failure of the ism API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot list {}", dir.display())]
    ListDevices {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{op} failed")]
    Command {
        op: &'static str,
        #[source]
        source: CommandError,
    },
    #[error("Cannot map region {token:#x}")]
    Map {
        token: u64,
        #[source]
        source: io::Error,
    },
    #[error("Region {token:#x} is mapped read-only")]
    ReadOnly { token: u64 },
    #[error("Access of {len} bytes at {offset} is outside the region ({size} bytes)")]
    OutOfBounds {
        offset: usize,
        len: usize,
        size: usize,
    },
    #[error("Region size {size} does not fit this process's address space")]
    TooLarge { size: u64 },
    #[error("Cannot read an event")]
    ReadEvent(#[source] io::Error),
    #[error("Cannot read the driver counter {}", path.display())]
    ReadCounter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Driver returned a partial event of {0} bytes")]
    ShortEvent(usize),
    #[error("Cannot poll the device")]
    Poll(#[source] io::Error),
}

/// Result of the ism API.
pub type Result<T> = std::result::Result<T, Error>;
