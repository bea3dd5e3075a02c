// SPDX-License-Identifier: Apache-2.0
//! The pool's status report: regions, their holders and grants, and quota use per VM.

use std::fmt;

use serde::{Deserialize, Serialize};

/// First broker protocol version whose status report carries `per_vm_regions` and the
/// sessions' `uid`, `vm`, `vm_regions` and `read_only_enforced` (`ism_pool::wire` speaks it
/// as its `LIMITS_VERSION`).
pub const LIMITS_VERSION: u16 = 3;
/// First broker protocol version whose status report carries `waiting_sessions` and
/// `waiting_regions` (what a restarted broker still waits for).
pub const RESUME_VERSION: u16 = 4;

/// A snapshot of the whole pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolStatus {
    /// Protocol version the broker speaks (0 for an in-process pool).
    pub protocol_version: u16,
    /// Group id of the pool (every session's `gid`).
    pub gid: u64,
    /// Pool size in bytes.
    pub size: u64,
    /// Bytes of live regions.
    pub used: u64,
    /// Bytes one VM may hold, if limited.
    pub per_vm_limit: Option<u64>,
    /// Regions one VM may hold (protocol version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_vm_regions: Option<u64>,
    /// Whether regions are backed by huge pages.
    pub hugepages: bool,
    /// Every open session.
    pub sessions: Vec<SessionStatus>,
    /// Every live region.
    pub regions: Vec<RegionStatus>,
    /// After a broker restart: devids of the recorded sessions that have not resumed yet
    /// (protocol version 4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_sessions: Vec<u64>,
    /// After a broker restart: tokens of the recorded regions no holder has handed back yet
    /// (protocol version 4).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_regions: Vec<u64>,
}

/// One open session (one virtio-ism device).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionStatus {
    /// The session's device id.
    pub devid: u64,
    /// Process id of the VMM behind a broker connection, if known.
    pub pid: Option<u32>,
    /// Bytes charged to this session's VM (shared by every session of the same VMM process).
    pub vm_used: u64,
    /// Tokens of the regions this session holds.
    pub held: Vec<u64>,
    /// The fields below are reported from protocol version 3 on.
    /// User id of the VMM behind a broker connection, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The VM this session is charged to ("uid 107 cgroup /machine.slice/vm1.service",
    /// "pid 4242", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    /// Regions charged to this session's VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_regions: Option<u64>,
    /// Whether the kernel enforces this session's read-only leases: false when the VMM runs
    /// as root or as the broker's uid (or holds CAP_DAC_OVERRIDE or CAP_FOWNER), which can
    /// reopen a read-only lease read-write; unknown for in-process sessions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_enforced: Option<bool>,
}

impl PoolStatus {
    /// The report as a client of broker protocol `version` understands it: clients older
    /// than [`LIMITS_VERSION`] refuse fields they do not know, so those are left out for
    /// them.
    pub fn for_version(mut self, version: u16) -> Self {
        if version < RESUME_VERSION {
            self.waiting_sessions.clear();
            self.waiting_regions.clear();
        }
        if version < LIMITS_VERSION {
            self.per_vm_regions = None;
            for session in &mut self.sessions {
                session.uid = None;
                session.vm = None;
                session.vm_regions = None;
                session.read_only_enforced = None;
            }
        }
        self
    }
}

/// One live region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionStatus {
    /// The region's token.
    pub token: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Devid of the session that allocated it.
    pub owner: u64,
    /// Default permission bits.
    pub default_perms: u64,
    /// Per-device grants as (devid, permission bits).
    pub grants: Vec<(u64, u64)>,
    /// Devids of its holders.
    pub holders: Vec<u64>,
    /// Devids of the holders that published a doorbell (protocol version 2).
    #[serde(default)]
    pub doorbells: Vec<u64>,
}

fn perms_text(bits: u64) -> String {
    let names = [(1, "R"), (2, "W"), (4, "A"), (8, "M")];
    let text: String = names
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if text.is_empty() {
        "-".to_string()
    } else {
        text
    }
}

fn bytes_text(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    for (unit, suffix) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    format!("{bytes}")
}

impl fmt::Display for PoolStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "pool gid {:#018x}: {} of {} used, per-VM limit {} in {} regions, {}",
            self.gid,
            bytes_text(self.used),
            bytes_text(self.size),
            self.per_vm_limit.map_or("none".to_string(), bytes_text),
            self.per_vm_regions
                .map_or("any number of".to_string(), |n| n.to_string()),
            if self.hugepages {
                "huge pages"
            } else {
                "4K pages"
            }
        )?;
        writeln!(f, "sessions: {}", self.sessions.len())?;
        for session in &self.sessions {
            let held: Vec<String> = session.held.iter().map(|t| format!("{t:#018x}")).collect();
            let read_only = match session.read_only_enforced {
                Some(true) => "enforced",
                Some(false) => "ADVISORY",
                None => "-",
            };
            writeln!(
                f,
                "  devid {:<5} pid {:<8} uid {:<6} vm uses {:<6} in {:<4} regions, read-only {:<8} vm [{}] holds [{}]",
                session.devid,
                session.pid.map_or("-".to_string(), |p| p.to_string()),
                session.uid.map_or("-".to_string(), |u| u.to_string()),
                bytes_text(session.vm_used),
                session
                    .vm_regions
                    .map_or("-".to_string(), |n| n.to_string()),
                read_only,
                session.vm.as_deref().unwrap_or("-"),
                held.join(", ")
            )?;
        }
        if !self.waiting_sessions.is_empty() || !self.waiting_regions.is_empty() {
            let regions: Vec<String> = self
                .waiting_regions
                .iter()
                .map(|t| format!("{t:#018x}"))
                .collect();
            writeln!(
                f,
                "waiting to resume after a restart: devids {:?}, regions [{}]",
                self.waiting_sessions,
                regions.join(", ")
            )?;
        }
        writeln!(f, "regions: {}", self.regions.len())?;
        for region in &self.regions {
            let holders: Vec<String> = region.holders.iter().map(|d| d.to_string()).collect();
            let grants: Vec<String> = region
                .grants
                .iter()
                .map(|(devid, perms)| format!("{devid}:{}", perms_text(*perms)))
                .collect();
            writeln!(
                f,
                "  {:#018x} {:<6} owner {:<5} default {:<4} grants [{}] holders [{}]",
                region.token,
                bytes_text(region.size),
                region.owner,
                perms_text(region.default_perms),
                grants.join(", "),
                holders.join(", ")
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> PoolStatus {
        PoolStatus {
            protocol_version: LIMITS_VERSION,
            gid: 1,
            size: 1 << 30,
            used: 1 << 20,
            per_vm_limit: Some(1 << 28),
            per_vm_regions: Some(64),
            hugepages: false,
            sessions: vec![SessionStatus {
                devid: 3,
                pid: Some(42),
                vm_used: 1 << 20,
                held: vec![9],
                uid: Some(107),
                vm: Some("pid 42".into()),
                vm_regions: Some(1),
                read_only_enforced: Some(true),
            }],
            regions: vec![RegionStatus {
                token: 9,
                size: 1 << 20,
                owner: 3,
                default_perms: 5,
                grants: vec![(4, 1)],
                holders: vec![3],
                doorbells: vec![],
            }],
            waiting_sessions: vec![5],
            waiting_regions: vec![11],
        }
    }

    #[test]
    fn test_older_clients_get_no_fields_they_would_refuse() {
        let old = status().for_version(LIMITS_VERSION - 1);
        assert_eq!(old.per_vm_regions, None);
        let session = &old.sessions[0];
        assert_eq!(
            (session.uid, &session.vm, session.vm_regions),
            (None, &None, None)
        );
        assert_eq!(session.read_only_enforced, None);
        let json = serde_json::to_value(&old).unwrap();
        assert!(json.get("per_vm_regions").is_none(), "{json}");
        assert!(json["sessions"][0].get("uid").is_none(), "{json}");
        assert!(json.get("waiting_sessions").is_none(), "{json}");
        let v3 = status().for_version(LIMITS_VERSION);
        assert!(v3.waiting_sessions.is_empty() && v3.waiting_regions.is_empty());
        assert_eq!(v3.per_vm_regions, Some(64));
        // A current client gets everything.
        assert_eq!(status().for_version(RESUME_VERSION), status());
    }

    #[test]
    fn test_display_names_sizes_and_permissions() {
        let text = status().to_string();
        assert!(
            text.contains("1M of 1G used, per-VM limit 256M in 64 regions"),
            "{text}"
        );
        assert!(text.contains("default RA"), "{text}");
        assert!(text.contains("grants [4:R]"), "{text}");
        assert!(text.contains("read-only enforced"), "{text}");
        assert!(
            text.contains(
                "waiting to resume after a restart: devids [5], regions [0x000000000000000b]"
            ),
            "{text}"
        );
    }
}
