// SPDX-License-Identifier: Apache-2.0
//! Boot the freestanding test guest: power-off, CPU count, virtio-rng with MSI-X, PCI and the
//! APIC timer under ism-vmm and cloud-hypervisor alike; reset, guest faults and bad kernels
//! under ism-vmm. Each VM has a hard 60 s limit and is killed on failure.

use ism_tests::{VmRun, Vmm, require_kvm, require_vmm, vmm_tests};

fn test_guest_boots_prints_and_powers_off(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let out = VmRun::guest_test_on(vmm, "boot").run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let r = &out.report;
    assert_eq!(r.get("hello"), Some("1"), "{}", out.describe());
    assert_eq!(r.get("test"), Some("boot"));
    assert!(r.passed(), "{}", out.describe());
    // 128 MiB guest: the E820 RAM the start info lists is most of it.
    let mem = r.number("mem_bytes").unwrap_or(0);
    assert!((120 << 20..=128 << 20).contains(&mem), "mem_bytes={mem}");
    assert_eq!(r.number("s5"), Some(5), "DSDT _S5_ sleep type");
}

fn test_two_vcpus_are_reported_by_madt(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let out = VmRun::guest_test_on(vmm, "boot")
        .set("cpus", "boot=2")
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.report.number("cpus"), Some(2), "{}", out.describe());
    let one = VmRun::guest_test_on(vmm, "boot").run();
    assert_eq!(one.report.number("cpus"), Some(1), "{}", one.describe());
}

fn test_virtio_rng_returns_varied_bytes(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let out = VmRun::guest_test_on(vmm, "rng")
        .set("rng", "src=/dev/urandom")
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let r = &out.report;
    assert!(r.passed(), "{}", out.describe());
    assert_eq!(r.number("rng_bytes"), Some(64), "{}", out.describe());
    assert!(
        r.number("rng_distinct").unwrap_or(0) > 1,
        "{}",
        out.describe()
    );
    assert_eq!(r.get("rng_reads_differ"), Some("true"));
}

fn test_virtio_rng_completions_raise_msix_interrupts(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let out = VmRun::guest_test_on(vmm, "rng")
        .set("rng", "src=/dev/urandom")
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        out.report.get("rng_msix"),
        Some("true"),
        "{}",
        out.describe()
    );
    assert!(
        out.report.number("rng_irqs").unwrap_or(0) >= 1,
        "{}",
        out.describe()
    );
}

fn test_pci_enumeration_lists_host_bridge(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let out = VmRun::guest_test_on(vmm, "pci").run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(out.report.passed(), "{}", out.describe());
    assert!(!out.report.all("pci").is_empty());
}

fn test_local_apic_timer_wakes_idle_guest(vmm: Vmm) {
    require_kvm!();
    require_vmm!(vmm);
    let out = VmRun::guest_test_on(vmm, "irq").run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert!(out.report.passed(), "{}", out.describe());
}

#[test]
fn test_acpi_reset_ends_vmm_with_status_0() {
    require_kvm!();
    let out = VmRun::guest_test("reboot").run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(out.report.get("reboot"), Some("acpi"));
    assert_eq!(out.report.get("error"), None, "{}", out.describe());
}

#[test]
fn test_guest_page_fault_is_reported_then_powered_off() {
    require_kvm!();
    let out = VmRun::guest_test("pagefault").run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let r = &out.report;
    assert_eq!(r.number("vector"), Some(14), "{}", out.describe());
    assert_eq!(r.number("cr2"), Some(0x20_0000_0000));
    assert_eq!(
        r.number("cs").map(|cs| cs & 3),
        Some(3),
        "fault taken in ring 3"
    );
    assert_eq!(r.get("result"), Some("fail"));
}

#[test]
fn test_guest_panic_is_reported_then_powered_off() {
    require_kvm!();
    let out = VmRun::guest_test("panic").run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    assert_eq!(
        out.report.get("panic"),
        Some("requested by ism.test=panic"),
        "{}",
        out.describe()
    );
    assert_eq!(out.report.get("result"), Some("fail"));
}

#[test]
fn test_missing_kernel_is_a_clear_error() {
    let path = "/nonexistent/ism-no-such-kernel";
    let out = VmRun::guest_test("boot").set("kernel", path).run();
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains(path), "{}", out.describe());
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
}

#[test]
fn test_corrupt_kernel_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("ism-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("corrupt-kernel.elf");
    // An ELF header that lies: right magic, then garbage.
    let mut bytes = b"\x7fELF\x02\x01\x01".to_vec();
    bytes.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    std::fs::write(&path, &bytes).unwrap();
    let path_text = path.display().to_string();
    let out = VmRun::guest_test("boot").set("kernel", &path_text).run();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains(&path_text), "{}", out.describe());
    assert!(!out.stderr.contains("panicked"), "{}", out.describe());
}

#[test]
fn test_virtio_capabilities_are_listed_inside_pci_windows() {
    require_kvm!();
    let out = VmRun::guest_test("virtio")
        .set("rng", "src=/dev/urandom")
        .run();
    assert_eq!(out.code(), Some(0), "{}", out.describe());
    let r = &out.report;
    assert!(r.passed(), "{}", out.describe());
    assert_eq!(r.number("type"), Some(4), "{}", out.describe());
    let common = r.number("common").unwrap_or(0);
    assert!(
        (0xc000_0000..0xe000_0000).contains(&common) || common >= 0x10_0000_0000,
        "common cfg at {common:#x} outside the PCI windows"
    );
}

vmm_tests!(
    test_guest_boots_prints_and_powers_off,
    test_two_vcpus_are_reported_by_madt,
    test_virtio_rng_returns_varied_bytes,
    test_virtio_rng_completions_raise_msix_interrupts,
    test_pci_enumeration_lists_host_bridge,
    test_local_apic_timer_wakes_idle_guest,
);
