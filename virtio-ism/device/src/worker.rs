// SPDX-License-Identifier: Apache-2.0
//! The data plane: owns the queues and guest memory after activation and serves them, from
//! the [`EpollHelper`] loop on its own thread ("virtio-ism") or synchronously when tests call
//! the `process_*` methods directly.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, error};
use rustix::event::{PollFd, PollFlags, Timespec};
use virtio_device::{
    EpollHelper, EpollHelperError, EpollHelperHandler, GuestMemoryHandle, PauseGate,
    VirtioInterrupt, VirtioInterruptType,
};
use virtio_ism_proto::defs::queues::{CTRL_QUEUE_INDEX, EVENT_QUEUE_INDEX};
use virtio_ism_proto::{Event, WireStruct};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::ctrl::{MAX_CHAIN_DESCRIPTORS, serve_chain};
use crate::kick_inbox::set_pending_bit;
use crate::metrics::IsmMetrics;
use crate::observer::{IsmEvent, ObserverSlot};
use crate::regions::Regions;

/// Everything that can stop the worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("The worker's event loop failed")]
    EventLoop(#[source] EpollHelperError),
    #[error("Failed to read a queue eventfd")]
    ReadQueueEvent(#[source] io::Error),
    #[error("Failed to return a buffer to the used ring")]
    AddUsed(#[source] virtio_queue::Error),
    #[error("Failed to check whether the driver wants an interrupt")]
    NeedsNotification(#[source] virtio_queue::Error),
    #[error("Failed to raise a queue interrupt")]
    Interrupt(#[source] io::Error),
}

impl From<EpollHelperError> for WorkerError {
    fn from(e: EpollHelperError) -> Self {
        Self::EventLoop(e)
    }
}

const EPOLL_CTRL: u64 = EpollHelper::FIRST_DEVICE_EVENT;
const EPOLL_EVENTQ: u64 = EPOLL_CTRL + 1;
const EPOLL_WAKE: u64 = EPOLL_CTRL + 2;
const EPOLL_POOL: u64 = EPOLL_CTRL + 3;
const EPOLL_KICKS: u64 = EPOLL_CTRL + 4;
const EPOLL_INBOX: u64 = EPOLL_CTRL + 5;
/// How often pool events are polled when the session has no event fd.
const POOL_POLL: Duration = Duration::from_millis(100);

/// The queues of an active device and what serving them needs. Generic over how guest
/// memory is reached (`M`), so VMMs with dirty-page bitmaps (cloud-hypervisor's
/// `GuestMemoryMmap<AtomicBitmap>`) use it as they are.
pub struct IsmWorker<M: GuestAddressSpace = GuestMemoryHandle> {
    pub(crate) mem: M,
    pub(crate) ctrl_queue: Queue,
    pub(crate) ctrl_evt: EventFd,
    pub(crate) event_queue: Option<(Queue, EventFd)>,
    pub(crate) regions: Arc<Regions>,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) features: u64,
    pub(crate) metrics: Arc<IsmMetrics>,
    pub(crate) kill_evt: EventFd,
    /// Signalled by `IsmHandle` when it queued events (hotplug, revoke).
    pub(crate) wake_evt: EventFd,
    pub(crate) pool_fd: Option<RawFd>,
    /// Told about every region change (see [`crate::IsmObserver`]).
    pub(crate) observer: Arc<ObserverSlot>,
    pub(crate) pause: Arc<PauseGate>,
}

impl<M> IsmWorker<M>
where
    M: GuestAddressSpace,
    M::M: GuestMemoryBackend,
{
    /// Serve every available control request. Returns whether any was served.
    pub fn process_ctrl_queue(&mut self) -> Result<bool, WorkerError> {
        let mem = self.mem.memory();
        let mut served = false;
        while let Some(chain) = self.ctrl_queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let outcome = serve_chain(
                &*mem,
                chain.take(MAX_CHAIN_DESCRIPTORS + 1),
                &self.regions,
                self.features,
            );
            IsmMetrics::inc(&self.metrics.ctrl_commands);
            if outcome.status != Some(virtio_ism_proto::Status::Ok) {
                IsmMetrics::inc(&self.metrics.ctrl_errors);
            }
            self.ctrl_queue
                .add_used(&*mem, head, outcome.used)
                .map_err(WorkerError::AddUsed)?;
            // After the reply is in the used ring: the observer never delays the guest's
            // answer past what it costs to queue an event.
            if let Some(event) = &outcome.event {
                self.observer.notify(event);
            }
            served = true;
        }
        if served {
            Self::notify(
                &mut self.ctrl_queue,
                &mem,
                &*self.interrupt,
                CTRL_QUEUE_INDEX,
            )?;
        }
        Ok(served)
    }

    /// Deliver pending events into the buffers the driver posted on the event queue.
    /// Returns whether any buffer was used.
    pub fn process_event_queue(&mut self) -> Result<bool, WorkerError> {
        let Some((queue, _)) = self.event_queue.as_mut() else {
            return Ok(false);
        };
        let mem = self.mem.memory();
        let mut used_any = false;
        loop {
            let Some(event) = self.regions.lock().peek_event() else {
                break;
            };
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let bytes: [u8; Event::SIZE] = event.to_bytes().unwrap_or([0; Event::SIZE]);
            let written = write_event(&*mem, chain.take(MAX_CHAIN_DESCRIPTORS + 1), &bytes);
            match written {
                Some(len) => {
                    self.regions.lock().pop_event(&event);
                    queue
                        .add_used(&*mem, head, len)
                        .map_err(WorkerError::AddUsed)?;
                }
                None => {
                    IsmMetrics::inc(&self.metrics.event_errors);
                    queue
                        .add_used(&*mem, head, 0)
                        .map_err(WorkerError::AddUsed)?;
                }
            }
            used_any = true;
        }
        if used_any {
            Self::notify(queue, &mem, &*self.interrupt, EVENT_QUEUE_INDEX)?;
        }
        Ok(used_any)
    }

    /// Take what the pool reports (peer attach/detach, grant updates, revocations) and
    /// deliver the resulting events.
    pub fn process_pool_events(&mut self) -> Result<bool, WorkerError> {
        for report in self.regions.absorb_pool_events() {
            if let Some(event) = IsmEvent::from_pool(&report) {
                self.observer.notify(&event);
            }
        }
        self.process_event_queue()
    }

    /// Fan out kicks that arrived on one-hop eventfds to every peer doorbell. Returns how
    /// many regions were kicked.
    pub fn process_one_hop_kicks(&mut self) -> usize {
        self.regions.lock().serve_one_hop_kicks()
    }

    /// Record peers' kicks of pending-bit regions in driver memory, then raise their
    /// vectors. Returns how many kicks were raised.
    pub fn process_inbox_kicks(&mut self) -> usize {
        let fired = self.regions.lock().take_fired_kicks();
        let mem = self.mem.memory();
        for kick in &fired {
            // The bit before the interrupt: a driver that runs on the interrupt finds it.
            if !set_pending_bit(&*mem, kick.addr, kick.mask) {
                IsmMetrics::inc(&self.metrics.pending_bit_faults);
            }
            IsmMetrics::inc(&self.metrics.kicks_pending);
            let _ = self
                .interrupt
                .trigger(VirtioInterruptType::Vector(kick.vector));
        }
        fired.len()
    }

    fn notify(
        queue: &mut Queue,
        mem: &M::M,
        interrupt: &dyn VirtioInterrupt,
        index: u16,
    ) -> Result<(), WorkerError> {
        if queue
            .needs_notification(mem)
            .map_err(WorkerError::NeedsNotification)?
        {
            interrupt
                .trigger(VirtioInterruptType::Queue(index))
                .map_err(WorkerError::Interrupt)?;
        }
        Ok(())
    }

    /// The event loop; returns when the kill eventfd is written, after giving every region
    /// back.
    pub fn run(mut self) -> Result<(), WorkerError> {
        let mut helper = EpollHelper::new(&self.kill_evt, self.pause.clone())?;
        helper.add_event(self.ctrl_evt.as_raw_fd(), EPOLL_CTRL)?;
        helper.add_event(self.wake_evt.as_raw_fd(), EPOLL_WAKE)?;
        if let Some((_, evt)) = &self.event_queue {
            helper.add_event(evt.as_raw_fd(), EPOLL_EVENTQ)?;
        }
        match self.pool_fd {
            Some(fd) => helper.add_event(fd, EPOLL_POOL)?,
            None => helper = helper.with_timeout(POOL_POLL),
        }
        let (kick_epoll, inbox_epoll) = {
            let table = self.regions.lock();
            (table.kick_epoll_fd(), table.inbox_epoll_fd())
        };
        helper.add_event(kick_epoll, EPOLL_KICKS)?;
        helper.add_event(inbox_epoll, EPOLL_INBOX)?;
        helper.run(&mut self)?;
        debug!("virtio-ism: worker stopping");
        // Here rather than on the thread that stops the device: in some VMMs that is a vCPU
        // (a driver's reset), whose seccomp filter has no business unmapping memory or
        // talking to the pool.
        self.regions.release_all();
        Ok(())
    }
}

impl<M> EpollHelperHandler for IsmWorker<M>
where
    M: GuestAddressSpace,
    M::M: GuestMemoryBackend,
{
    type Error = WorkerError;

    fn handle_event(&mut self, token: u64, _events: EventSet) -> Result<(), WorkerError> {
        match token {
            EPOLL_CTRL => {
                self.ctrl_evt.read().map_err(WorkerError::ReadQueueEvent)?;
                self.process_ctrl_queue()?;
            }
            EPOLL_EVENTQ => {
                if let Some((_, evt)) = &self.event_queue {
                    evt.read().map_err(WorkerError::ReadQueueEvent)?;
                }
                self.process_event_queue()?;
            }
            EPOLL_WAKE => {
                self.wake_evt.read().map_err(WorkerError::ReadQueueEvent)?;
                // Host-side changes (events to deliver) or a kick held for want of a
                // doorbell (absorbing the pool's reports rings it).
                self.process_pool_events()?;
            }
            EPOLL_POOL => {
                self.process_pool_events()?;
                if let Some(fd) = self.pool_fd {
                    drain_readable(fd);
                }
                // Events that arrived while draining.
                self.process_pool_events()?;
            }
            EPOLL_KICKS => {
                self.process_one_hop_kicks();
            }
            EPOLL_INBOX => {
                self.process_inbox_kicks();
            }
            other => error!("virtio-ism: unexpected epoll token {other}"),
        }
        Ok(())
    }

    /// At start and after a resume: requests queued before activation completed or while
    /// parked, and pool events that need no signal.
    fn serve_pending(&mut self) -> Result<(), WorkerError> {
        self.process_ctrl_queue()?;
        self.process_pool_events()?;
        Ok(())
    }

    /// Without an event fd the pool is polled.
    fn timed_out(&mut self) -> Result<(), WorkerError> {
        self.process_pool_events()?;
        Ok(())
    }
}

/// Consume the readiness of the pool's event fd (the session contract leaves reading it to the
/// caller once `take_events` came back empty). Reads at most once and never blocks.
fn drain_readable(fd: RawFd) {
    // SAFETY: `fd` is the pool session's event fd; the session (held by `Regions`, which the
    // worker holds) keeps it open for longer than this call borrows it.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let readable = matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(1))
        && fds[0].revents().contains(PollFlags::IN);
    if readable {
        let mut buf = [0u8; 8];
        // Reported readable, so this returns without blocking.
        let _ = rustix::io::read(fd, &mut buf);
    }
}

/// Write one event into an event-queue chain: every descriptor device-writable and inside
/// guest memory, `Event::SIZE` bytes in total at least. None if the chain is unusable.
fn write_event<G, I>(mem: &G, descriptors: I, bytes: &[u8]) -> Option<u32>
where
    G: GuestMemoryBackend,
    I: IntoIterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut buffers = Vec::new();
    let mut total = 0usize;
    for (index, desc) in descriptors.into_iter().enumerate() {
        if index == MAX_CHAIN_DESCRIPTORS || !desc.is_write_only() {
            return None;
        }
        let len = desc.len() as usize;
        if !mem.check_range(desc.addr(), len) {
            return None;
        }
        buffers.push((desc.addr(), len));
        total += len;
    }
    if total < bytes.len() {
        return None;
    }
    let mut done = 0;
    for (addr, len) in buffers {
        if done == bytes.len() {
            break;
        }
        let take = len.min(bytes.len() - done);
        mem.write_slice(&bytes[done..done + take], addr).ok()?;
        done += take;
    }
    Some(bytes.len() as u32)
}
