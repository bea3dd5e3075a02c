// SPDX-License-Identifier: Apache-2.0
//! One PCI function's configuration space (type 0 header, BARs, capability list), kept as
//! 32-bit registers with a per-bit writable mask so guest writes can only touch what a real
//! device would let them.

/// 4 KiB of extended configuration space, as ECAM exposes it.
pub const CONFIG_SPACE_REGS: usize = 1024;
pub const NUM_BARS: usize = 6;

const COMMAND_STATUS_REG: usize = 1;
const BAR0_REG: usize = 4;
const CAPABILITY_POINTER_REG: usize = 0xd;
const INTERRUPT_REG: usize = 0xf;
/// Status register bit: a capability list is present.
const STATUS_CAP_LIST: u32 = 1 << 20;
/// Command register bits a guest may change: I/O space, memory space, bus master, INTx disable.
const COMMAND_WRITABLE: u32 = 0x0407;
pub const COMMAND_MEMORY_SPACE: u32 = 0x2;
/// First byte of the capability list (after the standard header).
const FIRST_CAPABILITY: usize = 0x40;
/// Capabilities live in the legacy 256-byte space so every guest finds them.
const LEGACY_CONFIG_END: usize = 0x100;

const BAR_MEM_64BIT: u32 = 0b10 << 1;
const BAR_MEM_PREFETCHABLE: u32 = 1 << 3;
const BAR_MEM_FLAGS_MASK: u32 = 0xf;

/// The fixed identity of a function.
#[derive(Clone, Copy, Debug)]
pub struct PciHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Mem32,
    Mem64 { prefetchable: bool },
}

#[derive(Clone, Copy, Debug)]
struct BarInfo {
    size: u64,
    kind: BarKind,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} is out of range or already in use")]
    BarIndex(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    BarSize(u64),
    #[error("BAR address {addr:#x} does not fit or is not aligned to its size {size:#x}")]
    BarAddress { addr: u64, size: u64 },
    #[error("Capability of {0} bytes does not fit in configuration space")]
    CapabilitySpace(usize),
    #[error("Capability must be at least 2 bytes")]
    CapabilityTooShort,
}

/// Merge `data` written at byte `offset` of a register into `old`, changing only bits set in
/// `writable`. Accesses crossing the register are ignored.
fn merge_write(old: u32, writable: u32, offset: u64, data: &[u8]) -> Option<u32> {
    let offset = usize::try_from(offset).ok()?;
    if data.is_empty() || offset.checked_add(data.len())? > 4 {
        return None;
    }
    let mut bytes = old.to_le_bytes();
    let mask = writable.to_le_bytes();
    for (i, b) in data.iter().enumerate() {
        let m = mask[offset + i];
        bytes[offset + i] = (bytes[offset + i] & !m) | (b & m);
    }
    Some(u32::from_le_bytes(bytes))
}

pub struct PciConfiguration {
    regs: Vec<u32>,
    writable: Vec<u32>,
    bars: [Option<BarInfo>; NUM_BARS],
    /// Byte offset of the `next` field of the last capability, to chain the next one.
    last_cap_next: Option<usize>,
    next_cap: usize,
}

impl PciConfiguration {
    pub fn new(header: &PciHeader) -> Self {
        let mut regs = vec![0u32; CONFIG_SPACE_REGS];
        let mut writable = vec![0u32; CONFIG_SPACE_REGS];
        regs[0] = u32::from(header.vendor_id) | (u32::from(header.device_id) << 16);
        regs[2] = u32::from(header.revision)
            | (u32::from(header.prog_if) << 8)
            | (u32::from(header.subclass) << 16)
            | (u32::from(header.class) << 24);
        // Header type 0, single function.
        regs[3] = 0;
        regs[0xb] = u32::from(header.subsystem_vendor_id) | (u32::from(header.subsystem_id) << 16);
        writable[COMMAND_STATUS_REG] = COMMAND_WRITABLE;
        // Interrupt line is scratch space for the guest; pin stays 0 (no INTx).
        writable[INTERRUPT_REG] = 0xff;
        Self {
            regs,
            writable,
            bars: [None; NUM_BARS],
            last_cap_next: None,
            next_cap: FIRST_CAPABILITY,
        }
    }

    /// Register `reg_idx` as the guest reads it; outside the space reads as all ones.
    pub fn read_reg(&self, reg_idx: usize) -> u32 {
        self.regs.get(reg_idx).copied().unwrap_or(0xffff_ffff)
    }

    /// Apply a guest write; returns true if the register exists and the access was valid.
    pub fn write_reg(&mut self, reg_idx: usize, offset: u64, data: &[u8]) -> bool {
        let (Some(old), Some(mask)) = (self.regs.get(reg_idx), self.writable.get(reg_idx)) else {
            return false;
        };
        match merge_write(*old, *mask, offset, data) {
            Some(new) => {
                self.regs[reg_idx] = new;
                true
            }
            None => false,
        }
    }

    /// Set a register's value and writable mask (device-specific registers in capabilities).
    pub fn set_reg(&mut self, reg_idx: usize, value: u32, writable: u32) {
        if let (Some(r), Some(w)) = (self.regs.get_mut(reg_idx), self.writable.get_mut(reg_idx)) {
            *r = value;
            *w = writable;
        }
    }

    pub fn memory_space_enabled(&self) -> bool {
        self.regs[COMMAND_STATUS_REG] & COMMAND_MEMORY_SPACE != 0
    }

    pub fn is_command_reg(reg_idx: usize) -> bool {
        reg_idx == COMMAND_STATUS_REG
    }

    /// The BAR a register belongs to (the base index for both halves of a 64-bit BAR).
    pub fn bar_of_reg(&self, reg_idx: usize) -> Option<usize> {
        let i = reg_idx.checked_sub(BAR0_REG)?;
        if i >= NUM_BARS {
            return None;
        }
        if self.bars[i].is_some() {
            return Some(i);
        }
        let base = i.checked_sub(1)?;
        match self.bars[base] {
            Some(BarInfo {
                kind: BarKind::Mem64 { .. },
                ..
            }) => Some(base),
            _ => None,
        }
    }

    /// Declare memory BAR `index` of `size` bytes at `addr`.
    pub fn add_bar(
        &mut self,
        index: usize,
        addr: u64,
        size: u64,
        kind: BarKind,
    ) -> Result<(), ConfigError> {
        let regs_needed = if kind == BarKind::Mem32 { 1 } else { 2 };
        if index + regs_needed > NUM_BARS
            || (index..index + regs_needed).any(|i| self.bar_of_reg(BAR0_REG + i).is_some())
        {
            return Err(ConfigError::BarIndex(index));
        }
        if size < 16 || !size.is_power_of_two() {
            return Err(ConfigError::BarSize(size));
        }
        let fits = match kind {
            BarKind::Mem32 => addr.checked_add(size).is_some_and(|end| end <= 1 << 32),
            BarKind::Mem64 { .. } => addr.checked_add(size).is_some(),
        };
        if !fits || !addr.is_multiple_of(size) {
            return Err(ConfigError::BarAddress { addr, size });
        }
        let addr_mask = !(size - 1);
        let reg = BAR0_REG + index;
        let flags = match kind {
            BarKind::Mem32 => 0,
            BarKind::Mem64 { prefetchable } => {
                BAR_MEM_64BIT
                    | if prefetchable {
                        BAR_MEM_PREFETCHABLE
                    } else {
                        0
                    }
            }
        };
        self.regs[reg] = (addr as u32) | flags;
        self.writable[reg] = (addr_mask as u32) & !BAR_MEM_FLAGS_MASK;
        if regs_needed == 2 {
            self.regs[reg + 1] = (addr >> 32) as u32;
            self.writable[reg + 1] = (addr_mask >> 32) as u32;
        }
        self.bars[index] = Some(BarInfo { size, kind });
        Ok(())
    }

    /// The address BAR `index` currently holds, or None while the guest is sizing it (the
    /// register reads back as the size mask) or if there is no such BAR.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let info = (*self.bars.get(index)?)?;
        let reg = BAR0_REG + index;
        let lo = u64::from(self.regs[reg] & !BAR_MEM_FLAGS_MASK);
        let (addr, all_ones) = match info.kind {
            BarKind::Mem32 => (lo, u64::from(u32::MAX)),
            BarKind::Mem64 { .. } => (lo | (u64::from(self.regs[reg + 1]) << 32), u64::MAX),
        };
        if addr | (info.size - 1) == all_ones {
            return None;
        }
        Some(addr)
    }

    /// Append a capability. `body[0]` is the capability ID; `body[1]` (next) is filled in
    /// here. Returns the capability's byte offset. All of it is read-only to the guest; the
    /// owner may make parts writable with [`Self::set_reg`].
    pub fn add_capability(&mut self, body: &[u8]) -> Result<usize, ConfigError> {
        if body.len() < 2 {
            return Err(ConfigError::CapabilityTooShort);
        }
        let offset = self.next_cap;
        let end = offset
            .checked_add(body.len())
            .filter(|e| *e <= LEGACY_CONFIG_END)
            .ok_or(ConfigError::CapabilitySpace(body.len()))?;
        for (i, b) in body.iter().enumerate() {
            self.write_byte(offset + i, if i == 1 { 0 } else { *b });
        }
        match self.last_cap_next {
            Some(next_field) => self.write_byte(next_field, offset as u8),
            None => {
                self.regs[CAPABILITY_POINTER_REG] = offset as u32;
                self.regs[COMMAND_STATUS_REG] |= STATUS_CAP_LIST;
            }
        }
        self.last_cap_next = Some(offset + 1);
        // Capabilities start dword-aligned.
        self.next_cap = end.next_multiple_of(4);
        Ok(offset)
    }

    fn write_byte(&mut self, byte_offset: usize, value: u8) {
        let reg = byte_offset / 4;
        let shift = (byte_offset % 4) * 8;
        self.regs[reg] = (self.regs[reg] & !(0xff << shift)) | (u32::from(value) << shift);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            revision: 1,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        }
    }

    #[test]
    fn test_bar_sizing_reads_mask_then_restores() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.add_bar(0, 0xc000_0000, 0x8000, BarKind::Mem32).unwrap();
        cfg.add_bar(
            2,
            0x10_0000_0000,
            1 << 30,
            BarKind::Mem64 { prefetchable: true },
        )
        .unwrap();
        assert!(cfg.write_reg(4, 0, &[0xff; 4]));
        assert_eq!(cfg.read_reg(4), 0xffff_8000);
        assert_eq!(cfg.bar_address(0), None);
        cfg.write_reg(6, 0, &[0xff; 4]);
        cfg.write_reg(7, 0, &[0xff; 4]);
        assert_eq!(cfg.read_reg(6), 0xc000_000c);
        assert_eq!(cfg.read_reg(7), 0xffff_ffff);
        assert_eq!(cfg.bar_address(2), None);
        cfg.write_reg(4, 0, &0xc001_0000u32.to_le_bytes());
        cfg.write_reg(6, 0, &0u32.to_le_bytes());
        cfg.write_reg(7, 0, &0x20u32.to_le_bytes());
        assert_eq!(cfg.bar_address(0), Some(0xc001_0000));
        assert_eq!(cfg.bar_address(2), Some(0x20_0000_0000));
        assert_eq!(cfg.bar_of_reg(7), Some(2));
        assert_eq!(cfg.bar_of_reg(5), None);
    }

    #[test]
    fn test_capability_chain_and_readonly_header() {
        let mut cfg = PciConfiguration::new(&header());
        let a = cfg.add_capability(&[0x09, 0xaa, 3]).unwrap();
        let b = cfg.add_capability(&[0x11, 0, 0, 0]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x44);
        assert_eq!(cfg.read_reg(0xd) & 0xff, 0x40);
        assert_eq!(cfg.read_reg(0x10), 0x0003_4409);
        assert_ne!(cfg.read_reg(1) & STATUS_CAP_LIST, 0);
        // Vendor ID is read-only; an access crossing the register is ignored.
        cfg.write_reg(0, 0, &[0, 0, 0, 0]);
        assert_eq!(cfg.read_reg(0) & 0xffff, 0x1af4);
        assert!(!cfg.write_reg(1, 3, &[1, 2]));
        assert!(!cfg.write_reg(1, u64::MAX, &[1]));
        assert_eq!(cfg.read_reg(5000), 0xffff_ffff);
        assert!(!cfg.write_reg(5000, 0, &[1]));
        let big = vec![0x09u8; 0x100];
        assert_eq!(
            cfg.add_capability(&big),
            Err(ConfigError::CapabilitySpace(0x100))
        );
    }

    #[test]
    fn test_add_bar_rejects_bad_geometry() {
        let mut cfg = PciConfiguration::new(&header());
        assert_eq!(
            cfg.add_bar(0, 0x1000, 0x3000, BarKind::Mem32),
            Err(ConfigError::BarSize(0x3000))
        );
        assert!(cfg.add_bar(0, 0x1800, 0x1000, BarKind::Mem32).is_err());
        assert!(
            cfg.add_bar(
                5,
                0,
                0x1000,
                BarKind::Mem64 {
                    prefetchable: false
                }
            )
            .is_err()
        );
        cfg.add_bar(
            0,
            0x1000,
            0x1000,
            BarKind::Mem64 {
                prefetchable: false,
            },
        )
        .unwrap();
        assert_eq!(
            cfg.add_bar(1, 0, 0x1000, BarKind::Mem32),
            Err(ConfigError::BarIndex(1))
        );
    }
}
