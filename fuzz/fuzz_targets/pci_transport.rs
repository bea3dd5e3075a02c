// SPDX-License-Identifier: Apache-2.0
//! ism-vmm's PCI root and virtio-pci transport (`ism_vmm::test_pci::PciBench`) with a
//! virtio-ism device attached, driven by arbitrary guest accesses: configuration space
//! through ports 0xCF8/0xCFC and ECAM (any bus/device/function), and the settings BAR
//! (common configuration, ISR, device configuration, notifications, MSI-X table and PBA).
//! Activation on DRIVER_OK and reset on status 0 run as in the VMM; the device's worker runs
//! when an input asks for it, so queues the guest set up are served.
//!
//! Input layout: operations of 11 bytes, each: op u8, le16 offset, le64 value.
//!   op & 7:  0 config write, 1 config read (ports; offset & 0xff of the device's function)
//!            2 settings BAR write, 3 settings BAR read (offset from BAR 0 as now programmed)
//!            4 ECAM write, 5 ECAM read (offset & 0xfff of the device's function)
//!            6 raw port access: value's low 32 bits to 0xCF8, then a 0xCFC read or write
//!              (any bus, device, function, register)
//!            7 the device: a doorbell write at `offset` of the notify area, then one
//!              round of the worker (control queue, event queue, pool events)
//!   (op >> 3) & 3: width 1, 2, 4 or 8 bytes (config accesses take at most 4)
//!   op bit 5: for writes, the value is little-endian `value`; else all ones
//!
//! The pool, the device and guest memory are built once; each input gets a fresh PCI root
//! the device is plugged into, and the device is reset afterwards: it must then hold nothing
//! and the pool must be as it was after setup.
#![no_main]

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use ism_fuzz::{CountingWindow, check_nothing_left};
use ism_pool::{LocalPool, PoolConfig, PoolSession, PoolStatus};
use ism_vmm::test_pci::{ECAM_START, PciBench};
use libfuzzer_sys::fuzz_target;
use virtio_device::{
    ActivateError, ActivationContext, Counters, ShmError, VirtioDevice, VirtioInterrupt,
    VirtioSharedMemoryList,
};
use virtio_ism::{Ism, IsmConfig, IsmHandle, IsmWorker};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

const SLOT: u8 = 4;
const VECTORS: usize = 4;
const MEM_SIZE: usize = 0x10000;
const CHUNK: u64 = 4096;
const SHM: u64 = 16 * CHUNK;
const MAX_OPS: usize = 256;

/// virtio-ism with its worker kept here instead of on a thread.
struct FuzzIsm {
    ism: Ism,
    worker: Option<IsmWorker>,
}

impl VirtioDevice for FuzzIsm {
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
        self.worker = Some(self.ism.activate_worker(context)?);
        Ok(())
    }
    fn reset(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        self.worker = None;
        self.ism.reset()
    }
    fn shutdown(&mut self) {
        self.worker = None;
        self.ism.shutdown();
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

struct Fixture {
    pool: Arc<LocalPool>,
    session: Arc<dyn PoolSession>,
    window: Arc<CountingWindow>,
    device: Arc<Mutex<FuzzIsm>>,
    handle: IsmHandle,
    mem: GuestMemoryMmap,
    baseline: PoolStatus,
}

impl Fixture {
    fn new() -> Self {
        let pool = LocalPool::new(PoolConfig {
            size: 4 * SHM,
            per_vm_limit: None,
            hugepages: false,
            gid: Some(1),
            ..PoolConfig::default()
        })
        .unwrap();
        let session: Arc<dyn PoolSession> = pool.session().unwrap();
        let window = Arc::new(CountingWindow::new(SHM));
        let config = IsmConfig {
            shm_size: SHM,
            chunk_size: CHUNK,
            notify_size: 4,
            draft_default_perm: Default::default(),
        };
        let ism = Ism::new("fuzz", config, session.clone(), window.clone()).unwrap();
        let handle = ism.handle();
        let device = Arc::new(Mutex::new(FuzzIsm { ism, worker: None }));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let baseline = pool.status();
        Self {
            pool,
            session,
            window,
            device,
            handle,
            mem,
            baseline,
        }
    }

    fn reset(&self) {
        self.device.lock().unwrap().reset();
        assert_eq!(self.window.mapped(), 0, "reset left mappings");
        assert!(self.handle.regions().is_empty(), "reset left regions");
        self.session.take_events();
        check_nothing_left(&self.pool, &self.baseline, &self.mem, MEM_SIZE);
    }
}

thread_local! {
    static FIXTURE: RefCell<Option<Fixture>> = const { RefCell::new(None) };
}

fn select(bench: &PciBench, offset: u64) {
    let value = (1u32 << 31) | (u32::from(SLOT) << 11) | (offset as u32 & 0xfc);
    bench.pio_write(0xcf8, &value.to_le_bytes());
}

fn config_u32(bench: &PciBench, offset: u64) -> u32 {
    select(bench, offset);
    let mut raw = [0xffu8; 4];
    bench.pio_read(0xcfc, &mut raw);
    u32::from_le_bytes(raw)
}

fn run(fixture: &Fixture, input: &[u8]) {
    let mut bench = PciBench::new(GuestMemoryAtomic::new(fixture.mem.clone())).unwrap();
    bench
        .add_virtio_device("fuzz", fixture.device.clone(), VECTORS, SLOT)
        .unwrap();
    let ids = config_u32(&bench, 0);
    for op in input.chunks_exact(11).take(MAX_OPS) {
        let kind = op[0] & 7;
        let width = 1usize << ((op[0] >> 3) & 3);
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]));
        let value = u64::from_le_bytes(op[3..11].try_into().unwrap());
        let mut data = if op[0] & 0x20 != 0 {
            value.to_le_bytes()
        } else {
            [0xff; 8]
        };
        let data = &mut data[..width];
        let config_width = width.min(4);
        match kind {
            0 | 1 => {
                select(&bench, offset);
                let port = 0xcfc + (offset & 3) as u16;
                let data = &mut data[..config_width];
                if kind == 0 {
                    bench.pio_write(port, data);
                } else {
                    bench.pio_read(port, data);
                }
            }
            2 | 3 => {
                let bar = u64::from(config_u32(&bench, 0x10) & !0xf);
                let addr = bar.wrapping_add(offset);
                if kind == 2 {
                    bench.mmio_write(addr, data);
                } else {
                    bench.mmio_read(addr, data);
                }
            }
            4 | 5 => {
                let addr = ECAM_START + (u64::from(SLOT) << 15) + (offset & 0xfff);
                let data = &mut data[..config_width];
                if kind == 4 {
                    bench.mmio_write(addr, data);
                } else {
                    bench.mmio_read(addr, data);
                }
            }
            6 => {
                bench.pio_write(0xcf8, &(value as u32).to_le_bytes());
                let port = 0xcfc + (offset & 3) as u16;
                let data = &mut data[..config_width];
                if offset & 0x8000 != 0 {
                    bench.pio_write(port, data);
                } else {
                    bench.pio_read(port, data);
                }
            }
            _ => {
                if let Some(token) = fixture.handle.handle_notify(offset) {
                    fixture.handle.deliver_kick(token);
                }
                let mut device = fixture.device.lock().unwrap();
                if let Some(worker) = device.worker.as_mut() {
                    // Errors are the guest's (a ring outside memory): the VMM logs them.
                    let _ = worker.process_ctrl_queue();
                    let _ = worker.process_event_queue();
                    let _ = worker.process_pool_events();
                }
            }
        }
    }
    if std::env::var_os("ISM_FUZZ_DEBUG").is_some() {
        let bar = u64::from(config_u32(&bench, 0x10) & !0xf);
        let mut status = [0u8];
        bench.mmio_read(bar + 0x14, &mut status);
        let device = fixture.device.lock().unwrap();
        eprintln!(
            "ISM_FUZZ_DIGEST status {:#x} active {} counters {:?}",
            status[0],
            device.worker.is_some(),
            device.counters().map(|c| c["ctrl_commands"])
        );
    }
    // Identity registers are read-only whatever the guest wrote.
    assert_eq!(config_u32(&bench, 0), ids, "vendor/device id changed");
}

fuzz_target!(|input: &[u8]| {
    FIXTURE.with_borrow_mut(|fixture| {
        let fixture = fixture.get_or_insert_with(Fixture::new);
        run(fixture, input);
        fixture.reset();
    })
});
