// SPDX-License-Identifier: Apache-2.0
//! Request and reply bodies of the ism endpoints (`vm.ism-add-region`, `vm.ism-remove-region`,
//! `vm.ism-regions`). Requests deny unknown fields, so a typo is a 400, not a silently ignored
//! key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Access a region is attached with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionAccess {
    /// Whatever the pool grants this device.
    #[default]
    Granted,
    Read,
    #[serde(rename = "rw")]
    ReadWrite,
}

/// Permission given to other devices on a region the host created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantPerm {
    /// No access (only meaningful as the default).
    None,
    /// Attach and read.
    Ro,
    /// Attach, read and write.
    Rw,
}

impl GrantPerm {
    /// As the API and the event monitor spell it.
    pub fn name(self) -> &'static str {
        match self {
            GrantPerm::None => "none",
            GrantPerm::Ro => "ro",
            GrantPerm::Rw => "rw",
        }
    }
}

/// One per-device grant of `vm.ism-add-region` with `size`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsmGrant {
    /// The peer device as the pool names it (its devid, as in `vm.ism-pool-status`).
    pub peer: u64,
    pub perm: GrantPerm,
}

/// `PUT vm.ism-add-region`, on the device `id`, one of:
/// - `token`: attach an existing pool region on the host's behalf, with `access`;
/// - `size`: create a region of that many bytes in the device's pool, attach it, and grant
///   `grants` (per peer) and `default_perm` (everyone else).
///
/// Either way the guest gets a REGION_ADDED event.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsmAddRegionRequest {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access: Option<RegionAccess>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<IsmGrant>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_perm: Option<GrantPerm>,
}

/// Page size region sizes are counted in (the pool's granule).
pub const REGION_SIZE_ALIGN: u64 = 4096;

/// What an add-region request asks for, once checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AddRegion {
    Attach {
        token: u64,
        access: RegionAccess,
    },
    Create {
        size: u64,
        grants: Vec<IsmGrant>,
        default_perm: GrantPerm,
    },
}

impl IsmAddRegionRequest {
    /// The request's meaning, or why its fields do not go together.
    pub fn kind(&self) -> Result<AddRegion, String> {
        match (self.token, self.size) {
            (Some(_), Some(_)) => {
                Err("give either token (attach) or size (create), not both".into())
            }
            (None, None) => {
                Err("give token (attach an existing region) or size (create one)".into())
            }
            (Some(token), None) => {
                if !self.grants.is_empty() || self.default_perm.is_some() {
                    return Err(
                        "grants and default_perm only go with size (a region created here)".into(),
                    );
                }
                Ok(AddRegion::Attach {
                    token,
                    access: self.access.unwrap_or_default(),
                })
            }
            (None, Some(size)) => {
                if self.access.is_some() {
                    return Err(
                        "access only goes with token (a created region is read-write)".into(),
                    );
                }
                if size == 0 || !size.is_multiple_of(REGION_SIZE_ALIGN) {
                    return Err(format!(
                        "size {size} is not a non-zero multiple of {REGION_SIZE_ALIGN}"
                    ));
                }
                let mut peers: Vec<u64> = self.grants.iter().map(|g| g.peer).collect();
                peers.sort_unstable();
                if let Some(w) = peers.windows(2).find(|w| w[0] == w[1]) {
                    return Err(format!("peer {} is granted twice", w[0]));
                }
                if let Some(g) = self.grants.iter().find(|g| g.peer == 0) {
                    return Err(format!(
                        "peer {} is not a device id (ids start at 1)",
                        g.peer
                    ));
                }
                Ok(AddRegion::Create {
                    size,
                    grants: self.grants.clone(),
                    default_perm: self.default_perm.unwrap_or(GrantPerm::None),
                })
            }
        }
    }
}

/// One mapped piece of a region in the device's shared-memory window.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionArea {
    pub offset: u64,
    pub size: u64,
}

/// Reply to `vm.ism-add-region`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsmRegionInfo {
    pub id: String,
    pub token: u64,
    pub areas: Vec<RegionArea>,
}

/// `PUT vm.ism-remove-region`: revoke region `token` from device `id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IsmRemoveRegionRequest {
    pub id: String,
    pub token: u64,
}

/// `GET vm.ism-regions`: ism device id -> tokens it holds.
pub type IsmRegions = BTreeMap<String, Vec<u64>>;
