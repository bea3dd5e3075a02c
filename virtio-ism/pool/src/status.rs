// SPDX-License-Identifier: Apache-2.0
//! The pool's status report: regions, their holders and grants, and quota use per VM. The
//! types live in `virtio-ism-pool-api` (a session may hand one out); its JSON form is here.

pub use virtio_ism_pool_api::status::{PoolStatus, RegionStatus, SessionStatus};

/// The report as JSON (the form it travels in).
pub fn to_json(status: &PoolStatus) -> Vec<u8> {
    // Plain data with string keys only: serialisation cannot fail.
    serde_json::to_vec(status).unwrap_or_default()
}

/// Parses a JSON report.
pub fn from_json(json: &[u8]) -> Result<PoolStatus, serde_json::Error> {
    serde_json::from_slice(json)
}
