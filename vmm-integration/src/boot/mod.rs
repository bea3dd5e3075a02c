// SPDX-License-Identifier: Apache-2.0
//! Loading the guest payload and writing what its entry protocol expects.
//!
//! An ELF kernel must carry a PVH note (as cloud-hypervisor boots vmlinux): it is entered in
//! 32-bit protected mode with %ebx pointing at `hvm_start_info`. A bzImage is entered at its
//! 64-bit entry with %rsi pointing at the zero page. Both get the same memory map, command
//! line, initramfs and RSDP address.

pub mod bzimage;
pub mod cpu;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::PayloadConfig;
use crate::layout;
use crate::memory;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Failed to open kernel {0}")]
    OpenKernel(PathBuf, #[source] std::io::Error),
    #[error("Failed to read kernel {0}")]
    ReadKernel(PathBuf, #[source] std::io::Error),
    #[error("Failed to load kernel {0}")]
    LoadKernel(PathBuf, #[source] linux_loader::loader::Error),
    #[error("Kernel {0} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")]
    NoPvhEntry(PathBuf),
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("Failed to write the kernel command line")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("Failed to open initramfs {0}")]
    OpenInitramfs(PathBuf, #[source] std::io::Error),
    #[error("Initramfs {0} ({1} bytes) does not fit in guest RAM above the kernel")]
    InitramfsTooLarge(PathBuf, u64),
    #[error("Failed to load initramfs {0}")]
    LoadInitramfs(PathBuf, #[source] vm_memory::GuestMemoryError),
    #[error("Failed to write the PVH start info")]
    WritePvh(#[source] linux_loader::configurator::Error),
    #[error("Failed to write the zero page")]
    WriteZeroPage(#[source] linux_loader::configurator::Error),
    #[error("Failed to write the boot GDT or page tables")]
    WriteCpuTables(#[source] vm_memory::GuestMemoryError),
    #[error("bzImage {0} has no setup header")]
    NoSetupHeader(PathBuf),
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode at `entry`, %ebx = `start_info`.
    Pvh { entry: u64, start_info: u64 },
    /// Linux 64-bit boot protocol: long mode at `entry`, %rsi = `zero_page`.
    Linux64 { entry: u64, zero_page: u64 },
}

/// Everything the loaded payload needs from the rest of the VM.
pub struct BootInputs<'a> {
    pub payload: &'a PayloadConfig,
    pub ram_size: u64,
    pub rsdp_addr: u64,
    /// Parameters appended to a Linux guest's command line (the PVM policy's).
    pub linux_extra_cmdline: Option<&'a str>,
}

/// A guest module placed in guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedInitramfs {
    pub addr: u64,
    pub size: u64,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";

/// Load kernel, command line and initramfs into `mem` and write the boot structures.
pub fn load_payload(mem: &GuestMemoryMmap, inputs: &BootInputs) -> Result<BootEntry, BootError> {
    let path = &inputs.payload.kernel;
    let mut kernel = File::open(path).map_err(|e| BootError::OpenKernel(path.clone(), e))?;
    let mut magic = [0u8; 4];
    let is_elf = match kernel.read_exact(&mut magic) {
        Ok(()) => magic == ELF_MAGIC,
        // Too short for an ELF header: let the bzImage loader say what is wrong with it.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => false,
        Err(e) => return Err(BootError::ReadKernel(path.clone(), e)),
    };
    let high = Some(GuestAddress(layout::KERNEL_START));
    let load_err = |e| BootError::LoadKernel(path.clone(), e);

    if is_elf {
        let loaded = Elf::load(mem, None, &mut kernel, high).map_err(load_err)?;
        let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
            return Err(BootError::NoPvhEntry(path.clone()));
        };
        let is_linux = elf_has_linux_note(&mut kernel);
        let cmdline = write_cmdline(mem, inputs, is_linux)?;
        let initramfs = load_initramfs(mem, inputs, loaded.kernel_end, None)?;
        pvh::write_start_info(mem, inputs, &cmdline, initramfs)?;
        Ok(BootEntry::Pvh {
            entry: entry.0,
            start_info: layout::PVH_START_INFO,
        })
    } else {
        let loaded = BzImage::load(mem, None, &mut kernel, high).map_err(load_err)?;
        let header = loaded
            .setup_header
            .ok_or_else(|| BootError::NoSetupHeader(path.clone()))?;
        let cmdline = write_cmdline(mem, inputs, true)?;
        let initramfs = load_initramfs(
            mem,
            inputs,
            loaded.kernel_end,
            Some(u64::from(header.initrd_addr_max)),
        )?;
        bzimage::write_zero_page(mem, inputs, header, &cmdline, initramfs)?;
        Ok(BootEntry::Linux64 {
            // The 64-bit entry point sits 0x200 past the protected-mode kernel's start.
            entry: loaded.kernel_load.0 + 0x200,
            zero_page: layout::ZERO_PAGE_START,
        })
    }
}

/// The command line the guest gets, written at CMDLINE_START. Returns it with its NUL.
fn write_cmdline(
    mem: &GuestMemoryMmap,
    inputs: &BootInputs,
    is_linux: bool,
) -> Result<Vec<u8>, BootError> {
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    // Policy parameters go with the kernel's, never after "--" where init would get them.
    let (kernel_args, init_args) = split_init_args(&inputs.payload.cmdline);
    if !kernel_args.is_empty() {
        cmdline
            .insert_str(kernel_args)
            .map_err(BootError::Cmdline)?;
    }
    if let (true, Some(extra)) = (is_linux, inputs.linux_extra_cmdline) {
        for param in missing_params(kernel_args, extra) {
            cmdline.insert_str(param).map_err(BootError::Cmdline)?;
        }
    }
    if let Some(init_args) = init_args {
        cmdline
            .insert_init_args(init_args)
            .map_err(BootError::Cmdline)?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(BootError::WriteCmdline)?;
    Ok(cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .into_bytes_with_nul())
}

/// Split a command line at the first `--` word: the kernel's parameters, then init's
/// arguments (None when there is no `--`).
fn split_init_args(cmdline: &str) -> (&str, Option<&str>) {
    let padded_at = format!(" {cmdline} ").find(" -- ");
    match padded_at {
        // `i` indexes the padded string, where a leading space was added.
        Some(i) => {
            let kernel = cmdline.get(..i.saturating_sub(1)).unwrap_or_default();
            let init = cmdline.get(i + 2..).unwrap_or_default();
            (kernel.trim(), Some(init.trim()).filter(|s| !s.is_empty()))
        }
        None => (cmdline.trim(), None),
    }
}

/// The parameters of `extra` whose key (the text before `=`) the user's command line does
/// not already set: the user's choice wins.
fn missing_params<'a>(user: &str, extra: &'a str) -> Vec<&'a str> {
    let key = |p: &str| p.split('=').next().unwrap_or_default().to_owned();
    let user_keys: Vec<String> = user.split_whitespace().map(key).collect();
    extra
        .split_whitespace()
        .filter(|p| !user_keys.contains(&key(p)))
        .collect()
}

/// Place the initramfs page-aligned at the top of low RAM (below `max_addr` if given),
/// above the kernel.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    inputs: &BootInputs,
    kernel_end: u64,
    max_addr: Option<u64>,
) -> Result<Option<LoadedInitramfs>, BootError> {
    let Some(path) = &inputs.payload.initramfs else {
        return Ok(None);
    };
    let mut file = File::open(path).map_err(|e| BootError::OpenInitramfs(path.clone(), e))?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| BootError::OpenInitramfs(path.clone(), e))?;
    file.rewind()
        .map_err(|e| BootError::OpenInitramfs(path.clone(), e))?;
    let addr = initramfs_address(inputs.ram_size, kernel_end, size, max_addr)
        .ok_or_else(|| BootError::InitramfsTooLarge(path.clone(), size))?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| BootError::LoadInitramfs(path.clone(), e))?;
    Ok(Some(LoadedInitramfs { addr, size }))
}

/// The highest page-aligned address below the end of low RAM (and `max_addr`) that holds
/// `size` bytes without touching the kernel.
pub fn initramfs_address(
    ram_size: u64,
    kernel_end: u64,
    size: u64,
    max_addr: Option<u64>,
) -> Option<u64> {
    let low_end = memory::ram_ranges(ram_size)
        .first()
        .map_or(0, |(start, len)| start.0 + len);
    let limit = match max_addr {
        Some(max) if max > 0 => low_end.min(max.saturating_add(1)),
        _ => low_end,
    };
    let addr = limit.checked_sub(size)? & !0xfff;
    (addr >= kernel_end && size > 0).then_some(addr)
}

/// Whether an ELF kernel carries a note named "Linux" (every vmlinux does): the PVM kernel
/// parameters are only for Linux guests.
fn elf_has_linux_note(file: &mut File) -> bool {
    read_note_names(file).is_ok_and(|names| names.iter().any(|n| n == b"Linux"))
}

fn read_note_names(file: &mut File) -> std::io::Result<Vec<Vec<u8>>> {
    const PT_NOTE: u32 = 4;
    const MAX_NOTE_SEGMENT: u64 = 1 << 20;
    let mut ehdr = [0u8; 64];
    file.rewind()?;
    file.read_exact(&mut ehdr)?;
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().unwrap_or_default());
    let phentsize = u64::from(u16::from_le_bytes([ehdr[54], ehdr[55]]));
    let phnum = u64::from(u16::from_le_bytes([ehdr[56], ehdr[57]]));
    let mut names = Vec::new();
    for i in 0..phnum {
        let mut phdr = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * phentsize))?;
        file.read_exact(&mut phdr)?;
        if u32::from_le_bytes(phdr[0..4].try_into().unwrap_or_default()) != PT_NOTE {
            continue;
        }
        let offset = u64::from_le_bytes(phdr[8..16].try_into().unwrap_or_default());
        let filesz = u64::from_le_bytes(phdr[32..40].try_into().unwrap_or_default());
        let mut notes = vec![0u8; filesz.min(MAX_NOTE_SEGMENT) as usize];
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut notes)?;
        names.extend(parse_note_names(&notes));
    }
    Ok(names)
}

/// The names of the notes in one PT_NOTE segment (4-byte aligned fields).
fn parse_note_names(mut notes: &[u8]) -> Vec<Vec<u8>> {
    let word = |b: &[u8], at: usize| -> Option<usize> {
        Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize)
    };
    let mut names = Vec::new();
    while let (Some(namesz), Some(descsz)) = (word(notes, 0), word(notes, 4)) {
        let name_end = 12usize.saturating_add(namesz);
        let Some(name) = notes.get(12..name_end) else {
            break;
        };
        names.push(name.strip_suffix(&[0]).unwrap_or(name).to_vec());
        let next = name_end
            .div_ceil(4)
            .saturating_mul(4)
            .saturating_add(descsz.div_ceil(4).saturating_mul(4));
        match notes.get(next..) {
            Some(rest) => notes = rest,
            None => break,
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_initramfs_goes_to_top_of_low_ram_page_aligned() {
        let addr = initramfs_address(64 << 20, 0x200_0000, 0x1234, None).unwrap();
        assert_eq!(addr, ((64 << 20) - 0x1234) & !0xfff);
        assert!(addr + 0x1234 <= 64 << 20);
        // Above 3 GiB of RAM the low part ends at the 32-bit hole.
        let addr = initramfs_address(8 << 30, 0x200_0000, 0x1000, None).unwrap();
        assert_eq!(addr, layout::LOW_RAM_END - 0x1000);
        // bzImage's initrd_addr_max caps it.
        let addr = initramfs_address(2 << 30, 0x200_0000, 0x1000, Some(0x37ff_ffff)).unwrap();
        assert_eq!(addr, 0x3800_0000 - 0x1000);
        // Too big to fit above the kernel.
        assert_eq!(initramfs_address(64 << 20, 60 << 20, 8 << 20, None), None);
        assert_eq!(initramfs_address(64 << 20, 0, 128 << 20, None), None);
    }

    #[test]
    fn test_policy_params_never_override_the_users() {
        let extra = "noxsave clearcpuid=cx16,popcnt,smap pvm_native_fixups";
        assert_eq!(
            missing_params("console=ttyS0", extra),
            vec![
                "noxsave",
                "clearcpuid=cx16,popcnt,smap",
                "pvm_native_fixups"
            ]
        );
        assert_eq!(
            missing_params("clearcpuid=cx16 pvm_native_fixups quiet", extra),
            vec!["noxsave"]
        );
        assert!(missing_params(extra, extra).is_empty());
    }

    #[test]
    fn test_init_args_stay_after_the_separator() {
        assert_eq!(split_init_args("console=ttyS0"), ("console=ttyS0", None));
        assert_eq!(
            split_init_args("console=ttyS0 -- cat /proc/cmdline"),
            ("console=ttyS0", Some("cat /proc/cmdline"))
        );
        assert_eq!(split_init_args("-- sh -c x"), ("", Some("sh -c x")));
        assert_eq!(split_init_args("quiet --"), ("quiet", None));
        // "--" inside a word is not the separator.
        assert_eq!(split_init_args("a=--b c"), ("a=--b c", None));

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let payload = PayloadConfig {
            kernel: "/k".into(),
            initramfs: None,
            cmdline: "console=ttyS0 -- echo hi".into(),
        };
        let inputs = BootInputs {
            payload: &payload,
            ram_size: 1 << 20,
            rsdp_addr: 0,
            linux_extra_cmdline: Some("noxsave"),
        };
        let written = write_cmdline(&mem, &inputs, true).unwrap();
        assert_eq!(written, b"console=ttyS0 noxsave -- echo hi\0");
        let mut in_guest = vec![0u8; written.len()];
        mem.read_slice(&mut in_guest, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(in_guest, written);
    }

    #[test]
    fn test_parse_note_names() {
        let mut seg = Vec::new();
        for (name, desc) in [(&b"Xen\0"[..], &[1u8, 2, 3, 4, 5][..]), (b"Linux\0", &[9])] {
            seg.extend_from_slice(&(name.len() as u32).to_le_bytes());
            seg.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            seg.extend_from_slice(&18u32.to_le_bytes());
            seg.extend_from_slice(name);
            seg.resize(seg.len().div_ceil(4) * 4, 0);
            seg.extend_from_slice(desc);
            seg.resize(seg.len().div_ceil(4) * 4, 0);
        }
        assert_eq!(
            parse_note_names(&seg),
            vec![b"Xen".to_vec(), b"Linux".to_vec()]
        );
        // Truncated or garbage segments end the walk without panicking.
        assert!(parse_note_names(&seg[..10]).is_empty());
        assert!(parse_note_names(&[0xff; 16]).is_empty());
    }
}
