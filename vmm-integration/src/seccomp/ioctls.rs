// SPDX-License-Identifier: Apache-2.0
//! The ioctl request numbers the filters allow, grouped by what issues them.
//!
//! kvm-ioctls keeps its request numbers private, so they are rebuilt here from the uapi
//! definitions (`_IO`/`_IOR`/`_IOW` on KVMIO with the kvm-bindings struct sizes). The unit
//! tests check them by letting kvm-ioctls make each call under a filter that allows only
//! these numbers.

use std::mem::size_of;

use kvm_bindings::{
    kvm_ioeventfd, kvm_irq_routing, kvm_irqfd, kvm_regs, kvm_userspace_memory_region,
    kvm_vcpu_events,
};
use vmm_sys_util::ioctl::{_IOC_NONE, _IOC_READ, _IOC_WRITE, ioctl_expr};

const KVMIO: u32 = 0xae;

const fn io(nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, KVMIO, nr, 0) as u64
}

const fn ior(nr: u32, size: usize) -> u64 {
    ioctl_expr(_IOC_READ, KVMIO, nr, size as u32) as u64
}

const fn iow(nr: u32, size: usize) -> u64 {
    ioctl_expr(_IOC_WRITE, KVMIO, nr, size as u32) as u64
}

pub const KVM_RUN: u64 = io(0x80);
pub const KVM_GET_REGS: u64 = ior(0x81, size_of::<kvm_regs>());
pub const KVM_SET_REGS: u64 = iow(0x82, size_of::<kvm_regs>());
pub const KVM_GET_VCPU_EVENTS: u64 = ior(0x9f, size_of::<kvm_vcpu_events>());
pub const KVM_SET_VCPU_EVENTS: u64 = iow(0xa0, size_of::<kvm_vcpu_events>());
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow(0x46, size_of::<kvm_userspace_memory_region>());
pub const KVM_SET_GSI_ROUTING: u64 = iow(0x6a, size_of::<kvm_irq_routing>());
pub const KVM_IRQFD: u64 = iow(0x76, size_of::<kvm_irqfd>());
pub const KVM_IOEVENTFD: u64 = iow(0x79, size_of::<kvm_ioeventfd>());

/// A vCPU's own calls: run, and the register and event access the PVM instruction fallback
/// and the exit diagnostics (RIP) use.
pub const VCPU: &[u64] = &[
    KVM_RUN,
    KVM_GET_REGS,
    KVM_SET_REGS,
    KVM_GET_VCPU_EVENTS,
    KVM_SET_VCPU_EVENTS,
];

/// Wiring a device into the VM after boot: memory slots for ism regions (map, unmap, BAR
/// moves), doorbell and queue-notify ioeventfds, MSI-X irqfds and their GSI routes. vCPUs do
/// it on activation, reset and BAR or MSI-X table writes; the main thread on API region
/// hotplug and teardown.
pub const DEVICE_WIRING: &[u64] = &[
    KVM_SET_USER_MEMORY_REGION,
    KVM_IOEVENTFD,
    KVM_IRQFD,
    KVM_SET_GSI_ROUTING,
];

/// The virtio-ism worker maps and unmaps regions in the window (memory slots) and wires
/// their doorbells (ioeventfds); its interrupts are irqfd writes, which need no ioctl.
pub const ISM_WORKER: &[u64] = &[KVM_SET_USER_MEMORY_REGION, KVM_IOEVENTFD];

/// The terminal (`--serial tty`): `isatty`/`tcgetattr` and `tcsetattr(TCSANOW)`; the main
/// thread restores the saved mode at exit.
pub const TERMINAL: &[u64] = &[libc::TCGETS, libc::TCSETS];
