// SPDX-License-Identifier: Apache-2.0
//! Where a VMM's devices get their pool sessions: the host broker if a socket was given,
//! otherwise one pool embedded in the VMM process and shared by all its devices.

use std::path::PathBuf;
use std::sync::Arc;

use crate::client::BrokerSession;
use crate::config::PoolConfig;
use crate::local::LocalPool;
use crate::session::{PoolError, PoolSession};

/// The pool a VMM uses, chosen once at startup.
#[derive(Clone, Debug)]
pub enum PoolBackend {
    /// The host-wide broker at this socket; each session is one connection.
    Broker(PathBuf),
    /// An in-process pool: regions can only be shared between this VMM's own devices.
    Embedded(Arc<LocalPool>),
}

impl PoolBackend {
    /// The broker at `socket`, or else an embedded pool made from `config`.
    pub fn new(socket: Option<PathBuf>, config: PoolConfig) -> Result<Self, PoolError> {
        Ok(match socket {
            Some(path) => PoolBackend::Broker(path),
            None => PoolBackend::Embedded(LocalPool::new(config)?),
        })
    }

    /// A session for one more device.
    pub fn session(&self) -> Result<Arc<dyn PoolSession>, PoolError> {
        match self {
            PoolBackend::Broker(path) => Ok(BrokerSession::connect(path)?),
            PoolBackend::Embedded(pool) => pool.session(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{GrantTarget, Perms};

    #[test]
    fn test_embedded_backend_sessions_share_one_pool() {
        let backend = PoolBackend::new(
            None,
            PoolConfig {
                size: 1 << 20,
                ..PoolConfig::default()
            },
        )
        .unwrap();
        let a = backend.session().unwrap();
        let b = backend.session().unwrap();
        assert_eq!(a.info().gid, b.info().gid);
        let token = a.alloc(4096).unwrap().token;
        a.grant(
            token,
            GrantTarget::Default,
            Perms(Perms::ATTACH.0 | Perms::READ.0),
        )
        .unwrap();
        assert!(!b.attach(token, Perms::NONE).unwrap().writable);
    }

    #[test]
    fn test_broker_backend_reports_missing_socket() {
        let backend = PoolBackend::new(
            Some(PathBuf::from("/nonexistent/ism-pool.sock")),
            PoolConfig::default(),
        )
        .unwrap();
        assert!(matches!(backend.session(), Err(PoolError::Connection(_))));
    }
}
