// SPDX-License-Identifier: Apache-2.0
//! The pool as one virtio-ism device sees it: the [`PoolSession`] trait and the types in its
//! signatures. They live in `virtio-ism-pool-api`, so a device depends on the contract
//! without the broker; they are re-exported here so `ism_pool::session::X` and
//! `ism_pool::X` keep naming them.

pub use virtio_ism_pool_api::session::*;
