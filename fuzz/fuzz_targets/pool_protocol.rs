// SPDX-License-Identifier: Apache-2.0
//! Arbitrary packets into the pool broker's decoders and its per-connection request handler,
//! backed by a real in-process pool with two client connections, across broker restarts.
//!
//! Input layout: a sequence of records, each
//!   [0]      selector: bit 0 connection B instead of A; bit 1 deliver as truncated
//!            (oversized); bit 2 deliver with a descriptor attached (an eventfd, so a
//!            PUBLISH_DOORBELL can succeed; with bit 5 also a second one); bit 3 the operator
//!            revokes the most recent region afterwards; bit 4 take a status snapshot;
//!            bit 6 the broker restarts afterwards (its state goes through the state file's
//!            encoding, the connections drop, the clients keep their leases), or, with bit 3,
//!            the restarted broker's grace period ends instead (no revocation then); bit 7
//!            deliver with a duplicate of a lease the clients were given (after the
//!            descriptors of bit 2): the one of the region the packet re-registers, or with
//!            bit 5 the most recent one
//!   [1..3]   le16 n: the next n bytes (cut to what is left) are one packet
//! Values the broker makes up cannot be guessed, so 8-byte windows name them: "TOKN" + le32
//! i is the i-th token handed out so far, "DVID" + le32 i the devid of the i-th device
//! session opened and "RKEY" + le32 i its resume key (for RESUME after a restart).
//!
//! Checks: nothing panics; every answer decodes as a broker message, fits the size limit and
//! carries exactly the descriptors it announces;
//! decoded requests and answers survive an encode/decode round trip; the pool's books
//! balance (used bytes = sum of live region sizes, never above the pool size); a restarted
//! pool keeps its gid, knows no region its predecessor did not, and an ALLOC never hands
//! out a token handed out before (before a restart included); once every session is closed
//! and the grace period is over, the pool is empty.
#![no_main]

use ism_pool::handler::{Connection, Outgoing, PeerInfo};
use ism_pool::state::PoolSnapshot;
use ism_pool::wire::{self, MAX_MESSAGE_LEN, Reply, Request};
use ism_pool::{LocalPool, PoolConfig, Token};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use vmm_sys_util::eventfd::EventFd;

const POOL_SIZE: u64 = 64 << 20;
/// Records per input: each costs (a long-campaign corpus fills inputs up to the limit), and
/// the restart seeds need 16.
const MAX_RECORDS: usize = 16;
/// Leases the clients keep across records (older ones are closed, as a VMM detaching).
const MAX_LEASES: usize = 32;

/// What the clients learnt from the broker so far in this input.
#[derive(Default)]
struct Learnt {
    /// Every token handed out, in order (placeholders index it).
    tokens: Vec<Token>,
    /// The same, to check an ALLOC never repeats one.
    handed_out: BTreeSet<u64>,
    /// (devid, resume key) of every device session opened.
    sessions: Vec<(u64, u64)>,
    /// The most recent leases, with their descriptors.
    leases: Vec<(Token, OwnedFd)>,
}

/// ISM_FUZZ_DEBUG: print every request and answer.
fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("ISM_FUZZ_DEBUG").is_some())
}

fn config() -> PoolConfig {
    PoolConfig {
        size: POOL_SIZE,
        per_vm_limit: Some(POOL_SIZE / 2),
        hugepages: false,
        gid: Some(1),
        ..PoolConfig::default()
    }
}

/// `allocating`: the request answered was an ALLOC (a lease for it is a new token).
/// Returns whether any of `out` was more than a refusal (an ERR answer).
fn check_answers(out: Vec<Outgoing>, learnt: &mut Learnt, allocating: bool) -> bool {
    let mut not_refused = false;
    for mut message in out {
        assert!(message.bytes.len() <= MAX_MESSAGE_LEN);
        let (id, reply) = wire::decode_reply(&message.bytes).expect("broker sent garbage");
        assert_eq!(
            wire::decode_reply(&reply.encode(id)),
            Ok((id, reply.clone()))
        );
        if debug() {
            eprintln!(
                "pool_protocol:   <- {id} {reply:?} ({} fds)",
                message.fds.len()
            );
        }
        not_refused |= !matches!(reply, Reply::Error(_));
        match reply {
            Reply::Lease { token, .. } => {
                assert_eq!(message.fds.len(), 1, "lease without its descriptor");
                let fresh = learnt.handed_out.insert(token.0);
                assert!(!allocating || fresh, "ALLOC handed out {token} again");
                learnt.tokens.push(token);
                if learnt.leases.len() == MAX_LEASES {
                    learnt.leases.remove(0);
                }
                learnt.leases.push((token, message.fds.remove(0)));
            }
            Reply::HelloOk {
                devid, resume_key, ..
            } => {
                assert!(message.fds.is_empty(), "descriptor on a hello");
                if devid != 0 && learnt.sessions.len() < 256 {
                    learnt.sessions.push((devid, resume_key));
                }
            }
            Reply::Doorbells { devids, .. } => {
                assert_eq!(
                    message.fds.len(),
                    devids.len(),
                    "doorbells without descriptors"
                )
            }
            _ => assert!(
                message.fds.is_empty(),
                "descriptor on an answer without one"
            ),
        }
    }
    not_refused
}

fn substitute(packet: &mut [u8], learnt: &Learnt) {
    let mut at = 0;
    while at + 8 <= packet.len() {
        let index = u32::from_le_bytes([
            packet[at + 4],
            packet[at + 5],
            packet[at + 6],
            packet[at + 7],
        ]) as usize;
        let pick = |len: usize| (len > 0).then(|| index % len);
        let value = match &packet[at..at + 4] {
            b"TOKN" => pick(learnt.tokens.len()).map(|i| learnt.tokens[i].0),
            b"DVID" => pick(learnt.sessions.len()).map(|i| learnt.sessions[i].0),
            b"RKEY" => pick(learnt.sessions.len()).map(|i| learnt.sessions[i].1),
            _ => None,
        };
        match value {
            Some(value) => {
                packet[at..at + 8].copy_from_slice(&value.to_le_bytes());
                at += 8;
            }
            None => at += 1,
        }
    }
}

fn check_books(pool: &LocalPool) {
    let status = pool.status();
    let live: u64 = status.regions.iter().map(|r| r.size).sum();
    assert_eq!(status.used, live);
    assert!(status.used <= status.size);
    for region in &status.regions {
        assert!(!region.holders.is_empty(), "region kept with no holder");
    }
}

/// A broker restart: the pool's state as the state file keeps it (encoded and read back),
/// a new pool from it, fresh connections (the old ones broke).
fn restart(pool: &Arc<LocalPool>) -> Arc<LocalPool> {
    let snapshot = pool.snapshot();
    let file = serde_json::to_vec(&snapshot).expect("state encodes");
    let read: PoolSnapshot = serde_json::from_slice(&file).expect("state file reads back");
    assert_eq!(read, snapshot, "state file round trip");
    let restored = LocalPool::restore(config(), &read).expect("restore");
    assert_eq!(restored.gid(), pool.gid());
    let known: BTreeSet<u64> = snapshot.regions.iter().map(|r| r.token).collect();
    let after = restored.snapshot();
    for region in &after.regions {
        assert!(known.contains(&region.token), "restored an unknown region");
    }
    assert!(
        after.next_devid >= snapshot.next_devid,
        "devids would repeat"
    );
    restored
}

fuzz_target!(|data: &[u8]| {
    let mut pool = LocalPool::new(config()).expect("pool");
    let peer = |trusted| PeerInfo {
        trusted,
        ..PeerInfo::default()
    };
    let connect = |pool: &Arc<LocalPool>| {
        [
            Connection::new(pool.clone(), peer(false)),
            Connection::new(pool.clone(), peer(true)),
        ]
    };
    let mut connections = connect(&pool);
    let mut learnt = Learnt::default();
    let mut rest = data;
    for _ in 0..MAX_RECORDS {
        if rest.len() < 3 {
            break;
        }
        let selector = rest[0];
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let mut packet = rest[3..3 + len].to_vec();
        rest = &rest[3 + len..];
        substitute(&mut packet, &learnt);

        // The decoders on their own: pure, and stable under re-encoding.
        let request = wire::decode_request(&packet).ok();
        if let Some((id, request)) = &request {
            assert_eq!(
                wire::decode_request(&request.encode(*id)),
                Ok((*id, request.clone()))
            );
        }
        if let Ok((id, reply)) = wire::decode_reply(&packet) {
            assert_eq!(wire::decode_reply(&reply.encode(id)), Ok((id, reply)));
        }

        let which = usize::from(selector & 1);
        let truncated = selector & 2 != 0;
        let mut fds = Vec::new();
        if selector & 4 != 0 {
            fds.push(eventfd());
            if selector & 32 != 0 {
                fds.push(eventfd());
            }
        }
        if selector & 128 != 0 {
            let named = match &request {
                Some((_, Request::Reregister { token })) if selector & 32 == 0 => {
                    learnt.leases.iter().rev().find(|(t, _)| t == token)
                }
                _ => learnt.leases.last(),
            };
            if let Some((_, lease)) = named {
                fds.push(lease.try_clone().expect("dup"));
            }
        }
        let allocating = matches!(request, Some((_, Request::Alloc { .. })));
        if debug() {
            eprintln!(
                "pool_protocol: {} selector {selector:#04x} {} fds: {request:?}",
                ["A", "B"][which],
                fds.len()
            );
        }
        let handled = connections[which].handle_message(&packet, truncated, fds);
        let changed = check_answers(handled.out, &mut learnt, allocating);
        for connection in &connections {
            check_answers(connection.drain_events(), &mut learnt, false);
        }
        let restarting = selector & 64 != 0;
        if selector & 8 != 0 {
            if restarting {
                pool.expire_recovery(Duration::ZERO);
            } else if let Some(token) = learnt.tokens.last() {
                let _ = pool.revoke(*token);
            }
        }
        if selector & 16 != 0 {
            let status = pool.status();
            let json = serde_json_roundtrip(&status);
            assert_eq!(json, status);
        }
        // The books after every record that may have changed them (not after a refusal).
        if changed || selector & (8 | 16 | 64) != 0 {
            check_books(&pool);
        }
        if restarting && selector & 8 == 0 {
            let restored = restart(&pool);
            if debug() {
                eprintln!("pool_protocol: broker restarted");
            }
            // The old broker's connections break with it; its pool goes with them.
            drop(std::mem::replace(&mut connections, connect(&restored)));
            check_books(&pool);
            pool = restored;
        } else if handled.close {
            // The broker drops a closed connection; start a fresh one in its place.
            connections[which] = Connection::new(pool.clone(), peer(which == 1));
        }
    }
    check_books(&pool);
    drop(connections);
    // Sessions that never come back are given up once the grace period ends.
    pool.expire_recovery(Duration::ZERO);
    let status = pool.status();
    assert_eq!(status.used, 0, "regions left after every session closed");
    assert!(status.regions.is_empty());
});

fn eventfd() -> OwnedFd {
    let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
    // SAFETY: `into_raw_fd` gives up ownership of a valid descriptor, taken over here once.
    unsafe { OwnedFd::from_raw_fd(evt.into_raw_fd()) }
}

fn serde_json_roundtrip(status: &ism_pool::PoolStatus) -> ism_pool::PoolStatus {
    let text = ism_pool::status::to_json(status);
    ism_pool::status::from_json(&text).expect("status JSON round trip")
}
