// SPDX-License-Identifier: Apache-2.0
//! Legacy port-I/O devices: the COM1 serial port, the CMOS RTC, the ACPI power/reset port and
//! the i8042 reset line.

pub mod cmos;
pub mod power;
pub mod serial;
