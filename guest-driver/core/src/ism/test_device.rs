// SPDX-License-Identifier: Apache-2.0
//! Host test bench for the virtio-ism driver: the real `virtio-ism` device model behind an
//! in-memory virtio-pci function, in one process.
//!
//! [`TestIsm`] is the driver's [`Platform`]: its DMA memory is a `GuestMemoryMmap` that the
//! device's queues point into; BAR 0 holds the common config, notify, ISR, device config and
//! MSI-X table registers, emulated here and forwarded to the device through `VirtioDevice`;
//! BAR 2 is the device's shared-memory window, a host reservation the device maps pool memory
//! into. A notify write runs the device's worker synchronously; `wait` lets it deliver pool
//! events, as its thread would. A [`Tamper`] hook can rewrite a completed control reply to
//! play a hostile device.

use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use std::boxed::Box;
use std::io;
use std::sync::{Arc, Mutex};
use std::vec;
use std::vec::Vec;

use ism_pool::{DevId, LocalPool, PoolConfig, PoolSession, Token};
use virtio_device::{ActivationContext, VirtioDevice, VirtioInterrupt, VirtioInterruptType};
use virtio_ism::test_utils::MemWindow;
use virtio_ism::{Ism, IsmConfig, IsmHandle, IsmWorker, KickSink, WindowLayout};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::fake::{FakeConfig, FakeFunction};
use crate::pci::PciAddress;
use crate::platform::{DmaRegion, Platform, Width};

pub const ADDR: PciAddress = PciAddress {
    bus: 0,
    device: 4,
    function: 0,
};
pub const BAR0: u64 = 0xe000_0000;
const BAR0_SIZE: u64 = 0x4000;
pub const WINDOW_BAR: u64 = 0x10_0000_0000;
const COMMON: u64 = 0;
const NOTIFY: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;
const ISR: u64 = 0x2000;
const DEVICE_CFG: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x3800;
pub const MSIX_ENTRIES: usize = 8;
const DMA_BASE: u64 = 0x10_0000;
const DMA_SIZE: usize = 1 << 20;

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

#[derive(Default)]
pub struct RecordingInterrupt {
    raised: Mutex<Vec<VirtioInterruptType>>,
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        self.raised.lock().unwrap().push(int_type);
        Ok(())
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

#[derive(Clone, Copy, Default)]
struct QueueRegs {
    size: u16,
    vector: u16,
    enabled: bool,
    desc: u64,
    driver: u64,
    device: u64,
}

/// Queue registers after reset: the device's maximum size, no vector.
fn fresh_queues() -> [QueueRegs; 2] {
    [QueueRegs {
        size: 64,
        vector: 0xffff,
        ..QueueRegs::default()
    }; 2]
}

/// The transport state the driver programs through BAR 0.
struct Transport {
    device: Ism,
    worker: Option<IsmWorker>,
    offered_mask: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: [QueueRegs; 2],
    config_vector: u16,
    msix: [[u32; 4]; MSIX_ENTRIES],
    tamper: Option<Tamper>,
    silent: bool,
    config_override: Option<[u8; 32]>,
}

/// One virtio-ism device behind an in-memory PCI function, and the platform its driver runs
/// on.
pub struct TestIsm {
    mem: GuestMemoryMmap,
    dma_next: Cell<u64>,
    pub config: FakeConfig,
    pub window: Arc<MemWindow>,
    pub layout: WindowLayout,
    pub interrupts: Arc<RecordingInterrupt>,
    pub handle: IsmHandle,
    pub devid: u64,
    transport: RefCell<Transport>,
    pub waits: Cell<u64>,
}

impl TestIsm {
    /// A device in `pool`'s group whose doorbells go to `fabric`.
    pub fn new(pool: &Arc<LocalPool>, fabric: &Arc<Fabric>) -> Self {
        let session: Arc<dyn PoolSession> = pool.session().unwrap();
        let devid = session.info().devid;
        let config = IsmConfig {
            shm_size: CHUNKS * CHUNK,
            chunk_size: CHUNK,
            notify_size: NOTIFY_SIZE,
        };
        let layout = config.layout().unwrap();
        let window = MemWindow::new(layout.window_size);
        let mut device = Ism::new("ism-test", config, session, window.clone())
            .unwrap()
            .with_kick_sink(fabric.clone());
        let list = device.get_shm_regions().unwrap();
        let mut moved = list.clone();
        moved.addr = GuestAddress(WINDOW_BAR);
        device.set_shm_regions(moved).unwrap();
        let handle = device.handle();
        fabric.devices.lock().unwrap().push((devid, handle.clone()));

        let mut f = FakeFunction::new(ADDR, 0x1af4, 0x106c);
        f.set_bar64(0, BAR0, BAR0_SIZE);
        f.set_bar64(2, WINDOW_BAR, list.len);
        f.add_cap(0x40, &virtio_cap(1, 0, COMMON, 0x38, 0, 16));
        let mut notify = virtio_cap(2, 0, NOTIFY, 0x100, 0, 20);
        notify[16..20].copy_from_slice(&NOTIFY_MULTIPLIER.to_le_bytes());
        f.add_cap(0x50, &notify[..20]);
        f.add_cap(0x68, &virtio_cap(3, 0, ISR, 4, 0, 16));
        f.add_cap(0x78, &virtio_cap(4, 0, DEVICE_CFG, 0x100, 0, 16));
        for (i, shm) in list.region_list.iter().enumerate() {
            let at = 0x88 + 24 * i as u8;
            f.add_cap(at, &virtio_cap(8, 2, shm.offset, shm.len, shm.id, 24));
        }
        let mut msix = [0u8; 12];
        msix[0] = 0x11;
        msix[2..4].copy_from_slice(&(MSIX_ENTRIES as u16 - 1).to_le_bytes());
        msix[4..8].copy_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        msix[8..12].copy_from_slice(&0x3c00u32.to_le_bytes());
        f.add_cap(0xb8, &msix);

        Self {
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(DMA_BASE), DMA_SIZE)]).unwrap(),
            dma_next: Cell::new(DMA_BASE),
            config: FakeConfig::with(vec![f]),
            window,
            layout,
            interrupts: Arc::new(RecordingInterrupt::default()),
            handle,
            devid: devid.0,
            transport: RefCell::new(Transport {
                device,
                worker: None,
                offered_mask: u64::MAX,
                device_feature_select: 0,
                driver_feature_select: 0,
                driver_features: 0,
                status: 0,
                queue_select: 0,
                queues: fresh_queues(),
                config_vector: 0xffff,
                msix: [[0, 0, 0, 1]; MSIX_ENTRIES],
                tamper: None,
                silent: false,
                config_override: None,
            }),
            waits: Cell::new(0),
        }
    }

    /// Offer only `mask` of the device's features.
    pub fn offer_only(&self, mask: u64) {
        self.transport.borrow_mut().offered_mask = mask;
    }

    /// Rewrite the next control completion with `tamper`.
    pub fn tamper_next(&self, tamper: Tamper) {
        self.transport.borrow_mut().tamper = Some(tamper);
    }

    /// Ignore control-queue notifications from now on (a hung device).
    pub fn go_silent(&self) {
        self.transport.borrow_mut().silent = true;
    }

    /// Present `config` instead of the device's config space.
    pub fn override_config(&self, config: [u8; 32]) {
        self.transport.borrow_mut().config_override = Some(config);
    }

    /// Features the device saw acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.transport.borrow().device.acked_features()
    }

    /// Device status as the driver last wrote it.
    pub fn status(&self) -> u8 {
        self.transport.borrow().status
    }

    /// Queue registers as programmed: (enabled, msix vector).
    pub fn queue_state(&self, index: usize) -> (bool, u16) {
        let q = self.transport.borrow().queues[index];
        (q.enabled, q.vector)
    }

    /// MSI-X table entry `index`: address low, high, data, control.
    pub fn msix_entry(&self, index: usize) -> [u32; 4] {
        self.transport.borrow().msix[index]
    }

    /// Counter of the device model.
    pub fn counter(&self, name: &str) -> u64 {
        self.transport.borrow().device.counters().unwrap()[name].0
    }

    /// Let the device's worker deliver pool events (what its thread does on its own).
    pub fn pump(&self) {
        if let Some(worker) = self.transport.borrow_mut().worker.as_mut() {
            worker.process_pool_events().unwrap();
        }
    }

    fn common_read(&self, offset: u64) -> u64 {
        let t = self.transport.borrow();
        let q = t.queues.get(usize::from(t.queue_select)).copied();
        let offered = t.device.features() & t.offered_mask;
        match offset {
            0 => t.device_feature_select.into(),
            4 => match t.device_feature_select {
                0 => offered & 0xffff_ffff,
                1 => offered >> 32,
                _ => 0,
            },
            8 => t.driver_feature_select.into(),
            16 => t.config_vector.into(),
            18 => t.device.queue_max_sizes().len() as u64,
            20 => t.status.into(),
            21 => 0,
            22 => t.queue_select.into(),
            24 => q.map_or(0, |q| q.size.into()),
            26 => q.map_or(0xffff, |q| q.vector.into()),
            28 => q.map_or(0, |q| q.enabled.into()),
            30 => t.queue_select.into(),
            _ => 0,
        }
    }

    fn common_write(&self, offset: u64, value: u64) {
        let mut t = self.transport.borrow_mut();
        let select = usize::from(t.queue_select);
        let set_half = |field: &mut u64, high: bool, value: u64| {
            if high {
                *field = (*field & 0xffff_ffff) | (value << 32);
            } else {
                *field = (*field & !0xffff_ffff) | value;
            }
        };
        match offset {
            0 => t.device_feature_select = value as u32,
            8 => t.driver_feature_select = value as u32,
            12 => {
                let high = t.driver_feature_select == 1;
                set_half(&mut t.driver_features, high, value);
            }
            16 => t.config_vector = value as u16,
            20 => {
                drop(t);
                self.write_status(value as u8);
            }
            22 => t.queue_select = value as u16,
            24 | 26 | 28 | 32 | 36 | 40 | 44 | 48 | 52 => {
                let Some(q) = t.queues.get_mut(select) else {
                    return;
                };
                match offset {
                    24 => q.size = value as u16,
                    26 => q.vector = value as u16,
                    28 => q.enabled = value != 0,
                    32 | 36 => set_half(&mut q.desc, offset == 36, value),
                    40 | 44 => set_half(&mut q.driver, offset == 44, value),
                    _ => set_half(&mut q.device, offset == 52, value),
                }
            }
            _ => {}
        }
    }

    fn write_status(&self, value: u8) {
        let mut t = self.transport.borrow_mut();
        if value == 0 {
            t.worker = None;
            t.device.reset();
            t.status = 0;
            t.driver_features = 0;
            t.queues = fresh_queues();
            return;
        }
        let old = t.status;
        let mut new = value;
        if new & 8 != 0 && old & 8 == 0 {
            let offered = t.device.features() & t.offered_mask;
            let features = t.driver_features;
            if features & !offered != 0 {
                new &= !8;
            } else {
                t.device.ack_features(features);
            }
        }
        if new & 4 != 0 && old & 4 == 0 {
            let queues = t
                .queues
                .iter()
                .enumerate()
                .filter(|(_, q)| q.enabled)
                .map(|(index, q)| {
                    let mut queue = Queue::new(64).unwrap();
                    queue.set_size(q.size);
                    queue.set_desc_table_address(Some(q.desc as u32), Some((q.desc >> 32) as u32));
                    queue.set_avail_ring_address(
                        Some(q.driver as u32),
                        Some((q.driver >> 32) as u32),
                    );
                    queue.set_used_ring_address(
                        Some(q.device as u32),
                        Some((q.device >> 32) as u32),
                    );
                    queue.set_ready(true);
                    (index as u16, queue, EventFd::new(EFD_NONBLOCK).unwrap())
                })
                .collect();
            let worker = t
                .device
                .activate_worker(ActivationContext {
                    mem: GuestMemoryAtomic::new(self.mem.clone()),
                    interrupt_cb: self.interrupts.clone(),
                    queues,
                })
                .unwrap();
            t.worker = Some(worker);
        }
        t.status = new;
    }

    fn notify(&self, queue: u64) {
        let mut t = self.transport.borrow_mut();
        if t.silent {
            return;
        }
        let Some(worker) = t.worker.as_mut() else {
            return;
        };
        match queue {
            0 => {
                if worker.process_ctrl_queue().unwrap()
                    && let Some(mut tamper) = t.tamper.take()
                {
                    let (desc, used) = (t.queues[0].desc, t.queues[0].device);
                    let size = t.queues[0].size;
                    drop(t);
                    self.tamper_last_completion(desc, used, size, &mut tamper);
                }
            }
            1 => {
                worker.process_event_queue().unwrap();
            }
            _ => {}
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

    fn bar0_read(&self, offset: u64, width: Width) -> u64 {
        match offset {
            COMMON..0x38 => self.common_read(offset),
            ISR..0x2004 => 0,
            DEVICE_CFG..0x3100 => {
                let t = self.transport.borrow();
                let mut raw = [0u8; 8];
                let n = width.bytes() as usize;
                let at = offset - DEVICE_CFG;
                match t.config_override {
                    Some(cfg) => {
                        if let Some(src) = cfg.get(at as usize..at as usize + n) {
                            raw[..n].copy_from_slice(src);
                        }
                    }
                    None => t.device.read_config(at, &mut raw[..n]),
                }
                u64::from_le_bytes(raw)
            }
            MSIX_TABLE..0x3880 => {
                let i = (offset - MSIX_TABLE) as usize;
                self.transport.borrow().msix[i / 16][(i % 16) / 4].into()
            }
            _ => 0,
        }
    }

    fn bar0_write(&self, offset: u64, value: u64) {
        match offset {
            COMMON..0x38 => self.common_write(offset, value),
            NOTIFY..0x1100 => self.notify((offset - NOTIFY) / u64::from(NOTIFY_MULTIPLIER)),
            MSIX_TABLE..0x3880 => {
                let i = (offset - MSIX_TABLE) as usize;
                self.transport.borrow_mut().msix[i / 16][(i % 16) / 4] = value as u32;
            }
            _ => {}
        }
    }
}

/// A virtio_pci_cap (16 bytes) or virtio_pci_cap64 (24 bytes), padded to 24.
fn virtio_cap(cfg_type: u8, bar: u8, offset: u64, len: u64, id: u8, cap_len: u8) -> Vec<u8> {
    let mut c = vec![0u8; 24];
    c[0] = 0x09;
    c[2] = cap_len;
    c[3] = cfg_type;
    c[4] = bar;
    c[5] = id;
    c[8..12].copy_from_slice(&(offset as u32).to_le_bytes());
    c[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    c[16..20].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
    c[20..24].copy_from_slice(&((len >> 32) as u32).to_le_bytes());
    c.truncate(usize::from(cap_len));
    c
}

impl Platform for TestIsm {
    fn port_read_u8(&self, _port: u16) -> u8 {
        0xff
    }
    fn port_read_u16(&self, _port: u16) -> u16 {
        0xffff
    }
    fn port_read_u32(&self, _port: u16) -> u32 {
        u32::MAX
    }
    fn port_write_u8(&self, _port: u16, _value: u8) {}
    fn port_write_u16(&self, _port: u16, _value: u16) {}
    fn port_write_u32(&self, _port: u16, _value: u32) {}

    fn map_mmio(&self, base: u64, len: u64) -> bool {
        let end = base.saturating_add(len);
        (base >= BAR0 && end <= BAR0 + BAR0_SIZE)
            || (base >= WINDOW_BAR && end <= WINDOW_BAR + self.layout.window_size)
    }

    unsafe fn mmio_read(&self, addr: u64, width: Width) -> u64 {
        if (BAR0..BAR0 + BAR0_SIZE).contains(&addr) {
            return self.bar0_read(addr - BAR0, width);
        }
        let offset = addr.checked_sub(WINDOW_BAR).expect("read outside the BARs");
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
        if (BAR0..BAR0 + BAR0_SIZE).contains(&addr) {
            return self.bar0_write(addr - BAR0, value);
        }
        let offset = addr
            .checked_sub(WINDOW_BAR)
            .expect("write outside the BARs");
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
