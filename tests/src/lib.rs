// SPDX-License-Identifier: Apache-2.0
//! Helpers for the integration tests: find ism-vmm and the test guest, run a VM under a hard
//! timeout (killing it on failure), and read the guest's `ISM-TEST key=value` serial lines.

pub mod api;
pub mod pair;
pub mod report;
pub mod uid;
pub mod vm;
pub mod vmm_kind;

pub use api::ApiEndpoint;
pub use pair::{Answer, IsmGuest, IsmSpec, PoolBroker};
pub use report::GuestReport;
pub use vm::{VmOutcome, VmRun, kvm_available, pool_binary, test_guest, vmm_binary};
pub use vmm_kind::{Vmm, cloud_hypervisor_dir};

/// Return early from a test, with one loud line, when /dev/kvm is missing.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available() {
            eprintln!(
                "SKIPPED: /dev/kvm missing or not accessible; {} needs KVM",
                module_path!()
            );
            return;
        }
    };
}
