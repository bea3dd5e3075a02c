// SPDX-License-Identifier: Apache-2.0
//! A virtio device on PCI: configuration space with the virtio and MSI-X capabilities, the
//! settings BAR (common config, ISR, device config, notifications, MSI-X table and PBA),
//! the optional shared-memory BAR, and the device lifecycle (activate on DRIVER_OK, reset on
//! status 0; the device's part of both runs where [`Lifecycle`] says, in the VMM on the
//! device-manager thread).

use std::io;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use log::{error, info, warn};
use virtio_device::{
    ActivationContext, ShmError, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    VirtioSharedMemoryList,
};
use virtio_queue::{Queue, QueueT};
use vm_device::MutDeviceMmio;
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::common_config::{COMMON_CONFIG_LEN, CommonConfig, DEVICE_STATUS};
use super::interrupt::VirtioPciInterrupt;
use super::lifecycle::{Job, JobError, Lifecycle};
use super::*;
use crate::bus::IoBuses;
use crate::interrupt::{GsiRouter, IoEventRegistrar};
use crate::pci::bus::PciDevice;
use crate::pci::configuration::{BarKind, ConfigError, PciConfiguration, PciHeader};
use crate::pci::msix::{MSIX_CTRL_ENABLE, MSIX_CTRL_FUNCTION_MASK, MsixError, MsixState};

// Capability IDs and virtio structure types (virtio 1.2, 4.1.4).
use virtio_ism_proto::defs::pci::{
    PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_SHARED_MEMORY_CFG,
};

const PCI_CAP_ID_MSIX: u8 = 0x11;
/// `virtio_pci_cap.cfg_type` of the PCI configuration access capability.
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

/// Settings BAR (BAR 0, 32-bit) layout; every structure starts on its own page.
pub const SETTINGS_BAR: usize = 0;
/// Shared-memory BAR (BARs 2-3, 64-bit prefetchable).
pub const SHM_BAR: usize = 2;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const PAGE: u64 = 0x1000;
/// Queues whose notify addresses fit in the notify page.
pub const MAX_QUEUES: usize = (PAGE / NOTIFY_OFF_MULTIPLIER as u64) as usize;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("Device has {0} queues; the transport supports 1..={MAX_QUEUES}")]
    QueueCount(usize),
    #[error("Failed to set up MSI-X")]
    Msix(#[source] MsixError),
    #[error("Failed to build configuration space")]
    Config(#[source] ConfigError),
    #[error("Shared-memory window of {0:#x} bytes is not a power of two of at least 4 KiB")]
    ShmWindowSize(u64),
    #[error("Shared-memory region {id} ({offset:#x}+{len:#x}) lies outside the window")]
    ShmRegion { id: u8, offset: u64, len: u64 },
    #[error("Failed to place the shared-memory window")]
    SetShm(#[source] ShmError),
}

/// Why activation on DRIVER_OK failed (the device then shows NEEDS_RESET).
#[derive(Debug, thiserror::Error)]
enum ActivationError {
    #[error("Driver set DRIVER_OK without FEATURES_OK")]
    FeaturesNotOk,
    #[error("Queue {0}: invalid size or ring address")]
    QueueSetup(u16, #[source] virtio_queue::Error),
    #[error("Queue {0}: rings do not fit in guest memory")]
    QueueOutsideMemory(u16),
    #[error("Failed to create a queue eventfd")]
    QueueEventFd(#[source] io::Error),
    #[error("Failed to register the ioeventfd at {0:#x}")]
    RegisterIoEvent(u64, #[source] io::Error),
    #[error("Device activation failed")]
    Device(#[source] JobError),
}

/// Where the VMM placed the BARs.
#[derive(Clone, Copy, Debug)]
pub struct VirtioPciResources {
    pub settings_bar: u64,
    /// Required when the device has a shared-memory window.
    pub shm_bar: Option<u64>,
}

/// Byte layout of the settings BAR for a given queue and vector count.
#[derive(Clone, Copy, Debug)]
struct SettingsLayout {
    notify_len: u64,
    table_len: u64,
    pba_offset: u64,
    pba_len: u64,
    size: u64,
}

impl SettingsLayout {
    fn new(num_queues: usize, msix: &MsixState) -> Self {
        let table_len = msix.table_len();
        let pba_len = msix.pba_len();
        Self {
            notify_len: num_queues as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
            table_len,
            pba_offset: MSIX_TABLE_OFFSET + table_len.next_multiple_of(PAGE),
            pba_len,
            size: bar_size_for(table_len, pba_len),
        }
    }
}

/// The settings BAR size a device with `msix_vectors` vectors needs (for BAR allocation).
pub fn settings_bar_size(msix_vectors: u16) -> u64 {
    let table_len = u64::from(msix_vectors) * crate::pci::msix::MSIX_ENTRY_SIZE;
    let pba_len = u64::from(msix_vectors).div_ceil(64) * 8;
    bar_size_for(table_len, pba_len)
}

/// Everything up to the MSI-X table, then the table and the PBA on their own pages.
fn bar_size_for(table_len: u64, pba_len: u64) -> u64 {
    (MSIX_TABLE_OFFSET + table_len.next_multiple_of(PAGE) + pba_len.next_multiple_of(PAGE))
        .next_power_of_two()
}

struct ShmBar {
    mapped: u64,
    list: VirtioSharedMemoryList,
}

fn virtio_cap(cfg_type: u8, bar: u8, id: u8, offset: u64, len: u64, extra: &[u8]) -> Vec<u8> {
    let mut cap = vec![
        PCI_CAP_ID_VNDR,
        0,
        (16 + extra.len()) as u8,
        cfg_type,
        bar,
        id,
        0,
        0,
    ];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(len as u32).to_le_bytes());
    cap.extend_from_slice(extra);
    cap
}

pub struct VirtioPciDevice {
    id: String,
    config: PciConfiguration,
    device: Arc<Mutex<dyn VirtioDevice>>,
    common: CommonConfig,
    msix: Arc<Mutex<MsixState>>,
    msix_cap_reg: usize,
    /// First register of the VIRTIO_PCI_CAP_PCI_CFG capability (a window onto the BARs
    /// through configuration space).
    pci_cfg_cap_reg: usize,
    isr: Arc<AtomicU8>,
    generation: Arc<AtomicU8>,
    interrupt: Arc<VirtioPciInterrupt>,
    layout: SettingsLayout,
    /// Where the settings BAR is registered on the MMIO bus.
    settings_mapped: u64,
    shm: Option<ShmBar>,
    /// Weak: the buses hold this device, and a strong handle back would keep both alive.
    buses: Weak<IoBuses>,
    ioevents: Arc<dyn IoEventRegistrar>,
    mem: GuestMemoryAtomic<GuestMemoryMmap>,
    /// Notification eventfds of the running device, registered as ioeventfds.
    queue_evts: Vec<(u16, EventFd)>,
    activated: bool,
    /// Where the device's activate and reset run (the VMM's device-manager thread).
    lifecycle: Lifecycle,
}

impl VirtioPciDevice {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        msix_vectors: u16,
        resources: VirtioPciResources,
        router: Arc<GsiRouter>,
        ioevents: Arc<dyn IoEventRegistrar>,
        buses: Arc<IoBuses>,
        mem: GuestMemoryAtomic<GuestMemoryMmap>,
        lifecycle: Lifecycle,
    ) -> Result<Self, VirtioPciError> {
        let (device_type, queue_sizes, features, shm_list) = {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            (
                d.device_type(),
                d.queue_max_sizes().to_vec(),
                d.features(),
                d.get_shm_regions(),
            )
        };
        if queue_sizes.is_empty() || queue_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::QueueCount(queue_sizes.len()));
        }
        let msix = MsixState::new(msix_vectors, router).map_err(VirtioPciError::Msix)?;
        let layout = SettingsLayout::new(queue_sizes.len(), &msix);

        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE.wrapping_add(device_type as u16),
            // Modern-only devices have revision 1 or more (virtio 1.2, 4.1.2.1).
            revision: 1,
            class: 0xff,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
        });
        config
            .add_bar(
                SETTINGS_BAR,
                resources.settings_bar,
                layout.size,
                BarKind::Mem32,
            )
            .map_err(VirtioPciError::Config)?;
        let bar = SETTINGS_BAR as u8;
        let caps = [
            virtio_cap(
                VIRTIO_PCI_CAP_COMMON_CFG,
                bar,
                0,
                COMMON_OFFSET,
                COMMON_CONFIG_LEN,
                &[],
            ),
            virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, bar, 0, ISR_OFFSET, 1, &[]),
            virtio_cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                bar,
                0,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_LEN,
                &[],
            ),
            virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                bar,
                0,
                NOTIFY_OFFSET,
                layout.notify_len,
                &NOTIFY_OFF_MULTIPLIER.to_le_bytes(),
            ),
        ];
        for cap in caps {
            config
                .add_capability(&cap)
                .map_err(VirtioPciError::Config)?;
        }
        let table_size_field = msix_vectors - 1;
        let mut msix_cap = vec![PCI_CAP_ID_MSIX, 0];
        msix_cap.extend_from_slice(&table_size_field.to_le_bytes());
        msix_cap.extend_from_slice(&((MSIX_TABLE_OFFSET as u32) | u32::from(bar)).to_le_bytes());
        msix_cap.extend_from_slice(&((layout.pba_offset as u32) | u32::from(bar)).to_le_bytes());
        let msix_cap_off = config
            .add_capability(&msix_cap)
            .map_err(VirtioPciError::Config)?;
        let msix_cap_reg = msix_cap_off / 4;
        // struct virtio_pci_cfg_cap: the driver picks bar/offset/length, then accesses
        // pci_cfg_data.
        let pci_cfg_cap = virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0, 0, &[0; 4]);
        let pci_cfg_cap_reg = config
            .add_capability(&pci_cfg_cap)
            .map_err(VirtioPciError::Config)?
            / 4;
        for (reg, writable) in [(1, 0xff), (2, u32::MAX), (3, u32::MAX), (4, u32::MAX)] {
            let r = pci_cfg_cap_reg + reg;
            config.set_reg(r, config.read_reg(r), writable);
        }
        config.set_reg(
            msix_cap_reg,
            config.read_reg(msix_cap_reg),
            u32::from(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK) << 16,
        );

        let shm = match (shm_list, resources.shm_bar) {
            (Some(mut list), Some(addr)) => {
                if list.len < PAGE || !list.len.is_power_of_two() {
                    return Err(VirtioPciError::ShmWindowSize(list.len));
                }
                config
                    .add_bar(
                        SHM_BAR,
                        addr,
                        list.len,
                        BarKind::Mem64 { prefetchable: true },
                    )
                    .map_err(VirtioPciError::Config)?;
                for r in &list.region_list {
                    if r.offset.checked_add(r.len).is_none_or(|end| end > list.len) {
                        return Err(VirtioPciError::ShmRegion {
                            id: r.id,
                            offset: r.offset,
                            len: r.len,
                        });
                    }
                    let mut cap = virtio_cap(
                        VIRTIO_PCI_CAP_SHARED_MEMORY_CFG,
                        SHM_BAR as u8,
                        r.id,
                        r.offset,
                        r.len,
                        &[],
                    );
                    // struct virtio_pci_cap64: offset_hi, length_hi.
                    cap[2] = 24;
                    cap.extend_from_slice(&((r.offset >> 32) as u32).to_le_bytes());
                    cap.extend_from_slice(&((r.len >> 32) as u32).to_le_bytes());
                    config
                        .add_capability(&cap)
                        .map_err(VirtioPciError::Config)?;
                }
                list.addr = GuestAddress(addr);
                device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .set_shm_regions(list.clone())
                    .map_err(VirtioPciError::SetShm)?;
                Some(ShmBar { mapped: addr, list })
            }
            _ => None,
        };

        let common = CommonConfig::new(features, &queue_sizes, msix_vectors);
        let msix = Arc::new(Mutex::new(msix));
        let isr = Arc::new(AtomicU8::new(0));
        let generation = Arc::new(AtomicU8::new(0));
        let interrupt = Arc::new(VirtioPciInterrupt::new(
            msix.clone(),
            common.vectors().clone(),
            isr.clone(),
            generation.clone(),
        ));
        Ok(Self {
            id: id.to_owned(),
            config,
            device,
            common,
            msix,
            msix_cap_reg,
            pci_cfg_cap_reg,
            isr,
            generation,
            interrupt,
            layout,
            settings_mapped: resources.settings_bar,
            shm,
            buses: Arc::downgrade(&buses),
            ioevents,
            mem,
            queue_evts: Vec::new(),
            activated: false,
            lifecycle,
        })
    }

    fn notify_addr(&self, queue: u16) -> u64 {
        self.settings_mapped + NOTIFY_OFFSET + u64::from(queue) * u64::from(NOTIFY_OFF_MULTIPLIER)
    }

    fn lock_device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register_ioevents(&self, evts: &[(u16, EventFd)]) -> Result<(), ActivationError> {
        for (n, (q, evt)) in evts.iter().enumerate() {
            let addr = self.notify_addr(*q);
            if let Err(e) = self.ioevents.register_ioevent(evt, addr) {
                self.unregister_ioevents(&evts[..n]);
                return Err(ActivationError::RegisterIoEvent(addr, e));
            }
        }
        Ok(())
    }

    fn unregister_ioevents(&self, evts: &[(u16, EventFd)]) {
        for (q, evt) in evts {
            let addr = self.notify_addr(*q);
            if let Err(e) = self.ioevents.unregister_ioevent(evt, addr) {
                warn!(
                    "{}: failed to unregister ioeventfd at {addr:#x}: {e}",
                    self.id
                );
            }
        }
    }

    fn build_queues(&self) -> Result<Vec<(u16, Queue, EventFd)>, ActivationError> {
        let mem = self.mem.memory();
        let event_idx = self.common.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut queues = Vec::new();
        for (i, setup) in self.common.queues().iter().enumerate() {
            if !setup.enabled {
                continue;
            }
            let index = i as u16;
            let err = |e| ActivationError::QueueSetup(index, e);
            let mut q = Queue::new(setup.max_size).map_err(err)?;
            q.try_set_size(setup.size).map_err(err)?;
            q.try_set_desc_table_address(GuestAddress(setup.desc))
                .map_err(err)?;
            q.try_set_avail_ring_address(GuestAddress(setup.driver))
                .map_err(err)?;
            q.try_set_used_ring_address(GuestAddress(setup.device))
                .map_err(err)?;
            q.set_event_idx(event_idx);
            q.set_ready(true);
            if !q.is_valid(&*mem) {
                return Err(ActivationError::QueueOutsideMemory(index));
            }
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivationError::QueueEventFd)?;
            queues.push((index, q, evt));
        }
        Ok(queues)
    }

    fn activate(&mut self) -> Result<(), ActivationError> {
        if self.common.status & STATUS_FEATURES_OK == 0 {
            return Err(ActivationError::FeaturesNotOk);
        }
        let queues = self.build_queues()?;
        let mut ours = Vec::with_capacity(queues.len());
        for (i, _, evt) in &queues {
            ours.push((*i, evt.try_clone().map_err(ActivationError::QueueEventFd)?));
        }
        // Registered before the device runs: a notification the driver writes as soon as
        // DRIVER_OK is in waits in the eventfd for the worker.
        self.register_ioevents(&ours)?;
        let context = ActivationContext {
            mem: self.mem.clone(),
            interrupt_cb: self.interrupt.clone(),
            queues,
        };
        // Off this (vCPU) thread: the device-manager thread starts the worker; this waits.
        let activated = self
            .lifecycle
            .run(&self.id, &self.device, Job::Activate(context));
        if let Err(e) = activated {
            self.unregister_ioevents(&ours);
            return Err(ActivationError::Device(e));
        }
        self.queue_evts = ours;
        self.activated = true;
        crate::event!("virtio-device", "activated", "id", &self.id);
        Ok(())
    }

    /// Driver wrote 0 to device_status.
    fn reset(&mut self) {
        if self.activated {
            // On the device-manager thread (the worker stops, regions go back to the pool);
            // this waits, so the driver reads status 0 only once the device is reset.
            if let Err(e) = self.lifecycle.run(&self.id, &self.device, Job::Reset) {
                warn!("{}: reset: {e}", self.id);
            }
            self.activated = false;
            crate::event!("virtio-device", "reset", "id", &self.id);
        }
        let evts = std::mem::take(&mut self.queue_evts);
        self.unregister_ioevents(&evts);
        self.common.reset();
        self.isr.store(0, Ordering::Release);
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear_pending();
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Named counters of the device behind this transport.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn counters(&self) -> Option<virtio_device::Counters> {
        self.lock_device().counters()
    }

    /// VM shutdown: stop the device for good and take its range off the MMIO bus.
    pub fn shutdown(&mut self) {
        self.lock_device().shutdown();
        self.activated = false;
        let evts = std::mem::take(&mut self.queue_evts);
        self.unregister_ioevents(&evts);
        if let Some(buses) = self.buses.upgrade() {
            let _ = buses.deregister_mmio(self.settings_mapped);
        }
    }

    fn features_acceptable(&self) -> bool {
        let driver = self.common.driver_features;
        driver & !self.common.device_features == 0 && driver & VIRTIO_F_VERSION_1 != 0
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            info!("{}: reset by the driver", self.id);
            self.reset();
            return;
        }
        let old = self.common.status;
        log::debug!("{}: status {old:#x} -> {value:#x}", self.id);
        let mut new = value;
        if new & STATUS_FEATURES_OK != 0 && old & STATUS_FEATURES_OK == 0 {
            if self.features_acceptable() {
                let features = self.common.driver_features;
                self.lock_device().ack_features(features);
            } else {
                // Leaving FEATURES_OK clear tells the driver its subset was refused.
                new &= !STATUS_FEATURES_OK;
            }
        }
        // NEEDS_RESET is the device's to set; keep it once set.
        new = (new & !STATUS_NEEDS_RESET) | (old & STATUS_NEEDS_RESET);
        self.common.status = new;
        if new & STATUS_DRIVER_OK != 0 && old & STATUS_DRIVER_OK == 0 && !self.activated {
            if let Err(e) = self.activate() {
                // The whole chain: "Device activation failed" alone says nothing of why.
                let reason = virtio_ism_api::error_chain(&e).join(": ");
                error!(
                    "{}: activation failed, device set to NEEDS_RESET: {reason}",
                    self.id
                );
                self.common.status |= STATUS_NEEDS_RESET;
                if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Config) {
                    warn!("{}: failed to signal NEEDS_RESET: {e}", self.id);
                }
            } else {
                info!("{}: activated", self.id);
            }
        }
    }

    /// Bring the bus, ioeventfds and shared-memory window in line with the BAR registers.
    /// Moves apply only while memory decoding is on: a guest sizing or half-writing a
    /// 64-bit BAR turns decoding off first, so intermediate values are never mapped.
    fn sync_bars(&mut self) {
        if !self.config.memory_space_enabled() {
            return;
        }
        if let Some(new) = self.config.bar_address(SETTINGS_BAR)
            && new != self.settings_mapped
        {
            self.move_settings_bar(new);
        }
        if let Some(new) = self.config.bar_address(SHM_BAR)
            && let Some(shm) = &self.shm
            && new != shm.mapped
        {
            let mut list = shm.list.clone();
            list.addr = GuestAddress(new);
            let moved = self.lock_device().set_shm_regions(list.clone());
            match moved {
                Ok(()) => {
                    info!("{}: shared-memory window moved to {new:#x}", self.id);
                    self.shm = Some(ShmBar { mapped: new, list });
                }
                Err(e) => warn!("{}: cannot move the shared-memory window: {e}", self.id),
            }
        }
    }

    fn move_settings_bar(&mut self, new: u64) {
        let old = self.settings_mapped;
        let Some(buses) = self.buses.upgrade() else {
            return;
        };
        if let Err(e) = buses.move_mmio(old, new, self.layout.size) {
            warn!("{}: cannot move the settings BAR to {new:#x}: {e}", self.id);
            return;
        }
        let evts = std::mem::take(&mut self.queue_evts);
        self.unregister_ioevents(&evts);
        self.settings_mapped = new;
        for (q, evt) in &evts {
            let addr = self.notify_addr(*q);
            if let Err(e) = self.ioevents.register_ioevent(evt, addr) {
                // Notifications still arrive through the MMIO exit path.
                warn!(
                    "{}: failed to register ioeventfd at {addr:#x}: {e}",
                    self.id
                );
            }
        }
        self.queue_evts = evts;
        info!("{}: settings BAR moved {old:#x} -> {new:#x}", self.id);
    }

    fn read_settings(&mut self, offset: u64, data: &mut [u8]) {
        let l = self.layout;
        let table = MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + l.table_len;
        let pba = l.pba_offset..l.pba_offset + l.pba_len;
        if offset < COMMON_CONFIG_LEN {
            self.common.generation = self.generation.load(Ordering::Acquire);
            self.common.read(offset - COMMON_OFFSET, data);
        } else if offset == ISR_OFFSET && data.len() == 1 {
            // Reading the ISR acknowledges it.
            data[0] = self.isr.swap(0, Ordering::AcqRel);
        } else if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&offset) {
            self.lock_device()
                .read_config(offset - DEVICE_CFG_OFFSET, data);
        } else if table.contains(&offset) {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_table(offset - table.start, data);
        } else if pba.contains(&offset) {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_pba(offset - pba.start, data);
        } else {
            data.fill(0);
        }
    }

    fn write_settings(&mut self, offset: u64, data: &[u8]) {
        let l = self.layout;
        let table = MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + l.table_len;
        let notify = NOTIFY_OFFSET..NOTIFY_OFFSET + l.notify_len;
        if offset == COMMON_OFFSET + DEVICE_STATUS && data.len() == 1 {
            self.write_status(data[0]);
        } else if offset < COMMON_CONFIG_LEN {
            self.common.write(offset - COMMON_OFFSET, data);
        } else if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&offset) {
            self.lock_device()
                .write_config(offset - DEVICE_CFG_OFFSET, data);
        } else if notify.contains(&offset) {
            // Only reached when no ioeventfd caught the write.
            let queue = ((offset - notify.start) / u64::from(NOTIFY_OFF_MULTIPLIER)) as u16;
            if let Some((_, evt)) = self.queue_evts.iter().find(|(q, _)| *q == queue)
                && let Err(e) = evt.write(1)
            {
                warn!("{}: failed to signal queue {queue}: {e}", self.id);
            }
        } else if table.contains(&offset) {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_table(offset - table.start, data);
        }
    }

    #[cfg(test)]
    pub fn msix(&self) -> &Arc<Mutex<MsixState>> {
        &self.msix
    }
}

impl VirtioPciDevice {
    /// The settings-BAR access the PCI_CFG capability currently selects: (offset, length).
    /// Only naturally aligned 1, 2 and 4-byte accesses inside BAR 0 are honoured.
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let base = self.pci_cfg_cap_reg;
        let bar = self.config.read_reg(base + 1) & 0xff;
        let offset = u64::from(self.config.read_reg(base + 2));
        let len = self.config.read_reg(base + 3) as usize;
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.layout.size);
        (bar == SETTINGS_BAR as u32
            && matches!(len, 1 | 2 | 4)
            && offset.is_multiple_of(len as u64)
            && fits)
            .then_some((offset, len))
    }
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        if reg_idx == self.pci_cfg_cap_reg + 4
            && let Some((offset, len)) = self.pci_cfg_window()
        {
            let mut bytes = [0u8; 4];
            self.read_settings(offset, &mut bytes[..len]);
            return u32::from_le_bytes(bytes);
        }
        self.config.read_reg(reg_idx)
    }

    fn write_config_register(&mut self, reg_idx: usize, offset: u64, data: &[u8]) {
        if !self.config.write_reg(reg_idx, offset, data) {
            return;
        }
        if reg_idx == self.pci_cfg_cap_reg + 4 {
            if let Some((bar_offset, len)) = self.pci_cfg_window() {
                let bytes = self.config.read_reg(reg_idx).to_le_bytes();
                self.write_settings(bar_offset, &bytes[..len]);
            }
        } else if reg_idx == self.msix_cap_reg {
            let ctrl = (self.config.read_reg(reg_idx) >> 16) as u16;
            log::debug!("{}: MSI-X control {ctrl:#x}", self.id);
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_control(ctrl);
        } else if PciConfiguration::is_command_reg(reg_idx)
            || self.config.bar_of_reg(reg_idx).is_some()
        {
            self.sync_bars();
        }
    }
}

impl MutDeviceMmio for VirtioPciDevice {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read_settings(offset, data);
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write_settings(offset, data);
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        let evts = std::mem::take(&mut self.queue_evts);
        self.unregister_ioevents(&evts);
    }
}
