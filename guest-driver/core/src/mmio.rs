// SPDX-License-Identifier: Apache-2.0
//! Bounds-checked windows onto device registers.

use crate::platform::{Platform, Width};

/// Errors from a register access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MmioError {
    /// The access falls outside the window.
    #[error(
        "Register access at offset {offset:#x} width {width} outside a window of {len:#x} bytes"
    )]
    OutOfRange {
        /// Offset of the access in the window.
        offset: u64,
        /// Access width in bytes.
        width: u64,
        /// Window length.
        len: u64,
    },
    /// The access is not naturally aligned.
    #[error("Unaligned register access at offset {0:#x}")]
    Unaligned(u64),
}

/// A window `[base, base + len)` of device registers at a guest-physical address, with every
/// access checked to lie inside it.
pub struct MmioRegion<'p, P: Platform> {
    platform: &'p P,
    base: u64,
    len: u64,
}

impl<'p, P: Platform> MmioRegion<'p, P> {
    /// A window of `len` bytes at `base`.
    ///
    /// # Safety
    /// `[base, base + len)` must be device registers (not RAM in use) that the caller owns for
    /// the window's lifetime.
    pub unsafe fn new(platform: &'p P, base: u64, len: u64) -> Self {
        Self {
            platform,
            base,
            len,
        }
    }

    /// Guest-physical base address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty window.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, width: Width) -> Result<u64, MmioError> {
        let size = width.bytes();
        if !offset.is_multiple_of(size) {
            return Err(MmioError::Unaligned(offset));
        }
        match offset.checked_add(size) {
            Some(end) if end <= self.len => Ok(self.base + offset),
            _ => Err(MmioError::OutOfRange {
                offset,
                width: size,
                len: self.len,
            }),
        }
    }

    /// Read `width` bytes at `offset`.
    pub fn read(&self, offset: u64, width: Width) -> Result<u64, MmioError> {
        let addr = self.check(offset, width)?;
        // SAFETY: the access lies inside the window the constructor's caller vouched for.
        Ok(unsafe { self.platform.mmio_read(addr, width) })
    }

    /// Write the low `width` bytes of `value` at `offset`.
    pub fn write(&self, offset: u64, width: Width, value: u64) -> Result<(), MmioError> {
        let addr = self.check(offset, width)?;
        // SAFETY: as in read.
        unsafe { self.platform.mmio_write(addr, width, value) };
        Ok(())
    }

    /// Read a byte.
    pub fn read_u8(&self, offset: u64) -> Result<u8, MmioError> {
        self.read(offset, Width::U8).map(|v| v as u8)
    }

    /// Read a 16-bit register.
    pub fn read_u16(&self, offset: u64) -> Result<u16, MmioError> {
        self.read(offset, Width::U16).map(|v| v as u16)
    }

    /// Read a 32-bit register.
    pub fn read_u32(&self, offset: u64) -> Result<u32, MmioError> {
        self.read(offset, Width::U32).map(|v| v as u32)
    }

    /// Write a byte.
    pub fn write_u8(&self, offset: u64, value: u8) -> Result<(), MmioError> {
        self.write(offset, Width::U8, value.into())
    }

    /// Write a 16-bit register.
    pub fn write_u16(&self, offset: u64, value: u16) -> Result<(), MmioError> {
        self.write(offset, Width::U16, value.into())
    }

    /// Write a 32-bit register.
    pub fn write_u32(&self, offset: u64, value: u32) -> Result<(), MmioError> {
        self.write(offset, Width::U32, value.into())
    }

    /// Write a 64-bit register as two 32-bit halves, low first (what virtio allows and what
    /// every transport implementation accepts).
    pub fn write_u64_split(&self, offset: u64, value: u64) -> Result<(), MmioError> {
        self.write_u32(offset, value as u32)?;
        self.write_u32(offset + 4, (value >> 32) as u32)
    }
}
