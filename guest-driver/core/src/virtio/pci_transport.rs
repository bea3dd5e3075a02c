// SPDX-License-Identifier: Apache-2.0
//! The modern virtio-pci transport, driver side (virtio 1.2, 4.1): finding the vendor
//! capabilities, the common configuration registers, feature negotiation, queue setup,
//! notification, ISR, MSI-X vectors, device config and shared-memory regions.

use virtio_ism_proto::defs::VIRTIO_MSI_NO_VECTOR;
use virtio_ism_proto::defs::features::{VIRTIO_F_VERSION_1, bit};
use virtio_ism_proto::defs::pci::{
    PCI_CAP_ID_VNDR, VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_LEN, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_SHARED_MEMORY_CFG,
    VIRTIO_PCI_CAP64_LEN, VIRTIO_PCI_NOTIFY_CAP_LEN, common_cfg as common,
};

use super::status;
use super::virtqueue::SplitQueue;
use crate::mmio::{MmioError, MmioRegion};
use crate::pci::{Bar, BarKind, CapabilityIter, ConfigAccess, PciAddress};
use crate::platform::Platform;

/// The MSI-X "no vector" value, as the 16-bit vector registers hold it.
pub const NO_VECTOR: u16 = VIRTIO_MSI_NO_VECTOR as u16;
/// Most queues one device may use through this driver.
pub const MAX_QUEUES: usize = 16;
/// Most shared-memory regions recorded per device; more are counted but not kept.
pub const MAX_SHM_REGIONS: usize = 16;
/// How often a status write is polled before giving up on a reset.
const RESET_POLLS: u32 = 1_000_000;

/// Errors of the virtio-pci transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// A required capability is missing.
    #[error("Virtio capability type {0} missing")]
    MissingCap(u8),
    /// A capability is shorter than its structure.
    #[error("Virtio capability at {offset:#x} has length {len}, shorter than its structure")]
    CapTooShort {
        /// Config-space offset of the capability.
        offset: u16,
        /// Its cap_len.
        len: u8,
    },
    /// A capability points outside its BAR.
    #[error("Virtio capability type {cfg_type} range {offset:#x}+{len:#x} outside BAR {bar}")]
    CapOutsideBar {
        /// cfg_type.
        cfg_type: u8,
        /// BAR index.
        bar: u8,
        /// Offset in the BAR.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A capability window is too small for the registers it must hold.
    #[error("Virtio capability type {cfg_type} window of {len:#x} bytes is too small")]
    CapWindowTooSmall {
        /// cfg_type.
        cfg_type: u8,
        /// Length.
        len: u64,
    },
    /// The platform refused to map a window of a BAR as device memory.
    #[error("BAR {0} at {1:#x} is not device memory the platform can map")]
    BarNotMmio(u8, u64),
    /// The device did not finish a reset.
    #[error("Device did not complete reset")]
    ResetTimeout,
    /// The device lacks VIRTIO_F_VERSION_1.
    #[error("Device does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    /// The device refused the feature set.
    #[error("Device rejected features {0:#x}")]
    FeaturesRejected(u64),
    /// A queue index beyond what the device or driver supports.
    #[error("Queue {0} does not exist")]
    NoSuchQueue(u16),
    /// The device's maximum queue size is smaller than the queue.
    #[error("Queue {index} holds at most {max} entries, {wanted} requested")]
    QueueTooLarge {
        /// Queue index.
        index: u16,
        /// Device maximum.
        max: u16,
        /// Requested size.
        wanted: u16,
    },
    /// The notify address of a queue falls outside the notify window.
    #[error("Queue {0} notify offset outside the notify window")]
    NotifyOutsideWindow(u16),
    /// The device refused an MSI-X vector.
    #[error("Device refused MSI-X vector {0}")]
    VectorRejected(u16),
    /// A queue was notified before it was set up.
    #[error("Queue {0} is not set up")]
    QueueNotSetUp(u16),
    /// Register access failed.
    #[error("Virtio register access failed")]
    Access(#[source] MmioError),
}

impl From<MmioError> for TransportError {
    fn from(e: MmioError) -> Self {
        TransportError::Access(e)
    }
}

/// Where a capability's structure lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapWindow {
    /// BAR index.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Guest-physical address (BAR base + offset).
    pub addr: u64,
}

/// A shared-memory region a device exposes (virtio_pci_cap64, cfg_type 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmRegion {
    /// Shared-memory region id (the device-specific shmid).
    pub id: u8,
    /// BAR index.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Guest-physical address.
    pub addr: u64,
}

/// The virtio capabilities of one function, validated against its BARs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioPciCaps {
    /// Common configuration.
    pub common: CapWindow,
    /// Notification area.
    pub notify: CapWindow,
    /// notify_off_multiplier.
    pub notify_multiplier: u32,
    /// ISR status byte.
    pub isr: CapWindow,
    /// Device-specific configuration, if any.
    pub device: Option<CapWindow>,
    shm: [Option<ShmRegion>; MAX_SHM_REGIONS],
    shm_total: usize,
}

impl VirtioPciCaps {
    /// The shared-memory regions kept (at most [`MAX_SHM_REGIONS`]).
    pub fn shm_regions(&self) -> impl Iterator<Item = &ShmRegion> {
        self.shm.iter().flatten()
    }

    /// How many shared-memory capabilities the device listed, including any not kept.
    pub fn shm_total(&self) -> usize {
        self.shm_total
    }
}

/// Find and validate the virtio vendor capabilities of the function at `addr`, whose BARs are
/// `bars`. Capabilities naming a non-memory or missing BAR are ignored (virtio 1.2, 4.1.4);
/// ones pointing outside their BAR are errors; of each single-instance type the first is used.
pub fn find_virtio_caps<C: ConfigAccess>(
    config: &C,
    addr: PciAddress,
    bars: &[Option<Bar>; 6],
) -> Result<VirtioPciCaps, TransportError> {
    let mut common = None;
    let mut notify = None;
    let mut isr = None;
    let mut device = None;
    let mut shm = [None; MAX_SHM_REGIONS];
    let mut shm_total = 0usize;

    for cap in CapabilityIter::new(config, addr) {
        if cap.id != PCI_CAP_ID_VNDR {
            continue;
        }
        let o = cap.offset;
        let cap_len = config.read_u8(addr, o + 2);
        let cfg_type = config.read_u8(addr, o + 3);
        let bar_index = config.read_u8(addr, o + 4);
        let id = config.read_u8(addr, o + 5);
        if cap_len < VIRTIO_PCI_CAP_LEN {
            return Err(TransportError::CapTooShort {
                offset: o,
                len: cap_len,
            });
        }
        // A capability must also fit in the 256-byte header the walk stays inside.
        if u16::from(cap_len) + o > 0x100 {
            return Err(TransportError::CapTooShort {
                offset: o,
                len: cap_len,
            });
        }
        let mut offset = u64::from(config.read_u32(addr, o + 8));
        let mut len = u64::from(config.read_u32(addr, o + 12));
        if cfg_type == VIRTIO_PCI_CAP_SHARED_MEMORY_CFG {
            if cap_len < VIRTIO_PCI_CAP64_LEN {
                return Err(TransportError::CapTooShort {
                    offset: o,
                    len: cap_len,
                });
            }
            offset |= u64::from(config.read_u32(addr, o + 16)) << 32;
            len |= u64::from(config.read_u32(addr, o + 20)) << 32;
        }
        let Some(bar) = bars
            .get(usize::from(bar_index))
            .copied()
            .flatten()
            .filter(|b| b.kind != BarKind::Io)
        else {
            continue;
        };
        if !bar.contains(offset, len) {
            return Err(TransportError::CapOutsideBar {
                cfg_type,
                bar: bar_index,
                offset,
                len,
            });
        }
        let window = CapWindow {
            bar: bar_index,
            offset,
            len,
            addr: bar.base + offset,
        };
        match cfg_type {
            VIRTIO_PCI_CAP_COMMON_CFG if common.is_none() => {
                if len < common::LEN {
                    return Err(TransportError::CapWindowTooSmall { cfg_type, len });
                }
                common = Some(window);
            }
            VIRTIO_PCI_CAP_NOTIFY_CFG if notify.is_none() => {
                if cap_len < VIRTIO_PCI_NOTIFY_CAP_LEN {
                    return Err(TransportError::CapTooShort {
                        offset: o,
                        len: cap_len,
                    });
                }
                if len < 2 {
                    return Err(TransportError::CapWindowTooSmall { cfg_type, len });
                }
                let multiplier = config.read_u32(addr, o + 16);
                notify = Some((window, multiplier));
            }
            VIRTIO_PCI_CAP_ISR_CFG if isr.is_none() => {
                if len < 1 {
                    return Err(TransportError::CapWindowTooSmall { cfg_type, len });
                }
                isr = Some(window);
            }
            VIRTIO_PCI_CAP_DEVICE_CFG if device.is_none() => device = Some(window),
            VIRTIO_PCI_CAP_SHARED_MEMORY_CFG => {
                if let Some(slot) = shm.get_mut(shm_total) {
                    *slot = Some(ShmRegion {
                        id,
                        bar: bar_index,
                        offset,
                        len,
                        addr: window.addr,
                    });
                }
                shm_total += 1;
            }
            _ => {}
        }
    }

    let common = common.ok_or(TransportError::MissingCap(VIRTIO_PCI_CAP_COMMON_CFG))?;
    let (notify, notify_multiplier) =
        notify.ok_or(TransportError::MissingCap(VIRTIO_PCI_CAP_NOTIFY_CFG))?;
    let isr = isr.ok_or(TransportError::MissingCap(VIRTIO_PCI_CAP_ISR_CFG))?;
    Ok(VirtioPciCaps {
        common,
        notify,
        notify_multiplier,
        isr,
        device,
        shm,
        shm_total,
    })
}

/// A virtio-pci device being driven: the mapped register windows and per-queue notify
/// offsets.
pub struct VirtioPciDevice<'p, P: Platform> {
    platform: &'p P,
    common: MmioRegion<'p, P>,
    notify: MmioRegion<'p, P>,
    notify_multiplier: u32,
    isr: MmioRegion<'p, P>,
    device: Option<MmioRegion<'p, P>>,
    caps: VirtioPciCaps,
    notify_offsets: [Option<u64>; MAX_QUEUES],
}

impl<'p, P: Platform> VirtioPciDevice<'p, P> {
    /// Map the register windows described by `caps`, after checking each BAR lies in an MMIO
    /// window of the platform.
    ///
    /// # Safety
    /// `caps` must come from [`find_virtio_caps`] for a function whose memory decoding is
    /// enabled and whose BARs the caller owns.
    pub unsafe fn new(platform: &'p P, caps: VirtioPciCaps) -> Result<Self, TransportError> {
        let windows = [
            Some(caps.common),
            Some(caps.notify),
            Some(caps.isr),
            caps.device,
        ];
        for w in windows.iter().flatten() {
            if !platform.map_mmio(w.addr, w.len) {
                return Err(TransportError::BarNotMmio(w.bar, w.addr));
            }
        }
        let map = |w: CapWindow| {
            // SAFETY: every window lies inside one of the device's memory BARs (checked by
            // find_virtio_caps) and the platform mapped it as device memory (above).
            unsafe { MmioRegion::new(platform, w.addr, w.len) }
        };
        Ok(Self {
            platform,
            common: map(caps.common),
            notify: map(caps.notify),
            notify_multiplier: caps.notify_multiplier,
            isr: map(caps.isr),
            device: caps.device.map(map),
            caps,
            notify_offsets: [None; MAX_QUEUES],
        })
    }

    /// The capabilities this device was built from.
    pub fn caps(&self) -> &VirtioPciCaps {
        &self.caps
    }

    /// Current device status.
    pub fn status(&self) -> Result<u8, TransportError> {
        Ok(self.common.read_u8(common::DEVICE_STATUS)?)
    }

    /// Reset the device and wait until it reports status 0.
    pub fn reset(&mut self) -> Result<(), TransportError> {
        self.common.write_u8(common::DEVICE_STATUS, 0)?;
        self.notify_offsets = [None; MAX_QUEUES];
        for _ in 0..RESET_POLLS {
            if self.status()? == 0 {
                return Ok(());
            }
            self.platform.wait();
        }
        Err(TransportError::ResetTimeout)
    }

    /// OR `bits` into the device status.
    pub fn add_status(&self, bits: u8) -> Result<(), TransportError> {
        let current = self.status()?;
        Ok(self
            .common
            .write_u8(common::DEVICE_STATUS, current | bits)?)
    }

    /// Reset, acknowledge, and negotiate features: accept what both the device offers and
    /// `wanted` has (VIRTIO_F_VERSION_1 is always requested and required), then set
    /// FEATURES_OK and check the device kept it. Returns the accepted set.
    pub fn initialize(&mut self, wanted: u64) -> Result<u64, TransportError> {
        self.reset()?;
        self.add_status(status::ACKNOWLEDGE)?;
        self.add_status(status::DRIVER)?;
        let offered = self.device_features()?;
        if offered & bit(VIRTIO_F_VERSION_1) == 0 {
            self.add_status(status::FAILED)?;
            return Err(TransportError::NotModern);
        }
        let accepted = offered & (wanted | bit(VIRTIO_F_VERSION_1));
        for half in 0..2u32 {
            self.common.write_u32(common::DRIVER_FEATURE_SELECT, half)?;
            self.common
                .write_u32(common::DRIVER_FEATURE, (accepted >> (32 * half)) as u32)?;
        }
        self.add_status(status::FEATURES_OK)?;
        if self.status()? & status::FEATURES_OK == 0 {
            self.add_status(status::FAILED)?;
            return Err(TransportError::FeaturesRejected(accepted));
        }
        Ok(accepted)
    }

    /// All 64 feature bits the device offers.
    pub fn device_features(&self) -> Result<u64, TransportError> {
        let mut value = 0u64;
        for half in 0..2u32 {
            self.common.write_u32(common::DEVICE_FEATURE_SELECT, half)?;
            value |= u64::from(self.common.read_u32(common::DEVICE_FEATURE)?) << (32 * half);
        }
        Ok(value)
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> Result<u16, TransportError> {
        Ok(self.common.read_u16(common::NUM_QUEUES)?)
    }

    /// Config generation counter (re-read device config while it changes).
    pub fn config_generation(&self) -> Result<u8, TransportError> {
        Ok(self.common.read_u8(common::CONFIG_GENERATION)?)
    }

    /// Route configuration-change interrupts to MSI-X entry `vector` (or [`NO_VECTOR`]).
    pub fn set_config_vector(&self, vector: u16) -> Result<(), TransportError> {
        self.common.write_u16(common::CONFIG_MSIX_VECTOR, vector)?;
        if self.common.read_u16(common::CONFIG_MSIX_VECTOR)? != vector {
            return Err(TransportError::VectorRejected(vector));
        }
        Ok(())
    }

    /// Give queue `index` the memory of `queue`, route its interrupts to MSI-X entry
    /// `vector` (or [`NO_VECTOR`]) and enable it.
    pub fn setup_queue(
        &mut self,
        index: u16,
        queue: &SplitQueue,
        vector: u16,
    ) -> Result<(), TransportError> {
        if usize::from(index) >= MAX_QUEUES || index >= self.num_queues()? {
            return Err(TransportError::NoSuchQueue(index));
        }
        self.common.write_u16(common::QUEUE_SELECT, index)?;
        let max = self.common.read_u16(common::QUEUE_SIZE)?;
        if max == 0 {
            return Err(TransportError::NoSuchQueue(index));
        }
        if max < queue.size() {
            return Err(TransportError::QueueTooLarge {
                index,
                max,
                wanted: queue.size(),
            });
        }
        let notify_off = u64::from(self.common.read_u16(common::QUEUE_NOTIFY_OFF)?);
        let notify_offset = notify_off
            .checked_mul(u64::from(self.notify_multiplier))
            .filter(|o| o.checked_add(2).is_some_and(|end| end <= self.notify.len()))
            .ok_or(TransportError::NotifyOutsideWindow(index))?;
        let (desc, driver, device) = queue.addresses();
        self.common.write_u16(common::QUEUE_SIZE, queue.size())?;
        self.common.write_u64_split(common::QUEUE_DESC, desc)?;
        self.common.write_u64_split(common::QUEUE_DRIVER, driver)?;
        self.common.write_u64_split(common::QUEUE_DEVICE, device)?;
        self.common.write_u16(common::QUEUE_MSIX_VECTOR, vector)?;
        if self.common.read_u16(common::QUEUE_MSIX_VECTOR)? != vector {
            return Err(TransportError::VectorRejected(vector));
        }
        self.common.write_u16(common::QUEUE_ENABLE, 1)?;
        self.notify_offsets[usize::from(index)] = Some(notify_offset);
        Ok(())
    }

    /// Tell the device that queue `index` has new buffers.
    pub fn notify(&self, index: u16) -> Result<(), TransportError> {
        let offset = self
            .notify_offsets
            .get(usize::from(index))
            .copied()
            .flatten()
            .ok_or(TransportError::QueueNotSetUp(index))?;
        Ok(self.notify.write_u16(offset, index)?)
    }

    /// Set DRIVER_OK: the device is live.
    pub fn driver_ok(&self) -> Result<(), TransportError> {
        self.add_status(status::DRIVER_OK)
    }

    /// Read (and thereby clear) the ISR status byte: bit 0 queue interrupt, bit 1 config
    /// change. Only meaningful without MSI-X.
    pub fn read_isr(&self) -> Result<u8, TransportError> {
        Ok(self.isr.read_u8(0)?)
    }

    /// The device-specific configuration window, if the device has one.
    pub fn device_config(&self) -> Option<&MmioRegion<'p, P>> {
        self.device.as_ref()
    }

    /// The shared-memory regions the device lists.
    pub fn shm_regions(&self) -> impl Iterator<Item = &ShmRegion> {
        self.caps.shm_regions()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{FAKE_BAR0, FAKE_BAR0_SIZE, FakeConfig, FakeFunction, FakePlatform};
    use crate::pci::read_bars;
    use std::vec;

    const ADDR: PciAddress = PciAddress {
        bus: 0,
        device: 3,
        function: 0,
    };

    fn base_function() -> FakeFunction {
        let mut f = FakeFunction::new(ADDR, 0x1af4, 0x105a);
        f.set_bar64(0, FAKE_BAR0, FAKE_BAR0_SIZE);
        f.set_bar64(2, 0x10_0000_0000, 1 << 33);
        f
    }

    fn cap(cfg_type: u8, bar: u8, offset: u32, len: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = 0x09;
        c[2] = 16;
        c[3] = cfg_type;
        c[4] = bar;
        c[8..12].copy_from_slice(&offset.to_le_bytes());
        c[12..16].copy_from_slice(&len.to_le_bytes());
        c
    }

    fn notify_cap(offset: u32, len: u32, mult: u32) -> [u8; 20] {
        let mut c = [0u8; 20];
        c[..16].copy_from_slice(&cap(2, 0, offset, len));
        c[2] = 20;
        c[16..20].copy_from_slice(&mult.to_le_bytes());
        c
    }

    fn shm_cap(id: u8, bar: u8, offset: u64, len: u64) -> [u8; 24] {
        let mut c = [0u8; 24];
        c[..16].copy_from_slice(&cap(8, bar, offset as u32, len as u32));
        c[2] = 24;
        c[5] = id;
        c[16..20].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
        c[20..24].copy_from_slice(&((len >> 32) as u32).to_le_bytes());
        c
    }

    fn with_required_caps(f: &mut FakeFunction) {
        f.add_cap(0x40, &cap(1, 0, 0, 0x40));
        f.add_cap(0x50, &notify_cap(0x3000, 0x100, 4));
        f.add_cap(0x68, &cap(3, 0, 0x1000, 4));
    }

    fn parse(f: FakeFunction) -> Result<VirtioPciCaps, TransportError> {
        let config = FakeConfig::with(vec![f]);
        let bars = read_bars(&config, ADDR).unwrap();
        find_virtio_caps(&config, ADDR, &bars)
    }

    #[test]
    fn test_caps_parse_with_64bit_shm_regions() {
        let mut f = base_function();
        with_required_caps(&mut f);
        f.add_cap(0x78, &cap(4, 0, 0x2000, 0x100));
        f.add_cap(0x88, &shm_cap(0, 2, 0, 1 << 32));
        f.add_cap(0xa0, &shm_cap(1, 2, (1 << 32) + 0x1000, 0x1000));
        let caps = parse(f).unwrap();
        assert_eq!(caps.common.addr, FAKE_BAR0);
        assert_eq!(caps.notify.addr, FAKE_BAR0 + 0x3000);
        assert_eq!(caps.notify_multiplier, 4);
        assert_eq!(caps.device.unwrap().len, 0x100);
        let shm: std::vec::Vec<_> = caps.shm_regions().copied().collect();
        assert_eq!(shm.len(), 2);
        assert_eq!((shm[0].id, shm[0].bar, shm[0].len), (0, 2, 1 << 32));
        assert_eq!(shm[1].offset, (1 << 32) + 0x1000);
        assert_eq!(shm[1].addr, 0x10_0000_0000 + (1 << 32) + 0x1000);
        assert_eq!(caps.shm_total(), 2);
    }

    #[test]
    fn test_cap_outside_bar_is_refused() {
        let mut f = base_function();
        with_required_caps(&mut f);
        f.add_cap(0x78, &cap(4, 0, 0x3f00, 0x101));
        assert!(matches!(
            parse(f),
            Err(TransportError::CapOutsideBar { cfg_type: 4, .. })
        ));
    }

    #[test]
    fn test_shm_cap_with_wrapping_range_is_refused() {
        let mut f = base_function();
        with_required_caps(&mut f);
        f.add_cap(0x78, &shm_cap(0, 2, u64::MAX - 0xfff, 0x2000));
        assert!(matches!(
            parse(f),
            Err(TransportError::CapOutsideBar { cfg_type: 8, .. })
        ));
    }

    #[test]
    fn test_short_shm_cap_is_refused() {
        let mut f = base_function();
        with_required_caps(&mut f);
        let mut c = shm_cap(0, 2, 0, 0x1000);
        c[2] = 16;
        f.add_cap(0x78, &c);
        assert!(matches!(parse(f), Err(TransportError::CapTooShort { .. })));
    }

    #[test]
    fn test_cap_running_past_config_header_is_refused() {
        let mut f = base_function();
        with_required_caps(&mut f);
        let mut c = cap(4, 0, 0x2000, 0x10);
        c[2] = 0x30;
        f.add_cap(0xe0, &c);
        assert!(matches!(parse(f), Err(TransportError::CapTooShort { .. })));
    }

    #[test]
    fn test_caps_naming_missing_bars_are_ignored() {
        let mut f = base_function();
        with_required_caps(&mut f);
        f.add_cap(0x78, &cap(4, 7, 0, 0x10));
        f.add_cap(0x88, &cap(4, 4, 0, 0x10));
        assert_eq!(parse(f).unwrap().device, None);
    }

    #[test]
    fn test_missing_and_undersized_required_caps() {
        let mut f = base_function();
        f.add_cap(0x40, &cap(1, 0, 0, 0x40));
        f.add_cap(0x50, &notify_cap(0x3000, 0x100, 4));
        assert_eq!(parse(f), Err(TransportError::MissingCap(3)));

        let mut f = base_function();
        f.add_cap(0x40, &cap(1, 0, 0, 0x20));
        assert_eq!(
            parse(f),
            Err(TransportError::CapWindowTooSmall {
                cfg_type: 1,
                len: 0x20
            })
        );
    }

    #[test]
    fn test_many_shm_caps_are_counted_but_bounded() {
        let mut f = base_function();
        with_required_caps(&mut f);
        // As many 24-byte caps as fit in the header.
        for i in 0..5u8 {
            f.add_cap(0x78 + i * 24, &shm_cap(i, 2, u64::from(i) * 0x1000, 0x1000));
        }
        let caps = parse(f).unwrap();
        assert_eq!(caps.shm_total(), 5);
        assert_eq!(caps.shm_regions().count(), 5);
    }

    #[test]
    fn test_device_outside_mmio_window_is_refused() {
        let platform = FakePlatform {
            mmio_window: (0xd000_0000, 0x1000_0000),
            ..FakePlatform::new()
        };
        let config = crate::pci::PortConfig::new(&platform);
        let bars = read_bars(&config, ADDR).unwrap();
        let caps = find_virtio_caps(&config, ADDR, &bars).unwrap();
        assert!(matches!(
            // SAFETY: caps from find_virtio_caps on the fake function.
            unsafe { VirtioPciDevice::new(&platform, caps) }.err(),
            Some(TransportError::BarNotMmio(0, _))
        ));
    }

    #[test]
    fn test_notify_offset_outside_window_is_refused() {
        let mut f = base_function();
        f.add_cap(0x40, &cap(1, 0, 0, 0x40));
        // Multiplier so large that queue 0's offset 0 is fine but used in a tiny window.
        f.add_cap(0x50, &notify_cap(0x3000, 1, 4));
        f.add_cap(0x68, &cap(3, 0, 0x1000, 4));
        assert_eq!(
            parse(f),
            Err(TransportError::CapWindowTooSmall {
                cfg_type: 2,
                len: 1
            })
        );
    }
}
