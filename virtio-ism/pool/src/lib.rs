// SPDX-License-Identifier: Apache-2.0
//! Host-wide region pool for virtio-ism.

pub mod session;
pub use session::*;
