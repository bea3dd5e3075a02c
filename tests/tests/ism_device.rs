// SPDX-License-Identifier: Apache-2.0
//! `--ism` end to end, under ism-vmm and cloud-hypervisor: the test guest enumerates the
//! virtio-ism function (1af4:106c, virtio type 44) with both shared-memory capabilities in its
//! 64-bit BAR, and bad options or an absent pool broker stop the VMM with a clear error before
//! the guest runs.

use ism_tests::{VmRun, Vmm, require_kvm, require_vmm, vmm_tests};

/// The `virtio` guest test under `vmm` with `extra` arguments (for repeated options).
fn virtio_guest_with(vmm: Vmm, extra: &[&str]) -> VmRun {
    VmRun::guest_test_on(vmm, "virtio").args(extra.iter().copied())
}

/// The PCI addresses of the virtio-ism functions the guest found (cloud-hypervisor always
/// adds a virtio-rng function too).
fn ism_functions(out: &ism_tests::VmOutcome) -> Vec<String> {
    out.stdout
        .lines()
        .filter(|l| l.contains("ISM-TEST virtio=") && l.contains(" type=44 "))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("virtio="))
                .map(str::to_owned)
        })
        .collect()
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

fn test_ism_device_enumerates_with_both_shm_regions(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let out = VmRun::guest_test_on(vmm, "virtio")
        .set("ism", "size=64M")
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let r = &out.report;
    assert!(r.passed(), "{}", out.describe());
    // Virtio type 44 is PCI device 0x1040 + 44 = 0x106c (modern virtio, vendor 0x1af4).
    let functions = ism_functions(&out);
    assert_eq!(functions.len(), 1, "{}", out.describe());
    let device = functions[0].clone();
    let line = out
        .stdout
        .lines()
        .find(|l| l.contains(&format!("virtio={device} ")))
        .expect("the device's line");
    assert!(line.contains(" shm_count=2"), "{line}");
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

fn test_two_ism_devices_get_their_own_windows(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let out = virtio_guest_with(
        vmm,
        &[
            "--ism",
            "id=ism0,size=256M,chunk_size=4K",
            "--ism",
            "id=ism1,size=8M",
        ],
    )
    .run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let devices = ism_functions(&out);
    assert_eq!(devices.len(), 2, "{}", out.describe());
    let (a, b) = (
        shm_regions(&out, &devices[0]),
        shm_regions(&out, &devices[1]),
    );
    // Which function is which: the 256 MiB window is the larger region area.
    let (a, b) = if a[0].3 > b[0].3 { (a, b) } else { (b, a) };
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

fn test_pci_device_id_places_the_device_or_is_refused(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let out = virtio_guest_with(vmm, &["--ism", "size=8M,pci_device_id=5"]).run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(ism_functions(&out), vec!["00:05.0"], "{}", out.describe());
    // ism-vmm places virtio-rng in slot 1 first; cloud-hypervisor reserves requested slots
    // first, so there two devices ask for the same one.
    let (clash, message): (&[&str], &str) = match vmm {
        Vmm::IsmVmm => (
            &["--rng", "src=/dev/urandom", "--ism", "pci_device_id=1"],
            "PCI slot 1 is not free for _ism0",
        ),
        Vmm::CloudHypervisor => (
            &["--ism", "pci_device_id=5", "--ism", "pci_device_id=5"],
            "already used: 5",
        ),
    };
    let out = virtio_guest_with(vmm, clash).run();
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains(message), "{}", out.describe());
}

fn test_bad_ism_options_and_absent_broker_are_clear_errors(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let segment = match vmm {
        Vmm::IsmVmm => "only segment 0",
        Vmm::CloudHypervisor => "Invalid PCI segment id: 1",
    };
    for (option, message) in [
        ("size=3M", "not a power of two"),
        ("pci_segment=1", segment),
        ("chunk_size=1K", "chunk_size=1024"),
        ("bogus=1", "bogus"),
        (
            "id=a,pool=/nonexistent/ism-pool.sock",
            "broker at /nonexistent/ism-pool.sock",
        ),
    ] {
        let out = VmRun::guest_test_on(vmm, "virtio").set("ism", option).run();
        assert_eq!(out.code(), Some(1), "{option}: {}", out.describe());
        assert!(out.stderr.contains(message), "{option}: {}", out.describe());
        assert_eq!(out.report.lines(), 0, "{option}: the guest must not run");
    }
    let duplicate = match vmm {
        Vmm::IsmVmm => "\"x\" is used twice",
        Vmm::CloudHypervisor => "Identifier x is not unique",
    };
    let out = virtio_guest_with(vmm, &["--ism", "id=x", "--ism", "id=x"]).run();
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains(duplicate), "{}", out.describe());
}

/// The pool embedded in the VMM (no `pool=`) under the default seccomp filters: the guest
/// allocates, writes and reads a region, then powers off cleanly.
fn test_embedded_pool_serves_the_guest_under_seccomp(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let script = "alloc,65536;poweroff";
    let out = VmRun::guest_test_on(vmm, &format!("ism ism.script={script}"))
        .args([
            "--ism",
            "id=ism0,size=8M,pool_size=16M",
            "--seccomp",
            "true",
        ])
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("cmd=alloc status=ok"),
        "{}",
        out.describe()
    );
}

vmm_tests!(
    test_embedded_pool_serves_the_guest_under_seccomp,
    test_ism_device_enumerates_with_both_shm_regions,
    test_two_ism_devices_get_their_own_windows,
    test_pci_device_id_places_the_device_or_is_refused,
    test_bad_ism_options_and_absent_broker_are_clear_errors,
);
