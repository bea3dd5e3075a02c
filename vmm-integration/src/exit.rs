// SPDX-License-Identifier: Apache-2.0
//! Why the VM stopped, as reported to the main thread by vCPUs and devices.

use std::sync::mpsc::{Receiver, Sender, channel};

/// The reason the VMM should stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitEvent {
    /// The guest powered off (ACPI S5 or a KVM shutdown system event).
    Shutdown(&'static str),
    /// The guest asked to reboot; this VMM ends instead, as with cloud-hypervisor's
    /// `--no-reboot`-style callers.
    Reboot(&'static str),
    /// The VM cannot continue; the message says where and why.
    Error(String),
}

impl ExitEvent {
    /// The process exit status for this event.
    pub fn exit_status(&self) -> i32 {
        match self {
            ExitEvent::Shutdown(_) | ExitEvent::Reboot(_) => 0,
            ExitEvent::Error(_) => 1,
        }
    }
}

/// Sends exit events to the main thread; cheap to clone into each vCPU and device.
#[derive(Clone)]
pub struct ExitNotifier {
    tx: Sender<ExitEvent>,
}

impl ExitNotifier {
    pub fn new() -> (Self, Receiver<ExitEvent>) {
        let (tx, rx) = channel();
        (Self { tx }, rx)
    }

    pub fn notify(&self, event: ExitEvent) {
        // The receiver only goes away once the VMM is already tearing down.
        let _ = self.tx.send(event);
    }
}
