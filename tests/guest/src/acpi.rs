// SPDX-License-Identifier: Apache-2.0
//! Just enough ACPI: RSDP -> XSDT/RSDT -> MADT (CPU count), MCFG (ECAM), FADT (sleep control,
//! PM1a and reset registers) -> DSDT (`_S5_` sleep type). Tables are checksummed and their
//! lengths bounded before use.

use crate::io::{inb, outb, outl, outw, phys_u32, phys_u64, read_phys};

const MAX_TABLE_LEN: u32 = 64 * 1024;
const MAX_TABLES: u32 = 64;
const HEADER_LEN: u32 = 36;

/// An ACPI Generic Address Structure (only system I/O and memory spaces are used).
#[derive(Clone, Copy, Debug)]
pub struct Gas {
    pub space: u8,
    pub bit_width: u8,
    pub address: u64,
}

impl Gas {
    fn read(addr: u64) -> Option<Gas> {
        let mut b = [0u8; 12];
        read_phys(addr, &mut b).then(|| Gas {
            space: b[0],
            bit_width: b[1],
            address: u64::from_le_bytes(b[4..12].try_into().unwrap_or([0; 8])),
        })
    }

    fn is_present(&self) -> bool {
        self.address != 0
    }

    /// Write `value` through the register (I/O ports only; memory-space registers are not
    /// used by our VMM).
    fn write(&self, value: u32) -> bool {
        if self.space != 1 || self.address > 0xffff {
            return false;
        }
        let port = self.address as u16;
        match self.bit_width {
            16 => outw(port, value as u16),
            32 => outl(port, value),
            _ => outb(port, value as u8),
        }
        true
    }
}

/// ECAM window from MCFG.
#[derive(Clone, Copy, Debug)]
pub struct Ecam {
    pub base: u64,
    pub start_bus: u8,
    pub end_bus: u8,
}

/// What the guest learned from ACPI.
#[derive(Default, Debug)]
pub struct Acpi {
    pub cpus: u32,
    pub ecam: Option<Ecam>,
    pub sleep_control: Option<Gas>,
    pub pm1a_control: Option<u16>,
    pub reset: Option<(Gas, u8)>,
    pub s5_slp_typ: Option<u8>,
    pub tables: u32,
}

fn checksum_ok(addr: u64, len: u32) -> bool {
    let mut sum = 0u8;
    let mut chunk = [0u8; 64];
    let mut done = 0u32;
    while done < len {
        let n = (len - done).min(64) as usize;
        if !read_phys(addr + u64::from(done), &mut chunk[..n]) {
            return false;
        }
        sum = chunk[..n].iter().fold(sum, |s, b| s.wrapping_add(*b));
        done += n as u32;
    }
    sum == 0
}

/// Signature and length of a checksummed table at `addr`.
fn table(addr: u64) -> Option<([u8; 4], u32)> {
    let mut sig = [0u8; 4];
    if !read_phys(addr, &mut sig) {
        return None;
    }
    let len = phys_u32(addr + 4)?;
    if !(HEADER_LEN..=MAX_TABLE_LEN).contains(&len) || !checksum_ok(addr, len) {
        return None;
    }
    Some((sig, len))
}

fn find_rsdp(hint: u64) -> Option<u64> {
    let is_rsdp = |addr: u64| {
        let mut sig = [0u8; 8];
        read_phys(addr, &mut sig) && &sig == b"RSD PTR " && checksum_ok(addr, 20)
    };
    if hint != 0 && is_rsdp(hint) {
        return Some(hint);
    }
    (0xe_0000u64..0x10_0000).step_by(16).find(|a| is_rsdp(*a))
}

impl Acpi {
    /// Walk the tables from the RSDP (`hint` from the start info, else the BIOS area scan).
    pub fn discover(hint: u64) -> Option<Acpi> {
        let rsdp = find_rsdp(hint)?;
        let mut acpi = Acpi::default();
        let mut revision = [0u8];
        read_phys(rsdp + 15, &mut revision);
        let (root, entry_size) = if revision[0] >= 2 {
            (phys_u64(rsdp + 24)?, 8u32)
        } else {
            (u64::from(phys_u32(rsdp + 16)?), 4u32)
        };
        let (_, root_len) = table(root)?;
        let entries = ((root_len - HEADER_LEN) / entry_size).min(MAX_TABLES);
        for i in 0..entries {
            let at = root + u64::from(HEADER_LEN + i * entry_size);
            let addr = if entry_size == 8 {
                phys_u64(at)?
            } else {
                u64::from(phys_u32(at)?)
            };
            let Some((sig, len)) = table(addr) else {
                continue;
            };
            acpi.tables += 1;
            match &sig {
                b"APIC" => acpi.parse_madt(addr, len),
                b"MCFG" => acpi.parse_mcfg(addr, len),
                b"FACP" => acpi.parse_fadt(addr, len),
                _ => {}
            }
        }
        Some(acpi)
    }

    fn parse_madt(&mut self, addr: u64, len: u32) {
        let mut off = 44u32;
        while off + 2 <= len {
            let mut head = [0u8; 2];
            read_phys(addr + u64::from(off), &mut head);
            let (kind, entry_len) = (head[0], u32::from(head[1]));
            if entry_len < 2 || off + entry_len > len {
                break;
            }
            let flags_at = match (kind, entry_len) {
                (0, 8..) => Some(4),
                (9, 16..) => Some(8),
                _ => None,
            };
            if let Some(flags_off) = flags_at {
                let flags = phys_u32(addr + u64::from(off + flags_off)).unwrap_or(0);
                if flags & 1 != 0 {
                    self.cpus += 1;
                }
            }
            off += entry_len;
        }
    }

    fn parse_mcfg(&mut self, addr: u64, len: u32) {
        if len < 44 + 16 {
            return;
        }
        let entry = addr + 44;
        let (Some(base), Some(segment_bus)) = (phys_u64(entry), phys_u32(entry + 8)) else {
            return;
        };
        let segment = segment_bus as u16;
        if segment == 0 {
            self.ecam = Some(Ecam {
                base,
                start_bus: (segment_bus >> 16) as u8,
                end_bus: (segment_bus >> 24) as u8,
            });
        }
    }

    fn parse_fadt(&mut self, addr: u64, len: u32) {
        if len >= 68 {
            let pm1a = phys_u32(addr + 64).unwrap_or(0);
            if pm1a != 0 && pm1a <= 0xffff {
                self.pm1a_control = Some(pm1a as u16);
            }
        }
        if len >= 129 {
            let flags = phys_u32(addr + 112).unwrap_or(0);
            let gas = Gas::read(addr + 116);
            let mut value = [0u8];
            read_phys(addr + 128, &mut value);
            const RESET_REG_SUP: u32 = 1 << 10;
            if let Some(gas) = gas.filter(|g| g.is_present() && flags & RESET_REG_SUP != 0) {
                self.reset = Some((gas, value[0]));
            }
        }
        if len >= 256 {
            self.sleep_control = Gas::read(addr + 244).filter(Gas::is_present);
        }
        let dsdt = if len >= 148 {
            phys_u64(addr + 140).filter(|a| *a != 0)
        } else {
            None
        }
        .or_else(|| phys_u32(addr + 40).map(u64::from));
        if let Some(dsdt) = dsdt
            && let Some((sig, dsdt_len)) = table(dsdt)
            && &sig == b"DSDT"
        {
            self.s5_slp_typ = find_s5(dsdt, dsdt_len);
        }
    }

    /// Power off: SLP_TYP(S5) | SLP_EN through the sleep control register (hardware-reduced
    /// ACPI) or PM1a control. Returns only if nothing happened.
    pub fn power_off(&self) {
        let slp_typ = self.s5_slp_typ.unwrap_or(5);
        if let Some(gas) = self.sleep_control {
            gas.write(u32::from((slp_typ & 7) << 2) | 0x20);
        } else if let Some(port) = self.pm1a_control {
            outw(port, (u16::from(slp_typ & 7) << 10) | (1 << 13));
        }
    }

    /// Reset through the FADT reset register. Returns only if nothing happened.
    pub fn reset(&self) {
        if let Some((gas, value)) = self.reset {
            gas.write(value.into());
        }
    }
}

/// The first element of `Name(_S5_, Package(){ SLP_TYPa, ... })` in the DSDT.
fn find_s5(dsdt: u64, len: u32) -> Option<u8> {
    let mut window = [0u8; 16];
    let body = u64::from(HEADER_LEN);
    let mut off = body;
    while off + 4 <= u64::from(len) {
        let mut sig = [0u8; 4];
        read_phys(dsdt + off, &mut sig);
        if &sig == b"_S5_" {
            let n = (u64::from(len) - off - 4).min(16) as usize;
            read_phys(dsdt + off + 4, &mut window[..n]);
            return parse_s5_package(&window[..n]);
        }
        off += 1;
    }
    None
}

/// Parse `PackageOp PkgLength NumElements <first element>`.
fn parse_s5_package(bytes: &[u8]) -> Option<u8> {
    const PACKAGE_OP: u8 = 0x12;
    if *bytes.first()? != PACKAGE_OP {
        return None;
    }
    let lead = *bytes.get(1)?;
    let pkg_len_bytes = 1 + usize::from(lead >> 6);
    let first = 1 + pkg_len_bytes + 1;
    match *bytes.get(first)? {
        0x00 => Some(0),
        0x01 => Some(1),
        0x0a => bytes.get(first + 1).copied(),
        b => Some(b),
    }
}

/// Reboot through the keyboard controller when ACPI has no reset register.
pub fn i8042_reset() {
    for _ in 0..1000 {
        if inb(0x64) & 2 == 0 {
            break;
        }
    }
    outb(0x64, 0xfe);
}
