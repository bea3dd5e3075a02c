// SPDX-License-Identifier: Apache-2.0
//! The pool as one virtio-ism device sees it: a session that allocates, attaches, detaches
//! and grants regions, and hears about what peers do to regions it holds. Both the in-process
//! pool and the broker client implement [`PoolSession`], so the device never knows which one
//! it talks to.

use std::fmt;
use std::os::fd::{BorrowedFd, OwnedFd};

/// Host-wide name of a region: an unguessable 64-bit random value.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({:#018x})", self.0)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

/// Host-wide id of one session (one virtio-ism device); reported in config space as `devid`
/// and named by per-device grants. Never 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevId(pub u64);

/// Permission bits, numerically the virtio-ism draft's `VIRTIO_ISM_PERM_*` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Perms(pub u64);

impl Perms {
    /// Map the region readable.
    pub const READ: Perms = Perms(1 << 0);
    /// Map the region writable.
    pub const WRITE: Perms = Perms(1 << 1);
    /// Hold (attach) the region at all.
    pub const ATTACH: Perms = Perms(1 << 2);
    /// Change the region's grants.
    pub const MANAGE: Perms = Perms(1 << 3);
    /// Only meaningful in a grant: clear the default permission instead of setting it.
    pub const CLEAN_DEFAULT: Perms = Perms(1 << 4);
    /// No permission.
    pub const NONE: Perms = Perms(0);

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }
    /// The bits of both.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }
}

/// Who a grant applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantTarget {
    /// Every device in the pool without a per-device entry.
    Default,
    /// One device.
    Device(DevId),
}

/// Identity of a session, fixed when it opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// Group id of the pool: devices with the same gid can share regions.
    pub gid: u64,
    /// This session's device id.
    pub devid: DevId,
}

/// A region this session holds: its memory as a memfd, and whether it may be mapped writable.
/// A read-only lease's fd is opened read-only, so it cannot be mapped writable at all.
#[derive(Debug)]
pub struct RegionLease {
    /// The region's host-wide name.
    pub token: Token,
    /// Its size in bytes.
    pub size: u64,
    /// Its memory (a sealed memfd; opened read-only for a read-only lease).
    pub fd: OwnedFd,
    /// Whether `fd` may be mapped writable.
    pub writable: bool,
}

/// Something a peer or the operator did to a region this session holds. `token` is always
/// the region's, `peer` the other device's.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolEvent {
    /// A peer attached a region this session holds.
    PeerAttached { token: Token, peer: DevId },
    /// A peer detached (or its VMM went away).
    PeerDetached { token: Token, peer: DevId },
    /// The region's grants changed.
    Updated { token: Token },
    /// The region was taken away from this session (operator removal); it must unmap it.
    Revoked { token: Token },
    /// A peer holding the region published, replaced or withdrew its doorbell: ask
    /// [`PoolSession::peer_doorbells`] again.
    DoorbellsChanged { token: Token },
}

/// Which permission an attach lacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissingPerm {
    /// [`Perms::ATTACH`].
    Attach,
    /// [`Perms::READ`].
    Read,
    /// [`Perms::WRITE`].
    Write,
    /// [`Perms::MANAGE`].
    Manage,
}

/// Every way the pool refuses a request. A caller that must tell "the pool said no" from
/// "the pool could not be asked" matches on the variant: [`PoolError::Connection`] and
/// [`PoolError::Protocol`] are the broker being gone or broken; the rest are answers.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The token names no live region.
    #[error("No region with token {0}")]
    NoSuchRegion(Token),
    /// Detach, grant or a doorbell on a region this session does not hold.
    #[error("Region {token} is not held by this device")]
    NotHeld {
        /// The region.
        token: Token,
    },
    /// The region's grants do not allow it.
    #[error("Permission denied on region {token}: {missing:?} not granted")]
    PermissionDenied {
        /// The region.
        token: Token,
        /// The permission that is not granted.
        missing: MissingPerm,
    },
    /// A size of zero or not a multiple of the page size.
    #[error("Invalid region size {0}: must be non-zero and a multiple of the page size")]
    InvalidSize(u64),
    /// A doorbell that is not an eventfd.
    #[error("Doorbell for region {token} is not an eventfd")]
    NotAnEventfd {
        /// The region.
        token: Token,
    },
    /// Duplicating a doorbell descriptor failed.
    #[error("Failed to duplicate a doorbell descriptor")]
    DupDoorbell(#[source] std::io::Error),
    /// The pool has no doorbell exchange (an old broker, or a test pool).
    #[error("This pool does not exchange doorbells")]
    DoorbellsUnsupported,
    /// The whole pool is used up.
    #[error("Pool has {available} bytes free, {requested} requested")]
    PoolExhausted {
        /// Bytes asked for.
        requested: u64,
        /// Bytes free in the pool.
        available: u64,
    },
    /// The VM's byte quota is used up.
    #[error("Per-VM quota of {limit} bytes exceeded ({used} used, {requested} requested)")]
    QuotaExceeded {
        /// The quota in bytes.
        limit: u64,
        /// Bytes the VM holds.
        used: u64,
        /// Bytes asked for.
        requested: u64,
    },
    /// Attach of a region this session holds already.
    #[error("Region {0} is already held by this device")]
    AlreadyHeld(Token),
    /// Making the region's memory (memfd, seals, size) failed.
    #[error("Failed to create region memory")]
    CreateMemory(#[source] std::io::Error),
    /// The broker could not be reached, or the connection to it broke.
    #[error("Pool broker connection failed")]
    Connection(#[source] std::io::Error),
    /// The broker answered something this client does not understand.
    #[error("Pool broker protocol error: {0}")]
    Protocol(String),
    /// The host (the broker, or the VMM for an in-process pool) ran out of file
    /// descriptors (EMFILE or ENFILE): every region, lease and doorbell is one. Not a
    /// shortage of memory; the operator raises the limit or lowers the quotas.
    #[error("Host descriptor limit reached")]
    DescriptorLimit(#[source] std::io::Error),
    /// The VM's region-count quota is used up.
    #[error("Per-VM limit of {limit} regions reached")]
    RegionQuotaExceeded {
        /// Regions one VM may hold.
        limit: u64,
    },
    /// A grant names a device that has no session in the pool.
    #[error("No device {0:?} is connected to the pool")]
    UnknownDevice(DevId),
}

/// Whether `error` says a descriptor table is full (the process's or the system's).
pub fn is_descriptor_limit(error: &std::io::Error) -> bool {
    let raw = error.raw_os_error();
    raw == Some(rustix::io::Errno::MFILE.raw_os_error())
        || raw == Some(rustix::io::Errno::NFILE.raw_os_error())
}

impl PoolError {
    /// A failure to make region memory (or a descriptor for it): `DescriptorLimit` when the
    /// descriptor table is full, `CreateMemory` otherwise.
    pub fn create_memory(error: std::io::Error) -> Self {
        if is_descriptor_limit(&error) {
            PoolError::DescriptorLimit(error)
        } else {
            PoolError::CreateMemory(error)
        }
    }

    /// A failure to duplicate a doorbell: `DescriptorLimit` when the descriptor table is
    /// full, `DupDoorbell` otherwise.
    pub fn dup_doorbell(error: std::io::Error) -> Self {
        if is_descriptor_limit(&error) {
            PoolError::DescriptorLimit(error)
        } else {
            PoolError::DupDoorbell(error)
        }
    }
}

/// One device's view of the pool.
///
/// A device holds an `Arc<dyn PoolSession>` and never learns whether a broker or an
/// in-process pool answers. Tests plug in a fake:
///
/// ```
/// use virtio_ism_pool_api::{
///     DevId, GrantTarget, Perms, PoolError, PoolEvent, PoolSession, RegionLease, SessionInfo,
///     Token,
/// };
///
/// /// A pool with nothing in it that refuses to grow.
/// struct Empty;
///
/// impl PoolSession for Empty {
///     fn info(&self) -> SessionInfo {
///         SessionInfo { gid: 1, devid: DevId(7) }
///     }
///     fn alloc(&self, size: u64) -> Result<RegionLease, PoolError> {
///         Err(PoolError::PoolExhausted { requested: size, available: 0 })
///     }
///     fn attach(&self, token: Token, _: Perms) -> Result<RegionLease, PoolError> {
///         Err(PoolError::NoSuchRegion(token))
///     }
///     fn detach(&self, token: Token) -> Result<(), PoolError> {
///         Err(PoolError::NotHeld { token })
///     }
///     fn grant(&self, token: Token, _: GrantTarget, _: Perms) -> Result<(), PoolError> {
///         Err(PoolError::NotHeld { token })
///     }
///     fn take_events(&self) -> Vec<PoolEvent> {
///         Vec::new()
///     }
/// }
///
/// let session: &dyn PoolSession = &Empty;
/// assert_eq!(session.info().devid, DevId(7));
/// assert!(matches!(session.alloc(4096), Err(PoolError::PoolExhausted { available: 0, .. })));
/// // Doorbells and the status report are optional.
/// assert!(matches!(
///     session.peer_doorbells(Token(1)),
///     Err(PoolError::DoorbellsUnsupported)
/// ));
/// assert!(session.status().is_none());
/// ```
pub trait PoolSession: Send + Sync {
    /// This session's gid and devid.
    fn info(&self) -> SessionInfo;

    /// Create a region of `size` bytes owned by this session (all permissions).
    fn alloc(&self, size: u64) -> Result<RegionLease, PoolError>;

    /// Hold an existing region. `want` is READ and/or WRITE; `Perms::NONE` means "whatever
    /// this device is granted". The lease is writable only if WRITE is granted and asked for
    /// (or nothing was asked for).
    fn attach(&self, token: Token, want: Perms) -> Result<RegionLease, PoolError>;

    /// Stop holding a region; it is freed when its last holder goes.
    fn detach(&self, token: Token) -> Result<(), PoolError>;

    /// Set the default grant or one device's grant (owner or MANAGE holders only).
    fn grant(&self, token: Token, target: GrantTarget, perms: Perms) -> Result<(), PoolError>;

    /// Events queued for this session since the last call.
    fn take_events(&self) -> Vec<PoolEvent>;

    /// Publish `doorbell`, the eventfd that raises this session's guest interrupt for
    /// `token` (a KVM irqfd), to the other holders of the region; replaces an earlier one.
    /// The pool keeps its own duplicate. Refused unless this session holds the region and
    /// `doorbell` is an eventfd. Other holders get [`PoolEvent::DoorbellsChanged`].
    fn publish_doorbell(&self, token: Token, doorbell: BorrowedFd<'_>) -> Result<(), PoolError> {
        let _ = (token, doorbell);
        Err(PoolError::DoorbellsUnsupported)
    }

    /// Withdraw this session's doorbell for `token` (vector unbound). Detaching the region
    /// or closing the session withdraws it too. Not an error if none was published.
    fn withdraw_doorbell(&self, token: Token) -> Result<(), PoolError> {
        let _ = token;
        Err(PoolError::DoorbellsUnsupported)
    }

    /// Duplicates of the doorbells the *other* holders of `token` published, by devid.
    /// Writing 1 to one raises that peer's interrupt for the region; nothing else is
    /// possible with it. Refused unless this session holds the region.
    fn peer_doorbells(&self, token: Token) -> Result<Vec<(DevId, OwnedFd)>, PoolError> {
        let _ = token;
        Err(PoolError::DoorbellsUnsupported)
    }

    /// The whole pool's status, for a session that can see it in-process (the embedded
    /// pool). None when the status is only available elsewhere (a broker's socket).
    fn status(&self) -> Option<crate::status::PoolStatus> {
        None
    }

    /// A file descriptor that becomes readable when events are queued (for a device's epoll
    /// loop). The sessions in this crate reset it inside `take_events` (before taking the
    /// queue, so no wakeup is lost); callers need not read it.
    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_a_full_descriptor_table_is_a_descriptor_limit_and_not_a_memory_failure() {
        for errno in [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE] {
            let error = std::io::Error::from_raw_os_error(errno.raw_os_error());
            assert!(matches!(
                PoolError::create_memory(error),
                PoolError::DescriptorLimit(_)
            ));
            let error = std::io::Error::from_raw_os_error(errno.raw_os_error());
            assert!(matches!(
                PoolError::dup_doorbell(error),
                PoolError::DescriptorLimit(_)
            ));
        }
        let nomem = || std::io::Error::from_raw_os_error(rustix::io::Errno::NOMEM.raw_os_error());
        assert!(matches!(
            PoolError::create_memory(nomem()),
            PoolError::CreateMemory(_)
        ));
        assert!(matches!(
            PoolError::dup_doorbell(nomem()),
            PoolError::DupDoorbell(_)
        ));
    }

    #[test]
    fn test_perms_contains_and_union() {
        let rw = Perms::READ.union(Perms::WRITE);
        assert!(rw.contains(Perms::READ) && rw.contains(Perms::WRITE));
        assert!(!rw.contains(Perms::ATTACH));
        assert!(rw.contains(Perms::NONE));
        assert_eq!(format!("{}", Token(0x1f)), "0x000000000000001f");
    }
}
