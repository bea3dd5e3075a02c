// SPDX-License-Identifier: Apache-2.0
//! The Linux zero page (`boot_params`) for a bzImage entered at its 64-bit entry point.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootError, BootInputs, LoadedInitramfs};
use crate::layout;
use crate::memory::{MemoryKind, boot_memory_map};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id.
const KERNEL_LOADER_OTHER: u8 = 0xff;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

pub fn build_zero_page(
    inputs: &BootInputs,
    header: setup_header,
    cmdline: &[u8],
    initramfs: Option<LoadedInitramfs>,
) -> boot_params {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    // Without the trailing NUL.
    params.hdr.cmdline_size = cmdline.len().saturating_sub(1) as u32;
    if let Some(initrd) = initramfs {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = inputs.rsdp_addr;
    let map = boot_memory_map(inputs.ram_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(map.iter()) {
        *slot = boot_e820_entry {
            addr: entry.start,
            size: entry.size,
            r#type: match entry.kind {
                MemoryKind::Ram => E820_RAM,
                MemoryKind::Reserved => E820_RESERVED,
            },
        };
    }
    params.e820_entries = map.len().min(params.e820_table.len()) as u8;
    params
}

pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    inputs: &BootInputs,
    header: setup_header,
    cmdline: &[u8],
    initramfs: Option<LoadedInitramfs>,
) -> Result<(), BootError> {
    let params = build_zero_page(inputs, header, cmdline, initramfs);
    let boot = BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(BootError::WriteZeroPage)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PayloadConfig;

    #[test]
    fn test_zero_page_has_e820_cmdline_initrd_and_rsdp() {
        let payload = PayloadConfig {
            kernel: "/k".into(),
            initramfs: None,
            cmdline: String::new(),
        };
        let inputs = BootInputs {
            payload: &payload,
            ram_size: 5 << 30,
            rsdp_addr: layout::RSDP_START,
            linux_extra_cmdline: None,
        };
        let p = build_zero_page(
            &inputs,
            setup_header::default(),
            b"console=ttyS0\0",
            Some(LoadedInitramfs {
                addr: 0x1000_0000,
                size: 77,
            }),
        );
        let hdr = p.hdr;
        assert_eq!({ hdr.cmdline_size }, 13);
        assert_eq!({ hdr.ramdisk_image }, 0x1000_0000);
        assert_eq!({ hdr.ramdisk_size }, 77);
        assert_eq!({ hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.acpi_rsdp_addr }, layout::RSDP_START);
        let n = p.e820_entries as usize;
        assert_eq!(n, boot_memory_map(5 << 30).len());
        let table = p.e820_table;
        let last = table[n - 1];
        assert_eq!({ last.addr }, layout::HIGH_RAM_START);
        assert_eq!({ last.r#type }, E820_RAM);
        let ram: u64 = table[..n]
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert!(ram < 5 << 30 && ram > (5 << 30) - (1 << 20));
    }
}
