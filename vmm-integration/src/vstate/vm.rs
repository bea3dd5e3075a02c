// SPDX-License-Identifier: Apache-2.0
//! The KVM VM: opened once, given guest RAM as memory slots and the in-kernel interrupt
//! controllers (PIC, IOAPIC, per-vCPU LAPIC) and PIT, before any vCPU or PCI device exists.

use std::sync::Arc;

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

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
    #[error("Failed to create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("Failed to add guest RAM at {0:#x} as a KVM memory slot")]
    SetMemoryRegion(u64, #[source] kvm_ioctls::Error),
}

/// The KVM system handle and the VM created from it.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
}

impl Vm {
    /// Open /dev/kvm and create a VM with its irqchip and PIT.
    pub fn new() -> Result<Self, VmError> {
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
        fd.create_irq_chip().map_err(VmError::CreateIrqChip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
        })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// Give every region of `mem` to KVM, one slot each, from slot 0 up. Returns the next free
    /// slot number.
    pub fn register_guest_memory(&self, mem: &GuestMemoryMmap) -> Result<u32, VmError> {
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
            let kvm_region = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the host range is a live mapping owned by `mem`, which the VMM keeps
            // alive (through GuestMemoryAtomic) for as long as the VM exists, and the slot and
            // guest range are unique to this region.
            unsafe { self.fd.set_user_memory_region(kvm_region) }
                .map_err(|e| VmError::SetMemoryRegion(region.start_addr().0, e))?;
            slot += 1;
        }
        Ok(slot)
    }
}
