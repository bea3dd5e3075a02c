// SPDX-License-Identifier: Apache-2.0
//! MSI-X: capability parsing and table programming.

use super::{Bar, ConfigAccess, PciAddress, PciCapability};
use crate::mmio::{MmioError, MmioRegion};
use crate::platform::Platform;

/// MSI-X capability ID.
pub const MSIX_CAP_ID: u8 = 0x11;
const CONTROL: u16 = 2;
const TABLE: u16 = 4;
const PBA: u16 = 8;
const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_SIZE: u64 = 16;

/// Errors while setting up MSI-X.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MsixError {
    /// The table names a BAR the function does not implement as memory.
    #[error("MSI-X table in missing or non-memory BAR {0}")]
    TableBar(u8),
    /// The table does not fit in its BAR.
    #[error("MSI-X table of {entries} entries at {offset:#x} outside its BAR")]
    TableOutsideBar {
        /// Table offset.
        offset: u64,
        /// Entry count.
        entries: u16,
    },
    /// The platform refused to map the table as device memory.
    #[error("MSI-X table at {0:#x} is not device memory the platform can map")]
    TableNotMmio(u64),
    /// An entry index past the table.
    #[error("MSI-X entry {0} past the table")]
    NoSuchEntry(u16),
    /// Register access failed.
    #[error("MSI-X table access failed")]
    Access(#[source] MmioError),
}

/// A parsed MSI-X capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    /// Offset of the capability in config space.
    pub cap_offset: u16,
    /// Number of table entries (1..=2048).
    pub table_size: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
}

impl MsixCapability {
    /// Parse the capability at `cap` (which must have ID 0x11).
    pub fn parse<C: ConfigAccess>(
        config: &C,
        addr: PciAddress,
        cap: PciCapability,
    ) -> Option<Self> {
        if cap.id != MSIX_CAP_ID {
            return None;
        }
        let control = config.read_u16(addr, cap.offset + CONTROL);
        let table = config.read_u32(addr, cap.offset + TABLE);
        Some(Self {
            cap_offset: cap.offset,
            table_size: (control & 0x7ff) + 1,
            table_bar: (table & 7) as u8,
            table_offset: table & !7,
        })
    }

    /// Offset of the pending-bit array register (kept for completeness of the layout).
    pub const PBA_REGISTER: u16 = PBA;

    /// Map the table after checking it lies inside its BAR ([`Platform::map_mmio`] too).
    ///
    /// # Safety
    /// `bars` must be this function's BARs as read from config space, with memory decoding
    /// enabled, and the platform must treat them as device MMIO.
    pub unsafe fn map_table<'p, P: Platform>(
        &self,
        platform: &'p P,
        bars: &[Option<Bar>; 6],
    ) -> Result<MsixTable<'p, P>, MsixError> {
        let bar = bars
            .get(usize::from(self.table_bar))
            .copied()
            .flatten()
            .filter(|b| b.kind != super::BarKind::Io)
            .ok_or(MsixError::TableBar(self.table_bar))?;
        let len = u64::from(self.table_size) * ENTRY_SIZE;
        let offset = u64::from(self.table_offset);
        if !bar.contains(offset, len) {
            return Err(MsixError::TableOutsideBar {
                offset,
                entries: self.table_size,
            });
        }
        let base = bar.base + offset;
        if !platform.map_mmio(base, len) {
            return Err(MsixError::TableNotMmio(base));
        }
        Ok(MsixTable {
            // SAFETY: the range lies inside a memory BAR of the device (checked above), which
            // the caller vouched for, and the platform mapped it as device memory.
            region: unsafe { MmioRegion::new(platform, base, len) },
            entries: self.table_size,
        })
    }

    /// Enable MSI-X with the function mask cleared.
    pub fn enable<C: ConfigAccess>(&self, config: &C, addr: PciAddress) {
        let control = config.read_u16(addr, self.cap_offset + CONTROL);
        let control = (control | CONTROL_ENABLE) & !CONTROL_FUNCTION_MASK;
        config.write_u16(addr, self.cap_offset + CONTROL, control);
    }
}

/// The mapped MSI-X table.
pub struct MsixTable<'p, P: Platform> {
    region: MmioRegion<'p, P>,
    entries: u16,
}

impl<P: Platform> MsixTable<'_, P> {
    /// Number of entries.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// Program entry `index` to send `data` to message address `address`, unmasked.
    pub fn program(&self, index: u16, address: u64, data: u32) -> Result<(), MsixError> {
        if index >= self.entries {
            return Err(MsixError::NoSuchEntry(index));
        }
        let base = u64::from(index) * ENTRY_SIZE;
        let write = |off: u64, value: u32| {
            self.region
                .write_u32(base + off, value)
                .map_err(MsixError::Access)
        };
        // Mask while the entry is inconsistent, then unmask.
        write(12, 1)?;
        write(0, address as u32)?;
        write(4, (address >> 32) as u32)?;
        write(8, data)?;
        write(12, 0)
    }
}

/// The x86 message address for an interrupt to the local APIC `apic_id` (physical mode).
pub fn x86_msi_address(apic_id: u8) -> u64 {
    0xfee0_0000 | (u64::from(apic_id) << 12)
}
