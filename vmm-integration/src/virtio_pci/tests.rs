// SPDX-License-Identifier: Apache-2.0
//! End-to-end tests of the PCI root and the virtio-pci transport, driven the way a guest
//! driver would: configuration space through ECAM and 0xCF8/0xCFC, registers through the
//! MMIO bus. KVM is the recording fake from `interrupt::fake`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use virtio_device::{
    ActivateError, ActivationContext, ShmError, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    VirtioSharedMemory, VirtioSharedMemoryList,
};
use virtio_queue::QueueT;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::common_config::VIRTQ_MSI_NO_VECTOR;
use super::*;
use crate::bus::IoBuses;
use crate::devices::virtio_rng::VirtioRng;
use crate::interrupt::fake::FakeKvm;
use crate::layout;
use crate::pci::PciManager;

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

/// (queue index, size, desc, avail, used) of one activated queue.
type ActivatedQueue = (u16, u16, u64, u64, u64);

#[derive(Default)]
struct FakeLog {
    acked: Option<u64>,
    activations: Vec<Vec<ActivatedQueue>>,
    resets: usize,
    shm_moves: Vec<u64>,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    queue_evts: Vec<EventFd>,
    fail_activate: bool,
    /// Refuse, as virtio-ism does, when queue 0 is not among the enabled queues.
    need_queue_0: bool,
}

struct FakeDevice {
    queue_sizes: Vec<u16>,
    shm: Option<VirtioSharedMemoryList>,
    log: Arc<Mutex<FakeLog>>,
}

const FAKE_FEATURES: u64 = VIRTIO_F_VERSION_1 | 1;

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        0x2a
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn features(&self) -> u64 {
        FAKE_FEATURES
    }
    fn ack_features(&mut self, value: u64) {
        self.log.lock().unwrap().acked = Some(value);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        virtio_device::read_config_from_slice(&[0xa0, 0xa1, 0xa2, 0xa3], offset, data);
    }
    fn activate(&mut self, context: ActivationContext) -> Result<(), ActivateError> {
        let mut log = self.log.lock().unwrap();
        if log.fail_activate {
            return Err(ActivateError::Device("refused".into()));
        }
        if log.need_queue_0 && !context.queues.iter().any(|(i, _, _)| *i == 0) {
            let enabled = context.queues.iter().map(|(i, _, _)| *i).collect();
            return Err(ActivateError::device(
                virtio_ism::IsmActivateError::NoControlQueue(enabled),
            ));
        }
        let queues = context
            .queues
            .iter()
            .map(|(i, q, _)| (*i, q.size(), q.desc_table(), q.avail_ring(), q.used_ring()))
            .collect();
        log.activations.push(queues);
        log.queue_evts = context.queues.into_iter().map(|(_, _, e)| e).collect();
        log.interrupt = Some(context.interrupt_cb);
        Ok(())
    }
    fn reset(&mut self) -> Option<Arc<dyn VirtioInterrupt>> {
        let mut log = self.log.lock().unwrap();
        log.resets += 1;
        log.queue_evts.clear();
        log.interrupt.take()
    }
    fn get_shm_regions(&self) -> Option<VirtioSharedMemoryList> {
        self.shm.clone()
    }
    fn set_shm_regions(&mut self, list: VirtioSharedMemoryList) -> Result<(), ShmError> {
        let Some(shm) = &mut self.shm else {
            return Err(ShmError::NotSupported);
        };
        self.log.lock().unwrap().shm_moves.push(list.addr.0);
        *shm = list;
        Ok(())
    }
}

struct Harness {
    kvm: Arc<FakeKvm>,
    buses: Arc<IoBuses>,
    mgr: PciManager,
    mem: GuestMemoryMmap,
}

const RAM_SIZE: usize = 0x40_0000;

fn harness() -> Harness {
    harness_with(Lifecycle::inline())
}

/// A harness whose devices activate and reset through `lifecycle`.
fn harness_with(lifecycle: Lifecycle) -> Harness {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
    let kvm = Arc::new(FakeKvm::default());
    let buses = Arc::new(IoBuses::new());
    let mgr = PciManager::with_backend(
        kvm.clone(),
        kvm.clone(),
        GuestMemoryAtomic::new(mem.clone()),
        buses.clone(),
        layout::MMIO64_MIN_START,
    )
    .unwrap()
    .with_lifecycle(lifecycle);
    Harness {
        kvm,
        buses,
        mgr,
        mem,
    }
}

fn fake_device(
    queues: usize,
    shm: Option<VirtioSharedMemoryList>,
) -> (FakeDevice, Arc<Mutex<FakeLog>>) {
    let log = Arc::new(Mutex::new(FakeLog::default()));
    (
        FakeDevice {
            queue_sizes: vec![16; queues],
            shm,
            log: log.clone(),
        },
        log,
    )
}

impl Harness {
    fn ecam(dev: u8, off: u64) -> u64 {
        layout::PCI_ECAM_START + (u64::from(dev) << 15) + off
    }
    fn cfg_read(&self, dev: u8, off: u64, data: &mut [u8]) {
        assert!(self.buses.mmio_read(Self::ecam(dev, off), data));
    }
    fn cfg_read32(&self, dev: u8, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.cfg_read(dev, off, &mut b);
        u32::from_le_bytes(b)
    }
    fn cfg_read8(&self, dev: u8, off: u64) -> u8 {
        let mut b = [0u8; 1];
        self.cfg_read(dev, off, &mut b);
        b[0]
    }
    fn cfg_write(&self, dev: u8, off: u64, data: &[u8]) {
        assert!(self.buses.mmio_write(Self::ecam(dev, off), data));
    }
    fn cfg_read32_io(&self, dev: u8, off: u8) -> u32 {
        let addr = 0x8000_0000u32 | (u32::from(dev) << 11) | u32::from(off & 0xfc);
        assert!(self.buses.pio_write(0xcf8, &addr.to_le_bytes()));
        let mut b = [0u8; 4];
        assert!(self.buses.pio_read(0xcfc, &mut b));
        u32::from_le_bytes(b)
    }
    fn bar0(&self, dev: u8) -> u64 {
        u64::from(self.cfg_read32(dev, 0x10) & !0xf)
    }
    fn w8(&self, addr: u64, v: u8) {
        assert!(self.buses.mmio_write(addr, &[v]));
    }
    fn w16(&self, addr: u64, v: u16) {
        assert!(self.buses.mmio_write(addr, &v.to_le_bytes()));
    }
    fn w32(&self, addr: u64, v: u32) {
        assert!(self.buses.mmio_write(addr, &v.to_le_bytes()));
    }
    fn w64(&self, addr: u64, v: u64) {
        assert!(self.buses.mmio_write(addr, &v.to_le_bytes()));
    }
    fn r8(&self, addr: u64) -> u8 {
        let mut b = [0u8; 1];
        assert!(self.buses.mmio_read(addr, &mut b));
        b[0]
    }
    fn r16(&self, addr: u64) -> u16 {
        let mut b = [0u8; 2];
        assert!(self.buses.mmio_read(addr, &mut b));
        u16::from_le_bytes(b)
    }
    fn r32(&self, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(self.buses.mmio_read(addr, &mut b));
        u32::from_le_bytes(b)
    }
}

/// A vendor capability as found by walking the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FoundCap {
    cfg_type: u8,
    bar: u8,
    id: u8,
    offset: u64,
    length: u64,
    extra: u32,
}

/// Walk the capability list like a driver; returns vendor caps and the MSI-X cap offset.
fn walk_caps(h: &Harness, dev: u8) -> (Vec<FoundCap>, Option<u64>) {
    let status = h.cfg_read32(dev, 4) >> 16;
    assert_ne!(status & 0x10, 0, "capability list bit");
    let mut off = u64::from(h.cfg_read8(dev, 0x34));
    let mut caps = Vec::new();
    let mut msix = None;
    let mut hops = 0;
    while off != 0 {
        hops += 1;
        assert!(hops < 48, "capability list loops");
        let id = h.cfg_read8(dev, off);
        if id == 0x09 {
            let len = h.cfg_read8(dev, off + 2);
            let mut offset = u64::from(h.cfg_read32(dev, off + 8));
            let mut length = u64::from(h.cfg_read32(dev, off + 12));
            let mut extra = 0;
            if len == 20 {
                extra = h.cfg_read32(dev, off + 16);
            } else if len == 24 {
                offset |= u64::from(h.cfg_read32(dev, off + 16)) << 32;
                length |= u64::from(h.cfg_read32(dev, off + 20)) << 32;
            }
            caps.push(FoundCap {
                cfg_type: h.cfg_read8(dev, off + 3),
                bar: h.cfg_read8(dev, off + 4),
                id: h.cfg_read8(dev, off + 5),
                offset,
                length,
                extra,
            });
        } else if id == 0x11 {
            msix = Some(off);
        }
        off = u64::from(h.cfg_read8(dev, off + 1));
    }
    (caps, msix)
}

fn pci_cfg_cap_offset(h: &Harness, dev: u8) -> u64 {
    let mut off = u64::from(h.cfg_read8(dev, 0x34));
    while off != 0 {
        if h.cfg_read8(dev, off) == 0x09 && h.cfg_read8(dev, off + 3) == 5 {
            return off;
        }
        off = u64::from(h.cfg_read8(dev, off + 1));
    }
    panic!("no VIRTIO_PCI_CAP_PCI_CFG capability");
}

fn shm_list() -> VirtioSharedMemoryList {
    VirtioSharedMemoryList {
        addr: GuestAddress(0),
        len: 1 << 33,
        region_list: vec![
            VirtioSharedMemory {
                id: 0,
                offset: 0,
                len: 1 << 32,
            },
            VirtioSharedMemory {
                id: 1,
                offset: (1 << 32) + 0x1000,
                len: 0x1000,
            },
        ],
    }
}

#[test]
fn test_capability_walk_finds_every_virtio_and_shm_cap() {
    let mut h = harness();
    let (dev, log) = fake_device(2, Some(shm_list()));
    let info = h
        .mgr
        .add_virtio_device_with_vectors("fake0", Arc::new(Mutex::new(dev)), 5)
        .unwrap();
    assert_eq!(info.bdf, "0000:00:01.0");
    assert_eq!(h.cfg_read32(1, 0), 0x1040_1af4 + (0x2a << 16));

    let (caps, msix) = walk_caps(&h, 1);
    let by_type: BTreeMap<u8, Vec<FoundCap>> = caps.iter().fold(BTreeMap::new(), |mut m, c| {
        m.entry(c.cfg_type).or_insert_with(Vec::new).push(*c);
        m
    });
    let one = |t: u8| by_type[&t][0];
    assert_eq!((one(1).bar, one(1).offset, one(1).length), (0, 0, 0x38));
    assert_eq!((one(3).bar, one(3).offset, one(3).length), (0, 0x1000, 1));
    assert_eq!(
        (one(4).bar, one(4).offset, one(4).length),
        (0, 0x2000, 0x1000)
    );
    assert_eq!(by_type[&5].len(), 1, "one PCI_CFG capability");
    let notify = one(2);
    assert_eq!((notify.bar, notify.offset, notify.length), (0, 0x3000, 8));
    assert_eq!(notify.extra, 4, "notify_off_multiplier");
    let shm = &by_type[&8];
    assert_eq!(shm.len(), 2);
    for (cap, region) in shm.iter().zip(shm_list().region_list) {
        assert_eq!(cap.bar, 2);
        assert_eq!(
            (cap.id, cap.offset, cap.length),
            (region.id, region.offset, region.len)
        );
    }

    let msix = msix.expect("MSI-X capability");
    let ctrl = h.cfg_read32(1, msix) >> 16;
    assert_eq!(ctrl & 0x7ff, 4, "table size is N-1");
    assert_eq!(h.cfg_read32(1, msix + 4), 0x4000);
    assert_eq!(h.cfg_read32(1, msix + 8), 0x5000);

    // BAR 2/3 is 64-bit prefetchable in the 64-bit window, and the device was told.
    let lo = h.cfg_read32(1, 0x18);
    let hi = h.cfg_read32(1, 0x1c);
    assert_eq!(lo & 0xf, 0xc);
    let shm_addr = u64::from(lo & !0xf) | (u64::from(hi) << 32);
    assert!(shm_addr >= layout::MMIO64_MIN_START);
    assert_eq!(log.lock().unwrap().shm_moves, vec![shm_addr]);
    assert!((layout::MMIO32_START..layout::PCI_ECAM_START).contains(&h.bar0(1)));

    // The PCI_CFG capability is a window onto BAR 0: read num_queues through it, write
    // queue_select through it.
    let pci_cfg = pci_cfg_cap_offset(&h, 1);
    h.cfg_write(1, pci_cfg + 4, &[0]);
    h.cfg_write(1, pci_cfg + 8, &0x12u32.to_le_bytes());
    h.cfg_write(1, pci_cfg + 12, &2u32.to_le_bytes());
    assert_eq!(h.cfg_read32(1, pci_cfg + 16) & 0xffff, 2);
    h.cfg_write(1, pci_cfg + 8, &0x16u32.to_le_bytes());
    h.cfg_write(1, pci_cfg + 16, &1u16.to_le_bytes());
    assert_eq!(h.r16(h.bar0(1) + 0x16), 1);
    // A window past the BAR or misaligned reads plain config bytes and writes nothing.
    h.cfg_write(1, pci_cfg + 8, &0xffff_fffeu32.to_le_bytes());
    h.cfg_write(1, pci_cfg + 12, &4u32.to_le_bytes());
    h.cfg_write(1, pci_cfg + 16, &7u32.to_le_bytes());
    assert_eq!(h.r16(h.bar0(1) + 0x16), 1);

    // Both configuration mechanisms see the same bytes everywhere.
    for reg in 0..64u8 {
        assert_eq!(
            h.cfg_read32_io(1, reg * 4),
            h.cfg_read32(1, u64::from(reg) * 4)
        );
        assert_eq!(
            h.cfg_read32_io(0, reg * 4),
            h.cfg_read32(0, u64::from(reg) * 4)
        );
    }
}

/// Run the driver's feature and queue setup; returns the settings BAR address.
fn setup_queue(h: &Harness, dev: u8, queue: u16, desc: u64, avail: u64, used: u64, size: u16) {
    let bar = h.bar0(dev);
    h.w16(bar + 0x16, queue);
    h.w16(bar + 0x18, size);
    h.w64(bar + 0x20, desc);
    h.w32(bar + 0x28, avail as u32);
    h.w32(bar + 0x2c, (avail >> 32) as u32);
    h.w64(bar + 0x30, used);
    h.w16(bar + 0x1c, 1);
}

fn negotiate(h: &Harness, dev: u8, features: u64) -> u8 {
    let bar = h.bar0(dev);
    h.w8(bar + 0x14, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    for sel in 0..2u32 {
        h.w32(bar + 0x08, sel);
        h.w32(bar + 0x0c, (features >> (32 * sel)) as u32);
    }
    h.w8(
        bar + 0x14,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    h.r8(bar + 0x14)
}

const DRIVER_READY: u8 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

#[test]
fn test_driver_ok_activates_queues_and_status_zero_resets() {
    let mut h = harness();
    let (dev, log) = fake_device(2, None);
    h.mgr
        .add_virtio_device("fake0", Arc::new(Mutex::new(dev)))
        .unwrap();
    let bar = h.bar0(1);
    h.cfg_write(1, 4, &[0x06, 0x00]);

    // Device features through the select register.
    h.w32(bar, 1);
    assert_eq!(h.r32(bar + 4), 1);
    h.w32(bar, 0);
    assert_eq!(h.r32(bar + 4), 1);
    assert_eq!(h.r16(bar + 0x12), 2);
    // An unoffered feature is refused: FEATURES_OK stays clear.
    assert_eq!(
        negotiate(&h, 1, FAKE_FEATURES | 1 << 5) & STATUS_FEATURES_OK,
        0
    );
    assert_eq!(log.lock().unwrap().acked, None);
    h.w8(bar + 0x14, 0);
    assert_ne!(negotiate(&h, 1, FAKE_FEATURES) & STATUS_FEATURES_OK, 0);
    assert_eq!(log.lock().unwrap().acked, Some(FAKE_FEATURES));
    // Device config is reachable at its capability offset.
    assert_eq!(h.r16(bar + 0x2001), 0xa2a1);

    setup_queue(&h, 1, 1, 0x1000, 0x2000, 0x3000, 8);
    h.w8(bar + 0x14, DRIVER_READY);
    assert_eq!(h.r8(bar + 0x14), DRIVER_READY);
    {
        let l = log.lock().unwrap();
        assert_eq!(l.activations, vec![vec![(1, 8, 0x1000, 0x2000, 0x3000)]]);
    }
    let notify1 = bar + 0x3000 + 4;
    h.kvm.snapshot(|s| {
        assert_eq!(
            s.ioevents.keys().copied().collect::<Vec<_>>(),
            vec![notify1]
        );
    });
    // The MMIO notify path (no ioeventfd hit) reaches the device's eventfd too.
    h.w16(notify1, 1);
    assert_eq!(log.lock().unwrap().queue_evts[0].read().unwrap(), 1);

    // Vector(v), Queue(i) and notifier map onto the MSI-X table.
    h.w16(bar + 0x16, 1);
    h.w16(bar + 0x1a, 2);
    assert_eq!(h.r16(bar + 0x1a), 2);
    let irq = log
        .lock()
        .unwrap()
        .interrupt
        .clone()
        .unwrap()
        .notifier(VirtioInterruptType::Queue(1))
        .unwrap();
    let direct = log
        .lock()
        .unwrap()
        .interrupt
        .clone()
        .unwrap()
        .notifier(VirtioInterruptType::Vector(2))
        .unwrap();
    // Same eventfd: a write on one is seen on the other.
    direct.write(3).unwrap();
    assert_eq!(irq.read().unwrap(), 3);

    h.w8(bar + 0x14, 0);
    assert_eq!(h.r8(bar + 0x14), 0);
    assert_eq!(log.lock().unwrap().resets, 1);
    h.kvm.snapshot(|s| assert!(s.ioevents.is_empty()));
    h.w16(bar + 0x16, 1);
    assert_eq!(h.r16(bar + 0x1c), 0, "queue disabled after reset");
    assert_eq!(h.r16(bar + 0x18), 16, "queue size back to max");
    assert_eq!(h.r16(bar + 0x1a), VIRTQ_MSI_NO_VECTOR);
}

/// Wait (bounded) until `manager` holds a queued job: the thread that wrote the status is
/// then blocked on it.
fn wait_for_queued_job(manager: &DeviceManager) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while manager.pending() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the status write did not queue a job for the device-manager thread"
        );
        std::thread::yield_now();
    }
}

/// DRIVER_OK and a reset from a vCPU only queue the device's part for the device-manager
/// thread: the device is activated (or reset) when that side runs, the writing vCPU waits
/// for it, and its next status read sees the outcome. A notification the guest writes
/// while the activation is queued (KVM signals the registered ioeventfd) reaches the device.
#[test]
fn test_driver_ok_and_reset_only_queue_the_device_work_for_the_device_manager() {
    let manager = DeviceManager::new();
    let mut h = harness_with(manager.lifecycle());
    let (dev, log) = fake_device(1, None);
    h.mgr
        .add_virtio_device("fake0", Arc::new(Mutex::new(dev)))
        .unwrap();
    let bar = h.bar0(1);
    h.cfg_write(1, 4, &[0x06, 0x00]);
    assert_ne!(negotiate(&h, 1, FAKE_FEATURES) & STATUS_FEATURES_OK, 0);
    setup_queue(&h, 1, 0, 0x1000, 0x2000, 0x3000, 8);

    // The "vCPU": write a status, then read it back.
    let vcpu = |value: u8| {
        let buses = h.buses.clone();
        std::thread::spawn(move || {
            assert!(buses.mmio_write(bar + 0x14, &[value]));
            let mut back = [0u8];
            assert!(buses.mmio_read(bar + 0x14, &mut back));
            back[0]
        })
    };

    let writer = vcpu(DRIVER_READY);
    wait_for_queued_job(&manager);
    assert!(
        log.lock().unwrap().activations.is_empty(),
        "activated on the vCPU"
    );
    assert!(
        !writer.is_finished(),
        "the vCPU went on before the activation ran"
    );
    // The queue's ioeventfd is registered before the job is queued: a notification now is
    // kept in the eventfd the device will own.
    let notify0 = bar + 0x3000;
    let fd = h.kvm.snapshot(|s| s.ioevents.get(&notify0).copied());
    let fd = fd.expect("queue 0's ioeventfd is registered before activation");
    // SAFETY: `fd` is the transport's registered queue eventfd, open while it is registered.
    assert_eq!(unsafe { libc::eventfd_write(fd, 1) }, 0);

    assert_eq!(manager.run_pending(), 1);
    assert_eq!(writer.join().unwrap(), DRIVER_READY);
    {
        let l = log.lock().unwrap();
        assert_eq!(l.activations, vec![vec![(0, 8, 0x1000, 0x2000, 0x3000)]]);
        assert_eq!(l.queue_evts[0].read().unwrap(), 1, "notification lost");
    }

    let writer = vcpu(0);
    wait_for_queued_job(&manager);
    assert_eq!(log.lock().unwrap().resets, 0, "reset on the vCPU");
    assert!(
        !writer.is_finished(),
        "the vCPU went on before the reset ran"
    );
    assert_eq!(manager.run_pending(), 1);
    assert_eq!(writer.join().unwrap(), 0);
    assert_eq!(log.lock().unwrap().resets, 1);
    h.kvm.snapshot(|s| assert!(s.ioevents.is_empty()));
}

#[test]
fn test_activation_failure_sets_needs_reset() {
    let mut h = harness();
    let (dev, log) = fake_device(1, None);
    h.mgr
        .add_virtio_device("fake0", Arc::new(Mutex::new(dev)))
        .unwrap();
    let bar = h.bar0(1);
    // Size 3 is not a power of two.
    negotiate(&h, 1, FAKE_FEATURES);
    setup_queue(&h, 1, 0, 0x1000, 0x2000, 0x3000, 3);
    h.w8(bar + 0x14, DRIVER_READY);
    assert_ne!(h.r8(bar + 0x14) & STATUS_NEEDS_RESET, 0);
    // Rings outside guest memory.
    h.w8(bar + 0x14, 0);
    assert_eq!(h.r8(bar + 0x14), 0);
    negotiate(&h, 1, FAKE_FEATURES);
    setup_queue(&h, 1, 0, u64::MAX - 0xfff, 0x2000, 0x3000, 8);
    h.w8(bar + 0x14, DRIVER_READY);
    assert_ne!(h.r8(bar + 0x14) & STATUS_NEEDS_RESET, 0);
    // The device refusing.
    h.w8(bar + 0x14, 0);
    log.lock().unwrap().fail_activate = true;
    negotiate(&h, 1, FAKE_FEATURES);
    setup_queue(&h, 1, 0, 0x1000, 0x2000, 0x3000, 8);
    h.w8(bar + 0x14, DRIVER_READY);
    assert_ne!(h.r8(bar + 0x14) & STATUS_NEEDS_RESET, 0);
    assert!(log.lock().unwrap().activations.is_empty());
    h.kvm
        .snapshot(|s| assert!(s.ioevents.is_empty(), "no ioeventfd left behind"));
}

/// Every log record, for tests that check what the host is told.
struct CapturingLogger(Mutex<Vec<String>>);

impl log::Log for CapturingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}", record.level(), record.args());
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
    fn flush(&self) {}
}

static LOGGER: CapturingLogger = CapturingLogger(Mutex::new(Vec::new()));

/// Log lines recorded so far that contain `needle` (installs the logger on first use).
fn logged(needle: &str) -> Vec<String> {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let lines = LOGGER.0.lock().unwrap_or_else(|e| e.into_inner());
    lines
        .iter()
        .filter(|l| l.contains(needle))
        .cloned()
        .collect()
}

/// A device that refuses activation (here: the control queue was not enabled) shows
/// NEEDS_RESET to the guest and logs the whole reason, not just "activation failed".
#[test]
fn test_activation_refused_sets_needs_reset_and_logs_the_reason() {
    logged("");
    let mut h = harness();
    let (dev, log) = fake_device(2, None);
    log.lock().unwrap().need_queue_0 = true;
    h.mgr
        .add_virtio_device("refusing0", Arc::new(Mutex::new(dev)))
        .unwrap();
    let bar = h.bar0(1);
    negotiate(&h, 1, FAKE_FEATURES);
    // Queue 1 only.
    setup_queue(&h, 1, 1, 0x1000, 0x2000, 0x3000, 8);
    h.w8(bar + 0x14, DRIVER_READY);
    assert_ne!(h.r8(bar + 0x14) & STATUS_NEEDS_RESET, 0);
    assert!(log.lock().unwrap().activations.is_empty());
    let lines = logged("refusing0: activation failed");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with("ERROR "), "{}", lines[0]);
    assert!(
        lines[0].ends_with("The driver did not enable the control queue (queue 0); it enabled [1]"),
        "the log line carries the device's reason: {}",
        lines[0]
    );
    // With queue 0 the same device activates.
    h.w8(bar + 0x14, 0);
    negotiate(&h, 1, FAKE_FEATURES);
    setup_queue(&h, 1, 0, 0x1000, 0x2000, 0x3000, 8);
    h.w8(bar + 0x14, DRIVER_READY);
    assert_eq!(h.r8(bar + 0x14) & STATUS_NEEDS_RESET, 0);
    assert_eq!(log.lock().unwrap().activations.len(), 1);
}

#[test]
fn test_bar_moves_follow_guest_and_reregister_ioeventfds() {
    let mut h = harness();
    let (dev, log) = fake_device(1, Some(shm_list()));
    h.mgr
        .add_virtio_device("fake0", Arc::new(Mutex::new(dev)))
        .unwrap();
    let old = h.bar0(1);
    h.cfg_write(1, 4, &[0x06, 0x00]);
    negotiate(&h, 1, FAKE_FEATURES);
    setup_queue(&h, 1, 0, 0x1000, 0x2000, 0x3000, 8);
    h.w8(old + 0x14, DRIVER_READY);
    h.kvm
        .snapshot(|s| assert!(s.ioevents.contains_key(&(old + 0x3000))));

    // Sizing with decode off, as Linux does.
    h.cfg_write(1, 4, &[0x00, 0x00]);
    h.cfg_write(1, 0x10, &[0xff; 4]);
    let mask = h.cfg_read32(1, 0x10);
    let size = u64::from(!(mask & !0xf)) + 1;
    assert!(size.is_power_of_two() && size >= 0x8000);
    let new = layout::MMIO32_START + 0x1000_0000;
    h.cfg_write(1, 0x10, &(new as u32).to_le_bytes());
    // Not moved until decoding is back on.
    assert_eq!(h.r16(old + 0x12), 1);
    h.cfg_write(1, 4, &[0x06, 0x00]);
    let mut probe = [0u8; 2];
    assert!(!h.buses.mmio_read(old + 0x12, &mut probe), "old range gone");
    assert_eq!(h.r16(new + 0x12), 1);
    h.kvm.snapshot(|s| {
        assert_eq!(
            s.ioevents.keys().copied().collect::<Vec<_>>(),
            vec![new + 0x3000]
        );
    });
    assert_eq!(h.r8(new + 0x14), DRIVER_READY, "state survives the move");

    // The 64-bit shm BAR: sizing then a new address, decode off in between.
    h.cfg_write(1, 4, &[0x00, 0x00]);
    h.cfg_write(1, 0x18, &[0xff; 4]);
    h.cfg_write(1, 0x1c, &[0xff; 4]);
    assert_eq!(h.cfg_read32(1, 0x1c), 0xffff_fffe, "8 GiB BAR size mask");
    let shm_new = layout::MMIO64_MIN_START + (1 << 34);
    h.cfg_write(1, 0x18, &(shm_new as u32).to_le_bytes());
    h.cfg_write(1, 0x1c, &((shm_new >> 32) as u32).to_le_bytes());
    h.cfg_write(1, 4, &[0x02, 0x00]);
    assert_eq!(log.lock().unwrap().shm_moves.last(), Some(&shm_new));
    assert_eq!(log.lock().unwrap().shm_moves.len(), 2);
}

#[test]
fn test_hostile_config_and_bar_accesses_do_not_panic() {
    let mut h = harness();
    let (dev, _log) = fake_device(3, Some(shm_list()));
    h.mgr
        .add_virtio_device_with_vectors("fake0", Arc::new(Mutex::new(dev)), 64)
        .unwrap();
    let bar = h.bar0(1);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let r = next();
        let len = [1usize, 2, 4, 8][(r & 3) as usize];
        let data = next().to_le_bytes();
        let off = (r >> 8) & 0xffff;
        if r & 4 == 0 {
            // Config space, skipping the BAR and command registers so the device stays put.
            let reg_off = off & 0xfff;
            if (0x04..0x28).contains(&(reg_off & !3)) {
                continue;
            }
            let _ = h.buses.mmio_write(Harness::ecam(1, reg_off), &data[..len]);
            let mut b = [0u8; 8];
            let _ = h.buses.mmio_read(Harness::ecam(1, reg_off), &mut b[..len]);
        } else {
            let _ = h.buses.mmio_write(bar + off, &data[..len]);
            let mut b = [0u8; 8];
            let _ = h.buses.mmio_read(bar + off, &mut b[..len]);
        }
    }
    // Still answering.
    assert_eq!(h.r16(bar + 0x12), 3);
}

fn wait_readable(evt: &EventFd, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd for the duration of the call and nfds is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    n == 1
}

#[test]
fn test_virtio_rng_request_returns_bytes_and_raises_queue_vector() {
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    let src = std::env::temp_dir().join(format!("ism-rng-test-{}", std::process::id()));
    std::fs::File::create(&src)
        .unwrap()
        .write_all(&pattern)
        .unwrap();
    let rng = Arc::new(Mutex::new(VirtioRng::new(&src).unwrap()));
    std::fs::remove_file(&src).unwrap();

    let mut h = harness();
    h.mgr.add_virtio_device("rng0", rng.clone()).unwrap();
    let bar = h.bar0(1);
    h.cfg_write(1, 4, &[0x06, 0x00]);
    let (_, msix) = walk_caps(&h, 1);
    let msix = msix.unwrap();
    // MSI-X enable, then program and unmask vector 1.
    h.cfg_write(1, msix + 2, &0x8000u16.to_le_bytes());
    let entry = bar + 0x4000 + 16;
    h.w32(entry, 0xfee0_0000);
    h.w32(entry + 4, 0);
    h.w32(entry + 8, 0x45);
    h.w32(entry + 12, 0);

    assert_ne!(negotiate(&h, 1, VIRTIO_F_VERSION_1) & STATUS_FEATURES_OK, 0);
    let mq = MockSplitQueue::create(&h.mem, GuestAddress(0x10000), 16);
    setup_queue(
        &h,
        1,
        0,
        mq.desc_table_addr().0,
        mq.avail_addr().0,
        mq.used_addr().0,
        16,
    );
    h.w16(bar + 0x1a, 1);
    h.w8(bar + 0x14, DRIVER_READY);
    assert_eq!(h.r8(bar + 0x14), DRIVER_READY);

    let chain = [
        RawDescriptor::from(SplitDescriptor::new(
            0x20000,
            16,
            VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
            1,
        )),
        RawDescriptor::from(SplitDescriptor::new(0x21000, 8, VRING_DESC_F_WRITE, 0)),
    ];
    mq.add_desc_chains(&chain, 0).unwrap();
    let irq = h
        .mgr
        .virtio_pci_device(0)
        .lock()
        .unwrap()
        .msix()
        .lock()
        .unwrap()
        .irqfd(1)
        .unwrap();
    // The fake KVM delivers no ioeventfd, so notify through the MMIO path.
    h.w16(bar + 0x3000, 0);
    assert!(wait_readable(&irq, 5000), "queue vector raised");
    assert_eq!(irq.read().unwrap(), 1);

    let used_idx: u16 = h.mem.read_obj(mq.used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used_idx, 1);
    let used_len: u32 = h.mem.read_obj(mq.used_addr().unchecked_add(8)).unwrap();
    assert_eq!(used_len, 24);
    let mut first = [0u8; 16];
    h.mem.read_slice(&mut first, GuestAddress(0x20000)).unwrap();
    let mut second = [0u8; 8];
    h.mem
        .read_slice(&mut second, GuestAddress(0x21000))
        .unwrap();
    assert_eq!(&first[..], &pattern[..16]);
    assert_eq!(&second[..], &pattern[16..24]);
    let all = h.mgr.counters();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, "rng0");
    let counters = &all[0].1;
    assert_eq!(counters["requests"].0, 1);
    assert_eq!(counters["bytes"].0, 24);
    assert_eq!(
        h.r8(bar + 0x1000) & 1,
        1,
        "ISR queue bit, cleared by reading"
    );
    assert_eq!(h.r8(bar + 0x1000), 0);

    // Reset stops the worker thread; shutdown unplugs the BAR.
    h.w8(bar + 0x14, 0);
    assert_eq!(h.r8(bar + 0x14), 0);
    h.mgr.shutdown();
    let mut b = [0u8; 1];
    assert!(!h.buses.mmio_read(bar + 0x14, &mut b));
    // No reference cycle through the buses: dropping the VM frees the device.
    drop(h);
    assert_eq!(Arc::strong_count(&rng), 1);
}
