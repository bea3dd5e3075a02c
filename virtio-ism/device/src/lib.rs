// SPDX-License-Identifier: Apache-2.0
//! virtio-ism device model, independent of KVM and of the transport.
//!
//! [`Ism`] implements [`virtio_device::VirtioDevice`]. It takes regions from the host pool
//! through an [`virtio_ism_pool_api::PoolSession`], maps them into its shared-memory window through a
//! [`ShmWindow`] the VMM provides, and serves the control queue (and, when negotiated, the
//! event queue) from a worker thread. [`IsmHandle`] is the VMM's side door: doorbells
//! ([`KickSink`]), peer kicks and region hotplug. Kicks between VMs take no userspace hop
//! when the VMM provides a [`NotifyWiring`] (KVM ioeventfds on the notify slots, bound to the
//! peers' irqfds, exchanged through the pool). docs/protocol.md is the wire specification.

mod chunks;
pub mod config;
mod ctrl;
mod device;
mod doorbell;
mod events;
mod kick_inbox;
mod kick_routes;
mod metrics;
mod notify;
mod observer;
mod regions;
mod reservation;
mod window;
mod worker;

pub use config::{ConfigError, DraftDefaultPerm, IsmConfig, WindowLayout};
pub use ctrl::{MAX_CHAIN_DESCRIPTORS, MAX_REQUEST_BYTES};
pub use device::{AVAIL_FEATURES, HandleError, Ism, IsmActivateError, IsmError, IsmHandle};
pub use events::MAX_PENDING_EVENTS;
pub use metrics::IsmMetrics;
pub use notify::{MemoryWiring, NotifyWiring, WireOutcome};
pub use observer::{IsmEvent, IsmObserver, perms_text};
pub use regions::MAX_MSIX_VECTOR;
pub use reservation::Reservation;
pub use window::{KickSink, ShmWindow};
pub use worker::{IsmWorker, WorkerError};

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
#[cfg(test)]
mod tests;
