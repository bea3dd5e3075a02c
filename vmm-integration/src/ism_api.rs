// SPDX-License-Identifier: Apache-2.0
//! The REST API's view of a virtio-ism device: [`IsmControl`] over `virtio_ism::IsmHandle`,
//! with the pool status from the device's pool (the broker's status query).

use std::path::PathBuf;

use ism_pool::session::{Perms, Token};
use virtio_ism::IsmHandle;

use crate::api::types::{RegionAccess, RegionArea};
use crate::config::IsmDeviceConfig;
use crate::control::{IsmControl, IsmEntry};

/// One `--ism` device for the API.
pub struct IsmApiControl {
    handle: IsmHandle,
    /// The broker socket; `None` for the embedded pool.
    broker: Option<PathBuf>,
}

impl IsmControl for IsmApiControl {
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

    fn remove_region(&self, token: u64) -> bool {
        self.handle.remove_region(Token(token))
    }

    fn regions(&self) -> Vec<u64> {
        self.handle.regions().into_iter().map(|t| t.0).collect()
    }

    fn pool_status(&self) -> Result<serde_json::Value, String> {
        let Some(path) = &self.broker else {
            return Err("the embedded pool has no status query through the API yet".into());
        };
        let status = ism_pool::client::query_status(path).map_err(|e| e.to_string())?;
        serde_json::to_value(status).map_err(|e| e.to_string())
    }
}

/// API entries for the handles `add_ism_devices` returned, with their configs' pools.
pub fn ism_entries(
    handles: Vec<(String, IsmHandle)>,
    configs: &[IsmDeviceConfig],
) -> Vec<IsmEntry> {
    handles
        .into_iter()
        .enumerate()
        .map(|(i, (id, handle))| {
            let broker = configs.get(i).and_then(|c| c.pool.clone());
            IsmEntry {
                id,
                control: std::sync::Arc::new(IsmApiControl { handle, broker }),
            }
        })
        .collect()
}
