// SPDX-License-Identifier: Apache-2.0
//! ism-vmm as a library: a rust-vmm based x86_64 VMM hosting virtio-ism (docs/vmm.md).
//!
//! The binaries are thin: `ism-vmm` turns its command line into a [`config::VmConfig`] and an
//! [`config::api::OperatorConfig`] and calls [`run`]; `ism-remote` speaks the REST API with
//! the bodies in [`rest`] and parses its arguments with [`config::option_parser`]. What else
//! is public is what tests outside the crate need, with the `test-utils` feature: tiny PVH
//! guests (`test_guest`) and the PCI root with the virtio-pci transport on a fake KVM
//! (`test_pci`, for the guest driver's host tests). Everything else is internal to the VMM.

mod acpi;
mod api;
mod boot;
mod bus;
pub mod config;
mod control;
mod devices;
mod event_monitor;
mod exit;
mod fd_limit;
mod interrupt;
mod ism_api;
mod layout;
mod legacy;
mod memory;
mod panic_hook;
mod pci;
mod seccomp;
mod terminal;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_guest;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_pci;
mod virtio_pci;
mod vmm;
mod vstate;

pub(crate) use event_monitor::event;

use config::VmConfig;
use config::api::OperatorConfig;
use exit::ExitEvent;

/// The REST API's vocabulary, without the server: routes, request and response bodies, and
/// the router that turns a request line and body into an [`rest::ApiAction`].
pub mod rest {
    pub use crate::api::router::{MAX_BODY_SIZE, RouteError, route};
    pub use crate::api::types::*;
}

/// Install the panic hook that works under every seccomp filter (one line on stderr, then
/// `abort`). Call it first thing in `main`, before any thread starts.
pub fn install_panic_hook() {
    panic_hook::install();
}

/// Run a VM: apply the process-wide seccomp policy, raise the descriptor limit, start the
/// event monitor, build and run the VM until it stops, and tear it down. Errors are printed
/// to stderr; returns the process exit status (0 when the guest powered off or asked to
/// reboot, 1 otherwise).
pub fn run(config: &VmConfig, operator: &OperatorConfig) -> i32 {
    // Before the first thread starts: each thread reads the policy when it applies its filter.
    seccomp::set_policy(seccomp::Policy {
        mode: operator.seccomp,
        embedded_pool: config.ism.iter().any(|ism| ism.pool.is_none()),
    });
    let (needed, why) = fd_limit::descriptors_needed(config);
    match fd_limit::raise(needed, why) {
        Ok(soft) => fd_limit::grow_table(needed, soft),
        Err(e) => {
            eprintln!("Error: {:#}", anyhow::Error::new(e));
            return 1;
        }
    }
    let monitor = match event_monitor::start(operator.event_monitor.as_ref()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("Error: {:#}", anyhow::Error::new(e));
            return 1;
        }
    };
    event!("vmm", "starting");
    let status = match vmm::run_with(config, operator) {
        Ok(event) => {
            match &event {
                ExitEvent::Shutdown(why) => log::warn!("Guest shut down ({why})"),
                ExitEvent::Reboot(why) => log::warn!("Guest requested a reboot ({why}); exiting"),
                ExitEvent::Error(msg) => eprintln!("Error: VM stopped: {msg}"),
            }
            event.exit_status()
        }
        Err(e) => {
            eprintln!("Error: {:#}", anyhow::Error::new(e));
            1
        }
    };
    event!("vmm", "shutdown");
    event_monitor::finish(monitor);
    status
}
