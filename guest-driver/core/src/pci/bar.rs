// SPDX-License-Identifier: Apache-2.0
//! Base address registers: decoding and sizing.

use super::{ConfigAccess, PciAddress, regs};

/// Errors while reading BARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BarError {
    /// A 64-bit BAR in the last slot has no upper half.
    #[error("64-bit BAR {0} has no upper half")]
    MissingUpperHalf(u8),
    /// Sizing gave a mask that is not a contiguous power of two.
    #[error("BAR {0} reports an impossible size mask {1:#x}")]
    BadSizeMask(u8, u64),
    /// Base plus size wraps around the address space.
    #[error("BAR {0} at {1:#x} wraps the address space")]
    Wraps(u8, u64),
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// Memory below 4 GiB.
    Memory32,
    /// Memory anywhere; occupies two BAR slots.
    Memory64,
}

/// A decoded, sized BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR slot (0..6); for 64-bit BARs the lower slot.
    pub index: u8,
    /// Decoded kind.
    pub kind: BarKind,
    /// Assigned base address.
    pub base: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

impl Bar {
    /// Whether `[offset, offset + len)` lies inside the BAR.
    pub fn contains(&self, offset: u64, len: u64) -> bool {
        offset.checked_add(len).is_some_and(|end| end <= self.size)
    }
}

fn size_from_mask(index: u8, mask: u64) -> Result<u64, BarError> {
    if mask == 0 {
        return Ok(0);
    }
    let size = (!mask).wrapping_add(1);
    // The writable bits must be contiguous from the top: !mask + 1 is then a power of two.
    if !size.is_power_of_two() || mask.wrapping_add(size) != 0 {
        return Err(BarError::BadSizeMask(index, mask));
    }
    Ok(size)
}

/// Decode and size the six BARs of a type-0 function. Decoding is switched off while the BARs
/// hold all-ones and restored afterwards. Unimplemented slots are `None`.
pub fn read_bars<C: ConfigAccess>(
    config: &C,
    addr: PciAddress,
) -> Result<[Option<Bar>; 6], BarError> {
    let command = config.read_u16(addr, regs::COMMAND);
    config.write_u16(
        addr,
        regs::COMMAND,
        command & !(regs::COMMAND_IO | regs::COMMAND_MEMORY),
    );
    let result = size_all(config, addr);
    config.write_u16(addr, regs::COMMAND, command);
    result
}

fn probe(config: &impl ConfigAccess, addr: PciAddress, offset: u16) -> (u32, u32) {
    let original = config.read_u32(addr, offset);
    config.write_u32(addr, offset, u32::MAX);
    let mask = config.read_u32(addr, offset);
    config.write_u32(addr, offset, original);
    (original, mask)
}

fn size_all<C: ConfigAccess>(config: &C, addr: PciAddress) -> Result<[Option<Bar>; 6], BarError> {
    let mut bars = [None; 6];
    let mut index = 0u8;
    while index < 6 {
        let offset = regs::BAR0 + u16::from(index) * 4;
        let (low, low_mask) = probe(config, addr, offset);
        if low & 1 == 1 {
            // Devices that decode only 16 I/O address bits hardwire the upper half to zero.
            let mut io_mask = low_mask & !3;
            if io_mask != 0 && io_mask & 0xffff_0000 == 0 {
                io_mask |= 0xffff_0000;
            }
            let mask = u64::from(io_mask) | 0xffff_ffff_0000_0000;
            let size = if io_mask == 0 {
                0
            } else {
                size_from_mask(index, mask)?
            };
            if size != 0 {
                bars[usize::from(index)] = Some(Bar {
                    index,
                    kind: BarKind::Io,
                    base: u64::from(low & !3),
                    size,
                    prefetchable: false,
                });
            }
            index += 1;
            continue;
        }
        let prefetchable = low & 0x8 != 0;
        let is_64 = (low >> 1) & 3 == 2;
        let (base, mask, kind) = if is_64 {
            if index == 5 {
                return Err(BarError::MissingUpperHalf(index));
            }
            let (high, high_mask) = probe(config, addr, offset + 4);
            (
                (u64::from(high) << 32) | u64::from(low & !0xf),
                (u64::from(high_mask) << 32) | u64::from(low_mask & !0xf),
                BarKind::Memory64,
            )
        } else {
            (
                u64::from(low & !0xf),
                u64::from(low_mask & !0xf)
                    | if low_mask & !0xf != 0 {
                        0xffff_ffff_0000_0000
                    } else {
                        0
                    },
                BarKind::Memory32,
            )
        };
        let size = size_from_mask(index, mask)?;
        if size != 0 {
            if base.checked_add(size).is_none() {
                return Err(BarError::Wraps(index, base));
            }
            bars[usize::from(index)] = Some(Bar {
                index,
                kind,
                base,
                size,
                prefetchable,
            });
        }
        index += if is_64 { 2 } else { 1 };
    }
    Ok(bars)
}
