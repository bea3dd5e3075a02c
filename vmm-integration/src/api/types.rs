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

pub use virtio_ism_api::types::*;

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
