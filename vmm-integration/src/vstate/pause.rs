// SPDX-License-Identifier: Apache-2.0
//! Pausing the vCPUs (`vm.pause` / `vm.resume`), as cloud-hypervisor does it: the main thread
//! raises a flag and sends each vCPU thread the kick signal; the signal handler sets the
//! thread's `kvm_run.immediate_exit`, so KVM_RUN returns EINTR even when the signal landed
//! just before the thread entered it; the thread sees the flag and parks on a condition
//! variable until resume (or teardown) wakes it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

thread_local! {
    /// `&mut kvm_run.immediate_exit` of the vCPU running on this thread (null elsewhere).
    /// Const-initialised with no destructor, so reading it from a signal handler is a plain
    /// TLS load.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// Called by a vCPU thread before its first KVM_RUN, with its `kvm_run.immediate_exit`.
/// The pointer must stay valid for the thread's life (the vCPU's kvm_run mapping does).
pub fn register_immediate_exit(flag: *mut u8) {
    IMMEDIATE_EXIT.with(|cell| cell.set(flag));
}

/// The body of the kick signal's handler: make the current (or next) KVM_RUN of this
/// thread return at once. Async-signal-safe: one TLS load and one volatile store.
pub fn on_kick_signal() {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: a non-null pointer was registered by this thread's vCPU and points into its
        // kvm_run mapping, which outlives the thread's run loop; a u8 store cannot tear.
        unsafe { flag.write_volatile(1) };
    }
}

/// Why pausing did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("{parked} of {total} vCPUs stopped within {waited:?}")]
    Timeout {
        parked: usize,
        total: usize,
        waited: Duration,
    },
    /// The vCPUs stopped but a device's worker did not (they were resumed again).
    #[error("The vCPUs stopped but a device did not")]
    Device(#[source] crate::devices::PauseError),
}

#[derive(Default)]
struct Parking {
    /// vCPU threads parked now.
    parked: usize,
}

/// Shared by the main thread and every vCPU thread.
#[derive(Default)]
pub struct PauseState {
    requested: AtomicBool,
    parking: Mutex<Parking>,
    changed: Condvar,
}

impl PauseState {
    fn lock(&self) -> MutexGuard<'_, Parking> {
        self.parking.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a pause is asked for (checked by vCPU threads between KVM_RUNs).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// vCPU side: park until the pause is lifted or `stop` is set.
    pub fn park(&self, stop: &AtomicBool) {
        let mut parking = self.lock();
        parking.parked += 1;
        self.changed.notify_all();
        while self.requested() && !stop.load(Ordering::Acquire) {
            parking = self
                .changed
                .wait(parking)
                .unwrap_or_else(|e| e.into_inner());
        }
        parking.parked -= 1;
        self.changed.notify_all();
    }

    /// Main-thread side: ask every vCPU to park, calling `kick` until `total` of them have
    /// (a kick is a signal to each thread still in or about to enter KVM_RUN). On timeout
    /// the pause is lifted again, so the VM keeps running.
    pub fn pause(
        &self,
        total: usize,
        timeout: Duration,
        mut kick: impl FnMut(),
    ) -> Result<(), PauseError> {
        self.requested.store(true, Ordering::Release);
        let start = Instant::now();
        let mut parking = self.lock();
        while parking.parked < total {
            if start.elapsed() >= timeout {
                let parked = parking.parked;
                drop(parking);
                self.resume();
                return Err(PauseError::Timeout {
                    parked,
                    total,
                    waited: timeout,
                });
            }
            drop(parking);
            kick();
            parking = self.lock();
            // Re-kick every few milliseconds: a thread that was between exits when the
            // first signal came sees immediate_exit, but one that exited on its own (VM
            // error) never parks, and the timeout handles that.
            parking = self
                .changed
                .wait_timeout(parking, Duration::from_millis(5))
                .map(|(guard, _)| guard)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        Ok(())
    }

    /// Lift the pause and wake every parked vCPU.
    pub fn resume(&self) {
        let _parking = self.lock();
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }

    /// Wake parked vCPUs so they see `stop` (teardown).
    pub fn wake_all(&self) {
        let _parking = self.lock();
        self.changed.notify_all();
    }

    /// How many vCPUs are parked now.
    #[cfg(test)]
    pub fn parked(&self) -> usize {
        self.lock().parked
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Threads that spin until asked to pause, as a vCPU loop does, counting iterations.
    fn spinners(
        n: usize,
        state: &Arc<PauseState>,
        stop: &Arc<AtomicBool>,
    ) -> (
        Vec<std::thread::JoinHandle<()>>,
        Arc<std::sync::atomic::AtomicU64>,
    ) {
        let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads = (0..n)
            .map(|_| {
                let (state, stop, count) = (state.clone(), stop.clone(), count.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        if state.requested() {
                            state.park(&stop);
                            continue;
                        }
                        count.fetch_add(1, Ordering::Relaxed);
                        std::thread::yield_now();
                    }
                })
            })
            .collect();
        (threads, count)
    }

    #[test]
    fn test_pause_parks_every_thread_and_resume_lets_them_run() {
        let state = Arc::new(PauseState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (threads, count) = spinners(3, &state, &stop);
        state.pause(3, Duration::from_secs(5), || {}).unwrap();
        assert_eq!(state.parked(), 3);
        let frozen = count.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(count.load(Ordering::Relaxed), frozen);
        state.resume();
        while count.load(Ordering::Relaxed) == frozen {
            std::thread::yield_now();
        }
        // Paused again, a stop still ends the threads.
        state.pause(3, Duration::from_secs(5), || {}).unwrap();
        stop.store(true, Ordering::Release);
        state.wake_all();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(state.parked(), 0);
    }

    #[test]
    fn test_pause_times_out_and_lifts_itself_when_a_thread_never_parks() {
        let state = Arc::new(PauseState::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (threads, _) = spinners(1, &state, &stop);
        let mut kicks = 0;
        let err = state
            .pause(2, Duration::from_millis(100), || kicks += 1)
            .unwrap_err();
        assert!(
            matches!(
                err,
                PauseError::Timeout {
                    parked: 1,
                    total: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(kicks > 1, "kicked again while waiting");
        assert!(!state.requested());
        stop.store(true, Ordering::Release);
        state.wake_all();
        for t in threads {
            t.join().unwrap();
        }
    }
}
