// SPDX-License-Identifier: Apache-2.0
//! The driver against the real device model behind ism-vmm's virtio-pci transport (through
//! `test_device`), two guests sharing one in-process pool, and a device made hostile by
//! rewriting its replies.

use std::boxed::Box;
use std::sync::Arc;
use std::vec;
use std::vec::Vec;

use ism_pool::{LocalPool, Perms, Token};
use virtio_device::VirtioInterruptType;
use virtio_ism_proto::defs::event as ev;
use virtio_ism_proto::defs::features::VIRTIO_F_VERSION_1;
use virtio_ism_proto::{ConfigSpace, Event, WireStruct};

use super::test_device::{ADDR, CHUNK, CHUNKS, Fabric, NOTIFY_SIZE, TestIsm, WINDOW_BAR, pool};
use super::*;
use crate::virtio::QueueError;

fn open(test: &TestIsm) -> Result<IsmDriver<'_, TestIsm>, IsmError> {
    open_with(test, IsmOptions::default())
}

fn open_with(test: &TestIsm, options: IsmOptions) -> Result<IsmDriver<'_, TestIsm>, IsmError> {
    // SAFETY: the test owns the fake function and its BARs.
    unsafe { IsmDriver::open(test, &test.config, ADDR, options) }
}

const RWA: u64 = PERM_READ | PERM_WRITE | PERM_ATTACH;

struct Group {
    pool: Arc<LocalPool>,
    fabric: Arc<Fabric>,
}

impl Group {
    fn new() -> Self {
        Self {
            pool: pool(),
            fabric: Arc::new(Fabric::default()),
        }
    }

    fn device(&self) -> TestIsm {
        TestIsm::new(&self.pool, &self.fabric)
    }

    /// A device offering only `mask` of its features.
    fn device_offering(&self, mask: u64) -> TestIsm {
        TestIsm::offering(&self.pool, &self.fabric, mask)
    }
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn test_open_negotiates_extensions_and_validates_config() {
    let group = Group::new();
    let a = group.device();
    assert_eq!(find_ism(&a.config, 0, 0), Some(ADDR));
    let ism = open(&a).unwrap();
    let info = *ism.info();
    assert_eq!(info.gid, 0x15a);
    assert_eq!(info.devid, a.devid);
    assert_eq!(
        (info.chunk_size, info.notify_size, info.chunks),
        (CHUNK, NOTIFY_SIZE, CHUNKS)
    );
    let all = bit(VIRTIO_F_VERSION_1)
        | bit(VIRTIO_ISM_F_EVENT_QUEUE)
        | bit(VIRTIO_ISM_F_QUERY)
        | bit(VIRTIO_ISM_F_GRANT)
        | bit(VIRTIO_ISM_F_EAGAIN);
    assert_eq!(info.features, all, "VECTOR_EVENTS only when asked for");
    assert_eq!(a.acked_features(), all);
    assert_eq!(a.status(), 1 | 2 | 8 | 4);
    assert_eq!(a.queue_state(0), (true, 0xffff));
    assert_eq!(a.queue_state(1), (true, 0xffff));
    let geometry = *ism.window().geometry();
    assert_eq!(geometry.regions_addr, WINDOW_BAR);
    assert_eq!(geometry.regions_len, CHUNKS * CHUNK);
    assert_eq!(geometry.notify_addr, WINDOW_BAR + CHUNKS * CHUNK);
}

#[test]
fn test_open_without_offered_extensions_works_as_draft_driver() {
    let group = Group::new();
    let a = group.device_offering(bit(VIRTIO_F_VERSION_1));
    let mut ism = open(&a).unwrap();
    assert_eq!(ism.info().features, bit(VIRTIO_F_VERSION_1));
    assert_eq!(a.acked_features(), bit(VIRTIO_F_VERSION_1));
    assert!(!a.queue_state(1).0, "event queue must stay disabled");
    assert_eq!(
        ism.poll_event(),
        Err(IsmError::NotNegotiated(VIRTIO_ISM_F_EVENT_QUEUE))
    );
    assert_eq!(
        ism.query_list(&mut [0; 4]),
        Err(IsmError::NotNegotiated(VIRTIO_ISM_F_QUERY))
    );
    let region = ism.alloc(CHUNK).unwrap();
    ism.write(&region, 0, b"draft").unwrap();
    // Without VIRTIO_ISM_F_GRANT the driver never sends GRANT, and the device (no
    // draft_default_perm policy here) keeps the region owner-only.
    assert_eq!(
        ism.grant_default(region.token(), RWA),
        Err(IsmError::NotNegotiated(VIRTIO_ISM_F_GRANT))
    );
    assert_eq!(
        ism.grant_for_device(region.token(), RWA, 7),
        Err(IsmError::NotNegotiated(VIRTIO_ISM_F_GRANT))
    );
    let b = group.device_offering(bit(VIRTIO_F_VERSION_1));
    let mut peer = open(&b).unwrap();
    assert_eq!(
        peer.attach(region.token(), Access::AsGranted)
            .map(|r| r.size()),
        Err(IsmError::Perm(Perm::Attach))
    );
}

#[test]
fn test_draft_options_negotiate_nothing_even_when_offered() {
    let group = Group::new();
    let a = group.device();
    let mut ism = open_with(&a, IsmOptions::draft()).unwrap();
    assert_eq!(ism.info().features, bit(VIRTIO_F_VERSION_1));
    assert_eq!(a.acked_features(), bit(VIRTIO_F_VERSION_1));
    assert!(!a.queue_state(1).0, "event queue must stay disabled");
    let region = ism.alloc(CHUNK).unwrap();
    assert_eq!(
        ism.grant_default(region.token(), RWA),
        Err(IsmError::NotNegotiated(VIRTIO_ISM_F_GRANT))
    );
}

#[test]
fn test_open_asks_only_for_wanted_features_and_binds_queue_vectors() {
    let group = Group::new();
    let a = group.device();
    let options = IsmOptions {
        features: bit(VIRTIO_ISM_F_QUERY),
        ctrl_vector: 1,
        ..IsmOptions::default()
    };
    let ism = open_with(&a, options).unwrap();
    assert_eq!(
        ism.info().features,
        bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_ISM_F_QUERY)
    );
    assert_eq!(a.queue_state(0), (true, 1));
    assert!(!a.queue_state(1).0);
}

#[test]
fn test_open_refuses_other_devices() {
    let group = Group::new();
    let a = group.device();
    a.config.poke_u16(2, 0x1044);
    assert_eq!(find_ism(&a.config, 0, 0), None);
    assert!(matches!(
        open(&a).err(),
        Some(IsmError::NotIsm {
            vendor: 0x1af4,
            device: 0x1044
        })
    ));
}

#[test]
fn test_two_guests_share_bytes_through_the_pool() {
    let group = Group::new();
    let (a, b) = (group.device(), group.device());
    let (mut ism_a, mut ism_b) = (open(&a).unwrap(), open(&b).unwrap());
    // Move B's free space so the two windows place the region differently.
    ism_b.alloc(2 * CHUNK).unwrap();
    let region = ism_a.alloc(3 * CHUNK + 100).unwrap();
    assert_eq!(region.size(), 3 * CHUNK + 4096);
    assert!(region.writable());
    assert_ne!(region.token(), 0);
    ism_a.grant_default(region.token(), RWA).unwrap();
    let seen = ism_b.attach(region.token(), Access::ReadWrite).unwrap();
    assert_eq!(seen.size(), region.size());
    assert_ne!(seen.first_offset(), region.first_offset());
    assert!(seen.writable());

    let data = pattern(10_000, 7);
    ism_a.write(&region, CHUNK - 5_000, &data).unwrap();
    let mut out = vec![0u8; data.len()];
    ism_b.read(&seen, CHUNK - 5_000, &mut out).unwrap();
    assert_eq!(out, data);
    ism_b.write(&seen, 3, b"reply").unwrap();
    let mut back = [0u8; 5];
    ism_a.read(&region, 3, &mut back).unwrap();
    assert_eq!(&back, b"reply");
    ism_b
        .window()
        .write_u64(&seen, 8 * CHUNK / 4, 0x1122_3344_5566_7788)
        .unwrap();
    assert_eq!(
        ism_a.window().read_u64(&region, 8 * CHUNK / 4).unwrap(),
        0x1122_3344_5566_7788
    );
}

#[test]
fn test_fragmented_alloc_retries_e2big_and_spans_areas() {
    let group = Group::new();
    let (a, b) = (group.device(), group.device());
    let (mut ism_a, mut ism_b) = (open(&a).unwrap(), open(&b).unwrap());
    // Fill the window with one-chunk regions, then free every other one: 8 separate holes.
    let singles: Vec<Region> = (0..CHUNKS).map(|_| ism_a.alloc(CHUNK).unwrap()).collect();
    for r in singles.iter().step_by(2) {
        ism_a.detach(r.token()).unwrap();
    }
    let errors_before = a.counter("ctrl_errors");
    let region = ism_a.alloc(5 * CHUNK).unwrap();
    // The first try offered INITIAL_AREAS (4) areas; the device asked for 5.
    assert_eq!(a.counter("ctrl_errors"), errors_before + 1);
    assert_eq!(region.areas().len(), 5);
    assert!(region.areas().iter().all(|area| area.size == CHUNK));
    // Bytes written across the area boundaries read back in order from one peer area.
    let data = pattern((5 * CHUNK) as usize, 3);
    ism_a.write(&region, 0, &data).unwrap();
    // QUERY_REGION goes through the same retry.
    let errors_before = a.counter("ctrl_errors");
    assert_eq!(ism_a.query_region(region.token()).unwrap().region, region);
    assert_eq!(a.counter("ctrl_errors"), errors_before + 1);
    // B fragments its own window the same way; its ATTACH needs the retry too.
    let b_singles: Vec<Region> = (0..CHUNKS).map(|_| ism_b.alloc(CHUNK).unwrap()).collect();
    for r in b_singles.iter().skip(1).step_by(2) {
        ism_b.detach(r.token()).unwrap();
    }
    ism_a.grant_default(region.token(), RWA).unwrap();
    let errors_before = b.counter("ctrl_errors");
    let seen = ism_b.attach(region.token(), Access::Read).unwrap();
    assert_eq!(b.counter("ctrl_errors"), errors_before + 1);
    assert_eq!(seen.areas().len(), 5);
    assert_eq!(seen.areas()[0].offset, CHUNK);
    let mut out = vec![0u8; data.len()];
    ism_b.read(&seen, 0, &mut out).unwrap();
    assert_eq!(out, data);
    let mut piece = vec![0u8; 300];
    ism_a.read(&region, CHUNK - 150, &mut piece).unwrap();
    assert_eq!(piece, data[(CHUNK - 150) as usize..(CHUNK + 150) as usize]);
}

#[test]
fn test_read_only_grant_refuses_write_mappings_and_writes() {
    let group = Group::new();
    let (a, b, c) = (group.device(), group.device(), group.device());
    let mut ism_a = open(&a).unwrap();
    let mut ism_b = open(&b).unwrap();
    let mut ism_c = open(&c).unwrap();
    let region = ism_a.alloc(CHUNK).unwrap();
    ism_a.write(&region, 0, b"owner").unwrap();
    ism_a
        .grant_default(region.token(), PERM_READ | PERM_ATTACH)
        .unwrap();
    assert_eq!(
        ism_b.attach(region.token(), Access::ReadWrite),
        Err(IsmError::Perm(Perm::Write))
    );
    let seen = ism_b.attach(region.token(), Access::Read).unwrap();
    assert!(!seen.writable());
    assert_eq!(ism_b.write(&seen, 0, b"x"), Err(IsmError::ReadOnly));
    assert_eq!(
        ism_b.window().write_u64(&seen, 0, 1),
        Err(IsmError::ReadOnly)
    );
    let mut out = [0u8; 5];
    ism_b.read(&seen, 0, &mut out).unwrap();
    assert_eq!(&out, b"owner");
    // Attaching twice from one device is ERR.
    assert_eq!(
        ism_b.attach(region.token(), Access::Read),
        Err(IsmError::DeviceError(255))
    );
    // As granted, with QUERY: the driver learns the mapping is read-only.
    let as_granted = ism_c.attach(region.token(), Access::AsGranted).unwrap();
    assert!(!as_granted.writable());
    assert_eq!(as_granted.areas().len(), 1);
}

#[test]
fn test_attach_needs_a_grant_and_a_real_token() {
    let group = Group::new();
    let (a, b, c) = (group.device(), group.device(), group.device());
    let mut ism_a = open(&a).unwrap();
    let mut ism_b = open(&b).unwrap();
    let mut ism_c = open(&c).unwrap();
    let region = ism_a.alloc(CHUNK).unwrap();
    assert_eq!(
        ism_b.attach(region.token(), Access::ReadWrite),
        Err(IsmError::Perm(Perm::Attach))
    );
    assert_eq!(
        ism_b.attach(region.token() ^ 1, Access::ReadWrite),
        Err(IsmError::NoEntry)
    );
    ism_a
        .grant_for_device(region.token(), RWA, b.devid)
        .unwrap();
    let seen = ism_b.attach(region.token(), Access::AsGranted).unwrap();
    assert!(seen.writable());
    assert_eq!(
        ism_c.attach(region.token(), Access::Read),
        Err(IsmError::Perm(Perm::Attach))
    );
    // ATTACH without READ cannot be mapped.
    ism_a
        .grant_for_device(region.token(), PERM_ATTACH, c.devid)
        .unwrap();
    assert_eq!(
        ism_c.attach(region.token(), Access::Read),
        Err(IsmError::Perm(Perm::Read))
    );
    // Grants are the owner's (or a MANAGE holder's) business.
    assert_eq!(
        ism_b.grant_default(region.token(), RWA),
        Err(IsmError::DeviceError(255))
    );
    assert_eq!(
        ism_a.grant_default(region.token(), 1 << 20),
        Err(IsmError::DeviceError(255))
    );
}

#[test]
fn test_detach_unmaps_and_forgets() {
    let group = Group::new();
    let a = group.device();
    let mut ism = open(&a).unwrap();
    let region = ism.alloc(2 * CHUNK).unwrap();
    assert!(a.window.is_mapped(region.first_offset()));
    ism.detach(region.token()).unwrap();
    assert!(!a.window.is_mapped(region.first_offset()));
    assert_eq!(ism.detach(region.token()), Err(IsmError::NoEntry));
    assert_eq!(ism.query_list(&mut [0; 4]), Ok(0));
    // The window is whole again.
    let big = ism.alloc(CHUNKS * CHUNK).unwrap();
    assert_eq!(big.areas().len(), 1);
    assert_eq!(ism.alloc(4096), Err(IsmError::NoSpace));
    assert_eq!(ism.alloc(0), Err(IsmError::DeviceError(255)));
}

#[test]
fn test_owner_sees_peer_attach_and_detach_events() {
    let group = Group::new();
    let (a, b) = (group.device(), group.device());
    let (mut ism_a, mut ism_b) = (open(&a).unwrap(), open(&b).unwrap());
    let region = ism_a.alloc(CHUNK).unwrap();
    assert_eq!(ism_a.poll_event(), Ok(None));
    ism_a.grant_default(region.token(), RWA).unwrap();
    ism_b.attach(region.token(), Access::ReadWrite).unwrap();
    let event = ism_a.wait_event(10).unwrap();
    assert_eq!(
        event,
        Some(IsmEvent::Attach {
            token: region.token(),
            offset: region.first_offset(),
            peer: b.devid,
            peers: 1,
        })
    );
    ism_b.detach(region.token()).unwrap();
    assert_eq!(
        ism_a.wait_event(10).unwrap(),
        Some(IsmEvent::Detach {
            token: region.token(),
            offset: region.first_offset(),
            peer: b.devid,
            peers: 0,
        })
    );
    assert!(a.interrupts.take().contains(&VirtioInterruptType::Queue(1)));
    // More events than buffers: each is reposted, so none is lost.
    for _ in 0..EVENT_QUEUE_SIZE {
        ism_b.attach(region.token(), Access::Read).unwrap();
        ism_b.detach(region.token()).unwrap();
    }
    let mut seen = 0;
    while let Some(event) = ism_a.wait_event(4).unwrap() {
        assert!(matches!(
            event,
            IsmEvent::Attach { .. } | IsmEvent::Detach { .. }
        ));
        seen += 1;
    }
    assert_eq!(seen, 2 * usize::from(EVENT_QUEUE_SIZE));
    // B holds nothing of A's now and saw no events of its own.
    assert_eq!(ism_b.poll_event(), Ok(None));
}

#[test]
fn test_grant_update_hotplug_and_revoke_events() {
    let group = Group::new();
    let (a, b) = (group.device(), group.device());
    let (mut ism_a, mut ism_b) = (open(&a).unwrap(), open(&b).unwrap());
    let region = ism_a.alloc(CHUNK).unwrap();
    ism_a.write(&region, 0, b"hot").unwrap();
    ism_a
        .grant_for_device(region.token(), RWA | PERM_MANAGE, b.devid)
        .unwrap();
    // The host attaches the region to B on the operator's behalf.
    b.handle
        .add_region(Token(region.token()), Perms::NONE)
        .unwrap();
    let Some(IsmEvent::RegionAdded { token, offset }) = ism_b.wait_event(10).unwrap() else {
        panic!("expected REGION_ADDED");
    };
    assert_eq!(token, region.token());
    let info = ism_b.query_region(token).unwrap();
    assert!(info.hotplugged() && !info.owner());
    assert!(info.region.writable());
    assert_eq!(info.region.first_offset(), offset);
    assert_eq!(info.vector, None);
    let mut out = [0u8; 3];
    ism_b.read(&info.region, 0, &mut out).unwrap();
    assert_eq!(&out, b"hot");
    // A MANAGE holder changing grants reaches the owner as UPDATE.
    assert!(matches!(
        ism_a.wait_event(10).unwrap(),
        Some(IsmEvent::Attach { .. })
    ));
    ism_b.grant_default(region.token(), PERM_READ).unwrap();
    assert_eq!(
        ism_a.wait_event(10).unwrap(),
        Some(IsmEvent::Update {
            token: region.token(),
            offset: region.first_offset()
        })
    );
    // The host revokes the region: both holders hear of it and lose the mapping.
    group.pool.revoke(Token(region.token())).unwrap();
    let revoke = |ism: &mut IsmDriver<'_, TestIsm>| loop {
        match ism.wait_event(10).unwrap() {
            Some(IsmEvent::Revoke { token, .. }) => return token,
            Some(_) => continue,
            None => panic!("no REVOKE"),
        }
    };
    assert_eq!(revoke(&mut ism_a), region.token());
    assert_eq!(revoke(&mut ism_b), region.token());
    assert!(!a.window.is_mapped(region.first_offset()));
    assert_eq!(ism_a.detach(region.token()), Err(IsmError::NoEntry));
}

#[test]
fn test_kick_rings_peers_on_their_bound_vector() {
    let group = Group::new();
    let (a, b) = (group.device(), group.device());
    let (mut ism_a, mut ism_b) = (open(&a).unwrap(), open(&b).unwrap());
    // Regions on both sides of the kicked one: a doorbell slot off by one would name them.
    ism_a.alloc(CHUNK).unwrap();
    let region = ism_a.alloc(CHUNK).unwrap();
    ism_a.alloc(CHUNK).unwrap();
    assert_eq!(region.first_offset(), CHUNK);
    ism_a.grant_default(region.token(), RWA).unwrap();
    let seen = ism_b.attach(region.token(), Access::ReadWrite).unwrap();
    ism_b
        .bind_event_vector(region.token(), 3, 0xfee0_1000, 0x41)
        .unwrap();
    assert_eq!(b.msix_entry(3), [0xfee0_1000, 0, 0x41, 0]);
    assert_eq!(ism_b.query_region(region.token()).unwrap().vector, Some(3));
    b.interrupts.take();
    ism_a.kick(&region).unwrap();
    // The doorbell of A's first chunk resolved to the region and reached B's vector 3.
    assert_eq!(
        *group.fabric.kicks.lock().unwrap(),
        vec![(ism_pool::DevId(a.devid), Token(region.token()))]
    );
    assert_eq!(a.counter("kicks"), 1);
    assert_eq!(b.interrupts.take(), vec![VirtioInterruptType::Vector(3)]);
    // The other way: A bound nothing, so B's kick raises nothing at A.
    a.interrupts.take();
    ism_b.kick(&seen).unwrap();
    assert!(a.interrupts.take().is_empty());
    assert_eq!(b.counter("kicks"), 1);
    // Unbinding stops it; vectors past the table are refused before the device hears.
    ism_b.set_event_vector(region.token(), NO_VECTOR).unwrap();
    // (That command's completion raised B's control-queue interrupt.)
    assert_eq!(b.interrupts.take(), vec![VirtioInterruptType::Queue(0)]);
    ism_a.kick(&region).unwrap();
    assert!(b.interrupts.take().is_empty());
    assert_eq!(group.fabric.kicks.lock().unwrap().len(), 3);
    assert!(matches!(
        ism_b.bind_event_vector(region.token(), 8, 0xfee0_0000, 0x42),
        Err(IsmError::Msix(_))
    ));
    assert_eq!(
        ism_b.set_event_vector(region.token() ^ 1, 2),
        Err(IsmError::NoEntry)
    );
}

#[test]
fn test_query_list_and_region() {
    let group = Group::new();
    let a = group.device();
    let mut ism = open(&a).unwrap();
    let r1 = ism.alloc(CHUNK).unwrap();
    let r2 = ism.alloc(3 * 4096).unwrap();
    let mut tokens = [0u64; 8];
    let n = ism.query_list(&mut tokens).unwrap();
    let mut listed = tokens[..n].to_vec();
    listed.sort_unstable();
    let mut expected = vec![r1.token(), r2.token()];
    expected.sort_unstable();
    assert_eq!(listed, expected);
    // Too small a buffer: E2BIG that the driver cannot satisfy.
    assert_eq!(ism.query_list(&mut [0; 1]), Err(IsmError::TooBig(2)));
    let info = ism.query_region(r2.token()).unwrap();
    assert!(info.owner() && !info.hotplugged());
    assert_eq!(info.region, r2);
    assert_eq!(ism.query_region(r2.token() ^ 1), Err(IsmError::NoEntry));
}

#[test]
fn test_region_access_is_bounds_checked() {
    let group = Group::new();
    let a = group.device();
    let mut ism = open(&a).unwrap();
    let region = ism.alloc(4096).unwrap();
    assert_eq!(
        ism.write(&region, 4094, b"abc"),
        Err(IsmError::OutOfBounds {
            offset: 4094,
            len: 3,
            size: 4096
        })
    );
    assert!(matches!(
        ism.read(&region, u64::MAX, &mut [0u8; 2]),
        Err(IsmError::OutOfBounds { .. })
    ));
    assert!(matches!(
        ism.window().read_u64(&region, 4),
        Err(IsmError::OutOfBounds { .. })
    ));
    assert!(matches!(
        ism.window().read_u64(&region, 4096),
        Err(IsmError::OutOfBounds { .. })
    ));
    ism.write(&region, 4093, b"abc").unwrap();
    ism.write(&region, 0, &[]).unwrap();
}

#[test]
fn test_reset_releases_every_region() {
    let group = Group::new();
    let a = group.device();
    let mut ism = open(&a).unwrap();
    let region = ism.alloc(CHUNK).unwrap();
    assert_eq!(group.pool.status().regions.len(), 1);
    ism.reset().unwrap();
    assert_eq!(group.pool.status().regions.len(), 0);
    assert!(!a.window.is_mapped(region.first_offset()));
    assert_eq!(a.status(), 0);
}

#[test]
fn test_silent_device_times_out_and_breaks_the_control_path() {
    let group = Group::new();
    let a = group.device();
    let options = IsmOptions {
        max_waits: 20,
        ..IsmOptions::default()
    };
    let mut ism = open_with(&a, options).unwrap();
    a.go_silent();
    let waits = a.waits.get();
    assert_eq!(ism.alloc(CHUNK), Err(IsmError::Timeout));
    assert_eq!(a.waits.get() - waits, 20);
    assert_eq!(ism.alloc(CHUNK), Err(IsmError::Broken));
}

// A hostile device: the real device answers, then its reply is rewritten.

/// Offset of the first area in an ALLOC reply (status, token, num).
const ALLOC_AREA: usize = 1 + 16;

fn put(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn hostile_alloc(tamper: impl FnMut(&mut [u8], &mut u32) + 'static) -> Result<Region, IsmError> {
    let group = Group::new();
    let a = group.device();
    let mut ism = open(&a).unwrap();
    a.tamper_next(Box::new(tamper));
    ism.alloc(2 * CHUNK)
}

#[test]
fn test_hostile_area_outside_window_is_refused() {
    let r = hostile_alloc(|b, _| put(b, ALLOC_AREA, CHUNKS * CHUNK));
    assert_eq!(
        r,
        Err(IsmError::Protocol(ProtocolError::AreaOutsideWindow {
            offset: CHUNKS * CHUNK,
            size: 2 * CHUNK,
            window: CHUNKS * CHUNK
        }))
    );
    let r = hostile_alloc(|b, _| put(b, ALLOC_AREA, u64::MAX - CHUNK + 1));
    assert!(matches!(
        r,
        Err(IsmError::Protocol(ProtocolError::AreaOutsideWindow { .. }))
    ));
}

#[test]
fn test_hostile_area_shapes_are_refused() {
    let r = hostile_alloc(|b, _| put(b, ALLOC_AREA, 4096));
    assert_eq!(
        r,
        Err(IsmError::Protocol(ProtocolError::AreaMisaligned(4096)))
    );
    let r = hostile_alloc(|b, _| put(b, ALLOC_AREA + 8, CHUNK));
    assert_eq!(
        r,
        Err(IsmError::Protocol(ProtocolError::SizeMismatch {
            expected: 2 * CHUNK,
            got: CHUNK
        }))
    );
    let r = hostile_alloc(|b, _| put(b, ALLOC_AREA + 8, 100));
    assert!(matches!(
        r,
        Err(IsmError::Protocol(ProtocolError::AreaSize { .. }))
    ));
    // Two areas, the same chunk twice.
    let r = hostile_alloc(|b, used| {
        put(b, 1 + 8, 2);
        put(b, ALLOC_AREA + 8, CHUNK);
        put(b, ALLOC_AREA + 16, 0);
        put(b, ALLOC_AREA + 24, CHUNK);
        *used += 16;
    });
    assert_eq!(
        r,
        Err(IsmError::Protocol(ProtocolError::AreasOverlap(0, 1)))
    );
    // A first area that is not whole chunks.
    let r = hostile_alloc(|b, used| {
        put(b, 1 + 8, 2);
        put(b, ALLOC_AREA + 8, CHUNK + 4096);
        put(b, ALLOC_AREA + 16, 4 * CHUNK);
        put(b, ALLOC_AREA + 24, CHUNK - 4096);
        *used += 16;
    });
    assert_eq!(
        r,
        Err(IsmError::Protocol(ProtocolError::PartialChunk { index: 0 }))
    );
    let r = hostile_alloc(|b, _| put(b, 1, 0));
    assert_eq!(r, Err(IsmError::Protocol(ProtocolError::ZeroToken)));
}

#[test]
fn test_hostile_counts_and_lengths_are_refused() {
    let r = hostile_alloc(|b, _| put(b, 1 + 8, 1000));
    assert_eq!(
        r,
        Err(IsmError::Protocol(ProtocolError::AreaCount {
            num: 1000,
            capacity: INITIAL_AREAS
        }))
    );
    let r = hostile_alloc(|b, _| put(b, 1 + 8, 0));
    assert!(matches!(
        r,
        Err(IsmError::Protocol(ProtocolError::AreaCount { num: 0, .. }))
    ));
    // A count within the buffer but more areas than the device wrote.
    let r = hostile_alloc(|b, _| put(b, 1 + 8, 3));
    assert_eq!(
        r,
        Err(IsmError::Protocol(ProtocolError::ShortReply {
            used: 1 + 16 + 16,
            needed: 1 + 16 + 48
        }))
    );
    let r = hostile_alloc(|_, used| *used = 9);
    assert!(matches!(
        r,
        Err(IsmError::Protocol(ProtocolError::ShortReply {
            used: 9,
            ..
        }))
    ));
    let r = hostile_alloc(|_, used| *used = 0);
    assert!(matches!(
        r,
        Err(IsmError::Protocol(ProtocolError::ShortReply {
            used: 0,
            ..
        }))
    ));
    // A used length past the buffer breaks the queue (checked by the split queue).
    let r = hostile_alloc(|_, used| *used = 10_000);
    assert!(matches!(
        r,
        Err(IsmError::Queue(QueueError::UsedLenTooLarge {
            len: 10_000,
            ..
        }))
    ));
}

#[test]
fn test_hostile_status_bytes_are_refused() {
    let r = hostile_alloc(|b, _| b[0] = 42);
    assert_eq!(r, Err(IsmError::Protocol(ProtocolError::UnknownStatus(42))));
    // E2BIG asking for no more than was offered, or for more than the driver keeps.
    let r = hostile_alloc(|b, _| {
        b[0] = 7;
        put(b, 1 + 8, 2);
    });
    assert_eq!(
        r,
        Err(IsmError::Protocol(ProtocolError::BadTooBig {
            needed: 2,
            offered: INITIAL_AREAS
        }))
    );
    let r = hostile_alloc(|b, _| {
        b[0] = 7;
        put(b, 1 + 8, 1000);
    });
    assert_eq!(r, Err(IsmError::TooBig(1000)));
    // E2BIG on a command without a list.
    let group = Group::new();
    let a = group.device();
    let mut ism = open(&a).unwrap();
    let region = ism.alloc(CHUNK).unwrap();
    a.tamper_next(Box::new(|b, _| b[0] = 7));
    assert_eq!(
        ism.detach(region.token()),
        Err(IsmError::Protocol(ProtocolError::UnexpectedTooBig))
    );
}

#[test]
fn test_hostile_query_region_reply_is_refused() {
    let group = Group::new();
    let a = group.device();
    let mut ism = open(&a).unwrap();
    let region = ism.alloc(CHUNK).unwrap();
    // flags without READ
    a.tamper_next(Box::new(|b, _| put(b, 1 + 8, 2)));
    assert_eq!(
        ism.query_region(region.token()),
        Err(IsmError::Protocol(ProtocolError::BadFlags(2)))
    );
    a.tamper_next(Box::new(|b, _| put(b, 1 + 16, 5000)));
    assert_eq!(
        ism.query_region(region.token()),
        Err(IsmError::Protocol(ProtocolError::BadVector(5000)))
    );
    // size disagreeing with the areas
    a.tamper_next(Box::new(|b, _| put(b, 1, 2 * CHUNK)));
    assert!(matches!(
        ism.query_region(region.token()),
        Err(IsmError::Protocol(ProtocolError::SizeMismatch { .. }))
    ));
    // A zero token in a list.
    a.tamper_next(Box::new(|b, _| put(b, 1 + 8, 0)));
    assert_eq!(
        ism.query_list(&mut [0; 4]),
        Err(IsmError::Protocol(ProtocolError::ZeroToken))
    );
}

fn config_bytes(devid: u64, chunk_size: u64, notify_size: u64) -> [u8; 32] {
    ConfigSpace {
        gid: 1,
        devid,
        chunk_size,
        notify_size,
    }
    .to_bytes()
    .unwrap()
}

#[test]
fn test_hostile_config_is_refused_and_device_failed() {
    let cases = [
        (config_bytes(1, 3000, 4), ConfigError::ChunkSize(3000)),
        (config_bytes(1, 2048, 4), ConfigError::ChunkSize(2048)),
        (config_bytes(1, CHUNK, 3), ConfigError::NotifySize(3)),
        (config_bytes(1, CHUNK, 8192), ConfigError::NotifySize(8192)),
        (config_bytes(0, CHUNK, 4), ConfigError::ZeroDevid),
        // A chunk size the window is not a multiple of.
        (
            config_bytes(1, 32 * CHUNK, 4),
            ConfigError::RegionWindow {
                len: CHUNKS * CHUNK,
                chunk_size: 32 * CHUNK,
            },
        ),
        // More notify bytes per chunk than shmid 2 holds.
        (
            config_bytes(1, CHUNK, 64),
            ConfigError::NotifyWindow {
                len: CHUNKS * NOTIFY_SIZE,
                needed: CHUNKS * 64,
            },
        ),
    ];
    for (config, expected) in cases {
        let group = Group::new();
        let a = group.device();
        a.override_config(config);
        let result = open(&a);
        assert_eq!(result.err(), Some(IsmError::Config(expected)));
        assert_ne!(a.status() & 0x80, 0, "FAILED must be set");
    }
}

#[test]
fn test_missing_or_duplicate_shm_regions_are_refused() {
    let group = Group::new();
    let a = group.device();
    // Renumber shmid 2 to an unknown id.
    let shm2 = a.config.shm_cap(2);
    a.config.poke_u8(shm2 + 5, 7);
    assert_eq!(
        open(&a).err(),
        Some(IsmError::Config(ConfigError::MissingShm(2)))
    );
    a.config.poke_u8(shm2 + 5, 1);
    assert_eq!(
        open(&a).err(),
        Some(IsmError::Config(ConfigError::DuplicateShm(1)))
    );
}

fn event(ev_type: u64, offset: u64, devid: u64, token: u64) -> Event {
    Event {
        ev_type,
        offset,
        devid,
        peers: 1,
        token,
    }
}

#[test]
fn test_hostile_events_are_refused() {
    let geometry = WindowGeometry {
        regions_addr: WINDOW_BAR,
        regions_len: CHUNKS * CHUNK,
        notify_addr: WINDOW_BAR + CHUNKS * CHUNK,
        notify_len: CHUNKS * NOTIFY_SIZE,
        chunk_size: CHUNK,
        notify_size: NOTIFY_SIZE,
    };
    let decode = |e: Event| IsmEvent::decode(&e, &geometry);
    assert_eq!(
        decode(event(ev::VIRTIO_ISM_EVENT_ATTACH, CHUNK, 5, 9)),
        Ok(IsmEvent::Attach {
            token: 9,
            offset: CHUNK,
            peer: 5,
            peers: 1
        })
    );
    assert_eq!(
        decode(event(64, 0, 5, 9)),
        Err(ProtocolError::UnknownEvent(64))
    );
    assert_eq!(
        decode(event(ev::VIRTIO_ISM_EVENT_DETACH, 0, 5, 0)),
        Err(ProtocolError::ZeroToken)
    );
    assert_eq!(
        decode(event(ev::VIRTIO_ISM_EVENT_UPDATE, CHUNKS * CHUNK, 0, 9)),
        Err(ProtocolError::EventOffset(CHUNKS * CHUNK))
    );
    assert_eq!(
        decode(event(ev::VIRTIO_ISM_EVENT_REVOKE, 4096, 0, 9)),
        Err(ProtocolError::EventOffset(4096))
    );
    assert_eq!(
        decode(event(ev::VIRTIO_ISM_EVENT_ATTACH, 0, 0, 9)),
        Err(ProtocolError::EventNoPeer)
    );
    assert_eq!(
        decode(event(ev::VIRTIO_ISM_EVENT_OVERFLOW, 0, 0, 0)),
        Ok(IsmEvent::Overflow)
    );
}
