// SPDX-License-Identifier: Apache-2.0
//! In-process virtio devices built into the VMM.

pub mod virtio_rng;
