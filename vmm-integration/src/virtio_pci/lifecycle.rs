// SPDX-License-Identifier: Apache-2.0
//! Device activation and reset off the vCPU thread.
//!
//! A driver's DRIVER_OK (or its reset, a status write of 0) lands on the vCPU that wrote the
//! status register. Activating a device starts its worker thread and resetting one stops the
//! worker and gives its regions back to the pool (broker IPC, memfds): work a vCPU's seccomp
//! filter should not have to allow. So the transport hands that step, as a [`Job`], to the
//! `device-manager` thread ([`DeviceManager`]) and waits for the outcome, the way
//! cloud-hypervisor's vCPU queues a `VirtioPciDeviceActivator` for its VMM thread and waits on
//! its barrier. The vCPU only queues and waits (futex); the device workers start from the
//! device-manager thread, and their filters stack on its filter.
//!
//! The vCPU waits (holding the transport's lock), so what the guest sees is unchanged: the
//! driver's next access to the device (its status read after DRIVER_OK or after a reset, a
//! queue notification) happens after the device was activated or reset. A notification right
//! after DRIVER_OK is not lost either way: the queue's ioeventfd is registered before the job
//! is queued, and the worker finds the count already in the eventfd when it starts.
//!
//! [`Lifecycle::inline`] runs the job on the calling thread instead (unit tests, and test
//! benches that drive the transport without a VMM).

use std::collections::VecDeque;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use virtio_device::{ActivateError, ActivationContext, VirtioDevice};

/// What the transport asks of the device.
pub enum Job {
    /// `VirtioDevice::activate` (DRIVER_OK).
    Activate(ActivationContext),
    /// `VirtioDevice::reset` (the driver wrote 0 to device_status).
    Reset,
}

/// How a job ended.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("Device refused to activate")]
    Device(#[source] ActivateError),
    #[error("The device-manager thread is gone (the VMM is shutting down)")]
    Stopped,
}

struct Request {
    id: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    job: Job,
    done: SyncSender<Result<(), JobError>>,
}

impl Request {
    fn run(self) {
        let result = run_job(&self.id, &self.device, self.job);
        // The waiter only goes away if its thread ended.
        let _ = self.done.send(result);
    }
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_job(id: &str, device: &Mutex<dyn VirtioDevice>, job: Job) -> Result<(), JobError> {
    match job {
        Job::Activate(context) => {
            log::debug!("{id}: activating");
            lock(device).activate(context).map_err(JobError::Device)
        }
        Job::Reset => {
            log::debug!("{id}: resetting");
            // The returned interrupt object is the transport's; nothing to take back.
            let _ = lock(device).reset();
            Ok(())
        }
    }
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Request>,
    stopped: bool,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next job, waiting for one; `None` once stopped.
    fn next(&self) -> Option<Request> {
        let mut queue = self.lock();
        loop {
            if queue.stopped {
                return None;
            }
            if let Some(request) = queue.pending.pop_front() {
                return Some(request);
            }
            queue = self.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn stop(&self) {
        let mut queue = self.lock();
        queue.stopped = true;
        // Dropping a request wakes its waiter with `Stopped`.
        queue.pending.clear();
        self.wake.notify_all();
    }
}

/// Where a transport's jobs run; cheap to clone, one per transport.
#[derive(Clone)]
pub struct Lifecycle {
    deferred: Option<Arc<Shared>>,
}

impl Lifecycle {
    /// Jobs run on the thread that asks (no device-manager thread).
    pub fn inline() -> Self {
        Self { deferred: None }
    }

    /// Run `job` for `device` where this lifecycle runs jobs and wait for the outcome.
    pub fn run(
        &self,
        id: &str,
        device: &Arc<Mutex<dyn VirtioDevice>>,
        job: Job,
    ) -> Result<(), JobError> {
        let Some(shared) = &self.deferred else {
            return run_job(id, device, job);
        };
        let (done, outcome) = sync_channel(1);
        {
            let mut queue = shared.lock();
            if queue.stopped {
                return Err(JobError::Stopped);
            }
            queue.pending.push_back(Request {
                id: id.to_owned(),
                device: device.clone(),
                job,
                done,
            });
            shared.wake.notify_one();
        }
        outcome.recv().unwrap_or(Err(JobError::Stopped))
    }
}

/// The queue of jobs the `device-manager` thread runs.
pub struct DeviceManager {
    shared: Arc<Shared>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceManager {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared::default()),
        }
    }

    /// The handle transports queue their jobs on.
    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle {
            deferred: Some(self.shared.clone()),
        }
    }

    /// Start the `device-manager` thread; `on_start` runs first in it (the VMM applies the
    /// thread's seccomp filter there).
    pub fn spawn(
        self,
        on_start: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<DeviceManagerThread> {
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("device-manager".into())
            .spawn(move || {
                on_start();
                while let Some(request) = shared.next() {
                    request.run();
                }
            })?;
        Ok(DeviceManagerThread {
            shared: self.shared,
            handle: Some(handle),
        })
    }

    /// Jobs queued and not yet run.
    #[cfg(test)]
    pub fn pending(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Run the queued jobs on this thread (what the device-manager thread does), returning
    /// how many ran.
    #[cfg(test)]
    pub fn run_pending(&self) -> usize {
        let mut ran = 0;
        loop {
            let Some(request) = self.shared.lock().pending.pop_front() else {
                return ran;
            };
            request.run();
            ran += 1;
        }
    }
}

/// The running `device-manager` thread; stopped and joined on drop.
pub struct DeviceManagerThread {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl DeviceManagerThread {
    /// Stop taking jobs (a job still queued fails with [`JobError::Stopped`]) and join the
    /// thread once it finished the job it is running. Call it after the vCPUs stopped, so no
    /// driver is left waiting on a job that will not run.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.shared.stop();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

impl Drop for DeviceManagerThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}
