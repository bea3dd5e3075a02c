// SPDX-License-Identifier: Apache-2.0
//! The PVH start info: `hvm_start_info` at PVH_START_INFO, the memory map at MEMMAP_START and
//! the initramfs as module 0.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootError, BootInputs, LoadedInitramfs};
use crate::layout;
use crate::memory::{MemoryKind, boot_memory_map};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Memory map types, as in e820.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

pub fn memmap_entries(ram_size: u64) -> Vec<hvm_memmap_table_entry> {
    boot_memory_map(ram_size)
        .into_iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.start,
            size: e.size,
            type_: match e.kind {
                MemoryKind::Ram => E820_RAM,
                MemoryKind::Reserved => E820_RESERVED,
            },
            reserved: 0,
        })
        .collect()
}

pub fn write_start_info(
    mem: &GuestMemoryMmap,
    inputs: &BootInputs,
    _cmdline: &[u8],
    initramfs: Option<LoadedInitramfs>,
) -> Result<(), BootError> {
    let memmap = memmap_entries(inputs.ram_size);
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: inputs.rsdp_addr,
        memmap_paddr: layout::MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initramfs
        .map(|i| hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        start_info.nr_modules = modules.len() as u32;
        start_info.modlist_paddr = layout::PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(layout::PVH_START_INFO));
    params.set_sections(&memmap, GuestAddress(layout::MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(layout::PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::WritePvh)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PayloadConfig;
    use vm_memory::Bytes;

    #[test]
    fn test_start_info_points_at_memmap_cmdline_rsdp_and_module() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let payload = PayloadConfig {
            kernel: "/k".into(),
            initramfs: None,
            cmdline: String::new(),
        };
        let inputs = BootInputs {
            payload: &payload,
            ram_size: 64 << 20,
            rsdp_addr: layout::RSDP_START,
            linux_extra_cmdline: None,
        };
        let initrd = LoadedInitramfs {
            addr: 0x300_0000,
            size: 0x1234,
        };
        write_start_info(&mem, &inputs, b"\0", Some(initrd)).unwrap();
        let si: hvm_start_info = mem.read_obj(GuestAddress(layout::PVH_START_INFO)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.rsdp_paddr, layout::RSDP_START);
        assert_eq!(si.cmdline_paddr, layout::CMDLINE_START);
        assert_eq!(si.nr_modules, 1);
        let m: hvm_modlist_entry = mem.read_obj(GuestAddress(si.modlist_paddr)).unwrap();
        assert_eq!((m.paddr, m.size), (0x300_0000, 0x1234));
        assert_eq!(si.memmap_entries as usize, memmap_entries(64 << 20).len());
        let first: hvm_memmap_table_entry = mem.read_obj(GuestAddress(si.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.type_), (0, E820_RAM));
    }
}
