// SPDX-License-Identifier: Apache-2.0
//! Running a VMM as another user: the deployment in which read-only leases are a guarantee
//! (docs/security.md). `/dev/kvm` is usually root-only, so the VMM gets a private mount
//! namespace in which a KVM device node owned by that user is bound over `/dev/kvm`; nothing
//! outside the namespace changes.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::pair::ScratchDir;

/// The unprivileged user the tests run VMMs as (`nobody` on Debian).
pub const UNPRIVILEGED_UID: u32 = 65534;

/// Why VMMs cannot be run as another user here, if they cannot.
pub fn run_as_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the tests do not run as root, so they cannot switch users".into());
    }
    for tool in ["unshare", "setpriv", "mount"] {
        let found = Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` (util-linux) is missing"));
        }
    }
    None
}

/// Skip the test with one loud line when VMMs cannot be run as another user.
#[macro_export]
macro_rules! require_run_as {
    () => {
        if let Some(why) = $crate::uid::run_as_unavailable() {
            eprintln!(
                "SKIPPED: {} needs to run a VMM as another user: {why}",
                module_path!()
            );
            return;
        }
    };
}

/// A KVM device node owned by `uid`, in a directory of its own.
pub struct KvmNode {
    dir: ScratchDir,
}

impl KvmNode {
    pub fn for_uid(uid: u32) -> Self {
        let kvm = std::fs::metadata("/dev/kvm").expect("stat /dev/kvm");
        assert!(kvm.file_type().is_char_device(), "/dev/kvm is not a device");
        let dir = ScratchDir::new("kvm-node");
        let node = dir.path().join("kvm");
        let path = std::ffi::CString::new(node.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mknod on a path we own, with the device number /dev/kvm has.
        let ret = unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, kvm.rdev()) };
        assert_eq!(ret, 0, "mknod: {}", std::io::Error::last_os_error());
        std::os::unix::fs::chown(&node, Some(uid), Some(uid)).expect("chown the node");
        Self { dir }
    }

    fn path(&self) -> std::path::PathBuf {
        self.dir.path().join("kvm")
    }
}

/// `program args...` as `uid` (and its group, no supplementary groups), with `node` as its
/// `/dev/kvm`. The process keeps its pid through the chain of execs.
pub fn command_as(uid: u32, node: &KvmNode, program: &Path) -> Command {
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount --bind \"$ISM_KVM_NODE\" /dev/kvm && exec setpriv --reuid={uid} --regid={uid} \
             --clear-groups -- \"$0\" \"$@\""
        ))
        .arg(program)
        .env("ISM_KVM_NODE", node.path());
    command
}

/// Run `program args` as `uid`; returns whether it succeeded, and its stderr.
pub fn run_as(uid: u32, program: &str, args: &[String]) -> (bool, String) {
    let output = Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
            "--".into(),
            program.into(),
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run setpriv {program}: {e}"));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
