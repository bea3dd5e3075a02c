// SPDX-License-Identifier: Apache-2.0
//! The ism endpoints over a VM's devices: each request checked, run on the device it names,
//! and answered with a reply or an [`IsmApiError`] that knows its HTTP status.

use std::sync::Arc;

use crate::error::{ControlError, IsmApiError};
use crate::types::{
    AddRegion, GrantPerm, IsmAddRegionRequest, IsmGrant, IsmRegionInfo, IsmRegions,
    IsmRemoveRegionRequest, RegionAccess, RegionArea,
};

/// What the API needs from an ism device: region hotplug and the pool's view. Implemented
/// over `virtio_ism::IsmHandle` ([`crate::HandleControl`]), and by fakes in tests. Every
/// failure is a [`ControlError`] that says who refused (device, pool) or that the pool
/// cannot be reached; [`IsmApiError::status_code`] turns it into an HTTP status.
pub trait IsmControl: Send + Sync {
    /// Attach `token` for the guest with `access`; returns the mapped areas.
    fn add_region(&self, token: u64, access: RegionAccess)
    -> Result<Vec<RegionArea>, ControlError>;
    /// Create a region of `size` bytes in the device's pool, attach it for the guest and
    /// grant `grants` (peer devid, permission) and `default` to the rest; returns its token
    /// and mapped areas. On failure nothing is left allocated.
    fn create_region(
        &self,
        size: u64,
        grants: &[IsmGrant],
        default: GrantPerm,
    ) -> Result<(u64, Vec<RegionArea>), ControlError>;
    /// The device's id in its pool (its devid).
    fn devid(&self) -> u64;
    /// Revoke `token` from the guest; false if the device did not hold it.
    fn remove_region(&self, token: u64) -> bool;
    /// Tokens the device holds.
    fn regions(&self) -> Vec<u64>;
    /// The pool's status as JSON (`ism_pool::PoolStatus`).
    fn pool_status(&self) -> Result<serde_json::Value, ControlError>;
    /// Park the device's worker: it writes nothing into guest memory until
    /// [`IsmControl::resume`] (`vm.pause`).
    fn pause(&self) -> Result<(), ControlError>;
    /// Undo [`IsmControl::pause`].
    fn resume(&self);
}

/// An ism device as the API sees it.
#[derive(Clone)]
pub struct IsmEntry {
    pub id: String,
    pub control: Arc<dyn IsmControl>,
}

/// Where the API reports what it did to regions (the VMM's event monitor, source "ism"):
/// an event name and its properties.
pub type EventSink<'a> = &'a dyn Fn(&'static str, Vec<(&'static str, String)>);

/// A VM's ism devices, in the order they were created.
#[derive(Clone, Default)]
pub struct IsmDevices(pub Vec<IsmEntry>);

impl IsmDevices {
    fn get(&self, id: &str) -> Result<&IsmEntry, IsmApiError> {
        self.0
            .iter()
            .find(|e| e.id == id)
            .ok_or_else(|| IsmApiError::UnknownDeviceId(id.to_owned()))
    }

    /// The tokens device `id` holds, if it is an ism device (for `vm.info`).
    pub fn regions_of(&self, id: &str) -> Option<Vec<u64>> {
        self.get(id).ok().map(|e| e.control.regions())
    }

    /// `vm.ism-add-region`.
    pub fn add_region(
        &self,
        req: IsmAddRegionRequest,
        events: EventSink<'_>,
    ) -> Result<IsmRegionInfo, IsmApiError> {
        // The router checked the body already; a request built elsewhere is checked here.
        let kind = req
            .kind()
            .map_err(|e| IsmApiError::InvalidRequest(req.id.clone(), e))?;
        let entry = self.get(&req.id)?;
        let id = || ("id", req.id.clone());
        let api = || ("origin", "api".to_owned());
        let (token, areas) = match kind {
            AddRegion::Attach { token, access } => {
                if entry.control.regions().contains(&token) {
                    return Err(IsmApiError::RegionExists(req.id, token));
                }
                let areas = entry.control.add_region(token, access).map_err(|source| {
                    IsmApiError::Attach {
                        id: req.id.clone(),
                        token,
                        source,
                    }
                })?;
                events(
                    "region-attached",
                    vec![id(), ("token", token.to_string()), api()],
                );
                (token, areas)
            }
            AddRegion::Create {
                size,
                grants,
                default_perm,
            } => {
                check_peers(&req.id, entry, &grants)?;
                let (token, areas) = entry
                    .control
                    .create_region(size, &grants, default_perm)
                    .map_err(|source| IsmApiError::Create {
                        id: req.id.clone(),
                        size,
                        source,
                    })?;
                events(
                    "region-allocated",
                    vec![
                        id(),
                        ("token", token.to_string()),
                        ("size", size.to_string()),
                        api(),
                    ],
                );
                for grant in &grants {
                    events(
                        "region-granted",
                        vec![
                            id(),
                            ("token", token.to_string()),
                            ("peer", grant.peer.to_string()),
                            ("perm", grant.perm.name().to_owned()),
                            api(),
                        ],
                    );
                }
                (token, areas)
            }
        };
        Ok(IsmRegionInfo {
            id: req.id,
            token,
            areas,
        })
    }

    /// `vm.ism-remove-region`.
    pub fn remove_region(
        &self,
        req: IsmRemoveRegionRequest,
        events: EventSink<'_>,
    ) -> Result<(), IsmApiError> {
        let entry = self.get(&req.id)?;
        if !entry.control.remove_region(req.token) {
            return Err(IsmApiError::UnknownRegion(req.id, req.token));
        }
        events(
            "region-revoked",
            vec![("id", req.id), ("token", req.token.to_string())],
        );
        Ok(())
    }

    /// `vm.ism-regions`.
    pub fn regions(&self) -> IsmRegions {
        self.0
            .iter()
            .map(|e| (e.id.clone(), e.control.regions()))
            .collect()
    }

    /// Pause every device (`vm.pause`, after the vCPUs); on a failure the ones paused
    /// already are resumed.
    pub fn pause_all(&self) -> Result<(), IsmApiError> {
        for (n, e) in self.0.iter().enumerate() {
            if let Err(source) = e.control.pause() {
                self.0[..n].iter().for_each(|e| e.control.resume());
                return Err(IsmApiError::Pause {
                    id: e.id.clone(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Resume every device (`vm.resume`, before the vCPUs).
    pub fn resume_all(&self) {
        self.0.iter().for_each(|e| e.control.resume());
    }

    /// `vm.ism-pool-status`: device id -> its pool's status.
    pub fn pool_status(&self) -> Result<serde_json::Value, IsmApiError> {
        let mut out = serde_json::Map::new();
        for e in &self.0 {
            let status = e
                .control
                .pool_status()
                .map_err(|source| IsmApiError::PoolStatus {
                    id: e.id.clone(),
                    source,
                })?;
            out.insert(e.id.clone(), status);
        }
        Ok(serde_json::Value::Object(out))
    }
}

/// Every granted peer must be another device of the pool `entry` uses (the pool's own
/// status lists them), so a typo is a 400 before anything is allocated.
fn check_peers(id: &str, entry: &IsmEntry, grants: &[IsmGrant]) -> Result<(), IsmApiError> {
    if grants.is_empty() {
        return Ok(());
    }
    let own = entry.control.devid();
    if let Some(g) = grants.iter().find(|g| g.peer == own) {
        return Err(IsmApiError::SelfPeer(id.to_owned(), g.peer));
    }
    let status = entry
        .control
        .pool_status()
        .map_err(|source| IsmApiError::PoolStatus {
            id: id.to_owned(),
            source,
        })?;
    let known: Vec<u64> = status["sessions"]
        .as_array()
        .map(|sessions| {
            sessions
                .iter()
                .filter_map(|s| s["devid"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    match grants.iter().find(|g| !known.contains(&g.peer)) {
        Some(g) => Err(IsmApiError::UnknownPeer(id.to_owned(), g.peer)),
        None => Ok(()),
    }
}
