// SPDX-License-Identifier: Apache-2.0
//! Issue 15 with real guests: two test guests, each in its own VMM, share a region
//! through an `ism-pool` broker that is SIGKILLed and restarted on the same socket (and
//! state file). The shared memory and the zero-hop kicks keep working while it is down,
//! control commands get EAGAIN, and after the restart both VMMs are back in the same pool:
//! the region is known again and the guests can allocate, attach and grant.
//! Every test runs under ism-vmm and under cloud-hypervisor (`name::ism_vmm`,
//! `name::cloud_hypervisor`), each VMM under its own seccomp filters.

use std::time::{Duration, Instant};

use ism_tests::{
    IsmGuest, IsmSpec, PoolBroker, Vmm, broker_and_two_guests, require_kvm, require_vmm, vmm_tests,
};

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
    let (mut broker, mut a, mut b) = broker_and_two_guests(vmm);
    let (a_dev, b_dev) = (a.devid(), b.devid());
    let gid = broker.status()["gid"].clone();

    let token = a.shared_region("64K", "0x15", b_dev, "rwa");
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

/// Statuses a storm command may get: success, the broker being away, or the ordinary
/// refusals of a race with the peer (the owner detached first, a grant not there yet).
const STORM_STATUSES: [&str; 6] = [
    "ok",
    "EAGAIN",
    "ENOENT",
    "PERM_EATTACH",
    "PERM_EREAD",
    "ERR",
];

/// One guest of the storm: allocate, grant the peer, offer the token, attach and detach
/// what the peer offers, detach its own; every region it takes it gives back.
fn storm(
    guest: &mut IsmGuest,
    peer: u64,
    offer: std::sync::mpsc::Sender<String>,
    offered: std::sync::mpsc::Receiver<String>,
    stop: &std::sync::atomic::AtomicBool,
) -> std::collections::BTreeMap<String, u32> {
    let mut statuses = std::collections::BTreeMap::new();
    let mut tally = |answer: &ism_tests::Answer| {
        let status = answer.status().to_string();
        assert!(STORM_STATUSES.contains(&status.as_str()), "{}", answer.line);
        *statuses.entry(status).or_insert(0) += 1;
        answer.status() == "ok"
    };
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let alloc = guest.cmd("alloc 4K");
        if !tally(&alloc) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let token = alloc.get("token").unwrap().to_string();
        tally(&guest.cmd(&format!("grant {token} {peer} rwa")));
        let _ = offer.send(token.clone());
        for theirs in offered.try_iter() {
            if tally(&guest.cmd(&format!("attach {theirs} rw"))) {
                tally(&guest.cmd(&format!("detach {theirs}")));
            }
        }
        tally(&guest.cmd(&format!("detach {token}")));
    }
    statuses
}

/// Both guests storm alloc / grant / attach / detach while the broker is SIGKILLed and
/// restarted; the long-lived shared region keeps its data; afterwards the broker holds
/// exactly that region again (nothing leaked, nothing lost), and sharing works.
fn test_broker_killed_during_a_storm_of_two_guests(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let (mut broker, mut a, mut b) = broker_and_two_guests(vmm);
    let (a_dev, b_dev) = (a.devid(), b.devid());
    let token = a.shared_region("64K", "0x77", b_dev, "rwa");
    b.cmd(&format!("attach {token} rw")).ok("B attach");

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (to_b, from_a) = std::sync::mpsc::channel();
    let (to_a, from_b) = std::sync::mpsc::channel();
    let (a_statuses, b_statuses) = std::thread::scope(|scope| {
        let a_storm = scope.spawn(|| storm(&mut a, b_dev, to_b, from_b, &stop));
        let b_storm = scope.spawn(|| storm(&mut b, a_dev, to_a, from_a, &stop));
        std::thread::sleep(Duration::from_secs(2));
        broker.kill();
        std::thread::sleep(Duration::from_secs(1));
        broker.restart();
        std::thread::sleep(Duration::from_secs(4));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (a_storm.join().unwrap(), b_storm.join().unwrap())
    });
    println!("storm statuses: A {a_statuses:?}, B {b_statuses:?}");
    for statuses in [&a_statuses, &b_statuses] {
        assert!(statuses.get("ok").copied().unwrap_or(0) > 0);
    }
    // Both are back (each may still answer EAGAIN for a moment).
    until_ok(
        &mut a,
        "grant {token} default r"
            .replace("{token}", &token)
            .as_str(),
    );
    let (answer, _) = until_ok(&mut b, "alloc 4K");
    let fresh = answer.get("token").unwrap().to_string();
    b.cmd(&format!("detach {fresh}")).ok("B detach");
    let wanted = u64::from_str_radix(token.trim_start_matches("0x"), 16).unwrap();
    let status = broker.status();
    let regions = status["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 1, "only the shared region is left: {status}");
    assert_eq!(regions[0]["token"].as_u64(), Some(wanted));
    assert_eq!(status["used"].as_u64(), Some(64 << 10), "{status}");
    let check = b.cmd(&format!("check {token} 0x77")).ok("B check");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);
    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

/// A broker stopped for longer than the device's 5 s request timeout: the guest's command
/// gets EAGAIN after about that long, the next at once; the other guest's memory and kicks
/// are not held up; after SIGCONT everything works.
fn test_broker_stopped_longer_than_the_timeout_under_two_guests(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let (broker, mut a, mut b) = broker_and_two_guests(vmm);
    let b_dev = b.devid();
    let token = a.alloc("4K");
    a.cmd(&format!("grant {token} {b_dev} rwa")).ok("A grant");
    b.cmd(&format!("attach {token} rw")).ok("B attach");
    a.cmd(&format!("bind {token}")).ok("A bind");

    broker.signal(libc::SIGSTOP);
    let started = Instant::now();
    let pending = a.send("alloc 4K");
    // Meanwhile B writes and kicks A: nothing of that waits for the broker.
    b.cmd(&format!("write {token} 0 while-stopped"))
        .ok("B write");
    b.cmd(&format!("kick {token}")).ok("B kick");
    let b_done = started.elapsed();
    let refused = a.answer(pending);
    let waited = started.elapsed();
    assert_eq!(refused.status(), "EAGAIN", "{}", refused.line);
    let started = Instant::now();
    let next = a.cmd("alloc 4K");
    let fast = started.elapsed();
    assert_eq!(next.status(), "EAGAIN", "{}", next.line);
    println!(
        "stopped broker: B's write and kick took {b_done:?}; A's alloc got EAGAIN after {waited:?}, the next after {fast:?}"
    );
    assert!(b_done < Duration::from_secs(4), "{b_done:?}");
    assert!(waited >= Duration::from_secs(4) && waited < Duration::from_secs(20));
    assert!(fast < Duration::from_secs(2), "{fast:?}");
    let seen = a.cmd("wait-kick 1").ok("A wait-kick");
    assert_eq!(seen.get("seen"), Some("true"), "{}", seen.line);
    let read = a.cmd(&format!("read {token} 0 13")).ok("A read");
    assert_eq!(read.get("text"), Some("while-stopped"), "{}", read.line);

    broker.signal(libc::SIGCONT);
    until_ok(&mut a, "alloc 4K");
    // The alloc that timed out was given back: A holds its two regions, B one.
    let status = broker.status();
    assert_eq!(status["regions"].as_array().unwrap().len(), 2, "{status}");
    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

/// B's VMM is SIGKILLed while it attaches and detaches A's region in a loop: A keeps the
/// region and its contents, hears that B left, and can allocate and grant again.
fn test_peer_vmm_killed_during_attach(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let (broker, mut a, mut b) = broker_and_two_guests(vmm);
    let token = a.shared_region("64K", "0x99", "default", "rwa");
    // Queue many attach/detach pairs on B's serial input and kill it in the middle.
    for _ in 0..200 {
        b.send(&format!("attach {token} rw"));
        b.send(&format!("detach {token}"));
    }
    std::thread::sleep(Duration::from_millis(300));
    b.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = broker.status();
        if status["sessions"].as_array().unwrap().len() == 1 {
            let regions = status["regions"].as_array().unwrap();
            assert_eq!(regions.len(), 1, "{status}");
            assert_eq!(
                regions[0]["holders"].as_array().unwrap().len(),
                1,
                "{status}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "B's session stayed: {status}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let check = a.cmd(&format!("check {token} 0x99")).ok("A check");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);
    let fresh = a.alloc("4K");
    a.cmd(&format!("grant {fresh} default r"))
        .ok("A grant again");
    assert_eq!(a.power_off(), Some(0));
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 10 000 ALLOC/DETACH cycles of a guest through its VMM and the broker leave the VMM's and
/// the broker's descriptor counts and memory flat (measured and printed).
fn test_ten_thousand_alloc_free_cycles_of_a_guest_stay_flat(vmm_kind: Vmm) {
    require_kvm!();
    require_vmm!(vmm_kind);
    let broker = PoolBroker::start("1G");
    let mut a = IsmGuest::start("A", &broker, &IsmSpec::on(vmm_kind), &[]);
    a.set_timeout(Duration::from_secs(900));
    a.cmd("alloc-free 200 4K").ok("warm-up");
    let (vmm, pool) = (a.pid(), broker.pid());
    let start = [fd_count(vmm), fd_count(pool)];
    let start_rss = [rss_kib(vmm), rss_kib(pool)];
    let started = Instant::now();
    let run = a.cmd("alloc-free 10000 4K").ok("alloc-free");
    assert_eq!(run.number("done"), Some(10_000), "{}", run.line);
    let took = started.elapsed();
    let end = [fd_count(vmm), fd_count(pool)];
    let end_rss = [rss_kib(vmm), rss_kib(pool)];
    println!(
        "10000 guest alloc/free cycles in {took:?}: {} fds {} -> {}, RSS {} -> {} KiB; ism-pool fds {} -> {}, RSS {} -> {} KiB",
        vmm_kind.name(),
        start[0],
        end[0],
        start_rss[0],
        end_rss[0],
        start[1],
        end[1],
        start_rss[1],
        end_rss[1]
    );
    assert!(
        end[0] <= start[0] + 4,
        "{} descriptors grew",
        vmm_kind.name()
    );
    assert!(end[1] <= start[1] + 4, "ism-pool descriptors grew");
    assert!(
        end_rss[0] <= start_rss[0] + 32 * 1024,
        "{} memory grew",
        vmm_kind.name()
    );
    assert!(
        end_rss[1] <= start_rss[1] + 16 * 1024,
        "ism-pool memory grew"
    );
    let status = broker.status();
    assert!(status["regions"].as_array().unwrap().is_empty(), "{status}");
    assert_eq!(a.power_off(), Some(0));
}

vmm_tests!(
    test_broker_killed_and_restarted_under_two_guests,
    test_broker_killed_during_a_storm_of_two_guests,
    test_broker_stopped_longer_than_the_timeout_under_two_guests,
    test_peer_vmm_killed_during_attach,
    test_ten_thousand_alloc_free_cycles_of_a_guest_stay_flat,
);
