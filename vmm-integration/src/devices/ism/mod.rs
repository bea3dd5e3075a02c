// SPDX-License-Identifier: Apache-2.0
//! virtio-ism in the VMM: the device model (`virtio_ism::Ism`) on the virtio-pci transport,
//! its shared-memory BAR (`virtio_ism_window::IsmBar`, memory slots from [`kvm_slots`]) on the
//! MMIO bus for what the slots do not cover, and the `--ism` wiring (pool backend, sessions).

pub mod kvm_slots;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Weak};

use ism_pool::client::ClientOptions;
use ism_pool::{BrokerSession, PoolBackend, PoolConfig, PoolError, PoolSession};
use virtio_device::{
    ActivateError, ActivationContext, Counters, ShmError, VirtioDevice, VirtioInterrupt,
    VirtioSharedMemoryList,
};
use virtio_ism::{ConfigError, Ism, IsmConfig, IsmError, IsmHandle};

use virtio_ism_window::{IoEventRegistrar, IsmBar, SlotBackend};
use vm_device::DeviceMmio;
use vm_device::bus::{MmioAddress, MmioAddressOffset};

use crate::bus::IoBuses;
use crate::config::IsmDeviceConfig;
use crate::pci::{PciError, PciManager};

/// MSI-X vectors a device may use: config, control queue, event queue and one per chunk
/// (regions bind vectors with EVENT_VECTOR), up to the MSI-X maximum.
pub const MAX_ISM_VECTORS: u64 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum IsmSetupError {
    #[error("Invalid virtio-ism window for {0}")]
    Layout(String, #[source] ConfigError),
    #[error("Failed to reserve host memory for the window of {0}")]
    ReserveWindow(String, #[source] io::Error),
    #[error("Failed to create virtio-ism device {0}")]
    CreateDevice(String, #[source] IsmError),
    #[error("Failed to create the embedded ism pool")]
    EmbeddedPool(#[source] PoolError),
    #[error("Failed to open a pool session for {id} (pool: {pool})")]
    Session {
        id: String,
        pool: String,
        #[source]
        source: PoolError,
    },
    #[error("Failed to plug virtio-ism device {0} into PCI")]
    Plug(String, #[source] PciError),
}

/// A virtio-ism device together with its KVM window: the [`VirtioDevice`] the transport
/// drives. It forwards everything to [`Ism`] and adds what only the VMM can do on a window
/// placement or move (MMIO handler on the bus, KVM slots at the new base).
pub struct IsmDevice {
    ism: Ism,
    bar: Arc<IsmBar>,
    mmio: Arc<BarMmio>,
    buses: Weak<IoBuses>,
    /// Where the window's MMIO handler sits on the bus now.
    placed: Option<u64>,
}

impl IsmDevice {
    pub fn new(
        id: &str,
        config: IsmConfig,
        session: Arc<dyn PoolSession>,
        kvm: Arc<dyn SlotBackend>,
        ioevents: Arc<dyn IoEventRegistrar>,
        buses: &Arc<IoBuses>,
    ) -> Result<Self, IsmSetupError> {
        let layout = config
            .layout()
            .map_err(|e| IsmSetupError::Layout(id.to_owned(), e))?;
        let bar = Arc::new(
            IsmBar::new(layout, kvm, ioevents)
                .map_err(|e| IsmSetupError::ReserveWindow(id.to_owned(), e))?,
        );
        let ism = Ism::new(id, config, session, bar.window())
            .map_err(|e| IsmSetupError::CreateDevice(id.to_owned(), e))?
            .with_notify_wiring(bar.wiring())
            .with_thread_start(Arc::new(|| {
                crate::seccomp::apply_or_exit(crate::seccomp::Thread::IsmWorker)
            }));
        bar.set_handle(ism.handle());
        let mmio = Arc::new(BarMmio(bar.clone()));
        Ok(Self {
            ism,
            bar,
            mmio,
            buses: Arc::downgrade(buses),
            placed: None,
        })
    }

    /// MSI-X vectors to give the transport.
    pub fn msix_vectors(&self) -> usize {
        self.ism
            .layout()
            .chunks
            .saturating_add(2)
            .min(MAX_ISM_VECTORS) as usize
    }

    pub fn handle(&self) -> IsmHandle {
        self.ism.handle()
    }

    /// Put the window's MMIO handler at `new` (first placement or a BAR move).
    fn place_mmio(&mut self, new: u64, len: u64) -> Result<(), ShmError> {
        let buses = self
            .buses
            .upgrade()
            .ok_or_else(|| ShmError::Move("The VM's buses are gone".into()))?;
        let placed = match self.placed {
            None => buses.register_mmio(new, len, self.mmio.clone()),
            Some(old) if old != new => buses.move_mmio(old, new, len),
            Some(_) => Ok(()),
        };
        placed.map_err(|e| ShmError::Move(format!("{e}")))?;
        self.placed = Some(new);
        Ok(())
    }
}

impl VirtioDevice for IsmDevice {
    fn device_type(&self) -> u32 {
        self.ism.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.ism.queue_max_sizes()
    }

    fn features(&self) -> u64 {
        self.ism.features()
    }

    fn ack_features(&mut self, value: u64) {
        self.ism.ack_features(value);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.ism.read_config(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.ism.write_config(offset, data);
    }

    fn activate(&mut self, context: ActivationContext) -> Result<(), ActivateError> {
        self.ism.activate(context)
    }

    fn reset(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        self.ism.reset()
    }

    fn shutdown(&mut self) {
        self.ism.shutdown();
        if let Some(counters) = self.counters() {
            let mut counters: Vec<_> = counters.into_iter().map(|(k, v)| (k, v.0)).collect();
            counters.sort();
            log::info!("virtio-ism {} counters: {counters:?}", self.ism.id());
        }
        if let (Some(at), Some(buses)) = (self.placed.take(), self.buses.upgrade()) {
            let _ = buses.deregister_mmio(at);
        }
    }

    fn get_shm_regions(&self) -> Option<VirtioSharedMemoryList> {
        self.ism.get_shm_regions()
    }

    /// The transport placed the BAR (on plug) or the guest moved it: move the MMIO handler
    /// and every KVM slot, then tell the device model.
    fn set_shm_regions(&mut self, list: VirtioSharedMemoryList) -> Result<(), ShmError> {
        let window_size = self.ism.layout().window_size;
        if list.len != window_size {
            return Err(ShmError::Move(format!(
                "window length {:#x} differs from the device's {window_size:#x}",
                list.len
            )));
        }
        let new = list.addr.0;
        self.place_mmio(new, window_size)?;
        self.ism.set_shm_regions(list)?;
        self.bar.place(new);
        log::info!(
            "virtio-ism {}: window at {new:#x}+{window_size:#x}",
            self.ism.id()
        );
        Ok(())
    }

    fn pause(&mut self) -> io::Result<()> {
        VirtioDevice::pause(&mut self.ism)
    }

    fn resume(&mut self) {
        VirtioDevice::resume(&mut self.ism);
    }

    fn counters(&self) -> Option<Counters> {
        let mut counters = self.ism.counters().unwrap_or_default();
        self.bar.add_counters(&mut counters);
        Some(counters)
    }
}

/// The BAR on the VM's MMIO bus: accesses no KVM slot or ioeventfd takes.
struct BarMmio(Arc<IsmBar>);

impl DeviceMmio for BarMmio {
    fn mmio_read(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn mmio_write(&self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// Pool backends by broker socket (`None` = the embedded pool), made on first use so that
/// one embedded pool serves every device without `pool=`.
#[derive(Default)]
pub struct PoolBackends {
    backends: HashMap<Option<PathBuf>, PoolBackend>,
}

impl PoolBackends {
    /// A session for `cfg`'s device, from the pool it names. A broker that is not there is
    /// an error here, at startup.
    pub fn session(
        &mut self,
        id: &str,
        cfg: &IsmDeviceConfig,
    ) -> Result<Arc<dyn PoolSession>, IsmSetupError> {
        let key = cfg.pool.clone();
        let backend = match self.backends.get(&key) {
            Some(b) => b.clone(),
            None => {
                let mut pool_config = PoolConfig::default();
                if let Some(size) = cfg.pool_size {
                    pool_config.size = size;
                }
                let b = PoolBackend::new(key.clone(), pool_config)
                    .map_err(IsmSetupError::EmbeddedPool)?;
                self.backends.insert(key.clone(), b.clone());
                b
            }
        };
        let session = match &backend {
            // Reconnects and resumes after a broker restart (docs/pool.md, "Failure
            // model"); the reader thread's filter allows what that needs.
            PoolBackend::Broker(path) => BrokerSession::connect_with(
                path,
                ClientOptions::default(),
                Some(Arc::new(|| {
                    crate::seccomp::apply_or_exit(crate::seccomp::Thread::PoolClient)
                })),
            )
            .map(|s| -> Arc<dyn PoolSession> { s }),
            PoolBackend::Embedded(_) => backend.session(),
        };
        session.map_err(|source| IsmSetupError::Session {
            id: id.to_owned(),
            pool: key.map_or_else(
                || "embedded".to_owned(),
                |p| format!("broker at {}", p.display()),
            ),
            source,
        })
    }
}

/// Create every `--ism` device and plug it into PCI. Returns the handles, by device id.
pub fn add_ism_devices(
    pci: &mut PciManager,
    configs: &[IsmDeviceConfig],
    kvm: Arc<dyn SlotBackend>,
    ioevents: Arc<dyn IoEventRegistrar>,
    buses: &Arc<IoBuses>,
) -> Result<Vec<(String, IsmHandle)>, IsmSetupError> {
    let mut pools = PoolBackends::default();
    let mut handles = Vec::new();
    for (n, cfg) in configs.iter().enumerate() {
        let id = cfg.id.clone().unwrap_or_else(|| format!("_ism{n}"));
        let config = cfg
            .device_config()
            .map_err(|e| IsmSetupError::Layout(id.clone(), e))?;
        let session = pools.session(&id, cfg)?;
        let info = session.info();
        let dev = IsmDevice::new(&id, config, session, kvm.clone(), ioevents.clone(), buses)?;
        let vectors = dev.msix_vectors();
        let layout = config
            .layout()
            .map_err(|e| IsmSetupError::Layout(id.clone(), e))?;
        let handle = dev.handle();
        let plugged = pci
            .add_virtio_device_at(
                &id,
                Arc::new(std::sync::Mutex::new(dev)),
                vectors,
                cfg.pci_device_id,
            )
            .map_err(|e| IsmSetupError::Plug(id.clone(), e))?;
        log::info!(
            "virtio-ism {id} at {}: gid {:#x} devid {}, window {:#x} bytes ({} chunks of {:#x}), \
             {vectors} MSI-X vectors, pool {}",
            plugged.bdf,
            info.gid,
            info.devid.0,
            layout.window_size,
            layout.chunks,
            layout.chunk_size,
            cfg.pool
                .as_ref()
                .map_or_else(|| "embedded".to_owned(), |p| p.display().to_string()),
        );
        handles.push((id, handle));
    }
    Ok(handles)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use virtio_ism_window::test_utils::{FakeKvm, memfd};

    struct NoIoEvents;

    impl IoEventRegistrar for NoIoEvents {
        fn register_ioevent(&self, _fd: &EventFd, _addr: u64) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn unregister_ioevent(&self, _fd: &EventFd, _addr: u64) -> io::Result<()> {
            Ok(())
        }
    }

    fn device(kvm: &Arc<FakeKvm>, buses: &Arc<IoBuses>) -> IsmDevice {
        let pool = ism_pool::LocalPool::new(PoolConfig {
            size: 1 << 20,
            ..PoolConfig::default()
        })
        .unwrap();
        let config = IsmConfig::for_window(1 << 20, 4096, 4).unwrap();
        IsmDevice::new(
            "ism-test",
            config,
            pool.session().unwrap(),
            kvm.clone(),
            Arc::new(NoIoEvents),
            buses,
        )
        .unwrap()
    }

    #[test]
    fn test_window_placement_and_bar_move_carry_bus_handler_and_slots() {
        let kvm = Arc::new(FakeKvm::default());
        let buses = Arc::new(IoBuses::new());
        let mut dev = device(&kvm, &buses);
        let mut list = dev.get_shm_regions().unwrap();
        assert_eq!(list.len, 1 << 20);
        let (a, b) = (0x10_0000_0000u64, 0x20_0000_0000u64);
        list.addr = GuestAddress(a);
        dev.set_shm_regions(list.clone()).unwrap();
        // A region mapped the way the device maps one.
        let fd = memfd(0x2000, 0x3c);
        dev.bar
            .window()
            .map(0x1000, fd.as_fd(), 0, 0x2000, true)
            .unwrap();
        assert_eq!(kvm.slots.lock().unwrap()[&2].0, a + 0x1000);
        // Unmapped window memory reads as all-ones through the bus.
        let mut word = [0u8; 4];
        assert!(buses.mmio_read(a + 0x8000, &mut word));
        assert_eq!(word, [0xff; 4]);

        list.addr = GuestAddress(b);
        dev.set_shm_regions(list.clone()).unwrap();
        assert_eq!(kvm.slots.lock().unwrap()[&2].0, b + 0x1000);
        assert!(
            !buses.mmio_read(a + 0x8000, &mut word),
            "old range still decoded"
        );
        assert!(buses.mmio_read(b + 0x8000, &mut word));
        // Notify slots read as zero; a trapped doorbell for no region is harmless.
        let notify = dev.ism.layout().notify_offset;
        assert!(buses.mmio_read(b + notify, &mut word));
        assert_eq!(word, [0; 4]);
        assert!(buses.mmio_write(b + notify, &[1]));

        // A window of the wrong size is refused and nothing moves.
        let mut wrong = list.clone();
        wrong.len = 1 << 21;
        wrong.addr = GuestAddress(a);
        assert!(dev.set_shm_regions(wrong).is_err());
        assert!(buses.mmio_read(b + 0x8000, &mut word));

        let counters = dev.counters().unwrap();
        assert_eq!(counters["window_slot_mappings"].0, 1);
        assert_eq!(counters["window_unmapped_accesses"].0, 3);
        assert!(counters.contains_key("ctrl_commands"));
        dev.shutdown();
        assert!(!buses.mmio_read(b + 0x8000, &mut word));
    }

    #[test]
    fn test_read_only_region_writes_dropped_through_the_bus() {
        let kvm = Arc::new(FakeKvm {
            no_readonly: true,
            ..FakeKvm::default()
        });
        let buses = Arc::new(IoBuses::new());
        let mut dev = device(&kvm, &buses);
        let mut list = dev.get_shm_regions().unwrap();
        list.addr = GuestAddress(0x10_0000_0000);
        dev.set_shm_regions(list).unwrap();
        let fd = memfd(0x1000, 0x77);
        dev.bar
            .window()
            .map(0x0, fd.as_fd(), 0, 0x1000, false)
            .unwrap();
        assert!(buses.mmio_write(0x10_0000_0010, &0x1234_5678u32.to_le_bytes()));
        let mut word = [0u8; 4];
        assert!(buses.mmio_read(0x10_0000_0010, &mut word));
        assert_eq!(word, [0x77; 4], "read-only data changed");
        let counters = dev.counters().unwrap();
        assert_eq!(counters["window_readonly_writes_dropped"].0, 1);
        assert_eq!(counters["window_emulated_mappings"].0, 1);
    }
}
