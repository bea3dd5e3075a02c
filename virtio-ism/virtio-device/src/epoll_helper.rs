// SPDX-License-Identifier: Apache-2.0
//! The one event loop every device worker thread runs: an epoll set with reserved kill and
//! pause events, parking on pause until resumed, handing every other event to the device.
//! Shaped after cloud-hypervisor's `virtio_devices::epoll_helper::EpollHelper`.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::pause::PauseGate;

/// Why the event loop itself (not the device's handler) failed.
#[derive(Debug, thiserror::Error)]
pub enum EpollHelperError {
    #[error("Failed to create the epoll instance")]
    CreateEpoll(#[source] io::Error),
    #[error("Event token {0} is reserved for the helper's own events")]
    ReservedToken(u64),
    #[error("Failed to register a file descriptor with epoll")]
    Ctl(#[source] io::Error),
    #[error("Failed to wait on epoll")]
    Wait(#[source] io::Error),
}

/// What a device's worker does with the events of its [`EpollHelper`].
pub trait EpollHelperHandler {
    /// The worker's own errors; the loop's failures become one of them.
    type Error: From<EpollHelperError>;

    /// A file descriptor added with `token` is ready (`events`). An error stops the loop.
    fn handle_event(&mut self, token: u64, events: EventSet) -> Result<(), Self::Error>;

    /// Serve what may be pending without a signal. Called once before the first wait (after
    /// parking, if the device was paused when the worker started) and after every resume.
    fn serve_pending(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The wait set with [`EpollHelper::with_timeout`] passed with no event.
    fn timed_out(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// An epoll set for one worker thread, with kill and pause built in.
///
/// The device keeps the kill eventfd and the [`PauseGate`]: [`PauseGate::pause`] returns once
/// the worker has parked (it handles nothing until [`PauseGate::resume`]; events that arrive
/// meanwhile are handled after it), and writing the kill eventfd makes [`EpollHelper::run`]
/// return `Ok` (stop with [`PauseGate::resume_and_kill`] so a parked worker sees it).
///
/// ```
/// use std::os::fd::AsRawFd;
/// use std::sync::Arc;
/// use virtio_device::{EpollHelper, EpollHelperError, EpollHelperHandler, PauseGate};
/// use vmm_sys_util::epoll::EventSet;
/// use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};
///
/// struct Counter {
///     queue_evt: EventFd,
///     kicks: u64,
/// }
///
/// impl EpollHelperHandler for Counter {
///     type Error = EpollHelperError;
///     fn handle_event(&mut self, _token: u64, _events: EventSet) -> Result<(), Self::Error> {
///         self.kicks += self.queue_evt.read().unwrap_or(0);
///         Ok(())
///     }
/// }
///
/// let kill = EventFd::new(EFD_NONBLOCK).unwrap();
/// let pause = Arc::new(PauseGate::new().unwrap());
/// let mut counter = Counter { queue_evt: EventFd::new(EFD_NONBLOCK).unwrap(), kicks: 0 };
/// let mut helper = EpollHelper::new(&kill, pause.clone()).unwrap();
/// helper
///     .add_event(counter.queue_evt.as_raw_fd(), EpollHelper::FIRST_DEVICE_EVENT)
///     .unwrap();
/// counter.queue_evt.write(2).unwrap();
/// kill.write(1).unwrap();
/// // Events are handled in the order epoll reports them; the kill ends the loop.
/// helper.run(&mut counter).unwrap();
/// ```
pub struct EpollHelper {
    epoll: Epoll,
    pause: Arc<PauseGate>,
    /// epoll_wait's timeout in milliseconds; -1 waits for ever.
    timeout_ms: i32,
}

impl EpollHelper {
    /// The kill eventfd's token.
    pub const KILL_EVENT: u64 = 0;
    /// The pause eventfd's token.
    pub const PAUSE_EVENT: u64 = 1;
    /// Tokens below this are the helper's; a device numbers its events from here.
    pub const FIRST_DEVICE_EVENT: u64 = 16;

    /// An epoll set watching `kill_evt` and `pause`'s eventfd. `kill_evt` must stay open while
    /// the helper runs, as must every descriptor added with [`EpollHelper::add_event`] (the
    /// worker owns them).
    pub fn new(kill_evt: &EventFd, pause: Arc<PauseGate>) -> Result<Self, EpollHelperError> {
        let helper = Self {
            epoll: Epoll::new().map_err(EpollHelperError::CreateEpoll)?,
            pause,
            timeout_ms: -1,
        };
        helper.ctl_add(kill_evt.as_raw_fd(), Self::KILL_EVENT)?;
        helper.ctl_add(helper.pause.event().as_raw_fd(), Self::PAUSE_EVENT)?;
        Ok(helper)
    }

    /// Call [`EpollHelperHandler::timed_out`] whenever `timeout` passes without an event
    /// (for sources that cannot signal an eventfd and have to be polled).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        self
    }

    /// Watch `fd` for input; its events reach the handler with `token`, which must be at
    /// least [`EpollHelper::FIRST_DEVICE_EVENT`].
    pub fn add_event(&self, fd: RawFd, token: u64) -> Result<(), EpollHelperError> {
        if token < Self::FIRST_DEVICE_EVENT {
            return Err(EpollHelperError::ReservedToken(token));
        }
        self.ctl_add(fd, token)
    }

    fn ctl_add(&self, fd: RawFd, token: u64) -> Result<(), EpollHelperError> {
        self.epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )
            .map_err(EpollHelperError::Ctl)
    }

    /// Run the loop on this thread until the kill eventfd is written (`Ok`) or the handler
    /// or the loop fails.
    pub fn run<H: EpollHelperHandler>(&mut self, handler: &mut H) -> Result<(), H::Error> {
        let _running = Running::start(&self.pause);
        // A device activated while its VM is paused waits for the resume.
        self.pause.park_if_requested();
        handler.serve_pending()?;
        let mut events = [EpollEvent::default(); 16];
        loop {
            let ready = match self.epoll.wait(self.timeout_ms, &mut events) {
                Ok(ready) => ready,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(EpollHelperError::Wait(e).into()),
            };
            if ready == 0 {
                handler.timed_out()?;
                continue;
            }
            for event in &events[..ready] {
                match event.data() {
                    Self::KILL_EVENT => return Ok(()),
                    Self::PAUSE_EVENT => {
                        // What arrived while parked is still signalled on its eventfd and
                        // comes out of the next wait; the handler serves the rest.
                        if self.pause.park_if_requested() {
                            handler.serve_pending()?;
                        }
                    }
                    token => handler.handle_event(token, event.event_set())?,
                }
            }
        }
    }
}

/// Marks the worker running on the gate for as long as it lives (so `pause` knows whether to
/// wait for a park), also when the handler panics.
struct Running<'a>(&'a PauseGate);

impl<'a> Running<'a> {
    fn start(gate: &'a PauseGate) -> Self {
        gate.set_worker_running(true);
        Self(gate)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.set_worker_running(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
    use std::thread::JoinHandle;

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const QUEUE: u64 = EpollHelper::FIRST_DEVICE_EVENT;
    /// Long enough for a running worker to handle an event on a loaded machine.
    const HANDLED: Duration = Duration::from_secs(5);
    /// How long a parked worker is watched for handling nothing.
    const QUIET: Duration = Duration::from_millis(200);

    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Pending,
        Queue(u64),
        TimedOut,
    }

    /// A device worker that reports everything the helper hands it.
    struct Probe {
        queue_evt: EventFd,
        seen: Sender<Seen>,
    }

    impl EpollHelperHandler for Probe {
        type Error = EpollHelperError;

        fn handle_event(&mut self, token: u64, _events: EventSet) -> Result<(), Self::Error> {
            assert_eq!(token, QUEUE);
            let count = self.queue_evt.read().unwrap_or(0);
            let _ = self.seen.send(Seen::Queue(count));
            Ok(())
        }

        fn serve_pending(&mut self) -> Result<(), Self::Error> {
            let _ = self.seen.send(Seen::Pending);
            Ok(())
        }

        fn timed_out(&mut self) -> Result<(), Self::Error> {
            let _ = self.seen.send(Seen::TimedOut);
            Ok(())
        }
    }

    struct Worker {
        kill: EventFd,
        queue: EventFd,
        pause: Arc<PauseGate>,
        seen: Receiver<Seen>,
        thread: JoinHandle<Result<(), EpollHelperError>>,
    }

    fn spawn(pause: Arc<PauseGate>, timeout: Option<Duration>) -> Worker {
        let kill = EventFd::new(EFD_NONBLOCK).unwrap();
        let queue = EventFd::new(EFD_NONBLOCK).unwrap();
        let (tx, seen) = mpsc::channel();
        let mut probe = Probe {
            queue_evt: queue.try_clone().unwrap(),
            seen: tx,
        };
        let mut helper = EpollHelper::new(&kill, pause.clone()).unwrap();
        if let Some(timeout) = timeout {
            helper = helper.with_timeout(timeout);
        }
        helper
            .add_event(probe.queue_evt.as_raw_fd(), QUEUE)
            .unwrap();
        let worker_kill = kill.try_clone().unwrap();
        let thread = std::thread::spawn(move || {
            let _kill = worker_kill;
            helper.run(&mut probe)
        });
        Worker {
            kill,
            queue,
            pause,
            seen,
            thread,
        }
    }

    impl Worker {
        fn next(&self) -> Seen {
            self.seen
                .recv_timeout(HANDLED)
                .expect("the worker handles it")
        }

        fn assert_quiet(&self) {
            assert_eq!(
                self.seen.recv_timeout(QUIET),
                Err(RecvTimeoutError::Timeout)
            );
        }

        fn stop(self) {
            self.pause.resume_and_kill(&self.kill).unwrap();
            self.thread.join().unwrap().unwrap();
        }
    }

    #[test]
    fn test_kill_ends_the_loop() {
        let worker = spawn(Arc::new(PauseGate::new().unwrap()), None);
        assert_eq!(worker.next(), Seen::Pending);
        worker.queue.write(1).unwrap();
        assert_eq!(worker.next(), Seen::Queue(1));
        worker.kill.write(1).unwrap();
        worker.thread.join().unwrap().unwrap();
    }

    #[test]
    fn test_pause_parks_and_events_during_the_pause_are_handled_after_resume() {
        let worker = spawn(Arc::new(PauseGate::new().unwrap()), None);
        assert_eq!(worker.next(), Seen::Pending);
        worker.pause.pause().unwrap();
        worker.queue.write(3).unwrap();
        worker.assert_quiet();
        worker.pause.resume();
        // Resumed: the pending pass first, then the event that waited on its eventfd.
        assert_eq!(worker.next(), Seen::Pending);
        assert_eq!(worker.next(), Seen::Queue(3));
        // And it goes on serving.
        worker.queue.write(1).unwrap();
        assert_eq!(worker.next(), Seen::Queue(1));
        worker.stop();
    }

    #[test]
    fn test_kill_stops_a_paused_worker() {
        let worker = spawn(Arc::new(PauseGate::new().unwrap()), None);
        assert_eq!(worker.next(), Seen::Pending);
        worker.pause.pause().unwrap();
        worker.queue.write(1).unwrap();
        let seen = worker.seen;
        worker.pause.resume_and_kill(&worker.kill).unwrap();
        worker.thread.join().unwrap().unwrap();
        // Whatever it did on its way out, the worker has ended.
        drop(seen);
    }

    #[test]
    fn test_a_worker_started_while_paused_waits_for_resume() {
        let pause = Arc::new(PauseGate::new().unwrap());
        pause.pause().unwrap();
        let worker = spawn(pause, None);
        worker.queue.write(1).unwrap();
        worker.assert_quiet();
        worker.pause.resume();
        assert_eq!(worker.next(), Seen::Pending);
        assert_eq!(worker.next(), Seen::Queue(1));
        worker.stop();
    }

    #[test]
    fn test_timeout_reaches_the_handler() {
        let worker = spawn(
            Arc::new(PauseGate::new().unwrap()),
            Some(Duration::from_millis(1)),
        );
        assert_eq!(worker.next(), Seen::Pending);
        assert_eq!(worker.next(), Seen::TimedOut);
        worker.stop();
    }

    #[test]
    fn test_reserved_tokens_are_refused() {
        let kill = EventFd::new(EFD_NONBLOCK).unwrap();
        let helper = EpollHelper::new(&kill, Arc::new(PauseGate::new().unwrap())).unwrap();
        let other = EventFd::new(EFD_NONBLOCK).unwrap();
        for token in [EpollHelper::KILL_EVENT, EpollHelper::PAUSE_EVENT, 15] {
            assert!(matches!(
                helper.add_event(other.as_raw_fd(), token),
                Err(EpollHelperError::ReservedToken(t)) if t == token
            ));
        }
    }
}
