// SPDX-License-Identifier: Apache-2.0
//! Guest-side driver core for the ism project, usable without an operating system.
//!
//! Everything the drivers need from their environment (port I/O, MMIO, DMA-able memory,
//! waiting) comes through the small [`Platform`] trait, so the same code runs in the
//! freestanding test guest and against in-memory fakes in host unit tests.
//!
//! Nothing a device returns is trusted: capability offsets are checked against BAR sizes,
//! counts are bounded, used-ring ids and lengths are checked against what was offered.
//!
//! Layers, bottom up: [`mmio`] (bounds-checked register windows), [`pci`] (config space,
//! enumeration, capabilities, BARs, MSI-X), [`virtio`] (the modern virtio-pci transport, the
//! split virtqueue and device clients such as virtio-rng).

#![no_std]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod ism;
pub mod mmio;
pub mod pci;
pub mod platform;
pub mod virtio;

#[cfg(test)]
pub(crate) mod fake;

pub use platform::{DmaRegion, Platform};
