// SPDX-License-Identifier: Apache-2.0
//! Device configuration space: `struct virtio_ism_config { le64 gid; le64 devid;
//! le64 chunk_size; le64 notify_size; }` (draft, Gen B). Read-only for the driver.

use crate::wire::le64_struct;

le64_struct! {
    /// The 32-byte configuration space.
    ConfigSpace {
        /// Group id: devices with the same gid can share regions.
        gid @ 0,
        /// This device's id: reported in events, named by per-device grants.
        devid @ 8,
        /// Allocation granule of shmid 1; a power of two >= 4096.
        chunk_size @ 16,
        /// Bytes of the notify area (shmid 2) per chunk.
        notify_size @ 24,
    } size 32
}
