// SPDX-License-Identifier: Apache-2.0
//! The KVM VM: opened once, given guest RAM as memory slots and then the in-kernel interrupt
//! controllers (PIC, IOAPIC, per-vCPU LAPIC), before any vCPU or PCI device exists.
//!
//! Three choices here are about boot time on PVM hosts (docs/vmm.md, "Boot time"):
//! - Guest RAM is advised to transparent huge pages, so KVM's shadow MMU can map the guest's
//!   2 MiB pages with one fault each instead of one per 4 KiB page.
//! - RAM is registered before the irqchip exists: a memory slot change right after
//!   KVM_CREATE_IRQCHIP waited several milliseconds in an SRCU grace period.
//! - There is no in-kernel PIT: nothing uses it (Linux takes the hardware-reduced ACPI path,
//!   which sets up no PIT; the test guest uses the LAPIC timer), and freeing it at VM
//!   teardown waits for two SRCU grace periods (about 16 ms).

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

/// Where KVM puts the real-mode TSS and identity-map page it needs on Intel hosts: three
/// pages just below the IOAPIC-free area at the top of the 32-bit hole, above every window
/// in layout.rs.
const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
const KVM_TSS_START: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Failed to open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    KvmApiVersion(i32),
    #[error("Failed to create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("Failed to set the KVM TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    #[error("Failed to set the KVM identity map address")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    #[error("Failed to create the in-kernel irqchip")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    #[error("Failed to add guest RAM at {0:#x} as a KVM memory slot")]
    SetMemoryRegion(u64, #[source] kvm_ioctls::Error),
}

/// The KVM system handle and the VM created from it.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    /// The first memory slot number after guest RAM's.
    first_free_slot: u32,
}

impl Vm {
    /// Open /dev/kvm, create a VM, give it `mem` (one slot per region, from slot 0), then
    /// create its irqchip. Call before anything is written to `mem`, so its pages can be huge.
    pub fn new(mem: &GuestMemoryMmap) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::KvmApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(VmError::SetIdentityMap)?;
        fd.set_tss_address(KVM_TSS_START)
            .map_err(VmError::SetTssAddress)?;
        let first_free_slot = register_guest_memory(&fd, mem)?;
        // After the memory slots: see the module comment.
        fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
            first_free_slot,
        })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The first memory slot number not used by guest RAM.
    pub fn first_free_slot(&self) -> u32 {
        self.first_free_slot
    }
}

/// Ask for transparent huge pages on `region` (at host address `host`) unless it is hugetlbfs
/// already.
///
/// The guest maps RAM with 2 MiB pages (our test guest; Linux's direct map), but KVM's shadow
/// MMU never maps more than the host page behind it: with 4 KiB host pages every 4 KiB the
/// guest touches is a separate shadow page fault (the test guest's first 1,100 of them took
/// 19 ms of its boot on PVM). cloud-hypervisor does the same (`thp=on`, its default). Only a
/// hint: the host may have THP off, and shared memory follows `shmem_enabled`, so a failure is
/// logged, not fatal. Must run before the region is first touched: pages already faulted in
/// stay small.
fn advise_transparent_huge_pages(region: &GuestRegionMmap, host: *mut u8) {
    if region.is_hugetlbfs() == Some(true) {
        return;
    }
    let Ok(len) = usize::try_from(region.len()) else {
        return;
    };
    // SAFETY: `host..host + len` is exactly the mapping `region` owns (its host address and
    // length); MADV_HUGEPAGE only changes how the kernel backs it, never its contents.
    let ret = unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) };
    if ret != 0 {
        log::debug!(
            "madvise(MADV_HUGEPAGE) on guest RAM at {:#x}: {}",
            region.start_addr().0,
            std::io::Error::last_os_error()
        );
    }
}

/// Give every region of `mem` to KVM, one slot each, from slot 0 up, after advising it to
/// huge pages. Returns the next free slot number.
fn register_guest_memory(fd: &VmFd, mem: &GuestMemoryMmap) -> Result<u32, VmError> {
    let mut slot = 0u32;
    for region in mem.iter() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| {
                VmError::SetMemoryRegion(
                    region.start_addr().0,
                    kvm_ioctls::Error::new(libc::EFAULT),
                )
            })?;
        advise_transparent_huge_pages(region, host);
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the VMM keeps alive
        // (through GuestMemoryAtomic) for as long as the VM exists, and the slot and guest
        // range are unique to this region.
        unsafe { fd.set_user_memory_region(kvm_region) }
            .map_err(|e| VmError::SetMemoryRegion(region.start_addr().0, e))?;
        slot += 1;
    }
    Ok(slot)
}
