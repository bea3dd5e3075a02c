// SPDX-License-Identifier: Apache-2.0
//! In-process virtio devices built into the VMM.

pub mod ism;
pub mod virtio_rng;
