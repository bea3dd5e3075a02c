// SPDX-License-Identifier: Apache-2.0
//! The REST API's ism endpoints in routed form: each request goes through ism-vmm's router
//! (`ism_vmm::rest::route`, as the HTTP server calls it) and, once routed, to the handlers
//! the VMM runs for it (`virtio_ism_api::IsmDevices` over `HandleControl`, as
//! `VmmApi::ism_*` does), against two real, activated virtio-ism devices sharing an
//! in-process pool with a neighbour that owns a region.
//!
//! Input: up to 16 requests separated by NUL bytes, each "<method> <url>\n<body>". In a
//! body, "PEERTOKN" becomes the neighbour's region token, "LASTTOKN" the token of the
//! region the last request created (tokens are random: the fuzzer could never guess one).
//!
//! Checks: nothing panics; every refusal is a 4xx or 5xx with a message; a routed request
//! re-encodes to the same action; an added region lies in the device's window and is then
//! listed by `vm.ism-regions`; replies serialise. The devices and the pool are built once;
//! after each input the devices are reset and re-activated, and the pool must be as after
//! setup.
#![no_main]

use std::cell::RefCell;
use std::io;
use std::sync::Arc;

use ism_fuzz::{CountingWindow, check_nothing_left};
use ism_pool::{GrantTarget, LocalPool, Perms, PoolConfig, PoolSession, PoolStatus, RegionLease};
use ism_vmm::rest::{self as router, ApiAction};
use libfuzzer_sys::fuzz_target;
use virtio_device::{ActivationContext, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use virtio_ism::{Ism, IsmConfig, IsmHandle, IsmWorker};
use virtio_ism_api::{HandleControl, IsmDevices, IsmEntry};
use virtio_ism_proto::defs::features::{VIRTIO_ISM_F_EVENT_QUEUE, VIRTIO_ISM_F_QUERY, bit};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const CHUNK: u64 = 4096;
const SHM: u64 = 32 * CHUNK;
const MEM_SIZE: usize = 0x4000;
const MAX_REQUESTS: usize = 16;

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _: VirtioInterruptType) -> io::Result<()> {
        Ok(())
    }
}

struct Device {
    ism: Ism,
    session: Arc<dyn PoolSession>,
    window: Arc<CountingWindow>,
    handle: IsmHandle,
    worker: Option<IsmWorker>,
}

impl Device {
    fn new(pool: &Arc<LocalPool>, id: &str) -> Self {
        let session: Arc<dyn PoolSession> = pool.session().unwrap();
        let window = Arc::new(CountingWindow::new(SHM));
        let config = IsmConfig {
            shm_size: SHM,
            chunk_size: CHUNK,
            notify_size: 4,
            draft_default_perm: Default::default(),
        };
        let ism = Ism::new(id, config, session.clone(), window.clone()).unwrap();
        let handle = ism.handle();
        Self {
            ism,
            session,
            window,
            handle,
            worker: None,
        }
    }

    /// As a driver leaves it: features negotiated, both queues set up (with no buffers).
    fn activate(&mut self, mem: &GuestMemoryMmap, base: u64) {
        self.ism
            .ack_features((1 << 32) | bit(VIRTIO_ISM_F_QUERY) | bit(VIRTIO_ISM_F_EVENT_QUEUE));
        let queue = |at: u64| {
            let mut q = Queue::new(16).unwrap();
            q.set_desc_table_address(Some(at as u32), Some(0));
            q.set_avail_ring_address(Some(at as u32 + 0x100), Some(0));
            q.set_used_ring_address(Some(at as u32 + 0x200), Some(0));
            q.set_ready(true);
            q
        };
        self.worker = Some(
            self.ism
                .activate_worker(ActivationContext {
                    mem: GuestMemoryAtomic::new(mem.clone()),
                    interrupt_cb: Arc::new(NoInterrupt),
                    queues: vec![
                        (0, queue(base), EventFd::new(0).unwrap()),
                        (1, queue(base + 0x400), EventFd::new(0).unwrap()),
                    ],
                })
                .unwrap(),
        );
    }

    fn reset(&mut self) {
        self.worker = None;
        self.ism.reset();
        assert_eq!(self.window.mapped(), 0, "reset left mappings");
        assert!(self.handle.regions().is_empty(), "reset left regions");
        self.session.take_events();
    }
}

struct Fixture {
    pool: Arc<LocalPool>,
    neighbour: Arc<dyn PoolSession>,
    lease: RegionLease,
    devices: Vec<Device>,
    api: IsmDevices,
    mem: GuestMemoryMmap,
    baseline: PoolStatus,
    debug: bool,
}

impl Fixture {
    fn new() -> Self {
        let pool = LocalPool::new(PoolConfig {
            size: 8 * SHM,
            per_vm_limit: None,
            hugepages: false,
            gid: Some(1),
            ..PoolConfig::default()
        })
        .unwrap();
        // devid 1: the neighbour, with a region everyone may attach read-write.
        let neighbour: Arc<dyn PoolSession> = pool.session().unwrap();
        let lease = neighbour.alloc(2 * CHUNK).unwrap();
        neighbour
            .grant(lease.token, GrantTarget::Default, Perms(0xf))
            .unwrap();
        // devids 2 and 3: the VM's devices "ism0" and "ism1".
        let devices = vec![Device::new(&pool, "ism0"), Device::new(&pool, "ism1")];
        let api = IsmDevices(
            devices
                .iter()
                .enumerate()
                .map(|(i, d)| IsmEntry {
                    id: format!("ism{i}"),
                    control: Arc::new(HandleControl {
                        handle: d.handle.clone(),
                        broker: None,
                    }),
                })
                .collect(),
        );
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let baseline = pool.status();
        Self {
            pool,
            neighbour,
            lease,
            devices,
            api,
            mem,
            baseline,
            debug: std::env::var_os("ISM_FUZZ_DEBUG").is_some(),
        }
    }

    fn reset(&mut self) {
        for device in &mut self.devices {
            device.reset();
        }
        self.neighbour.take_events();
        check_nothing_left(&self.pool, &self.baseline, &self.mem, MEM_SIZE);
    }
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

fn substitute(body: &[u8], magic: &[u8; 8], value: u64) -> Vec<u8> {
    let text = value.to_string();
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(magic) {
            out.extend_from_slice(text.as_bytes());
            i += magic.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

fn no_events(_: &'static str, _: Vec<(&'static str, String)>) {}

fn run(fixture: &mut Fixture, input: &[u8]) {
    for (i, device) in fixture.devices.iter_mut().enumerate() {
        device.activate(&fixture.mem, 0x800 * i as u64);
    }
    let mut last_token = 0u64;
    for request in input.split(|b| *b == 0).take(MAX_REQUESTS) {
        let (head, body) = match request.iter().position(|b| *b == b'\n') {
            Some(i) => (&request[..i], &request[i + 1..]),
            None => (request, &[][..]),
        };
        let body = substitute(body, b"PEERTOKN", fixture.lease.token.0);
        let body = substitute(&body, b"LASTTOKN", last_token);
        let head = String::from_utf8_lossy(head);
        let (method, url) = head.split_once(' ').unwrap_or((&head, ""));
        let action = match router::route(method, url, &body) {
            Ok(action) => action,
            Err(e) => {
                assert!((400..500).contains(&e.status_code()), "{e}");
                continue;
            }
        };
        let api = &fixture.api;
        let outcome = match action {
            ApiAction::IsmAddRegion(req) => {
                let json = serde_json::to_vec(&req).unwrap();
                assert_eq!(
                    router::route(method, url, &json),
                    Ok(ApiAction::IsmAddRegion(req.clone()))
                );
                api.add_region(req, &no_events).map(|info| {
                    for area in &info.areas {
                        assert!(area.offset.checked_add(area.size).unwrap() <= SHM);
                    }
                    let listed = api.regions_of(&info.id).unwrap();
                    assert!(listed.contains(&info.token), "added region not listed");
                    last_token = info.token;
                    serde_json::to_value(&info).unwrap()
                })
            }
            ApiAction::IsmRemoveRegion(req) => {
                let json = serde_json::to_vec(&req).unwrap();
                assert_eq!(
                    router::route(method, url, &json),
                    Ok(ApiAction::IsmRemoveRegion(req.clone()))
                );
                let (id, token) = (req.id.clone(), req.token);
                api.remove_region(req, &no_events).map(|()| {
                    let listed = api.regions_of(&id).unwrap();
                    assert!(!listed.contains(&token), "removed region still listed");
                    serde_json::Value::Null
                })
            }
            ApiAction::IsmRegions => Ok(serde_json::to_value(api.regions()).unwrap()),
            ApiAction::IsmPoolStatus => api.pool_status(),
            // VM-wide actions have no device to reach.
            _ => continue,
        };
        let status = match &outcome {
            Ok(_) => 200,
            Err(e) => {
                let status = e.status_code();
                assert!((400..600).contains(&status), "{status} for {e}");
                assert!(!e.chain().is_empty());
                status
            }
        };
        if fixture.debug {
            eprintln!("ISM_FUZZ_DIGEST {method} {url} -> {status}");
        }
        // The guest's side of a hotplug: REGION_ADDED / REMOVED on the event queue.
        for device in &mut fixture.devices {
            if let Some(worker) = device.worker.as_mut() {
                let _ = worker.process_event_queue();
                let _ = worker.process_pool_events();
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    FIXTURE.with_borrow_mut(|fixture| {
        let fixture = fixture.get_or_insert_with(Fixture::new);
        run(fixture, input);
        fixture.reset();
    })
});
