// SPDX-License-Identifier: Apache-2.0
//! The outer interface of an in-process virtio device, shaped after cloud-hypervisor's
//! `virtio_devices::VirtioDevice` so a device written against it can be carried into
//! cloud-hypervisor with a thin adapter. The VMM's virtio-pci transport drives devices only
//! through this trait; devices never see PCI, KVM or the transport.
//!
//! Device worker threads run one event loop, [`EpollHelper`], with kill and pause built in;
//! the device pauses and resumes it through a [`PauseGate`].

use std::collections::HashMap;
use std::io;
use std::num::Wrapping;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

mod epoll_helper;
mod pause;

pub use epoll_helper::{EpollHelper, EpollHelperError, EpollHelperHandler};
pub use pause::PauseGate;

/// Guest memory as devices see it: an atomically swappable snapshot of guest RAM.
pub type GuestMemoryHandle = GuestMemoryAtomic<GuestMemoryMmap>;

/// What an interrupt is for; the transport maps it to an MSI-X vector (or INTx).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// Configuration change.
    Config,
    /// Used buffers on the queue with this index.
    Queue(u16),
    /// A raw MSI-X vector the driver bound explicitly through a device-specific command
    /// (virtio-ism's EVENT_VECTOR), not through the common configuration.
    Vector(u16),
}

/// Raises interrupts in the guest on behalf of a device.
pub trait VirtioInterrupt: Send + Sync {
    /// Raise the interrupt for `int_type`. Masked vectors are latched as pending by the
    /// transport; an unprogrammed vector is ignored.
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()>;

    /// The eventfd that raises `int_type` from any thread or process without going through
    /// the VMM (a KVM irqfd), when the transport has one.
    fn notifier(&self, _int_type: VirtioInterruptType) -> Option<EventFd> {
        None
    }
}

/// Everything a device needs to start: guest memory, the interrupt path and the queues the
/// driver set up, each with the eventfd the transport signals when the driver notifies it.
pub struct ActivationContext {
    pub mem: GuestMemoryHandle,
    pub interrupt_cb: Arc<dyn VirtioInterrupt>,
    /// `(queue index, queue, queue notification eventfd)` for every enabled queue.
    pub queues: Vec<(u16, Queue, EventFd)>,
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("Device needs {needed} queues, driver enabled {enabled}")]
    BadQueueCount { needed: usize, enabled: usize },
    #[error("Device is already active")]
    AlreadyActive,
    #[error("Failed to clone an eventfd")]
    CloneEventFd(#[source] io::Error),
    #[error("Failed to spawn the device worker thread")]
    SpawnWorker(#[source] io::Error),
    /// The device's own reason, with its cause chain (build it with [`ActivateError::device`]).
    #[error("Device-specific activation failure")]
    Device(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ActivateError {
    /// A device-specific failure caused by `source`.
    pub fn device(source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Device(Box::new(source))
    }
}

/// One virtio shared-memory region (a `VIRTIO_PCI_CAP_SHARED_MEMORY_CFG` capability):
/// `offset`/`len` are relative to the start of the device's shared-memory window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSharedMemory {
    /// The shmid advertised in the capability.
    pub id: u8,
    pub offset: u64,
    pub len: u64,
}

/// The device's shared-memory window: where it sits in guest-physical space and the regions
/// carved out of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtioSharedMemoryList {
    /// Guest-physical base of the window (the BAR address).
    pub addr: GuestAddress,
    /// Window length; a power of two, so it can back a PCI BAR.
    pub len: u64,
    pub region_list: Vec<VirtioSharedMemory>,
}

/// Why the shared-memory window could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    #[error("Device has no shared-memory window")]
    NotSupported,
    #[error("Failed to move the shared-memory window: {0}")]
    Move(String),
}

/// Counters keyed by name, as cloud-hypervisor's `vm.counters` reports them.
pub type Counters = HashMap<&'static str, Wrapping<u64>>;

/// An in-process virtio device, driven by a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (virtio spec "Device Types").
    fn device_type(&self) -> u32;

    /// Maximum size of each queue, one entry per queue.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers.
    fn features(&self) -> u64 {
        0
    }

    /// The driver's accepted features; bits never offered are ignored.
    fn ack_features(&mut self, _value: u64) {}

    /// Read device configuration space at `offset`. Out-of-range reads leave `data` untouched.
    fn read_config(&self, _offset: u64, _data: &mut [u8]) {}

    /// Write device configuration space at `offset`.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Start the device once the driver sets DRIVER_OK.
    fn activate(&mut self, context: ActivationContext) -> Result<(), ActivateError>;

    /// Stop the device and return it to its initial state (driver wrote status 0).
    /// Returns the interrupt callback handed over at activation, if any.
    fn reset(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        None
    }

    /// Stop for good: VM shutdown or unplug.
    fn shutdown(&mut self) {}

    /// The device's shared-memory window, if it has one.
    fn get_shm_regions(&self) -> Option<VirtioSharedMemoryList> {
        None
    }

    /// The transport moved the window (the guest reprogrammed the BAR).
    fn set_shm_regions(&mut self, _list: VirtioSharedMemoryList) -> Result<(), ShmError> {
        Err(ShmError::NotSupported)
    }

    /// Stop writing into guest memory until [`VirtioDevice::resume`] (`vm.pause`, after the
    /// vCPUs stopped): the device's worker parks, and events arriving meanwhile are served on
    /// resume. Returns once the worker has parked. Devices without a worker keep the default.
    fn pause(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Undo [`VirtioDevice::pause`] (`vm.resume`, before the vCPUs run again).
    fn resume(&mut self) {}

    /// Named counters for `vm.counters`.
    fn counters(&self) -> Option<Counters> {
        None
    }
}

/// Read `data.len()` bytes at `offset` from a device's config bytes; out-of-range or
/// overflowing reads leave `data` untouched (virtio drivers read config in 1/2/4/8-byte pieces).
pub fn read_config_from_slice(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    let Some(end) = start.checked_add(data.len()) else {
        return;
    };
    if let Some(src) = config.get(start..end) {
        data.copy_from_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_activate_error_device_keeps_its_cause_chain() {
        use std::error::Error as _;
        let cause = io::Error::new(io::ErrorKind::PermissionDenied, "no entropy");
        let err = ActivateError::device(cause);
        let source = err.source().expect("the cause is the source");
        let io_err = source
            .downcast_ref::<io::Error>()
            .expect("the typed cause survives");
        assert_eq!(io_err.kind(), io::ErrorKind::PermissionDenied);
        // The message names the step; the cause is not flattened into it.
        assert_eq!(err.to_string(), "Device-specific activation failure");
    }

    #[test]
    fn test_read_config_from_slice_in_range() {
        let cfg = [1u8, 2, 3, 4];
        let mut out = [0u8; 2];
        read_config_from_slice(&cfg, 1, &mut out);
        assert_eq!(out, [2, 3]);
    }

    #[test]
    fn test_read_config_from_slice_out_of_range_untouched() {
        let cfg = [1u8, 2, 3, 4];
        let mut out = [9u8; 2];
        read_config_from_slice(&cfg, 3, &mut out);
        assert_eq!(out, [9, 9]);
        read_config_from_slice(&cfg, u64::MAX, &mut out);
        assert_eq!(out, [9, 9]);
    }
}
