// SPDX-License-Identifier: Apache-2.0
//! Pausing a device worker thread: while the VM is paused (cloud-hypervisor's `Pausable`,
//! `vm.pause`) the worker writes nothing into guest memory. Events that arrive meanwhile stay
//! pending on their eventfds and are served on resume. [`crate::EpollHelper`] does the
//! worker's side; the device keeps the [`PauseGate`] to pause and resume.

use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

/// How long [`PauseGate::pause`] waits for the worker to park before giving up.
const PARK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct GateState {
    /// The VMM wants the worker parked.
    requested: bool,
    /// The worker is parked.
    parked: bool,
    /// A worker thread is running (between its start and its return).
    worker_running: bool,
}

/// Shared by the device (which pauses and resumes) and its worker (which parks).
pub struct PauseGate {
    /// Written on pause so the worker's epoll wakes up and parks.
    evt: EventFd,
    park_timeout: Duration,
    state: Mutex<GateState>,
    changed: Condvar,
}

impl PauseGate {
    /// A gate nobody has asked to pause yet.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            park_timeout: PARK_TIMEOUT,
            state: Mutex::default(),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Written on pause; the worker's epoll set watches it.
    pub(crate) fn event(&self) -> &EventFd {
        &self.evt
    }

    /// Whether the device is paused (a worker started now parks before serving anything).
    pub fn is_requested(&self) -> bool {
        self.lock().requested
    }

    /// Worker side: it started, or it is about to return.
    pub(crate) fn set_worker_running(&self, running: bool) {
        self.lock().worker_running = running;
        self.changed.notify_all();
    }

    /// Ask the worker to park; if one is running, wait until it has.
    /// Fails with `TimedOut` if the worker did not park within 5 s; the pause stays
    /// requested (the caller resumes to undo it).
    pub fn pause(&self) -> io::Result<()> {
        let mut state = self.lock();
        state.requested = true;
        if !state.worker_running {
            return Ok(());
        }
        self.evt.write(1)?;
        let (state, timeout) = self
            .changed
            .wait_timeout_while(state, self.park_timeout, |s| {
                s.requested && s.worker_running && !s.parked
            })
            .unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() && state.worker_running && !state.parked {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the device worker did not pause",
            ));
        }
        Ok(())
    }

    /// Let the worker go on.
    pub fn resume(&self) {
        self.lock().requested = false;
        self.changed.notify_all();
    }

    /// Stop a worker, paused or not: lift the pause so a parked worker wakes up, then write
    /// its kill eventfd.
    pub fn resume_and_kill(&self, kill_evt: &EventFd) -> io::Result<()> {
        self.resume();
        kill_evt.write(1)
    }

    /// Worker side: if a pause is requested, park until resumed. Returns whether it parked.
    pub(crate) fn park_if_requested(&self) -> bool {
        let _ = self.evt.read();
        let mut state = self.lock();
        if !state.requested {
            return false;
        }
        state.parked = true;
        self.changed.notify_all();
        let mut state = self
            .changed
            .wait_while(state, |s| s.requested)
            .unwrap_or_else(|e| e.into_inner());
        state.parked = false;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn test_pause_waits_for_the_worker_to_park_and_resume_releases_it() {
        let gate = Arc::new(PauseGate::new().unwrap());
        let running = Arc::new(AtomicBool::new(true));
        let worker = {
            let gate = gate.clone();
            let running = running.clone();
            gate.set_worker_running(true);
            std::thread::spawn(move || {
                let mut parks = 0;
                while running.load(Ordering::SeqCst) {
                    if gate.park_if_requested() {
                        parks += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                parks
            })
        };
        gate.pause().unwrap();
        assert!(gate.lock().parked);
        gate.resume();
        running.store(false, Ordering::SeqCst);
        assert_eq!(worker.join().unwrap(), 1);
        assert!(!gate.lock().parked);
    }

    #[test]
    fn test_pause_without_a_worker_is_only_recorded() {
        let gate = PauseGate::new().unwrap();
        gate.pause().unwrap();
        assert!(gate.is_requested());
        gate.resume();
        assert!(!gate.is_requested());
    }

    #[test]
    fn test_pause_times_out_when_the_worker_never_parks() {
        let gate = PauseGate {
            park_timeout: Duration::from_millis(50),
            ..PauseGate::new().unwrap()
        };
        // No worker reads the eventfd: a bounded wait, then an error (not a hang).
        gate.set_worker_running(true);
        let started = std::time::Instant::now();
        let err = gate.pause().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= gate.park_timeout);
    }
}
