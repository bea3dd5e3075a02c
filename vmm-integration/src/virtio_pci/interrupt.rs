// SPDX-License-Identifier: Apache-2.0
//! The interrupt object a virtio device raises interrupts through: maps config and queue
//! interrupts to the vectors the driver programmed, and raw vectors to MSI-X entries.

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_device::{VirtioInterrupt, VirtioInterruptType};
use vmm_sys_util::eventfd::EventFd;

use super::common_config::{VIRTQ_MSI_NO_VECTOR, VectorMap};
use crate::pci::msix::MsixState;

/// ISR status bits (virtio 1.2, 4.1.4.5).
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

pub struct VirtioPciInterrupt {
    msix: Arc<Mutex<MsixState>>,
    vectors: Arc<VectorMap>,
    isr: Arc<AtomicU8>,
    /// Bumped on every configuration change so drivers re-read multi-field config.
    generation: Arc<AtomicU8>,
}

impl VirtioPciInterrupt {
    pub fn new(
        msix: Arc<Mutex<MsixState>>,
        vectors: Arc<VectorMap>,
        isr: Arc<AtomicU8>,
        generation: Arc<AtomicU8>,
    ) -> Self {
        Self {
            msix,
            vectors,
            isr,
            generation,
        }
    }

    fn vector_of(&self, int_type: VirtioInterruptType) -> u16 {
        match int_type {
            VirtioInterruptType::Config => self.vectors.config(),
            VirtioInterruptType::Queue(i) => self.vectors.queue(i),
            VirtioInterruptType::Vector(v) => v,
        }
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        match int_type {
            VirtioInterruptType::Config => {
                self.generation.fetch_add(1, Ordering::AcqRel);
                self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
            }
            VirtioInterruptType::Queue(_) => {
                self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
            }
            VirtioInterruptType::Vector(_) => {}
        }
        let vector = self.vector_of(int_type);
        if vector == VIRTQ_MSI_NO_VECTOR {
            return Ok(());
        }
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .trigger(vector)
    }

    fn notifier(&self, int_type: VirtioInterruptType) -> Option<EventFd> {
        let vector = self.vector_of(int_type);
        if vector == VIRTQ_MSI_NO_VECTOR {
            return None;
        }
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .irqfd(vector)
    }
}
