// SPDX-License-Identifier: Apache-2.0
//! Errors of the virtio-ism driver: setup failures, command outcomes (one variant per device
//! status) and protocol violations (what was wrong with what the device returned).

use crate::pci::{BarError, MsixError};
use crate::virtio::{QueueError, TransportError};

/// A permission the device refused (status PERM_EATTACH / PERM_EREAD / PERM_EWRITE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// ATTACH was not granted.
    Attach,
    /// READ was not granted.
    Read,
    /// WRITE was requested and not granted.
    Write,
}

/// What was wrong with something the device returned. The driver refuses the reply (or event)
/// and nothing of it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A status byte that is none of the protocol's codes.
    #[error("Unknown status byte {0}")]
    UnknownStatus(u8),
    /// The used length does not cover the status byte and the reply the status promises.
    #[error("Used length {used} shorter than the {needed} bytes the reply needs")]
    ShortReply {
        /// Used length reported.
        used: u32,
        /// Bytes the reply needs.
        needed: usize,
    },
    /// The device completed a chain that is not the request in flight.
    #[error("Completion for descriptor {got}, request was {expected}")]
    UnexpectedHead {
        /// Head of the request.
        expected: u16,
        /// Head the device returned.
        got: u16,
    },
    /// An area count of zero or more than the reply buffer holds.
    #[error("Area count {num} outside 1..={capacity}")]
    AreaCount {
        /// Count reported.
        num: u64,
        /// Entries the buffer held.
        capacity: usize,
    },
    /// An area that is empty or not a whole number of pages.
    #[error("Area at {offset:#x} has bad size {size:#x}")]
    AreaSize {
        /// Area offset.
        offset: u64,
        /// Area size.
        size: u64,
    },
    /// An area not starting at a chunk boundary.
    #[error("Area offset {0:#x} not chunk-aligned")]
    AreaMisaligned(u64),
    /// An area outside shmid 1.
    #[error("Area {offset:#x}+{size:#x} outside the {window:#x}-byte region window")]
    AreaOutsideWindow {
        /// Area offset.
        offset: u64,
        /// Area size.
        size: u64,
        /// Length of shmid 1.
        window: u64,
    },
    /// An area other than the last that does not cover whole chunks.
    #[error("Area {index} is not a whole number of chunks")]
    PartialChunk {
        /// Index of the area.
        index: usize,
    },
    /// Two areas of one region overlap.
    #[error("Areas {0} and {1} overlap")]
    AreasOverlap(usize, usize),
    /// The areas add up to a different size than the region has.
    #[error("Areas add up to {got:#x} bytes, region is {expected:#x}")]
    SizeMismatch {
        /// Size the region should have.
        expected: u64,
        /// Sum of the areas.
        got: u64,
    },
    /// A token of 0 where a region was expected.
    #[error("Zero token")]
    ZeroToken,
    /// E2BIG asking for no more entries than were offered, or asked too many times.
    #[error("E2BIG asking for {needed} entries after offering {offered}")]
    BadTooBig {
        /// Entries the device asked for.
        needed: u64,
        /// Entries offered.
        offered: usize,
    },
    /// E2BIG for a command whose reply has no list.
    #[error("E2BIG for a command without a list reply")]
    UnexpectedTooBig,
    /// QUERY_REGION flags without READ, or with unknown bits.
    #[error("Region flags {0:#x} invalid")]
    BadFlags(u64),
    /// A bound vector that no MSI-X table can have.
    #[error("Vector {0:#x} invalid")]
    BadVector(u64),
    /// An event buffer came back with a length other than one event.
    #[error("Event of {0} bytes")]
    EventLength(u32),
    /// An event type the protocol does not define.
    #[error("Unknown event type {0:#x}")]
    UnknownEvent(u64),
    /// An event naming an offset outside shmid 1 or not chunk-aligned.
    #[error("Event offset {0:#x} invalid")]
    EventOffset(u64),
    /// An attach/detach event without the peer's device id.
    #[error("Peer event without a device id")]
    EventNoPeer,
    /// A completion on the event queue for a buffer that is not one of ours.
    #[error("Event completion for unknown descriptor {0}")]
    EventHead(u16),
}

/// Configuration or layout the device presents that the driver cannot use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The device has no device-specific config window, or it is shorter than 32 bytes.
    #[error("Device config window missing or shorter than 32 bytes")]
    ConfigWindow,
    /// The config generation kept changing while reading.
    #[error("Device config kept changing")]
    Unstable,
    /// chunk_size is not a power of two >= 4096.
    #[error("Chunk size {0:#x} is not a power of two >= 4096")]
    ChunkSize(u64),
    /// notify_size is not a power of two in 1..=4096.
    #[error("Notify size {0:#x} is not a power of two in 1..=4096")]
    NotifySize(u64),
    /// devid 0 is reserved.
    #[error("Device id 0")]
    ZeroDevid,
    /// A shared-memory region the driver needs is missing (id).
    #[error("Shared-memory region {0} missing")]
    MissingShm(u8),
    /// A shared-memory region id listed more than once.
    #[error("Shared-memory region {0} listed twice")]
    DuplicateShm(u8),
    /// More shared-memory capabilities than the transport keeps: one could hide a duplicate.
    #[error("{0} shared-memory capabilities, too many to check")]
    TooManyShm(usize),
    /// The shared-memory regions are not in a 64-bit memory BAR.
    #[error("Shared-memory region {0} not in a 64-bit memory BAR")]
    ShmBar(u8),
    /// shmid 1 is empty or not a whole number of chunks.
    #[error("Region window of {len:#x} bytes is not a whole number of {chunk_size:#x}-byte chunks")]
    RegionWindow {
        /// Length of shmid 1.
        len: u64,
        /// Chunk size.
        chunk_size: u64,
    },
    /// shmid 2 is smaller than one notify slot per chunk.
    #[error("Notify window of {len:#x} bytes, {needed:#x} needed")]
    NotifyWindow {
        /// Length of shmid 2.
        len: u64,
        /// chunks * notify_size.
        needed: u64,
    },
    /// shmid 1 and shmid 2 overlap.
    #[error("Region and notify windows overlap")]
    ShmOverlap,
    /// The platform refused to map a shared-memory region as device memory.
    #[error("Shared-memory region {0} is not device memory the platform can map")]
    ShmNotMmio(u8),
}

/// Errors of the virtio-ism driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IsmError {
    /// The function is not a virtio-ism device.
    #[error("PCI function {vendor:04x}:{device:04x} is not virtio-ism")]
    NotIsm {
        /// Vendor ID.
        vendor: u16,
        /// Device ID.
        device: u16,
    },
    /// Reading the BARs failed.
    #[error("Reading the BARs failed")]
    Bars(#[source] BarError),
    /// The virtio-pci transport failed.
    #[error("virtio-pci transport failed")]
    Transport(#[source] TransportError),
    /// A virtqueue failed (including a device breaking its rules).
    #[error("Virtqueue failed")]
    Queue(#[source] QueueError),
    /// MSI-X setup failed.
    #[error("MSI-X setup failed")]
    Msix(#[source] MsixError),
    /// The device has no MSI-X capability but a vector was asked for.
    #[error("Device has no MSI-X capability")]
    NoMsix,
    /// Unusable configuration or layout.
    #[error("Invalid device configuration")]
    Config(#[source] ConfigError),
    /// The platform gave no DMA memory.
    #[error("No DMA memory")]
    NoDmaMemory,
    /// The command needs a feature that was not negotiated (its bit number).
    #[error("Feature bit {0} not negotiated")]
    NotNegotiated(u32),
    /// The device did not complete a request in time. The request stays in flight, so the
    /// control queue refuses further commands ([`IsmError::Broken`]).
    #[error("Device did not answer in time")]
    Timeout,
    /// An earlier timeout or protocol violation left the control path unusable.
    #[error("Control path broken by an earlier failure")]
    Broken,
    /// A size or count the driver cannot carry (e.g. more areas than it keeps).
    #[error("Request too large for the driver")]
    Unsupported,
    /// PERM_E*: the device refused a permission.
    #[error("Permission {0:?} denied")]
    Perm(Perm),
    /// ENOENT: no such region, or not held by this device.
    #[error("No such region")]
    NoEntry,
    /// ENOSPC: no free chunk slots in the window.
    #[error("No space in the shared-memory window")]
    NoSpace,
    /// ENOMEM: the host pool is out of memory or the quota is used up.
    #[error("Host pool out of memory")]
    NoMem,
    /// EAGAIN (extension): the host pool is temporarily unavailable; retry later.
    #[error("Host pool temporarily unavailable")]
    Again,
    /// E2BIG that the driver could not satisfy: the device needs this many entries.
    #[error("Reply needs {0} entries, more than the driver takes")]
    TooBig(u64),
    /// ERR (255): malformed request, refused grant, already attached, ...
    #[error("Device error status {0}")]
    DeviceError(u8),
    /// The device broke the protocol.
    #[error("Device protocol violation")]
    Protocol(#[source] ProtocolError),
    /// A region access outside the region.
    #[error("Access {offset:#x}+{len:#x} outside a region of {size:#x} bytes")]
    OutOfBounds {
        /// Offset in the region.
        offset: u64,
        /// Access length.
        len: u64,
        /// Region size.
        size: u64,
    },
    /// A write to a region mapped read-only (or not known to be writable).
    #[error("Region is not mapped writable")]
    ReadOnly,
    /// A region that does not lie in this device's window.
    #[error("Region does not belong to this device's window")]
    ForeignRegion,
}

impl From<TransportError> for IsmError {
    fn from(e: TransportError) -> Self {
        IsmError::Transport(e)
    }
}

impl From<QueueError> for IsmError {
    fn from(e: QueueError) -> Self {
        IsmError::Queue(e)
    }
}

impl From<ProtocolError> for IsmError {
    fn from(e: ProtocolError) -> Self {
        IsmError::Protocol(e)
    }
}

impl From<ConfigError> for IsmError {
    fn from(e: ConfigError) -> Self {
        IsmError::Config(e)
    }
}
