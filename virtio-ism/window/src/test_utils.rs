// SPDX-License-Identifier: Apache-2.0
//! Test helpers for VMMs using this crate: a fake hypervisor for [`crate::SlotBackend`] and
//! memfd regions (feature `test-utils`).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Mutex;

use crate::SlotBackend;

/// A hypervisor in memory: remembers the slots KVM would have (slot -> (gpa, len, host
/// address, read-only)), refuses overlapping ones like KVM, and refuses every slot with
/// `refuse`.
#[derive(Default)]
pub struct FakeKvm {
    pub slots: Mutex<BTreeMap<u32, (u64, u64, u64, bool)>>,
    pub no_readonly: bool,
    pub refuse: bool,
    /// Slot numbers handed out: 2.. up to `2 + limit` (0 = no limit set: 64).
    pub limit: u32,
    pub allocated: Mutex<(u32, Vec<u32>)>,
}

impl SlotBackend for FakeKvm {
    fn allocate_slot(&self) -> Option<u32> {
        let limit = if self.limit == 0 { 64 } else { self.limit };
        let mut a = self.allocated.lock().unwrap();
        if let Some(slot) = a.1.pop() {
            return Some(slot);
        }
        (a.0 < limit).then(|| {
            a.0 += 1;
            a.0 + 1
        })
    }
    fn free_slot(&self, slot: u32) {
        let mut a = self.allocated.lock().unwrap();
        assert!(!a.1.contains(&slot), "slot {slot} freed twice");
        a.1.push(slot);
    }
    fn add_slot(&self, slot: u32, gpa: u64, len: u64, host: u64, ro: bool) -> io::Result<()> {
        if self.refuse {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        let mut s = self.slots.lock().unwrap();
        // KVM refuses a slot over another one's guest range.
        if s.values()
            .any(|(at, l, ..)| *at < gpa + len && gpa < at + l)
        {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        assert!(
            s.insert(slot, (gpa, len, host, ro)).is_none(),
            "slot {slot} reused"
        );
        Ok(())
    }
    fn remove_slot(&self, slot: u32, gpa: u64, _len: u64, _host_addr: u64) -> io::Result<()> {
        let mut s = self.slots.lock().unwrap();
        let (at, ..) = s.remove(&slot).expect("removing an absent slot");
        assert_eq!(at, gpa);
        Ok(())
    }
    fn readonly_supported(&self) -> bool {
        !self.no_readonly
    }
}

/// A memfd of `len` bytes, every byte `fill`.
pub fn memfd(len: u64, fill: u8) -> OwnedFd {
    // SAFETY: valid name and flags; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"ism-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(fd.try_clone().unwrap());
    file.set_len(len).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &vec![fill; len as usize], 0).unwrap();
    fd
}
