// SPDX-License-Identifier: Apache-2.0
//! The ACPI hardware-reduced sleep control / sleep status / reset register (one byte at
//! ACPI_SLEEP_PORT, as the FADT says) and the i8042 command port's reset command.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};

use crate::exit::{ExitEvent, ExitNotifier};
use crate::layout;

/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
/// The i8042 "pulse output line 0" command, wired to CPU reset on PCs.
const I8042_CMD_RESET: u8 = 0xfe;

/// Set once the guest asked for a reset; a triple fault after it is the reboot going through,
/// not a crash.
#[derive(Clone, Default)]
pub struct ResetRequested(Arc<AtomicBool>);

impl ResetRequested {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a write to the ACPI port asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerRequest {
    PowerOff,
    Reset,
    /// Sleep states other than S5, WAK_STS clears: ignored.
    None,
}

pub fn decode_acpi_write(value: u8) -> PowerRequest {
    if value == layout::ACPI_RESET_VALUE {
        return PowerRequest::Reset;
    }
    if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == layout::ACPI_S5_SLP_TYP {
        return PowerRequest::PowerOff;
    }
    PowerRequest::None
}

pub struct AcpiPowerPort {
    exit: ExitNotifier,
    reset: ResetRequested,
}

impl AcpiPowerPort {
    pub fn new(exit: ExitNotifier, reset: ResetRequested) -> Self {
        Self { exit, reset }
    }
}

impl MutDevicePio for AcpiPowerPort {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        // Sleep status: WAK_STS never set, nothing pending.
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match decode_acpi_write(value) {
            PowerRequest::PowerOff => self.exit.notify(ExitEvent::Shutdown("ACPI S5")),
            PowerRequest::Reset => {
                self.reset.set();
                self.exit.notify(ExitEvent::Reboot("ACPI reset register"));
            }
            PowerRequest::None => log::debug!("ACPI sleep port write {value:#x} ignored"),
        }
    }
}

/// The i8042 controller's command/status port: only the reset command does anything.
pub struct I8042ResetPort {
    exit: ExitNotifier,
    reset: ResetRequested,
}

impl I8042ResetPort {
    pub fn new(exit: ExitNotifier, reset: ResetRequested) -> Self {
        Self { exit, reset }
    }
}

impl MutDevicePio for I8042ResetPort {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        // Status: output buffer empty, input buffer empty: ready for a command.
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &[u8]) {
        if data.first() == Some(&I8042_CMD_RESET) {
            self.reset.set();
            self.exit.notify(ExitEvent::Reboot("i8042 reset"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_decode_acpi_writes() {
        assert_eq!(
            decode_acpi_write((5 << 2) | (1 << 5)),
            PowerRequest::PowerOff
        );
        assert_eq!(
            decode_acpi_write(layout::ACPI_RESET_VALUE),
            PowerRequest::Reset
        );
        // S5 type without SLP_EN, another sleep type, and WAK_STS clears do nothing.
        assert_eq!(decode_acpi_write(5 << 2), PowerRequest::None);
        assert_eq!(decode_acpi_write((3 << 2) | (1 << 5)), PowerRequest::None);
        assert_eq!(decode_acpi_write(0x80), PowerRequest::None);
    }

    #[test]
    fn test_ports_report_exit_events() {
        let (exit, rx) = ExitNotifier::new();
        let reset = ResetRequested::default();
        let mut acpi = AcpiPowerPort::new(exit.clone(), reset.clone());
        acpi.pio_write(PioAddress(0x3c0), 0, &[(5 << 2) | (1 << 5)]);
        assert_eq!(rx.try_recv().unwrap(), ExitEvent::Shutdown("ACPI S5"));
        assert!(!reset.is_set());
        acpi.pio_write(PioAddress(0x3c0), 0, &[]);
        assert!(rx.try_recv().is_err());
        let mut kbd = I8042ResetPort::new(exit, reset.clone());
        kbd.pio_write(PioAddress(0x64), 0, &[0xd1]);
        assert!(rx.try_recv().is_err());
        kbd.pio_write(PioAddress(0x64), 0, &[0xfe]);
        assert!(matches!(rx.try_recv().unwrap(), ExitEvent::Reboot(_)));
        assert!(reset.is_set());
    }
}
