// SPDX-License-Identifier: Apache-2.0
//! virtio-rng client (virtio 1.2, 5.4): one request queue of device-writable buffers.

use super::pci_transport::{TransportError, VirtioPciDevice};
use super::virtqueue::{Buffer, QueueError, SplitQueue};
use crate::platform::{DmaRegion, Platform};

/// Entries in the request queue; one request is in flight at a time.
const QUEUE_SIZE: u16 = 8;
/// Largest single request.
pub const MAX_REQUEST: usize = 4096;

/// Errors of the virtio-rng client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RngError {
    /// Transport setup or access failed.
    #[error("virtio-rng transport failed")]
    Transport(#[source] TransportError),
    /// The request queue failed.
    #[error("virtio-rng queue failed")]
    Queue(#[source] QueueError),
    /// No DMA memory for the buffer.
    #[error("No DMA memory for the entropy buffer")]
    NoMemory,
    /// The device did not answer in time.
    #[error("virtio-rng request timed out")]
    Timeout,
    /// The device completed a chain that was not the request.
    #[error("virtio-rng completed unexpected descriptor {0}")]
    UnexpectedHead(u16),
}

impl From<TransportError> for RngError {
    fn from(e: TransportError) -> Self {
        RngError::Transport(e)
    }
}

impl From<QueueError> for RngError {
    fn from(e: QueueError) -> Self {
        RngError::Queue(e)
    }
}

/// A ready virtio-rng device.
pub struct VirtioRng<'p, P: Platform> {
    platform: &'p P,
    device: VirtioPciDevice<'p, P>,
    queue: SplitQueue,
    buffer: DmaRegion,
}

impl<'p, P: Platform> VirtioRng<'p, P> {
    /// Initialise `device` (no optional features), set up its request queue with interrupts
    /// to MSI-X entry `vector` (or `NO_VECTOR` to poll only) and set DRIVER_OK.
    pub fn new(
        platform: &'p P,
        mut device: VirtioPciDevice<'p, P>,
        vector: u16,
    ) -> Result<Self, RngError> {
        device.initialize(0)?;
        let queue = SplitQueue::new(platform, QUEUE_SIZE)?;
        device.setup_queue(0, &queue, vector)?;
        let buffer = platform
            .dma_alloc(MAX_REQUEST, 16)
            .ok_or(RngError::NoMemory)?;
        device.driver_ok()?;
        Ok(Self {
            platform,
            device,
            queue,
            buffer,
        })
    }

    /// The underlying transport.
    pub fn device(&self) -> &VirtioPciDevice<'p, P> {
        &self.device
    }

    /// Ask for up to `out.len()` bytes (at most [`MAX_REQUEST`]) and copy what the device
    /// returns into `out`. Polls the used ring, calling the platform's `wait` between polls,
    /// at most `max_waits` times. Returns the number of bytes written.
    pub fn read(&mut self, out: &mut [u8], max_waits: u32) -> Result<usize, RngError> {
        let len = out.len().min(MAX_REQUEST).min(self.buffer.len());
        if len == 0 {
            return Ok(0);
        }
        let head = self.queue.add(&[Buffer {
            addr: self.buffer.phys(),
            len: len as u32,
            device_writable: true,
        }])?;
        if self.queue.should_notify() {
            self.device.notify(0)?;
        }
        for _ in 0..max_waits {
            if let Some(used) = self.queue.pop_used()? {
                if used.head != head {
                    return Err(RngError::UnexpectedHead(used.head));
                }
                // pop_used checked used.len <= len.
                let got = used.len as usize;
                self.buffer.read_bytes(0, &mut out[..got]);
                return Ok(got);
            }
            self.platform.wait();
        }
        Err(RngError::Timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FakePlatform, Misbehave};
    use crate::pci::{PciAddress, PortConfig, enable_command_bits, read_bars, regs};
    use crate::virtio::find_virtio_caps;
    use crate::virtio::pci_transport::NO_VECTOR;

    const ADDR: PciAddress = PciAddress {
        bus: 0,
        device: 3,
        function: 0,
    };

    fn open(platform: &FakePlatform) -> Result<VirtioRng<'_, FakePlatform>, RngError> {
        let config = PortConfig::new(platform);
        let bars = read_bars(&config, ADDR).unwrap();
        enable_command_bits(
            &config,
            ADDR,
            regs::COMMAND_MEMORY | regs::COMMAND_BUS_MASTER,
        );
        let caps = find_virtio_caps(&config, ADDR, &bars).unwrap();
        // SAFETY: the caps come from find_virtio_caps on the fake function.
        let device = unsafe { VirtioPciDevice::new(platform, caps) }.unwrap();
        VirtioRng::new(platform, device, 0)
    }

    #[test]
    fn test_rng_reads_device_bytes() {
        let platform = FakePlatform::new();
        platform.rng.borrow_mut().fill_byte = 0x5c;
        let mut rng = open(&platform).unwrap();
        let mut out = [0u8; 32];
        assert_eq!(rng.read(&mut out, 10).unwrap(), 32);
        assert!(out.iter().all(|b| *b == 0x5c));
        let fake = platform.rng.borrow();
        assert_eq!(fake.status, 1 | 2 | 8 | 4);
        // Only VERSION_1 accepted: the driver asked for nothing optional.
        assert_eq!(fake.driver_features, 1 << 32);
        assert_eq!(fake.notifies, 1);
    }

    #[test]
    fn test_rng_repeated_reads_reuse_descriptors() {
        let platform = FakePlatform::new();
        let mut rng = open(&platform).unwrap();
        let mut out = [0u8; 8];
        for _ in 0..100 {
            assert_eq!(rng.read(&mut out, 10).unwrap(), 8);
        }
        assert_eq!(platform.rng.borrow().notifies, 100);
    }

    #[test]
    fn test_rng_refuses_overlong_completion() {
        let platform = FakePlatform::new();
        platform.rng.borrow_mut().misbehave = Misbehave::LongUsedLen;
        let mut rng = open(&platform).unwrap();
        let mut out = [0u8; 16];
        assert_eq!(
            rng.read(&mut out, 10),
            Err(RngError::Queue(QueueError::UsedLenTooLarge {
                len: 17,
                capacity: 16
            }))
        );
    }

    #[test]
    fn test_rng_refuses_bogus_descriptor_id() {
        let platform = FakePlatform::new();
        platform.rng.borrow_mut().misbehave = Misbehave::BogusUsedId;
        let mut rng = open(&platform).unwrap();
        let mut out = [0u8; 16];
        assert!(matches!(
            rng.read(&mut out, 10),
            Err(RngError::Queue(QueueError::UsedIdOutOfRange(_)))
        ));
    }

    #[test]
    fn test_rng_times_out_on_silent_device() {
        let platform = FakePlatform::new();
        platform.rng.borrow_mut().misbehave = Misbehave::Silent;
        let mut rng = open(&platform).unwrap();
        let mut out = [0u8; 16];
        assert_eq!(rng.read(&mut out, 50), Err(RngError::Timeout));
    }

    #[test]
    fn test_rng_feature_rejection_is_reported() {
        let platform = FakePlatform::new();
        platform.rng.borrow_mut().misbehave = Misbehave::RejectFeatures;
        assert!(matches!(
            open(&platform).err(),
            Some(RngError::Transport(TransportError::FeaturesRejected(_)))
        ));
        assert_ne!(platform.rng.borrow().status & 0x80, 0);
    }

    #[test]
    fn test_rng_without_vector_polls() {
        let platform = FakePlatform::new();
        let config = PortConfig::new(&platform);
        let bars = read_bars(&config, ADDR).unwrap();
        let caps = find_virtio_caps(&config, ADDR, &bars).unwrap();
        // SAFETY: as in open().
        let device = unsafe { VirtioPciDevice::new(&platform, caps) }.unwrap();
        let mut rng = VirtioRng::new(&platform, device, NO_VECTOR).unwrap();
        let mut out = [0u8; 4];
        assert_eq!(rng.read(&mut out, 10).unwrap(), 4);
    }
}
