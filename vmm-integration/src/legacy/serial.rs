// SPDX-License-Identifier: Apache-2.0
//! The 16550 UART on COM1 (vm-superio's `Serial`): output to stdout, a file or nowhere, input
//! from stdin, interrupt through an irqfd on COM1_IRQ.

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vm_device::MutDevicePio;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial interrupt by signalling an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where serial output goes.
pub type SerialOutput = Box<dyn Write + Send>;

pub fn stdout_output() -> SerialOutput {
    Box::new(io::stdout())
}

pub fn file_output(path: &Path) -> io::Result<SerialOutput> {
    Ok(Box::new(
        OpenOptions::new().create(true).append(true).open(path)?,
    ))
}

pub fn null_output() -> SerialOutput {
    Box::new(io::sink())
}

pub struct SerialDevice<T: Trigger> {
    serial: Serial<T, NoEvents, SerialOutput>,
}

impl<T: Trigger> SerialDevice<T> {
    pub fn new(trigger: T, out: SerialOutput) -> Self {
        Self {
            serial: Serial::new(trigger, out),
        }
    }

    /// Queue guest input; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl<T: Trigger> MutDevicePio for SerialDevice<T> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0);
        if let (Some(first), Ok(offset)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.serial.read(offset);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Some(&value), Ok(offset)) = (data.first(), u8::try_from(offset))
            && let Err(e) = self.serial.write(offset, value)
        {
            log::debug!("Serial write failed: {e:?}");
        }
    }
}

/// Feed stdin to the serial port from a thread named "serial-input" until stdin closes.
pub fn spawn_stdin_reader<T: Trigger + Send + 'static>(
    dev: Arc<Mutex<SerialDevice<T>>>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("serial-input".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::Thread::SerialInput);
            let mut stdin = io::stdin().lock();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("Serial input from stdin stopped: {e}");
                        return;
                    }
                };
                let mut pending = &buf[..n];
                while !pending.is_empty() {
                    let taken = dev
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .enqueue_input(pending);
                    pending = &pending[taken..];
                    if !pending.is_empty() {
                        // The guest has not drained its FIFO yet.
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_thr_writes_reach_output_and_input_raises_irq() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let mut dev = SerialDevice::new(
            EventFdTrigger::new(evt.try_clone().unwrap()),
            Box::new(out.clone()),
        );
        for b in b"hi" {
            dev.pio_write(PioAddress(0x3f8), 0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
        // Enable the received-data interrupt (IER bit 0), then queue input.
        dev.pio_write(PioAddress(0x3f8), 1, &[1]);
        assert_eq!(dev.enqueue_input(b"x"), 1);
        assert_eq!(evt.read().unwrap(), 1);
        let mut b = [0u8; 1];
        dev.pio_read(PioAddress(0x3f8), 0, &mut b);
        assert_eq!(b[0], b'x');
        // A wide read gets the register in byte 0 and zeros after it.
        let mut w = [0xaa; 4];
        dev.pio_read(PioAddress(0x3f8), 5, &mut w);
        assert_eq!(&w[1..], &[0, 0, 0]);
    }
}
