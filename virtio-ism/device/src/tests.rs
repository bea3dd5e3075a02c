// SPDX-License-Identifier: Apache-2.0
//! Drives the device as a guest driver would: requests are descriptor chains in guest memory
//! (laid out like the Linux PoC driver's: header, payload, status, reply), regions come from a
//! real in-process pool, and the window maps them for real so two devices share bytes.
//!
//! Set-up lives in fixtures so each test states what it checks: [`guests`] and
//! [`wired_guests`] make a pool with activated guests ([`TestVm`], its worker driven
//! synchronously), [`ThreadedVm`] runs a device's own worker thread, and the `TestVm` methods
//! speak the control protocol (`alloc`, `alloc_shared`, `attach`, `detach`, ...).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use ism_pool::{LocalPool, PoolConfig};
use virtio_device::{ActivationContext, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use virtio_ism_pool_api::{DevId, PoolSession, Token};
use virtio_ism_proto::ctrl::{decode_areas, decode_tokens, reply_len};
use virtio_ism_proto::defs::features::{
    VIRTIO_F_VERSION_1, VIRTIO_ISM_F_EAGAIN, VIRTIO_ISM_F_EVENT_IRQ, VIRTIO_ISM_F_EVENT_QUEUE,
    VIRTIO_ISM_F_GRANT, VIRTIO_ISM_F_KICK_PENDING, VIRTIO_ISM_F_QUERY, VIRTIO_ISM_F_VECTOR_EVENTS,
    bit,
};
use virtio_ism_proto::defs::perm::{
    VIRTIO_ISM_PERM_ATTACH, VIRTIO_ISM_PERM_MANAGE, VIRTIO_ISM_PERM_READ, VIRTIO_ISM_PERM_WRITE,
};
use virtio_ism_proto::defs::region_flags;
use virtio_ism_proto::*;
use virtio_queue::Queue;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::test_utils::MemWindow;
use crate::{DraftDefaultPerm, Ism, IsmConfig, IsmHandle, IsmWorker, KickSink, MemoryWiring};

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
const QUEUE_SIZE: u16 = 16;
const CTRL_BASE: GuestAddress = GuestAddress(0x0);
const EVENTQ_BASE: GuestAddress = GuestAddress(0x4000);
/// Request bytes, status and reply buffers live from here on.
const DATA_BASE: u64 = 0x10000;
const MEM_SIZE: usize = 0x10_0000;

const CHUNK: u64 = 64 << 10;
const SHM: u64 = 16 * CHUNK;

#[derive(Default)]
struct RecordingInterrupt {
    raised: Mutex<Vec<VirtioInterruptType>>,
    /// With `Some`, `notifier` hands out one eventfd per vector, as a transport with KVM
    /// irqfds does; the test reads them to see what a peer raised.
    irqfds: Option<Mutex<BTreeMap<u16, EventFd>>>,
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        self.raised.lock().unwrap().push(int_type);
        Ok(())
    }

    fn notifier(&self, int_type: VirtioInterruptType) -> Option<EventFd> {
        let VirtioInterruptType::Vector(vector) = int_type else {
            return None;
        };
        let mut irqfds = self.irqfds.as_ref()?.lock().unwrap();
        let irqfd = irqfds
            .entry(vector)
            .or_insert_with(|| EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        irqfd.try_clone().ok()
    }
}

impl RecordingInterrupt {
    fn with_irqfds() -> Self {
        Self {
            irqfds: Some(Mutex::new(BTreeMap::new())),
            ..Self::default()
        }
    }

    /// How often `vector`'s irqfd was signalled since the last look (0 if never).
    fn irqfd_count(&self, vector: u16) -> u64 {
        let irqfds = self.irqfds.as_ref().unwrap().lock().unwrap();
        irqfds
            .get(&vector)
            .and_then(|irqfd| irqfd.read().ok())
            .unwrap_or(0)
    }

    fn take(&self) -> Vec<VirtioInterruptType> {
        std::mem::take(&mut self.raised.lock().unwrap())
    }
}

#[derive(Default)]
struct RecordingKicks {
    kicks: Mutex<Vec<(DevId, Token)>>,
}

impl KickSink for RecordingKicks {
    fn kick_peers(&self, from: DevId, token: Token) {
        self.kicks.lock().unwrap().push((from, token));
    }
}

/// The driver's side of one split queue. The mock initialises the rings when created, so
/// it is created once per queue (over leaked test memory, so it can live in `TestVm`).
struct DriverQueue {
    mem: &'static GuestMemoryMmap,
    mock: MockSplitQueue<'static, GuestMemoryMmap>,
    next_desc: u16,
    used_seen: u16,
}

impl DriverQueue {
    fn new(mem: &'static GuestMemoryMmap, base: GuestAddress) -> Self {
        Self {
            mem,
            mock: MockSplitQueue::create(mem, base, QUEUE_SIZE),
            next_desc: 0,
            used_seen: 0,
        }
    }

    fn device_queue(&self) -> Queue {
        self.mock.create_queue::<Queue>().unwrap()
    }

    /// The head index the next chain of `n` descriptors will get.
    fn next_head(&self, n: u16) -> u16 {
        if self.next_desc + n > QUEUE_SIZE {
            0
        } else {
            self.next_desc
        }
    }

    /// Put one chain of `(addr, len, device_writable)` buffers on the avail ring.
    fn submit(&mut self, buffers: &[(u64, u32, bool)]) -> u16 {
        let n = buffers.len() as u16;
        let head = self.next_head(n);
        for (i, &(addr, len, write)) in buffers.iter().enumerate() {
            let i = i as u16;
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT;
            }
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, head + i + 1));
            self.mock.desc_table().store(head + i, desc).unwrap();
        }
        // The avail ring by hand: the mock's helper does not wrap its index.
        let mem = self.mem;
        let avail = self.mock.avail_addr();
        let idx: u16 = mem.read_obj(avail.unchecked_add(2)).unwrap();
        let slot = u64::from(idx % QUEUE_SIZE);
        mem.write_obj(head, avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
        self.next_desc = head + n;
        head
    }

    /// Next used element `(head, len)`, if the device returned one.
    fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        let used = self.mock.used_addr();
        let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let slot = u64::from(self.used_seen % QUEUE_SIZE);
        let elem = used.unchecked_add(4 + 8 * slot);
        let id: u32 = mem.read_obj(elem).unwrap();
        let len: u32 = mem.read_obj(elem.unchecked_add(4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }
}

fn guest_memory() -> &'static GuestMemoryMmap {
    Box::leak(Box::new(
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
    ))
}

/// What came back for one request.
#[derive(Debug)]
struct Reply {
    status: Status,
    /// Reply bytes after the status byte (the whole buffer the driver gave).
    body: Vec<u8>,
    used_len: u32,
}

/// One guest with a virtio-ism device, its driver-side queues and its window.
struct TestVm {
    mem: &'static GuestMemoryMmap,
    device: Ism,
    worker: IsmWorker,
    window: Arc<MemWindow>,
    interrupts: Arc<RecordingInterrupt>,
    kicks: Arc<RecordingKicks>,
    ctrl: DriverQueue,
    events: DriverQueue,
    session: Arc<dyn PoolSession>,
    /// How the VMM wires notify slots, for [`TestVm::wired`] guests.
    wiring: Option<Arc<MemoryWiring>>,
}

fn pool() -> Arc<LocalPool> {
    LocalPool::new(PoolConfig {
        size: 64 << 20,
        per_vm_limit: None,
        hugepages: false,
        gid: Some(0x15a),
        ..PoolConfig::default()
    })
    .unwrap()
}

/// A fresh pool and one guest per entry of `features` on it, each with its device activated
/// and driven synchronously: the set-up of most tests.
fn guests<const N: usize>(features: [u64; N]) -> (Arc<LocalPool>, [TestVm; N]) {
    let pool = pool();
    let vms = features.map(|features| TestVm::new(&pool, features));
    (pool, vms)
}

/// The window layout every test device uses: 16 chunks of 64 KiB, 4-byte notify slots.
fn config() -> IsmConfig {
    IsmConfig {
        shm_size: SHM,
        chunk_size: CHUNK,
        notify_size: 4,
        draft_default_perm: Default::default(),
    }
}

/// A device named `id` over a fresh [`MemWindow`], its features acked, not yet activated.
fn device(id: &str, session: Arc<dyn PoolSession>, features: u64) -> (Ism, Arc<MemWindow>) {
    device_with(id, session, features, config())
}

/// [`device`] with its own configuration.
fn device_with(
    id: &str,
    session: Arc<dyn PoolSession>,
    features: u64,
    config: IsmConfig,
) -> (Ism, Arc<MemWindow>) {
    let window = MemWindow::new(config.layout().unwrap().window_size);
    let mut device = Ism::new(id, config, session, window.clone()).unwrap();
    device.ack_features(features);
    (device, window)
}

/// Poll `done` every 5 ms until it holds; fail with `what` after 10 s.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

impl TestVm {
    fn new(pool: &Arc<LocalPool>, features: u64) -> Self {
        Self::with_session(pool.session().unwrap(), features)
    }

    fn with_session(session: Arc<dyn PoolSession>, features: u64) -> Self {
        Self::build(
            session,
            features,
            Arc::new(RecordingInterrupt::default()),
            None,
        )
    }

    /// A guest whose device has the operator policy `policy` for drivers that never grant.
    fn with_policy(pool: &Arc<LocalPool>, features: u64, policy: DraftDefaultPerm) -> Self {
        Self::build_with(
            pool.session().unwrap(),
            features,
            Arc::new(RecordingInterrupt::default()),
            None,
            config().with_draft_default_perm(policy),
        )
    }

    /// A guest whose transport has irqfds and whose VMM wires notify slots through
    /// `wiring`.
    fn wired(pool: &Arc<LocalPool>, wiring: &Arc<MemoryWiring>) -> Self {
        Self::build(
            pool.session().unwrap(),
            DRAFT_FEATURES,
            Arc::new(RecordingInterrupt::with_irqfds()),
            Some(wiring.clone()),
        )
    }

    fn build(
        session: Arc<dyn PoolSession>,
        features: u64,
        interrupts: Arc<RecordingInterrupt>,
        wiring: Option<Arc<MemoryWiring>>,
    ) -> Self {
        Self::build_with(session, features, interrupts, wiring, config())
    }

    fn build_with(
        session: Arc<dyn PoolSession>,
        features: u64,
        interrupts: Arc<RecordingInterrupt>,
        wiring: Option<Arc<MemoryWiring>>,
        config: IsmConfig,
    ) -> Self {
        let mem = guest_memory();
        let kicks = Arc::new(RecordingKicks::default());
        let (device, window) = device_with("ism0", session.clone(), features, config);
        let mut device = device.with_kick_sink(kicks.clone());
        if let Some(wiring) = &wiring {
            device = device.with_notify_wiring(wiring.clone());
        }
        let ctrl = DriverQueue::new(mem, CTRL_BASE);
        let events = DriverQueue::new(mem, EVENTQ_BASE);
        let worker = device
            .activate_worker(ActivationContext {
                mem: GuestMemoryAtomic::new(mem.clone()),
                interrupt_cb: interrupts.clone(),
                queues: vec![
                    (0, ctrl.device_queue(), EventFd::new(0).unwrap()),
                    (1, events.device_queue(), EventFd::new(0).unwrap()),
                ],
            })
            .unwrap();
        Self {
            mem,
            device,
            worker,
            window,
            interrupts,
            kicks,
            ctrl,
            events,
            session,
            wiring,
        }
    }

    /// The notify wiring of a [`TestVm::wired`] guest.
    fn wiring(&self) -> &MemoryWiring {
        self.wiring.as_ref().expect("a wired guest")
    }

    fn devid(&self) -> u64 {
        self.session.info().devid.0
    }

    fn handle(&self) -> IsmHandle {
        self.device.handle()
    }

    /// Send raw request bytes with a reply buffer of `writable` bytes, as four descriptors:
    /// header, payload, status, reply (the Linux PoC driver's layout).
    fn raw_request(&mut self, request: &[u8], writable: u32) -> Reply {
        let hdr = DATA_BASE;
        let payload = DATA_BASE + 0x100;
        let status = DATA_BASE + 0x200;
        let reply = DATA_BASE + 0x300;
        self.mem
            .write_slice(&[0xee; 0x2000], GuestAddress(hdr))
            .unwrap();
        let hdr_len = request.len().min(2);
        self.mem
            .write_slice(&request[..hdr_len], GuestAddress(hdr))
            .unwrap();
        self.mem
            .write_slice(&request[hdr_len..], GuestAddress(payload))
            .unwrap();
        let mut chain = vec![(hdr, hdr_len as u32, false)];
        if request.len() > 2 {
            chain.push((payload, (request.len() - 2) as u32, false));
        }
        chain.push((status, 1, true));
        if writable > 1 {
            chain.push((reply, writable - 1, true));
        }
        let head = self.ctrl.submit(&chain);
        assert!(self.worker.process_ctrl_queue().unwrap());
        let (id, used_len) = self.ctrl.pop_used(self.mem).expect("request not used");
        assert_eq!(id, u32::from(head));
        let mut status_byte = [0u8];
        self.mem
            .read_slice(&mut status_byte, GuestAddress(status))
            .unwrap();
        let mut body = vec![0u8; writable.saturating_sub(1) as usize];
        self.mem.read_slice(&mut body, GuestAddress(reply)).unwrap();
        Reply {
            status: Status::from_raw(status_byte[0]),
            body,
            used_len,
        }
    }

    fn request(&mut self, request: Request, writable: usize) -> Reply {
        let mut bytes = [0u8; 64];
        let n = request.encode(&mut bytes).unwrap();
        self.raw_request(&bytes[..n], writable as u32)
    }

    fn alloc(&mut self, size: u64) -> (Token, Vec<Area>) {
        let reply = self.request(
            Request::Alloc(AllocRequest { size }),
            reply_len(AllocReplyHeader::SIZE, Area::SIZE, 16),
        );
        assert_eq!(reply.status, Status::Ok, "alloc failed");
        let header = AllocReplyHeader::decode(&reply.body).unwrap();
        let areas = decode_areas(&reply.body[AllocReplyHeader::SIZE..], header.num)
            .unwrap()
            .collect::<Vec<_>>();
        assert_eq!(
            reply.used_len as usize,
            1 + AllocReplyHeader::SIZE + Area::SIZE * areas.len()
        );
        (Token(header.token), areas)
    }

    fn attach_raw(&mut self, token: Token, rw_perm: u32) -> Reply {
        self.request(
            Request::Attach(AttachRequest {
                token: token.0,
                rw_perm,
            }),
            reply_len(AttachReplyHeader::SIZE, Area::SIZE, 16),
        )
    }

    fn attach(&mut self, token: Token, rw_perm: u32) -> Vec<Area> {
        let reply = self.attach_raw(token, rw_perm);
        assert_eq!(reply.status, Status::Ok, "attach failed");
        let header = AttachReplyHeader::decode(&reply.body).unwrap();
        decode_areas(&reply.body[AttachReplyHeader::SIZE..], header.num)
            .unwrap()
            .collect()
    }

    fn simple(&mut self, request: Request) -> Status {
        let reply = self.request(request, 1);
        assert_eq!(reply.used_len, 1);
        reply.status
    }

    /// ALLOC_REGION, then a default grant of READ, WRITE and ATTACH so any peer can attach.
    fn alloc_shared(&mut self, size: u64) -> (Token, Vec<Area>) {
        let (token, areas) = self.alloc(size);
        assert_eq!(self.grant_default(token, rw()), Status::Ok, "grant failed");
        (token, areas)
    }

    fn detach(&mut self, token: Token) -> Status {
        self.simple(Request::Detach(DetachRequest { token: token.0 }))
    }

    fn event_vector(&mut self, token: Token, vector: u64) -> Status {
        self.simple(Request::EventVector(EventVectorRequest {
            token: token.0,
            vector,
        }))
    }

    fn event_vector_pending(&mut self, token: Token, vector: u64, addr: u64, bit: u64) -> Status {
        self.simple(Request::EventVectorPending(EventVectorPendingRequest {
            token: token.0,
            vector,
            pending_addr: addr,
            pending_bit: bit,
        }))
    }

    fn grant_default(&mut self, token: Token, permissions: u64) -> Status {
        self.simple(Request::GrantDefault(GrantDefaultRequest {
            token: token.0,
            permissions,
        }))
    }

    fn grant_device(&mut self, token: Token, permissions: u64, peer: u64) -> Status {
        self.simple(Request::GrantDevice(GrantDeviceRequest {
            token: token.0,
            permissions,
            peer_devid: peer,
        }))
    }

    fn post_event_buffers(&mut self, count: usize) {
        for _ in 0..count {
            let addr = DATA_BASE + 0x8000 + 0x40 * u64::from(self.events.next_head(1));
            self.events.submit(&[(addr, Event::SIZE as u32, true)]);
        }
    }

    fn take_events(&mut self) -> Vec<Event> {
        self.worker.process_pool_events().unwrap();
        let mut out = Vec::new();
        while let Some((head, len)) = self.events.pop_used(self.mem) {
            assert_eq!(len as usize, Event::SIZE);
            let addr = DATA_BASE + 0x8000 + 0x40 * u64::from(head);
            let mut raw = [0u8; Event::SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            out.push(Event::decode(&raw).unwrap());
        }
        out
    }

    fn counter(&self, name: &str) -> u64 {
        self.device.counters().unwrap()[name].0
    }
}

/// A guest whose device runs its own worker thread ([`VirtioDevice::activate`]), as in a VMM:
/// the driver submits and kicks, then waits for the worker's answer.
struct ThreadedVm {
    mem: &'static GuestMemoryMmap,
    device: Ism,
    interrupts: Arc<RecordingInterrupt>,
    ctrl: DriverQueue,
    ctrl_kick: EventFd,
    events: DriverQueue,
    event_kick: EventFd,
}

impl ThreadedVm {
    /// Activate `device` (features acked) with the control queue, and the event queue if
    /// negotiated, on fresh guest memory.
    fn start(mut device: Ism, interrupts: RecordingInterrupt) -> Self {
        let mem = guest_memory();
        let interrupts = Arc::new(interrupts);
        let ctrl = DriverQueue::new(mem, CTRL_BASE);
        let events = DriverQueue::new(mem, EVENTQ_BASE);
        let (ctrl_kick, event_kick) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
        let mut queues = vec![(0, ctrl.device_queue(), ctrl_kick.try_clone().unwrap())];
        if device.acked_features() & bit(VIRTIO_ISM_F_EVENT_QUEUE) != 0 {
            queues.push((1, events.device_queue(), event_kick.try_clone().unwrap()));
        }
        device
            .activate(ActivationContext {
                mem: GuestMemoryAtomic::new(mem.clone()),
                interrupt_cb: interrupts.clone(),
                queues,
            })
            .unwrap();
        Self {
            mem,
            device,
            interrupts,
            ctrl,
            ctrl_kick,
            events,
            event_kick,
        }
    }

    /// Send `request` with a reply buffer of `writable` bytes at `DATA_BASE + 0x100`, kick,
    /// and wait for the worker to use it. Returns the used length.
    fn request(&mut self, request: Request, writable: u32) -> u32 {
        let mut bytes = [0u8; 64];
        let n = request.encode(&mut bytes).unwrap();
        self.mem
            .write_slice(&bytes[..n], GuestAddress(DATA_BASE))
            .unwrap();
        self.ctrl.submit(&[
            (DATA_BASE, n as u32, false),
            (DATA_BASE + 0x100, writable, true),
        ]);
        self.ctrl_kick.write(1).unwrap();
        wait_used(&mut self.ctrl).1
    }
}

/// Wait for a worker thread to return a buffer on `queue`.
fn wait_used(queue: &mut DriverQueue) -> (u32, u32) {
    let mut used = None;
    wait_until("worker did not answer", || {
        used = queue.pop_used(queue.mem);
        used.is_some()
    });
    used.unwrap()
}

/// A fresh pool and one guest per entry of `slots`, each with irqfds and a VMM that wires up
/// to that many notify slots ([`TestVm::wiring`]).
fn wired_guests<const N: usize>(slots: [usize; N]) -> (Arc<LocalPool>, [TestVm; N]) {
    let pool = pool();
    let vms = slots.map(|slots| TestVm::wired(&pool, &Arc::new(MemoryWiring::new(slots))));
    (pool, vms)
}

const ALL_FEATURES: u64 =
    bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_ISM_F_EVENT_QUEUE) | bit(VIRTIO_ISM_F_QUERY);
const DRAFT_FEATURES: u64 = bit(VIRTIO_F_VERSION_1);

fn rw() -> u64 {
    VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE | VIRTIO_ISM_PERM_ATTACH
}

#[test]
fn test_config_space_reports_session_ids_and_sizes() {
    let (_pool, [vm]) = guests([DRAFT_FEATURES]);
    let mut raw = [0u8; 32];
    vm.device.read_config(0, &mut raw);
    let cfg = ConfigSpace::decode(&raw).unwrap();
    assert_eq!(cfg.gid, 0x15a);
    assert_eq!(cfg.devid, vm.devid());
    assert_eq!(cfg.chunk_size, CHUNK);
    assert_eq!(cfg.notify_size, 4);
    // A 4-byte read of the low half of chunk_size, as the PoC's drivers do.
    let mut low = [0u8; 4];
    vm.device
        .read_config(ConfigSpace::chunk_size as u64, &mut low);
    assert_eq!(u32::from_le_bytes(low), CHUNK as u32);
    assert_eq!(vm.device.device_type(), 44);
}

#[test]
fn test_features_never_offer_event_irq_and_mask_unoffered() {
    let (_pool, [mut vm]) = guests([0]);
    let offered = vm.device.features();
    assert_ne!(offered & bit(VIRTIO_F_VERSION_1), 0);
    assert_eq!(offered & bit(VIRTIO_ISM_F_EVENT_IRQ), 0);
    vm.device
        .ack_features(bit(VIRTIO_ISM_F_EVENT_IRQ) | bit(VIRTIO_ISM_F_QUERY) | (1 << 20));
    assert_eq!(vm.device.acked_features(), bit(VIRTIO_ISM_F_QUERY));
}

#[test]
fn test_shm_regions_describe_window_layout() {
    let (_pool, [mut vm]) = guests([0]);
    let list = vm.device.get_shm_regions().unwrap();
    assert_eq!(list.len, 2 * SHM);
    assert_eq!(list.region_list.len(), 2);
    assert_eq!(
        (
            list.region_list[0].id,
            list.region_list[0].offset,
            list.region_list[0].len
        ),
        (1, 0, SHM)
    );
    assert_eq!(
        (
            list.region_list[1].id,
            list.region_list[1].offset,
            list.region_list[1].len
        ),
        (2, SHM, 16 * 4)
    );
    let mut moved = list.clone();
    moved.addr = GuestAddress(0x40_0000_0000);
    vm.device.set_shm_regions(moved).unwrap();
    assert_eq!(
        vm.device.get_shm_regions().unwrap().addr,
        GuestAddress(0x40_0000_0000)
    );
    let mut wrong = list;
    wrong.len = SHM;
    assert!(vm.device.set_shm_regions(wrong).is_err());
}

#[test]
fn test_alloc_maps_region_writable_and_reports_areas() {
    let (_pool, [mut vm]) = guests([DRAFT_FEATURES]);
    let (token, areas) = vm.alloc(3 * CHUNK);
    assert_ne!(token.0, 0);
    // A fresh window gets one contiguous area.
    assert_eq!(
        areas,
        vec![Area {
            offset: 0,
            size: 3 * CHUNK
        }]
    );
    assert_eq!(vm.window.last_map(), (0, 3 * CHUNK, true));
    vm.window.write(CHUNK + 5, b"hello");
    assert_eq!(vm.window.read(CHUNK + 5, 5), b"hello");
    // Sizes are rounded up to pages; the next region starts at the next free chunk.
    let (_, areas) = vm.alloc(100);
    assert_eq!(
        areas,
        vec![Area {
            offset: 3 * CHUNK,
            size: 4096
        }]
    );
    assert_eq!(vm.counter("regions_attached"), 2);
    assert_eq!(vm.counter("bytes_mapped"), 3 * CHUNK + 4096);
    assert_eq!(vm.counter("ctrl_errors"), 0);
}

#[test]
fn test_alloc_e2big_reports_needed_areas_and_allocates_nothing() {
    let (pool, [mut vm]) = guests([DRAFT_FEATURES]);
    // Fragment the window: A B C with B freed leaves one free chunk between used ones.
    let (_, _) = vm.alloc(CHUNK);
    let (b, _) = vm.alloc(CHUNK);
    let (_, _) = vm.alloc(CHUNK);
    assert_eq!(vm.detach(b), Status::Ok);
    // 14 chunks needed, 13 contiguous at the end + 1 hole: two areas.
    let small = reply_len(AllocReplyHeader::SIZE, Area::SIZE, 1);
    let reply = vm.request(Request::Alloc(AllocRequest { size: 14 * CHUNK }), small);
    assert_eq!(reply.status, Status::TooBig);
    assert_eq!(AllocReplyHeader::decode(&reply.body).unwrap().num, 2);
    assert_eq!(pool.status().regions.len(), 2, "E2BIG must not allocate");
    // The driver's retry with room for 2 succeeds, and the region spans both pieces.
    let reply = vm.request(
        Request::Alloc(AllocRequest { size: 14 * CHUNK }),
        reply_len(AllocReplyHeader::SIZE, Area::SIZE, 2),
    );
    assert_eq!(reply.status, Status::Ok);
    let header = AllocReplyHeader::decode(&reply.body).unwrap();
    let areas: Vec<Area> = decode_areas(&reply.body[16..], header.num)
        .unwrap()
        .collect();
    assert_eq!(
        areas,
        vec![
            Area {
                offset: CHUNK,
                size: CHUNK
            },
            Area {
                offset: 3 * CHUNK,
                size: 13 * CHUNK
            }
        ]
    );
    // The two areas are consecutive pieces of one region: a peer mapping it in one piece
    // sees the end of the first area right before the start of the second.
    vm.window.write(2 * CHUNK - 1, b"a");
    vm.window.write(3 * CHUNK, b"b");
    let token = Token(header.token);
    assert_eq!(vm.grant_default(token, rw()), Status::Ok);
    let mut peer = TestVm::new(&pool, DRAFT_FEATURES);
    let peer_areas = peer.attach(token, 0);
    assert_eq!(
        peer_areas,
        vec![Area {
            offset: 0,
            size: 14 * CHUNK
        }]
    );
    assert_eq!(peer.window.read(CHUNK - 1, 2), b"ab");
}

#[test]
fn test_alloc_failures_map_to_draft_statuses() {
    let (_pool, [mut vm]) = guests([DRAFT_FEATURES]);
    let alloc = |size| Request::Alloc(AllocRequest { size });
    let big = reply_len(AllocReplyHeader::SIZE, Area::SIZE, 4);
    assert_eq!(vm.request(alloc(0), big).status, Status::Err);
    assert_eq!(vm.request(alloc(SHM + 1), big).status, Status::NoSpc);
    assert_eq!(vm.request(alloc(u64::MAX), big).status, Status::NoSpc);
    // Reply buffer without room for the reply header.
    assert_eq!(vm.request(alloc(4096), 8).status, Status::Err);
    // A pool smaller than the window: ENOMEM from the pool.
    let tiny = LocalPool::new(PoolConfig {
        size: CHUNK,
        per_vm_limit: None,
        hugepages: false,
        gid: None,
        ..PoolConfig::default()
    })
    .unwrap();
    let mut vm = TestVm::new(&tiny, DRAFT_FEATURES);
    assert_eq!(vm.request(alloc(2 * CHUNK), big).status, Status::NoMem);
    assert_eq!(vm.counter("ctrl_errors"), 1);
    assert_eq!(vm.counter("regions_attached"), 0);
}

/// A broker that is down, reconnecting or not answering is EAGAIN (retry later), never the
/// generic ERR; a broker that answers keeps its own statuses.
#[test]
fn test_an_unavailable_broker_is_eagain() {
    use crate::regions::pool_status;
    use std::io::{Error, ErrorKind};
    for kind in [ErrorKind::TimedOut, ErrorKind::ConnectionAborted] {
        let error = virtio_ism_pool_api::PoolError::Connection(Error::from(kind));
        assert_eq!(pool_status(&error), Status::Again);
    }
    assert_eq!(Status::Again.raw(), 11);
    let refused = virtio_ism_pool_api::PoolError::Protocol("Resume refused".into());
    assert_eq!(pool_status(&refused), Status::Err);
}

/// A session whose broker is down: every pool request fails as unreachable.
struct BrokerDown(Arc<dyn PoolSession>);

impl BrokerDown {
    fn error() -> virtio_ism_pool_api::PoolError {
        virtio_ism_pool_api::PoolError::Connection(io::Error::from(
            io::ErrorKind::ConnectionRefused,
        ))
    }
}

impl PoolSession for BrokerDown {
    fn info(&self) -> virtio_ism_pool_api::SessionInfo {
        self.0.info()
    }
    fn alloc(
        &self,
        _: u64,
    ) -> Result<virtio_ism_pool_api::RegionLease, virtio_ism_pool_api::PoolError> {
        Err(Self::error())
    }
    fn attach(
        &self,
        _: Token,
        _: virtio_ism_pool_api::Perms,
    ) -> Result<virtio_ism_pool_api::RegionLease, virtio_ism_pool_api::PoolError> {
        Err(Self::error())
    }
    fn detach(&self, _: Token) -> Result<(), virtio_ism_pool_api::PoolError> {
        Err(Self::error())
    }
    fn grant(
        &self,
        _: Token,
        _: virtio_ism_pool_api::GrantTarget,
        _: virtio_ism_pool_api::Perms,
    ) -> Result<(), virtio_ism_pool_api::PoolError> {
        Err(Self::error())
    }
    fn take_events(&self) -> Vec<virtio_ism_pool_api::PoolEvent> {
        Vec::new()
    }
}

/// EAGAIN is an extension: with `VIRTIO_ISM_F_EAGAIN` a driver learns that the pool is
/// unavailable (retry helps); a driver that did not negotiate it gets the draft's ERR.
#[test]
fn test_eagain_only_for_drivers_that_negotiated_it() {
    let pool = pool();
    for (features, want) in [
        (DRAFT_FEATURES, Status::Err),
        (ALL_FEATURES, Status::Err),
        (DRAFT_FEATURES | bit(VIRTIO_ISM_F_EAGAIN), Status::Again),
    ] {
        let mut vm = TestVm::with_session(Arc::new(BrokerDown(pool.session().unwrap())), features);
        let reply = vm.request(Request::Alloc(AllocRequest { size: CHUNK }), 64);
        assert_eq!(reply.status, want, "features {features:#x}");
        let reply = vm.attach_raw(Token(7), 0);
        assert_eq!(reply.status, want, "features {features:#x}");
    }
}

#[test]
fn test_two_devices_share_region_bytes() {
    let (_pool, [mut a, mut b]) = guests([DRAFT_FEATURES, DRAFT_FEATURES]);
    // Push B's free space so the offsets differ between the guests.
    b.alloc(2 * CHUNK);
    let (token, a_areas) = a.alloc_shared(CHUNK);
    let b_areas = b.attach(token, 0);
    assert_eq!(
        b_areas,
        vec![Area {
            offset: 2 * CHUNK,
            size: CHUNK
        }]
    );
    assert_eq!(b.window.last_map(), (2 * CHUNK, CHUNK, true));
    a.window.write(a_areas[0].offset + 100, b"from a");
    assert_eq!(b.window.read(b_areas[0].offset + 100, 6), b"from a");
    b.window.write(b_areas[0].offset, b"from b");
    assert_eq!(a.window.read(a_areas[0].offset, 6), b"from b");
}

#[test]
fn test_attach_without_grant_fails_perm_eattach() {
    let (_pool, [mut a, mut b]) = guests([DRAFT_FEATURES, DRAFT_FEATURES]);
    let (token, _) = a.alloc(CHUNK);
    assert_eq!(b.attach_raw(token, 0).status, Status::PermAttach);
    // Read and write granted but not ATTACH is still no attach.
    assert_eq!(
        a.grant_default(token, VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE),
        Status::Ok
    );
    assert_eq!(b.attach_raw(token, 0).status, Status::PermAttach);
    assert_eq!(b.attach_raw(Token(token.0 ^ 1), 0).status, Status::NoEnt);
    // ATTACH without READ: every mapping is readable, so that is PERM_EREAD.
    assert_eq!(a.grant_default(token, VIRTIO_ISM_PERM_ATTACH), Status::Ok);
    assert_eq!(b.attach_raw(token, 0).status, Status::PermRead);
    assert_eq!(b.counter("regions_attached"), 0);
    assert_eq!(b.counter("ctrl_errors"), 4);
}

#[test]
fn test_read_only_grant_maps_read_only_and_refuses_write() {
    let (_pool, [mut a, mut b]) = guests([DRAFT_FEATURES, DRAFT_FEATURES]);
    let (token, a_areas) = a.alloc(CHUNK);
    a.window.write(a_areas[0].offset, b"read me");
    assert_eq!(
        a.grant_default(token, VIRTIO_ISM_PERM_ATTACH | VIRTIO_ISM_PERM_READ),
        Status::Ok
    );
    assert_eq!(
        b.attach_raw(token, VIRTIO_ISM_PERM_WRITE as u32).status,
        Status::PermWrite
    );
    assert_eq!(
        b.attach_raw(token, (VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE) as u32)
            .status,
        Status::PermWrite
    );
    // rw_perm 0 (the Linux PoC driver): whatever is granted, here read-only.
    let areas = b.attach(token, 0);
    assert_eq!(b.window.last_map(), (areas[0].offset, CHUNK, false));
    assert_eq!(b.window.read(areas[0].offset, 7), b"read me");
}

#[test]
fn test_read_request_on_write_grant_maps_read_only() {
    let (_pool, [mut a, mut b]) = guests([DRAFT_FEATURES, DRAFT_FEATURES]);
    let (token, _) = a.alloc_shared(CHUNK);
    let areas = b.attach(token, VIRTIO_ISM_PERM_READ as u32);
    assert_eq!(b.window.last_map(), (areas[0].offset, CHUNK, false));
}

#[test]
fn test_per_device_grant_applies_to_that_device_only() {
    let (_pool, [mut a, mut b, mut c]) = guests([DRAFT_FEATURES, DRAFT_FEATURES, DRAFT_FEATURES]);
    let (token, _) = a.alloc(CHUNK);
    assert_eq!(a.grant_device(token, rw(), b.devid()), Status::Ok);
    assert_eq!(c.attach_raw(token, 0).status, Status::PermAttach);
    b.attach(token, 0);
    assert!(b.window.last_map().2);
    // devid 0 is nobody.
    assert_eq!(a.grant_device(token, rw(), 0), Status::Err);
    // Unknown permission bits are refused.
    assert_eq!(a.grant_default(token, 1 << 40), Status::Err);
    // Without MANAGE a holder cannot change grants.
    assert_eq!(b.grant_device(token, rw(), c.devid()), Status::Err);
    assert_eq!(c.attach_raw(token, 0).status, Status::PermAttach);
    // With MANAGE it can.
    assert_eq!(
        a.grant_device(token, rw() | VIRTIO_ISM_PERM_MANAGE, b.devid()),
        Status::Ok
    );
    assert_eq!(b.grant_device(token, rw(), c.devid()), Status::Ok);
    c.attach(token, 0);
    assert_eq!(a.grant_default(Token(token.0 ^ 1), rw()), Status::NoEnt);
}

#[test]
fn test_multi_peer_attach_all_see_the_same_bytes() {
    let (pool, [mut owner]) = guests([DRAFT_FEATURES]);
    let (token, owner_areas) = owner.alloc_shared(2 * CHUNK);
    let mut peers: Vec<(TestVm, Vec<Area>)> = (0..3)
        .map(|_| {
            let mut vm = TestVm::new(&pool, DRAFT_FEATURES);
            let areas = vm.attach(token, 0);
            (vm, areas)
        })
        .collect();
    for (i, (vm, areas)) in peers.iter_mut().enumerate() {
        vm.window
            .write(areas[0].offset + CHUNK + i as u64, &[i as u8 + 1]);
    }
    assert_eq!(
        owner.window.read(owner_areas[0].offset + CHUNK, 3),
        vec![1, 2, 3]
    );
    let holders = &pool.status().regions[0].holders;
    assert_eq!(holders.len(), 4);
    // Attaching twice from one device is refused.
    assert_eq!(peers[0].0.attach_raw(token, 0).status, Status::Err);
}

#[test]
fn test_detach_unmaps_and_second_detach_is_enoent() {
    let (pool, [mut vm]) = guests([DRAFT_FEATURES]);
    let (token, areas) = vm.alloc(CHUNK);
    assert!(vm.window.is_mapped(areas[0].offset));
    assert_eq!(vm.detach(token), Status::Ok);
    assert!(!vm.window.is_mapped(areas[0].offset));
    assert_eq!(vm.detach(token), Status::NoEnt);
    assert!(pool.status().regions.is_empty());
    assert_eq!(vm.counter("bytes_mapped"), 0);
    // The slot is free again.
    let (_, again) = vm.alloc(CHUNK);
    assert_eq!(again[0].offset, 0);
}

#[test]
fn test_reset_unmaps_and_detaches_everything() {
    let (pool, [mut a, mut b]) = guests([DRAFT_FEATURES, DRAFT_FEATURES]);
    let (token, _) = a.alloc(CHUNK);
    a.alloc(2 * CHUNK);
    assert_eq!(a.grant_default(token, rw()), Status::Ok);
    let b_areas = b.attach(token, 0);
    assert!(b.device.reset().is_some());
    assert!(!b.window.is_mapped(b_areas[0].offset));
    assert_eq!(b.device.acked_features(), 0);
    assert_eq!(b.counter("regions_attached"), 0);
    assert!(a.device.reset().is_some());
    assert!(
        pool.status().regions.is_empty(),
        "reset must give every region back"
    );
    assert_eq!(a.counter("bytes_mapped"), 0);
    // A second reset is harmless.
    assert!(a.device.reset().is_none());
}

#[test]
fn test_event_queue_reports_peer_attach_update_detach() {
    let (_pool, [mut a, mut b]) = guests([ALL_FEATURES, DRAFT_FEATURES]);
    let (token, areas) = a.alloc(CHUNK);
    a.post_event_buffers(4);
    assert_eq!(a.grant_default(token, rw()), Status::Ok);
    b.attach(token, 0);
    assert_eq!(b.detach(token), Status::Ok);
    a.interrupts.take();
    let events = a.take_events();
    let kinds: Vec<EventType> = events.iter().map(Event::kind).collect();
    assert_eq!(kinds, vec![EventType::Attach, EventType::Detach]);
    assert_eq!(events[0].devid, b.devid());
    assert_eq!(events[0].token, token.0);
    assert_eq!(events[0].offset, areas[0].offset);
    assert_eq!(events[0].peers, 1);
    assert_eq!(events[1].peers, 0);
    assert!(a.interrupts.take().contains(&VirtioInterruptType::Queue(1)));
    assert_eq!(a.counter("events_delivered"), 2);
    // Grant changes by a MANAGE holder reach the owner as UPDATE.
    assert_eq!(
        a.grant_device(token, rw() | VIRTIO_ISM_PERM_MANAGE, b.devid()),
        Status::Ok
    );
    b.attach(token, 0);
    assert_eq!(b.grant_default(token, VIRTIO_ISM_PERM_ATTACH), Status::Ok);
    let kinds: Vec<EventType> = a.take_events().iter().map(Event::kind).collect();
    assert_eq!(kinds, vec![EventType::Attach, EventType::Update]);
}

#[test]
fn test_events_wait_for_buffers_and_bad_buffers_are_returned_empty() {
    let (_pool, [mut a, mut b]) = guests([ALL_FEATURES, DRAFT_FEATURES]);
    let (token, _) = a.alloc_shared(CHUNK);
    b.attach(token, 0);
    // No buffers yet: the event waits.
    assert!(a.take_events().is_empty());
    // A too-short buffer and a device-readable one come back with length 0.
    a.events.submit(&[(DATA_BASE + 0x8000, 8, true)]);
    a.events.submit(&[(DATA_BASE + 0x8040, 64, false)]);
    a.worker.process_event_queue().unwrap();
    assert_eq!(a.events.pop_used(a.mem).unwrap().1, 0);
    assert_eq!(a.events.pop_used(a.mem).unwrap().1, 0);
    assert_eq!(a.counter("event_errors"), 2);
    a.post_event_buffers(1);
    let events = a.take_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind(), EventType::Attach);
}

#[test]
fn test_event_overflow_is_reported() {
    let (pool, [mut a]) = guests([ALL_FEATURES]);
    let (token, _) = a.alloc_shared(CHUNK);
    let mut peers: Vec<TestVm> = (0..3).map(|_| TestVm::new(&pool, 0)).collect();
    for _ in 0..(crate::MAX_PENDING_EVENTS / 6 + 1) {
        for p in peers.iter_mut() {
            p.attach(token, 0);
            assert_eq!(p.detach(token), Status::Ok);
        }
    }
    a.worker.process_pool_events().unwrap();
    a.post_event_buffers(1);
    let events = a.take_events();
    assert_eq!(events[0].kind(), EventType::Overflow);
    assert!(a.counter("events_dropped") > 0);
}

#[test]
fn test_without_event_queue_region_events_raise_the_bound_vector() {
    let vector_events = DRAFT_FEATURES | bit(VIRTIO_ISM_F_VECTOR_EVENTS);
    let (_pool, [mut a, mut b]) = guests([vector_events, DRAFT_FEATURES]);
    let (token, _) = a.alloc_shared(CHUNK);
    assert_eq!(a.event_vector(token, 3), Status::Ok);
    a.interrupts.take();
    b.attach(token, 0);
    a.worker.process_pool_events().unwrap();
    assert_eq!(a.interrupts.take(), vec![VirtioInterruptType::Vector(3)]);
    assert!(a.events.pop_used(a.mem).is_none());
}

/// A draft driver counts every interrupt on a region's vector as a kick: without
/// VIRTIO_ISM_F_VECTOR_EVENTS a peer's attach, a grant change and a detach raise nothing.
#[test]
fn test_draft_driver_region_vector_fires_only_for_kicks() {
    let (_pool, [mut a, mut b]) = guests([DRAFT_FEATURES, DRAFT_FEATURES]);
    let (token, _) = a.alloc_shared(CHUNK);
    assert_eq!(a.event_vector(token, 3), Status::Ok);
    assert_eq!(
        a.grant_device(token, rw() | VIRTIO_ISM_PERM_MANAGE, b.devid()),
        Status::Ok
    );
    a.interrupts.take();
    b.attach(token, 0);
    a.worker.process_pool_events().unwrap();
    assert_eq!(b.grant_default(token, rw()), Status::Ok, "an UPDATE for A");
    assert_eq!(b.detach(token), Status::Ok);
    a.worker.process_pool_events().unwrap();
    assert_eq!(a.interrupts.take(), vec![], "no region event may raise it");
    assert!(a.handle().deliver_kick(token));
    assert_eq!(a.interrupts.take(), vec![VirtioInterruptType::Vector(3)]);
}

#[test]
fn test_features_offer_grant_and_vector_events() {
    let (_pool, [vm]) = guests([0]);
    let offered = vm.device.features();
    assert_ne!(offered & bit(VIRTIO_ISM_F_GRANT), 0);
    assert_ne!(offered & bit(VIRTIO_ISM_F_VECTOR_EVENTS), 0);
}

/// `draft_default_perm`: regions of a driver without VIRTIO_ISM_F_GRANT are granted to the
/// pool's default target right after ALLOC; a granting driver's stay owner-only.
#[test]
fn test_draft_default_perm_applies_only_to_drivers_without_grant() {
    let pool = pool();
    // No policy: owner-only, as before.
    let mut none = TestVm::with_policy(&pool, DRAFT_FEATURES, DraftDefaultPerm::None);
    let mut peer = TestVm::new(&pool, DRAFT_FEATURES);
    let (token, _) = none.alloc(CHUNK);
    assert_eq!(peer.attach_raw(token, 0).status, Status::PermAttach);

    // rw: a peer attaches writable; MANAGE is never given.
    let mut rw_owner = TestVm::with_policy(&pool, DRAFT_FEATURES, DraftDefaultPerm::ReadWrite);
    let (token, _) = rw_owner.alloc(CHUNK);
    assert_eq!(peer.attach_raw(token, 0).status, Status::Ok);
    assert_eq!(
        pool_perms(&pool, token),
        VIRTIO_ISM_PERM_ATTACH | VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE
    );
    assert_eq!(peer.grant_default(token, rw()), Status::Err, "no MANAGE");

    // ro: read-only attach works, a writable one is refused.
    let mut ro_owner = TestVm::with_policy(&pool, DRAFT_FEATURES, DraftDefaultPerm::ReadOnly);
    let (token, _) = ro_owner.alloc(CHUNK);
    assert_eq!(
        peer.attach_raw(token, VIRTIO_ISM_PERM_WRITE as u32).status,
        Status::PermWrite
    );
    let areas = peer.attach(token, 0);
    assert!(peer.window.is_mapped(areas[0].offset));
    assert!(!peer.window.last_map().2, "mapped read-only");

    // A driver that negotiated VIRTIO_ISM_F_GRANT grants for itself: the policy stays out.
    let mut granting = TestVm::with_policy(
        &pool,
        DRAFT_FEATURES | bit(VIRTIO_ISM_F_GRANT),
        DraftDefaultPerm::ReadWrite,
    );
    let (token, _) = granting.alloc(CHUNK);
    assert_eq!(peer.attach_raw(token, 0).status, Status::PermAttach);
    assert_eq!(granting.grant_default(token, rw()), Status::Ok);
    assert_eq!(peer.attach_raw(token, 0).status, Status::Ok);
}

#[test]
fn test_event_vector_and_kicks() {
    let (_pool, [mut a, mut b]) = guests([DRAFT_FEATURES, DRAFT_FEATURES]);
    let (token, _) = a.alloc_shared(2 * CHUNK);
    b.alloc(CHUNK);
    let b_areas = b.attach(token, 0);
    assert_eq!(a.event_vector(token, 5), Status::Ok);
    assert_eq!(a.event_vector(token, 4096), Status::Err);
    assert_eq!(a.event_vector(Token(token.0 ^ 1), 5), Status::NoEnt);
    // B rings the doorbell of the region's second chunk: slot = chunk index * notify_size.
    let slot = (b_areas[0].offset / CHUNK + 1) * 4;
    assert_eq!(b.handle().handle_notify(slot), Some(token));
    assert_eq!(
        *b.kicks.kicks.lock().unwrap(),
        vec![(DevId(b.devid()), token)]
    );
    assert_eq!(b.counter("kicks"), 1);
    // A free slot and a slot past the area kick nobody.
    assert_eq!(b.handle().handle_notify(15 * 4), None);
    assert_eq!(b.handle().handle_notify(1 << 20), None);
    // The VMM routes the kick to A, which raises the vector A bound.
    a.interrupts.take();
    assert!(a.handle().deliver_kick(token));
    assert_eq!(a.interrupts.take(), vec![VirtioInterruptType::Vector(5)]);
    // B bound nothing: no interrupt.
    assert!(!b.handle().deliver_kick(token));
    // 0xffff unbinds.
    assert_eq!(a.event_vector(token, 0xffff), Status::Ok);
    assert!(!a.handle().deliver_kick(token));
}

#[test]
fn test_query_commands_need_the_feature() {
    let (pool, [mut draft]) = guests([DRAFT_FEATURES]);
    let (token, _) = draft.alloc(CHUNK);
    assert_eq!(draft.request(Request::QueryList, 64).status, Status::Err);
    assert_eq!(
        draft
            .request(
                Request::QueryRegion(QueryRegionRequest { token: token.0 }),
                64
            )
            .status,
        Status::Err
    );
    let mut vm = TestVm::new(&pool, ALL_FEATURES);
    let (t1, _) = vm.alloc(CHUNK);
    let (t2, areas2) = vm.alloc(2 * CHUNK);
    let reply = vm.request(Request::QueryList, 1 + 8 + 8);
    assert_eq!(reply.status, Status::TooBig);
    assert_eq!(QueryListReplyHeader::decode(&reply.body).unwrap().num, 2);
    let reply = vm.request(Request::QueryList, 1 + 8 + 16);
    assert_eq!(reply.status, Status::Ok);
    let mut listed: Vec<u64> = decode_tokens(&reply.body[8..], 2).unwrap().collect();
    listed.sort();
    let mut expected = vec![t1.0, t2.0];
    expected.sort();
    assert_eq!(listed, expected);
    let reply = vm.request(
        Request::QueryRegion(QueryRegionRequest { token: t2.0 }),
        1 + 32 + 16,
    );
    assert_eq!(reply.status, Status::Ok);
    let header = QueryRegionReplyHeader::decode(&reply.body).unwrap();
    assert_eq!(header.size, 2 * CHUNK);
    assert_eq!(
        header.flags,
        region_flags::VIRTIO_ISM_REGION_READ
            | region_flags::VIRTIO_ISM_REGION_WRITE
            | region_flags::VIRTIO_ISM_REGION_OWNER
    );
    assert_eq!(header.vector, 0xffff);
    assert_eq!(
        decode_areas(&reply.body[32..], 1)
            .unwrap()
            .collect::<Vec<_>>(),
        areas2
    );
    assert_eq!(
        vm.request(Request::QueryRegion(QueryRegionRequest { token: 1 }), 64)
            .status,
        Status::NoEnt
    );
}

#[test]
fn test_attach_e2big_reports_needed_and_releases_the_hold() {
    let (pool, [mut a, mut b]) = guests([DRAFT_FEATURES, DRAFT_FEATURES]);
    let (token, _) = a.alloc_shared(3 * CHUNK);
    // Fragment B: used, free, used, free...
    let held: Vec<Token> = (0..6).map(|_| b.alloc(CHUNK).0).collect();
    for t in held.iter().step_by(2) {
        assert_eq!(b.detach(*t), Status::Ok);
    }
    // Free: 0, 2, 4, then 6..16 contiguous: the 3 chunks fit contiguously at 6.
    assert_eq!(
        b.attach(token, 0),
        vec![Area {
            offset: 6 * CHUNK,
            size: 3 * CHUNK
        }]
    );
    assert_eq!(b.detach(token), Status::Ok);
    // Fill 6..16 leaving only the three holes.
    b.alloc(10 * CHUNK);
    let reply = b.request(
        Request::Attach(AttachRequest {
            token: token.0,
            rw_perm: 0,
        }),
        reply_len(AttachReplyHeader::SIZE, Area::SIZE, 2),
    );
    assert_eq!(reply.status, Status::TooBig);
    assert_eq!(AttachReplyHeader::decode(&reply.body).unwrap().num, 3);
    let holders = pool
        .status()
        .regions
        .iter()
        .find(|r| r.token == token.0)
        .unwrap()
        .holders
        .len();
    assert_eq!(holders, 1, "E2BIG attach must not keep the hold");
    let areas = b.attach(token, 0);
    assert_eq!(areas.len(), 3);
    a.window.write(2 * CHUNK, b"third");
    assert_eq!(b.window.read(areas[2].offset, 5), b"third");
}

#[test]
fn test_window_full_is_enospc() {
    let (pool, [mut a, mut b]) = guests([DRAFT_FEATURES, DRAFT_FEATURES]);
    let (token, _) = a.alloc_shared(2 * CHUNK);
    b.alloc(15 * CHUNK);
    assert_eq!(b.attach_raw(token, 0).status, Status::NoSpc);
    assert_eq!(
        pool.status()
            .regions
            .iter()
            .find(|r| r.token == token.0)
            .unwrap()
            .holders
            .len(),
        1
    );
}

#[test]
fn test_revoked_region_is_unmapped_and_reported() {
    let (pool, [mut a]) = guests([ALL_FEATURES]);
    let (token, areas) = a.alloc(CHUNK);
    a.post_event_buffers(2);
    pool.revoke(token).unwrap();
    let events = a.take_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind(), EventType::Revoke);
    assert_eq!(events[0].token, token.0);
    assert!(!a.window.is_mapped(areas[0].offset));
    assert_eq!(a.detach(token), Status::NoEnt);
}

#[test]
fn test_host_hotplug_adds_and_removes_regions() {
    let (_pool, [mut a, mut b]) = guests([DRAFT_FEATURES, ALL_FEATURES]);
    let (token, a_areas) = a.alloc(CHUNK);
    assert_eq!(a.grant_device(token, rw(), b.devid()), Status::Ok);
    b.post_event_buffers(4);
    let areas = b
        .handle()
        .add_region(token, virtio_ism_pool_api::Perms::NONE)
        .unwrap();
    assert_eq!(b.handle().regions(), vec![token]);
    let events = b.take_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind(), EventType::RegionAdded);
    assert_eq!(events[0].offset, areas[0].offset);
    a.window.write(a_areas[0].offset, b"hot");
    assert_eq!(b.window.read(areas[0].offset, 3), b"hot");
    let reply = b.request(
        Request::QueryRegion(QueryRegionRequest { token: token.0 }),
        64,
    );
    let flags = QueryRegionReplyHeader::decode(&reply.body).unwrap().flags;
    assert_ne!(flags & region_flags::VIRTIO_ISM_REGION_HOTPLUGGED, 0);
    assert!(b.handle().remove_region(token));
    assert!(!b.handle().remove_region(token));
    let kinds: Vec<EventType> = b.take_events().iter().map(Event::kind).collect();
    assert_eq!(kinds, vec![EventType::Revoke]);
    assert!(!b.window.is_mapped(areas[0].offset));
    // An inactive device refuses hotplug.
    b.device.reset();
    assert!(
        b.handle()
            .add_region(token, virtio_ism_pool_api::Perms::NONE)
            .is_err()
    );
}

#[test]
fn test_malformed_chains_get_err_or_nothing() {
    let (_pool, [mut vm]) = guests([ALL_FEATURES]);
    // Unknown class and unknown command.
    assert_eq!(vm.raw_request(&[9, 0], 1).status, Status::Err);
    assert_eq!(
        vm.raw_request(&[0, 1, 0, 0, 0, 0, 0, 0, 1, 0], 1).status,
        Status::Err
    );
    // Truncated payloads.
    assert_eq!(vm.raw_request(&[0, 0, 1, 2, 3], 64).status, Status::Err);
    assert_eq!(
        vm.raw_request(&[1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 64)
            .status,
        Status::Err
    );
    assert_eq!(vm.raw_request(&[3], 1).status, Status::Err);

    let status = DATA_BASE + 0x200;
    let submit = |vm: &mut TestVm, chain: &[(u64, u32, bool)]| {
        vm.mem.write_slice(&[0xaa], GuestAddress(status)).unwrap();
        vm.ctrl.submit(chain);
        vm.worker.process_ctrl_queue().unwrap();
        let used = vm.ctrl.pop_used(vm.mem).unwrap().1;
        let mut byte = [0u8];
        vm.mem.read_slice(&mut byte, GuestAddress(status)).unwrap();
        (used, byte[0])
    };
    vm.mem
        .write_slice(&[0, 0], GuestAddress(DATA_BASE))
        .unwrap();
    vm.mem
        .write_slice(&4096u64.to_le_bytes(), GuestAddress(DATA_BASE + 2))
        .unwrap();
    // Readable after writable.
    let (used, st) = submit(&mut vm, &[(status, 1, true), (DATA_BASE, 10, false)]);
    assert_eq!((used, st), (1, 255));
    // No writable buffer: nothing can be written, used length 0.
    let (used, st) = submit(&mut vm, &[(DATA_BASE, 10, false)]);
    assert_eq!((used, st), (0, 0xaa));
    // Writable buffer outside guest memory: nothing written anywhere.
    let (used, _) = submit(
        &mut vm,
        &[(DATA_BASE, 10, false), (MEM_SIZE as u64 - 4, 64, true)],
    );
    assert_eq!(used, 0);
    // Readable buffer outside guest memory: ERR.
    let (used, st) = submit(
        &mut vm,
        &[(MEM_SIZE as u64 + 0x1000, 10, false), (status, 1, true)],
    );
    assert_eq!((used, st), (1, 255));
    // Request longer than any command.
    let (used, st) = submit(&mut vm, &[(DATA_BASE, 4096, false), (status, 1, true)]);
    assert_eq!((used, st), (1, 255));
    // A reply scattered over 15 small writable buffers.
    let mut long: Vec<(u64, u32, bool)> = vec![(DATA_BASE, 10, false)];
    long.extend((0..15).map(|i| (status + 8 * i, 8, true)));
    let (used, st) = submit(&mut vm, &long);
    assert_eq!((used, st), (1 + 16 + 16, 0));
    assert_eq!(
        vm.counter("regions_attached"),
        1,
        "a 15-descriptor request is still valid"
    );
    assert_eq!(vm.counter("ctrl_errors"), 10);
    assert_eq!(vm.counter("ctrl_commands"), 11);
}

#[test]
fn test_status_and_reply_stay_inside_the_writable_buffer() {
    let (_pool, [mut vm]) = guests([DRAFT_FEATURES]);
    // Reply buffer of exactly header + one area: nothing past it is touched.
    let len = reply_len(AllocReplyHeader::SIZE, Area::SIZE, 1);
    let reply = vm.request(Request::Alloc(AllocRequest { size: CHUNK }), len);
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(reply.used_len as usize, len);
    let mut after = [0u8; 16];
    vm.mem
        .read_slice(&mut after, GuestAddress(DATA_BASE + 0x300 + len as u64 - 1))
        .unwrap();
    assert_eq!(after, [0xee; 16]);
}

#[test]
fn test_activate_runs_worker_thread_serving_kicks() {
    let pool = pool();
    let (device, _window) = device("ism-thread", pool.session().unwrap(), DRAFT_FEATURES);
    let mut vm = ThreadedVm::start(device, RecordingInterrupt::default());
    let used = vm.request(Request::Alloc(AllocRequest { size: CHUNK }), 64);
    assert_eq!(used as usize, 1 + 16 + 16);
    assert!(
        vm.interrupts
            .take()
            .contains(&VirtioInterruptType::Queue(0))
    );
    assert!(
        vm.device
            .activate(ActivationContext {
                mem: GuestMemoryAtomic::new(vm.mem.clone()),
                interrupt_cb: vm.interrupts.clone(),
                queues: vec![],
            })
            .is_err()
    );
    assert!(vm.device.reset().is_some());
    assert!(pool.status().regions.is_empty());
}

#[test]
fn test_activation_needs_the_control_queue() {
    let pool = pool();
    let (mut device, _window) = device("ism-q", pool.session().unwrap(), 0);
    let events = DriverQueue::new(guest_memory(), EVENTQ_BASE);
    let err = device.activate_worker(ActivationContext {
        mem: GuestMemoryAtomic::new(events.mem.clone()),
        interrupt_cb: Arc::new(RecordingInterrupt::default()),
        queues: vec![(1, events.device_queue(), EventFd::new(0).unwrap())],
    });
    let err = match err {
        Err(err) => err,
        Ok(_) => panic!("activated without the control queue"),
    };
    // The reason travels in the error's chain, for the transport to log.
    let mut chain = vec![err.to_string()];
    let mut source = std::error::Error::source(&err);
    while let Some(e) = source {
        chain.push(e.to_string());
        source = e.source();
    }
    assert_eq!(
        chain.last().map(String::as_str),
        Some("The driver did not enable the control queue (queue 0); it enabled [1]"),
        "{chain:?}"
    );
}

#[test]
fn test_descriptor_cap_applies_to_indirect_tables() {
    const VRING_DESC_F_INDIRECT: u16 = 4;
    let (_pool, [mut vm]) = guests([DRAFT_FEATURES]);
    let table = DATA_BASE + 0x4000;
    let request = DATA_BASE;
    let replies = DATA_BASE + 0x5000;
    let mut req = [0u8; 10];
    Request::Alloc(AllocRequest { size: CHUNK })
        .encode(&mut req)
        .unwrap();
    vm.mem.write_slice(&req, GuestAddress(request)).unwrap();
    vm.mem
        .write_slice(&[0xaa; 64], GuestAddress(replies))
        .unwrap();
    // An indirect table of `n` descriptors: the request, then n - 1 reply slots of 8 bytes.
    let submit_indirect = |vm: &mut TestVm, n: u16| {
        for i in 0..n {
            let (addr, len, write) = if i == 0 {
                (request, 10, 0)
            } else {
                (replies + 8 * u64::from(i - 1), 8, VRING_DESC_F_WRITE)
            };
            let flags = write | if i + 1 < n { VRING_DESC_F_NEXT } else { 0 };
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i + 1));
            vm.mem
                .write_obj(desc, GuestAddress(table + 16 * u64::from(i)))
                .unwrap();
        }
        let head = vm.ctrl.next_head(1);
        let desc_addr = vm
            .ctrl
            .mock
            .desc_table_addr()
            .unchecked_add(16 * u64::from(head));
        vm.ctrl.submit(&[(table, 16 * u32::from(n), false)]);
        // Turn the head into an indirect descriptor.
        let indirect = RawDescriptor::from(SplitDescriptor::new(
            table,
            16 * u32::from(n),
            VRING_DESC_F_INDIRECT,
            0,
        ));
        vm.mem.write_obj(indirect, desc_addr).unwrap();
        vm.worker.process_ctrl_queue().unwrap();
        let used = vm.ctrl.pop_used(vm.mem).unwrap().1;
        let mut status = [0u8];
        vm.mem
            .read_slice(&mut status, GuestAddress(replies))
            .unwrap();
        (used, status[0])
    };
    // 32 descriptors is the cap: served.
    assert_eq!(submit_indirect(&mut vm, 32), (1 + 16 + 16, 0));
    // 40 descriptors: refused with ERR in the first writable buffer, nothing allocated.
    vm.mem
        .write_slice(&[0xaa; 64], GuestAddress(replies))
        .unwrap();
    assert_eq!(submit_indirect(&mut vm, 40), (1, 255));
    assert_eq!(vm.counter("regions_attached"), 1);
}

#[test]
fn test_worker_thread_delivers_pool_events_without_polling() {
    let pool = pool();
    let (device, _window) = device("ism-events", pool.session().unwrap(), ALL_FEATURES);
    let mut vm = ThreadedVm::start(device, RecordingInterrupt::default());
    // Allocate and grant through the thread.
    vm.request(Request::Alloc(AllocRequest { size: CHUNK }), 64);
    let mut token = [0u8; 8];
    vm.mem
        .read_slice(&mut token, GuestAddress(DATA_BASE + 0x101))
        .unwrap();
    let token = Token(u64::from_le_bytes(token));
    let grant = Request::GrantDefault(GrantDefaultRequest {
        token: token.0,
        permissions: rw(),
    });
    vm.request(grant, 1);
    // Post an event buffer, then a peer attaches: the worker hears it on the pool's eventfd.
    vm.events
        .submit(&[(DATA_BASE + 0x8000, Event::SIZE as u32, true)]);
    vm.event_kick.write(1).unwrap();
    let mut peer = TestVm::new(&pool, DRAFT_FEATURES);
    peer.attach(token, 0);
    let (_, len) = wait_used(&mut vm.events);
    assert_eq!(len as usize, Event::SIZE);
    let mut raw = [0u8; Event::SIZE];
    vm.mem
        .read_slice(&mut raw, GuestAddress(DATA_BASE + 0x8000))
        .unwrap();
    let event = Event::decode(&raw).unwrap();
    assert_eq!(event.kind(), EventType::Attach);
    assert_eq!(event.devid, peer.devid());
    assert!(
        vm.interrupts
            .take()
            .contains(&VirtioInterruptType::Queue(1))
    );
    vm.device.reset();
}

// Kick routes: doorbells exchanged through the pool, slots wired through NotifyWiring.

fn bind_vector(vm: &mut TestVm, token: Token, vector: u64) {
    assert_eq!(vm.event_vector(token, vector), Status::Ok);
}

/// Window offset of the notify slot a driver rings for a region whose first area is at
/// `area_offset` (the notify area starts right after shmid 1).
fn notify_slot(area_offset: u64) -> u64 {
    SHM + area_offset / CHUNK * 4
}

#[test]
fn test_zero_hop_kick_raises_the_only_peers_irqfd() {
    let (_pool, [mut a, mut b]) = wired_guests([64, 64]);
    let (token, a_areas) = a.alloc_shared(CHUNK);
    bind_vector(&mut a, token, 3);
    // B takes a chunk first so the region lands at a different slot in B's window.
    b.alloc(CHUNK);
    let b_areas = b.attach(token, 0);
    let (slot_a, slot_b) = (
        notify_slot(a_areas[0].offset),
        notify_slot(b_areas[0].offset),
    );
    assert_ne!(slot_a, slot_b);
    // B learnt A's doorbell when it attached and wired its slot straight to it.
    assert_eq!(b.wiring().wired_offsets(), vec![slot_b]);
    assert_eq!(b.counter("kick_routes_zero_hop"), 1);
    // A has no peer doorbell yet: its slot traps.
    assert!(a.wiring().wired_offsets().is_empty());
    bind_vector(&mut b, token, 7);
    a.worker.process_pool_events().unwrap();
    assert_eq!(a.wiring().wired_offsets(), vec![slot_a]);

    // B's guest writes its slot; KVM signals the wired eventfd = A's irqfd for vector 3.
    assert!(b.wiring().guest_write(slot_b));
    assert_eq!(a.interrupts.irqfd_count(3), 1);
    assert_eq!(b.interrupts.irqfd_count(7), 0);
    // And back.
    assert!(a.wiring().guest_write(slot_a));
    assert_eq!(b.interrupts.irqfd_count(7), 1);
    assert_eq!(a.interrupts.irqfd_count(3), 0);
    // Neither device nor VMM took part.
    for vm in [&a, &b] {
        assert_eq!(vm.counter("kicks"), 0);
        assert_eq!(vm.counter("doorbell_writes"), 0);
        assert_eq!(vm.counter("kick_fallbacks"), 0);
        assert!(vm.kicks.kicks.lock().unwrap().is_empty());
    }
}

/// Why a doorbell write takes the trap route although the region gets (or had) a zero-hop
/// ioeventfd: the route follows the pool's doorbell reports asynchronously. A kick between a
/// peer's bind and the worker absorbing the report finds no doorbell (it reaches only
/// in-process peers); a report that changes nothing still rebuilds the route (unwire, wire),
/// and a write in that gap traps while the route counts as wired. Each case has a counter.
#[test]
fn test_trapped_kicks_are_counted_by_cause() {
    let (_pool, [mut a, mut b]) = wired_guests([64, 64]);
    let (token, a_areas) = a.alloc_shared(2 * CHUNK);
    bind_vector(&mut a, token, 3);
    b.attach(token, 0);
    bind_vector(&mut b, token, 7);
    let slot_a = notify_slot(a_areas[0].offset);
    let notify = |slot: u64| slot - SHM;

    // B's doorbell report is still on its way to A's worker: A's slot is not wired, the
    // write traps and the device knows no doorbell to ring yet. It holds the kick.
    assert!(!a.wiring().guest_write(slot_a));
    assert_eq!(a.handle().handle_notify(notify(slot_a)), Some(token));
    assert_eq!(a.counter("kicks_without_doorbell"), 1);
    assert_eq!(a.counter("doorbell_writes"), 0);
    assert_eq!(b.interrupts.irqfd_count(7), 0, "no doorbell yet");

    // The worker absorbs the report: the slot is wired zero-hop and the held kick reaches B,
    // once.
    a.worker.process_pool_events().unwrap();
    assert_eq!(a.wiring().wired_offsets(), vec![slot_a]);
    assert_eq!(b.interrupts.irqfd_count(7), 1, "the held kick is delivered");
    assert_eq!(a.counter("kicks_delivered_late"), 1);
    a.worker.process_pool_events().unwrap();
    assert_eq!(b.interrupts.irqfd_count(7), 0, "and only once");
    let wires = a.wiring().wire_calls();
    // B publishes the same doorbell again (e.g. its transport re-created the irqfd): A
    // rebuilds the route, unwire then wire, although nothing changed for the guest.
    b.handle().republish_doorbells();
    a.worker.process_pool_events().unwrap();
    assert_eq!(a.wiring().wire_calls(), wires + 1, "the route was rebuilt");
    // A write in that gap traps while the route counts as wired; it is still delivered.
    assert_eq!(a.handle().handle_notify(notify(slot_a)), Some(token));
    assert_eq!(a.counter("kicks_trapped_while_wired"), 1);
    assert_eq!(b.interrupts.irqfd_count(7), 1);

    // The second chunk's slot is never wired: trapping there is the expected route.
    assert_eq!(a.handle().handle_notify(notify(slot_a + 4)), Some(token));
    assert_eq!(a.counter("kicks_trapped_while_wired"), 1);
    assert_eq!(a.counter("kicks_without_doorbell"), 1);
    assert_eq!(a.counter("kicks"), 3);
    assert_eq!(b.interrupts.irqfd_count(7), 1);
}

/// A kick held for want of a doorbell is dropped, not kept, when the pool's reports bring
/// none (no peer bound a vector): a peer binding later must not get a stale kick.
#[test]
fn test_held_kick_without_any_peer_doorbell_is_dropped() {
    let (_pool, [mut a, mut b]) = wired_guests([64, 64]);
    let (token, a_areas) = a.alloc_shared(CHUNK);
    b.attach(token, 0);
    let slot_a = notify_slot(a_areas[0].offset);
    assert_eq!(a.handle().handle_notify(slot_a - SHM), Some(token));
    assert_eq!(a.counter("kicks_without_doorbell"), 1);
    a.worker.process_pool_events().unwrap();
    assert_eq!(a.counter("kicks_delivered_late"), 0);
    // B binds now: nothing stale reaches it.
    bind_vector(&mut b, token, 7);
    a.worker.process_pool_events().unwrap();
    assert_eq!(b.interrupts.irqfd_count(7), 0);
    assert_eq!(a.counter("kicks_delivered_late"), 0);
}

#[test]
fn test_several_peers_take_the_one_hop_route_and_fan_out() {
    let (_pool, [mut a, mut b, mut c]) = wired_guests([64, 64, 64]);
    let (token, a_areas) = a.alloc(2 * CHUNK);
    let slot_a = notify_slot(a_areas[0].offset);
    assert_eq!(a.grant_default(token, rw()), Status::Ok);
    bind_vector(&mut a, token, 1);
    for (vm, vector) in [(&mut b, 2), (&mut c, 3)] {
        vm.attach(token, 0);
        bind_vector(vm, token, vector);
    }
    a.worker.process_pool_events().unwrap();
    assert_eq!(a.counter("kick_routes_one_hop"), 1);
    assert_eq!(a.counter("kick_routes_zero_hop"), 0);
    assert_eq!(a.wiring().wired_offsets(), vec![slot_a]);

    // A's guest writes: A's own eventfd fires, A's worker writes both doorbells.
    assert!(a.wiring().guest_write(slot_a));
    assert_eq!(
        b.interrupts.irqfd_count(2),
        0,
        "fanned out before the worker ran"
    );
    assert_eq!(a.worker.process_one_hop_kicks(), 1);
    assert_eq!(b.interrupts.irqfd_count(2), 1);
    assert_eq!(c.interrupts.irqfd_count(3), 1);
    assert_eq!(a.interrupts.irqfd_count(1), 0, "the kicker is not kicked");
    assert_eq!(a.counter("kicks_one_hop"), 1);
    assert_eq!(a.counter("doorbell_writes"), 2);
    assert_eq!(
        a.worker.process_one_hop_kicks(),
        0,
        "one write, one fan-out"
    );

    // C leaves: A is down to one peer and wires straight to B's doorbell.
    assert_eq!(c.detach(token), Status::Ok);
    a.worker.process_pool_events().unwrap();
    assert_eq!(a.counter("kick_routes_one_hop"), 0);
    assert_eq!(a.counter("kick_routes_zero_hop"), 1);
    assert!(a.wiring().guest_write(slot_a));
    assert_eq!(b.interrupts.irqfd_count(2), 1);
    assert_eq!(c.interrupts.irqfd_count(3), 0);
    assert_eq!(a.worker.process_one_hop_kicks(), 0);
    assert_eq!(a.counter("kick_fallbacks"), 0);
}

#[test]
fn test_wiring_out_of_resources_falls_back_and_the_trap_still_kicks() {
    // B's VMM cannot register a single ioeventfd.
    let (pool, [mut a, mut b]) = wired_guests([64, 0]);
    let (token, _) = a.alloc_shared(CHUNK);
    bind_vector(&mut a, token, 4);
    let b_areas = b.attach(token, 0);
    let slot_b = notify_slot(b_areas[0].offset);
    // Zero hop refused, one hop refused: the slot traps, counted once.
    assert!(b.wiring().wired_offsets().is_empty());
    assert_eq!(b.wiring().wire_calls(), 2);
    assert_eq!(b.counter("kick_fallbacks"), 1);
    assert!(!b.wiring().guest_write(slot_b));
    // The VMM hands the trapped write to the device, which rings A's doorbell.
    assert_eq!(b.handle().handle_notify(slot_b - SHM), Some(token));
    assert_eq!(a.interrupts.irqfd_count(4), 1);
    assert_eq!(b.counter("kicks"), 1);
    assert_eq!(b.counter("doorbell_writes"), 1);

    // With room for one wiring and two peers, the one-hop route is used.
    let wiring_d = Arc::new(MemoryWiring::new(1));
    let mut d = TestVm::wired(&pool, &wiring_d);
    bind_vector(&mut b, token, 5);
    let d_areas = d.attach(token, 0);
    let slot_d = notify_slot(d_areas[0].offset);
    assert_eq!(d.counter("kick_routes_one_hop"), 1);
    assert_eq!(d.counter("kick_fallbacks"), 0);
    assert!(wiring_d.guest_write(slot_d));
    assert_eq!(d.worker.process_one_hop_kicks(), 1);
    assert_eq!(a.interrupts.irqfd_count(4), 1);
    assert_eq!(b.interrupts.irqfd_count(5), 1);
}

#[test]
fn test_detach_unbind_and_reset_withdraw_and_unwire() {
    let (pool, [mut a, mut b]) = wired_guests([64, 64]);
    let (token, _) = a.alloc_shared(CHUNK);
    bind_vector(&mut a, token, 3);
    b.attach(token, 0);
    bind_vector(&mut b, token, 7);
    a.worker.process_pool_events().unwrap();
    assert_eq!(a.wiring().wired_offsets().len(), 1);
    assert_eq!(b.wiring().wired_offsets().len(), 1);
    let mut published = pool.status().regions[0].doorbells.clone();
    published.sort();
    assert_eq!(published, vec![a.devid(), b.devid()]);

    // B unbinds its vector: its doorbell is withdrawn, A's slot goes back to trapping.
    bind_vector(&mut b, token, 0xffff);
    assert_eq!(pool.status().regions[0].doorbells, vec![a.devid()]);
    a.worker.process_pool_events().unwrap();
    assert!(a.wiring().wired_offsets().is_empty());
    assert_eq!(a.counter("kick_routes_zero_hop"), 0);
    // Rebinding publishes again.
    bind_vector(&mut b, token, 8);
    a.worker.process_pool_events().unwrap();
    assert_eq!(a.wiring().wired_offsets().len(), 1);
    assert!(a.wiring().guest_write(a.wiring().wired_offsets()[0]));
    assert_eq!(b.interrupts.irqfd_count(8), 1);

    // The transport re-created B's irqfds: republishing moves A's wiring to the new one.
    let old_irqfds = std::mem::take(&mut *b.interrupts.irqfds.as_ref().unwrap().lock().unwrap());
    b.handle().republish_doorbells();
    a.worker.process_pool_events().unwrap();
    assert!(a.wiring().guest_write(a.wiring().wired_offsets()[0]));
    assert_eq!(b.interrupts.irqfd_count(8), 1);
    assert!(
        old_irqfds[&8].read().is_err(),
        "the old irqfd is not used any more"
    );

    // B detaches: its slot is unwired and A's too.
    assert_eq!(b.detach(token), Status::Ok);
    assert!(b.wiring().wired_offsets().is_empty());
    assert_eq!(b.counter("kick_routes_zero_hop"), 0);
    a.worker.process_pool_events().unwrap();
    assert!(a.wiring().wired_offsets().is_empty());

    // Reset unwires everything and withdraws every doorbell.
    b.attach(token, 0);
    bind_vector(&mut b, token, 7);
    a.worker.process_pool_events().unwrap();
    assert_eq!(b.wiring().wired_offsets().len(), 1);
    assert!(b.device.reset().is_some());
    assert!(b.wiring().wired_offsets().is_empty());
    assert_eq!(pool.status().regions[0].doorbells, vec![a.devid()]);
    a.worker.process_pool_events().unwrap();
    assert!(a.wiring().wired_offsets().is_empty());
}

#[test]
fn test_rewire_all_wires_every_slot_again() {
    let (_pool, [mut a, mut b]) = wired_guests([64, 64]);
    let (token, _) = a.alloc(CHUNK);
    let (private, _) = a.alloc(CHUNK);
    assert_eq!(a.grant_default(token, rw()), Status::Ok);
    b.attach(token, 0);
    bind_vector(&mut b, token, 2);
    a.worker.process_pool_events().unwrap();
    let wired = a.wiring().wired_offsets();
    assert_eq!(
        wired.len(),
        1,
        "the private region {private} has no peer to wire to"
    );
    let calls = a.wiring().wire_calls();
    a.handle().rewire_all();
    assert_eq!(a.wiring().wire_calls(), calls + 1);
    assert_eq!(a.wiring().wired_offsets(), wired);
    assert!(a.wiring().guest_write(wired[0]));
    assert_eq!(b.interrupts.irqfd_count(2), 1);
}

#[test]
fn test_without_wiring_trapped_kicks_still_ring_peer_doorbells() {
    let pool = pool();
    // A's transport has irqfds (so A publishes a doorbell) but its VMM wires nothing.
    let mut a = TestVm::build(
        pool.session().unwrap(),
        DRAFT_FEATURES,
        Arc::new(RecordingInterrupt::with_irqfds()),
        None,
    );
    let mut b = TestVm::new(&pool, DRAFT_FEATURES);
    let (token, _) = a.alloc_shared(CHUNK);
    bind_vector(&mut a, token, 6);
    let b_areas = b.attach(token, 0);
    let slot = notify_slot(b_areas[0].offset) - SHM;
    assert_eq!(b.handle().handle_notify(slot), Some(token));
    assert_eq!(a.interrupts.irqfd_count(6), 1);
    // The kick sink is still called for peers without a doorbell.
    assert_eq!(
        *b.kicks.kicks.lock().unwrap(),
        vec![(DevId(b.devid()), token)]
    );
}

#[test]
fn test_worker_thread_fans_out_one_hop_kicks_on_its_own() {
    let (pool, [mut b, mut c]) = wired_guests([64, 64]);
    let (token, _) = b.alloc_shared(CHUNK);
    bind_vector(&mut b, token, 2);
    c.attach(token, 0);
    bind_vector(&mut c, token, 3);

    // A runs its own worker thread; the host hot-adds the region (no control queue needed).
    let wiring_a = Arc::new(MemoryWiring::new(64));
    let (a, _window) = device("ism-thread", pool.session().unwrap(), DRAFT_FEATURES);
    let mut a = ThreadedVm::start(
        a.with_notify_wiring(wiring_a.clone()),
        RecordingInterrupt::with_irqfds(),
    );
    let areas = a
        .device
        .handle()
        .add_region(token, virtio_ism_pool_api::Perms::NONE)
        .unwrap();
    let slot = notify_slot(areas[0].offset);
    assert_eq!(wiring_a.wired_offsets(), vec![slot]);

    assert!(wiring_a.guest_write(slot));
    let (mut got_b, mut got_c) = (0, 0);
    wait_until("both peers kicked", || {
        got_b += b.interrupts.irqfd_count(2);
        got_c += c.interrupts.irqfd_count(3);
        got_b > 0 && got_c > 0
    });
    assert_eq!((got_b, got_c), (1, 1));
    assert!(a.device.reset().is_some());
    assert!(wiring_a.wired_offsets().is_empty());
}

/// A guest like [`TestVm::wired`] whose driver negotiated `VIRTIO_ISM_F_KICK_PENDING`.
fn pending_guest(pool: &Arc<LocalPool>) -> TestVm {
    TestVm::build(
        pool.session().unwrap(),
        DRAFT_FEATURES | bit(VIRTIO_ISM_F_KICK_PENDING),
        Arc::new(RecordingInterrupt::with_irqfds()),
        Some(Arc::new(MemoryWiring::new(64))),
    )
}

/// Where the pending-bit tests keep their word of pending bits (guest memory, unused by the
/// queues and request buffers).
const PENDING_WORD: u64 = 0x8000;

fn pending_word(vm: &TestVm) -> u64 {
    vm.mem.read_obj::<u64>(GuestAddress(PENDING_WORD)).unwrap()
}

/// Two regions on one vector (a transport with no vector per region): each peer kick is first
/// recorded in the region's pending bit, then the shared vector is raised, so the driver
/// learns which region was kicked. Every kick route reaches the bit: the peer's zero-hop
/// ioeventfd, its trapped write, and an in-process delivery.
#[test]
fn test_pending_bits_name_the_kicked_region_on_a_shared_vector() {
    let pool = pool();
    let (mut a, mut b) = (pending_guest(&pool), pending_guest(&pool));
    let (first, _) = a.alloc_shared(CHUNK);
    let (second, _) = a.alloc_shared(CHUNK);
    let b_first = b.attach(first, 0);
    let b_second = b.attach(second, 0);
    assert_eq!(
        a.event_vector_pending(first, 1, PENDING_WORD, 0),
        Status::Ok
    );
    assert_eq!(
        a.event_vector_pending(second, 1, PENDING_WORD, 5),
        Status::Ok
    );
    b.worker.process_pool_events().unwrap();
    let slot = notify_slot(b_second[0].offset);
    assert!(b.wiring().wired_offsets().contains(&slot));

    // B's guest kicks the second region: KVM signals A's inbox, not A's irqfd.
    a.interrupts.take();
    assert!(b.wiring().guest_write(slot));
    assert_eq!(a.interrupts.irqfd_count(1), 0);
    assert_eq!(
        pending_word(&a),
        0,
        "nothing recorded before A's worker ran"
    );
    assert_eq!(a.worker.process_inbox_kicks(), 1);
    assert_eq!(pending_word(&a), 1 << 5);
    assert_eq!(a.interrupts.take(), vec![VirtioInterruptType::Vector(1)]);
    // Nothing more happened: a second pass finds no kick.
    assert_eq!(a.worker.process_inbox_kicks(), 0);

    // The driver clears its bits; a trapped write (the VMM calls handle_notify) and an
    // in-process delivery reach the first region's bit the same way.
    a.mem.write_obj(0u64, GuestAddress(PENDING_WORD)).unwrap();
    assert_eq!(
        b.handle().handle_notify(b_first[0].offset / CHUNK * 4),
        Some(first)
    );
    assert_eq!(a.worker.process_inbox_kicks(), 1);
    assert_eq!(pending_word(&a), 1);
    assert!(a.handle().deliver_kick(first));
    assert_eq!(a.worker.process_inbox_kicks(), 1);
    assert_eq!(pending_word(&a), 1);
    assert_eq!(
        a.interrupts.take(),
        vec![
            VirtioInterruptType::Vector(1),
            VirtioInterruptType::Vector(1)
        ]
    );
    assert_eq!(a.counter("kicks_pending"), 3);
    assert_eq!(a.counter("pending_bit_faults"), 0);

    // Rebinding with EVENT_VECTOR_SET drops the pending bit: B's kicks raise A's irqfd for
    // the vector directly again (zero hop), and nothing is recorded.
    a.mem.write_obj(0u64, GuestAddress(PENDING_WORD)).unwrap();
    assert_eq!(a.event_vector(second, 2), Status::Ok);
    b.worker.process_pool_events().unwrap();
    assert!(b.wiring().guest_write(slot));
    assert_eq!(a.interrupts.irqfd_count(2), 1);
    assert_eq!(a.worker.process_inbox_kicks(), 0);
    assert_eq!(pending_word(&a), 0);
}

/// EVENT_VECTOR_PENDING_SET exists only with its feature bit, and takes only an aligned word
/// of guest memory, a bit below 64, a vector of the MSI-X range and a held region.
#[test]
fn test_pending_bit_binding_is_checked() {
    let pool = pool();
    let mut draft = TestVm::new(&pool, DRAFT_FEATURES);
    let (token, _) = draft.alloc(CHUNK);
    assert_eq!(
        draft.event_vector_pending(token, 1, PENDING_WORD, 0),
        Status::Err,
        "unknown without the feature"
    );

    let mut vm = pending_guest(&pool);
    let (token, _) = vm.alloc(CHUNK);
    let mem_end = MEM_SIZE as u64;
    for (vector, addr, bit, why) in [
        (1, PENDING_WORD + 4, 0, "unaligned"),
        (1, PENDING_WORD, 64, "bit 64"),
        (2048, PENDING_WORD, 0, "vector past the MSI-X range"),
        (0xffff, PENDING_WORD, 0, "no vector"),
        (1, mem_end, 0, "outside guest memory"),
        (1, mem_end - 4, 0, "straddles the end of guest memory"),
        (1, u64::MAX - 7, 0, "at the top of the address space"),
    ] {
        assert_eq!(
            vm.event_vector_pending(token, vector, addr, bit),
            Status::Err,
            "{why}"
        );
    }
    assert_eq!(
        vm.event_vector_pending(Token(token.0 ^ 1), 1, PENDING_WORD, 0),
        Status::NoEnt
    );
    assert_eq!(
        vm.event_vector_pending(token, 1, mem_end - 8, 63),
        Status::Ok
    );
    // The last word of guest memory works, bit 63 included.
    assert!(vm.handle().deliver_kick(token));
    assert_eq!(vm.worker.process_inbox_kicks(), 1);
    assert_eq!(
        vm.mem.read_obj::<u64>(GuestAddress(mem_end - 8)).unwrap(),
        1 << 63
    );
}

/// Records what an [`crate::IsmObserver`] is told.
#[derive(Default)]
struct RecordingObserver(Mutex<Vec<crate::IsmEvent>>);

impl crate::IsmObserver for RecordingObserver {
    fn observe(&self, event: &crate::IsmEvent) {
        self.0.lock().unwrap().push(*event);
    }
}

impl RecordingObserver {
    fn take(&self) -> Vec<crate::IsmEvent> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

#[test]
fn test_observer_hears_successful_commands_and_pool_reports_only() {
    use crate::IsmEvent;
    use virtio_ism_pool_api::Perms;
    let (pool, [mut a, mut b]) = guests([DRAFT_FEATURES, DRAFT_FEATURES]);
    let (seen_a, seen_b) = (
        Arc::new(RecordingObserver::default()),
        Arc::new(RecordingObserver::default()),
    );
    a.handle().set_observer(Some(seen_a.clone()));
    b.handle().set_observer(Some(seen_b.clone()));
    let (token, _) = a.alloc(CHUNK - 100);
    // Refused: not reported.
    assert_eq!(b.attach_raw(token, 0).status, Status::PermAttach);
    assert_eq!(a.grant_default(token, rw()), Status::Ok);
    b.attach(token, VIRTIO_ISM_PERM_READ as u32);
    assert_eq!(b.detach(token), Status::Ok);
    assert_eq!(b.detach(token), Status::NoEnt);
    assert_eq!(
        seen_b.take(),
        [
            IsmEvent::RegionAttached {
                token,
                size: CHUNK,
                writable: false
            },
            IsmEvent::RegionDetached { token },
        ]
    );
    a.worker.process_pool_events().unwrap();
    let peer = DevId(b.devid());
    assert_eq!(
        seen_a.take(),
        [
            IsmEvent::RegionAllocated { token, size: CHUNK },
            IsmEvent::RegionGranted {
                token,
                peer: None,
                perms: Perms(rw())
            },
            IsmEvent::PeerAttached { token, peer },
            IsmEvent::PeerGone { token, peer },
        ]
    );
    pool.revoke(token).unwrap();
    a.worker.process_pool_events().unwrap();
    assert_eq!(seen_a.take(), [IsmEvent::RegionRevoked { token }]);
    // Removed observer: nothing more.
    a.handle().set_observer(None);
    a.alloc(CHUNK);
    assert!(seen_a.take().is_empty());
}

#[test]
fn test_host_created_region_is_granted_owned_and_announced_or_not_made_at_all() {
    use virtio_ism_pool_api::{GrantTarget, Perms};
    let (pool, [mut a, b]) = guests([ALL_FEATURES, ALL_FEATURES]);
    let handle = a.handle();
    let read = Perms::ATTACH.union(Perms::READ);
    // Larger than the window: refused before the pool is asked.
    let err = handle.create_region(SHM + CHUNK, &[]).unwrap_err();
    assert!(matches!(err, crate::HandleError::NoRoom { .. }), "{err}");
    assert_eq!(pool.status().used, 0);
    let (token, areas) = handle
        .create_region(CHUNK, &[(GrantTarget::Device(DevId(b.devid())), read)])
        .unwrap();
    assert_eq!(areas.len(), 1);
    assert_eq!(handle.regions(), [token]);
    let status = handle
        .pool_status()
        .expect("the embedded pool reports its status");
    assert_eq!(status.regions[0].owner, a.devid());
    assert_eq!(status.regions[0].grants, [(b.devid(), read.0)]);
    assert_eq!(handle.devid(), a.devid());
    // The guest hears of it as a hot-added region.
    a.post_event_buffers(2);
    let events = a.take_events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind(), EventType::RegionAdded);
    assert_eq!(events[0].token, token.0);
}

/// A session whose pool refuses every grant (to reach the rollback of a host-created region).
struct RefusingGrants(Arc<dyn PoolSession>);

impl PoolSession for RefusingGrants {
    fn info(&self) -> virtio_ism_pool_api::SessionInfo {
        self.0.info()
    }
    fn alloc(
        &self,
        size: u64,
    ) -> Result<virtio_ism_pool_api::RegionLease, virtio_ism_pool_api::PoolError> {
        self.0.alloc(size)
    }
    fn attach(
        &self,
        token: Token,
        want: virtio_ism_pool_api::Perms,
    ) -> Result<virtio_ism_pool_api::RegionLease, virtio_ism_pool_api::PoolError> {
        self.0.attach(token, want)
    }
    fn detach(&self, token: Token) -> Result<(), virtio_ism_pool_api::PoolError> {
        self.0.detach(token)
    }
    fn grant(
        &self,
        _: Token,
        _: virtio_ism_pool_api::GrantTarget,
        _: virtio_ism_pool_api::Perms,
    ) -> Result<(), virtio_ism_pool_api::PoolError> {
        Err(virtio_ism_pool_api::PoolError::Protocol(
            "grants refused".into(),
        ))
    }
    fn take_events(&self) -> Vec<virtio_ism_pool_api::PoolEvent> {
        self.0.take_events()
    }
}

#[test]
fn test_host_created_region_whose_grant_fails_is_freed() {
    use virtio_ism_pool_api::{GrantTarget, Perms};
    let pool = pool();
    let a = TestVm::with_session(
        Arc::new(RefusingGrants(pool.session().unwrap())),
        ALL_FEATURES,
    );
    let handle = a.handle();
    let err = handle
        .create_region(CHUNK, &[(GrantTarget::Default, Perms::READ)])
        .unwrap_err();
    assert!(matches!(err, crate::HandleError::Grant { .. }), "{err}");
    assert!(handle.regions().is_empty());
    assert!(pool.status().regions.is_empty());
    assert_eq!(pool.status().used, 0);
    assert_eq!(a.counter("regions_attached"), 0);
    // Without grants the same session creates it.
    let (token, _) = handle.create_region(CHUNK, &[]).unwrap();
    assert_eq!(handle.regions(), [token]);
}

#[test]
fn test_paused_worker_serves_nothing_until_resumed() {
    let pool = pool();
    let (device, _window) = device("ism-pause", pool.session().unwrap(), DRAFT_FEATURES);
    let mut vm = ThreadedVm::start(device, RecordingInterrupt::default());
    // Through the trait, as a VMM's vm.pause does; returns once the worker has parked.
    VirtioDevice::pause(&mut vm.device).unwrap();
    let mut bytes = [0u8; 64];
    let n = Request::Alloc(AllocRequest { size: CHUNK })
        .encode(&mut bytes)
        .unwrap();
    vm.mem
        .write_slice(&bytes[..n], GuestAddress(DATA_BASE))
        .unwrap();
    vm.ctrl
        .submit(&[(DATA_BASE, n as u32, false), (DATA_BASE + 0x100, 64, true)]);
    vm.ctrl_kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(vm.ctrl.pop_used(vm.mem).is_none(), "answered while paused");
    assert!(vm.interrupts.take().is_empty());
    assert!(pool.status().regions.is_empty());
    VirtioDevice::resume(&mut vm.device);
    assert_eq!(wait_used(&mut vm.ctrl).1 as usize, 1 + 16 + 16);
    assert_eq!(pool.status().regions.len(), 1);
    assert!(vm.device.reset().is_some());
}

/// The thread-start hook runs on the worker thread activation starts, before it serves
/// anything (the VMM applies the worker's seccomp filter there).
#[test]
fn test_thread_start_hook_runs_on_the_worker_thread() {
    let pool = pool();
    let ran_on: Arc<Mutex<Option<String>>> = Arc::default();
    let record = ran_on.clone();
    let (device, _window) = device("ism-hook", pool.session().unwrap(), DRAFT_FEATURES);
    let device = device.with_thread_start(Arc::new(move || {
        let name = std::thread::current().name().map(str::to_owned);
        *record.lock().unwrap() = Some(name.unwrap_or_default());
    }));
    let mut vm = ThreadedVm::start(device, RecordingInterrupt::default());
    wait_until("hook never ran", || ran_on.lock().unwrap().is_some());
    assert_eq!(ran_on.lock().unwrap().as_deref(), Some("virtio-ism"));
    assert!(vm.device.reset().is_some());
}

/// The permission bits the pool's default target holds on `token`.
fn pool_perms(pool: &LocalPool, token: Token) -> u64 {
    pool.status()
        .regions
        .iter()
        .find(|r| r.token == token.0)
        .expect("region in the pool")
        .default_perms
}
