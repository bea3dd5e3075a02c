// SPDX-License-Identifier: Apache-2.0
//! The local APIC in xAPIC mode, driven from ring 3 through its (user-mapped) MMIO page, and
//! the legacy PIC, which is masked so it never delivers vectors that alias exceptions.

use crate::io::outb;

const LAPIC_BASE: usize = 0xfee0_0000;
const ID: usize = 0x20;
const TPR: usize = 0x80;
const SVR: usize = 0xf0;
const LVT_TIMER: usize = 0x320;
const TIMER_INITIAL: usize = 0x380;
const TIMER_DIVIDE: usize = 0x3e0;
/// Spurious-interrupt vector (the stubs send no EOI for it).
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Vector of the local APIC timer.
pub const TIMER_VECTOR: u8 = 0x20;

fn write(reg: usize, value: u32) {
    // SAFETY: the LAPIC page is identity mapped, user-accessible and uncached; writing its
    // registers has no effect on memory the program uses.
    unsafe { ((LAPIC_BASE + reg) as *mut u32).write_volatile(value) }
}

fn read(reg: usize) -> u32 {
    // SAFETY: as in write.
    unsafe { ((LAPIC_BASE + reg) as *const u32).read_volatile() }
}

/// Mask both 8259 PICs and software-enable the local APIC. Returns its APIC ID.
pub fn init() -> u8 {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    write(TPR, 0);
    write(SVR, 0x100 | u32::from(SPURIOUS_VECTOR));
    (read(ID) >> 24) as u8
}

/// Start a periodic timer interrupt every `count` bus cycles (divide by 1).
pub fn start_periodic_timer(count: u32) {
    write(TIMER_DIVIDE, 0xb);
    write(LVT_TIMER, (1 << 17) | u32::from(TIMER_VECTOR));
    write(TIMER_INITIAL, count);
}

/// Stop the timer.
pub fn stop_timer() {
    write(LVT_TIMER, 1 << 16);
    write(TIMER_INITIAL, 0);
}
