// SPDX-License-Identifier: Apache-2.0
//! A session's event queue and the eventfd that signals it.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use rustix::event::EventfdFlags;

use crate::session::PoolEvent;

/// Events a session has not taken yet are capped so that a session that never reads them
/// cannot grow the pool's memory without bound; beyond it the oldest are dropped.
pub const MAX_QUEUED_EVENTS: usize = 16384;

/// Pending events of one session plus a non-blocking eventfd that is readable while some
/// may be pending.
#[derive(Debug)]
pub struct EventQueue {
    queue: Mutex<VecDeque<PoolEvent>>,
    eventfd: OwnedFd,
}

impl EventQueue {
    pub fn new() -> std::io::Result<Self> {
        let eventfd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(EventQueue {
            queue: Mutex::new(VecDeque::new()),
            eventfd,
        })
    }

    pub fn push(&self, event: PoolEvent) {
        {
            let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if queue.len() >= MAX_QUEUED_EVENTS {
                log::warn!("Event queue full, dropping oldest event");
                queue.pop_front();
            }
            queue.push_back(event);
        }
        // Only fails if the counter would overflow, and then it is readable anyway.
        let _ = rustix::io::write(&self.eventfd, &1u64.to_ne_bytes());
    }

    /// Takes every queued event. The eventfd is reset first, so an event pushed while this
    /// runs either is returned now or leaves the eventfd readable: no wakeup is lost.
    pub fn take(&self) -> Vec<PoolEvent> {
        let mut counter = [0u8; 8];
        // EAGAIN just means nothing was signalled.
        let _ = rustix::io::read(&self.eventfd, &mut counter);
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.drain(..).collect()
    }

    pub fn raw_fd(&self) -> RawFd {
        self.eventfd.as_fd().as_raw_fd()
    }

    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.eventfd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Token;

    fn readable(queue: &EventQueue) -> bool {
        let fd = queue.fd();
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(
            &mut fds,
            Some(&rustix::event::Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            }),
        )
        .unwrap()
            == 1
    }

    #[test]
    fn test_event_queue_signals_and_resets() {
        let queue = EventQueue::new().unwrap();
        assert!(!readable(&queue));
        queue.push(PoolEvent::Updated { token: Token(7) });
        assert!(readable(&queue));
        assert_eq!(queue.take(), vec![PoolEvent::Updated { token: Token(7) }]);
        assert!(!readable(&queue));
        assert!(queue.take().is_empty());
    }

    #[test]
    fn test_event_queue_is_bounded() {
        let queue = EventQueue::new().unwrap();
        for i in 0..(MAX_QUEUED_EVENTS as u64 + 10) {
            queue.push(PoolEvent::Updated { token: Token(i) });
        }
        let events = queue.take();
        assert_eq!(events.len(), MAX_QUEUED_EVENTS);
        assert_eq!(events[0], PoolEvent::Updated { token: Token(10) });
    }
}
