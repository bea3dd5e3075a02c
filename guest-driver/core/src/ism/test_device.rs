// SPDX-License-Identifier: Apache-2.0
//! Host test bench for the virtio-ism driver: the real `virtio-ism` device model behind
//! ism-vmm's own PCI root and virtio-pci transport (`ism_vmm::test_pci`), in one process.
//!
//! [`TestIsm`] is the driver's [`Platform`]: port I/O (configuration space through
//! 0xCF8/0xCFC) and the settings BAR go to the VMM's transport, exactly as a guest's accesses
//! do; its DMA memory is a `GuestMemoryMmap` the device's queues point into; the
//! shared-memory BAR is a host reservation the device maps pool memory into ([`MemWindow`]),
//! with doorbell writes handed to the device as the VMM's window handler does. The device's
//! worker runs synchronously: a queue notification runs it after the transport saw the
//! write, and `wait` lets it deliver pool events, as its thread would. A [`Tamper`] hook can
//! rewrite a completed control reply to play a hostile device, [`BenchConfig::poke_u8`]
//! overlays configuration-space bytes, and the device can be made to offer fewer features or
//! present another device configuration.

use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use std::boxed::Box;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::vec;
use std::vec::Vec;

use ism_pool::{DevId, LocalPool, PoolConfig, PoolSession, Token};
use ism_vmm::test_pci::{MMIO32_SIZE, MMIO32_START, MMIO64_START, PciBench};
use virtio_device::{
    ActivateError, ActivationContext, Counters, ShmError, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType, VirtioSharedMemoryList,
};
use virtio_ism::test_utils::MemWindow;
use virtio_ism::{Ism, IsmConfig, IsmHandle, IsmWorker, KickSink, WindowLayout};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};

use crate::pci::{ConfigAccess, PciAddress};
use crate::platform::{DmaRegion, Platform, Width};

pub const ADDR: PciAddress = PciAddress {
    bus: 0,
    device: 4,
    function: 0,
};
/// Where ism-vmm places the first shared-memory BAR: the start of its 64-bit window.
pub const WINDOW_BAR: u64 = MMIO64_START;
/// MSI-X vectors of the test function.
const MSIX_VECTORS: usize = 8;
const DMA_BASE: u64 = 0x10_0000;
const DMA_SIZE: usize = 1 << 20;

/// Settings BAR layout of ism-vmm's transport (`vmm-integration/src/virtio_pci/device.rs`),
/// only for what the bench itself reads back; the driver finds it through the capabilities.
const COMMON_STATUS: u64 = 0x14;
const COMMON_QUEUE_SELECT: u64 = 0x16;
const COMMON_QUEUE_SIZE: u64 = 0x18;
const COMMON_QUEUE_VECTOR: u64 = 0x1a;
const COMMON_QUEUE_ENABLE: u64 = 0x1c;
const COMMON_QUEUE_DESC: u64 = 0x20;
const COMMON_QUEUE_DEVICE: u64 = 0x30;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;

pub const CHUNK: u64 = 64 << 10;
pub const CHUNKS: u64 = 16;
pub const NOTIFY_SIZE: u64 = 4;

/// A pool for a group of test devices.
pub fn pool() -> Arc<LocalPool> {
    LocalPool::new(PoolConfig {
        size: 64 << 20,
        per_vm_limit: None,
        hugepages: false,
        gid: Some(0x15a),
        ..PoolConfig::default()
    })
    .unwrap()
}

/// Routes kicks between the devices of a test, as the VMM does.
#[derive(Default)]
pub struct Fabric {
    devices: Mutex<Vec<(DevId, IsmHandle)>>,
    pub kicks: Mutex<Vec<(DevId, Token)>>,
}

impl KickSink for Fabric {
    fn kick_peers(&self, from: DevId, token: Token) {
        self.kicks.lock().unwrap().push((from, token));
        for (devid, handle) in self.devices.lock().unwrap().iter() {
            if *devid != from {
                handle.deliver_kick(token);
            }
        }
    }
}

/// Records the interrupts the device raises and passes each to the transport's interrupt
/// (MSI-X table, ISR), as the device would raise it there directly.
#[derive(Default)]
pub struct RecordingInterrupt {
    raised: Mutex<Vec<VirtioInterruptType>>,
    transport: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        self.raised.lock().unwrap().push(int_type);
        match self.transport.lock().unwrap().as_ref() {
            Some(transport) => transport.trigger(int_type),
            None => Ok(()),
        }
    }
}

impl RecordingInterrupt {
    pub fn take(&self) -> Vec<VirtioInterruptType> {
        core::mem::take(&mut self.raised.lock().unwrap())
    }
}

/// Rewrites a completed control request: the device-writable bytes the device was given
/// (status first) and the used length.
pub type Tamper = Box<dyn FnMut(&mut [u8], &mut u32)>;

/// The device the transport drives: [`Ism`], with its worker run synchronously by the bench
/// instead of on a thread, features it may hide and a configuration it may replace.
struct BenchIsm {
    ism: Ism,
    worker: Option<IsmWorker>,
    offered_mask: u64,
    config_override: Option<[u8; 32]>,
    interrupts: Arc<RecordingInterrupt>,
}

impl VirtioDevice for BenchIsm {
    fn device_type(&self) -> u32 {
        self.ism.device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.ism.queue_max_sizes()
    }
    fn features(&self) -> u64 {
        self.ism.features() & self.offered_mask
    }
    fn ack_features(&mut self, value: u64) {
        self.ism.ack_features(value);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        match &self.config_override {
            Some(config) => virtio_device::read_config_from_slice(config, offset, data),
            None => self.ism.read_config(offset, data),
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.ism.write_config(offset, data);
    }
    fn activate(&mut self, mut context: ActivationContext) -> Result<(), ActivateError> {
        *self.interrupts.transport.lock().unwrap() = Some(context.interrupt_cb);
        context.interrupt_cb = self.interrupts.clone();
        self.worker = Some(self.ism.activate_worker(context)?);
        Ok(())
    }
    fn reset(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        self.worker = None;
        self.ism.reset();
        self.interrupts.transport.lock().unwrap().take()
    }
    fn get_shm_regions(&self) -> Option<VirtioSharedMemoryList> {
        self.ism.get_shm_regions()
    }
    fn set_shm_regions(&mut self, list: VirtioSharedMemoryList) -> Result<(), ShmError> {
        self.ism.set_shm_regions(list)
    }
    fn counters(&self) -> Option<Counters> {
        self.ism.counters()
    }
}

/// Configuration space through ports 0xCF8/0xCFC of the bench, with bytes of the test
/// function a test may overlay (a device presenting something else).
pub struct BenchConfig {
    bench: Arc<PciBench>,
    overlay: RefCell<BTreeMap<u16, u8>>,
}

impl BenchConfig {
    fn select(&self, addr: PciAddress, offset: u16) {
        let value = (1u32 << 31)
            | (u32::from(addr.bus) << 16)
            | (u32::from(addr.device & 0x1f) << 11)
            | (u32::from(addr.function & 7) << 8)
            | u32::from(offset & 0xfc);
        self.bench.pio_write(0xcf8, &value.to_le_bytes());
    }

    /// Present `value` at `offset` of the test function's configuration space from now on.
    pub fn poke_u8(&self, offset: u16, value: u8) {
        self.overlay.borrow_mut().insert(offset, value);
    }

    /// As [`Self::poke_u8`], little-endian.
    pub fn poke_u16(&self, offset: u16, value: u16) {
        for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
            self.poke_u8(offset + i as u16, byte);
        }
    }

    /// Offset of the shared-memory capability for `shmid` in the test function.
    pub fn shm_cap(&self, shmid: u8) -> u16 {
        let mut at = (self.read_u32(ADDR, 0x34) & 0xfc) as u16;
        while at != 0 {
            let head = self.read_u32(ADDR, at);
            let id = self.read_u32(ADDR, at + 4);
            // cap_vndr 0x09, cfg_type 8 (shared memory), id in byte 5.
            if head & 0xff == 0x09 && head >> 24 == 8 && (id >> 8) & 0xff == u32::from(shmid) {
                return at;
            }
            at = ((head >> 8) & 0xfc) as u16;
        }
        panic!("no shared-memory capability for shmid {shmid}");
    }
}

impl ConfigAccess for BenchConfig {
    fn read_u32(&self, addr: PciAddress, offset: u16) -> u32 {
        self.select(addr, offset);
        let mut raw = [0xffu8; 4];
        self.bench.pio_read(0xcfc, &mut raw);
        if addr == ADDR {
            let base = offset & !3;
            for (i, byte) in raw.iter_mut().enumerate() {
                if let Some(v) = self.overlay.borrow().get(&(base + i as u16)) {
                    *byte = *v;
                }
            }
        }
        u32::from_le_bytes(raw)
    }

    fn write_u32(&self, addr: PciAddress, offset: u16, value: u32) {
        self.select(addr, offset);
        self.bench.pio_write(0xcfc, &value.to_le_bytes());
    }

    fn write_u16(&self, addr: PciAddress, offset: u16, value: u16) {
        self.select(addr, offset);
        self.bench
            .pio_write(0xcfc + (offset & 2), &value.to_le_bytes());
    }
}

/// One virtio-ism device on ism-vmm's virtio-pci transport, and the platform its driver runs
/// on.
pub struct TestIsm {
    mem: GuestMemoryMmap,
    dma_next: Cell<u64>,
    pub config: BenchConfig,
    bench: Arc<PciBench>,
    /// Where the transport's settings BAR is.
    settings: u64,
    settings_size: u64,
    device: Arc<Mutex<BenchIsm>>,
    pub window: Arc<MemWindow>,
    pub layout: WindowLayout,
    pub interrupts: Arc<RecordingInterrupt>,
    pub handle: IsmHandle,
    pub devid: u64,
    tamper: RefCell<Option<Tamper>>,
    silent: Cell<bool>,
    pub waits: Cell<u64>,
}

impl TestIsm {
    /// A device in `pool`'s group whose doorbells go to `fabric`.
    pub fn new(pool: &Arc<LocalPool>, fabric: &Arc<Fabric>) -> Self {
        Self::offering(pool, fabric, u64::MAX)
    }

    /// As [`Self::new`], offering only `mask` of the device's features (the transport reads
    /// the offer once, when the device is plugged).
    pub fn offering(pool: &Arc<LocalPool>, fabric: &Arc<Fabric>, mask: u64) -> Self {
        let session: Arc<dyn PoolSession> = pool.session().unwrap();
        let devid = session.info().devid;
        let config = IsmConfig {
            shm_size: CHUNKS * CHUNK,
            chunk_size: CHUNK,
            notify_size: NOTIFY_SIZE,
            draft_default_perm: Default::default(),
        };
        let layout = config.layout().unwrap();
        let window = MemWindow::new(layout.window_size);
        let ism = Ism::new("ism-test", config, session, window.clone())
            .unwrap()
            .with_kick_sink(fabric.clone());
        let handle = ism.handle();
        fabric.devices.lock().unwrap().push((devid, handle.clone()));
        let interrupts = Arc::new(RecordingInterrupt::default());
        let device = Arc::new(Mutex::new(BenchIsm {
            ism,
            worker: None,
            offered_mask: mask,
            config_override: None,
            interrupts: interrupts.clone(),
        }));

        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(DMA_BASE), DMA_SIZE)]).unwrap();
        let mut bench = PciBench::new(GuestMemoryAtomic::new(mem.clone())).unwrap();
        bench
            .add_virtio_device("ism-test", device.clone(), MSIX_VECTORS, ADDR.device)
            .unwrap();
        let bench = Arc::new(bench);
        let config = BenchConfig {
            bench: bench.clone(),
            overlay: RefCell::new(BTreeMap::new()),
        };
        // BAR 0 (32-bit): the settings; BARs 2-3 (64-bit): the shared-memory window.
        let settings = u64::from(config.read_u32(ADDR, 0x10) & !0xf);
        config.write_u32(ADDR, 0x10, u32::MAX);
        let settings_size = u64::from(!(config.read_u32(ADDR, 0x10) & !0xf)) + 1;
        config.write_u32(ADDR, 0x10, settings as u32);
        let shm = u64::from(config.read_u32(ADDR, 0x18) & !0xf)
            | u64::from(config.read_u32(ADDR, 0x1c)) << 32;
        assert_eq!(shm, WINDOW_BAR, "the window is the first 64-bit BAR");

        Self {
            mem,
            dma_next: Cell::new(DMA_BASE),
            config,
            bench,
            settings,
            settings_size,
            device,
            window,
            layout,
            interrupts,
            handle,
            devid: devid.0,
            tamper: RefCell::new(None),
            silent: Cell::new(false),
            waits: Cell::new(0),
        }
    }

    fn device(&self) -> MutexGuard<'_, BenchIsm> {
        self.device.lock().unwrap()
    }

    /// Rewrite the next control completion with `tamper`.
    pub fn tamper_next(&self, tamper: Tamper) {
        *self.tamper.borrow_mut() = Some(tamper);
    }

    /// Ignore control-queue notifications from now on (a hung device).
    pub fn go_silent(&self) {
        self.silent.set(true);
    }

    /// Present `config` instead of the device's config space.
    pub fn override_config(&self, config: [u8; 32]) {
        self.device().config_override = Some(config);
    }

    /// Features the device saw acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.device().ism.acked_features()
    }

    fn settings_read(&self, offset: u64, data: &mut [u8]) {
        assert!(self.bench.mmio_read(self.settings + offset, data));
    }

    fn settings_write(&self, offset: u64, data: &[u8]) {
        assert!(self.bench.mmio_write(self.settings + offset, data));
    }

    fn settings_u16(&self, offset: u64) -> u16 {
        let mut raw = [0u8; 2];
        self.settings_read(offset, &mut raw);
        u16::from_le_bytes(raw)
    }

    fn settings_u64(&self, offset: u64) -> u64 {
        let mut raw = [0u8; 8];
        self.settings_read(offset, &mut raw[..4]);
        self.settings_read(offset + 4, &mut raw[4..]);
        u64::from_le_bytes(raw)
    }

    /// Device status as the transport holds it.
    pub fn status(&self) -> u8 {
        let mut raw = [0u8];
        self.settings_read(COMMON_STATUS, &mut raw);
        raw[0]
    }

    /// Run `f` with queue `index` selected in the common configuration, then select back
    /// what the driver had selected.
    fn with_queue<R>(&self, index: u16, f: impl FnOnce() -> R) -> R {
        let selected = self.settings_u16(COMMON_QUEUE_SELECT);
        self.settings_write(COMMON_QUEUE_SELECT, &index.to_le_bytes());
        let result = f();
        self.settings_write(COMMON_QUEUE_SELECT, &selected.to_le_bytes());
        result
    }

    /// Queue registers as programmed: (enabled, msix vector).
    pub fn queue_state(&self, index: u16) -> (bool, u16) {
        self.with_queue(index, || {
            (
                self.settings_u16(COMMON_QUEUE_ENABLE) != 0,
                self.settings_u16(COMMON_QUEUE_VECTOR),
            )
        })
    }

    /// MSI-X table entry `index`: address low, high, data, control.
    pub fn msix_entry(&self, index: u64) -> [u32; 4] {
        let mut entry = [0u32; 4];
        for (i, dword) in entry.iter_mut().enumerate() {
            let mut raw = [0u8; 4];
            self.settings_read(MSIX_TABLE + 16 * index + 4 * i as u64, &mut raw);
            *dword = u32::from_le_bytes(raw);
        }
        entry
    }

    /// Counter of the device model.
    pub fn counter(&self, name: &str) -> u64 {
        self.device().counters().unwrap()[name].0
    }

    /// Let the device's worker deliver pool events (what its thread does on its own).
    pub fn pump(&self) {
        if let Some(worker) = self.device().worker.as_mut() {
            worker.process_pool_events().unwrap();
        }
    }

    /// The driver notified `queue` (the transport has seen the write): run the worker.
    fn notify(&self, queue: u64) {
        if self.silent.get() {
            return;
        }
        let completed = {
            let mut device = self.device();
            let Some(worker) = device.worker.as_mut() else {
                return;
            };
            match queue {
                0 => worker.process_ctrl_queue().unwrap(),
                1 => {
                    worker.process_event_queue().unwrap();
                    false
                }
                _ => false,
            }
        };
        if completed && let Some(mut tamper) = self.tamper.borrow_mut().take() {
            let (desc, used, size) = self.with_queue(0, || {
                (
                    self.settings_u64(COMMON_QUEUE_DESC),
                    self.settings_u64(COMMON_QUEUE_DEVICE),
                    self.settings_u16(COMMON_QUEUE_SIZE),
                )
            });
            self.tamper_last_completion(desc, used, size, &mut tamper);
        }
    }

    /// Apply `tamper` to the last used element of the queue at `desc`/`used`.
    fn tamper_last_completion(&self, desc: u64, used: u64, size: u16, tamper: &mut Tamper) {
        let mem = &self.mem;
        let idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
        let elem = used + 4 + 8 * u64::from(idx.wrapping_sub(1) % size);
        let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap();
        let mut len: u32 = mem.read_obj(GuestAddress(elem + 4)).unwrap();
        let mut index = id as u16;
        loop {
            let d = desc + 16 * u64::from(index);
            let addr: u64 = mem.read_obj(GuestAddress(d)).unwrap();
            let dlen: u32 = mem.read_obj(GuestAddress(d + 8)).unwrap();
            let flags: u16 = mem.read_obj(GuestAddress(d + 12)).unwrap();
            if flags & 2 != 0 {
                let mut bytes = vec![0u8; dlen as usize];
                mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
                tamper(&mut bytes, &mut len);
                mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
                mem.write_obj(len, GuestAddress(elem + 4)).unwrap();
                return;
            }
            assert_ne!(flags & 1, 0, "no writable descriptor in the request");
            index = mem.read_obj(GuestAddress(d + 14)).unwrap();
        }
    }

    fn in_settings(&self, addr: u64) -> bool {
        (self.settings..self.settings + self.settings_size).contains(&addr)
    }
}

impl Platform for TestIsm {
    fn port_read_u8(&self, port: u16) -> u8 {
        let mut raw = [0xff];
        self.bench.pio_read(port, &mut raw);
        raw[0]
    }
    fn port_read_u16(&self, port: u16) -> u16 {
        let mut raw = [0xff; 2];
        self.bench.pio_read(port, &mut raw);
        u16::from_le_bytes(raw)
    }
    fn port_read_u32(&self, port: u16) -> u32 {
        let mut raw = [0xff; 4];
        self.bench.pio_read(port, &mut raw);
        u32::from_le_bytes(raw)
    }
    fn port_write_u8(&self, port: u16, value: u8) {
        self.bench.pio_write(port, &[value]);
    }
    fn port_write_u16(&self, port: u16, value: u16) {
        self.bench.pio_write(port, &value.to_le_bytes());
    }
    fn port_write_u32(&self, port: u16, value: u32) {
        self.bench.pio_write(port, &value.to_le_bytes());
    }

    fn map_mmio(&self, base: u64, len: u64) -> bool {
        let end = base.saturating_add(len);
        (base >= MMIO32_START && end <= MMIO32_START + MMIO32_SIZE)
            || (base >= WINDOW_BAR && end <= WINDOW_BAR + self.layout.window_size)
    }

    unsafe fn mmio_read(&self, addr: u64, width: Width) -> u64 {
        if addr < WINDOW_BAR {
            let mut raw = [0xffu8; 8];
            let n = width.bytes() as usize;
            assert!(
                self.bench.mmio_read(addr, &mut raw[..n]),
                "driver read {addr:#x}, where no device is"
            );
            raw[n..].fill(0);
            return u64::from_le_bytes(raw);
        }
        let offset = addr - WINDOW_BAR;
        assert!(
            offset + width.bytes() <= self.layout.shm_size,
            "driver read the notify area or past the window"
        );
        let ptr = self.window.host(offset, width.bytes(), false);
        // SAFETY: `host` checked the range is mapped; the alignment is the driver's duty,
        // which read_volatile checks in debug builds.
        unsafe {
            match width {
                Width::U8 => ptr.read_volatile().into(),
                Width::U16 => ptr.cast::<u16>().read_volatile().into(),
                Width::U32 => ptr.cast::<u32>().read_volatile().into(),
                Width::U64 => ptr.cast::<u64>().read_volatile(),
            }
        }
    }

    unsafe fn mmio_write(&self, addr: u64, width: Width, value: u64) {
        if addr < WINDOW_BAR {
            let n = width.bytes() as usize;
            assert!(
                self.bench.mmio_write(addr, &value.to_le_bytes()[..n]),
                "driver wrote {addr:#x}, where no device is"
            );
            let notify = self.settings + NOTIFY;
            if self.in_settings(addr) && (notify..notify + 2 * NOTIFY_MULTIPLIER).contains(&addr) {
                self.notify((addr - notify) / NOTIFY_MULTIPLIER);
            }
            return;
        }
        let offset = addr - WINDOW_BAR;
        if offset >= self.layout.notify_offset {
            // A doorbell: the VMM hands it to the device, which resolves and broadcasts it.
            self.handle
                .handle_notify(offset - self.layout.notify_offset);
            return;
        }
        let ptr = self.window.host(offset, width.bytes(), true);
        // SAFETY: `host` checked the range is mapped writable.
        unsafe {
            match width {
                Width::U8 => ptr.write_volatile(value as u8),
                Width::U16 => ptr.cast::<u16>().write_volatile(value as u16),
                Width::U32 => ptr.cast::<u32>().write_volatile(value as u32),
                Width::U64 => ptr.cast::<u64>().write_volatile(value),
            }
        }
    }

    fn dma_alloc(&self, len: usize, align: usize) -> Option<DmaRegion> {
        let start = self.dma_next.get().next_multiple_of(align as u64);
        let end = start + len as u64;
        if end > DMA_BASE + DMA_SIZE as u64 {
            return None;
        }
        self.dma_next.set(end);
        let host = self.mem.get_host_address(GuestAddress(start)).ok()?;
        // SAFETY: [start, end) is fresh, zeroed guest memory (never handed out before) that
        // lives as long as `self.mem`, which outlives the driver borrowing this platform; the
        // device sees it at guest address `start`.
        Some(unsafe { DmaRegion::new(NonNull::new(host)?, start, len) })
    }

    fn wait(&self) {
        self.waits.set(self.waits.get() + 1);
        self.pump();
    }
}
