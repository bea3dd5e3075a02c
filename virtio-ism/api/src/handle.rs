// SPDX-License-Identifier: Apache-2.0
//! [`IsmControl`] on a real device: region hotplug through `virtio_ism::IsmHandle`, the pool's
//! status from the broker or the embedded pool.

use std::path::PathBuf;

use ism_pool::session::{DevId, GrantTarget, Perms, Token};
use virtio_ism::IsmHandle;

use crate::service::IsmControl;
use crate::types::{GrantPerm, IsmGrant, RegionAccess, RegionArea};

/// [`IsmControl`] over a device's [`IsmHandle`], with the pool status from the device's pool
/// (the broker's status query, or the embedded pool's own state).
pub struct HandleControl {
    pub handle: IsmHandle,
    /// The broker socket; `None` for the embedded pool.
    pub broker: Option<PathBuf>,
}

impl IsmControl for HandleControl {
    fn add_region(&self, token: u64, access: RegionAccess) -> Result<Vec<RegionArea>, String> {
        let want = match access {
            RegionAccess::Granted => Perms::NONE,
            RegionAccess::Read => Perms::READ,
            RegionAccess::ReadWrite => Perms(Perms::READ.0 | Perms::WRITE.0),
        };
        let areas = self
            .handle
            .add_region(Token(token), want)
            .map_err(|e| e.to_string())?;
        Ok(areas
            .iter()
            .map(|a| RegionArea {
                offset: a.offset,
                size: a.size,
            })
            .collect())
    }

    fn create_region(
        &self,
        size: u64,
        grants: &[IsmGrant],
        default: GrantPerm,
    ) -> Result<(u64, Vec<RegionArea>), String> {
        let mut pool_grants: Vec<(GrantTarget, Perms)> = grants
            .iter()
            .map(|g| (GrantTarget::Device(DevId(g.peer)), grant_perms(g.perm)))
            .collect();
        // A new region's default is no access; only a wider one needs a grant.
        if default != GrantPerm::None {
            pool_grants.push((GrantTarget::Default, grant_perms(default)));
        }
        let (token, areas) = self
            .handle
            .create_region(size, &pool_grants)
            .map_err(|e| error_chain(&e))?;
        Ok((
            token.0,
            areas
                .iter()
                .map(|a| RegionArea {
                    offset: a.offset,
                    size: a.size,
                })
                .collect(),
        ))
    }

    fn devid(&self) -> u64 {
        self.handle.devid()
    }

    fn remove_region(&self, token: u64) -> bool {
        self.handle.remove_region(Token(token))
    }

    fn regions(&self) -> Vec<u64> {
        self.handle.regions().into_iter().map(|t| t.0).collect()
    }

    fn pool_status(&self) -> Result<serde_json::Value, String> {
        let status = match &self.broker {
            Some(path) => ism_pool::client::query_status(path).map_err(|e| e.to_string())?,
            None => self
                .handle
                .pool_status()
                .ok_or("the device's pool session reports no status")?,
        };
        serde_json::to_value(status).map_err(|e| e.to_string())
    }

    fn pause(&self) -> Result<(), String> {
        self.handle.pause().map_err(|e| e.to_string())
    }

    fn resume(&self) {
        self.handle.resume();
    }
}

/// The pool permissions a grant of the API means: a peer that may read or write may also
/// attach.
fn grant_perms(perm: GrantPerm) -> Perms {
    match perm {
        GrantPerm::None => Perms::NONE,
        GrantPerm::Ro => Perms::ATTACH.union(Perms::READ),
        GrantPerm::Rw => Perms::ATTACH.union(Perms::READ).union(Perms::WRITE),
    }
}

/// An error and its causes, "outer: inner: ...".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
