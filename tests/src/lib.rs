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
pub use pair::{Answer, IsmGuest, IsmSpec, PoolBroker, broker_and_two_guests};
pub use report::GuestReport;
pub use vm::{VmOutcome, VmRun, kvm_available, pool_binary, test_guest, vmm_binary};
pub use vmm_kind::{Vmm, cloud_hypervisor_dir};

/// Return early from a test, with one loud line, when /dev/kvm is missing; fail it instead
/// when `ISM_REQUIRE_KVM` says KVM is expected here.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available() {
            assert!(
                std::env::var_os("ISM_REQUIRE_KVM").is_none(),
                "ISM_REQUIRE_KVM is set but /dev/kvm is missing or not accessible ({})",
                module_path!()
            );
            eprintln!(
                "SKIPPED: /dev/kvm missing or not accessible; {} needs KVM",
                module_path!()
            );
            return;
        }
    };
}
