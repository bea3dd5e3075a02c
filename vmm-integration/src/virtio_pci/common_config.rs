// SPDX-License-Identifier: Apache-2.0
//! The virtio-pci common configuration structure (virtio 1.2, 4.1.4.3): feature selects,
//! queue setup registers and MSI-X vector assignment. Status writes are passed up to the
//! transport, which owns activation and reset.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

pub use offsets::DEVICE_STATUS;
/// Register offsets in `struct virtio_pci_common_cfg`: the device interface crate's, which the
/// guest drivers use too.
use virtio_ism_proto::defs::pci::common_cfg as offsets;
/// Size of the structure (up to queue_device).
pub const COMMON_CONFIG_LEN: u64 = offsets::LEN;
/// "No vector" for config_msix_vector / queue_msix_vector.
pub const VIRTQ_MSI_NO_VECTOR: u16 = virtio_ism_proto::defs::VIRTIO_MSI_NO_VECTOR as u16;

/// The MSI-X vectors the driver assigned, shared with the interrupt object that a running
/// device uses from its own threads.
pub struct VectorMap {
    config: AtomicU16,
    queues: Vec<AtomicU16>,
}

impl VectorMap {
    pub fn new(num_queues: usize) -> Self {
        Self {
            config: AtomicU16::new(VIRTQ_MSI_NO_VECTOR),
            queues: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTQ_MSI_NO_VECTOR))
                .collect(),
        }
    }

    pub fn config(&self) -> u16 {
        self.config.load(Ordering::Acquire)
    }

    /// The vector of queue `index`; NO_VECTOR for queues that do not exist.
    pub fn queue(&self, index: u16) -> u16 {
        self.queues
            .get(usize::from(index))
            .map_or(VIRTQ_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    fn reset(&self) {
        self.config.store(VIRTQ_MSI_NO_VECTOR, Ordering::Release);
        for q in &self.queues {
            q.store(VIRTQ_MSI_NO_VECTOR, Ordering::Release);
        }
    }
}

/// What the driver set up for one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSetup {
    pub max_size: u16,
    pub size: u16,
    pub enabled: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

impl QueueSetup {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }
}

pub struct CommonConfig {
    pub device_features: u64,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub driver_features: u64,
    pub status: u8,
    pub generation: u8,
    queue_select: u16,
    queues: Vec<QueueSetup>,
    vectors: Arc<VectorMap>,
    msix_vectors: u16,
}

/// Replace the 32-bit half `select` of `value` (selects past 1 address nothing).
fn set_half(value: u64, select: u32, half: u32) -> u64 {
    match select {
        0 => (value & !0xffff_ffff) | u64::from(half),
        1 => (value & 0xffff_ffff) | (u64::from(half) << 32),
        _ => value,
    }
}

fn get_half(value: u64, select: u32) -> u32 {
    match select {
        0 => value as u32,
        1 => (value >> 32) as u32,
        _ => 0,
    }
}

impl CommonConfig {
    pub fn new(device_features: u64, queue_max_sizes: &[u16], msix_vectors: u16) -> Self {
        Self {
            device_features,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            generation: 0,
            queue_select: 0,
            queues: queue_max_sizes
                .iter()
                .map(|m| QueueSetup::new(*m))
                .collect(),
            vectors: Arc::new(VectorMap::new(queue_max_sizes.len())),
            msix_vectors,
        }
    }

    pub fn vectors(&self) -> &Arc<VectorMap> {
        &self.vectors
    }

    pub fn queues(&self) -> &[QueueSetup] {
        &self.queues
    }

    /// Back to the state after device reset (status 0).
    pub fn reset(&mut self) {
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueSetup::new(q.max_size);
        }
        self.vectors.reset();
    }

    fn selected(&self) -> Option<&QueueSetup> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// A guest-chosen vector, or NO_VECTOR when it names no table entry (the driver reads
    /// the register back to learn that the assignment failed).
    fn checked_vector(&self, v: u16) -> u16 {
        if v < self.msix_vectors {
            v
        } else {
            VIRTQ_MSI_NO_VECTOR
        }
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        use offsets::*;
        let q = self.selected();
        let value: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select.into(),
            (DEVICE_FEATURE, 4) => {
                get_half(self.device_features, self.device_feature_select).into()
            }
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select.into(),
            (DRIVER_FEATURE, 4) => {
                get_half(self.driver_features, self.driver_feature_select).into()
            }
            (CONFIG_MSIX_VECTOR, 2) => self.vectors.config().into(),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => self.status.into(),
            (CONFIG_GENERATION, 1) => self.generation.into(),
            (QUEUE_SELECT, 2) => self.queue_select.into(),
            // A queue that does not exist reads as size 0: "not available".
            (QUEUE_SIZE, 2) => q.map_or(0, |q| q.size).into(),
            (QUEUE_MSIX_VECTOR, 2) => {
                if q.is_some() {
                    self.vectors.queue(self.queue_select).into()
                } else {
                    VIRTQ_MSI_NO_VECTOR.into()
                }
            }
            (QUEUE_ENABLE, 2) => q.is_some_and(|q| q.enabled).into(),
            // notify_off_multiplier spaces queues apart; each queue's offset is its index.
            (QUEUE_NOTIFY_OFF, 2) => self.queue_select.into(),
            (QUEUE_DESC, 8) => q.map_or(0, |q| q.desc),
            (QUEUE_DRIVER, 8) => q.map_or(0, |q| q.driver),
            (QUEUE_DEVICE, 8) => q.map_or(0, |q| q.device),
            (o, 4) if (QUEUE_DESC..COMMON_CONFIG_LEN).contains(&o) && o % 4 == 0 => {
                let full = q.map_or(0, |q| match o & !7 {
                    QUEUE_DESC => q.desc,
                    QUEUE_DRIVER => q.driver,
                    _ => q.device,
                });
                get_half(full, ((o % 8) / 4) as u32).into()
            }
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// Apply a write. Status writes are not handled here: the caller checks for
    /// [`DEVICE_STATUS`] first.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        use offsets::*;
        let mut raw = [0u8; 8];
        let n = data.len().min(8);
        raw[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(raw);
        let sel = usize::from(self.queue_select);
        // Queue registers are frozen once the queue is enabled, until reset.
        let queue_writable = self.queues.get(sel).is_some_and(|q| !q.enabled);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            // Features are fixed once FEATURES_OK is set.
            (DRIVER_FEATURE, 4) if self.status & super::STATUS_FEATURES_OK == 0 => {
                self.driver_features = set_half(
                    self.driver_features,
                    self.driver_feature_select,
                    value as u32,
                );
            }
            (CONFIG_MSIX_VECTOR, 2) => {
                let v = self.checked_vector(value as u16);
                self.vectors.config.store(v, Ordering::Release);
            }
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_SIZE, 2) if queue_writable => self.queues[sel].size = value as u16,
            (QUEUE_MSIX_VECTOR, 2) => {
                let v = self.checked_vector(value as u16);
                if let Some(slot) = self.vectors.queues.get(sel) {
                    slot.store(v, Ordering::Release);
                }
            }
            // Writing 0 is not a way to disable a queue (that is queue_reset).
            (QUEUE_ENABLE, 2) if queue_writable && value & 1 == 1 => {
                self.queues[sel].enabled = true;
            }
            (o, 4 | 8) if queue_writable && (QUEUE_DESC..COMMON_CONFIG_LEN).contains(&o) => {
                let q = &mut self.queues[sel];
                let field = match o & !7 {
                    QUEUE_DESC => &mut q.desc,
                    QUEUE_DRIVER => &mut q.driver,
                    _ => &mut q.device,
                };
                if data.len() == 8 && o % 8 == 0 {
                    *field = value;
                } else if data.len() == 4 && o % 4 == 0 {
                    *field = set_half(*field, ((o % 8) / 4) as u32, value as u32);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w16(c: &mut CommonConfig, off: u64, v: u16) {
        c.write(off, &v.to_le_bytes());
    }
    fn w32(c: &mut CommonConfig, off: u64, v: u32) {
        c.write(off, &v.to_le_bytes());
    }
    fn r16(c: &CommonConfig, off: u64) -> u16 {
        let mut b = [0u8; 2];
        c.read(off, &mut b);
        u16::from_le_bytes(b)
    }
    fn r32(c: &CommonConfig, off: u64) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn test_feature_select_registers() {
        let mut c = CommonConfig::new(0x1_0000_0020, &[8, 16], 3);
        assert_eq!(r32(&c, 0x04), 0x20);
        w32(&mut c, 0x00, 1);
        assert_eq!(r32(&c, 0x04), 1);
        w32(&mut c, 0x00, 7);
        assert_eq!(r32(&c, 0x04), 0);
        w32(&mut c, 0x0c, 0x20);
        w32(&mut c, 0x08, 1);
        w32(&mut c, 0x0c, 1);
        assert_eq!(c.driver_features, 0x1_0000_0020);
        assert_eq!(r32(&c, 0x0c), 1);
        w32(&mut c, 0x08, 9);
        w32(&mut c, 0x0c, 0xffff_ffff);
        assert_eq!(c.driver_features, 0x1_0000_0020);
    }

    #[test]
    fn test_queue_setup_and_vectors() {
        let mut c = CommonConfig::new(0, &[8, 16], 3);
        assert_eq!(r16(&c, 0x12), 2);
        w16(&mut c, 0x16, 1);
        assert_eq!(r16(&c, 0x18), 16);
        assert_eq!(r16(&c, 0x1e), 1);
        w16(&mut c, 0x18, 4);
        w32(&mut c, 0x20, 0x1000);
        w32(&mut c, 0x24, 0x1);
        c.write(0x28, &0x2000u64.to_le_bytes());
        w32(&mut c, 0x30, 0x3000);
        w16(&mut c, 0x1a, 2);
        assert_eq!(r16(&c, 0x1a), 2);
        w16(&mut c, 0x1a, 3);
        assert_eq!(r16(&c, 0x1a), VIRTQ_MSI_NO_VECTOR, "vector past the table");
        w16(&mut c, 0x1a, 1);
        w16(&mut c, 0x10, 0);
        w16(&mut c, 0x1c, 1);
        // Frozen once enabled.
        w16(&mut c, 0x18, 2);
        w32(&mut c, 0x20, 0);
        let q = c.queues()[1];
        assert_eq!(
            (q.size, q.desc, q.driver, q.device),
            (4, 0x1_0000_1000, 0x2000, 0x3000)
        );
        assert!(q.enabled);
        assert_eq!(r32(&c, 0x24), 1);
        assert_eq!(c.vectors().queue(1), 1);
        assert_eq!(c.vectors().config(), 0);
        assert_eq!(c.vectors().queue(900), VIRTQ_MSI_NO_VECTOR);
        // A non-existent queue reads as unavailable and ignores writes.
        w16(&mut c, 0x16, 500);
        assert_eq!(r16(&c, 0x18), 0);
        w16(&mut c, 0x18, 8);
        w16(&mut c, 0x1c, 1);
        w16(&mut c, 0x1a, 0);
        // Odd offsets/sizes are ignored.
        c.write(0x21, &[1, 2, 3, 4]);
        c.write(u64::MAX, &[1]);
        let mut big = [0u8; 16];
        c.read(0x20, &mut big);
        c.reset();
        assert_eq!(c.queues()[1], QueueSetup::new(16));
        assert_eq!(c.vectors().queue(1), VIRTQ_MSI_NO_VECTOR);
        assert_eq!(c.vectors().config(), VIRTQ_MSI_NO_VECTOR);
    }
}
