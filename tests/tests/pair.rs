// SPDX-License-Identifier: Apache-2.0
//! Paired guests: test guests in separate VMM processes sharing regions through one
//! `ism-pool` broker; every test runs once under ism-vmm and once under cloud-hypervisor. Tokens and device ids travel from one guest's serial output to the
//! other's serial input, as an application would pass them. Every VM and the broker run in
//! their own process groups with a hard deadline and are killed when a test fails.

use ism_tests::{
    IsmGuest, IsmSpec, PoolBroker, Vmm, broker_and_two_guests, require_kvm, require_vmm, vmm_tests,
};

fn test_peer_reads_owner_bytes_and_owner_sees_peer_reply(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let broker = PoolBroker::start("1G");
    // Different window geometries: B maps A's 64 KiB region into one 2 MiB chunk.
    let mut a = IsmGuest::start("A", &broker, &IsmSpec::on(vmm), &[]);
    let big_chunks = IsmSpec {
        size: "256M".into(),
        chunk_size: "2M".into(),
        ..IsmSpec::on(vmm)
    };
    let mut b = IsmGuest::start("B", &broker, &big_chunks, &[]);
    assert_eq!(b.ready.number("chunk_size"), Some(2 << 20));
    assert_eq!(
        a.ready.get("gid"),
        b.ready.get("gid"),
        "one pool, one group"
    );
    assert_ne!(a.devid(), b.devid());

    let token = a.shared_region("64K", 0x5eed, b.devid(), "rwa");
    let attach = b.cmd(&format!("attach {token} rw")).ok("B attach");
    assert_eq!(attach.number("size"), Some(64 << 10));
    assert_eq!(attach.get("writable"), Some("true"));
    let check = b.cmd(&format!("check {token} 0x5eed")).ok("B check");
    assert_eq!(
        check.get("match"),
        Some("true"),
        "B sees A's pattern: {}",
        check.line
    );

    b.cmd(&format!("write {token} 4096 reply-from-B"))
        .ok("B write");
    let read = a.cmd(&format!("read {token} 4096 12")).ok("A read");
    assert_eq!(read.get("text"), Some("reply-from-B"), "{}", read.line);
    // Only those bytes changed: the rest of A's pattern is intact.
    let check = a.cmd(&format!("check {token} 0x5eed")).ok("A check");
    assert_eq!(check.number("bad_offset"), Some(4096), "{}", check.line);

    a.cmd(&format!("write {token} 8192 hello-from-A"))
        .ok("A write");
    let read = b.cmd(&format!("read {token} 8192 12")).ok("B read");
    assert_eq!(
        read.get("read"),
        Some("68656c6c6f2d66726f6d2d41"),
        "{}",
        read.line
    );

    // The owner heard about B coming and going on its event queue.
    let events = a.cmd("events").ok("A events");
    assert_eq!(events.number("attach"), Some(1), "{}", events.line);
    b.cmd(&format!("detach {token}")).ok("B detach");
    let mut detached = 0;
    for _ in 0..100 {
        let events = a.cmd("events").ok("A events");
        detached += events.number("detach").unwrap_or(0);
        if detached > 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(detached, 1, "A saw B's detach");

    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

fn test_kicks_reach_the_peer_as_interrupt_and_latched_while_masked(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let (_broker, mut a, mut b) = broker_and_two_guests(vmm);
    let token = a.shared_region("4K", 1, b.devid(), "rwa");
    b.cmd(&format!("attach {token} rw")).ok("B attach");
    a.cmd(&format!("bind {token}")).ok("A bind");
    b.cmd(&format!("bind {token}")).ok("B bind");

    // A -> B, B halted waiting for the interrupt.
    let wait = b.send("wait-kick 1");
    a.cmd(&format!("kick {token}")).ok("A kick");
    let seen = b.answer(wait).ok("B wait-kick");
    assert_eq!(
        seen.get("seen"),
        Some("true"),
        "{}\n{}",
        seen.line,
        b.describe()
    );

    // B -> A; the kicker itself is not signalled.
    b.cmd(&format!("kick {token}")).ok("B kick");
    let seen = a.cmd("wait-kick 1").ok("A wait-kick");
    assert_eq!(seen.get("seen"), Some("true"), "{}", seen.line);
    assert_eq!(seen.number("kicks"), Some(1), "A got exactly B's kick");

    // A -> B again with B's entry masked: no interrupt while masked, the kick is latched and
    // delivered on unmask, exactly once.
    let mode = b.cmd("kick-mode poll").ok("B kick-mode");
    assert_eq!(mode.number("kicks"), Some(1));
    a.cmd(&format!("kick {token}")).ok("A kick");
    let polled = b.cmd("wait-kick").ok("B wait-kick poll");
    assert_eq!(polled.number("kicks_masked"), Some(1), "{}", polled.line);
    assert_eq!(polled.get("delivered"), Some("true"), "{}", polled.line);
    assert_eq!(polled.number("kicks"), Some(2), "{}", polled.line);
    assert_eq!(
        polled.get("pending_after"),
        Some("false"),
        "{}",
        polled.line
    );

    // Nothing kicked since: unmasking delivers nothing stale.
    let idle = b.cmd("wait-kick").ok("B idle poll");
    assert_eq!(idle.get("delivered"), Some("false"), "{}", idle.line);
    assert_eq!(idle.number("kicks"), Some(2), "{}", idle.line);

    assert_eq!(a.power_off(), Some(0));
    assert_eq!(b.power_off(), Some(0));
}

fn test_read_only_grant_keeps_owner_data_unchanged(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let (_broker, mut a, mut b) = broker_and_two_guests(vmm);
    let token = a.shared_region("16K", 77, b.devid(), "ra");

    let refused = b.cmd(&format!("attach {token} rw"));
    assert_eq!(refused.status(), "PERM_EWRITE", "{}", refused.line);
    let attach = b.cmd(&format!("attach {token} ro")).ok("B attach ro");
    assert_eq!(attach.get("writable"), Some("false"));
    let check = b.cmd(&format!("check {token} 77")).ok("B check");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);

    // The driver refuses the write...
    let write = b.cmd(&format!("write {token} 0 scribble"));
    assert_eq!(write.status(), "READONLY", "{}", write.line);
    // ...and a raw store into the read-only mapping goes to the VMM, which drops it.
    b.cmd(&format!("rawwrite {token} 0 0x4141414141414141"))
        .ok("B raw write");
    b.cmd(&format!("rawwrite {token} 8192 0x4242424242424242"))
        .ok("B raw write");
    let check = b
        .cmd(&format!("check {token} 77"))
        .ok("B check after raw write");
    assert_eq!(
        check.get("match"),
        Some("true"),
        "{}\n{}",
        check.line,
        b.describe()
    );
    let check = a
        .cmd(&format!("check {token} 77"))
        .ok("A check after raw write");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);

    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

fn test_guest_without_grant_or_with_guessed_token_is_refused(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let (broker, mut a, mut b) = broker_and_two_guests(vmm);
    let mut c = IsmGuest::start("C", &broker, &IsmSpec::on(vmm), &[]);
    let alloc = a.cmd("alloc 8K").ok("alloc");
    let token = alloc.get("token").unwrap().to_string();

    // A new region is private.
    let refused = b.cmd(&format!("attach {token} ro"));
    assert_eq!(refused.status(), "PERM_EATTACH", "{}", refused.line);

    a.cmd(&format!("grant {token} {} ra", b.devid()))
        .ok("grant B");
    b.cmd(&format!("attach {token} ro"))
        .ok("B attach after grant");
    let refused = c.cmd(&format!("attach {token} ro"));
    assert_eq!(
        refused.status(),
        "PERM_EATTACH",
        "C has no grant: {}",
        refused.line
    );

    // Tokens are random: a neighbour of a real one names nothing.
    let value = u64::from_str_radix(token.trim_start_matches("0x"), 16).unwrap();
    for guess in [value ^ 1, value.wrapping_add(1), 1] {
        let refused = c.cmd(&format!("attach {guess:#x} ro"));
        assert_eq!(
            refused.status(),
            "ENOENT",
            "guess {guess:#x}: {}",
            refused.line
        );
    }

    assert_eq!(c.power_off(), Some(0));
    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

fn test_detach_reattach_and_owner_killed_while_peer_attached(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let (mut broker, mut a, mut b) = broker_and_two_guests(vmm);
    let token = a.shared_region("256K", 9, "default", "ra");
    let token_value = u64::from_str_radix(token.trim_start_matches("0x"), 16).unwrap();

    b.cmd(&format!("attach {token} ro")).ok("B attach");
    b.cmd(&format!("detach {token}")).ok("B detach");
    let gone = b.cmd(&format!("read {token} 0 8"));
    assert_eq!(gone.status(), "ENOENT", "read after detach: {}", gone.line);
    let again = b.cmd(&format!("detach {token}"));
    assert_ne!(again.status(), "ok", "second detach: {}", again.line);
    b.cmd(&format!("attach {token} ro")).ok("B re-attach");
    let check = b.cmd(&format!("check {token} 9")).ok("B check");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);

    let a_devid = a.devid();
    a.kill();
    // The broker notices the closed session; B's mapping stays valid meanwhile and after.
    let check = b
        .cmd(&format!("check {token} 9"))
        .ok("B check after A died");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);
    let mut status = broker.status();
    for _ in 0..200 {
        let a_listed = status["sessions"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["devid"] == a_devid));
        if !a_listed {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
        status = broker.status();
    }
    let sessions = status["sessions"].as_array().expect("sessions");
    assert!(
        sessions.iter().all(|s| s["devid"] != a_devid),
        "A's session reclaimed: {status}"
    );
    let region = status["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .find(|r| r["token"] == token_value)
        .unwrap_or_else(|| panic!("region kept alive by B: {status}"));
    assert_eq!(
        region["holders"],
        serde_json::json!([b.devid()]),
        "{status}"
    );

    // The pool still serves newcomers.
    let mut c = IsmGuest::start("C", &broker, &IsmSpec::on(vmm), &[]);
    let alloc = c.cmd("alloc 1M").ok("C alloc after crash");
    let new_token = alloc.get("token").unwrap().to_string();
    assert_ne!(new_token, token);
    c.cmd(&format!("fill {new_token} 3")).ok("C fill");
    let check = c.cmd(&format!("check {new_token} 3")).ok("C check");
    assert_eq!(check.get("match"), Some("true"));
    let check = b.cmd(&format!("check {token} 9")).ok("B check at the end");
    assert_eq!(check.get("match"), Some("true"));

    assert_eq!(c.power_off(), Some(0));
    assert_eq!(b.power_off(), Some(0));
    assert!(broker.alive(), "broker survived:\n{}", broker.log());
}

fn test_guest_attaches_256_regions_with_their_contents(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    const REGIONS: usize = 256;
    let (_broker, mut a, mut b) = broker_and_two_guests(vmm);
    let made = a
        .cmd(&format!("alloc-many {REGIONS} 4K 1000 ra"))
        .ok("alloc-many");
    let tokens = made.get("tokens").expect("tokens").to_string();
    assert_eq!(tokens.split(',').count(), REGIONS, "{}", made.line);
    let attached = b
        .cmd(&format!("attach-many 1000 {tokens}"))
        .ok("attach-many");
    assert_eq!(
        attached.number("attached"),
        Some(REGIONS as u64),
        "{}",
        attached.line
    );
    assert_eq!(
        attached.number("matched"),
        Some(REGIONS as u64),
        "{}",
        attached.line
    );
    // Seeds are per region: the same tokens checked against shifted seeds must not match.
    let shifted = b.cmd(&format!("check {} 1001", tokens.split(',').next().unwrap()));
    assert_eq!(shifted.get("match"), Some("false"), "{}", shifted.line);

    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

/// A guest that masks its kick vector and polls the MSI-X pending-bit array (PCI: a message
/// the function would send while masked sets its pending bit) must see the kick there.
fn test_masked_kick_sets_the_pending_bit(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let (_broker, mut a, mut b) = broker_and_two_guests(vmm);
    let token = a.shared_region("4K", 1, b.devid(), "rwa");
    b.cmd(&format!("attach {token} rw")).ok("B attach");
    b.cmd("kick-mode poll").ok("B kick-mode");
    b.cmd(&format!("bind {token}")).ok("B bind");
    let wait = b.send("wait-kick");
    a.cmd(&format!("kick {token}")).ok("A kick");
    let polled = b.answer(wait).ok("B wait-kick poll");
    assert_eq!(polled.get("pending"), Some("true"), "{}", polled.line);
    assert_eq!(polled.get("delivered"), Some("true"), "{}", polled.line);
    assert_eq!(a.power_off(), Some(0));
    assert_eq!(b.power_off(), Some(0));
}

vmm_tests!(
    test_peer_reads_owner_bytes_and_owner_sees_peer_reply,
    test_kicks_reach_the_peer_as_interrupt_and_latched_while_masked,
    test_read_only_grant_keeps_owner_data_unchanged,
    test_guest_without_grant_or_with_guessed_token_is_refused,
    test_detach_reattach_and_owner_killed_while_peer_attached,
    test_guest_attaches_256_regions_with_their_contents,
    test_masked_kick_sets_the_pending_bit,
);
