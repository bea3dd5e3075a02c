// SPDX-License-Identifier: Apache-2.0
//! The virtio-ism window's memory slots on KVM: [`SlotBackend`] with kvm-ioctls, slot numbers
//! from the VM's [`MemorySlots`].

use std::io;
use std::sync::Arc;

use kvm_bindings::{KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VmFd};
use virtio_ism_window::SlotBackend;

use crate::memory::MemorySlots;

/// [`SlotBackend`] on a KVM VM.
pub struct KvmSlotBackend {
    vm: Arc<VmFd>,
    slots: Arc<MemorySlots>,
    readonly: bool,
}

impl KvmSlotBackend {
    /// Slots come from `slots`, shared with guest RAM's.
    pub fn new(kvm: &Kvm, vm: Arc<VmFd>, slots: Arc<MemorySlots>) -> Self {
        let readonly =
            vm.check_extension(Cap::ReadonlyMem) || kvm.check_extension(Cap::ReadonlyMem);
        Self {
            vm,
            slots,
            readonly,
        }
    }
}

impl SlotBackend for KvmSlotBackend {
    fn allocate_slot(&self) -> Option<u32> {
        self.slots.allocate()
    }

    fn free_slot(&self, slot: u32) {
        self.slots.free(slot);
    }

    fn add_slot(
        &self,
        slot: u32,
        gpa: u64,
        len: u64,
        host_addr: u64,
        readonly: bool,
    ) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host_addr,
        };
        // SAFETY: the window only passes host ranges inside its own reservation that hold a
        // live region mapping; it deletes the slot before that mapping goes away.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn remove_slot(&self, slot: u32, gpa: u64, _len: u64, _host_addr: u64) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is handed to KVM.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn readonly_supported(&self) -> bool {
        self.readonly
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;

    use virtio_ism::ShmWindow;
    use virtio_ism_window::SlotWindow;
    use virtio_ism_window::test_utils::memfd;

    /// Whether KVM has a slot covering `gpa`: adding a probe slot there fails with EEXIST.
    fn kvm_has_slot_at(vm: &VmFd, probe: &ProbeMemory, gpa: u64) -> bool {
        let region = kvm_userspace_memory_region {
            slot: 500,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: 0x1000,
            userspace_addr: probe.0 as u64,
        };
        // SAFETY: the probe page is a live mapping that outlives the slot, which is deleted
        // again right away.
        match unsafe { vm.set_user_memory_region(region) } {
            Ok(()) => {
                let delete = kvm_userspace_memory_region {
                    memory_size: 0,
                    ..region
                };
                // SAFETY: deleting the probe slot hands KVM no memory.
                unsafe { vm.set_user_memory_region(delete) }.unwrap();
                false
            }
            Err(e) if e.errno() == libc::EEXIST => true,
            Err(e) => panic!("probe slot at {gpa:#x}: {e}"),
        }
    }

    struct ProbeMemory(*mut libc::c_void);

    impl ProbeMemory {
        fn new() -> Self {
            // SAFETY: a fresh anonymous page.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    0x1000,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Self(p)
        }
    }

    impl Drop for ProbeMemory {
        fn drop(&mut self) {
            // SAFETY: our own page, no slot uses it any more.
            unsafe { libc::munmap(self.0, 0x1000) };
        }
    }

    #[test]
    fn test_real_kvm_slots_map_move_and_unmap() {
        if !crate::test_guest::kvm_available_for("this test creates KVM memory slots") {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        let limit = u32::try_from(kvm.get_nr_memslots()).unwrap().min(400);
        let backend = Arc::new(KvmSlotBackend::new(
            &kvm,
            vm.clone(),
            Arc::new(MemorySlots::new(0, limit)),
        ));
        let readonly = backend.readonly_supported();
        println!("KVM read-only memory slots: {readonly}");
        let w = SlotWindow::new(1 << 20, backend).unwrap();
        let probe = ProbeMemory::new();
        let bar = 0x10_0000_0000u64;
        w.relocate(bar);
        let rw = memfd(0x2000, 0x11);
        let ro = memfd(0x1000, 0x22);
        w.map(0x0, rw.as_fd(), 0, 0x2000, true).unwrap();
        w.map(0x4000, ro.as_fd(), 0, 0x1000, false).unwrap();
        assert!(w.slot_at(0).is_some());
        // A read-only grant gets a KVM_MEM_READONLY slot where KVM has them, else emulation.
        assert_eq!(w.slot_at(0x4000).is_some(), readonly);
        assert!(kvm_has_slot_at(&vm, &probe, bar + 0x1000));
        assert_eq!(kvm_has_slot_at(&vm, &probe, bar + 0x4000), readonly);
        assert!(!kvm_has_slot_at(&vm, &probe, bar + 0x8000));
        // The host side of the read-write mapping is the region's memory.
        let mut buf = [0u8; 8];
        assert!(w.read(0x4000, &mut buf));
        assert_eq!(buf, [0x22; 8]);

        let moved = 0x20_0000_0000u64;
        w.relocate(moved);
        assert!(!kvm_has_slot_at(&vm, &probe, bar + 0x1000));
        assert!(kvm_has_slot_at(&vm, &probe, moved + 0x1000));
        assert_eq!(kvm_has_slot_at(&vm, &probe, moved + 0x4000), readonly);

        w.unmap(0x0, 0x2000).unwrap();
        w.unmap(0x4000, 0x1000).unwrap();
        assert!(!kvm_has_slot_at(&vm, &probe, moved));
        assert!(!kvm_has_slot_at(&vm, &probe, moved + 0x4000));
        assert_eq!(w.counters().slot_mappings.load(Ordering::Relaxed), 0);
    }
}
