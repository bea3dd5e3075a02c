// SPDX-License-Identifier: Apache-2.0
//! virtio-rng (virtio 1.2, 5.4): one request queue whose device-writable buffers are filled
//! from an entropy source file (normally /dev/urandom).
//!
//! The control plane (this struct) handles features and the lifecycle; activation moves the
//! queue into a worker thread named "virtio-rng" that runs virtio-device's [`EpollHelper`] on
//! the queue notification eventfd, with kill and pause (`vm.pause` parks it: no entropy and no
//! used-ring entries reach a paused guest).

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
    ActivateError, ActivationContext, Counters, EpollHelper, EpollHelperError, EpollHelperHandler,
    GuestMemoryHandle, PauseGate, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
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

const EVENT_QUEUE: u64 = EpollHelper::FIRST_DEVICE_EVENT;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("Failed to open the entropy source {0}")]
    OpenSource(PathBuf, #[source] io::Error),
    #[error("Failed to clone the entropy source for the worker")]
    CloneSource(#[source] io::Error),
    #[error("Failed to create the pause eventfd")]
    CreatePauseEvent(#[source] io::Error),
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
    /// Parks the worker while the VM is paused.
    pause: Arc<PauseGate>,
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
            pause: Arc::new(PauseGate::new().map_err(RngError::CreatePauseEvent)?),
        })
    }

    fn stop_worker(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        let DeviceState::Active(worker) = std::mem::replace(&mut self.state, DeviceState::Inactive)
        else {
            return None;
        };
        // A parked worker must wake up to see the kill.
        if let Err(e) = self.pause.resume_and_kill(&worker.kill) {
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
            pause: self.pause.clone(),
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

    /// The worker parks: no buffer is filled or returned until resume; requests the guest
    /// queued meanwhile are served then.
    fn pause(&mut self) -> io::Result<()> {
        self.pause.pause()
    }

    fn resume(&mut self) {
        self.pause.resume();
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
    pause: Arc<PauseGate>,
}

impl RngWorker {
    /// The event loop; returns on kill. The epoll set is made here, on the worker thread
    /// (its filter allows epoll_create1), not on the thread that activates the device.
    fn run(mut self) {
        let result = EpollHelper::new(&self.kill_evt, self.pause.clone())
            .and_then(|helper| {
                helper.add_event(self.queue_evt.as_raw_fd(), EVENT_QUEUE)?;
                Ok(helper)
            })
            .and_then(|mut helper| helper.run(&mut self));
        if let Err(e) = result {
            error!("virtio-rng: worker stopped: {e}");
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

impl EpollHelperHandler for RngWorker {
    type Error = EpollHelperError;

    fn handle_event(&mut self, token: u64, _events: EventSet) -> Result<(), Self::Error> {
        match token {
            EVENT_QUEUE => {
                // EAGAIN only means another wakeup already drained it.
                let _ = self.queue_evt.read();
                self.process_queue();
            }
            other => warn!("virtio-rng: unknown epoll event {other}"),
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::io::Write;
    use std::sync::Mutex;
    use std::sync::mpsc::{self, Receiver, Sender};
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    /// How long a paused worker is watched for writing nothing.
    const QUIET: Duration = Duration::from_millis(200);
    const BUFFER: GuestAddress = GuestAddress(0x20000);

    /// Tells the test each time the worker raises the queue interrupt.
    struct SignalingInterrupt(Mutex<Sender<VirtioInterruptType>>);

    impl VirtioInterrupt for SignalingInterrupt {
        fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
            let _ = self.0.lock().unwrap().send(int_type);
            Ok(())
        }
    }

    struct Active {
        rng: VirtioRng,
        mem: GuestMemoryMmap,
        queue: MockSplitQueue<'static, GuestMemoryMmap>,
        queue_evt: EventFd,
        interrupts: Receiver<VirtioInterruptType>,
    }

    impl Active {
        fn used_idx(&self) -> u16 {
            self.mem
                .read_obj(self.queue.used_addr().unchecked_add(2))
                .unwrap()
        }
    }

    /// A virtio-rng reading a known pattern, activated on a mock queue in fresh guest memory.
    fn activate() -> Active {
        let pattern: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(7) | 1).collect();
        let src = std::env::temp_dir().join(format!(
            "ism-rng-pause-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::File::create(&src)
            .unwrap()
            .write_all(&pattern)
            .unwrap();
        let mut rng = VirtioRng::new(&src).unwrap();
        std::fs::remove_file(&src).unwrap();

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40000)]).unwrap();
        // The mock borrows guest memory for its whole life; leak one small map per test.
        let leaked: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
        let queue = MockSplitQueue::create(leaked, GuestAddress(0x10000), 16);
        let queue_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (tx, interrupts) = mpsc::channel();
        rng.ack_features(VIRTIO_F_VERSION_1);
        rng.activate(ActivationContext {
            mem: GuestMemoryAtomic::new(mem.clone()),
            interrupt_cb: Arc::new(SignalingInterrupt(Mutex::new(tx))),
            queues: vec![(
                0,
                queue.create_queue::<Queue>().unwrap(),
                queue_evt.try_clone().unwrap(),
            )],
        })
        .unwrap();
        Active {
            rng,
            mem,
            queue,
            queue_evt,
            interrupts,
        }
    }

    #[test]
    fn test_a_paused_worker_fills_no_buffer_until_resumed() {
        let mut dev = activate();
        dev.rng.pause().unwrap();

        // The guest queues a 16-byte buffer and notifies while the VM is paused.
        let chain = [RawDescriptor::from(SplitDescriptor::new(
            BUFFER.0,
            16,
            VRING_DESC_F_WRITE as u16,
            0,
        ))];
        dev.queue.add_desc_chains(&chain, 0).unwrap();
        dev.queue_evt.write(1).unwrap();

        assert!(dev.interrupts.recv_timeout(QUIET).is_err());
        assert_eq!(dev.used_idx(), 0, "no used-ring entry while paused");
        let mut buf = [0u8; 16];
        dev.mem.read_slice(&mut buf, BUFFER).unwrap();
        assert_eq!(buf, [0; 16], "no entropy written while paused");
        assert_eq!(dev.rng.metrics.requests.load(Ordering::Relaxed), 0);

        dev.rng.resume();
        assert_eq!(
            dev.interrupts.recv_timeout(Duration::from_secs(5)),
            Ok(VirtioInterruptType::Queue(0))
        );
        assert_eq!(dev.used_idx(), 1);
        dev.mem.read_slice(&mut buf, BUFFER).unwrap();
        let expected: Vec<u8> = (0..16u8).map(|i| i.wrapping_mul(7) | 1).collect();
        assert_eq!(buf.as_slice(), expected.as_slice());
        dev.rng.shutdown();
    }

    #[test]
    fn test_reset_stops_a_paused_worker() {
        let mut dev = activate();
        dev.rng.pause().unwrap();
        let started = Instant::now();
        assert!(dev.rng.reset().is_some());
        // Joined: a parked worker was woken for the kill rather than left hanging.
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(dev.rng.state, DeviceState::Inactive));
    }
}
