// SPDX-License-Identifier: Apache-2.0
//! What the device needs from the VMM around it: a way to put region memory into its
//! shared-memory window, and a way to signal peers when the guest rings a doorbell.

use std::io;
use std::os::fd::BorrowedFd;

use virtio_ism_pool_api::{DevId, Token};

/// The device's shared-memory window (the 64-bit BAR behind shmid 1 and 2), as the VMM
/// provides it. Offsets are relative to the start of the window; the device only ever maps
/// whole chunks (page-aligned offsets and lengths) inside shmid 1.
///
/// A VMM implementation reserves the window `PROT_NONE` once, maps a region with
/// `mmap(MAP_SHARED | MAP_FIXED)` over the reservation and restores `PROT_NONE` on unmap, so
/// the guest-visible range never has holes another host mapping could land in.
pub trait ShmWindow: Send + Sync {
    /// Map `len` bytes of `fd` starting at `fd_offset` at `window_offset`, read-only unless
    /// `writable`.
    fn map(
        &self,
        window_offset: u64,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        len: u64,
        writable: bool,
    ) -> io::Result<()>;

    /// Make `len` bytes at `window_offset` inaccessible again.
    fn unmap(&self, window_offset: u64, len: u64) -> io::Result<()>;
}

/// Slow-path doorbell delivery: the guest wrote to the notify slot of a region and the VMM
/// handed the write to [`crate::IsmHandle::handle_notify`].
///
/// Semantics with several peers: a kick is a broadcast. Every holder of `token` other than
/// `from` is signalled once (on the MSI-X vector it bound with EVENT_VECTOR, if any); the
/// kicker itself is not. Receivers learn nothing but "look at the region".
pub trait KickSink: Send + Sync {
    fn kick_peers(&self, from: DevId, token: Token);
}
