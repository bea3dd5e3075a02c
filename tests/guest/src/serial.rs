// SPDX-License-Identifier: Apache-2.0
//! Polled COM1 output and the `ISM-TEST` report lines.

use crate::io::{inb, outb};

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_THR_EMPTY: u8 = 0x20;

/// Write one byte, waiting (boundedly) for the transmitter.
pub fn write_byte(byte: u8) {
    for _ in 0..100_000 {
        if inb(LSR) & LSR_THR_EMPTY != 0 {
            break;
        }
    }
    outb(COM1, byte);
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
