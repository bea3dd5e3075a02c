// SPDX-License-Identifier: Apache-2.0
//! The events waiting for the driver's event-queue buffers, and the OVERFLOW marker that
//! replaces them when the driver posts none for too long.

use std::collections::VecDeque;
use std::sync::Arc;

use virtio_ism_proto::{Event, EventType};

use crate::metrics::IsmMetrics;

/// Events kept for the event queue while the driver posts no buffers; past this they are
/// dropped and an OVERFLOW event tells the driver to re-sync with QUERY.
pub const MAX_PENDING_EVENTS: usize = 256;

/// Events not yet written into an event-queue buffer, oldest first.
pub struct PendingEvents {
    events: VecDeque<Event>,
    /// Events were dropped: an OVERFLOW marker goes out before anything else.
    overflowed: bool,
    metrics: Arc<IsmMetrics>,
}

impl PendingEvents {
    pub fn new(metrics: Arc<IsmMetrics>) -> Self {
        Self {
            events: VecDeque::new(),
            overflowed: false,
            metrics,
        }
    }

    /// Forget everything queued (activation, reset).
    pub fn clear(&mut self) {
        self.events.clear();
        self.overflowed = false;
    }

    /// Queue `event`; when [`MAX_PENDING_EVENTS`] are already waiting they are dropped (and
    /// counted) and the driver will see OVERFLOW first.
    pub fn push(&mut self, event: Event) {
        if self.events.len() >= MAX_PENDING_EVENTS {
            IsmMetrics::add(&self.metrics.events_dropped, self.events.len() as u64);
            self.events.clear();
            self.overflowed = true;
        }
        self.events.push_back(event);
    }

    /// Next event to deliver (an OVERFLOW marker first if events were dropped).
    pub fn peek(&self) -> Option<Event> {
        if self.overflowed {
            return Some(Event {
                ev_type: EventType::Overflow.raw(),
                ..Event::default()
            });
        }
        self.events.front().copied()
    }

    /// `delivered` (returned by [`PendingEvents::peek`]) reached the driver.
    pub fn pop(&mut self, delivered: &Event) {
        if self.overflowed {
            if delivered.kind() == EventType::Overflow {
                self.overflowed = false;
            }
        } else if self.events.front() == Some(delivered) {
            self.events.pop_front();
        }
        IsmMetrics::inc(&self.metrics.events_delivered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(token: u64) -> Event {
        Event {
            ev_type: EventType::Attach.raw(),
            token,
            ..Event::default()
        }
    }

    #[test]
    fn test_pending_events_come_out_in_order() {
        let mut pending = PendingEvents::new(Arc::default());
        pending.push(event(1));
        pending.push(event(2));
        let first = pending.peek().unwrap();
        assert_eq!(first.token, 1);
        pending.pop(&first);
        assert_eq!(pending.peek().unwrap().token, 2);
    }

    #[test]
    fn test_pending_events_past_the_cap_become_one_overflow() {
        let metrics = Arc::new(IsmMetrics::default());
        let mut pending = PendingEvents::new(metrics.clone());
        for token in 0..=MAX_PENDING_EVENTS as u64 {
            pending.push(event(token));
        }
        let marker = pending.peek().unwrap();
        assert_eq!(marker.kind(), EventType::Overflow);
        assert_eq!(
            metrics.counters()["events_dropped"].0,
            MAX_PENDING_EVENTS as u64
        );
        pending.pop(&marker);
        // The event that did not fit is kept behind the marker.
        assert_eq!(pending.peek().unwrap().token, MAX_PENDING_EVENTS as u64);
    }
}
