// SPDX-License-Identifier: Apache-2.0
//! Host-wide region pool for virtio-ism.
//!
//! - [`session`]: the [`PoolSession`] contract the device codes against, re-exported from
//!   `virtio-ism-pool-api` (where a device should take it from).
//! - [`LocalPool`]: the pool logic, usable in-process (a VMM without a broker socket).
//! - [`broker`], [`handler`], [`wire`]: the `ism-pool` daemon, its per-connection request
//!   handler and the protocol (docs/pool.md).
//! - [`BrokerSession`]: the VMM side of the broker protocol.
//! - [`PoolBackend`]: picks the broker or an embedded pool at VMM startup.

pub mod admission;
pub mod backend;
pub mod broker;
pub mod client;
pub mod config;
pub mod events;
pub mod fdlimit;
pub mod handler;
pub mod local;
pub mod memory;
pub mod seqpacket;
pub mod session;
pub mod state;
pub mod status;
pub mod token;
pub mod wire;

pub use backend::PoolBackend;
pub use client::BrokerSession;
pub use config::{DEFAULT_PER_VM_REGIONS, PoolConfig, default_per_vm_limit, parse_size};
pub use local::{LocalPool, LocalSession, SessionOwner, VmKey};
pub use session::*;
pub use status::{PoolStatus, RegionStatus, SessionStatus};
