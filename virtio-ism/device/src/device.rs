// SPDX-License-Identifier: Apache-2.0
//! The control plane: features, config space, activation, reset and the shared-memory window
//! description. `Ism` implements `VirtioDevice`; `IsmHandle` is what the rest of the VMM keeps
//! to hot-add regions and route doorbells.

use std::io;
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{error, warn};
use virtio_device::{
    ActivateError, ActivationContext, Counters, PauseGate, ShmError, VirtioDevice, VirtioInterrupt,
    VirtioSharedMemory, VirtioSharedMemoryList, read_config_from_slice,
};
use virtio_ism_pool_api::{GrantTarget, Perms, PoolError, PoolSession, PoolStatus, Token};
use virtio_ism_proto::defs::VIRTIO_ID_ISM;
use virtio_ism_proto::defs::features::{
    VIRTIO_F_VERSION_1, VIRTIO_ISM_F_EAGAIN, VIRTIO_ISM_F_EVENT_QUEUE, VIRTIO_ISM_F_GRANT,
    VIRTIO_ISM_F_KICK_PENDING, VIRTIO_ISM_F_QUERY, VIRTIO_ISM_F_VECTOR_EVENTS, bit,
};
use virtio_ism_proto::defs::queues::{CTRL_QUEUE_INDEX, EVENT_QUEUE_INDEX, QUEUE_SIZE};
use virtio_ism_proto::defs::shm::{VIRTIO_ISM_SHM_ID_NOTIFY, VIRTIO_ISM_SHM_ID_REGIONS};
use virtio_ism_proto::{Area, ConfigSpace, EventType, WireStruct};
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::{ConfigError, IsmConfig, WindowLayout};
use crate::doorbell::DoorbellRinger;
use crate::metrics::IsmMetrics;
use crate::notify::NotifyWiring;
use crate::observer::{IsmObserver, ObserverSlot};
use crate::regions::{RegionTable, Regions, TrappedKick, pool_status};
use crate::window::{KickSink, ShmWindow};
use crate::worker::{IsmWorker, WorkerError};

/// Features this device offers. A driver that acknowledges none of the `VIRTIO_ISM_F_*` bits
/// sees the draft device (docs/protocol.md, section 11).
pub const AVAIL_FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_ISM_F_EVENT_QUEUE)
    | bit(VIRTIO_ISM_F_QUERY)
    | bit(VIRTIO_ISM_F_GRANT)
    | bit(VIRTIO_ISM_F_VECTOR_EVENTS)
    | bit(VIRTIO_ISM_F_KICK_PENDING)
    | bit(VIRTIO_ISM_F_EAGAIN);

/// Why a device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum IsmError {
    #[error("Invalid virtio-ism configuration")]
    Config(#[source] ConfigError),
    #[error("Failed to create the wake eventfd")]
    CreateWakeEvent(#[source] io::Error),
    #[error("Failed to create the epoll instance for one-hop kicks")]
    CreateKickEpoll(#[source] io::Error),
    #[error("Failed to create the pause eventfd")]
    CreatePauseEvent(#[source] io::Error),
}

/// Why the device refused to activate (carried in `ActivateError::Device`).
#[derive(Debug, thiserror::Error)]
pub enum IsmActivateError {
    #[error("The driver did not enable the control queue (queue 0); it enabled {0:?}")]
    NoControlQueue(Vec<u16>),
}

/// Why a host-side region operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error("Device is not active: the driver has not started it")]
    NotActive,
    #[error("Attaching region {token} failed with status {status:?}")]
    Attach {
        token: Token,
        status: virtio_ism_proto::Status,
    },
    #[error("A region of {size} bytes does not fit in the device's window ({status:?})")]
    NoRoom {
        size: u64,
        status: virtio_ism_proto::Status,
    },
    #[error("The pool refused to allocate {size} bytes")]
    Alloc {
        size: u64,
        #[source]
        source: PoolError,
    },
    #[error("Mapping new region {token} failed with status {status:?}")]
    Install {
        token: Token,
        status: virtio_ism_proto::Status,
    },
    #[error("The pool refused a grant on new region {token} (region freed again)")]
    Grant {
        token: Token,
        #[source]
        source: PoolError,
    },
}

struct ActiveState {
    kill_evt: EventFd,
    worker: Option<JoinHandle<Result<(), WorkerError>>>,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// Lifecycle: nothing runs before the driver sets DRIVER_OK.
enum DeviceState {
    Inactive,
    Active(ActiveState),
}

/// A virtio-ism device.
pub struct Ism {
    id: String,
    layout: WindowLayout,
    config_space: [u8; ConfigSpace::SIZE],
    acked_features: u64,
    queue_sizes: [u16; 2],
    regions: Arc<Regions>,
    metrics: Arc<IsmMetrics>,
    shm_addr: GuestAddress,
    kick_sink: Option<Arc<dyn KickSink>>,
    wake_evt: Arc<EventFd>,
    pool_fd: Option<std::os::fd::RawFd>,
    observer: Arc<ObserverSlot>,
    /// Called first on the worker thread (the VMM applies its seccomp filter there).
    thread_start: Option<Arc<dyn Fn() + Send + Sync>>,
    pause: Arc<PauseGate>,
    state: DeviceState,
}

impl Ism {
    /// A device named `id` taking regions from `session` and mapping them through `window`.
    /// gid and devid come from the session.
    pub fn new(
        id: impl Into<String>,
        config: IsmConfig,
        session: Arc<dyn PoolSession>,
        window: Arc<dyn ShmWindow>,
    ) -> Result<Self, IsmError> {
        let layout = config.layout().map_err(IsmError::Config)?;
        let info = session.info();
        let pool_fd = session.event_fd();
        let metrics = Arc::new(IsmMetrics::default());
        let config_space = ConfigSpace {
            gid: info.gid,
            devid: info.devid.0,
            chunk_size: layout.chunk_size,
            notify_size: layout.notify_size,
        }
        .to_bytes()
        .unwrap_or([0; ConfigSpace::SIZE]);
        Ok(Self {
            id: id.into(),
            layout,
            config_space,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
            regions: Arc::new(Regions::new(
                RegionTable::new(
                    layout,
                    info,
                    window,
                    metrics.clone(),
                    vmm_sys_util::epoll::Epoll::new().map_err(IsmError::CreateKickEpoll)?,
                    vmm_sys_util::epoll::Epoll::new().map_err(IsmError::CreateKickEpoll)?,
                    DoorbellRinger::new(),
                ),
                session,
                config.draft_default_perm,
            )),
            metrics,
            shm_addr: GuestAddress(0),
            kick_sink: None,
            wake_evt: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(IsmError::CreateWakeEvent)?),
            pool_fd,
            observer: Arc::default(),
            thread_start: None,
            pause: Arc::new(PauseGate::new().map_err(IsmError::CreatePauseEvent)?),
            state: DeviceState::Inactive,
        })
    }

    /// Where doorbell writes go (see [`KickSink`]). Without one, kicks are counted and dropped.
    pub fn with_kick_sink(mut self, sink: Arc<dyn KickSink>) -> Self {
        self.kick_sink = Some(sink);
        self
    }

    /// Let the VMM bind notify slots to eventfds in the kernel (KVM ioeventfds), so kicks
    /// reach peers without a userspace hop (see [`NotifyWiring`]). Without it every kick is
    /// an MMIO exit handed to [`IsmHandle::handle_notify`].
    pub fn with_notify_wiring(self, wiring: Arc<dyn NotifyWiring>) -> Self {
        self.regions.lock().set_wiring(Some(wiring));
        self
    }

    /// Run `hook` first on the worker thread `activate` starts, e.g. to confine it.
    pub fn with_thread_start(mut self, hook: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.thread_start = Some(hook);
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn layout(&self) -> WindowLayout {
        self.layout
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// A handle for the VMM: hotplug, doorbells. Valid for the device's whole life.
    pub fn handle(&self) -> IsmHandle {
        IsmHandle {
            regions: self.regions.clone(),
            metrics: self.metrics.clone(),
            kick_sink: self.kick_sink.clone(),
            wake_evt: self.wake_evt.clone(),
            layout: self.layout,
            observer: self.observer.clone(),
            pause: self.pause.clone(),
        }
    }

    /// Everything `activate` does except starting the thread: take the queues and memory and
    /// return the worker that serves them. Tests drive the returned worker synchronously.
    pub fn activate_worker(&mut self, ctx: ActivationContext) -> Result<IsmWorker, ActivateError> {
        self.activate_worker_with(ctx.mem, ctx.interrupt_cb, ctx.queues)
    }

    /// [`Ism::activate_worker`] for any guest memory type (a VMM whose guest memory carries
    /// a dirty-page bitmap passes its own).
    pub fn activate_worker_with<M>(
        &mut self,
        mem: M,
        interrupt_cb: Arc<dyn VirtioInterrupt>,
        queues: Vec<(u16, Queue, EventFd)>,
    ) -> Result<IsmWorker<M>, ActivateError>
    where
        M: GuestAddressSpace,
        M::M: GuestMemoryBackend,
    {
        if matches!(self.state, DeviceState::Active(_)) {
            return Err(ActivateError::AlreadyActive);
        }
        let mut ctrl = None;
        let mut events = None;
        let enabled: Vec<u16> = queues.iter().map(|(index, _, _)| *index).collect();
        for (index, queue, evt) in queues {
            match index {
                CTRL_QUEUE_INDEX => ctrl = Some((queue, evt)),
                EVENT_QUEUE_INDEX if self.acked_features & bit(VIRTIO_ISM_F_EVENT_QUEUE) != 0 => {
                    events = Some((queue, evt))
                }
                other => warn!("virtio-ism {}: ignoring queue {other}", self.id),
            }
        }
        let Some((ctrl_queue, ctrl_evt)) = ctrl else {
            return Err(ActivateError::device(IsmActivateError::NoControlQueue(
                enabled,
            )));
        };
        let kill_evt = EventFd::new(EFD_NONBLOCK).map_err(ActivateError::CloneEventFd)?;
        let worker = IsmWorker {
            mem,
            ctrl_queue,
            ctrl_evt,
            event_queue: events,
            regions: self.regions.clone(),
            interrupt: interrupt_cb.clone(),
            features: self.acked_features,
            metrics: self.metrics.clone(),
            kill_evt: kill_evt.try_clone().map_err(ActivateError::CloneEventFd)?,
            wake_evt: self
                .wake_evt
                .try_clone()
                .map_err(ActivateError::CloneEventFd)?,
            pool_fd: self.pool_fd,
            observer: self.observer.clone(),
            pause: self.pause.clone(),
        };
        self.regions.lock().set_active(
            Some(interrupt_cb.clone()),
            worker.event_queue.is_some(),
            self.acked_features,
        );
        self.state = DeviceState::Active(ActiveState {
            kill_evt,
            worker: None,
            interrupt: interrupt_cb,
        });
        Ok(worker)
    }

    /// Activate with any guest memory type: take the queues and start the worker thread.
    /// [`VirtioDevice::activate`] is this with [`virtio_device::GuestMemoryHandle`].
    pub fn activate_with<M>(
        &mut self,
        mem: M,
        interrupt_cb: Arc<dyn VirtioInterrupt>,
        queues: Vec<(u16, Queue, EventFd)>,
    ) -> Result<(), ActivateError>
    where
        M: GuestAddressSpace + Send + 'static,
        M::M: GuestMemoryBackend,
    {
        let worker = self.activate_worker_with(mem, interrupt_cb, queues)?;
        let thread_start = self.thread_start.clone();
        let spawned = std::thread::Builder::new()
            .name("virtio-ism".into())
            .spawn(move || {
                if let Some(hook) = thread_start {
                    hook();
                }
                let result = worker.run();
                if let Err(e) = &result {
                    error!("virtio-ism worker: {e}");
                }
                result
            });
        match spawned {
            Ok(handle) => {
                if let DeviceState::Active(active) = &mut self.state {
                    active.worker = Some(handle);
                }
                Ok(())
            }
            Err(e) => {
                self.stop();
                Err(ActivateError::SpawnWorker(e))
            }
        }
    }

    /// Stop serving the queues until [`Ism::resume`]: the worker parks and writes nothing
    /// into guest memory (used rings, event buffers). Kicks and pool events arriving
    /// meanwhile are kept and served on resume. Waits until the worker has parked.
    pub fn pause(&self) -> io::Result<()> {
        self.pause.pause()
    }

    /// Undo [`Ism::pause`].
    pub fn resume(&self) {
        self.pause.resume();
    }

    fn stop(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        let DeviceState::Active(mut active) =
            std::mem::replace(&mut self.state, DeviceState::Inactive)
        else {
            self.regions.release_all();
            return None;
        };
        // A worker that stops cleanly gives every region back itself.
        let mut released = false;
        if let Some(worker) = active.worker.take() {
            // A parked worker must wake up to see the kill.
            if let Err(e) = self.pause.resume_and_kill(&active.kill_evt) {
                error!("virtio-ism {}: failed to signal the worker: {e}", self.id);
            }
            match worker.join() {
                Ok(Ok(())) => released = true,
                Ok(Err(e)) => error!("virtio-ism {}: worker failed: {e}", self.id),
                Err(_) => error!("virtio-ism {}: worker panicked", self.id),
            }
        }
        if !released {
            self.regions.release_all();
        }
        Some(active.interrupt)
    }
}

impl VirtioDevice for Ism {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_ISM
    }

    /// Two queues: control (0) and event (1). Queue 1 is used only when the driver negotiates
    /// VIRTIO_ISM_F_EVENT_QUEUE, like virtio-net's control queue; a draft driver sets up
    /// queue 0 alone.
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn ack_features(&mut self, value: u64) {
        let unknown = value & !AVAIL_FEATURES;
        if unknown != 0 {
            warn!(
                "virtio-ism {}: driver acked unoffered features {unknown:#x}",
                self.id
            );
        }
        self.acked_features |= value & AVAIL_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_from_slice(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            "virtio-ism {}: ignoring {}-byte write to read-only config at {offset:#x}",
            self.id,
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivationContext) -> Result<(), ActivateError> {
        self.activate_with(ctx.mem, ctx.interrupt_cb, ctx.queues)
    }

    /// Stop the worker, unmap every region and give every region back to the pool.
    fn reset(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        self.acked_features = 0;
        self.stop()
    }

    fn shutdown(&mut self) {
        self.stop();
    }

    fn get_shm_regions(&self) -> Option<VirtioSharedMemoryList> {
        Some(VirtioSharedMemoryList {
            addr: self.shm_addr,
            len: self.layout.window_size,
            region_list: vec![
                VirtioSharedMemory {
                    id: VIRTIO_ISM_SHM_ID_REGIONS,
                    offset: 0,
                    len: self.layout.shm_size,
                },
                VirtioSharedMemory {
                    id: VIRTIO_ISM_SHM_ID_NOTIFY,
                    offset: self.layout.notify_offset,
                    len: self.layout.notify_len,
                },
            ],
        })
    }

    fn set_shm_regions(&mut self, list: VirtioSharedMemoryList) -> Result<(), ShmError> {
        if list.len != self.layout.window_size {
            return Err(ShmError::Move(format!(
                "window length {:#x} differs from the device's {:#x}",
                list.len, self.layout.window_size
            )));
        }
        self.shm_addr = list.addr;
        Ok(())
    }

    fn pause(&mut self) -> io::Result<()> {
        self.pause.pause()
    }

    fn resume(&mut self) {
        self.pause.resume();
    }

    fn counters(&self) -> Option<Counters> {
        Some(self.metrics.counters())
    }
}

impl Drop for Ism {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The VMM's side door into a device: doorbells, peer kicks and region hotplug.
#[derive(Clone)]
pub struct IsmHandle {
    regions: Arc<Regions>,
    metrics: Arc<IsmMetrics>,
    kick_sink: Option<Arc<dyn KickSink>>,
    wake_evt: Arc<EventFd>,
    layout: WindowLayout,
    observer: Arc<ObserverSlot>,
    pause: Arc<PauseGate>,
}

impl IsmHandle {
    /// [`Ism::pause`], for a VMM that keeps only the handle.
    pub fn pause(&self) -> io::Result<()> {
        self.pause.pause()
    }

    /// [`Ism::resume`].
    pub fn resume(&self) {
        self.pause.resume();
    }

    /// Tell `observer` about every region change from now on (replaces an earlier one;
    /// None removes it). Set it before the driver starts the device to miss nothing.
    pub fn set_observer(&self, observer: Option<Arc<dyn IsmObserver>>) {
        self.observer.set(observer);
    }

    /// Create a region of `size` bytes in the pool on the host's behalf (REST region
    /// hotplug), map it for the guest, grant `grants`, and tell the driver with a
    /// REGION_ADDED event. This device owns the region. If any step fails nothing is kept:
    /// the region is unmapped and given back (the pool frees it).
    pub fn create_region(
        &self,
        size: u64,
        grants: &[(GrantTarget, Perms)],
    ) -> Result<(Token, Vec<Area>), HandleError> {
        if !self.regions.lock().is_active() {
            return Err(HandleError::NotActive);
        }
        // Checked before the pool is asked, so a region that cannot be mapped is never made.
        let size = self
            .regions
            .lock()
            .check_alloc(size, u64::MAX)
            .map_err(|r| HandleError::NoRoom {
                size,
                status: r.status,
            })?;
        let session = self.regions.session();
        let lease = session
            .alloc(size)
            .map_err(|source| HandleError::Alloc { size, source })?;
        let token = lease.token;
        let give_back = |token| {
            if let Err(e) = session.detach(token) {
                warn!("virtio-ism: giving back new region {token} failed: {e}");
            }
        };
        let installed = self
            .regions
            .lock()
            .install_lease(lease, u64::MAX, true, true);
        let areas = match installed {
            Ok(areas) => areas,
            Err(r) => {
                give_back(token);
                return Err(HandleError::Install {
                    token,
                    status: r.status,
                });
            }
        };
        for (target, perms) in grants {
            if let Err(source) = session.grant(token, *target, *perms) {
                self.regions.lock().uninstall(token);
                give_back(token);
                return Err(HandleError::Grant { token, source });
            }
        }
        {
            let mut table = self.regions.lock();
            if let Some(region) = table.region(token) {
                let subject = table.subject(region);
                table.post_event(EventType::RegionAdded, subject, 0);
            }
        }
        self.wake();
        Ok((token, areas))
    }

    /// The devid the pool knows this device by.
    pub fn devid(&self) -> u64 {
        self.regions.lock().info().devid.0
    }

    /// The pool's status, when the session can report it in-process (the embedded pool);
    /// None for a broker session (ask the broker's socket).
    pub fn pool_status(&self) -> Option<PoolStatus> {
        self.regions.session().status()
    }
    /// The guest wrote to shmid 2 at `offset` (relative to the notify area) and the write
    /// trapped (no ioeventfd on it). Resolves the region owning that slot, writes the
    /// doorbells its other holders published, and asks the kick sink to signal them as
    /// well (for peers without a doorbell; one with both may see one extra interrupt).
    /// Returns the region kicked, if the slot belongs to one.
    pub fn handle_notify(&self, offset: u64) -> Option<Token> {
        if offset >= self.layout.notify_len {
            return None;
        }
        let mut held = false;
        let (token, from) = {
            let mut table = self.regions.lock();
            let token = table.notify_target(offset)?;
            match table.trapped_kick_kind(token, self.layout.notify_offset + offset) {
                TrappedKick::WithoutDoorbell => {
                    // The peers' doorbells may be on their way from the pool: the worker
                    // absorbs them and rings them for this kick.
                    IsmMetrics::inc(&self.metrics.kicks_without_doorbell);
                    table.hold_kick(token);
                    held = true;
                }
                TrappedKick::WhileWired => IsmMetrics::inc(&self.metrics.kicks_trapped_while_wired),
                TrappedKick::Expected => {}
            }
            table.ring_doorbells(token);
            (token, table.info().devid)
        };
        IsmMetrics::inc(&self.metrics.kicks);
        if held {
            self.wake();
        }
        if let Some(sink) = &self.kick_sink {
            sink.kick_peers(from, token);
        }
        Some(token)
    }

    /// Wire every notify slot again. A VMM calls this after it moved the window (BAR
    /// reprogramming), once the new base is in effect: the device unwires each wired slot
    /// (the VMM removes the registration it recorded for that offset) and wires it again
    /// (the VMM registers it at the new address).
    pub fn rewire_all(&self) {
        self.regions.lock().rewire_all();
    }

    /// Publish this guest's doorbells again: a transport calls this when the eventfd its
    /// `VirtioInterrupt::notifier` returns for a vector changed (irqfd re-created), so peers
    /// wire to the new one. Binding a vector (EVENT_VECTOR) publishes on its own.
    pub fn republish_doorbells(&self) {
        self.regions.republish_doorbells();
    }

    /// Fan out the kicks that arrived on one-hop eventfds (the worker does this on its own;
    /// for tests and VMMs that drive the device without its worker). Returns how many
    /// regions were kicked.
    pub fn serve_one_hop_kicks(&self) -> usize {
        self.regions.lock().serve_one_hop_kicks()
    }

    /// A peer kicked `token`: raise the vector this guest bound to it. Returns whether an
    /// interrupt was raised.
    pub fn deliver_kick(&self, token: Token) -> bool {
        self.regions.lock().deliver_kick(token)
    }

    /// Attach `token` on the host's behalf (REST region hotplug) with `want` (READ/WRITE, or
    /// NONE for whatever is granted), map it and tell the driver with a REGION_ADDED event.
    pub fn add_region(&self, token: Token, want: Perms) -> Result<Vec<Area>, HandleError> {
        if !self.regions.lock().is_active() {
            return Err(HandleError::NotActive);
        }
        let areas = self
            .regions
            .attach(token, want.0, u64::MAX, true)
            .map_err(|r| HandleError::Attach {
                token,
                status: r.status,
            })?;
        {
            let mut table = self.regions.lock();
            if let Some(region) = table.region(token) {
                let subject = table.subject(region);
                table.post_event(EventType::RegionAdded, subject, 0);
            }
        }
        self.wake();
        Ok(areas)
    }

    /// Take a region away from the guest (REST region unplug): unmap it, give it back to the
    /// pool and send a REVOKE event. Returns false if the device did not hold it.
    pub fn remove_region(&self, token: Token) -> bool {
        let removed = self.regions.revoke(token);
        if removed {
            self.wake();
        }
        removed
    }

    /// Tokens of every region the device holds.
    pub fn regions(&self) -> Vec<Token> {
        self.regions.lock().tokens()
    }

    /// Map a pool refusal to the status a driver would see (for API error messages).
    pub fn status_of(err: &virtio_ism_pool_api::PoolError) -> virtio_ism_proto::Status {
        pool_status(err)
    }

    fn wake(&self) {
        if let Err(e) = self.wake_evt.write(1) {
            warn!("virtio-ism: failed to wake the worker: {e}");
        }
    }
}
