// SPDX-License-Identifier: Apache-2.0
//! How the benchmarks name a binary in the docs they write: its path without this machine's
//! prefixes, and its version.

use std::path::Path;
use std::process::{Command, Stdio};

/// First line of `binary --version`, or "version unknown".
pub fn version(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "version unknown".into())
}

/// `path` relative to the workspace when it is inside it (`target/release/ism-vmm`), else its
/// last two components (a cloud-hypervisor build in the cache: `bin-<key>/cloud-hypervisor`).
pub fn shown_path(path: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap_or(root);
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if let Ok(inside) = path.strip_prefix(&root) {
        return inside.display().to_string();
    }
    let mut tail: Vec<String> = path
        .components()
        .rev()
        .take(2)
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    tail.reverse();
    tail.join("/")
}
