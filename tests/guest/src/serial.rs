// SPDX-License-Identifier: Apache-2.0
//! Polled COM1 output and the `ISM-TEST` report lines.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::io::{inb, outb};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const FCR: u16 = COM1 + 2;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_DATA_READY: u8 = 0x01;
/// 16550 transmit FIFO depth: once THRE is seen, this many bytes may be written.
const FIFO_DEPTH: u32 = 16;

/// Bytes that may still be written before THRE must be polled again (0 = FIFO state
/// unknown). Every port access is a VM exit, so polling once per FIFO-full halves the exits
/// per byte. Single CPU, ring 3 only.
static FIFO_ROOM: AtomicU32 = AtomicU32::new(0);
static FIFO_ENABLED: AtomicBool = AtomicBool::new(false);

/// Write one byte, waiting (boundedly) for room in the transmit FIFO.
pub fn write_byte(byte: u8) {
    if !FIFO_ENABLED.swap(true, Ordering::Relaxed) {
        outb(FCR, 0x07); // enable and clear the FIFOs, once, before the first byte
    }
    let mut room = FIFO_ROOM.load(Ordering::Relaxed);
    if room == 0 {
        for _ in 0..100_000 {
            if inb(LSR) & LSR_THR_EMPTY != 0 {
                break;
            }
        }
        room = FIFO_DEPTH;
    }
    outb(COM1, byte);
    FIFO_ROOM.store(room - 1, Ordering::Relaxed);
}

/// One received byte, if the receive FIFO holds one (RBR at COM1 + 0 with DLAB clear).
pub fn read_byte() -> Option<u8> {
    (inb(LSR) & LSR_DATA_READY != 0).then(|| inb(COM1))
}

/// A `core::fmt::Write` onto COM1 that turns `\n` into `\r\n`.
pub struct Serial;

impl core::fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                write_byte(b'\r');
            }
            write_byte(byte);
        }
        Ok(())
    }
}

/// Print one `ISM-TEST ...` line.
macro_rules! report {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = write!($crate::serial::Serial, "ISM-TEST ");
        let _ = writeln!($crate::serial::Serial, $($arg)*);
    }};
}
