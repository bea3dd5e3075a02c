// SPDX-License-Identifier: Apache-2.0
//! The boot vCPU's register state for each entry protocol, and the GDT, IDT and identity page
//! tables it needs in guest memory.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootEntry, BootError};
use crate::layout;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// GDT descriptor flags: G, D/B, L, AVL in the top nibble, then the access byte.
const GDT_CODE32: u16 = 0xc09b;
const GDT_CODE64: u16 = 0xa09b;
const GDT_DATA: u16 = 0xc093;
const GDT_TSS: u16 = 0x808b;

const CODE_INDEX: u16 = 1;
const DATA_INDEX: u16 = 2;
const TSS_INDEX: u16 = 3;

/// One GDT descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM segment register a descriptor loads.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            ((raw_limit << 12) | 0xfff) as u32
        } else {
            raw_limit as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn gdt_for(long_mode: bool) -> [u64; 4] {
    [
        0,
        gdt_entry(if long_mode { GDT_CODE64 } else { GDT_CODE32 }, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_TSS, 0, 0xfffff),
    ]
}

/// Write the GDT and an empty IDT, and fill the segment and descriptor-table registers.
fn setup_segments(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    long_mode: bool,
) -> Result<(), BootError> {
    let gdt = gdt_for(long_mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(BootError::WriteCpuTables)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(BootError::WriteCpuTables)?;
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);
    Ok(())
}

/// Identity-map the first 1 GiB with 2 MiB pages: enough for a kernel's 64-bit entry, which
/// builds its own tables right away.
fn setup_identity_paging(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(
        layout::PDPTE_START | PRESENT_RW,
        GuestAddress(layout::PML4_START),
    )
    .map_err(BootError::WriteCpuTables)?;
    mem.write_obj(
        layout::PDE_START | PRESENT_RW,
        GuestAddress(layout::PDPTE_START),
    )
    .map_err(BootError::WriteCpuTables)?;
    for i in 0..512u64 {
        mem.write_obj(
            (i << 21) | PRESENT_RW | PAGE_SIZE_2M,
            GuestAddress(layout::PDE_START + i * 8),
        )
        .map_err(BootError::WriteCpuTables)?;
    }
    Ok(())
}

/// Registers, special registers and FPU state for the boot vCPU at `entry`. `sregs` is the
/// vCPU's current state, which keeps KVM's defaults for what we do not set.
pub fn boot_vcpu_state(
    mem: &GuestMemoryMmap,
    entry: &BootEntry,
    mut sregs: kvm_sregs,
) -> Result<(kvm_regs, kvm_sregs, kvm_fpu), BootError> {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match *entry {
        BootEntry::Pvh { entry, start_info } => {
            // PVH: 32-bit protected mode, paging off, %ebx = hvm_start_info.
            setup_segments(mem, &mut sregs, false)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, zero_page } => {
            // Linux 64-bit boot protocol: long mode, identity paging, %rsi = boot_params.
            setup_segments(mem, &mut sregs, true)?;
            setup_identity_paging(mem)?;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsi = zero_page;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
        }
    }
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    Ok((regs, sregs, fpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_gdt_entries_round_trip_to_segments() {
        let code64 = segment_from_gdt(gdt_entry(GDT_CODE64, 0, 0xfffff), 1);
        assert_eq!(code64.l, 1);
        assert_eq!(code64.db, 0);
        assert_eq!(code64.type_, 0xb);
        assert_eq!(code64.limit, 0xffff_ffff);
        assert_eq!(code64.selector, 8);
        assert_eq!(code64.present, 1);
        assert_eq!(code64.s, 1);
        let code32 = segment_from_gdt(gdt_entry(GDT_CODE32, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let tss = segment_from_gdt(gdt_entry(GDT_TSS, 0, 0xfffff), 3);
        assert_eq!(tss.s, 0);
        assert_eq!(tss.type_, 0xb);
        let odd = segment_from_gdt(gdt_entry(0x0093, 0x1234_5678, 0xabcde), 2);
        assert_eq!(odd.base, 0x1234_5678);
        assert_eq!(odd.limit, 0xabcde);
        assert_eq!(odd.g, 0);
        // Known encoding: flat 64-bit code segment.
        assert_eq!(gdt_entry(GDT_CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn test_long_mode_state_maps_low_memory_and_points_rsi_at_zero_page() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let entry = BootEntry::Linux64 {
            entry: 0x100200,
            zero_page: layout::ZERO_PAGE_START,
        };
        let (regs, sregs, _) = boot_vcpu_state(&mem, &entry, kvm_sregs::default()).unwrap();
        assert_eq!(regs.rip, 0x100200);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cs.l, 1);
        let pde5: u64 = mem
            .read_obj(GuestAddress(layout::PDE_START + 5 * 8))
            .unwrap();
        assert_eq!(pde5 & !0xfff, 5 << 21);
        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPTE_START);
    }

    #[test]
    fn test_pvh_state_is_32bit_protected_mode_with_ebx() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let entry = BootEntry::Pvh {
            entry: 0x1000000,
            start_info: layout::PVH_START_INFO,
        };
        let (regs, sregs, _) = boot_vcpu_state(&mem, &entry, kvm_sregs::default()).unwrap();
        assert_eq!(regs.rbx, layout::PVH_START_INFO);
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!((sregs.cs.db, sregs.cs.l), (1, 0));
        assert_eq!(sregs.efer, 0);
    }
}
