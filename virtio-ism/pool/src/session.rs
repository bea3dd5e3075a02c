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
    pub const READ: Perms = Perms(1 << 0);
    pub const WRITE: Perms = Perms(1 << 1);
    pub const ATTACH: Perms = Perms(1 << 2);
    pub const MANAGE: Perms = Perms(1 << 3);
    /// Only meaningful in a grant: clear the default permission instead of setting it.
    pub const CLEAN_DEFAULT: Perms = Perms(1 << 4);
    pub const NONE: Perms = Perms(0);

    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }
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
    pub devid: DevId,
}

/// A region this session holds: its memory as a memfd, and whether it may be mapped writable.
/// A read-only lease's fd is opened read-only, so it cannot be mapped writable at all.
#[derive(Debug)]
pub struct RegionLease {
    pub token: Token,
    pub size: u64,
    pub fd: OwnedFd,
    pub writable: bool,
}

/// Something a peer or the operator did to a region this session holds.
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
    Attach,
    Read,
    Write,
    Manage,
}

/// Every way the pool refuses a request.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("No region with token {0}")]
    NoSuchRegion(Token),
    #[error("Region {token} is not held by this device")]
    NotHeld { token: Token },
    #[error("Permission denied on region {token}: {missing:?} not granted")]
    PermissionDenied { token: Token, missing: MissingPerm },
    #[error("Invalid region size {0}: must be non-zero and a multiple of the page size")]
    InvalidSize(u64),
    #[error("Doorbell for region {token} is not an eventfd")]
    NotAnEventfd { token: Token },
    #[error("Failed to duplicate a doorbell descriptor")]
    DupDoorbell(#[source] std::io::Error),
    #[error("This pool does not exchange doorbells")]
    DoorbellsUnsupported,
    #[error("Pool has {available} bytes free, {requested} requested")]
    PoolExhausted { requested: u64, available: u64 },
    #[error("Per-VM quota of {limit} bytes exceeded ({used} used, {requested} requested)")]
    QuotaExceeded {
        limit: u64,
        used: u64,
        requested: u64,
    },
    #[error("Region {0} is already held by this device")]
    AlreadyHeld(Token),
    #[error("Failed to create region memory")]
    CreateMemory(#[source] std::io::Error),
    #[error("Pool broker connection failed")]
    Connection(#[source] std::io::Error),
    #[error("Pool broker protocol error: {0}")]
    Protocol(String),
    /// The host (the broker, or the VMM for an in-process pool) ran out of file
    /// descriptors (EMFILE or ENFILE): every region, lease and doorbell is one. Not a
    /// shortage of memory; the operator raises the limit or lowers the quotas.
    #[error("Host descriptor limit reached")]
    DescriptorLimit(#[source] std::io::Error),
    #[error("Per-VM limit of {limit} regions reached")]
    RegionQuotaExceeded { limit: u64 },
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
