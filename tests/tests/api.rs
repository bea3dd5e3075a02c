// SPDX-License-Identifier: Apache-2.0
//! The ism endpoints of the REST API, the event monitor and vm.pause, under ism-vmm and
//! cloud-hypervisor alike: two test guests on one `ism-pool` broker, each VMM with its API
//! socket and event monitor. The same bodies must get the same statuses from both VMMs.

use ism_tests::api::json;
use ism_tests::{
    ApiEndpoint, IsmGuest, IsmSpec, PoolBroker, Vmm, require_kvm, require_vmm, vmm_tests,
};

/// Run `events` until the counts of `kind` add up to `want` (the worker delivers an event
/// shortly after the API answered); the last answer's line and the total.
fn wait_guest_events(guest: &mut IsmGuest, kind: &str, want: u64) -> u64 {
    let mut total = 0;
    for _ in 0..50 {
        let events = guest.cmd("events").ok("events");
        total += events.number(kind).unwrap_or(0);
        if total >= want {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    total
}

/// A guest named `name` under `vmm` on `broker`, with its API and event monitor.
fn guest_with_api(name: &str, broker: &PoolBroker, vmm: Vmm) -> (IsmGuest, ApiEndpoint) {
    let api = ApiEndpoint::new();
    let args = api.args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let guest = IsmGuest::start_with_args(name, broker, &IsmSpec::on(vmm), &[], &args);
    (guest, api)
}

/// Region creation, attach and revocation through the API: bad requests are refused with
/// their status and change nothing; a created region is granted to the named peer, announced
/// to the guest (REGION_ADDED) and to the event monitor; the peer attaches and reads it; the
/// API revokes it and the guest is told.
fn test_api_creates_grants_and_revokes_regions(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let broker = PoolBroker::start("1G");
    let (mut a, api) = guest_with_api("A", &broker, vmm);
    let mut b = IsmGuest::start("B", &broker, &IsmSpec::on(vmm), &[]);
    let (own, peer) = (a.devid(), b.devid());

    let pool = api.get("vm.ism-pool-status");
    let sessions: Vec<u64> = pool["ism0"]["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["devid"].as_u64())
        .collect();
    assert!(
        sessions.contains(&own) && sessions.contains(&peer),
        "{pool}"
    );
    let used_before = pool["ism0"]["used"].as_u64().expect("used");

    for (body, status, says) in [
        (r#"{"id":"ism0","size":0}"#.to_owned(), 400, "size 0"),
        (r#"{"id":"ism0","size":5000}"#.into(), 400, "size 5000"),
        (
            r#"{"id":"ism0","size":4096,"token":1}"#.into(),
            400,
            "not both",
        ),
        (
            r#"{"id":"ism0","size":4096,"sise":1}"#.into(),
            400,
            "unknown field",
        ),
        (
            r#"{"id":"ism0","size":4096,"grants":[{"peer":77777,"perm":"ro"}]}"#.into(),
            400,
            "peer 77777 is not a device of its pool",
        ),
        (
            format!(r#"{{"id":"ism0","size":4096,"grants":[{{"peer":{own},"perm":"ro"}}]}}"#),
            400,
            "the device itself",
        ),
        (
            r#"{"id":"ism0","size":134217728}"#.into(),
            400,
            "does not fit",
        ),
        (r#"{"id":"ism7","size":4096}"#.into(), 404, "No ism device"),
        (r#"{"id":"ism0","token":12345}"#.into(), 400, "refused"),
    ] {
        let reply = api.expect("PUT", "vm.ism-add-region", Some(&body), status);
        assert!(reply.contains(says), "{body}: {reply}");
    }
    assert_eq!(
        api.get("vm.ism-pool-status")["ism0"]["used"].as_u64(),
        Some(used_before),
        "nothing was allocated"
    );

    // Created, read-write for the peer.
    let body = format!(r#"{{"id":"ism0","size":131072,"grants":[{{"peer":{peer},"perm":"rw"}}]}}"#);
    let created = json(&api.expect("PUT", "vm.ism-add-region", Some(&body), 200));
    let token = created["token"].as_u64().expect("token");
    assert_eq!(created["id"], "ism0");
    assert_eq!(created["areas"][0]["size"], 131072);
    assert_eq!(
        api.get("vm.ism-regions")["ism0"],
        serde_json::json!([token])
    );
    let region = api.get("vm.ism-pool-status")["ism0"]["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .find(|r| r["token"] == token)
        .cloned()
        .expect("the region in the pool");
    assert_eq!(region["owner"], own);
    // ATTACH|READ|WRITE for the peer.
    assert_eq!(region["grants"], serde_json::json!([[peer, 7]]));
    // Held already: 409.
    let again = format!(r#"{{"id":"ism0","token":{token}}}"#);
    api.expect("PUT", "vm.ism-add-region", Some(&again), 409);

    // The guest heard of it without asking; the peer attaches it and both see the bytes.
    assert_eq!(wait_guest_events(&mut a, "region_added", 1), 1);
    b.cmd(&format!("attach {token:#x} rw")).ok("B attach");
    b.cmd(&format!("fill {token:#x} 77")).ok("B fill");
    b.cmd(&format!("check {token:#x} 77")).ok("B check");

    let tok = token.to_string();
    let allocated = api.wait_events("ism", "region-allocated", &[("token", &tok)], 1);
    assert_eq!(allocated[0]["properties"]["origin"], "api");
    assert_eq!(allocated[0]["properties"]["size"], "131072");
    assert_eq!(allocated[0]["properties"]["id"], "ism0");
    let granted = api.wait_events("ism", "region-granted", &[("token", &tok)], 1);
    assert_eq!(granted[0]["properties"]["peer"], peer.to_string());
    assert_eq!(granted[0]["properties"]["perm"], "rw");
    api.wait_events(
        "ism",
        "peer-attached",
        &[("token", &tok), ("peer", &peer.to_string())],
        1,
    );

    // Revoked: the guest gets a REVOKE event; a second revoke is 404.
    let body = format!(r#"{{"id":"ism0","token":{token}}}"#);
    api.expect("PUT", "vm.ism-remove-region", Some(&body), 204);
    assert_eq!(api.get("vm.ism-regions"), serde_json::json!({"ism0": []}));
    api.expect("PUT", "vm.ism-remove-region", Some(&body), 404);
    assert_eq!(wait_guest_events(&mut a, "revoke", 1), 1);
    api.wait_events("ism", "region-revoked", &[("token", &tok)], 1);

    // Counters of the device are in vm.counters, and vm.info shows the --ism config.
    let counters = api.get("vm.counters");
    assert!(
        counters["ism0"]["events_delivered"].as_u64().unwrap_or(0) >= 2,
        "{counters}"
    );
    let info = api.get("vm.info");
    assert!(info.to_string().contains("\"ism0\""), "{info}");
    assert_eq!(info["state"], "Running");

    assert_eq!(b.power_off(), Some(0));
    a.kill();
}

/// vm.pause parks the vCPUs and the ism worker: a region the host adds while paused is not
/// announced (no event buffer is written) until resume, and a peer's kick waits and is
/// delivered after resume.
fn test_api_pause_parks_the_ism_worker_and_kicks_latch(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let broker = PoolBroker::start("1G");
    let mut a = IsmGuest::start("A", &broker, &IsmSpec::on(vmm), &[]);
    let (mut b, api) = guest_with_api("B", &broker, vmm);
    let alloc = a.cmd("alloc 64K").ok("A alloc");
    let token = alloc.get("token").expect("token").to_owned();
    a.cmd(&format!("grant {token} {} rwa", b.devid()))
        .ok("A grant");
    b.cmd(&format!("attach {token} rw")).ok("B attach");
    b.cmd(&format!("bind {token}")).ok("B bind");
    let delivered = |api: &ApiEndpoint| {
        api.get("vm.counters")["ism0"]["events_delivered"]
            .as_u64()
            .expect("events_delivered")
    };
    // The guest keeps event buffers posted; drain what is there.
    b.cmd("events").ok("B events");
    let before = delivered(&api);

    api.expect("PUT", "vm.pause", None, 204);
    assert_eq!(api.get("vm.info")["state"], "Paused");
    let added = json(&api.expect(
        "PUT",
        "vm.ism-add-region",
        Some(r#"{"id":"ism0","size":65536}"#),
        200,
    ));
    assert!(added["token"].as_u64().is_some(), "{added}");
    a.cmd(&format!("kick {token}")).ok("A kick");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        delivered(&api),
        before,
        "the paused worker wrote an event into guest memory"
    );

    let wait = b.send("wait-kick 1");
    api.expect("PUT", "vm.resume", None, 204);
    let seen = b.answer(wait).ok("B wait-kick");
    assert_eq!(seen.get("seen"), Some("true"), "{}", seen.line);
    assert_eq!(wait_guest_events(&mut b, "region_added", 1), 1);
    assert!(delivered(&api) > before);
    api.wait_events("vm", "resumed", &[], 1);

    assert_eq!(a.power_off(), Some(0));
    b.kill();
}

/// The ism worker and the pool client run under their own seccomp filters, stacked on the
/// filter of the thread that started them: every thread of the VMM is filtered, and the two
/// ism threads carry one filter more than the thread they came from.
fn test_ism_threads_run_under_their_own_seccomp_filters(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let broker = PoolBroker::start("1G");
    let mut a = IsmGuest::start("A", &broker, &IsmSpec::on(vmm), &["alloc 4096"]);
    a.cmd("events").ok("events");
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{}/task", a.pid())).expect("tasks") {
        let dir = task.expect("task").path();
        // cloud-hypervisor's main thread only waits for its VMM thread, unfiltered (as
        // upstream has it); ism-vmm's main thread is filtered like every other.
        if vmm == Vmm::CloudHypervisor && dir.ends_with(a.pid().to_string()) {
            continue;
        }
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        threads.push((
            comm.trim().to_owned(),
            field("Seccomp:"),
            field("Seccomp_filters:").parse::<u32>().unwrap_or(0),
        ));
    }
    assert!(
        threads.iter().all(|(_, mode, _)| mode == "2"),
        "a thread runs unfiltered: {threads:?}"
    );
    let filters = |name: &str| -> Vec<u32> {
        threads
            .iter()
            .filter(|(comm, ..)| comm == name)
            .map(|(.., n)| *n)
            .collect()
    };
    // ism-vmm starts the worker from a vCPU, cloud-hypervisor from its VMM thread; either
    // way the worker has that thread's filter and its own.
    let workers = filters("virtio-ism");
    assert!(!workers.is_empty(), "{threads:?}");
    assert!(workers.iter().all(|n| *n >= 2), "{threads:?}");
    // ism-vmm's main thread starts the pool client before it confines itself;
    // cloud-hypervisor's VMM thread is confined already.
    let inherited = match vmm {
        Vmm::IsmVmm => 0,
        Vmm::CloudHypervisor => 1,
    };
    let clients = filters("ism-pool-client");
    assert!(!clients.is_empty(), "{threads:?}");
    assert!(clients.iter().all(|n| *n == inherited + 1), "{threads:?}");
    a.kill();
}

vmm_tests!(
    test_ism_threads_run_under_their_own_seccomp_filters,
    test_api_creates_grants_and_revokes_regions,
    test_api_pause_parks_the_ism_worker_and_kicks_latch,
);

/// cloud-hypervisor only (ism-vmm has no device hotplug): vm.add-ism plugs a second device
/// into a running VM on the same broker, with its own devid in the pool and its id in the
/// API; snapshot is refused naming the ism device, never an empty snapshot.
#[test]
fn test_cloud_hypervisor_hotplugs_ism_and_refuses_snapshots() {
    require_kvm!();
    let vmm = Vmm::CloudHypervisor;
    require_vmm!(vmm);
    let broker = PoolBroker::start("1G");
    let (mut a, api) = guest_with_api("A", &broker, vmm);
    let body = format!(
        r#"{{"id":"ism1","pool":"{}","size":8388608}}"#,
        broker.socket().display()
    );
    let plugged = json(&api.expect("PUT", "vm.add-ism", Some(&body), 200));
    assert_eq!(plugged["id"], "ism1");
    assert!(plugged["bdf"].as_str().is_some(), "{plugged}");
    let regions = api.get("vm.ism-regions");
    assert_eq!(regions["ism1"], serde_json::json!([]), "{regions}");
    let sessions = broker.status()["sessions"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    assert_eq!(sessions, 2, "the new device has its own pool session");
    assert!(
        api.get("vm.info")["config"]["ism"]
            .to_string()
            .contains("ism1")
    );
    // A second device with the same id is refused.
    api.expect("PUT", "vm.add-ism", Some(&body), 409);
    // Unplug is requested through vm.remove-device; it completes when the guest ejects the
    // device through ACPI (this test guest has no ACPI hotplug, so it stays).
    api.expect("PUT", "vm.remove-device", Some(r#"{"id":"ism1"}"#), 204);
    api.expect("PUT", "vm.remove-device", Some(r#"{"id":"ism9"}"#), 404);

    api.expect("PUT", "vm.pause", None, 204);
    let dir = ism_tests::pair::ScratchDir::new("snapshot");
    let snapshot = format!(r#"{{"destination_url":"file://{}"}}"#, dir.path().display());
    let (status, reply) = api.request("PUT", "vm.snapshot", Some(&snapshot));
    assert_ne!(
        status, 204,
        "a snapshot with an ism device was taken: {reply}"
    );
    assert!(
        !dir.path().join("state.json").exists(),
        "a snapshot was written: {reply}"
    );
    if reply.contains("GetNestedState") {
        // PVM hosts cannot save vCPU state, and cloud-hypervisor saves the vCPUs before the
        // devices: the ism refusal is not reached here (the adapter's unit test checks it).
        eprintln!("note: the snapshot failed on the vCPU state, before the devices");
    } else {
        assert!(
            reply.contains("virtio-ism device ism0 cannot be snapshotted")
                || reply.contains("virtio-ism device ism1 cannot be snapshotted"),
            "{reply}"
        );
    }
    api.expect("PUT", "vm.resume", None, 204);
    a.cmd("events")
        .ok("the guest runs on after the refused snapshot");
    a.kill();
}
