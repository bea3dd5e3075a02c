// SPDX-License-Identifier: Apache-2.0
//! The virtio-ism driver (docs/protocol.md): find the device, validate what it presents,
//! negotiate features, then allocate, attach, detach and grant regions, bind event vectors,
//! ring doorbells, receive events and query, over the control queue (and the event queue when
//! negotiated).
//!
//! Requests are encoded and replies decoded with `virtio-ism-proto`. Nothing the device
//! returns is trusted: status bytes must be known codes, counts must fit the buffers offered,
//! areas must be page-sized, chunk-aligned, non-overlapping pieces of shmid 1 adding up to the
//! region's size, used lengths must cover the reply, events must name chunks of shmid 1. A
//! violation is an [`IsmError::Protocol`] and nothing of the reply is used.
//!
//! Region bytes are reached through [`RegionWindow`] with volatile, bounds-checked accesses.
//!
//! ```no_run
//! # use ism_guest_driver::{Platform, pci::PortConfig};
//! # use ism_guest_driver::ism::*;
//! # fn demo<P: Platform>(platform: &P) -> Result<(), IsmError> {
//! let config = PortConfig::new(platform);
//! let addr = find_ism(&config, 0, 0).expect("no virtio-ism device");
//! // SAFETY: this program owns the device and its BARs.
//! let mut ism = unsafe { IsmDriver::open(platform, &config, addr, IsmOptions::default())? };
//! let region = ism.alloc(1 << 20)?;
//! ism.grant_default(region.token(), PERM_READ | PERM_WRITE | PERM_ATTACH)?;
//! ism.write(&region, 0, b"hello")?;
//! ism.kick(&region)?;
//! # Ok(()) }
//! ```

mod ctrl;
mod driver;
mod error;
mod events;
mod region;

#[cfg(test)]
mod test_device;
#[cfg(test)]
mod tests;

pub use crate::virtio::NO_VECTOR;
pub use ctrl::{CTRL_QUEUE_SIZE, MAX_LIST_TOKENS};
pub use driver::{Access, INITIAL_AREAS, IsmDriver, IsmInfo, IsmOptions, RegionInfo, find_ism};
pub use error::{ConfigError, IsmError, Perm, ProtocolError};
pub use events::{EVENT_QUEUE_SIZE, IsmEvent};
pub use region::{MAX_AREAS, PAGE_SIZE, Region, RegionWindow, WindowGeometry};
pub use virtio_ism_proto::Area;

/// Feature bit numbers of the extensions, and the mask helper for [`IsmOptions::features`].
pub use virtio_ism_proto::defs::features::{
    VIRTIO_ISM_F_EAGAIN, VIRTIO_ISM_F_EVENT_QUEUE, VIRTIO_ISM_F_GRANT, VIRTIO_ISM_F_QUERY,
    VIRTIO_ISM_F_VECTOR_EVENTS, bit,
};
/// GRANT permission bits (`virtio_ism_proto::defs::perm`).
pub use virtio_ism_proto::defs::perm::{
    VIRTIO_ISM_PERM_ATTACH as PERM_ATTACH, VIRTIO_ISM_PERM_CLEAN_DEFAULT as PERM_CLEAN_DEFAULT,
    VIRTIO_ISM_PERM_MANAGE as PERM_MANAGE, VIRTIO_ISM_PERM_READ as PERM_READ,
    VIRTIO_ISM_PERM_WRITE as PERM_WRITE,
};
