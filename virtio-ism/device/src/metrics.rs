// SPDX-License-Identifier: Apache-2.0
//! Device counters: plain relaxed atomics, read by `VirtioDevice::counters`.

use std::num::Wrapping;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_device::Counters;

#[derive(Debug, Default)]
pub struct IsmMetrics {
    /// Control requests processed (valid or not).
    pub ctrl_commands: AtomicU64,
    /// Control requests answered with a status other than OK, or dropped as malformed.
    pub ctrl_errors: AtomicU64,
    /// Regions currently held (allocated, attached or hot-added).
    pub regions_attached: AtomicU64,
    /// Bytes currently mapped into the window.
    pub bytes_mapped: AtomicU64,
    /// Doorbell writes handled (`handle_notify`): every kick that took the trap route.
    pub kicks: AtomicU64,
    /// Trapped kicks for a region no peer doorbell was known for yet: the peers' doorbells
    /// were still on their way from the pool (a kick right after a peer bound its vector, or
    /// right after this device attached), or no peer had bound one. Each is held for the
    /// worker, which absorbs the pool's reports and rings the doorbells they brought.
    pub kicks_without_doorbell: AtomicU64,
    /// Held kicks (`kicks_without_doorbell`) the worker delivered once it had absorbed the
    /// pool's doorbell reports; the rest found no doorbell then either (no peer had bound a
    /// vector: nothing is raised, as for any kick to a peer without a vector).
    pub kicks_delivered_late: AtomicU64,
    /// Trapped kicks at the wired slot of a region whose route was zero- or one-hop when the
    /// device handled them: the write landed while the slot was being re-wired (the route is
    /// rebuilt, unwire then wire, whenever the pool reports the region's doorbells changed,
    /// and after a BAR move). Delivered through the doorbells all the same.
    pub kicks_trapped_while_wired: AtomicU64,
    /// Kicks received from peers and raised as an interrupt.
    pub kicks_delivered: AtomicU64,
    /// Peers' kicks recorded in a region's pending bit (EVENT_VECTOR_PENDING_SET) before
    /// its vector was raised.
    pub kicks_pending: AtomicU64,
    /// Pending-bit kicks whose bit could not be set (the address left guest memory); the
    /// vector was raised all the same.
    pub pending_bit_faults: AtomicU64,
    /// Kicks that came through a one-hop eventfd (several peers) and were fanned out.
    pub kicks_one_hop: AtomicU64,
    /// Peer doorbells written by the device (one-hop and trap routes).
    pub doorbell_writes: AtomicU64,
    /// Regions whose notify slot signals the only peer's doorbell in the kernel now.
    pub kick_routes_zero_hop: AtomicU64,
    /// Regions whose notify slot signals the device's one-hop eventfd now.
    pub kick_routes_one_hop: AtomicU64,
    /// Times a notify slot got a slower route than wanted because the VMM could not wire
    /// it (KVM limits) or an eventfd could not be set up.
    pub kick_fallbacks: AtomicU64,
    /// Events written to the event queue.
    pub events_delivered: AtomicU64,
    /// Events dropped because the driver posted no buffers in time.
    pub events_dropped: AtomicU64,
    /// Event-queue buffers returned unused because they were malformed.
    pub event_errors: AtomicU64,
}

impl IsmMetrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }

    pub fn sub(counter: &AtomicU64, value: u64) {
        counter.fetch_sub(value, Ordering::Relaxed);
    }

    pub fn counters(&self) -> Counters {
        let get = |c: &AtomicU64| Wrapping(c.load(Ordering::Relaxed));
        Counters::from([
            ("ctrl_commands", get(&self.ctrl_commands)),
            ("ctrl_errors", get(&self.ctrl_errors)),
            ("regions_attached", get(&self.regions_attached)),
            ("bytes_mapped", get(&self.bytes_mapped)),
            ("kicks", get(&self.kicks)),
            ("kicks_without_doorbell", get(&self.kicks_without_doorbell)),
            ("kicks_delivered_late", get(&self.kicks_delivered_late)),
            (
                "kicks_trapped_while_wired",
                get(&self.kicks_trapped_while_wired),
            ),
            ("kicks_delivered", get(&self.kicks_delivered)),
            ("kicks_pending", get(&self.kicks_pending)),
            ("pending_bit_faults", get(&self.pending_bit_faults)),
            ("kicks_one_hop", get(&self.kicks_one_hop)),
            ("doorbell_writes", get(&self.doorbell_writes)),
            ("kick_routes_zero_hop", get(&self.kick_routes_zero_hop)),
            ("kick_routes_one_hop", get(&self.kick_routes_one_hop)),
            ("kick_fallbacks", get(&self.kick_fallbacks)),
            ("events_delivered", get(&self.events_delivered)),
            ("events_dropped", get(&self.events_dropped)),
            ("event_errors", get(&self.event_errors)),
        ])
    }
}
