// SPDX-License-Identifier: Apache-2.0
//! Which VMM a test runs its guests under: `ism-vmm`, or cloud-hypervisor with the ism patch
//! series (built and cached by `resources/cloud-hypervisor.sh`). Test bodies take a [`Vmm`];
//! [`vmm_tests!`](crate::vmm_tests) makes one test per VMM of each body.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::vm::vmm_binary;

/// A VMM the tests can run guests under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    /// The project's own VMM (built from this workspace).
    IsmVmm,
    /// cloud-hypervisor with the ism patch series.
    CloudHypervisor,
}

impl Vmm {
    /// Both, in the order tests and benchmarks report them.
    pub const ALL: [Vmm; 2] = [Vmm::IsmVmm, Vmm::CloudHypervisor];

    pub fn name(self) -> &'static str {
        match self {
            Vmm::IsmVmm => "ism-vmm",
            Vmm::CloudHypervisor => "cloud-hypervisor",
        }
    }

    /// Whether this VMM can be had here; the reason when not.
    pub fn available(self) -> Result<(), String> {
        match self {
            Vmm::IsmVmm => Ok(()),
            Vmm::CloudHypervisor => cloud_hypervisor_dir().map(|_| ()),
        }
    }

    /// The VMM's binary. Panics when it is not [`Vmm::available`].
    pub fn binary(self) -> PathBuf {
        match self {
            Vmm::IsmVmm => vmm_binary(),
            Vmm::CloudHypervisor => cloud_hypervisor_dir()
                .unwrap_or_else(|why| panic!("cloud-hypervisor is not available: {why}"))
                .join("cloud-hypervisor"),
        }
    }

    /// The VMM's remote-control client (`ch-remote` for cloud-hypervisor).
    pub fn remote_binary(self) -> Option<PathBuf> {
        match self {
            Vmm::IsmVmm => None,
            Vmm::CloudHypervisor => cloud_hypervisor_dir().ok().map(|dir| dir.join("ch-remote")),
        }
    }

    /// Arguments that boot `kernel` with `cmdline`, 1 vCPU and 128 MiB, its serial console
    /// on the VMM's stdout (cloud-hypervisor: no virtio-console).
    pub fn boot_args(self, kernel: &Path, cmdline: &str) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--kernel".into(),
            kernel.display().to_string(),
            "--cmdline".into(),
            cmdline.into(),
            "--cpus".into(),
            "boot=1".into(),
            "--memory".into(),
            "size=128M".into(),
            "--serial".into(),
            "tty".into(),
        ];
        if self == Vmm::CloudHypervisor {
            args.extend(["--console".into(), "off".into()]);
        }
        args
    }
}

/// The directory holding patched `cloud-hypervisor` and `ch-remote`: `$ISM_CLOUD_HYPERVISOR_DIR`
/// if set, else what `resources/cloud-hypervisor.sh` prints (it builds once and caches; it
/// needs cloud-hypervisor's source, see docs/cloud-hypervisor.md). Looked up once per test
/// process; the error says what is missing.
pub fn cloud_hypervisor_dir() -> Result<PathBuf, String> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(find_cloud_hypervisor).clone()
}

fn find_cloud_hypervisor() -> Result<PathBuf, String> {
    let dir = match std::env::var_os("ISM_CLOUD_HYPERVISOR_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/cloud-hypervisor.sh");
            eprintln!(
                "ism-tests: looking for patched cloud-hypervisor ({})",
                script.display()
            );
            let output = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            let stderr = String::from_utf8_lossy(&output.stderr);
            if !output.status.success() {
                let why = stderr
                    .lines()
                    .last()
                    .unwrap_or("no message")
                    .trim()
                    .to_owned();
                return Err(format!("resources/cloud-hypervisor.sh failed: {why}"));
            }
            let stdout = String::from_utf8_lossy(&output.stdout);
            PathBuf::from(stdout.lines().last().unwrap_or("").trim())
        }
    };
    for binary in ["cloud-hypervisor", "ch-remote"] {
        if !dir.join(binary).is_file() {
            return Err(format!("no {binary} in {}", dir.display()));
        }
    }
    Ok(dir)
}

/// Return early from a test, with one loud line, when `vmm` (a [`Vmm`]) cannot be had here.
#[macro_export]
macro_rules! require_vmm {
    ($vmm:expr) => {
        if let Err(why) = $vmm.available() {
            eprintln!("SKIPPED: {} under {}: {why}", module_path!(), $vmm.name());
            return;
        }
    };
}

/// One test per VMM for each body `fn name(vmm: Vmm)`: `name::ism_vmm` and
/// `name::cloud_hypervisor`.
#[macro_export]
macro_rules! vmm_tests {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn ism_vmm() {
                    super::$name($crate::Vmm::IsmVmm)
                }

                #[test]
                fn cloud_hypervisor() {
                    super::$name($crate::Vmm::CloudHypervisor)
                }
            }
        )+
    };
}
