// SPDX-License-Identifier: Apache-2.0
//! Device memory in the page tables, mapped at run time from ring 3 where the VMM put it.
//!
//! The boot tables (boot.rs) identity-map only what the guest needs before it knows the
//! machine: RAM below [`BOOT_RAM_END`] write-back (image, boot info, ACPI tables) and the
//! 2 MiB page of the local APIC (at its architectural address) uncached. Every other device
//! window is mapped here when a driver asks ([`DeviceMap::map`], behind
//! `Platform::map_mmio`): the ECAM window from MCFG and each BAR window at the address the
//! VMM assigned, identity, user-accessible, uncached (PCD | PWT), in 2 MiB pages, with page
//! tables from a static pool. No MMIO window is assumed: ism-vmm puts 64-bit BARs at 64 GiB,
//! cloud-hypervisor near the top of the physical address space (e.g. 0x3fffff800000).
//!
//! A window is refused when it overlaps a memory-map entry other than "reserved" (RAM, ACPI
//! tables: a device must not point a BAR at memory) or ends above the physical address width
//! (CPUID 0x80000008, at most the 128 TiB a 4-level identity map reaches).
//!
//! Ring 3 writes the tables itself (they are user-accessible data); ring 0 only reloads CR3
//! (`int 0x80` call 3) after a present entry changed (a BAR below [`BOOT_RAM_END`] in a 2 MiB
//! page with no memory in it, turned uncached; or `bench cache`). Entries that were not
//! present need no flush. Under PVM's shadow paging a store into a table in use traps and is
//! emulated; a fresh table is not shadowed until an access goes through it, so filling it
//! runs natively.

use core::cell::{Cell, UnsafeCell};

use crate::boot;

/// Size of the pages device windows are mapped with.
pub const PAGE: u64 = 2 << 20;
/// The boot tables map guest-physical `0..BOOT_RAM_END` write-back.
pub const BOOT_RAM_END: u64 = 0xc000_0000;
/// Page tables for device windows: 64 page directories map a 64 GiB window (ism-vmm's
/// largest), plus room for the upper levels cloud-hypervisor's placement needs.
const POOL_TABLES: usize = 72;
const ENTRIES: usize = 512;

pub const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
/// PWT | PCD: the memory type of an entry is uncached.
pub const UNCACHED: u64 = (1 << 3) | (1 << 4);
const HUGE: u64 = 1 << 7;
const TABLE: u64 = PRESENT | WRITABLE | USER;
const DEVICE_PAGE: u64 = PRESENT | WRITABLE | USER | UNCACHED | HUGE;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
/// The highest address a 4-level identity map reaches (the lower canonical half).
const IDENTITY_LIMIT: u64 = 1 << 47;

#[repr(C, align(4096))]
struct TablePool(UnsafeCell<[[u64; ENTRIES]; POOL_TABLES]>);

// SAFETY: the guest runs on one CPU; each table is handed out once, by DeviceMap.
unsafe impl Sync for TablePool {}

/// Zeroed by the boot code with the rest of .bss.
static TABLE_POOL: TablePool = TablePool(UnsafeCell::new([[0; ENTRIES]; POOL_TABLES]));

unsafe extern "C" {
    /// The boot page tables' top level (boot.rs), identity mapped and user-writable.
    static mut ism_pml4: [u64; ENTRIES];
}

/// Why a window was not mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// The start info's memory map was missing or too long to keep: nothing is mapped.
    NoMemoryMap,
    /// The window ends above the physical address width (or wraps).
    AboveLimit(u64),
    /// The window overlaps memory the memory map lists.
    Memory(u64, u64),
    /// A 2 MiB page of the window holds listed memory and is mapped write-back.
    SharesPageWithMemory(u64),
    /// A table on the way is mapped with a 1 GiB page or 4 KiB pages (never made here).
    Unexpected(u64),
    /// The table pool is used up.
    NoTables,
}

/// Maps device windows into the page tables. Only one may exist (it owns the table pool).
pub struct DeviceMap {
    memory: [(u64, u64); crate::start_info::MAX_MEMORY_RANGES],
    memory_ranges: usize,
    memory_complete: bool,
    /// Windows must end at or below this address.
    limit: u64,
    tables_used: Cell<usize>,
}

impl DeviceMap {
    /// Take the map, with the memory `info` lists.
    ///
    /// # Safety
    /// Call once: the table pool is handed out from its start.
    pub unsafe fn take(info: &crate::start_info::StartInfo) -> Self {
        Self {
            memory: info.memory,
            memory_ranges: info.memory_ranges,
            memory_complete: info.memory_complete,
            limit: (1u64 << phys_bits()).min(IDENTITY_LIMIT),
            tables_used: Cell::new(0),
        }
    }

    fn overlaps_memory(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        self.memory[..self.memory_ranges]
            .iter()
            .copied()
            .find(|&(s, e)| s < end && start < e)
    }

    /// Map `[base, base + len)` identity and uncached (already mapped pages are kept as they
    /// are, except write-back boot RAM pages, which turn uncached if no memory lies in them).
    pub fn map(&self, base: u64, len: u64) -> Result<(), MapError> {
        if !self.memory_complete {
            return Err(MapError::NoMemoryMap);
        }
        let end = base
            .checked_add(len.max(1))
            .filter(|end| *end <= self.limit)
            .ok_or(MapError::AboveLimit(base))?;
        if let Some((s, e)) = self.overlaps_memory(base, end) {
            return Err(MapError::Memory(s, e));
        }
        let mut flush = false;
        let mut page = base & !(PAGE - 1);
        while page < end {
            let slot = self.directory_slot(page)?;
            // SAFETY: an entry of a page directory of the live tables (identity mapped,
            // user-writable); one CPU, nothing else writes the tables meanwhile.
            let entry = unsafe { slot.read_volatile() };
            if entry & PRESENT == 0 {
                // SAFETY: as above; a new mapping of device memory nothing else maps.
                unsafe { slot.write_volatile(page | DEVICE_PAGE) };
            } else if entry & HUGE == 0 {
                return Err(MapError::Unexpected(page));
            } else if entry & UNCACHED != UNCACHED && page < BOOT_RAM_END {
                if self.overlaps_memory(page, page + PAGE).is_some() {
                    return Err(MapError::SharesPageWithMemory(page));
                }
                // SAFETY: as above; the page holds no memory, only device windows.
                unsafe { slot.write_volatile(entry | UNCACHED) };
                flush = true;
            }
            page += PAGE;
        }
        if flush {
            boot::flush_tlb();
        }
        Ok(())
    }

    /// The page-directory entry for the 2 MiB page at `page`, making the tables above it.
    fn directory_slot(&self, page: u64) -> Result<*mut u64, MapError> {
        let mut table = (&raw mut ism_pml4).cast::<u64>();
        for shift in [39u32, 30] {
            let slot = table.wrapping_add(((page >> shift) as usize) & (ENTRIES - 1));
            // SAFETY: an entry of a 512-entry table of the live tables (index masked).
            let entry = unsafe { slot.read_volatile() };
            table = if entry & PRESENT == 0 {
                let fresh = self.alloc_table()?;
                // SAFETY: as above; links a zeroed table (nothing present under it).
                unsafe { slot.write_volatile(fresh as u64 | TABLE) };
                fresh
            } else if entry & HUGE != 0 {
                return Err(MapError::Unexpected(page));
            } else {
                (entry & ADDRESS) as *mut u64
            };
        }
        Ok(table.wrapping_add(((page >> 21) as usize) & (ENTRIES - 1)))
    }

    fn alloc_table(&self) -> Result<*mut u64, MapError> {
        let used = self.tables_used.get();
        if used == POOL_TABLES {
            return Err(MapError::NoTables);
        }
        self.tables_used.set(used + 1);
        // The identity map makes the table's address its guest-physical address.
        Ok(TABLE_POOL
            .0
            .get()
            .cast::<[u64; ENTRIES]>()
            .wrapping_add(used)
            .cast())
    }
}

/// The page-directory entry mapping the 2 MiB page at `addr`, if the tables above it exist.
pub fn directory_entry(addr: u64) -> Option<*mut u64> {
    let mut table = (&raw const ism_pml4).cast::<u64>();
    for shift in [39u32, 30] {
        // SAFETY: an entry of a 512-entry table of the live tables (index masked).
        let entry = unsafe {
            table
                .add(((addr >> shift) as usize) & (ENTRIES - 1))
                .read_volatile()
        };
        if entry & PRESENT == 0 || entry & HUGE != 0 {
            return None;
        }
        table = (entry & ADDRESS) as *const u64;
    }
    Some(table.wrapping_add(((addr >> 21) as usize) & (ENTRIES - 1)) as *mut u64)
}

/// Physical address width the CPU reports (CPUID 0x80000008 EAX[7:0]); 36 without the leaf.
pub fn phys_bits() -> u32 {
    use core::arch::x86_64::__cpuid;
    if __cpuid(0x8000_0000).eax < 0x8000_0008 {
        return 36;
    }
    (__cpuid(0x8000_0008).eax & 0xff).clamp(32, 52)
}
