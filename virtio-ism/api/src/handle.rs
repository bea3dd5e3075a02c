// SPDX-License-Identifier: Apache-2.0
//! [`IsmControl`] on a real device: region hotplug through `virtio_ism::IsmHandle`, the pool's
//! status from the broker or the embedded pool.

use std::path::PathBuf;

use virtio_ism::{HandleError, IsmHandle};
use virtio_ism_pool_api::{DevId, GrantTarget, Perms, PoolError, Token};
use virtio_ism_proto::Status;

use crate::error::{ControlError, PoolRefusal, pool_unavailable};
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
    fn add_region(
        &self,
        token: u64,
        access: RegionAccess,
    ) -> Result<Vec<RegionArea>, ControlError> {
        let want = match access {
            RegionAccess::Granted => Perms::NONE,
            RegionAccess::Read => Perms::READ,
            RegionAccess::ReadWrite => Perms(Perms::READ.0 | Perms::WRITE.0),
        };
        let areas = self
            .handle
            .add_region(Token(token), want)
            .map_err(|e| self.classify(e))?;
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
    ) -> Result<(u64, Vec<RegionArea>), ControlError> {
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
            .map_err(|e| self.classify(e))?;
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

    fn pool_status(&self) -> Result<serde_json::Value, ControlError> {
        let status = match &self.broker {
            Some(path) => ism_pool::client::query_status(path).map_err(ControlError::from_pool)?,
            None => self.handle.pool_status().ok_or_else(|| {
                ControlError::internal("the device's pool session reports no status")
            })?,
        };
        serde_json::to_value(status).map_err(ControlError::internal)
    }

    fn pause(&self) -> Result<(), ControlError> {
        self.handle.pause().map_err(ControlError::internal)
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

/// An attach the device failed with a bare `Err` status while the pool's broker does not
/// answer either: the broker is the likely cause.
#[derive(Debug, thiserror::Error)]
#[error("{attach}, and the pool's broker does not answer")]
struct BrokerDown {
    attach: HandleError,
    #[source]
    probe: PoolError,
}

impl HandleControl {
    /// Who refused: the device, the pool (for a reason), or nobody because the pool is gone.
    fn classify(&self, error: HandleError) -> ControlError {
        let refused = |reason, error| ControlError::Pool {
            reason,
            source: Box::new(error),
        };
        match error {
            HandleError::NotActive | HandleError::NoRoom { .. } => ControlError::device(error),
            // These carry the pool's own error.
            HandleError::Alloc { .. } | HandleError::Grant { .. } => {
                ControlError::from_pool_cause(Box::new(error))
            }
            // The device only keeps the virtio-ism status of a failed attach (the pool's
            // error became that status), so the class comes from the status.
            HandleError::Attach { status, .. } => match status {
                Status::NoEnt | Status::PermAttach | Status::PermRead | Status::PermWrite => {
                    refused(PoolRefusal::Invalid, error)
                }
                Status::NoMem => refused(PoolRefusal::Capacity, error),
                Status::NoSpc => ControlError::device(error),
                // A bare Err is what a broken broker connection becomes, and also what a few
                // device-side refusals are: ask the broker whether it answers.
                Status::Err => self.probe_broker(error),
                // The device's own word for "the broker is down or does not answer": the
                // pool is unavailable whatever a probe says (the device's session may still
                // be reconnecting); the probe only adds the broker's own cause.
                Status::Again => match &self.broker {
                    Some(path) => match ism_pool::client::query_status(path) {
                        Err(probe) => ControlError::PoolUnavailable(Box::new(BrokerDown {
                            attach: error,
                            probe,
                        })),
                        Ok(_) => ControlError::PoolUnavailable(Box::new(error)),
                    },
                    None => ControlError::PoolUnavailable(Box::new(error)),
                },
                Status::Ok | Status::TooBig | Status::Unknown(_) => ControlError::internal(error),
            },
            // Mapping a region the pool just made: only the device's own window is involved.
            HandleError::Install { status, .. } => match status {
                Status::NoSpc => ControlError::device(error),
                _ => ControlError::internal(error),
            },
        }
    }

    /// `attach` failed with a bare `Err`: a pool that is unavailable when asked again is
    /// the cause; otherwise the device refused.
    fn probe_broker(&self, attach: HandleError) -> ControlError {
        let Some(path) = &self.broker else {
            return ControlError::device(attach);
        };
        match ism_pool::client::query_status(path) {
            Err(probe) if pool_unavailable(&probe) => {
                ControlError::PoolUnavailable(Box::new(BrokerDown { attach, probe }))
            }
            _ => ControlError::device(attach),
        }
    }
}
