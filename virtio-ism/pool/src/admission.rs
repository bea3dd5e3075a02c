// SPDX-License-Identifier: Apache-2.0
//! Who may take the broker's connection slots, and which VM a peer's sessions are charged
//! to: everything the broker learns about a peer from SO_PEERCRED and `/proc/<pid>`.
//!
//! - **Trusted** peers (root, the broker's uid) may query status and revoke.
//! - **VMM** peers (trusted ones, `--vmm-uid` uids and `--vmm-group` members) are trusted
//!   for admission: they share slots reserved for them that no other uid can take.
//! - Every other uid gets a few slots of its own out of the unreserved ones.
//! - Every VM identity (see [`VmIdentity`]) gets at most [`ConnectionLimits::per_vm`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::local::VmKey;

/// Linux capability numbers (linux/capability.h) that defeat the read-only lease: with
/// either a holder can reopen its lease read-write or chmod the memfd.
const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_FOWNER: u32 = 3;

/// How the broker decides which sessions belong to one VM (one quota account).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VmIdentity {
    /// The peer's uid and its cgroup v2 path (`/proc/<pid>/cgroup`): systemd gives every
    /// VM unit a cgroup of its own, and forked children stay in it. Peers that are not
    /// VMMs are charged per uid instead, since a user with a delegated cgroup subtree can
    /// make as many cgroups as it likes.
    #[default]
    Cgroup,
    /// One VM per uid.
    Uid,
    /// One VM per process: forking multiplies it (the behaviour before admission control).
    Process,
}

impl std::str::FromStr for VmIdentity {
    type Err = AdmissionError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "cgroup" => Ok(VmIdentity::Cgroup),
            "uid" => Ok(VmIdentity::Uid),
            "process" => Ok(VmIdentity::Process),
            other => Err(AdmissionError::UnknownIdentity(other.to_string())),
        }
    }
}

/// Failures while configuring admission.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("Unknown VM identity {0:?} (use cgroup, uid or process)")]
    UnknownIdentity(String),
    #[error("Failed to read the group database")]
    ReadGroups(#[source] std::io::Error),
    #[error("No group named {0:?}")]
    NoSuchGroup(String),
    #[error("{reserved} reserved connections leave none of {max} for other uids; reserve fewer")]
    NothingUnreserved { max: usize, reserved: usize },
    #[error("Connection limits must be at least 1")]
    ZeroLimit,
}

/// Resolves a group given by name (from `/etc/group`) or as a number.
pub fn resolve_group(text: &str) -> Result<u32, AdmissionError> {
    if let Ok(gid) = text.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").map_err(AdmissionError::ReadGroups)?;
    groups
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let gid = fields.nth(1)?.parse().ok()?;
            (name == text).then_some(gid)
        })
        .next()
        .ok_or_else(|| AdmissionError::NoSuchGroup(text.to_string()))
}

/// How many connections whom may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once.
    pub max: usize,
    /// Of `max`, slots only VMM peers may take.
    pub reserved: usize,
    /// Connections one uid that is not a VMM uid may hold.
    pub per_other_uid: usize,
    /// Connections one VM identity may hold, so that one VMM cannot use up the slots of
    /// the others.
    pub per_vm: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max: 1024,
            reserved: 256,
            per_other_uid: 16,
            per_vm: 64,
        }
    }
}

impl ConnectionLimits {
    pub fn validate(&self) -> Result<(), AdmissionError> {
        if self.max == 0 || self.per_other_uid == 0 || self.per_vm == 0 {
            return Err(AdmissionError::ZeroLimit);
        }
        if self.reserved >= self.max {
            return Err(AdmissionError::NothingUnreserved {
                max: self.max,
                reserved: self.reserved,
            });
        }
        Ok(())
    }
}

/// Which uids are VMMs, and how VMs are told apart.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdmissionPolicy {
    /// Uids whose processes are VMMs (besides root and the broker's uid).
    pub vmm_uids: Vec<u32>,
    /// A group whose members are VMMs (primary or supplementary group of the process).
    pub vmm_gid: Option<u32>,
    pub identity: VmIdentity,
    pub limits: ConnectionLimits,
}

/// Who is on the other end of a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    /// May query status and revoke regions (root or the broker's own uid).
    pub trusted: bool,
    /// Trusted for admission: may use the reserved slots.
    pub vmm: bool,
    /// The account its device sessions are charged to; `None` = each session its own.
    pub vm: Option<VmKey>,
    /// The kernel enforces its read-only leases: it runs under a uid other than root and
    /// the broker's, without CAP_DAC_OVERRIDE or CAP_FOWNER.
    pub read_only_enforced: bool,
}

impl PeerInfo {
    /// What SO_PEERCRED and `/proc/<pid>` say about the process that connected.
    pub fn from_credentials(pid: u32, uid: u32, gid: u32, policy: &AdmissionPolicy) -> Self {
        let own_uid = rustix::process::geteuid().as_raw();
        let trusted = uid == 0 || uid == own_uid;
        let status = ProcStatus::read(pid);
        let vmm = trusted
            || policy.vmm_uids.contains(&uid)
            || policy
                .vmm_gid
                .is_some_and(|vmm_gid| gid == vmm_gid || status.groups.contains(&vmm_gid));
        let vm = match policy.identity {
            VmIdentity::Process => VmKey::Process(pid),
            VmIdentity::Uid => VmKey::Uid(uid),
            VmIdentity::Cgroup if !vmm => VmKey::Uid(uid),
            VmIdentity::Cgroup => match read_cgroup(pid) {
                Some(path) => VmKey::Cgroup { uid, path },
                None => {
                    log::warn!(
                        "No cgroup v2 path for pid {pid}; charging its sessions to uid {uid}"
                    );
                    VmKey::Uid(uid)
                }
            },
        };
        let bypasses_modes = status.cap_permitted.is_none_or(|caps| {
            caps & (1 << CAP_DAC_OVERRIDE) != 0 || caps & (1 << CAP_FOWNER) != 0
        });
        PeerInfo {
            pid: Some(pid),
            uid: Some(uid),
            trusted,
            vmm,
            vm: Some(vm),
            read_only_enforced: !trusted && !bypasses_modes,
        }
    }
}

/// The parts of `/proc/<pid>/status` admission needs.
#[derive(Default)]
struct ProcStatus {
    groups: Vec<u32>,
    /// `None` when unreadable (then treated as privileged).
    cap_permitted: Option<u64>,
}

impl ProcStatus {
    fn read(pid: u32) -> Self {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return ProcStatus::default();
        };
        let mut status = ProcStatus::default();
        for line in text.lines() {
            if let Some(groups) = line.strip_prefix("Groups:") {
                status.groups = groups
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect();
            } else if let Some(caps) = line.strip_prefix("CapPrm:") {
                status.cap_permitted = u64::from_str_radix(caps.trim(), 16).ok();
            }
        }
        status
    }
}

/// The cgroup v2 path of `pid` (the `0::` line of `/proc/<pid>/cgroup`).
fn read_cgroup(pid: u32) -> Option<Arc<str>> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(Arc::from)
}

/// Open connections: in total, of non-VMM peers, per non-VMM uid and per VM.
#[derive(Default)]
pub struct ConnectionCount {
    inner: Mutex<Counts>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    others: usize,
    per_uid: HashMap<u32, usize>,
    per_vm: HashMap<VmKey, usize>,
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: &K) {
    if let Some(open) = map.get_mut(key) {
        *open -= 1;
        if *open == 0 {
            map.remove(key);
        }
    }
}

/// One counted connection; dropping it gives the slot back.
pub struct ConnectionSlot {
    count: Arc<ConnectionCount>,
    other_uid: Option<u32>,
    other: bool,
    vm: Option<VmKey>,
}

impl ConnectionSlot {
    /// Takes a slot for `peer`, or says why there is none.
    pub fn take(
        count: &Arc<ConnectionCount>,
        peer: &PeerInfo,
        limits: &ConnectionLimits,
    ) -> Result<Self, String> {
        let mut counts = count.inner.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= limits.max {
            return Err("Too many connections".into());
        }
        let other = !peer.vmm;
        if other {
            let uid = peer.uid.unwrap_or(u32::MAX);
            if counts.per_uid.get(&uid).copied().unwrap_or(0) >= limits.per_other_uid {
                return Err(format!("Too many connections from uid {uid}"));
            }
            if counts.others >= limits.max - limits.reserved {
                return Err(
                    "Too many connections: the remaining slots are reserved for VMMs".into(),
                );
            }
        }
        if let Some(vm) = &peer.vm
            && counts.per_vm.get(vm).copied().unwrap_or(0) >= limits.per_vm
        {
            return Err(format!("Too many connections from this VM ({vm})"));
        }
        counts.total += 1;
        let other_uid = if other {
            counts.others += 1;
            let uid = peer.uid.unwrap_or(u32::MAX);
            *counts.per_uid.entry(uid).or_insert(0) += 1;
            Some(uid)
        } else {
            None
        };
        if let Some(vm) = &peer.vm {
            *counts.per_vm.entry(vm.clone()).or_insert(0) += 1;
        }
        Ok(ConnectionSlot {
            count: count.clone(),
            other_uid,
            other,
            vm: peer.vm.clone(),
        })
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.count.inner.lock().unwrap_or_else(|e| e.into_inner());
        counts.total -= 1;
        if self.other {
            counts.others -= 1;
        }
        if let Some(uid) = self.other_uid {
            decrement(&mut counts.per_uid, &uid);
        }
        if let Some(vm) = &self.vm {
            decrement(&mut counts.per_vm, vm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, vmm: bool, vm: u32) -> PeerInfo {
        PeerInfo {
            uid: Some(uid),
            vmm,
            vm: Some(VmKey::Process(vm)),
            ..PeerInfo::default()
        }
    }

    #[test]
    fn test_other_uids_never_take_reserved_slots() {
        let limits = ConnectionLimits {
            max: 6,
            reserved: 2,
            per_other_uid: 2,
            per_vm: 8,
        };
        let count = Arc::new(ConnectionCount::default());
        let mut slots = Vec::new();
        for uid in [1000, 1001] {
            for n in 0..2 {
                slots.push(
                    ConnectionSlot::take(&count, &peer(uid, false, uid * 10 + n), &limits).unwrap(),
                );
            }
            let refused = ConnectionSlot::take(&count, &peer(uid, false, 1), &limits);
            assert!(refused.is_err_and(|e| e.contains("from uid")));
        }
        let refused = ConnectionSlot::take(&count, &peer(1002, false, 7), &limits);
        assert!(refused.is_err_and(|e| e.contains("reserved")));
        for n in 0..2 {
            slots.push(ConnectionSlot::take(&count, &peer(107, true, n), &limits).unwrap());
        }
        assert!(ConnectionSlot::take(&count, &peer(0, true, 9), &limits).is_err());
        slots.truncate(3);
        ConnectionSlot::take(&count, &peer(1002, false, 7), &limits).unwrap();
    }

    #[test]
    fn test_one_vm_has_a_connection_cap() {
        let limits = ConnectionLimits {
            per_vm: 2,
            ..ConnectionLimits::default()
        };
        let count = Arc::new(ConnectionCount::default());
        let _a = ConnectionSlot::take(&count, &peer(0, true, 5), &limits).unwrap();
        let _b = ConnectionSlot::take(&count, &peer(0, true, 5), &limits).unwrap();
        assert!(
            ConnectionSlot::take(&count, &peer(0, true, 5), &limits)
                .is_err_and(|e| e.contains("this VM"))
        );
        ConnectionSlot::take(&count, &peer(0, true, 6), &limits).unwrap();
    }

    #[test]
    fn test_limits_must_leave_unreserved_slots() {
        let limits = ConnectionLimits {
            max: 4,
            reserved: 4,
            ..ConnectionLimits::default()
        };
        assert!(limits.validate().is_err());
        assert!(ConnectionLimits::default().validate().is_ok());
    }

    #[test]
    fn test_identities_parse_and_groups_resolve() {
        assert_eq!("cgroup".parse::<VmIdentity>().unwrap(), VmIdentity::Cgroup);
        assert_eq!("uid".parse::<VmIdentity>().unwrap(), VmIdentity::Uid);
        assert_eq!(
            "process".parse::<VmIdentity>().unwrap(),
            VmIdentity::Process
        );
        assert!("pid".parse::<VmIdentity>().is_err());
        assert_eq!(resolve_group("1234").unwrap(), 1234);
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert!(resolve_group("no-such-group-here").is_err());
    }

    #[test]
    fn test_own_process_is_trusted_and_has_a_cgroup() {
        let pid = std::process::id();
        let uid = rustix::process::getuid().as_raw();
        let gid = rustix::process::getgid().as_raw();
        let peer = PeerInfo::from_credentials(pid, uid, gid, &AdmissionPolicy::default());
        assert!(peer.trusted && peer.vmm);
        assert!(!peer.read_only_enforced);
        assert!(matches!(
            peer.vm,
            Some(VmKey::Cgroup { .. }) | Some(VmKey::Uid(_))
        ));
        let policy = AdmissionPolicy {
            identity: VmIdentity::Process,
            ..AdmissionPolicy::default()
        };
        let peer = PeerInfo::from_credentials(pid, uid, gid, &policy);
        assert_eq!(peer.vm, Some(VmKey::Process(pid)));
    }
}
