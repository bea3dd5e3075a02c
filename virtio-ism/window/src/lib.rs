// SPDX-License-Identifier: Apache-2.0
//! The virtio-ism shared-memory BAR on a hypervisor, for any VMM.
//!
//! [`virtio_ism::Ism`] asks its VMM to map pool regions into its window ([`virtio_ism::ShmWindow`])
//! and to bind doorbell slots to eventfds ([`virtio_ism::NotifyWiring`]). This crate does both
//! on top of two small traits a VMM implements with its hypervisor: [`SlotBackend`] (memory
//! slots) and [`IoEventRegistrar`] (ioeventfds). [`IsmBar`] ties them together and serves the
//! guest accesses that exit to the VMM. `ism-vmm` implements the traits on kvm-ioctls,
//! cloud-hypervisor on its `hypervisor::Vm`.

mod bar;
mod notify;
mod window;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use bar::IsmBar;
pub use notify::{IoEventRegistrar, IoEventWiring};
pub use window::{SlotBackend, SlotWindow, WindowCounters, WriteOutcome};
