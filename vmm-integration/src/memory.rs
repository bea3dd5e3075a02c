// SPDX-License-Identifier: Apache-2.0
//! Guest RAM: its placement around the 32-bit hole, its backing (anonymous, memfd when shared,
//! hugetlb memfd with huge pages) and the memory map the guest is told about.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::config::MemoryConfig;
use crate::layout;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Failed to create the memfd backing guest RAM")]
    CreateMemfd(#[source] std::io::Error),
    #[error("Failed to size the memfd backing guest RAM to {0} bytes")]
    SizeMemfd(u64, #[source] std::io::Error),
    #[error("Failed to map guest RAM at {0:#x}")]
    MapRegion(u64, #[source] vm_memory::mmap::MmapRegionError),
    #[error("Guest RAM region at {0:#x} is invalid")]
    InvalidRegion(u64),
    #[error("Failed to assemble guest memory")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

/// The guest-physical RAM ranges for `size` bytes of RAM: below the 32-bit hole first, the
/// rest from 4 GiB up.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(layout::LOW_RAM_END);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(layout::HIGH_RAM_START), size - low));
    }
    ranges
}

/// End (exclusive) of guest RAM in guest-physical space.
pub fn ram_end(size: u64) -> u64 {
    ram_ranges(size)
        .last()
        .map_or(0, |(start, len)| start.0 + len)
}

/// Map guest RAM as the configuration asks.
pub fn create_guest_memory(cfg: &MemoryConfig) -> Result<GuestMemoryMmap, MemoryError> {
    let memfd = if cfg.backed_by_shared_memory() {
        Some(create_memfd(cfg.size, cfg.hugepages)?)
    } else {
        None
    };
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (start, len) in ram_ranges(cfg.size) {
        let mut builder = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_hugetlbfs(cfg.hugepages);
        builder = match &memfd {
            Some(file) => {
                let fd = file.try_clone().map_err(MemoryError::CreateMemfd)?;
                // Huge pages are reserved at mmap time (no MAP_NORESERVE), so a host without
                // enough of them fails here rather than with SIGBUS on a guest access.
                let flags = if cfg.hugepages {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_SHARED | libc::MAP_NORESERVE
                };
                builder
                    .with_file_offset(FileOffset::new(fd, file_offset))
                    .with_mmap_flags(flags)
            }
            None => builder
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
        };
        let mapping = builder
            .build()
            .map_err(|e| MemoryError::MapRegion(start.0, e))?;
        regions
            .push(GuestRegionMmap::new(mapping, start).ok_or(MemoryError::InvalidRegion(start.0))?);
        file_offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Collection)
}

fn create_memfd(size: u64, hugepages: bool) -> Result<File, MemoryError> {
    let mut flags = libc::MFD_CLOEXEC;
    if hugepages {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: the name is a valid NUL-terminated string and the flags are valid; the call
    // only returns a new descriptor or -1.
    let fd = unsafe { libc::memfd_create(c"ism-vmm-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(MemoryError::CreateMemfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| MemoryError::SizeMemfd(size, e))?;
    Ok(file)
}

/// KVM memory slot numbers for the whole VM. Guest RAM takes the first ones at startup
/// (`first_free` is what is left after it); devices that map memory into the guest (the
/// virtio-ism window) take and give back the rest, so no two users ever share a slot.
#[derive(Debug)]
pub struct MemorySlots {
    state: std::sync::Mutex<SlotState>,
}

#[derive(Debug)]
struct SlotState {
    next: u32,
    limit: u32,
    free: Vec<u32>,
}

impl MemorySlots {
    /// Slots `first_free..limit` are available (`limit` is KVM_CAP_NR_MEMSLOTS).
    pub fn new(first_free: u32, limit: u32) -> Self {
        Self {
            state: std::sync::Mutex::new(SlotState {
                next: first_free,
                limit,
                free: Vec::new(),
            }),
        }
    }

    /// A free slot number, or `None` when KVM has no more.
    pub fn allocate(&self) -> Option<u32> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = s.free.pop() {
            return Some(slot);
        }
        (s.next < s.limit).then(|| {
            s.next += 1;
            s.next - 1
        })
    }

    /// Give back a slot from [`Self::allocate`] (the caller has deleted it in KVM).
    pub fn free(&self, slot: u32) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert!(slot < s.next && !s.free.contains(&slot));
        s.free.push(slot);
    }
}

/// What a range of the guest-physical memory map is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Ram,
    Reserved,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub start: u64,
    pub size: u64,
    pub kind: MemoryKind,
}

/// The legacy EBDA/ROM area below 1 MiB, where the ACPI tables live: never RAM to the guest.
pub const LEGACY_HOLE_START: u64 = 0x9_fc00;

/// The memory map handed to the guest (e820 for bzImage, the PVH memmap for ELF), sorted.
pub fn boot_memory_map(ram_size: u64) -> Vec<MemoryMapEntry> {
    let mut map = Vec::new();
    for (start, len) in ram_ranges(ram_size) {
        if start.0 == 0 {
            map.push(MemoryMapEntry {
                start: 0,
                size: LEGACY_HOLE_START,
                kind: MemoryKind::Ram,
            });
            map.push(MemoryMapEntry {
                start: LEGACY_HOLE_START,
                size: layout::KERNEL_START - LEGACY_HOLE_START,
                kind: MemoryKind::Reserved,
            });
            if len > layout::KERNEL_START {
                map.push(MemoryMapEntry {
                    start: layout::KERNEL_START,
                    size: len - layout::KERNEL_START,
                    kind: MemoryKind::Ram,
                });
            }
            // Linux trusts the MCFG area only when the memory map reserves it.
            map.push(MemoryMapEntry {
                start: layout::PCI_ECAM_START,
                size: layout::PCI_ECAM_SIZE,
                kind: MemoryKind::Reserved,
            });
        } else {
            map.push(MemoryMapEntry {
                start: start.0,
                size: len,
                kind: MemoryKind::Ram,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn test_memory_slots_are_unique_and_reused() {
        let slots = MemorySlots::new(2, 5);
        let got: Vec<u32> = std::iter::from_fn(|| slots.allocate()).collect();
        assert_eq!(got, vec![2, 3, 4]);
        slots.free(3);
        assert_eq!(slots.allocate(), Some(3));
        assert_eq!(slots.allocate(), None);
    }

    #[test]
    fn test_ram_is_split_around_the_32bit_hole() {
        let small = ram_ranges(512 << 20);
        assert_eq!(small, vec![(GuestAddress(0), 512 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), layout::LOW_RAM_END));
        assert_eq!(
            big[1],
            (
                GuestAddress(layout::HIGH_RAM_START),
                (4 << 30) - layout::LOW_RAM_END
            )
        );
        assert_eq!(ram_end(4 << 30), layout::HIGH_RAM_START + (1 << 30));
    }

    #[test]
    fn test_boot_memory_map_is_sorted_and_never_overlaps() {
        for size in [64u64 << 20, 3 << 30, 5 << 30] {
            let map = boot_memory_map(size);
            for pair in map.windows(2) {
                assert!(pair[0].start + pair[0].size <= pair[1].start, "{map:?}");
            }
            let ram: u64 = map
                .iter()
                .filter(|e| e.kind == MemoryKind::Ram)
                .map(|e| e.size)
                .sum();
            // Only the legacy hole below 1 MiB is taken away from RAM.
            assert_eq!(ram, size - (layout::KERNEL_START - LEGACY_HOLE_START));
            assert!(
                map.iter()
                    .any(|e| e.start == layout::PCI_ECAM_START && e.kind == MemoryKind::Reserved)
            );
        }
    }

    #[test]
    fn test_shared_memory_is_one_memfd_across_regions() {
        let cfg = MemoryConfig {
            size: 16 << 20,
            shared: true,
            hugepages: false,
        };
        let mem = create_guest_memory(&cfg).unwrap();
        assert_eq!(mem.num_regions(), 1);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(region.file_offset().is_some());
        let anon = create_guest_memory(&MemoryConfig {
            size: 16 << 20,
            ..Default::default()
        })
        .unwrap();
        assert!(
            anon.find_region(GuestAddress(0))
                .unwrap()
                .file_offset()
                .is_none()
        );
    }
}
