// SPDX-License-Identifier: Apache-2.0
//! What a virtio-ism device needs from a region pool, and nothing else.
//!
//! - [`session`]: the [`PoolSession`] trait one device codes against, and every type in its
//!   signatures ([`Token`], [`DevId`], [`Perms`], [`RegionLease`], [`PoolEvent`],
//!   [`PoolError`], ...).
//! - [`status`]: the pool's status report ([`PoolStatus`]), which a session may hand out.
//!
//! The implementations (the in-process pool, the broker daemon and its client) live in
//! `ism-pool`, which re-exports these items at the same paths. A device or a VMM that only
//! talks to a session depends on this crate, not on the broker's command line and logging.
#![warn(missing_docs)]

pub mod session;
pub mod status;

pub use session::*;
pub use status::{PoolStatus, RegionStatus, SessionStatus};
