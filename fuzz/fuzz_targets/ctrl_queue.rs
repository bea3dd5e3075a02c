// SPDX-License-Identifier: Apache-2.0
//! Arbitrary descriptor chains on the virtio-ism control (and event) queue of a device backed
//! by a real in-process pool and a window that checks every map/unmap.
//!
//! Input layout:
//!   [0]      features: bit 0 QUERY, bit 1 EVENT_QUEUE
//!   [1..3]   le16 n: the next n bytes (at most 8 KiB) are copied to guest memory at DATA;
//!            every 8-byte "PEERTOKN" in them is replaced by a token the fuzzed device may
//!            attach (tokens are random, the fuzzer could never guess one)
//!   then operations, each: ctl u8, then (ctl & 0xf) descriptors of 5 bytes
//!            (flags u8, le16 offset from DATA, le16 len):
//!     ctl bit 4: put the chain on the event queue instead of the control queue
//!     ctl bit 5: let the peer attach/detach every region the device holds, then process
//!                pool events
//!     ctl bit 6: ring the doorbell at the first descriptor's offset and deliver a kick
//!     ctl bit 7: host hotplug: add the peer's region to the device, or remove it if held
//!     flags bit 7: keep flags and next exactly as given (next = offset & 0xf) instead of
//!                  linking the descriptors in order: loops, indirect tables, dangling links.
//!
//! The pool, the peer with its region, the guest memory and the device are built once per
//! process and put back to their initial state after every input (device reset, guest memory
//! zeroed, the peer's holds and grants restored, pending pool events drained): the pool's
//! status snapshot must then equal the one taken right after setup, so no input can leave
//! state behind for the next. With ISM_FUZZ_DEBUG set, every input prints a digest of what
//! the guest saw (used rings, counter deltas); `resources/fuzz.sh --check-reset` compares the
//! digests of a corpus run in one process with each input run on its own.
#![no_main]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use ism_fuzz::check_nothing_left;
use ism_pool::{
    DevId, GrantTarget, LocalPool, Perms, PoolConfig, PoolSession, PoolStatus, RegionLease, Token,
};
use libfuzzer_sys::fuzz_target;
use virtio_device::Counters;
use virtio_device::{ActivationContext, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use virtio_ism::{Ism, IsmConfig, IsmHandle, ShmWindow};
use virtio_ism_proto::defs::features::{VIRTIO_ISM_F_EVENT_QUEUE, VIRTIO_ISM_F_QUERY, bit};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 0x10000;
const QUEUE_SIZE: u16 = 16;
const CTRL: (u64, u64, u64) = (0x0, 0x100, 0x200);
const EVENTQ: (u64, u64, u64) = (0x400, 0x500, 0x600);
const DATA: u64 = 0x1000;
const MAX_DATA: usize = 0x2000;
const MAGIC: &[u8; 8] = b"PEERTOKN";

const CHUNK: u64 = 4096;
const SHM: u64 = 64 * CHUNK;

/// A window that keeps no memory but checks the device never maps outside shmid 1, never
/// maps over a live mapping and only unmaps what it mapped.
struct CheckedWindow {
    mapped: Mutex<BTreeMap<u64, u64>>,
}

impl ShmWindow for CheckedWindow {
    fn map(
        &self,
        window_offset: u64,
        _fd: BorrowedFd<'_>,
        _fd_offset: u64,
        len: u64,
        _writable: bool,
    ) -> io::Result<()> {
        assert!(len > 0 && window_offset.is_multiple_of(CHUNK));
        assert!(
            window_offset.checked_add(len).unwrap() <= SHM,
            "map outside shmid 1"
        );
        let mut mapped = self.mapped.lock().unwrap();
        if let Some((&start, &l)) = mapped.range(..window_offset + len).next_back() {
            assert!(start + l <= window_offset, "map over a live mapping");
        }
        mapped.insert(window_offset, len);
        Ok(())
    }

    fn unmap(&self, window_offset: u64, len: u64) -> io::Result<()> {
        let removed = self.mapped.lock().unwrap().remove(&window_offset);
        assert_eq!(removed, Some(len), "unmap of something not mapped");
        Ok(())
    }
}

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _int_type: VirtioInterruptType) -> io::Result<()> {
        Ok(())
    }
}

struct DriverRing {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
}

impl DriverRing {
    fn new((desc, avail, used): (u64, u64, u64)) -> Self {
        Self {
            desc,
            avail,
            used,
            avail_idx: 0,
        }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        q
    }

    /// Write descriptors 0..n and publish descriptor 0 as the head.
    fn submit(&mut self, mem: &GuestMemoryMmap, descs: &[(u8, u16, u16)]) {
        let n = descs.len() as u16;
        for (i, &(flags, off, len)) in descs.iter().enumerate() {
            let i = i as u16;
            let (flags, next) = if flags & 0x80 != 0 {
                (u16::from(flags & 0x7f), off & 0xf)
            } else {
                let mut f = u16::from(flags & 0x2); // WRITE only
                if i + 1 < n {
                    f |= 1; // NEXT
                }
                (f, i + 1)
            };
            let at = GuestAddress(self.desc + 16 * u64::from(i));
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&(DATA + u64::from(off)).to_le_bytes());
            raw[8..12].copy_from_slice(&u32::from(len).to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, at).unwrap();
        }
        let slot = u64::from(self.avail_idx % QUEUE_SIZE);
        mem.write_obj(0u16, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }
}

fn substitute_token(data: &mut [u8], token: Token) {
    let mut i = 0;
    while i + 8 <= data.len() {
        if &data[i..i + 8] == MAGIC {
            data[i..i + 8].copy_from_slice(&token.0.to_le_bytes());
            i += 8;
        } else {
            i += 1;
        }
    }
}

/// Everything an input runs against, built once.
struct Fixture {
    pool: Arc<LocalPool>,
    peer: Arc<dyn PoolSession>,
    peer_lease: RegionLease,
    /// The device's own session (a second handle on it), to drain events it left unread.
    device_session: Arc<dyn PoolSession>,
    mem: GuestMemoryMmap,
    window: Arc<CheckedWindow>,
    device: Ism,
    handle: IsmHandle,
    devid: DevId,
    /// The pool as it is between inputs.
    baseline: PoolStatus,
    debug: bool,
}

const ALL: Perms = Perms(0xf);

impl Fixture {
    fn new() -> Self {
        let pool = LocalPool::new(PoolConfig {
            size: 2 * SHM,
            per_vm_limit: None,
            hugepages: false,
            gid: Some(1),
            ..PoolConfig::default()
        })
        .unwrap();
        // The peer first: devid 1, the device devid 2 (as seeds written for a fresh pool
        // per input expect).
        let peer: Arc<dyn PoolSession> = pool.session().unwrap();
        let peer_lease = peer.alloc(2 * CHUNK).unwrap();
        peer.grant(peer_lease.token, GrantTarget::Default, ALL)
            .unwrap();
        let device_session: Arc<dyn PoolSession> = pool.session().unwrap();
        let devid = device_session.info().devid;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let window = Arc::new(CheckedWindow {
            mapped: Mutex::new(BTreeMap::new()),
        });
        let config = IsmConfig {
            shm_size: SHM,
            chunk_size: CHUNK,
            notify_size: 4,
            draft_default_perm: Default::default(),
        };
        let device = Ism::new("fuzz", config, device_session.clone(), window.clone()).unwrap();
        let handle = device.handle();
        let baseline = pool.status();
        Self {
            pool,
            peer,
            peer_lease,
            device_session,
            mem,
            window,
            device,
            handle,
            devid,
            baseline,
            debug: std::env::var_os("ISM_FUZZ_DEBUG").is_some(),
        }
    }

    /// Put everything back as `new` left it, and check that nothing is left over.
    fn reset(&mut self) {
        // Whatever the guest did, reset gives everything back.
        self.device.reset();
        assert!(
            self.window.mapped.lock().unwrap().is_empty(),
            "reset left mappings"
        );
        assert!(self.handle.regions().is_empty(), "reset left regions");
        let devid = self.devid.0;
        assert!(
            self.pool
                .status()
                .regions
                .iter()
                .all(|r| !r.holders.contains(&devid)),
            "reset left the device holding regions"
        );
        // The peer: only its own region, with the permissions it started with.
        let peer = self.peer.info().devid.0;
        for region in self.pool.status().regions {
            if region.token != self.peer_lease.token.0 && region.holders.contains(&peer) {
                self.peer.detach(Token(region.token)).unwrap();
            }
        }
        // Peer and device may both have let go of the peer's region (the peer detaches
        // what it cannot attach): then it gets a new one, as a fresh process would.
        if !self
            .pool
            .status()
            .regions
            .iter()
            .any(|r| r.token == self.peer_lease.token.0)
        {
            let old = self.peer_lease.token.0;
            self.peer_lease = self.peer.alloc(2 * CHUNK).unwrap();
            let new = self.peer_lease.token.0;
            for region in &mut self.baseline.regions {
                if region.token == old {
                    region.token = new;
                }
            }
            for session in &mut self.baseline.sessions {
                for held in &mut session.held {
                    if *held == old {
                        *held = new;
                    }
                }
            }
        }
        let token = self.peer_lease.token;
        self.peer.grant(token, GrantTarget::Default, ALL).unwrap();
        let status = self.pool.status();
        let region = status.regions.iter().find(|r| r.token == token.0).unwrap();
        for &(target, _) in &region.grants {
            self.peer
                .grant(
                    token,
                    GrantTarget::Device(DevId(target)),
                    Perms::CLEAN_DEFAULT,
                )
                .unwrap();
        }
        self.peer.take_events();
        self.device_session.take_events();
        // Nothing of this input is left in the pool, nor in guest memory.
        check_nothing_left(&self.pool, &self.baseline, &self.mem, MEM_SIZE);
    }
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

/// What the guest saw of one input, for comparing runs: the used rings and how the counters
/// moved (tokens are random, so replies themselves differ from run to run).
fn digest(mem: &GuestMemoryMmap, before: &Counters, after: &Counters) -> String {
    let mut used = [0u8; 2 * (4 + 8 * QUEUE_SIZE as usize)];
    let half = used.len() / 2;
    mem.read_slice(&mut used[..half], GuestAddress(CTRL.2))
        .unwrap();
    mem.read_slice(&mut used[half..], GuestAddress(EVENTQ.2))
        .unwrap();
    let mut moved: Vec<_> = after
        .iter()
        .map(|(name, value)| (*name, (value - before[name]).0))
        .filter(|(_, delta)| *delta != 0)
        .collect();
    moved.sort();
    let hash = used.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    format!("used {hash:016x} counters {moved:?}")
}

fuzz_target!(|input: &[u8]| {
    FIXTURE.with_borrow_mut(|fixture| {
        let fixture = fixture.get_or_insert_with(Fixture::new);
        run(fixture, input);
        fixture.reset();
    })
});

fn run(fixture: &mut Fixture, input: &[u8]) {
    if input.len() < 3 {
        return;
    }
    let features = {
        let mut f = 1u64 << 32;
        if input[0] & 1 != 0 {
            f |= bit(VIRTIO_ISM_F_QUERY);
        }
        if input[0] & 2 != 0 {
            f |= bit(VIRTIO_ISM_F_EVENT_QUEUE);
        }
        f
    };
    let data_len = (usize::from(u16::from_le_bytes([input[1], input[2]])))
        .min(MAX_DATA)
        .min(input.len() - 3);
    let mut data = input[3..3 + data_len].to_vec();
    let mut ops = &input[3 + data_len..];

    let peer = &fixture.peer;
    let peer_token = fixture.peer_lease.token;
    substitute_token(&mut data, peer_token);
    let mem = &fixture.mem;
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let before = fixture.device.counters().unwrap_or_default();
    fixture.device.ack_features(features);
    let handle = &fixture.handle;
    let mut ctrl = DriverRing::new(CTRL);
    let mut eventq = DriverRing::new(EVENTQ);
    let mut worker = fixture
        .device
        .activate_worker(ActivationContext {
            mem: GuestMemoryAtomic::new(mem.clone()),
            interrupt_cb: Arc::new(NoInterrupt),
            queues: vec![
                (0, ctrl.queue(), EventFd::new(0).unwrap()),
                (1, eventq.queue(), EventFd::new(0).unwrap()),
            ],
        })
        .unwrap();

    let mut steps = 0;
    while let Some((&ctl, rest)) = ops.split_first() {
        steps += 1;
        if steps > 64 {
            break;
        }
        let count = usize::from(ctl & 0xf);
        let Some(raw) = rest.get(..count * 5) else {
            break;
        };
        ops = &rest[count * 5..];
        let descs: Vec<(u8, u16, u16)> = raw
            .chunks_exact(5)
            .map(|d| {
                (
                    d[0],
                    u16::from_le_bytes([d[1], d[2]]),
                    u16::from_le_bytes([d[3], d[4]]),
                )
            })
            .collect();
        if !descs.is_empty() {
            if ctl & 0x10 != 0 {
                eventq.submit(mem, &descs);
                worker.process_event_queue().unwrap();
            } else {
                ctrl.submit(mem, &descs);
                worker.process_ctrl_queue().unwrap();
            }
        }
        if ctl & 0x20 != 0 {
            for token in handle.regions() {
                if peer.attach(token, Perms::NONE).is_err() {
                    let _ = peer.detach(token);
                }
            }
            worker.process_pool_events().unwrap();
        }
        if ctl & 0x80 != 0 {
            if handle.regions().contains(&peer_token) {
                handle.remove_region(peer_token);
            } else {
                let _ = handle.add_region(peer_token, Perms::NONE);
            }
            worker.process_event_queue().unwrap();
        }
        if ctl & 0x40 != 0 {
            let offset = descs.first().map_or(0, |d| u64::from(d.1));
            if let Some(token) = handle.handle_notify(offset) {
                handle.deliver_kick(token);
            }
        }
    }
    drop(worker);

    if fixture.debug {
        let after = fixture.device.counters().unwrap_or_default();
        eprintln!("ISM_FUZZ_DIGEST {}", digest(mem, &before, &after));
    }
}
