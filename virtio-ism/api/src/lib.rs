// SPDX-License-Identifier: Apache-2.0
//! What a VMM's REST API does with virtio-ism devices, for any VMM: the bodies of
//! `vm.ism-add-region`, `vm.ism-remove-region`, `vm.ism-regions` and `vm.ism-pool-status`
//! ([`types`]), their checks and execution on the VM's devices with the HTTP status of each
//! refusal ([`IsmDevices`], [`IsmApiError`], [`ControlError`]), and [`HandleControl`], which runs them on a
//! device's `virtio_ism::IsmHandle`. `ism-vmm` and cloud-hypervisor serve the same endpoints
//! with it, so the bodies and statuses are the same in both (docs/api.md).

mod error;
mod handle;
mod service;
pub mod types;

pub use error::{Cause, ControlError, IsmApiError, PoolRefusal, error_chain};
pub use handle::HandleControl;
pub use service::{EventSink, IsmControl, IsmDevices, IsmEntry};
