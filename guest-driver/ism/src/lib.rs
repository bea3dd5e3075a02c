// SPDX-License-Identifier: Apache-2.0
//! Safe user-space API over the `virtio_ism` Linux driver (`/dev/ismN`).
//!
//! ```no_run
//! use ism::{Access, Device, Perms};
//!
//! let dev = Device::open("/dev/ism0")?;
//! let region = dev.alloc(1 << 20)?;
//! dev.grant_default(region.token(), Perms::READ | Perms::ATTACH)?;
//! region.write_at(0, b"hello")?;
//! region.kick()?;
//! // A peer VM: Device::open("/dev/ism0")?.attach(token, Access::ReadOnly)?
//! # let _ = Access::AsGranted;
//! # Ok::<(), ism::Error>(())
//! ```
//!
//! Requests and replies go through ioctls declared in the driver's uapi header
//! (`guest-driver/linux/include/uapi/linux/virtio_ism_ioctl.h`), mirrored in [`uapi`].

mod device;
mod error;
mod event;
mod region;
pub mod uapi;

pub use device::{Access, Counters, Device, Info, Perms, RegionFlags, RegionInfo};
pub use error::{CommandError, Error, Result};
pub use event::{Event, EventKind, EventType};
pub use region::Region;
