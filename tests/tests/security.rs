// SPDX-License-Identifier: Apache-2.0
//! The deployment docs/security.md recommends, tried for real: the broker as root, a VMM
//! as another user. A read-only lease then holds against the VMM itself (a compromised VMM
//! runs as that user): every way that user has to the region's pages refuses writes.

use ism_tests::uid::{UNPRIVILEGED_UID, run_as};
use ism_tests::{IsmGuest, IsmSpec, PoolBroker, Vmm, require_kvm, require_run_as, require_vmm};

/// The `start-end` range and permissions of the mapping of region `token` in `pid`.
fn region_mapping(pid: u32, token: &str) -> (String, String) {
    let token = u64::from_str_radix(token.trim_start_matches("0x"), 16).expect("hex token");
    // The pool names memfds by the token in 16 hex digits.
    let name = format!("/memfd:ism-{token:#018x}");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let line = maps
        .lines()
        .find(|line| line.contains(&name))
        .unwrap_or_else(|| panic!("no mapping of {name} in pid {pid}:\n{maps}"));
    let mut fields = line.split_whitespace();
    let range = fields.next().expect("range").to_string();
    let perms = fields.next().expect("perms").to_string();
    (range, perms)
}

/// `dd` arguments that write 8 bytes at byte offset `seek` of `path` (or only open it for
/// writing when `count` is 0).
fn dd_write(path: &str, seek: u64, count: u32) -> Vec<String> {
    vec![
        "if=/dev/zero".into(),
        format!("of={path}"),
        "bs=8".into(),
        format!("count={count}"),
        format!("seek={seek}"),
        "oflag=seek_bytes".into(),
        "conv=notrunc".into(),
        "status=none".into(),
    ]
}

fn test_read_only_lease_holds_against_a_vmm_of_another_user(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    require_run_as!();
    // As docs/security.md sets it up: the VMMs' group may use the socket, their uid is a
    // VMM uid, and each VMM is a VM of its own.
    let vmm_id = UNPRIVILEGED_UID.to_string();
    let broker = PoolBroker::start_with_args(
        "1G",
        &[
            "--socket-group",
            &vmm_id,
            "--vmm-uid",
            &vmm_id,
            "--vm-identity",
            "process",
        ],
    );
    let mut a = IsmGuest::start("A", &broker, &IsmSpec::on(vmm), &[]);
    let jailed = IsmSpec {
        run_as: Some(UNPRIVILEGED_UID),
        ..IsmSpec::on(vmm)
    };
    let mut b = IsmGuest::start("B", &broker, &jailed, &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", b.pid())).expect("status");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(&UNPRIVILEGED_UID.to_string())),
        "B runs as {UNPRIVILEGED_UID}:\n{status}"
    );

    let alloc = a.cmd("alloc 64K").ok("A alloc");
    let token = alloc.get("token").expect("token").to_string();
    a.cmd(&format!("fill {token} 77")).ok("A fill");
    a.cmd(&format!("grant {token} {} ra", b.devid()))
        .ok("A grant");
    b.cmd(&format!("attach {token} ro")).ok("B attach ro");

    let (range, perms) = region_mapping(b.pid(), &token);
    assert!(
        perms.starts_with("r-") && perms.ends_with('s'),
        "{range} {perms}"
    );
    let start = u64::from_str_radix(range.split('-').next().expect("start"), 16).expect("hex");
    let pid = b.pid();

    // 1. Reopen the mapped file for writing through /proc/<pid>/map_files.
    let map_file = format!("/proc/{pid}/map_files/{range}");
    let (opened, why) = run_as(UNPRIVILEGED_UID, "dd", &dd_write(&map_file, 0, 1));
    assert!(!opened, "B's user reopened {map_file} for writing");
    eprintln!(
        "map_files reopen as {UNPRIVILEGED_UID}: refused ({})",
        why.trim()
    );
    // 2. Force a write into the mapping through /proc/<pid>/mem (ptrace's FOLL_FORCE).
    let (wrote, why) = run_as(
        UNPRIVILEGED_UID,
        "dd",
        &dd_write(&format!("/proc/{pid}/mem"), start, 1),
    );
    assert!(
        !wrote,
        "B's user wrote into the read-only mapping through /proc/{pid}/mem"
    );
    eprintln!(
        "/proc/pid/mem write as {UNPRIVILEGED_UID}: refused ({})",
        why.trim()
    );
    // The same user can read it there (so the refusals above are about writing), unless a
    // ptrace policy such as Yama forbids even that.
    let (read, why) = run_as(
        UNPRIVILEGED_UID,
        "dd",
        &[
            format!("if=/proc/{pid}/mem"),
            "of=/dev/null".into(),
            "bs=8".into(),
            "count=1".into(),
            format!("skip={start}"),
            "iflag=skip_bytes".into(),
            "status=none".into(),
        ],
    );
    eprintln!(
        "/proc/pid/mem read as {UNPRIVILEGED_UID}: {read} {}",
        why.trim()
    );

    // Root is the reason the broker warns about root VMMs: it may reopen the same file for
    // writing (opened here, nothing written).
    let root_open = std::fs::OpenOptions::new().write(true).open(&map_file);
    eprintln!(
        "map_files reopen as root: {:?}",
        root_open.as_ref().map(|_| ())
    );

    let check = a.cmd(&format!("check {token} 77")).ok("A check");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);
    let check = b.cmd(&format!("check {token} 77")).ok("B check");
    assert_eq!(check.get("match"), Some("true"), "{}", check.line);
    assert_eq!(b.power_off(), Some(0));
    assert_eq!(a.power_off(), Some(0));
}

ism_tests::vmm_tests!(test_read_only_lease_holds_against_a_vmm_of_another_user);
