// SPDX-License-Identifier: Apache-2.0
//! What the device fuzz targets share: a shared-memory window that only counts mappings, and
//! the check after every input's reset that the input left nothing behind.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Mutex;

use ism_pool::{LocalPool, PoolStatus};
use virtio_ism::ShmWindow;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// A window of `size` bytes that keeps no memory: it checks each mapping lies inside and
/// counts the live ones.
pub struct CountingWindow {
    size: u64,
    mapped: Mutex<u64>,
}

impl CountingWindow {
    pub fn new(size: u64) -> Self {
        CountingWindow {
            size,
            mapped: Mutex::new(0),
        }
    }

    /// Mappings made and not yet unmapped.
    pub fn mapped(&self) -> u64 {
        *self.mapped.lock().unwrap()
    }
}

impl ShmWindow for CountingWindow {
    fn map(&self, offset: u64, _: BorrowedFd<'_>, _: u64, len: u64, _: bool) -> io::Result<()> {
        assert!(
            offset.checked_add(len).unwrap() <= self.size,
            "map outside shmid 1"
        );
        *self.mapped.lock().unwrap() += 1;
        Ok(())
    }

    fn unmap(&self, _: u64, _: u64) -> io::Result<()> {
        let mut mapped = self.mapped.lock().unwrap();
        *mapped = mapped.checked_sub(1).expect("unmap of nothing mapped");
        Ok(())
    }
}

/// After an input and the reset behind it: nothing of the input may be left in the pool
/// (its status must equal `baseline`, taken right after setup); the first `len` bytes of guest
/// memory are zeroed for the next input.
pub fn check_nothing_left(
    pool: &LocalPool,
    baseline: &PoolStatus,
    mem: &GuestMemoryMmap,
    len: usize,
) {
    assert_eq!(pool.status(), *baseline, "state left for the next input");
    const ZEROS: [u8; 4096] = [0; 4096];
    for at in (0..len).step_by(ZEROS.len()) {
        let n = (len - at).min(ZEROS.len());
        mem.write_slice(&ZEROS[..n], GuestAddress(at as u64))
            .unwrap();
    }
}
