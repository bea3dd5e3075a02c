// SPDX-License-Identifier: Apache-2.0
//! Port I/O (ring 3 with IOPL 3) and reads of physical memory (identity mapped).

use core::arch::asm;

/// Read a byte from `port`.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port I/O has no memory effects; IOPL 3 allows it in ring 3.
    unsafe { asm!("in al, dx", out("al") value, in("dx") port, options(nomem, nostack)) };
    value
}

/// Read a word from `port`.
pub fn inw(port: u16) -> u16 {
    let value: u16;
    // SAFETY: as in inb.
    unsafe { asm!("in ax, dx", out("ax") value, in("dx") port, options(nomem, nostack)) };
    value
}

/// Read a dword from `port`.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as in inb.
    unsafe { asm!("in eax, dx", out("eax") value, in("dx") port, options(nomem, nostack)) };
    value
}

/// Write a byte to `port`.
pub fn outb(port: u16, value: u8) {
    // SAFETY: as in inb.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// Write a word to `port`.
pub fn outw(port: u16, value: u16) {
    // SAFETY: as in inb.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack)) };
}

/// Write a dword to `port`.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as in inb.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) };
}

/// Copy `out.len()` bytes of guest-physical memory at `addr`. Only for firmware-provided
/// memory (boot info, ACPI tables) in the identity-mapped, write-back low RAM.
pub fn read_phys(addr: u64, out: &mut [u8]) -> bool {
    let Some(end) = addr.checked_add(out.len() as u64) else {
        return false;
    };
    if addr == 0 || end > crate::paging::BOOT_RAM_END {
        return false;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        // SAFETY: the range is inside the identity-mapped, present low RAM (checked above).
        *byte = unsafe { ((addr as usize + i) as *const u8).read_volatile() };
    }
    true
}

/// Read a little-endian `u32` of guest-physical memory.
pub fn phys_u32(addr: u64) -> Option<u32> {
    let mut b = [0u8; 4];
    read_phys(addr, &mut b).then(|| u32::from_le_bytes(b))
}

/// Read a little-endian `u64` of guest-physical memory.
pub fn phys_u64(addr: u64) -> Option<u64> {
    let mut b = [0u8; 8];
    read_phys(addr, &mut b).then(|| u64::from_le_bytes(b))
}
