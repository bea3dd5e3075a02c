// SPDX-License-Identifier: Apache-2.0
//! Drivers the project did not write: paired test guests in draft mode (`ism.draft=1`), which
//! negotiate no feature bit, never send GRANT, bind one vector per region with EVENT_VECTOR
//! and count every interrupt on it as a kick, as a driver written only against the virtio-ism
//! draft does. The device must then behave exactly as the draft says (docs/protocol.md,
//! section 11), and the operator's `draft_default_perm` decides who may attach their regions.
//! Every test runs once under ism-vmm and once under cloud-hypervisor.

use std::time::Duration;

use ism_tests::{IsmGuest, IsmSpec, PoolBroker, Vmm, require_kvm, require_vmm, vmm_tests};

/// Round trips of the ping-pong: enough that a single stray interrupt anywhere shows.
const PINGPONG_ROUNDS: u64 = 10_000;

/// A draft-mode guest's device, with `policy` as `draft_default_perm` (None: the default).
fn draft_spec(vmm: Vmm, policy: Option<&str>) -> IsmSpec {
    IsmSpec {
        draft: true,
        draft_default_perm: policy.map(str::to_string),
        ..IsmSpec::on(vmm)
    }
}

/// Boot two draft guests on one broker and check they negotiated nothing.
fn draft_pair(broker: &PoolBroker, spec: &IsmSpec) -> (IsmGuest, IsmGuest) {
    let a = IsmGuest::start("A", broker, spec, &[]);
    let b = IsmGuest::start("B", broker, spec, &[]);
    for guest in [&a, &b] {
        assert_eq!(
            guest.ready.get("draft"),
            Some("true"),
            "{}",
            guest.ready.line
        );
        // VIRTIO_F_VERSION_1 (bit 32) only.
        assert_eq!(
            guest.ready.number("features"),
            Some(1 << 32),
            "a draft driver negotiates no VIRTIO_ISM_F_* bit: {}",
            guest.ready.line
        );
    }
    (a, b)
}

fn test_draft_guest_region_attached_by_draft_peer_with_rw_policy(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let broker = PoolBroker::start("1G");
    let spec = draft_spec(vmm, Some("rw"));
    let (mut a, mut b) = draft_pair(&broker, &spec);
    let alloc = a.cmd("alloc 16K").ok("A alloc");
    let token = alloc.get("token").expect("token").to_string();
    a.cmd(&format!("fill {token} 0xd4af7")).ok("A fill");
    // The draft driver cannot grant.
    let grant = a.cmd(&format!("grant {token} default rwa"));
    assert_eq!(grant.status(), "DRIVER", "{}", grant.line);

    let attach = b.cmd(&format!("attach {token} rw")).ok("B attach rw");
    assert_eq!(attach.get("writable"), Some("true"), "{}", attach.line);
    let check = b.cmd(&format!("check {token} 0xd4af7")).ok("B check");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);
    b.cmd(&format!("write {token} 4096 from-draft-B"))
        .ok("B write");
    let read = a.cmd(&format!("read {token} 4096 12")).ok("A read");
    assert_eq!(read.get("text"), Some("from-draft-B"), "{}", read.line);

    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

fn test_draft_guest_region_read_only_for_draft_peer_with_ro_policy(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let broker = PoolBroker::start("1G");
    let spec = draft_spec(vmm, Some("ro"));
    let (mut a, mut b) = draft_pair(&broker, &spec);
    let alloc = a.cmd("alloc 16K").ok("A alloc");
    let token = alloc.get("token").expect("token").to_string();
    a.cmd(&format!("fill {token} 0x0f0")).ok("A fill");

    let refused = b.cmd(&format!("attach {token} rw"));
    assert_eq!(refused.status(), "PERM_EWRITE", "{}", refused.line);
    let attach = b.cmd(&format!("attach {token} ro")).ok("B attach ro");
    assert_eq!(attach.get("writable"), Some("false"), "{}", attach.line);
    let check = b.cmd(&format!("check {token} 0x0f0")).ok("B check");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);
    // A store into the read-only mapping does not reach the owner's bytes.
    b.cmd(&format!("rawwrite {token} 0 0x4141414141414141"))
        .ok("B raw write");
    let check = a.cmd(&format!("check {token} 0x0f0")).ok("A check");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);

    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

/// Without `draft_default_perm` (default `none`) a draft driver's region is owner-only and,
/// since the driver cannot grant, no peer can ever attach it.
fn test_draft_guest_region_refused_to_draft_peer_without_policy(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let broker = PoolBroker::start("1G");
    let spec = draft_spec(vmm, None);
    let (mut a, mut b) = draft_pair(&broker, &spec);
    let alloc = a.cmd("alloc 8K").ok("A alloc");
    let token = alloc.get("token").expect("token").to_string();
    for access in ["rw", "ro"] {
        let refused = b.cmd(&format!("attach {token} {access}"));
        assert_eq!(refused.status(), "PERM_EATTACH", "{}", refused.line);
    }
    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

/// The ping-pong: two draft guests, the peer's ATTACH (which used to raise the
/// owner's region vector) before the first kick, then 10 000 round trips in which every
/// interrupt must be a kick: on both sides interrupts == kicks the peer really sent.
fn test_draft_pingpong_every_interrupt_is_a_kick(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let broker = PoolBroker::start("1G");
    let spec = draft_spec(vmm, Some("rw"));
    let (mut a, mut b) = draft_pair(&broker, &spec);
    let alloc = a.cmd("alloc 4K").ok("A alloc");
    let token = alloc.get("token").expect("token").to_string();
    // A binds first, so B's attach happens while A's region vector is bound.
    a.cmd(&format!("bind {token}")).ok("A bind");
    b.cmd(&format!("attach {token} rw")).ok("B attach");
    b.cmd(&format!("bind {token}")).ok("B bind");
    // Give A's device time to hear of B's attach (and, before the fix, raise the vector).
    std::thread::sleep(Duration::from_millis(200));

    let pong = b.send(&format!("pingpong {token} pong {PINGPONG_ROUNDS}"));
    let ping = a
        .cmd(&format!("pingpong {token} ping {PINGPONG_ROUNDS}"))
        .ok("A ping");
    let pong = b.answer(pong).ok("B pong");
    for side in [&ping, &pong] {
        assert_eq!(side.number("timeouts"), Some(0), "{}", side.line);
        assert_eq!(side.number("out_of_step"), Some(0), "{}", side.line);
        assert_eq!(
            side.number("kicks_sent"),
            Some(PINGPONG_ROUNDS),
            "{}",
            side.line
        );
        assert_eq!(
            side.number("peer_kicks"),
            Some(PINGPONG_ROUNDS),
            "{}",
            side.line
        );
        assert_eq!(
            side.number("irqs"),
            side.number("peer_kicks"),
            "every interrupt on the region's vector must be a peer's kick: {}",
            side.line
        );
    }
    // Nothing arrives late either.
    std::thread::sleep(Duration::from_millis(100));
    for guest in [&mut a, &mut b] {
        let after = guest.cmd("wait-kick 0").ok("late interrupts");
        assert_eq!(
            after.number("kicks"),
            Some(PINGPONG_ROUNDS),
            "{}",
            after.line
        );
    }
    // Detaching the peer raises nothing on A's vector either.
    b.cmd(&format!("detach {token}")).ok("B detach");
    std::thread::sleep(Duration::from_millis(200));
    let after = a.cmd("wait-kick 0").ok("A after B's detach");
    assert_eq!(
        after.number("kicks"),
        Some(PINGPONG_ROUNDS),
        "{}",
        after.line
    );

    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

/// The project's own driver still negotiates what it uses (GRANT among them).
fn test_project_driver_negotiates_grant(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let broker = PoolBroker::start("1G");
    let a = IsmGuest::start("A", &broker, &IsmSpec::on(vmm), &[]);
    let features = a.ready.number("features").expect("features");
    assert_ne!(
        features & (1 << 3),
        0,
        "VIRTIO_ISM_F_GRANT: {}",
        a.ready.line
    );
    assert_eq!(a.ready.get("draft"), Some("false"));
    assert_eq!(a.power_off(), Some(0));
}

vmm_tests!(
    test_draft_guest_region_attached_by_draft_peer_with_rw_policy,
    test_draft_guest_region_read_only_for_draft_peer_with_ro_policy,
    test_draft_guest_region_refused_to_draft_peer_without_policy,
    test_draft_pingpong_every_interrupt_is_a_kick,
    test_project_driver_negotiates_grant,
);
