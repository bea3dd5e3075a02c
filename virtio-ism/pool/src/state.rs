// SPDX-License-Identifier: Apache-2.0
//! The broker's state file: what a restarted broker needs to know the pool as it was.
//!
//! It holds the pool's identity (gid) and configuration, the next devid, every device
//! session (devid and resume key) and every region (token, size, the identity of its memfd,
//! owner, grants, holders). It never holds region memory: the VMMs hand their memfds back
//! when they reconnect (see docs/pool.md, "Failure model"). It is rewritten (write to a
//! temporary file, then rename) before the broker answers any request that changed it, so a
//! client never holds something the file does not know.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::PoolConfig;
use crate::memory::FileIdentity;

/// Version of the file layout.
pub const STATE_FORMAT: u32 = 1;

/// One device session as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub devid: u64,
    /// The secret a reconnecting VMM proves the session is its own with.
    pub key: u64,
    /// Tokens it holds.
    pub held: Vec<u64>,
}

/// One region as recorded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRecord {
    pub token: u64,
    pub size: u64,
    /// The memfd the pool made for it: a re-registered descriptor must be this file.
    pub file: FileIdentity,
    pub owner: u64,
    pub default_perms: u64,
    /// Per-device grants, (devid, perms).
    pub grants: Vec<(u64, u64)>,
    pub holders: Vec<u64>,
}

/// The configuration part.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRecord {
    pub size: u64,
    pub per_vm_limit: Option<u64>,
    pub per_vm_regions: Option<u64>,
    pub hugepages: bool,
}

impl ConfigRecord {
    pub fn of(config: &PoolConfig) -> Self {
        ConfigRecord {
            size: config.size,
            per_vm_limit: config.per_vm_limit,
            per_vm_regions: config.per_vm_regions,
            hugepages: config.hugepages,
        }
    }
}

/// Everything in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSnapshot {
    pub format: u32,
    pub gid: u64,
    pub config: ConfigRecord,
    /// The next devid to give out: devids are never reused, across restarts too.
    pub next_devid: u64,
    pub sessions: Vec<SessionRecord>,
    pub regions: Vec<RegionRecord>,
}

/// Failures reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("Failed to read the state file {0}")]
    Read(PathBuf, #[source] io::Error),
    #[error("The state file {0} is not valid")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("The state file {0} has format {1}; this broker reads format {STATE_FORMAT}")]
    Format(PathBuf, u32),
    #[error("Failed to write the state file {0}")]
    Write(PathBuf, #[source] io::Error),
}

/// The state file of one broker. Writes are serialised, so the last one on disk is the
/// newest snapshot.
#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
    lock: Mutex<()>,
}

impl StateFile {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StateFile {
            path: path.into(),
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The recorded snapshot, or None if there is no file yet.
    pub fn load(&self) -> Result<Option<PoolSnapshot>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateError::Read(self.path.clone(), e)),
        };
        let snapshot: PoolSnapshot =
            serde_json::from_slice(&bytes).map_err(|e| StateError::Parse(self.path.clone(), e))?;
        if snapshot.format != STATE_FORMAT {
            return Err(StateError::Format(self.path.clone(), snapshot.format));
        }
        Ok(Some(snapshot))
    }

    /// Writes the snapshot `take` makes, atomically (temporary file mode 0600, then rename).
    /// `take` runs under the file's lock, so concurrent savers cannot put an older snapshot
    /// over a newer one. No fsync: the file must survive the broker's death, not the host's
    /// (a host crash takes the VMMs and their regions with it).
    pub fn save(&self, take: impl FnOnce() -> PoolSnapshot) -> Result<(), StateError> {
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let snapshot = take();
        let json = serde_json::to_vec(&snapshot)
            .map_err(|e| StateError::Write(self.path.clone(), io::Error::other(e.to_string())))?;
        let mut tmp = self.path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let write = || -> io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(&json)?;
            drop(file);
            std::fs::rename(&tmp, &self.path)
        };
        write().map_err(|e| StateError::Write(self.path.clone(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn test_state_file_round_trips_and_is_private() {
        let dir = std::env::temp_dir().join(format!("ism-pool-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = StateFile::new(dir.join("pool.state"));
        assert!(file.load().unwrap().is_none());
        let snapshot = PoolSnapshot {
            format: STATE_FORMAT,
            gid: 7,
            config: ConfigRecord {
                size: 1 << 20,
                per_vm_limit: Some(4096),
                per_vm_regions: Some(3),
                hugepages: false,
            },
            next_devid: 5,
            sessions: vec![SessionRecord {
                devid: 1,
                key: 99,
                held: vec![42],
            }],
            regions: vec![RegionRecord {
                token: 42,
                size: 4096,
                file: FileIdentity { dev: 1, ino: 2 },
                owner: 1,
                default_perms: 5,
                grants: vec![(2, 7)],
                holders: vec![1],
            }],
        };
        file.save(|| snapshot.clone()).unwrap();
        assert_eq!(file.load().unwrap(), Some(snapshot));
        let mode = std::fs::metadata(file.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(file.path(), b"{").unwrap();
        assert!(matches!(file.load(), Err(StateError::Parse(..))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
