// SPDX-License-Identifier: Apache-2.0
//! In-memory fakes for unit tests: a PCI config space, a platform whose "guest-physical"
//! addresses are host pointers, and the device side of a split virtqueue and of a modern
//! virtio-pci device. The fakes can be told to misbehave.

use core::cell::{Cell, RefCell};
use core::ptr::NonNull;
use std::alloc::{Layout, alloc_zeroed};
use std::vec::Vec;

use crate::pci::{ConfigAccess, PciAddress};
use crate::platform::{DmaRegion, Platform, Width};

/// One fake PCI function with a 256-byte config space and sizeable BARs.
pub struct FakeFunction {
    pub address: PciAddress,
    pub config: [u8; 256],
    /// Size of each BAR (0 = not implemented). A 64-bit BAR has its size at the low slot and
    /// `u64::MAX` at the high slot.
    pub bar_sizes: [u64; 6],
}

impl FakeFunction {
    pub fn new(address: PciAddress, vendor: u16, device: u16) -> Self {
        let mut config = [0u8; 256];
        config[0..2].copy_from_slice(&vendor.to_le_bytes());
        config[2..4].copy_from_slice(&device.to_le_bytes());
        Self {
            address,
            config,
            bar_sizes: [0; 6],
        }
    }

    pub fn set_u8(&mut self, offset: usize, v: u8) {
        self.config[offset] = v;
    }

    pub fn set_u16(&mut self, offset: usize, v: u16) {
        self.config[offset..offset + 2].copy_from_slice(&v.to_le_bytes());
    }

    pub fn set_u32(&mut self, offset: usize, v: u32) {
        self.config[offset..offset + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Give BAR `index` a 32-bit memory decoder of `size` bytes at `base`.
    pub fn set_bar32(&mut self, index: usize, base: u32, size: u64) {
        self.bar_sizes[index] = size;
        self.set_u32(0x10 + 4 * index, base);
    }

    /// Give BARs `index` and `index + 1` a 64-bit memory decoder.
    pub fn set_bar64(&mut self, index: usize, base: u64, size: u64) {
        self.bar_sizes[index] = size;
        self.bar_sizes[index + 1] = u64::MAX;
        self.set_u32(0x10 + 4 * index, base as u32 | 0x4);
        self.set_u32(0x14 + 4 * index, (base >> 32) as u32);
    }

    /// Append a capability of `bytes` (id first; the next pointer is filled in) at `offset`,
    /// linked at the end of the list.
    pub fn add_cap(&mut self, offset: u8, bytes: &[u8]) {
        self.config[0x06] |= 0x10;
        let mut ptr = 0x34usize;
        while self.config[ptr] != 0 {
            ptr = self.config[ptr] as usize + 1;
        }
        self.config[ptr] = offset;
        let o = offset as usize;
        self.config[o..o + bytes.len()].copy_from_slice(bytes);
        self.config[o + 1] = 0;
    }

    fn write_u32(&mut self, offset: usize, value: u32) {
        if (0x10..0x28).contains(&offset) {
            let index = (offset - 0x10) / 4;
            let size = self.bar_sizes[index];
            if size == 0 {
                return;
            }
            let old = u32::from_le_bytes(self.config[offset..offset + 4].try_into().unwrap());
            let new = if size == u64::MAX {
                let low_size = self.bar_sizes[index - 1];
                value & (!(low_size - 1) >> 32) as u32
            } else {
                let flags = old & 0xf;
                (value & !((size - 1) as u32) & !0xf) | flags
            };
            self.set_u32(offset, new);
            return;
        }
        self.set_u32(offset, value);
    }
}

/// A config space made of fake functions; absent functions read as all ones.
#[derive(Default)]
pub struct FakeConfig {
    pub functions: RefCell<Vec<FakeFunction>>,
    pub reads: Cell<usize>,
}

impl FakeConfig {
    pub fn with(functions: Vec<FakeFunction>) -> Self {
        Self {
            functions: RefCell::new(functions),
            reads: Cell::new(0),
        }
    }
}

impl ConfigAccess for FakeConfig {
    fn read_u32(&self, addr: PciAddress, offset: u16) -> u32 {
        self.reads.set(self.reads.get() + 1);
        let functions = self.functions.borrow();
        match functions.iter().find(|f| f.address == addr) {
            Some(f) if offset < 0x100 => {
                let o = usize::from(offset & !3);
                u32::from_le_bytes(f.config[o..o + 4].try_into().unwrap())
            }
            _ => u32::MAX,
        }
    }

    fn write_u32(&self, addr: PciAddress, offset: u16, value: u32) {
        let mut functions = self.functions.borrow_mut();
        if let Some(f) = functions.iter_mut().find(|f| f.address == addr)
            && offset < 0x100
        {
            f.write_u32(usize::from(offset & !3), value);
        }
    }

    fn write_u16(&self, addr: PciAddress, offset: u16, value: u16) {
        let mut functions = self.functions.borrow_mut();
        if let Some(f) = functions.iter_mut().find(|f| f.address == addr)
            && offset < 0x100
        {
            f.set_u16(usize::from(offset), value);
        }
    }
}

/// Allocate zeroed, leaked host memory and present it as DMA memory whose "guest-physical"
/// address is its host address.
pub fn host_dma(len: usize, align: usize) -> DmaRegion {
    let layout = Layout::from_size_align(len.max(1), align).unwrap();
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { alloc_zeroed(layout) };
    let ptr = NonNull::new(ptr).expect("allocation failed");
    // SAFETY: the allocation is valid for `len` bytes and leaked, so it lives forever; the
    // fake device accesses it through the same address.
    unsafe { DmaRegion::new(ptr, ptr.as_ptr() as u64, len) }
}

/// Read a little-endian value of `N` bytes at host address `addr`.
fn host_read<const N: usize>(addr: u64) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        // SAFETY: tests only hand the fake device addresses of live host_dma allocations.
        *b = unsafe { ((addr as usize + i) as *const u8).read_volatile() };
    }
    out
}

fn host_write(addr: u64, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: as in host_read.
        unsafe { ((addr as usize + i) as *mut u8).write_volatile(*b) };
    }
}

/// The device side of a split virtqueue in host memory.
pub struct FakeQueueDevice {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
    pub next_used: u16,
}

/// One descriptor as the device reads it.
#[derive(Clone, Copy, Debug)]
pub struct FakeDesc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl FakeQueueDevice {
    pub fn new(size: u16, (desc, avail, used): (u64, u64, u64)) -> Self {
        Self {
            size,
            desc,
            avail,
            used,
            next_avail: 0,
            next_used: 0,
        }
    }

    pub fn avail_idx(&self) -> u16 {
        u16::from_le_bytes(host_read(self.avail + 2))
    }

    /// Pop the next available chain: its head and descriptors.
    pub fn pop(&mut self) -> Option<(u16, Vec<FakeDesc>)> {
        if self.avail_idx() == self.next_avail {
            return None;
        }
        let slot = u64::from(self.next_avail % self.size);
        let head = u16::from_le_bytes(host_read(self.avail + 4 + 2 * slot));
        self.next_avail = self.next_avail.wrapping_add(1);
        let mut chain = Vec::new();
        let mut index = head;
        loop {
            assert!(index < self.size && chain.len() < usize::from(self.size));
            let d = self.desc + 16 * u64::from(index);
            let desc = FakeDesc {
                addr: u64::from_le_bytes(host_read(d)),
                len: u32::from_le_bytes(host_read(d + 8)),
                flags: u16::from_le_bytes(host_read(d + 12)),
                next: u16::from_le_bytes(host_read(d + 14)),
            };
            chain.push(desc);
            if desc.flags & 1 == 0 {
                break;
            }
            index = desc.next;
        }
        Some((head, chain))
    }

    /// Write a used element with any id and length (honest or not) and publish it.
    pub fn push_used(&mut self, id: u32, len: u32) {
        let slot = u64::from(self.next_used % self.size);
        let elem = self.used + 4 + 8 * slot;
        host_write(elem, &id.to_le_bytes());
        host_write(elem + 4, &len.to_le_bytes());
        self.next_used = self.next_used.wrapping_add(1);
        self.set_used_idx(self.next_used);
    }

    pub fn set_used_idx(&self, idx: u16) {
        host_write(self.used + 2, &idx.to_le_bytes());
    }

    /// Fill every writable buffer of a chain with `byte`; returns the bytes written.
    pub fn fill(chain: &[FakeDesc], byte: u8, limit: usize) -> u32 {
        let mut written = 0usize;
        for d in chain.iter().filter(|d| d.flags & 2 != 0) {
            let n = (d.len as usize).min(limit - written);
            host_write(d.addr, &std::vec![byte; n]);
            written += n;
        }
        written as u32
    }
}

/// How the fake virtio device misbehaves when completing requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Misbehave {
    #[default]
    None,
    /// Report more bytes than the buffer holds.
    LongUsedLen,
    /// Report a descriptor id that was never offered.
    BogusUsedId,
    /// Clear FEATURES_OK when the driver sets it.
    RejectFeatures,
    /// Never complete requests.
    Silent,
}

/// BAR0 layout of the fake virtio device.
pub const FAKE_BAR0: u64 = 0xc000_0000;
pub const FAKE_BAR0_SIZE: u64 = 0x4000;
pub const COMMON_OFF: u64 = 0x0;
pub const ISR_OFF: u64 = 0x1000;
pub const DEVICE_OFF: u64 = 0x2000;
pub const NOTIFY_OFF: u64 = 0x3000;
pub const MSIX_OFF: u64 = 0x3800;
pub const NOTIFY_MULT: u32 = 4;

#[derive(Default, Clone, Copy)]
struct FakeQueueRegs {
    size: u16,
    msix: u16,
    enable: u16,
    desc: u64,
    driver: u64,
    device: u64,
}

/// A modern virtio-rng behind a fake PCI function at 00:03.0, with common/ISR/device/notify
/// windows and a 2-entry MSI-X table in BAR0.
pub struct FakeVirtioRng {
    pub status: u8,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub offered: u64,
    pub driver_features: u64,
    pub queue_select: u16,
    queues: [FakeQueueRegs; 1],
    pub config_msix: u16,
    pub msix_table: [u32; 8],
    pub misbehave: Misbehave,
    pub notifies: usize,
    pub fill_byte: u8,
    device: Option<FakeQueueDevice>,
}

impl FakeVirtioRng {
    pub fn new() -> Self {
        Self {
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            offered: (1 << 32) | (1 << 33),
            driver_features: 0,
            queue_select: 0,
            queues: [FakeQueueRegs {
                size: 64,
                msix: 0xffff,
                ..Default::default()
            }],
            config_msix: 0xffff,
            msix_table: [0; 8],
            misbehave: Misbehave::None,
            notifies: 0,
            fill_byte: 0xa5,
            device: None,
        }
    }

    /// The fake PCI function describing this device's capabilities.
    pub fn pci_function() -> FakeFunction {
        let mut f = FakeFunction::new(
            PciAddress {
                bus: 0,
                device: 3,
                function: 0,
            },
            0x1af4,
            0x1044,
        );
        f.set_bar64(0, FAKE_BAR0, FAKE_BAR0_SIZE);
        let cap = |cfg_type: u8, offset: u32, len: u32| {
            let mut c = [0u8; 16];
            c[0] = 0x09;
            c[2] = 16;
            c[3] = cfg_type;
            c[8..12].copy_from_slice(&offset.to_le_bytes());
            c[12..16].copy_from_slice(&len.to_le_bytes());
            c
        };
        f.add_cap(0x40, &cap(1, COMMON_OFF as u32, 0x40));
        f.add_cap(0x50, &cap(3, ISR_OFF as u32, 4));
        f.add_cap(0x60, &cap(4, DEVICE_OFF as u32, 0x10));
        let mut notify = [0u8; 20];
        notify[..16].copy_from_slice(&cap(2, NOTIFY_OFF as u32, 0x100));
        notify[2] = 20;
        notify[16..20].copy_from_slice(&NOTIFY_MULT.to_le_bytes());
        f.add_cap(0x70, &notify);
        // MSI-X: 2 entries, table in BAR0 at MSIX_OFF.
        let mut msix = [0u8; 12];
        msix[0] = 0x11;
        msix[2..4].copy_from_slice(&1u16.to_le_bytes());
        msix[4..8].copy_from_slice(&(MSIX_OFF as u32).to_le_bytes());
        f.add_cap(0x90, &msix);
        f
    }

    fn common_read(&self, off: u64) -> u64 {
        let q = &self.queues[0];
        let valid_q = self.queue_select == 0;
        match off {
            0 => self.device_feature_select.into(),
            4 => match self.device_feature_select {
                0 => self.offered & 0xffff_ffff,
                1 => self.offered >> 32,
                _ => 0,
            },
            8 => self.driver_feature_select.into(),
            16 => self.config_msix.into(),
            18 => 1,
            20 => self.status.into(),
            21 => 0,
            22 => self.queue_select.into(),
            24 if valid_q => q.size.into(),
            26 if valid_q => q.msix.into(),
            28 if valid_q => q.enable.into(),
            30 if valid_q => 0,
            _ => 0,
        }
    }

    fn common_write(&mut self, off: u64, value: u64) {
        let q = &mut self.queues[0];
        match off {
            0 => self.device_feature_select = value as u32,
            8 => self.driver_feature_select = value as u32,
            12 => {
                let shift = 32 * u64::from(self.driver_feature_select.min(1));
                self.driver_features &= !(0xffff_ffffu64 << shift);
                self.driver_features |= value << shift;
            }
            16 => self.config_msix = if value < 2 { value as u16 } else { 0xffff },
            20 => {
                let mut v = value as u8;
                if v == 0 {
                    *self = Self {
                        misbehave: self.misbehave,
                        fill_byte: self.fill_byte,
                        ..Self::new()
                    };
                    return;
                }
                if self.misbehave == Misbehave::RejectFeatures {
                    v &= !8;
                }
                self.status = v;
            }
            22 => self.queue_select = value as u16,
            24 => q.size = value as u16,
            26 => q.msix = if value < 2 { value as u16 } else { 0xffff },
            28 => {
                q.enable = value as u16;
                self.device = Some(FakeQueueDevice::new(q.size, (q.desc, q.driver, q.device)));
            }
            32 => q.desc = (q.desc & !0xffff_ffff) | value,
            36 => q.desc = (q.desc & 0xffff_ffff) | (value << 32),
            40 => q.driver = (q.driver & !0xffff_ffff) | value,
            44 => q.driver = (q.driver & 0xffff_ffff) | (value << 32),
            48 => q.device = (q.device & !0xffff_ffff) | value,
            52 => q.device = (q.device & 0xffff_ffff) | (value << 32),
            _ => {}
        }
    }

    fn process(&mut self) {
        let misbehave = self.misbehave;
        let fill = self.fill_byte;
        let Some(dev) = self.device.as_mut() else {
            return;
        };
        if misbehave == Misbehave::Silent {
            return;
        }
        while let Some((head, chain)) = dev.pop() {
            let written = FakeQueueDevice::fill(&chain, fill, usize::MAX);
            match misbehave {
                Misbehave::LongUsedLen => dev.push_used(head.into(), written + 1),
                Misbehave::BogusUsedId => dev.push_used(u32::from(head) + 1000, written),
                _ => dev.push_used(head.into(), written),
            }
        }
    }
}

/// A platform with one fake virtio-rng on port-I/O config space and host-pointer DMA.
pub struct FakePlatform {
    pub config: FakeConfig,
    pub rng: RefCell<FakeVirtioRng>,
    pub cf8: Cell<u32>,
    pub mmio_window: (u64, u64),
}

impl FakePlatform {
    pub fn new() -> Self {
        Self {
            config: FakeConfig::with(std::vec![FakeVirtioRng::pci_function()]),
            rng: RefCell::new(FakeVirtioRng::new()),
            cf8: Cell::new(0),
            mmio_window: (0xc000_0000, 0x2000_0000),
        }
    }

    fn cf8_target(&self) -> (PciAddress, u16) {
        let v = self.cf8.get();
        (
            PciAddress {
                bus: (v >> 16) as u8,
                device: ((v >> 11) & 0x1f) as u8,
                function: ((v >> 8) & 7) as u8,
            },
            (v & 0xfc) as u16,
        )
    }

    fn bar0(&self) -> u64 {
        let f = self.config.functions.borrow();
        let c = &f[0].config;
        let low = u32::from_le_bytes(c[0x10..0x14].try_into().unwrap()) & !0xf;
        let high = u32::from_le_bytes(c[0x14..0x18].try_into().unwrap());
        (u64::from(high) << 32) | u64::from(low)
    }
}

impl Platform for FakePlatform {
    fn port_read_u8(&self, _port: u16) -> u8 {
        0xff
    }
    fn port_read_u16(&self, _port: u16) -> u16 {
        0xffff
    }
    fn port_read_u32(&self, port: u16) -> u32 {
        if port == 0xcfc {
            let (addr, offset) = self.cf8_target();
            return self.config.read_u32(addr, offset);
        }
        u32::MAX
    }
    fn port_write_u8(&self, _port: u16, _value: u8) {}
    fn port_write_u16(&self, port: u16, value: u16) {
        if port == 0xcfc || port == 0xcfe {
            let (addr, offset) = self.cf8_target();
            self.config.write_u16(addr, offset + (port - 0xcfc), value);
        }
    }
    fn port_write_u32(&self, port: u16, value: u32) {
        match port {
            0xcf8 => self.cf8.set(value),
            0xcfc => {
                let (addr, offset) = self.cf8_target();
                self.config.write_u32(addr, offset, value);
            }
            _ => {}
        }
    }

    fn map_mmio(&self, base: u64, len: u64) -> bool {
        let (start, size) = self.mmio_window;
        base >= start && base.checked_add(len).is_some_and(|end| end <= start + size)
    }

    unsafe fn mmio_read(&self, addr: u64, width: Width) -> u64 {
        let Some(off) = addr
            .checked_sub(self.bar0())
            .filter(|o| *o < FAKE_BAR0_SIZE)
        else {
            return u64::MAX;
        };
        let rng = self.rng.borrow();
        let value = match off {
            o if o < ISR_OFF => rng.common_read(o - COMMON_OFF),
            o if o < DEVICE_OFF => 1,
            o if (MSIX_OFF..MSIX_OFF + 32).contains(&o) => {
                rng.msix_table[((o - MSIX_OFF) / 4) as usize].into()
            }
            _ => 0,
        };
        value & (u64::MAX >> (64 - 8 * width.bytes()))
    }

    unsafe fn mmio_write(&self, addr: u64, width: Width, value: u64) {
        let Some(off) = addr
            .checked_sub(self.bar0())
            .filter(|o| *o < FAKE_BAR0_SIZE)
        else {
            return;
        };
        let _ = width;
        let mut rng = self.rng.borrow_mut();
        match off {
            o if o < ISR_OFF => rng.common_write(o - COMMON_OFF, value),
            o if o == NOTIFY_OFF => {
                rng.notifies += 1;
                rng.process();
            }
            o if (MSIX_OFF..MSIX_OFF + 32).contains(&o) => {
                rng.msix_table[((o - MSIX_OFF) / 4) as usize] = value as u32;
            }
            _ => {}
        }
    }

    fn dma_alloc(&self, len: usize, align: usize) -> Option<DmaRegion> {
        Some(host_dma(len, align))
    }
}
