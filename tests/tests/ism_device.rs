// SPDX-License-Identifier: Apache-2.0
//! `--ism` end to end: the test guest enumerates the virtio-ism function (1af4:106c, virtio
//! type 44) with both shared-memory capabilities in its 64-bit BAR, and bad options or an
//! absent pool broker stop the VMM with a clear error before the guest runs.

use ism_tests::{VmRun, require_kvm, test_guest};

/// The `virtio` guest test with `extra` ism-vmm arguments (for repeated options).
fn virtio_guest_with(extra: &[&str]) -> VmRun {
    let guest = test_guest().display().to_string();
    let mut args = vec![
        "--kernel",
        &guest,
        "--cmdline",
        "ism.test=virtio",
        "--memory",
        "size=128M",
        "--serial",
        "tty",
    ];
    args.extend_from_slice(extra);
    VmRun::with_args(args)
}

/// The `shm=<id>` lines of one device: (id, bar, offset, len, addr).
fn shm_regions(out: &ism_tests::VmOutcome, device: &str) -> Vec<(u64, u64, u64, u64, u64)> {
    out.stdout
        .lines()
        .filter(|l| l.contains("ISM-TEST shm=") && l.contains(&format!("device={device} ")))
        .map(|l| {
            let field = |key: &str| {
                let v = l
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{key}=")))
                    .unwrap_or_else(|| panic!("no {key} in {l}"));
                match v.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
                    None => v.parse().unwrap(),
                }
            };
            (
                field("shm"),
                field("bar"),
                field("offset"),
                field("len"),
                field("addr"),
            )
        })
        .collect()
}

#[test]
fn test_ism_device_enumerates_with_both_shm_regions() {
    require_kvm!();
    let out = VmRun::guest_test("virtio").set("ism", "size=64M").run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let r = &out.report;
    assert!(r.passed(), "{}", out.describe());
    // Virtio type 44 is PCI device 0x1040 + 44 = 0x106c (modern virtio, vendor 0x1af4).
    assert_eq!(r.number("type"), Some(44), "{}", out.describe());
    assert_eq!(r.number("shm_count"), Some(2), "{}", out.describe());
    let device = r.get("virtio").expect("virtio line").to_owned();
    let shm = shm_regions(&out, &device);
    // 64 MiB window, 64 KiB chunks with a 4-byte notify slot each: 1023 chunks fit.
    let chunks = (64u64 << 20) / ((64 << 10) + 4);
    let regions_len = chunks * (64 << 10);
    let bar = shm[0].4;
    assert_eq!(
        shm,
        vec![
            (1, 2, 0, regions_len, bar),
            (2, 2, regions_len, chunks * 4, bar + regions_len),
        ],
        "{}",
        out.describe()
    );
    assert!(
        bar >= 0x10_0000_0000 && bar.is_multiple_of(64 << 20),
        "window at {bar:#x}: not a naturally aligned 64-bit BAR"
    );
}

#[test]
fn test_two_ism_devices_get_their_own_windows() {
    require_kvm!();
    let out = virtio_guest_with(&[
        "--ism",
        "id=ism0,size=256M,chunk_size=4K",
        "--ism",
        "id=ism1,size=8M",
    ])
    .run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        out.report.number("virtio_devices"),
        Some(2),
        "{}",
        out.describe()
    );
    let devices: Vec<&str> = out.report.all("virtio");
    let a = shm_regions(&out, devices[0]);
    let b = shm_regions(&out, devices[1]);
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2);
    let (a_start, a_end) = (a[0].4, a[0].4 + (256 << 20));
    let (b_start, b_end) = (b[0].4, b[0].4 + (8 << 20));
    assert!(a_end <= b_start || b_end <= a_start, "windows overlap");
    // 256 MiB in 4 KiB chunks with 4-byte slots.
    assert_eq!(a[0].3, ((256u64 << 20) / 4100) * 4096);
    assert!(
        out.stderr.is_empty() || !out.stderr.contains("Error"),
        "{}",
        out.describe()
    );
}

#[test]
fn test_pci_device_id_places_the_device_or_is_refused() {
    require_kvm!();
    let out = virtio_guest_with(&["--ism", "size=8M,pci_device_id=5"]).run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        out.report.get("virtio"),
        Some("00:05.0"),
        "{}",
        out.describe()
    );
    // virtio-rng takes slot 1 first.
    let out = virtio_guest_with(&["--rng", "src=/dev/urandom", "--ism", "pci_device_id=1"]).run();
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("PCI slot 1 is not free for _ism0"),
        "{}",
        out.describe()
    );
}

#[test]
fn test_bad_ism_options_and_absent_broker_are_clear_errors() {
    require_kvm!();
    for (option, message) in [
        ("size=3M", "not a power of two"),
        ("pci_segment=1", "only segment 0"),
        ("chunk_size=1K", "chunk_size=1024"),
        (
            "id=a,pool=/nonexistent/ism-pool.sock",
            "broker at /nonexistent/ism-pool.sock",
        ),
    ] {
        let out = VmRun::guest_test("virtio").set("ism", option).run();
        assert_eq!(out.code(), Some(1), "{option}: {}", out.describe());
        assert!(out.stderr.contains(message), "{option}: {}", out.describe());
        assert_eq!(out.report.lines(), 0, "{option}: the guest must not run");
    }
    let out = virtio_guest_with(&["--ism", "id=x", "--ism", "id=x"]).run();
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("\"x\" is used twice"),
        "{}",
        out.describe()
    );
}
