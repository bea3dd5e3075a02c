// SPDX-License-Identifier: Apache-2.0
//! Walking the capability list, bounded against loops and stray pointers.

use super::{ConfigAccess, PciAddress, regs};

/// Capability list entries live in the device-specific part of the first 256 bytes; at most
/// (256 - 64) / 4 of them fit, so no honest list is longer.
const MAX_CAPABILITIES: usize = 48;

/// One entry of a function's capability list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciCapability {
    /// Offset of the entry in config space.
    pub offset: u16,
    /// Capability ID (0x09 vendor-specific, 0x11 MSI-X, ...).
    pub id: u8,
}

/// Iterator over the capability list. It stops (rather than loops or reads outside the
/// header) when a pointer is below 0x40, past 0xfc, repeats, or the list is too long.
pub struct CapabilityIter<'c, C: ConfigAccess> {
    config: &'c C,
    address: PciAddress,
    next: u8,
    seen: u64,
    count: usize,
}

impl<'c, C: ConfigAccess> CapabilityIter<'c, C> {
    /// Walk the list of the function at `address` (empty when the status register says it
    /// has none).
    pub fn new(config: &'c C, address: PciAddress) -> Self {
        let has_list = config.read_u16(address, regs::STATUS) & regs::STATUS_CAP_LIST != 0;
        let next = if has_list {
            config.read_u8(address, regs::CAP_PTR) & 0xfc
        } else {
            0
        };
        Self {
            config,
            address,
            next,
            seen: 0,
            count: 0,
        }
    }
}

impl<C: ConfigAccess> Iterator for CapabilityIter<'_, C> {
    type Item = PciCapability;

    fn next(&mut self) -> Option<PciCapability> {
        let offset = self.next;
        if offset < 0x40 || self.count >= MAX_CAPABILITIES {
            return None;
        }
        // One bit per dword slot in 0x40..0x100 catches any cycle.
        let slot = (offset - 0x40) / 4;
        if self.seen & (1 << slot) != 0 {
            self.next = 0;
            return None;
        }
        self.seen |= 1 << slot;
        self.count += 1;
        let header = self.config.read_u16(self.address, offset.into());
        self.next = (header >> 8) as u8 & 0xfc;
        Some(PciCapability {
            offset: offset.into(),
            id: header as u8,
        })
    }
}
