// SPDX-License-Identifier: Apache-2.0
//! virtio-rng (virtio 1.2, 5.4): one request queue whose device-writable buffers are filled
//! from an entropy source file (normally /dev/urandom).
//!
//! The control plane (this struct) handles features and the lifecycle; activation moves the
//! queue into a worker thread named "virtio-rng" that runs an epoll loop on the queue
//! notification eventfd and a kill eventfd.

use std::fs::File;
use std::io::{self, Read};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use log::{error, warn};
use virtio_device::{
    ActivateError, ActivationContext, Counters, GuestMemoryHandle, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Virtio device ID of an entropy device.
pub const VIRTIO_ID_RNG: u32 = 4;
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request, whatever the guest asks for, so one request cannot
/// make the VMM allocate or read without bound.
pub const MAX_BYTES_PER_REQUEST: u32 = 64 * 1024;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX;

const EVENT_QUEUE: u64 = 0;
const EVENT_KILL: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("Failed to open the entropy source {0}")]
    OpenSource(PathBuf, #[source] io::Error),
    #[error("Failed to clone the entropy source for the worker")]
    CloneSource(#[source] io::Error),
}

/// Increment-only counters, shared with the worker.
#[derive(Default)]
pub struct RngMetrics {
    /// Descriptor chains answered.
    pub requests: AtomicU64,
    /// Entropy bytes written to the guest.
    pub bytes: AtomicU64,
    /// Chains or descriptors that could not be served (bad address, read-only buffer,
    /// source read error).
    pub failures: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
}

struct ActiveWorker {
    kill: EventFd,
    thread: JoinHandle<()>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

enum DeviceState {
    Inactive,
    Active(ActiveWorker),
}

pub struct VirtioRng {
    source: File,
    queue_sizes: [u16; 1],
    acked_features: u64,
    state: DeviceState,
    metrics: Arc<RngMetrics>,
}

impl VirtioRng {
    pub fn new(src: &Path) -> Result<VirtioRng, RngError> {
        let source = File::open(src).map_err(|e| RngError::OpenSource(src.to_owned(), e))?;
        Ok(VirtioRng {
            source,
            queue_sizes: [QUEUE_SIZE],
            acked_features: 0,
            state: DeviceState::Inactive,
            metrics: Arc::new(RngMetrics::default()),
        })
    }

    fn stop_worker(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        let DeviceState::Active(worker) = std::mem::replace(&mut self.state, DeviceState::Inactive)
        else {
            return None;
        };
        if let Err(e) = worker.kill.write(1) {
            error!("virtio-rng: failed to signal the worker to stop: {e}");
        }
        if worker.thread.join().is_err() {
            error!("virtio-rng: worker thread panicked");
        }
        Some(worker.interrupt)
    }
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn ack_features(&mut self, value: u64) {
        self.acked_features = value & AVAIL_FEATURES;
    }

    fn activate(&mut self, context: ActivationContext) -> Result<(), ActivateError> {
        if matches!(self.state, DeviceState::Active(_)) {
            return Err(ActivateError::AlreadyActive);
        }
        let ActivationContext {
            mem,
            interrupt_cb,
            queues,
        } = context;
        let enabled = queues.len();
        let Ok::<[_; 1], _>([(_, queue, queue_evt)]) = queues.try_into() else {
            return Err(ActivateError::BadQueueCount { needed: 1, enabled });
        };
        let kill = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::CloneEventFd)?;
        let source = self
            .source
            .try_clone()
            .map_err(|e| ActivateError::device(RngError::CloneSource(e)))?;
        let worker = RngWorker {
            mem,
            queue,
            queue_evt,
            kill_evt: kill.try_clone().map_err(ActivateError::CloneEventFd)?,
            interrupt: interrupt_cb.clone(),
            source,
            metrics: self.metrics.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("virtio-rng".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::Thread::RngWorker);
                worker.run()
            })
            .map_err(ActivateError::SpawnWorker)?;
        self.state = DeviceState::Active(ActiveWorker {
            kill,
            thread,
            interrupt: interrupt_cb,
        });
        Ok(())
    }

    fn reset(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        self.acked_features = 0;
        self.stop_worker()
    }

    fn shutdown(&mut self) {
        self.stop_worker();
    }

    fn counters(&self) -> Option<Counters> {
        let m = &self.metrics;
        let get = |c: &AtomicU64| Wrapping(c.load(Ordering::Relaxed));
        Some(Counters::from([
            ("requests", get(&m.requests)),
            ("bytes", get(&m.bytes)),
            ("failures", get(&m.failures)),
            ("interrupts", get(&m.interrupts)),
        ]))
    }
}

impl Drop for VirtioRng {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

/// The data plane: owns the queue while the device is active.
struct RngWorker {
    mem: GuestMemoryHandle,
    queue: Queue,
    queue_evt: EventFd,
    kill_evt: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    source: File,
    metrics: Arc<RngMetrics>,
}

impl RngWorker {
    fn run(mut self) {
        if let Err(e) = self.event_loop() {
            error!("virtio-rng: worker stopped: {e}");
        }
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let epoll = Epoll::new()?;
        for (fd, data) in [
            (self.queue_evt.as_raw_fd(), EVENT_QUEUE),
            (self.kill_evt.as_raw_fd(), EVENT_KILL),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, data),
            )?;
        }
        let mut events = [EpollEvent::default(); 2];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                match ev.data() {
                    EVENT_QUEUE => {
                        // EAGAIN only means another wakeup already drained it.
                        let _ = self.queue_evt.read();
                        self.process_queue();
                    }
                    EVENT_KILL => return Ok(()),
                    other => warn!("virtio-rng: unknown epoll event {other}"),
                }
            }
        }
    }

    /// Answer every available request; raise the queue interrupt if the driver wants one.
    fn process_queue(&mut self) {
        let mem = self.mem.memory();
        let mut used_any = false;
        loop {
            if let Err(e) = self.queue.disable_notification(&*mem) {
                warn!("virtio-rng: cannot disable notifications: {e}");
                self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                return;
            }
            while let Some(chain) = self.queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                let mut written: u32 = 0;
                for desc in chain {
                    if !desc.is_write_only() {
                        self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let want = desc.len().min(MAX_BYTES_PER_REQUEST - written);
                    if want == 0 {
                        break;
                    }
                    match fill_from(&mut self.source, &*mem, desc.addr(), want) {
                        Ok(n) => written += n,
                        Err(e) => {
                            warn!(
                                "virtio-rng: cannot fill {want} bytes at {:#x}: {e}",
                                desc.addr().0
                            );
                            self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
                if let Err(e) = self.queue.add_used(&*mem, head, written) {
                    warn!("virtio-rng: cannot return descriptor {head}: {e}");
                    self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                used_any = true;
                self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .bytes
                    .fetch_add(u64::from(written), Ordering::Relaxed);
            }
            match self.queue.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    warn!("virtio-rng: cannot enable notifications: {e}");
                    self.metrics.failures.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        if !used_any {
            return;
        }
        match self.queue.needs_notification(&*mem) {
            Ok(false) => {}
            Ok(true) | Err(_) => {
                self.metrics.interrupts.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Queue(0)) {
                    warn!("virtio-rng: cannot raise the queue interrupt: {e}");
                }
            }
        }
    }
}

/// Read up to `len` bytes from `source` into guest memory at `addr`; returns bytes written.
fn fill_from<M: Bytes<vm_memory::GuestAddress>>(
    source: &mut File,
    mem: &M,
    addr: vm_memory::GuestAddress,
    len: u32,
) -> io::Result<u32>
where
    M::E: std::error::Error + Send + Sync + 'static,
{
    let mut buf = vec![0u8; len as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    mem.write_slice(&buf[..filled], addr)
        .map_err(io::Error::other)?;
    Ok(filled as u32)
}
