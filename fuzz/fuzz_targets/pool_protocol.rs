// SPDX-License-Identifier: Apache-2.0
//! Arbitrary packets into the pool broker's decoders and its per-connection request handler,
//! backed by a real in-process pool with two client connections.
//!
//! Input layout: a sequence of records, each
//!   [0]      selector: bit 0 connection B instead of A; bit 1 deliver as truncated
//!            (oversized); bit 2 deliver with a descriptor attached (an eventfd, so a
//!            PUBLISH_DOORBELL can succeed; with bit 5 also a second one); bit 3 the operator
//!            revokes the most recent region afterwards; bit 4 take a status snapshot
//!   [1..3]   le16 n: the next n bytes (cut to what is left) are one packet
//! Every 8-byte window "TOKN" + le32 i in a packet is replaced by the i-th token the broker
//! handed out so far (tokens are random: the fuzzer could never guess one).
//!
//! Checks: nothing panics; every answer decodes as a broker message, fits the size limit and
//! carries exactly the descriptors it announces;
//! decoded requests and answers survive an encode/decode round trip; the pool's books
//! balance (used bytes = sum of live region sizes, never above the pool size).
#![no_main]

use ism_pool::handler::{Connection, Outgoing, PeerInfo};
use ism_pool::wire::{self, MAX_MESSAGE_LEN, Reply};
use ism_pool::{LocalPool, PoolConfig, Token};
use libfuzzer_sys::fuzz_target;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use vmm_sys_util::eventfd::EventFd;

const POOL_SIZE: u64 = 64 << 20;
const MAX_RECORDS: usize = 64;

fn check_answers(out: &[Outgoing], tokens: &mut Vec<Token>) {
    for message in out {
        assert!(message.bytes.len() <= MAX_MESSAGE_LEN);
        let (id, reply) = wire::decode_reply(&message.bytes).expect("broker sent garbage");
        assert_eq!(
            wire::decode_reply(&reply.encode(id)),
            Ok((id, reply.clone()))
        );
        match reply {
            Reply::Lease { token, .. } => {
                assert_eq!(message.fds.len(), 1, "lease without its descriptor");
                tokens.push(token);
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
}

fn substitute_tokens(packet: &mut [u8], tokens: &[Token]) {
    if tokens.is_empty() || packet.len() < 8 {
        return;
    }
    let mut at = 0;
    while at + 8 <= packet.len() {
        if &packet[at..at + 4] == b"TOKN" {
            let index = u32::from_le_bytes([
                packet[at + 4],
                packet[at + 5],
                packet[at + 6],
                packet[at + 7],
            ]) as usize;
            let token = tokens[index % tokens.len()];
            packet[at..at + 8].copy_from_slice(&token.0.to_le_bytes());
            at += 8;
        } else {
            at += 1;
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

fuzz_target!(|data: &[u8]| {
    let pool = LocalPool::new(PoolConfig {
        size: POOL_SIZE,
        per_vm_limit: Some(POOL_SIZE / 2),
        hugepages: false,
        gid: Some(1),
        ..PoolConfig::default()
    })
    .expect("pool");
    let peer = |trusted| PeerInfo {
        trusted,
        ..PeerInfo::default()
    };
    let mut connections = [
        Connection::new(pool.clone(), peer(false)),
        Connection::new(pool.clone(), peer(true)),
    ];
    let mut tokens = Vec::new();
    let mut rest = data;
    for _ in 0..MAX_RECORDS {
        if rest.len() < 3 {
            break;
        }
        let selector = rest[0];
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let mut packet = rest[3..3 + len].to_vec();
        rest = &rest[3 + len..];
        substitute_tokens(&mut packet, &tokens);

        // The decoders on their own: pure, and stable under re-encoding.
        if let Ok((id, request)) = wire::decode_request(&packet) {
            assert_eq!(wire::decode_request(&request.encode(id)), Ok((id, request)));
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
        let handled = connections[which].handle_message(&packet, truncated, fds);
        check_answers(&handled.out, &mut tokens);
        for connection in &connections {
            check_answers(&connection.drain_events(), &mut tokens);
        }
        if selector & 8 != 0
            && let Some(token) = tokens.last()
        {
            let _ = pool.revoke(*token);
        }
        if selector & 16 != 0 {
            let status = pool.status();
            let json = serde_json_roundtrip(&status);
            assert_eq!(json, status);
        }
        check_books(&pool);
        if handled.close {
            // The broker drops a closed connection; start a fresh one in its place.
            connections[which] = Connection::new(pool.clone(), peer(which == 1));
        }
    }
    drop(connections);
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
