// SPDX-License-Identifier: Apache-2.0
//! The PVH `hvm_start_info` the VMM hands over in ebx (Xen public/arch-x86/hvm/start_info.h).

use crate::io::{phys_u32, phys_u64, read_phys};

const MAGIC: u32 = 0x336e_c578;
const MAX_CMDLINE: usize = 1024;
const MAX_MEMMAP_ENTRIES: u32 = 128;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Memory-map ranges kept for [`StartInfo::memory`].
pub const MAX_MEMORY_RANGES: usize = 32;

/// What the guest uses from the start info.
pub struct StartInfo {
    pub cmdline: [u8; MAX_CMDLINE],
    pub cmdline_len: usize,
    pub rsdp: u64,
    pub ram_bytes: u64,
    pub memmap_entries: u32,
    /// `[start, end)` of every memory-map entry but "reserved": RAM, ACPI tables, NVS,
    /// unusable; never device memory.
    pub memory: [(u64, u64); MAX_MEMORY_RANGES],
    pub memory_ranges: usize,
    /// The whole memory map was read and every such entry fits in `memory`.
    pub memory_complete: bool,
}

/// Errors reading the start info.
#[derive(Debug)]
#[allow(dead_code, reason = "fields are printed through Debug")]
pub enum StartInfoError {
    Unreadable(u64),
    BadMagic(u32),
}

impl StartInfo {
    /// Parse the structure at guest-physical `addr`.
    pub fn read(addr: u64) -> Result<Self, StartInfoError> {
        let magic = phys_u32(addr).ok_or(StartInfoError::Unreadable(addr))?;
        if magic != MAGIC {
            return Err(StartInfoError::BadMagic(magic));
        }
        let field64 = |off: u64| phys_u64(addr + off).ok_or(StartInfoError::Unreadable(addr));
        let cmdline_paddr = field64(24)?;
        let rsdp = field64(32)?;
        let memmap_paddr = field64(40)?;
        let memmap_entries = phys_u32(addr + 48).ok_or(StartInfoError::Unreadable(addr))?;

        let mut info = StartInfo {
            cmdline: [0; MAX_CMDLINE],
            cmdline_len: 0,
            rsdp,
            ram_bytes: 0,
            memmap_entries,
            memory: [(0, 0); MAX_MEMORY_RANGES],
            memory_ranges: 0,
            memory_complete: memmap_paddr != 0
                && (1..=MAX_MEMMAP_ENTRIES).contains(&memmap_entries),
        };
        if cmdline_paddr != 0 {
            for i in 0..MAX_CMDLINE {
                let mut b = [0u8];
                if !read_phys(cmdline_paddr + i as u64, &mut b) || b[0] == 0 {
                    break;
                }
                info.cmdline[i] = b[0];
                info.cmdline_len = i + 1;
            }
        }
        for i in 0..u64::from(memmap_entries.min(MAX_MEMMAP_ENTRIES)) {
            let entry = memmap_paddr + 24 * i;
            let (Some(start), Some(size), Some(kind)) =
                (phys_u64(entry), phys_u64(entry + 8), phys_u32(entry + 16))
            else {
                info.memory_complete = false;
                break;
            };
            if kind == E820_RAM {
                info.ram_bytes = info.ram_bytes.saturating_add(size);
            }
            if kind != E820_RESERVED && size != 0 {
                match info.memory.get_mut(info.memory_ranges) {
                    Some(slot) => {
                        *slot = (start, start.saturating_add(size));
                        info.memory_ranges += 1;
                    }
                    None => info.memory_complete = false,
                }
            }
        }
        Ok(info)
    }

    /// The command line as text (lossy: non-UTF-8 gives an empty string).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// Value of `key=value` on the command line.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.cmdline().split_ascii_whitespace().find_map(|word| {
            word.strip_prefix(key)
                .and_then(|rest| rest.strip_prefix('='))
        })
    }
}
