// SPDX-License-Identifier: Apache-2.0
//! Mirror of `guest-driver/linux/include/uapi/linux/virtio_ism_ioctl.h` (the /dev/ismN
//! interface) and the permission bits of `include/uapi/linux/virtio_ism.h` (the device
//! interface). `tests/c_layout.rs` compiles those headers and checks every size, offset and
//! number below against them. Every `flags` and `reserved*` field must be zero on input:
//! the driver answers EINVAL otherwise.

#![allow(missing_docs)]

pub const VIRTIO_ISM_PERM_READ: u64 = 1 << 0;
pub const VIRTIO_ISM_PERM_WRITE: u64 = 1 << 1;
pub const VIRTIO_ISM_PERM_ATTACH: u64 = 1 << 2;
pub const VIRTIO_ISM_PERM_MANAGE: u64 = 1 << 3;
pub const VIRTIO_ISM_PERM_CLEAN_DEFAULT: u64 = 1 << 4;

pub const VIRTIO_ISM_REGION_F_WRITE: u32 = 1 << 0;
pub const VIRTIO_ISM_REGION_F_OWNER: u32 = 1 << 1;
pub const VIRTIO_ISM_REGION_F_BOUND: u32 = 1 << 2;
pub const VIRTIO_ISM_REGION_F_KEPT: u32 = 1 << 3;
pub const VIRTIO_ISM_REGION_F_MINE: u32 = 1 << 4;
pub const VIRTIO_ISM_REGION_F_HOTPLUGGED: u32 = 1 << 5;
pub const VIRTIO_ISM_REGION_F_OWN_VECTOR: u32 = 1 << 6;

pub const VIRTIO_ISM_INFO_F_EVENT_QUEUE: u64 = 1 << 1;
pub const VIRTIO_ISM_INFO_F_QUERY: u64 = 1 << 2;
pub const VIRTIO_ISM_INFO_F_GRANT: u64 = 1 << 3;

pub const VIRTIO_ISM_INFO_KICK_VECTORS: u32 = 1 << 0;
pub const VIRTIO_ISM_INFO_KICK_PENDING: u32 = 1 << 1;

pub const VIRTIO_ISM_EV_UPDATE: u64 = 1 << 0;
pub const VIRTIO_ISM_EV_ATTACH: u64 = 1 << 1;
pub const VIRTIO_ISM_EV_DETACH: u64 = 1 << 2;
pub const VIRTIO_ISM_EV_REVOKE: u64 = 1 << 3;
pub const VIRTIO_ISM_EV_REGION_ADDED: u64 = 1 << 4;
pub const VIRTIO_ISM_EV_OVERFLOW: u64 = 1 << 5;
pub const VIRTIO_ISM_EV_KICK: u64 = 1 << 16;
pub const VIRTIO_ISM_EV_LOST: u64 = 1 << 17;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_ism_info {
    pub gid: u64,
    pub devid: u64,
    pub chunk_size: u64,
    pub notify_size: u64,
    pub features: u64,
    pub shm_size: u64,
    pub nr_regions: u64,
    pub instance: u32,
    pub flags: u32,
    pub reserved: [u64; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_ism_region {
    pub token: u64,
    pub size: u64,
    pub map_offset: u64,
    pub perm: u32,
    pub flags: u32,
    pub region_flags: u32,
    pub reserved0: u32,
    pub reserved: [u64; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_ism_grant {
    pub token: u64,
    pub perms: u64,
    pub peer_devid: u64,
    pub flags: u32,
    pub reserved0: u32,
    pub reserved: [u64; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_ism_token_op {
    pub token: u64,
    pub flags: u32,
    pub reserved0: u32,
    pub reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_ism_region_area {
    pub offset: u64,
    pub size: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_ism_region_info {
    pub token: u64,
    pub size: u64,
    pub map_offset: u64,
    pub areas: u64,
    pub max_areas: u32,
    pub nr_areas: u32,
    pub flags: u32,
    pub region_flags: u32,
    pub kicks: u64,
    pub reserved: [u64; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_ism_list {
    pub tokens: u64,
    pub max_tokens: u32,
    pub nr_tokens: u32,
    pub flags: u32,
    pub reserved0: u32,
    pub reserved: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct virtio_ism_event_record {
    pub r#type: u64,
    pub token: u64,
    pub devid: u64,
    pub peers: u64,
}

pub const VIRTIO_ISM_IOC_MAGIC: u32 = 0xC5;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// Linux's `_IOC(dir, type, nr, size)` for x86 and the other asm-generic architectures.
pub const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (VIRTIO_ISM_IOC_MAGIC << 8) | nr
}

const fn ior<T>(nr: u32) -> u32 {
    ioc(IOC_READ, nr, core::mem::size_of::<T>())
}
const fn iow<T>(nr: u32) -> u32 {
    ioc(IOC_WRITE, nr, core::mem::size_of::<T>())
}
const fn iowr<T>(nr: u32) -> u32 {
    ioc(IOC_READ | IOC_WRITE, nr, core::mem::size_of::<T>())
}

pub const VIRTIO_ISM_IOC_INFO: u32 = ior::<virtio_ism_info>(0x00);
pub const VIRTIO_ISM_IOC_ALLOC: u32 = iowr::<virtio_ism_region>(0x01);
pub const VIRTIO_ISM_IOC_ATTACH: u32 = iowr::<virtio_ism_region>(0x02);
pub const VIRTIO_ISM_IOC_DETACH: u32 = iow::<virtio_ism_token_op>(0x03);
pub const VIRTIO_ISM_IOC_GRANT: u32 = iow::<virtio_ism_grant>(0x04);
pub const VIRTIO_ISM_IOC_BIND: u32 = iow::<virtio_ism_token_op>(0x05);
pub const VIRTIO_ISM_IOC_UNBIND: u32 = iow::<virtio_ism_token_op>(0x06);
pub const VIRTIO_ISM_IOC_KICK: u32 = iow::<virtio_ism_token_op>(0x07);
pub const VIRTIO_ISM_IOC_REGION_INFO: u32 = iowr::<virtio_ism_region_info>(0x08);
pub const VIRTIO_ISM_IOC_LIST: u32 = iowr::<virtio_ism_list>(0x09);
pub const VIRTIO_ISM_IOC_KEEP: u32 = iow::<virtio_ism_token_op>(0x0b);
