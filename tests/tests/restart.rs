// SPDX-License-Identifier: Apache-2.0
//! Issue 15 with real guests: two test guests, each in its own ism-vmm, share a region
//! through an `ism-pool` broker that is SIGKILLed and restarted on the same socket (and
//! state file). The shared memory and the zero-hop kicks keep working while it is down,
//! control commands get EAGAIN, and after the restart both VMMs are back in the same pool:
//! the region is known again and the guests can allocate, attach and grant.
//!
//! Only the ism-vmm variant: cloud-hypervisor's integration patches must first let their
//! pool client thread reconnect (socket, connect, sendmsg, setsockopt, shutdown,
//! fcntl(F_DUPFD_CLOEXEC); see docs/seccomp.md).

use std::time::{Duration, Instant};

use ism_tests::{IsmGuest, IsmSpec, PoolBroker, Vmm, require_kvm, require_vmm};

/// Retries `command` on `guest` until it succeeds (the device reconnects on its own, with
/// backoff), answering EAGAIN meanwhile; returns the answer and how many EAGAINs came first.
fn until_ok(guest: &mut IsmGuest, command: &str) -> (ism_tests::Answer, u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut again = 0;
    loop {
        let answer = guest.cmd(command);
        match answer.status() {
            "ok" => return (answer, again),
            "EAGAIN" if Instant::now() < deadline => {
                again += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            _ => panic!("{command}: {}", answer.line),
        }
    }
}

fn test_broker_killed_and_restarted_under_two_guests(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let mut broker = PoolBroker::start("1G");
    let spec = IsmSpec::on(vmm);
    let mut a = IsmGuest::start("A", &broker, &spec, &[]);
    let mut b = IsmGuest::start("B", &broker, &spec, &[]);
    let (a_dev, b_dev) = (a.devid(), b.devid());
    let gid = broker.status()["gid"].clone();

    let token = a
        .cmd("alloc 64K")
        .ok("A alloc")
        .get("token")
        .unwrap()
        .to_string();
    a.cmd(&format!("fill {token} 0x15")).ok("A fill");
    a.cmd(&format!("grant {token} {b_dev} rwa")).ok("A grant");
    b.cmd(&format!("attach {token} rw")).ok("B attach");
    a.cmd(&format!("bind {token}")).ok("A bind");
    b.cmd(&format!("bind {token}")).ok("B bind");
    let wait = b.send("wait-kick 1");
    a.cmd(&format!("kick {token}")).ok("A kick");
    assert_eq!(b.answer(wait).ok("B wait-kick").get("seen"), Some("true"));

    broker.kill();

    // While it is down: control commands get EAGAIN, memory and kicks keep working.
    let refused = a.cmd("alloc 4K");
    assert_eq!(refused.status(), "EAGAIN", "{}", refused.line);
    let refused = a.cmd(&format!("grant {token} default r"));
    assert_eq!(refused.status(), "EAGAIN", "{}", refused.line);
    b.cmd(&format!("write {token} 4096 while-broker-down"))
        .ok("B write");
    let read = a.cmd(&format!("read {token} 4096 17")).ok("A read");
    assert_eq!(read.get("text"), Some("while-broker-down"), "{}", read.line);
    let wait = b.send("wait-kick 1");
    a.cmd(&format!("kick {token}")).ok("A kick while down");
    let seen = b.answer(wait).ok("B wait-kick while down");
    assert_eq!(seen.get("seen"), Some("true"), "{}", seen.line);

    broker.restart();
    let (fresh, again) = until_ok(&mut a, "alloc 4K");
    let fresh = fresh.get("token").unwrap().to_string();
    assert_ne!(fresh, token);
    println!("A allocated again after {again} EAGAIN answers");

    // The same pool: gid, region, owner, holders, grant.
    let status = broker.status();
    assert_eq!(status["gid"], gid, "the pool's identity survives");
    let wanted = u64::from_str_radix(token.trim_start_matches("0x"), 16).unwrap();
    let region = status["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["token"].as_u64() == Some(wanted))
        .unwrap_or_else(|| panic!("region {token} forgotten: {status}"))
        .clone();
    assert_eq!(region["owner"].as_u64(), Some(a_dev));
    until_ok(&mut b, "alloc 4K");
    let status = broker.status();
    let region = status["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["token"].as_u64() == Some(wanted))
        .unwrap()
        .clone();
    let holders: Vec<u64> = region["holders"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h.as_u64())
        .collect();
    assert_eq!(holders, vec![a_dev, b_dev], "{status}");

    // Grants change again, new regions are shared again, the old one still carries data
    // and kicks.
    a.cmd(&format!("grant {fresh} {b_dev} rwa"))
        .ok("A grant new");
    b.cmd(&format!("attach {fresh} rw")).ok("B attach new");
    a.cmd(&format!("write {fresh} 0 after-restart"))
        .ok("A write new");
    let read = b.cmd(&format!("read {fresh} 0 13")).ok("B read new");
    assert_eq!(read.get("text"), Some("after-restart"), "{}", read.line);
    let check = b.cmd(&format!("check {token} 0x15")).ok("B check");
    assert_eq!(check.number("bad_offset"), Some(4096), "{}", check.line);
    let wait = a.send("wait-kick 1");
    b.cmd(&format!("kick {token}")).ok("B kick after restart");
    assert_eq!(a.answer(wait).ok("A wait-kick").get("seen"), Some("true"));

    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

#[test]
fn test_broker_killed_and_restarted_under_two_ism_vmm_guests() {
    test_broker_killed_and_restarted_under_two_guests(Vmm::IsmVmm);
}
