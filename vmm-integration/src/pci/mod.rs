// SPDX-License-Identifier: Apache-2.0
//! The PCI root complex: bus 0 with its host bridge, configuration access through
//! 0xCF8/0xCFC and ECAM, BAR placement in the 32 and 64-bit windows, and virtio-pci devices
//! plugged into it.

pub mod bus;
pub mod configuration;
pub mod msix;

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::bus::{BusError, IoBuses};
use crate::devices::DevicePauser;
use crate::interrupt::{GsiRouter, InterruptError, IoEventRegistrar, KvmInterruptOps, MsiRouting};
use crate::layout;
use crate::virtio_pci::{Lifecycle, VirtioPciDevice, VirtioPciError, VirtioPciResources};
use bus::{PciBus, PciConfigIo, PciEcam, PciHostBridge};
use virtio_device::VirtioDevice;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("Failed to register the PCI configuration ports")]
    RegisterConfigIo(#[source] BusError),
    #[error("Failed to register the PCI ECAM window")]
    RegisterEcam(#[source] BusError),
    #[error("Failed to create the {0} BAR allocator")]
    CreateAllocator(&'static str, #[source] vm_allocator::Error),
    #[error("Failed to create the GSI router")]
    CreateRouter(#[source] InterruptError),
    #[error("No room for a {size:#x}-byte BAR in the {window} window")]
    AllocateBar {
        window: &'static str,
        size: u64,
        #[source]
        source: vm_allocator::Error,
    },
    #[error("MSI-X vector count {0} is not in 1..=2048")]
    VectorCount(usize),
    #[error("Failed to create virtio-pci device {0}")]
    CreateVirtioPci(String, #[source] VirtioPciError),
    #[error("Failed to register the settings BAR of {0}")]
    RegisterBar(String, #[source] BusError),
    #[error("PCI bus 0 has no free slot for {0}")]
    BusFull(String),
    #[error("PCI slot {1} is not free for {0}")]
    SlotTaken(String, u8),
}

/// What the VMM learns about a plugged device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDeviceInfo {
    pub id: String,
    /// "0000:00:01.0"
    pub bdf: String,
}

pub struct PciManager {
    bus: Arc<PciBus>,
    buses: Arc<IoBuses>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    router: Arc<GsiRouter>,
    ioevents: Arc<dyn IoEventRegistrar>,
    mmio32: AddressAllocator,
    mmio64: AddressAllocator,
    devices: Vec<Arc<Mutex<VirtioPciDevice>>>,
    /// The virtio devices behind `devices`, by id, for `vm.pause`.
    pausable: DevicePauser,
    /// Id and address of each plugged device, in plug order (for `vm.info`).
    infos: Vec<PciDeviceInfo>,
    /// Where the devices' activate and reset run.
    lifecycle: Lifecycle,
}

impl PciManager {
    /// Build bus 0 with its host bridge and hook configuration access onto `buses`.
    pub fn new(
        vm: Arc<VmFd>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        buses: Arc<IoBuses>,
        mmio64_start: u64,
    ) -> Result<PciManager, PciError> {
        let ops = Arc::new(KvmInterruptOps::new(vm));
        Self::with_backend(ops.clone(), ops, mem, buses, mmio64_start)
    }

    /// As [`Self::new`], with the KVM operations supplied by the caller (tests use a fake).
    pub fn with_backend(
        routing: Arc<dyn MsiRouting>,
        ioevents: Arc<dyn IoEventRegistrar>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        buses: Arc<IoBuses>,
        mmio64_start: u64,
    ) -> Result<PciManager, PciError> {
        let bus = Arc::new(PciBus::new());
        bus.add_device(Arc::new(Mutex::new(PciHostBridge::new())));
        buses
            .register_pio(
                layout::PCI_CONFIG_ADDRESS_PORT,
                layout::PCI_CONFIG_PORT_SIZE,
                Arc::new(Mutex::new(PciConfigIo::new(bus.clone()))),
            )
            .map_err(PciError::RegisterConfigIo)?;
        buses
            .register_mmio(
                layout::PCI_ECAM_START,
                layout::PCI_ECAM_SIZE,
                Arc::new(Mutex::new(PciEcam::new(bus.clone()))),
            )
            .map_err(PciError::RegisterEcam)?;
        let mmio32 = AddressAllocator::new(layout::MMIO32_START, layout::MMIO32_SIZE)
            .map_err(|e| PciError::CreateAllocator("32-bit", e))?;
        let mmio64 = AddressAllocator::new(mmio64_start, layout::MMIO64_SIZE)
            .map_err(|e| PciError::CreateAllocator("64-bit", e))?;
        let router = Arc::new(
            GsiRouter::new(routing, layout::MSI_GSI_START).map_err(PciError::CreateRouter)?,
        );
        Ok(PciManager {
            bus,
            buses,
            mem,
            router,
            ioevents,
            mmio32,
            mmio64,
            devices: Vec::new(),
            pausable: DevicePauser::default(),
            infos: Vec::new(),
            lifecycle: Lifecycle::inline(),
        })
    }

    /// Run the activate and reset of devices plugged from now on through `lifecycle` (the
    /// VMM's device-manager thread) rather than on the thread that wrote the status.
    pub fn with_lifecycle(mut self, lifecycle: Lifecycle) -> Self {
        self.lifecycle = lifecycle;
        self
    }

    /// Plug `dev` in with one MSI-X vector per queue plus one for configuration changes.
    pub fn add_virtio_device(
        &mut self,
        id: &str,
        dev: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<PciDeviceInfo, PciError> {
        let queues = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_max_sizes()
            .len();
        self.add_virtio_device_with_vectors(id, dev, queues.saturating_add(1))
    }

    /// Plug `dev` in with `msix_vectors` MSI-X vectors (virtio-ism binds extra vectors to
    /// regions with a command).
    pub fn add_virtio_device_with_vectors(
        &mut self,
        id: &str,
        dev: Arc<Mutex<dyn VirtioDevice>>,
        msix_vectors: usize,
    ) -> Result<PciDeviceInfo, PciError> {
        self.add_virtio_device_at(id, dev, msix_vectors, None)
    }

    /// As [`Self::add_virtio_device_with_vectors`], in PCI slot `slot` if given (the
    /// `pci_device_id=` option); a slot that is taken is an error, not a silent move.
    pub fn add_virtio_device_at(
        &mut self,
        id: &str,
        dev: Arc<Mutex<dyn VirtioDevice>>,
        msix_vectors: usize,
        slot: Option<u8>,
    ) -> Result<PciDeviceInfo, PciError> {
        if let Some(slot) = slot
            && !self.bus.is_free(slot)
        {
            return Err(PciError::SlotTaken(id.to_owned(), slot));
        }
        let vectors = u16::try_from(msix_vectors)
            .ok()
            .filter(|v| (1..=msix::MAX_MSIX_VECTORS).contains(v))
            .ok_or(PciError::VectorCount(msix_vectors))?;
        let settings_size = crate::virtio_pci::settings_bar_size(vectors);
        let settings = self
            .mmio32
            .allocate(settings_size, settings_size, AllocPolicy::FirstMatch)
            .map_err(|source| PciError::AllocateBar {
                window: "32-bit",
                size: settings_size,
                source,
            })?;
        let shm_len = dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_shm_regions()
            .map(|l| l.len);
        let shm = match shm_len {
            Some(len) => {
                // A bad length is reported by the transport with its own error.
                let size = len.max(0x1000).checked_next_power_of_two().unwrap_or(len);
                match self.mmio64.allocate(size, size, AllocPolicy::FirstMatch) {
                    Ok(r) => Some(r),
                    Err(source) => {
                        let _ = self.mmio32.free(&settings);
                        return Err(PciError::AllocateBar {
                            window: "64-bit",
                            size,
                            source,
                        });
                    }
                }
            }
            None => None,
        };
        let plugged = self.plug(id, dev.clone(), vectors, &settings, shm.as_ref(), slot);
        let (pci_dev, slot) = match plugged {
            Ok(p) => p,
            Err(e) => {
                // Give the address space back; a later device may fit.
                let _ = self.mmio32.free(&settings);
                if let Some(r) = &shm {
                    let _ = self.mmio64.free(r);
                }
                return Err(e);
            }
        };
        self.devices.push(pci_dev);
        self.pausable.push(id, dev);
        let bdf = format!("0000:00:{slot:02x}.0");
        log::info!(
            "PCI {bdf}: {id}, settings BAR {:#x}+{settings_size:#x}, shm BAR {:x?}",
            settings.start(),
            shm.map(|r| (r.start(), r.len()))
        );
        let info = PciDeviceInfo {
            id: id.to_owned(),
            bdf,
        };
        self.infos.push(info.clone());
        Ok(info)
    }

    /// Id and address of every plugged device.
    pub fn device_infos(&self) -> &[PciDeviceInfo] {
        &self.infos
    }
}

impl PciManager {
    /// Counters of every virtio device, by device id (`vm.counters`).
    pub fn counters(&self) -> Vec<(String, virtio_device::Counters)> {
        self.devices
            .iter()
            .filter_map(|d| {
                let d = d.lock().unwrap_or_else(|e| e.into_inner());
                Some((d.id().to_owned(), d.counters()?))
            })
            .collect()
    }

    /// What pauses and resumes every plugged virtio device (`vm.pause`).
    pub fn device_pauser(&self) -> DevicePauser {
        self.pausable.clone()
    }

    /// Stop every device (their worker threads end) and unplug them from the buses. Also
    /// done on drop.
    pub fn shutdown(&mut self) {
        self.infos.clear();
        self.pausable = DevicePauser::default();
        for dev in self.devices.drain(..) {
            dev.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
        }
    }

    /// Create the transport for `dev` at the given BARs and put it on the buses.
    fn plug(
        &mut self,
        id: &str,
        dev: Arc<Mutex<dyn VirtioDevice>>,
        vectors: u16,
        settings: &RangeInclusive,
        shm: Option<&RangeInclusive>,
        slot: Option<u8>,
    ) -> Result<(Arc<Mutex<VirtioPciDevice>>, u8), PciError> {
        let pci_dev = VirtioPciDevice::new(
            id,
            dev,
            vectors,
            VirtioPciResources {
                settings_bar: settings.start(),
                shm_bar: shm.map(RangeInclusive::start),
            },
            self.router.clone(),
            self.ioevents.clone(),
            self.buses.clone(),
            self.mem.clone(),
            self.lifecycle.clone(),
        )
        .map_err(|e| PciError::CreateVirtioPci(id.to_owned(), e))?;
        let pci_dev = Arc::new(Mutex::new(pci_dev));
        self.buses
            .register_mmio(settings.start(), settings.len(), pci_dev.clone())
            .map_err(|e| PciError::RegisterBar(id.to_owned(), e))?;
        let placed = match slot {
            Some(wanted) => self
                .bus
                .add_device_at(wanted, pci_dev.clone())
                .then_some(wanted)
                .ok_or_else(|| PciError::SlotTaken(id.to_owned(), wanted)),
            None => self
                .bus
                .add_device(pci_dev.clone())
                .ok_or_else(|| PciError::BusFull(id.to_owned())),
        };
        let slot = match placed {
            Ok(slot) => slot,
            Err(e) => {
                let _ = self.buses.deregister_mmio(settings.start());
                return Err(e);
            }
        };
        Ok((pci_dev, slot))
    }
}

impl Drop for PciManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
impl PciManager {
    /// The `n`th virtio-pci device plugged in.
    pub fn virtio_pci_device(&self, n: usize) -> Arc<Mutex<VirtioPciDevice>> {
        self.devices[n].clone()
    }
}
