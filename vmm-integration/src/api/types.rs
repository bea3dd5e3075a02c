// SPDX-License-Identifier: Apache-2.0
//! Request and response bodies of the REST API, shared by the server and `ism-remote`
//! (which includes this file). Requests deny unknown fields, so a typo is a 400, not a
//! silently ignored key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Every endpoint: name under `/api/v1/`, method, and whether it takes a JSON body.
pub const ROUTES: &[Route] = &[
    Route::get("vmm.ping"),
    Route::get("vm.info"),
    Route::get("vm.counters"),
    Route::put("vm.shutdown", false),
    Route::put("vm.reboot", false),
    Route::put("vm.pause", false),
    Route::put("vm.resume", false),
    Route::put("vm.ism-add-region", true),
    Route::put("vm.ism-remove-region", true),
    Route::get("vm.ism-regions"),
    Route::get("vm.ism-pool-status"),
];

/// The path prefix of every route.
pub const API_PREFIX: &str = "/api/v1/";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    pub name: &'static str,
    pub method: Method,
    pub body: bool,
}

impl Route {
    const fn get(name: &'static str) -> Self {
        Self {
            name,
            method: Method::Get,
            body: false,
        }
    }
    const fn put(name: &'static str, body: bool) -> Self {
        Self {
            name,
            method: Method::Put,
            body,
        }
    }
}

/// `GET vmm.ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmPingResponse {
    pub build_version: String,
    pub version: String,
    pub pid: i64,
    pub features: Vec<String>,
}

/// One PCI device of `vm.info`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceInfo {
    pub id: String,
    /// "0000:00:01.0"
    pub bdf: String,
    /// Tokens of the regions an ism device holds (absent for other devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ism_regions: Option<Vec<u64>>,
}

/// `GET vm.info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmInfoResponse {
    /// The VM's configuration, as the command line gave it.
    pub config: serde_json::Value,
    /// "Running" or "Paused".
    pub state: String,
    pub memory_actual_size: u64,
    pub devices: Vec<DeviceInfo>,
}

/// `GET vm.counters`: device id -> counter name -> value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

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

/// What a request asks the VMM to do (the router's output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiAction {
    VmmPing,
    VmInfo,
    VmCounters,
    VmShutdown,
    VmReboot,
    VmPause,
    VmResume,
    IsmAddRegion(IsmAddRegionRequest),
    IsmRemoveRegion(IsmRemoveRegionRequest),
    IsmRegions,
    IsmPoolStatus,
}
