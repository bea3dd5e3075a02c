// SPDX-License-Identifier: Apache-2.0
//! `resources/cloud-hypervisor.sh`: bad sources are one clear line and a non-zero exit; a
//! cached build is only printed, not rebuilt.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ism_tests::pair::ScratchDir;
use ism_tests::{Vmm, require_vmm};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/cloud-hypervisor.sh")
}

#[test]
fn test_bad_sources_are_one_clear_line_and_a_failure() {
    let cache = ScratchDir::new("ch-cache");
    let not_git = ScratchDir::new("not-git");
    for (source, says) in [
        ("/nonexistent/cloud-hypervisor", "is not a directory"),
        (not_git.path().to_str().unwrap(), "is not a git repository"),
    ] {
        let out = Command::new("bash")
            .arg(script())
            .env("ISM_CH_CACHE", cache.path())
            .env("ISM_CH_SRC", source)
            .stdin(Stdio::null())
            .output()
            .expect("run the script");
        assert!(!out.status.success(), "{source}: {out:?}");
        assert!(out.stdout.is_empty(), "{source}: printed a directory");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.contains("ISM_CH_SRC") && last.contains(says),
            "{stderr}"
        );
    }
}

#[test]
fn test_a_cached_build_is_only_printed() {
    // Only where a build is cached already (CI builds it before the tests).
    let vmm = Vmm::CloudHypervisor;
    require_vmm!(vmm);
    if std::env::var_os("ISM_CLOUD_HYPERVISOR_DIR").is_some()
        && std::env::var_os("ISM_CH_CACHE").is_some()
    {
        eprintln!("SKIPPED: test_a_cached_build_is_only_printed: a custom ISM_CH_CACHE is set");
        return;
    }
    let out = Command::new("bash")
        .arg(script())
        .stdin(Stdio::null())
        .output()
        .expect("run the script");
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let dir = PathBuf::from(stdout.trim());
    assert!(dir.join("cloud-hypervisor").is_file() && dir.join("ch-remote").is_file());
    assert!(
        out.stderr.is_empty(),
        "a cached build must not say anything (it would say it is building): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let help = Command::new(dir.join("cloud-hypervisor"))
        .arg("--help")
        .output()
        .expect("cloud-hypervisor --help");
    assert!(String::from_utf8_lossy(&help.stdout).contains("--ism <ism>"));
}
