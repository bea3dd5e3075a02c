// SPDX-License-Identifier: Apache-2.0
//! KVM state: the VM (memory slots, in-kernel irqchip and PIT), the vCPUs, their CPUID and the
//! policy for PVM hosts.

pub mod cpuid;
pub mod pause;
pub mod pvm;
pub mod vcpu;
pub mod vm;
