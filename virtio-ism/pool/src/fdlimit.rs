// SPDX-License-Identifier: Apache-2.0
//! The broker's file descriptor budget: every connection, region and published doorbell is
//! a descriptor in the broker, so it raises its own limit at start and says when the hard
//! limit is too low for its configuration.

use rustix::process::{Resource, Rlimit};

use crate::admission::ConnectionLimits;
use crate::config::PoolConfig;

/// Descriptors besides the ones counted below: std streams, the listener, /proc reads,
/// a lease or doorbell on its way out, the read-only reopen.
const MARGIN: u64 = 64;

/// `RLIMIT_NOFILE` before and after [`raise_descriptor_limit`]; `None` is unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DescriptorLimits {
    pub old_soft: Option<u64>,
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// Failure to read or raise the limit.
#[derive(Debug, thiserror::Error)]
pub enum FdLimitError {
    #[error("Failed to raise RLIMIT_NOFILE to {0:?}")]
    Raise(Option<u64>, #[source] std::io::Error),
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit.
pub fn raise_descriptor_limit() -> Result<DescriptorLimits, FdLimitError> {
    let limit = rustix::process::getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if raised.current != limit.current {
        rustix::process::setrlimit(Resource::Nofile, raised)
            .map_err(|e| FdLimitError::Raise(limit.maximum, e.into()))?;
    }
    Ok(DescriptorLimits {
        old_soft: limit.current,
        soft: raised.current,
        hard: limit.maximum,
    })
}

/// How many descriptors the broker may need at worst, estimated from its configuration:
/// two per connection (socket and event queue), one per region the pool can have alive
/// (bounded by the pool size in pages and by the per-VM region quota of every connection),
/// and one doorbell for each of the two holders of a region, plus a margin.
pub fn descriptors_needed(config: &PoolConfig, limits: &ConnectionLimits) -> u64 {
    let connections = limits.max as u64;
    let by_size = config.size / config.page_size();
    let regions = match config.per_vm_regions {
        Some(per_vm) => by_size.min(per_vm.saturating_mul(connections)),
        None => by_size,
    };
    let doorbells = regions.saturating_mul(2);
    connections
        .saturating_mul(2)
        .saturating_add(regions)
        .saturating_add(doorbells)
        .saturating_add(MARGIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_estimate_counts_connections_regions_and_doorbells() {
        let config = PoolConfig {
            size: 16 << 20,
            ..PoolConfig::default()
        };
        let limits = ConnectionLimits {
            max: 10,
            ..ConnectionLimits::default()
        };
        // 4096 pages, 10 x 1024 regions allowed: 4096 regions, 8192 doorbells.
        assert_eq!(
            descriptors_needed(&config, &limits),
            20 + 4096 + 8192 + MARGIN
        );
        let config = PoolConfig {
            per_vm_regions: Some(100),
            ..config
        };
        assert_eq!(
            descriptors_needed(&config, &limits),
            20 + 1000 + 2000 + MARGIN
        );
    }

    #[test]
    fn test_soft_limit_is_raised_to_hard() {
        let limits = raise_descriptor_limit().unwrap();
        assert_eq!(limits.soft, limits.hard);
        assert_eq!(
            rustix::process::getrlimit(Resource::Nofile).current,
            limits.hard
        );
    }
}
