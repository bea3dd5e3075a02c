// SPDX-License-Identifier: Apache-2.0
//! Build the freestanding test guest (tests/guest) with its own cargo invocation, profile and
//! target dir, and hand its path to the tests as `ISM_TEST_GUEST`.
//!
//! The inner build must not inherit what the outer cargo tells build scripts: its flags
//! (RUSTFLAGS, CARGO_ENCODED_RUSTFLAGS), its target dir (whose profile dir the outer cargo
//! holds locked), its profile or clippy's rustc wrapper. The guest's own .cargo/config.toml
//! supplies the right flags.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let guest_dir = manifest_dir.join("guest");
    let driver_dir = manifest_dir.join("../guest-driver/core");
    for path in [
        guest_dir.join("src"),
        guest_dir.join("Cargo.toml"),
        guest_dir.join("Cargo.lock"),
        guest_dir.join("build.rs"),
        guest_dir.join("linker.ld"),
        guest_dir.join(".cargo/config.toml"),
        driver_dir.join("src"),
        driver_dir.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let target_dir = guest_target_dir();
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .current_dir(&guest_dir)
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_MAKEFLAGS")
            || key.starts_with("__CARGO")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTDOCFLAGS"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if leaks {
            command.env_remove(key);
        }
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("Failed to run cargo for the test guest: {e}"));
    if !output.status.success() {
        panic!(
            "Building the test guest in {} failed ({}):\n{}",
            guest_dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let elf = target_dir.join("x86_64-unknown-linux-gnu/release/ism-test-guest");
    assert!(elf.is_file(), "Test guest missing at {}", elf.display());
    println!("cargo:rustc-env=ISM_TEST_GUEST={}", elf.display());
}

/// `<target>/ism-test-guest`, next to (not inside) the outer profile dirs: OUT_DIR is
/// `<target>/<profile>/build/<pkg>-<hash>/out`.
fn guest_target_dir() -> PathBuf {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = out_dir.ancestors().nth(4).map(Path::to_path_buf);
    target
        .filter(|t| t.is_dir())
        .unwrap_or(out_dir)
        .join("ism-test-guest")
}
