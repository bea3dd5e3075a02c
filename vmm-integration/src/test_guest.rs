// SPDX-License-Identifier: Apache-2.0
//! Tiny PVH guests for tests: an ELF64 with one PT_LOAD at KERNEL_START holding 32-bit code
//! and a PT_NOTE with the Xen PHYS32_ENTRY note pointing at it.

use std::io::Write;

use vmm_sys_util::tempfile::TempFile;

use crate::layout;

const CODE_OFFSET: usize = 0x1000;
const NOTE_OFFSET: usize = 0x200;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// An ELF image whose PVH entry runs `code` (32-bit protected mode, flat segments).
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
    let entry = layout::KERNEL_START;
    let mut f = vec![0u8; CODE_OFFSET + code.len()];
    // ELF header.
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // ELFCLASS64
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&entry.to_le_bytes());
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // e_phnum
    // PT_LOAD.
    let load = &mut f[64..120];
    load[0..4].copy_from_slice(&1u32.to_le_bytes());
    load[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    load[8..16].copy_from_slice(&(CODE_OFFSET as u64).to_le_bytes());
    load[16..24].copy_from_slice(&entry.to_le_bytes());
    load[24..32].copy_from_slice(&entry.to_le_bytes());
    load[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    load[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    load[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    // PT_NOTE with one note: "Xen", PHYS32_ENTRY, the 32-bit entry address.
    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&4u32.to_le_bytes());
    note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(entry as u32).to_le_bytes());
    let phdr = &mut f[120..176];
    phdr[0..4].copy_from_slice(&4u32.to_le_bytes());
    phdr[4..8].copy_from_slice(&4u32.to_le_bytes());
    phdr[8..16].copy_from_slice(&(NOTE_OFFSET as u64).to_le_bytes());
    phdr[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
    phdr[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes());
    phdr[48..56].copy_from_slice(&4u64.to_le_bytes());
    f[NOTE_OFFSET..NOTE_OFFSET + note.len()].copy_from_slice(&note);
    f[CODE_OFFSET..].copy_from_slice(code);
    f
}

/// 32-bit code: `out dx, al` of each byte of `text` to COM1.
pub fn print_code(text: &[u8]) -> Vec<u8> {
    let port = layout::COM1_PORT.to_le_bytes();
    let mut code = vec![0x66, 0xba, port[0], port[1]]; // mov dx, COM1
    for b in text {
        code.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    code
}

/// 32-bit code: write `value` to I/O `port`.
pub fn out_code(port: u16, value: u8) -> Vec<u8> {
    let p = port.to_le_bytes();
    vec![0x66, 0xba, p[0], p[1], 0xb0, value, 0xee]
}

/// 32-bit code: `hlt` forever.
pub fn halt_code() -> Vec<u8> {
    vec![0xf4, 0xeb, 0xfd]
}

/// 32-bit code that loads an IDT whose #BP gate checks that the saved EIP is just past the
/// `int3` (a trap), prints "BP\n" (or "BAD\n") and powers off through the ACPI sleep port.
/// The handler does not return: the PVM emulator cannot run a 32-bit `iret`.
pub fn int3_code() -> Vec<u8> {
    let base = layout::KERNEL_START as u32;
    let power_off = out_code(layout::ACPI_SLEEP_PORT, (5 << 2) | (1 << 5));
    let mut code = vec![0xbc];
    code.extend_from_slice(&(layout::BOOT_STACK_POINTER as u32).to_le_bytes()); // mov esp, imm32
    let lidt_at = code.len();
    code.extend_from_slice(&[0x0f, 0x01, 0x1d, 0, 0, 0, 0]); // lidt [disp32]
    code.push(0xcc); // int3
    let after_int3 = base + code.len() as u32;
    code.extend(print_code(b"NO-BP\n"));
    code.extend(&power_off);
    code.extend(halt_code());

    let handler = base + code.len() as u32;
    code.extend_from_slice(&[0x8b, 0x04, 0x24]); // mov eax, [esp]
    code.push(0x3d); // cmp eax, imm32
    code.extend_from_slice(&after_int3.to_le_bytes());
    let mut good = print_code(b"BP\n");
    good.extend(&power_off);
    good.extend(halt_code());
    code.extend_from_slice(&[0x75, good.len() as u8]); // jne bad
    code.extend(good);
    code.extend(print_code(b"BAD\n"));
    code.extend(&power_off);
    code.extend(halt_code());

    while code.len() % 8 != 0 {
        code.push(0x90);
    }
    let idt = base + code.len() as u32;
    for vector in 0..4u32 {
        let gate: u64 = if vector == 3 {
            u64::from(handler & 0xffff)
                | (0x08 << 16)
                | (0x8e00u64 << 32)
                | (u64::from(handler >> 16) << 48)
        } else {
            0
        };
        code.extend_from_slice(&gate.to_le_bytes());
    }
    let idtr = base + code.len() as u32;
    code.extend_from_slice(&(4u16 * 8 - 1).to_le_bytes());
    code.extend_from_slice(&idt.to_le_bytes());
    code[lidt_at + 3..lidt_at + 7].copy_from_slice(&idtr.to_le_bytes());
    code
}

/// 32-bit code that reads dword 0 (vendor and device id) of PCI function 00:`dev`.0 through
/// the 0xcf8/0xcfc ports and prints "MATCH\n" if it equals `expected`, else "NO\n", then
/// powers off.
pub fn pci_probe_code(dev: u8, expected: u32) -> Vec<u8> {
    let address = 0x8000_0000u32 | (u32::from(dev) << 11);
    let power_off = out_code(layout::ACPI_SLEEP_PORT, (5 << 2) | (1 << 5));
    let mut code = vec![0x66, 0xba, 0xf8, 0x0c, 0xb8]; // mov dx, 0xcf8; mov eax, imm32
    code.extend_from_slice(&address.to_le_bytes());
    code.push(0xef); // out dx, eax
    code.extend_from_slice(&[0x66, 0xba, 0xfc, 0x0c, 0xed]); // mov dx, 0xcfc; in eax, dx
    code.push(0x3d); // cmp eax, imm32
    code.extend_from_slice(&expected.to_le_bytes());
    let mut found = print_code(b"MATCH\n");
    found.extend(&power_off);
    found.extend(halt_code());
    code.extend_from_slice(&[0x75, found.len() as u8]); // jne not_found
    code.extend(found);
    code.extend(print_code(b"NO\n"));
    code.extend(&power_off);
    code.extend(halt_code());
    code
}

pub fn write_temp(bytes: &[u8]) -> TempFile {
    let file = TempFile::new().unwrap();
    file.as_file().write_all(bytes).unwrap();
    file
}

pub fn kvm_available() -> bool {
    kvm_available_for("this test boots a guest")
}

/// Whether /dev/kvm is there; when not, one loud SKIPPED line saying what did not run, or a
/// failure when `ISM_REQUIRE_KVM` says KVM is expected here.
pub fn kvm_available_for(what: &str) -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var_os("ISM_REQUIRE_KVM").is_none(),
        "ISM_REQUIRE_KVM is set but /dev/kvm is missing: {what}"
    );
    println!("SKIPPED: /dev/kvm missing, {what}");
    false
}
