// SPDX-License-Identifier: Apache-2.0
//! The virtio-ism device, driver side: setup (BARs, capabilities, shared-memory regions,
//! feature negotiation, config, queues) and the region commands.

use virtio_ism_proto::ctrl::reply_len;
use virtio_ism_proto::defs::features::{
    VIRTIO_ISM_F_EAGAIN, VIRTIO_ISM_F_EVENT_QUEUE, VIRTIO_ISM_F_GRANT, VIRTIO_ISM_F_QUERY,
    VIRTIO_ISM_F_VECTOR_EVENTS, bit,
};
use virtio_ism_proto::defs::perm::{VIRTIO_ISM_PERM_READ, VIRTIO_ISM_PERM_WRITE};
use virtio_ism_proto::defs::queues::{CTRL_QUEUE_INDEX, EVENT_QUEUE_INDEX};
use virtio_ism_proto::defs::region_flags::{
    VIRTIO_ISM_REGION_HOTPLUGGED, VIRTIO_ISM_REGION_OWNER, VIRTIO_ISM_REGION_READ,
    VIRTIO_ISM_REGION_WRITE,
};
use virtio_ism_proto::defs::shm::{VIRTIO_ISM_SHM_ID_NOTIFY, VIRTIO_ISM_SHM_ID_REGIONS};
use virtio_ism_proto::defs::{PCI_DEVICE_ID_ISM, PCI_VENDOR_ID_VIRTIO, VIRTIO_MSI_NO_VECTOR};
use virtio_ism_proto::{
    AllocReplyHeader, AllocRequest, Area, AttachReplyHeader, AttachRequest, ConfigSpace,
    DetachRequest, EventVectorRequest, GrantDefaultRequest, GrantDeviceRequest,
    QueryListReplyHeader, QueryRegionReplyHeader, QueryRegionRequest, Request, Status, WireStruct,
};

use super::ctrl::{CtrlQueue, MAX_LIST_TOKENS, Reply};
use super::error::{ConfigError, IsmError, ProtocolError};
use super::events::{EventQueue, IsmEvent};
use super::region::{MAX_AREAS, PAGE_SIZE, Region, RegionWindow, WindowGeometry};
use crate::pci::{
    self, Bar, BarKind, CapabilityIter, ConfigAccess, MsixCapability, MsixTable, PciAddress,
    enable_command_bits, read_bars, regs,
};
use crate::platform::Platform;
use crate::virtio::{NO_VECTOR, ShmRegion, VirtioPciDevice, find_virtio_caps, status};

/// Areas offered in the first try of ALLOC/ATTACH/QUERY_REGION (what the Linux PoC offers);
/// E2BIG retries with what the device asks for, up to [`MAX_AREAS`].
pub const INITIAL_AREAS: usize = 4;
/// Tries of one command when the device answers E2BIG.
const MAX_TRIES: usize = 3;
/// Re-reads of the config space while its generation changes.
const CONFIG_TRIES: usize = 16;
/// Largest notify slot.
const MAX_NOTIFY_SIZE: u64 = 4096;
/// Largest MSI-X vector EVENT_VECTOR accepts.
const MAX_EVENT_VECTOR: u64 = 2047;

/// Find the first virtio-ism function on buses `start_bus..=end_bus`.
pub fn find_ism<C: ConfigAccess>(config: &C, start_bus: u8, end_bus: u8) -> Option<PciAddress> {
    pci::enumerate(config, start_bus, end_bus)
        .find(|f| f.vendor_id == PCI_VENDOR_ID_VIRTIO && f.device_id == PCI_DEVICE_ID_ISM)
        .map(|f| f.address)
}

/// Choices made when opening the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IsmOptions {
    /// Optional features to negotiate when the device offers them, as a mask of
    /// `bit(VIRTIO_ISM_F_*)`. Default: the event queue, QUERY and GRANT. Zero (see
    /// [`IsmOptions::draft`]) is a driver written against the draft alone.
    pub features: u64,
    /// MSI-X entry for control-queue completions, or [`NO_VECTOR`] (the driver polls anyway).
    pub ctrl_vector: u16,
    /// MSI-X entry for the event queue, or [`NO_VECTOR`].
    pub event_vector: u16,
    /// Polls (with the platform's `wait` between them) before a command times out.
    pub max_waits: u32,
}

impl Default for IsmOptions {
    fn default() -> Self {
        Self {
            features: bit(VIRTIO_ISM_F_EVENT_QUEUE)
                | bit(VIRTIO_ISM_F_QUERY)
                | bit(VIRTIO_ISM_F_GRANT)
                | bit(VIRTIO_ISM_F_EAGAIN),
            ctrl_vector: NO_VECTOR,
            event_vector: NO_VECTOR,
            max_waits: 1_000_000,
        }
    }
}

impl IsmOptions {
    /// Every optional feature this driver knows how to use.
    pub const KNOWN_FEATURES: u64 = bit(VIRTIO_ISM_F_EVENT_QUEUE)
        | bit(VIRTIO_ISM_F_QUERY)
        | bit(VIRTIO_ISM_F_GRANT)
        | bit(VIRTIO_ISM_F_VECTOR_EVENTS)
        | bit(VIRTIO_ISM_F_EAGAIN);

    /// A driver written only against the draft: it negotiates no `VIRTIO_ISM_F_*` bit (so it
    /// has no event queue, no QUERY, and cannot GRANT: its regions get the operator's
    /// `draft_default_perm`), and the device raises a region's vector for kicks only.
    pub fn draft() -> Self {
        Self {
            features: 0,
            ..Self::default()
        }
    }
}

/// What the device told the driver at setup, validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IsmInfo {
    /// Group id: devices with the same gid can share regions.
    pub gid: u64,
    /// This device's id (never 0): what per-device grants name.
    pub devid: u64,
    /// Allocation granule of shmid 1.
    pub chunk_size: u64,
    /// Notify bytes per chunk.
    pub notify_size: u64,
    /// Chunks in shmid 1.
    pub chunks: u64,
    /// Features accepted (device offer & driver wish, VERSION_1 included).
    pub features: u64,
}

impl IsmInfo {
    /// Whether feature bit `nr` (a `VIRTIO_ISM_F_*`) was negotiated.
    pub fn has(&self, nr: u32) -> bool {
        self.features & bit(nr) != 0
    }
}

/// How to map a region on ATTACH (`rw_perm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// `rw_perm` 0: whatever is granted. The region counts as writable only if QUERY tells
    /// so (without QUERY it is treated as read-only).
    AsGranted,
    /// READ: a read-only mapping.
    Read,
    /// READ | WRITE: a writable mapping, or PERM_EWRITE.
    ReadWrite,
}

impl Access {
    fn rw_perm(self) -> u32 {
        match self {
            Access::AsGranted => 0,
            Access::Read => VIRTIO_ISM_PERM_READ as u32,
            Access::ReadWrite => (VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE) as u32,
        }
    }
}

/// What QUERY_REGION reports about a held region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region (areas, size, writability from the flags).
    pub region: Region,
    /// `region_flags` bits.
    pub flags: u64,
    /// The bound MSI-X vector, if any.
    pub vector: Option<u16>,
}

impl RegionInfo {
    /// This device allocated the region.
    pub fn owner(&self) -> bool {
        self.flags & VIRTIO_ISM_REGION_OWNER != 0
    }

    /// The host attached the region (hotplug).
    pub fn hotplugged(&self) -> bool {
        self.flags & VIRTIO_ISM_REGION_HOTPLUGGED != 0
    }
}

/// Outcome of one try of a command whose reply holds a list.
enum Attempt<T> {
    Done(T),
    TooBig(u64),
}

/// What `bring_up` made.
struct Setup {
    config: ConfigSpace,
    geometry: WindowGeometry,
    ctrl: CtrlQueue,
    events: Option<EventQueue>,
}

/// A ready virtio-ism device.
pub struct IsmDriver<'p, P: Platform> {
    platform: &'p P,
    transport: VirtioPciDevice<'p, P>,
    ctrl: CtrlQueue,
    events: Option<EventQueue>,
    window: RegionWindow<'p, P>,
    msix: Option<MsixTable<'p, P>>,
    info: IsmInfo,
}

impl<'p, P: Platform> IsmDriver<'p, P> {
    /// Set up the virtio-ism function at `addr`: enable memory decoding and bus mastering,
    /// validate the capabilities and shared-memory regions, negotiate features (VERSION_1 plus
    /// the wanted extensions the device offers), read and validate the config, set up the
    /// control queue (and the event queue when negotiated, with every buffer posted) and set
    /// DRIVER_OK. MSI-X is enabled when the function has it. On failure after the reset the
    /// device is left with FAILED set.
    ///
    /// # Safety
    /// The caller owns the function at `addr` and its BARs (no one else drives it), and the
    /// platform reaches its BARs (every window is passed to [`Platform::map_mmio`] first).
    pub unsafe fn open<C: ConfigAccess>(
        platform: &'p P,
        config: &C,
        addr: PciAddress,
        options: IsmOptions,
    ) -> Result<Self, IsmError> {
        let vendor = config.read_u16(addr, regs::VENDOR_ID);
        let device = config.read_u16(addr, regs::DEVICE_ID);
        if vendor != PCI_VENDOR_ID_VIRTIO || device != PCI_DEVICE_ID_ISM {
            return Err(IsmError::NotIsm { vendor, device });
        }
        let bars = read_bars(config, addr).map_err(IsmError::Bars)?;
        enable_command_bits(
            config,
            addr,
            regs::COMMAND_MEMORY | regs::COMMAND_BUS_MASTER,
        );
        let caps = find_virtio_caps(config, addr, &bars)?;
        let geometry = shm_layout(platform, &bars, caps.shm_regions(), caps.shm_total())?;
        let msix = match CapabilityIter::new(config, addr)
            .find_map(|cap| MsixCapability::parse(config, addr, cap))
        {
            Some(cap) => {
                // SAFETY: the BARs were just read from this function, memory decoding is on,
                // and the caller vouched that the platform reaches them.
                let table = unsafe { cap.map_table(platform, &bars) }.map_err(IsmError::Msix)?;
                cap.enable(config, addr);
                Some(table)
            }
            None => None,
        };
        // SAFETY: caps come from find_virtio_caps for this function, decoding is enabled and
        // the caller owns its BARs.
        let mut transport = unsafe { VirtioPciDevice::new(platform, caps) }?;
        let wanted = options.features & IsmOptions::KNOWN_FEATURES;
        let features = transport.initialize(wanted)?;
        let setup = match Self::bring_up(platform, &mut transport, geometry, features, options) {
            Ok(setup) => setup,
            Err(e) => {
                // Best effort: the device may be gone; the setup error is what matters.
                let _ = transport.add_status(status::FAILED);
                return Err(e);
            }
        };
        let Setup {
            config,
            geometry,
            ctrl,
            events,
        } = setup;
        Ok(Self {
            platform,
            transport,
            ctrl,
            events,
            // SAFETY: the geometry was validated against the function's 64-bit memory BAR
            // and mapped by the platform in shm_layout / validate_layout.
            window: unsafe { RegionWindow::new(platform, geometry) },
            msix,
            info: IsmInfo {
                gid: config.gid,
                devid: config.devid,
                chunk_size: config.chunk_size,
                notify_size: config.notify_size,
                chunks: geometry.regions_len / geometry.chunk_size,
                features,
            },
        })
    }

    /// Everything after FEATURES_OK: config, queues, DRIVER_OK, event buffers.
    fn bring_up(
        platform: &'p P,
        transport: &mut VirtioPciDevice<'p, P>,
        shm: (u64, u64, u64, u64),
        features: u64,
        options: IsmOptions,
    ) -> Result<Setup, IsmError> {
        let config = read_config(transport)?;
        let geometry = validate_layout(&config, shm)?;
        let ctrl = CtrlQueue::new(platform, options.max_waits)?;
        transport.setup_queue(CTRL_QUEUE_INDEX, ctrl.queue(), options.ctrl_vector)?;
        let mut events = None;
        if features & bit(VIRTIO_ISM_F_EVENT_QUEUE) != 0 {
            let queue = EventQueue::new(platform)?;
            transport.setup_queue(EVENT_QUEUE_INDEX, queue.queue(), options.event_vector)?;
            events = Some(queue);
        }
        transport.driver_ok()?;
        if let Some(queue) = events.as_mut() {
            queue.fill(transport)?;
        }
        Ok(Setup {
            config,
            geometry,
            ctrl,
            events,
        })
    }

    /// What the device reported at setup.
    pub fn info(&self) -> &IsmInfo {
        &self.info
    }

    /// The virtio-pci transport (status, ISR, ...).
    pub fn transport(&self) -> &VirtioPciDevice<'p, P> {
        &self.transport
    }

    /// Access to region bytes and doorbells.
    pub fn window(&self) -> &RegionWindow<'p, P> {
        &self.window
    }

    fn execute(&mut self, request: Request, writable: usize) -> Result<Reply, IsmError> {
        self.ctrl
            .execute(self.platform, &self.transport, &request, writable)
    }

    /// Run a command whose reply holds a list, offering `initial` entries first and retrying
    /// with what E2BIG asks for (more than offered, at most `max`), a bounded number of times.
    fn with_room<T>(
        &mut self,
        initial: usize,
        max: usize,
        mut attempt: impl FnMut(&mut Self, usize) -> Result<Attempt<T>, IsmError>,
    ) -> Result<T, IsmError> {
        let mut room = initial.min(max);
        for _ in 0..MAX_TRIES {
            match attempt(self, room)? {
                Attempt::Done(value) => return Ok(value),
                Attempt::TooBig(needed) => {
                    if needed <= room as u64 {
                        return Err(ProtocolError::BadTooBig {
                            needed,
                            offered: room,
                        }
                        .into());
                    }
                    if needed > max as u64 {
                        return Err(IsmError::TooBig(needed));
                    }
                    room = needed as usize;
                }
            }
        }
        Err(IsmError::TooBig(room as u64))
    }

    /// Check the areas of a reply at `raw` against the window and build the region.
    fn region_from(
        &self,
        token: u64,
        raw: &[u8],
        num: u64,
        room: usize,
        expected_size: Option<u64>,
        writable: bool,
    ) -> Result<Region, IsmError> {
        if token == 0 {
            return Err(ProtocolError::ZeroToken.into());
        }
        let (areas, count, total) = self.window.geometry().check_areas(raw, num, room)?;
        if let Some(expected) = expected_size
            && expected != total
        {
            return Err(ProtocolError::SizeMismatch {
                expected,
                got: total,
            }
            .into());
        }
        Ok(Region::new(token, areas, count, total, writable))
    }

    /// ALLOC_REGION: a new region of `size` bytes (rounded up to 4096), owned by this device,
    /// mapped writable. Nobody else may attach it until it is granted.
    pub fn alloc(&mut self, size: u64) -> Result<Region, IsmError> {
        let expected = size
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(IsmError::Unsupported)?;
        self.with_room(INITIAL_AREAS, MAX_AREAS, |this, room| {
            let reply = this.execute(
                Request::Alloc(AllocRequest { size }),
                reply_len(AllocReplyHeader::SIZE, Area::SIZE, room),
            )?;
            if reply.status != Status::TooBig {
                reply.check()?;
            }
            let body = reply.need(AllocReplyHeader::SIZE)?;
            let header = AllocReplyHeader::decode(body).map_err(|_| short(&reply))?;
            if reply.status == Status::TooBig {
                return Ok(Attempt::TooBig(header.num));
            }
            let areas = areas_bytes(&reply, AllocReplyHeader::SIZE, header.num, room)?;
            this.region_from(header.token, areas, header.num, room, Some(expected), true)
                .map(Attempt::Done)
        })
    }

    /// ATTACH_REGION: map the region `token` (allocated by any device of the group) with
    /// `access`.
    pub fn attach(&mut self, token: u64, access: Access) -> Result<Region, IsmError> {
        let region = self.with_room(INITIAL_AREAS, MAX_AREAS, |this, room| {
            let reply = this.execute(
                Request::Attach(AttachRequest {
                    token,
                    rw_perm: access.rw_perm(),
                }),
                reply_len(AttachReplyHeader::SIZE, Area::SIZE, room),
            )?;
            if reply.status != Status::TooBig {
                reply.check()?;
            }
            let body = reply.need(AttachReplyHeader::SIZE)?;
            let header = AttachReplyHeader::decode(body).map_err(|_| short(&reply))?;
            if reply.status == Status::TooBig {
                return Ok(Attempt::TooBig(header.num));
            }
            let areas = areas_bytes(&reply, AttachReplyHeader::SIZE, header.num, room)?;
            this.region_from(
                token,
                areas,
                header.num,
                room,
                None,
                access == Access::ReadWrite,
            )
            .map(Attempt::Done)
        })?;
        if access == Access::AsGranted && self.info.has(VIRTIO_ISM_F_QUERY) {
            // Learn whether the mapping is writable; the areas must agree with the attach.
            let info = self.query_region(token)?;
            if info.region.areas() != region.areas() {
                return Err(ProtocolError::SizeMismatch {
                    expected: region.size(),
                    got: info.region.size(),
                }
                .into());
            }
            return Ok(info.region);
        }
        Ok(region)
    }

    /// DETACH_REGION: unmap `token` and stop holding it.
    pub fn detach(&mut self, token: u64) -> Result<(), IsmError> {
        self.simple(Request::Detach(DetachRequest { token }))
    }

    /// GRANT_SET_DEFAULT: `permissions` (`defs::perm` bits) for every device without a
    /// per-device grant.
    pub fn grant_default(&mut self, token: u64, permissions: u64) -> Result<(), IsmError> {
        self.need(VIRTIO_ISM_F_GRANT)?;
        self.simple(Request::GrantDefault(GrantDefaultRequest {
            token,
            permissions,
        }))
    }

    /// GRANT_SET_FOR_DEVICE: `permissions` for the device `peer_devid` only.
    pub fn grant_for_device(
        &mut self,
        token: u64,
        permissions: u64,
        peer_devid: u64,
    ) -> Result<(), IsmError> {
        self.need(VIRTIO_ISM_F_GRANT)?;
        self.simple(Request::GrantDevice(GrantDeviceRequest {
            token,
            permissions,
            peer_devid,
        }))
    }

    /// EVENT_VECTOR_SET: raise MSI-X entry `vector` on peer kicks of `token` ([`NO_VECTOR`]
    /// unbinds). Does not touch the MSI-X table; see [`IsmDriver::bind_event_vector`].
    pub fn set_event_vector(&mut self, token: u64, vector: u16) -> Result<(), IsmError> {
        self.simple(Request::EventVector(EventVectorRequest {
            token,
            vector: vector.into(),
        }))
    }

    /// Program MSI-X table entry `entry` to send `msi_data` to `msi_address` (unmasked), then
    /// bind it to `token` with EVENT_VECTOR_SET.
    pub fn bind_event_vector(
        &mut self,
        token: u64,
        entry: u16,
        msi_address: u64,
        msi_data: u32,
    ) -> Result<(), IsmError> {
        let table = self.msix.as_ref().ok_or(IsmError::NoMsix)?;
        table
            .program(entry, msi_address, msi_data)
            .map_err(IsmError::Msix)?;
        self.set_event_vector(token, entry)
    }

    fn simple(&mut self, request: Request) -> Result<(), IsmError> {
        let reply = self.execute(request, 1)?;
        reply.check()
    }

    /// Ring `region`'s doorbell: every other holder that bound a vector is signalled.
    pub fn kick(&self, region: &Region) -> Result<(), IsmError> {
        self.window.kick(region)
    }

    /// Copy bytes at `offset` of `region` out of shared memory.
    pub fn read(&self, region: &Region, offset: u64, out: &mut [u8]) -> Result<(), IsmError> {
        self.window.read(region, offset, out)
    }

    /// Copy `data` into `region` at `offset`.
    pub fn write(&self, region: &Region, offset: u64, data: &[u8]) -> Result<(), IsmError> {
        self.window.write(region, offset, data)
    }

    /// The next event, if one arrived (needs `VIRTIO_ISM_F_EVENT_QUEUE`).
    pub fn poll_event(&mut self) -> Result<Option<IsmEvent>, IsmError> {
        let geometry = *self.window.geometry();
        let events = self
            .events
            .as_mut()
            .ok_or(IsmError::NotNegotiated(VIRTIO_ISM_F_EVENT_QUEUE))?;
        events.poll(&self.transport, &geometry)
    }

    /// Poll for an event up to `max_waits` times, calling the platform's `wait` in between.
    pub fn wait_event(&mut self, max_waits: u32) -> Result<Option<IsmEvent>, IsmError> {
        for _ in 0..max_waits {
            if let Some(event) = self.poll_event()? {
                return Ok(Some(event));
            }
            self.platform.wait();
        }
        Ok(None)
    }

    /// QUERY_LIST: the tokens of every region this device holds, into `out`; returns how many.
    /// E2BIG if `out` (or [`MAX_LIST_TOKENS`]) is too small. Needs `VIRTIO_ISM_F_QUERY`.
    pub fn query_list(&mut self, out: &mut [u64]) -> Result<usize, IsmError> {
        self.need(VIRTIO_ISM_F_QUERY)?;
        let max = out.len().min(MAX_LIST_TOKENS);
        self.with_room(max, max, |this, room| {
            let reply = this.execute(
                Request::QueryList,
                reply_len(QueryListReplyHeader::SIZE, 8, room),
            )?;
            if reply.status != Status::TooBig {
                reply.check()?;
            }
            let body = reply.need(QueryListReplyHeader::SIZE)?;
            let num = QueryListReplyHeader::decode(body)
                .map_err(|_| short(&reply))?
                .num;
            if reply.status == Status::TooBig {
                return Ok(Attempt::TooBig(num));
            }
            if num > room as u64 {
                return Err(ProtocolError::AreaCount {
                    num,
                    capacity: room,
                }
                .into());
            }
            let count = num as usize;
            let bytes = reply.need(QueryListReplyHeader::SIZE + 8 * count)?;
            let tokens =
                virtio_ism_proto::ctrl::decode_tokens(&bytes[QueryListReplyHeader::SIZE..], num)
                    .map_err(|_| short(&reply))?;
            for (slot, token) in out.iter_mut().zip(tokens) {
                if token == 0 {
                    return Err(ProtocolError::ZeroToken.into());
                }
                *slot = token;
            }
            Ok(Attempt::Done(count))
        })
    }

    /// QUERY_REGION: size, access, vector and areas of a held region (also how a hot-added
    /// region becomes a [`Region`]). Needs `VIRTIO_ISM_F_QUERY`.
    pub fn query_region(&mut self, token: u64) -> Result<RegionInfo, IsmError> {
        self.need(VIRTIO_ISM_F_QUERY)?;
        self.with_room(INITIAL_AREAS, MAX_AREAS, |this, room| {
            let reply = this.execute(
                Request::QueryRegion(QueryRegionRequest { token }),
                reply_len(QueryRegionReplyHeader::SIZE, Area::SIZE, room),
            )?;
            if reply.status != Status::TooBig {
                reply.check()?;
            }
            let body = reply.need(QueryRegionReplyHeader::SIZE)?;
            let header = QueryRegionReplyHeader::decode(body).map_err(|_| short(&reply))?;
            if reply.status == Status::TooBig {
                return Ok(Attempt::TooBig(header.num));
            }
            let known = VIRTIO_ISM_REGION_READ
                | VIRTIO_ISM_REGION_WRITE
                | VIRTIO_ISM_REGION_OWNER
                | VIRTIO_ISM_REGION_HOTPLUGGED;
            if header.flags & VIRTIO_ISM_REGION_READ == 0 || header.flags & !known != 0 {
                return Err(ProtocolError::BadFlags(header.flags).into());
            }
            let vector = match header.vector {
                VIRTIO_MSI_NO_VECTOR => None,
                v if v <= MAX_EVENT_VECTOR => Some(v as u16),
                v => return Err(ProtocolError::BadVector(v).into()),
            };
            let areas = areas_bytes(&reply, QueryRegionReplyHeader::SIZE, header.num, room)?;
            let writable = header.flags & VIRTIO_ISM_REGION_WRITE != 0;
            let region =
                this.region_from(token, areas, header.num, room, Some(header.size), writable)?;
            Ok(Attempt::Done(RegionInfo {
                region,
                flags: header.flags,
                vector,
            }))
        })
    }

    fn need(&self, feature: u32) -> Result<(), IsmError> {
        if self.info.has(feature) {
            Ok(())
        } else {
            Err(IsmError::NotNegotiated(feature))
        }
    }

    /// Reset the device: it unmaps and releases every region and forgets vectors.
    pub fn reset(mut self) -> Result<(), IsmError> {
        Ok(self.transport.reset()?)
    }
}

/// A reply too short for its header (`Reply::need` checked first, so only a defence).
fn short(reply: &Reply) -> IsmError {
    ProtocolError::ShortReply {
        used: reply.used as u32,
        needed: reply.used + 1,
    }
    .into()
}

/// The `num` areas after a reply header of `header` bytes, after checking the count fits the
/// room offered and the device wrote them all.
fn areas_bytes(reply: &Reply, header: usize, num: u64, room: usize) -> Result<&[u8], IsmError> {
    if num == 0 || num > room as u64 {
        return Err(ProtocolError::AreaCount {
            num,
            capacity: room,
        }
        .into());
    }
    let body = reply.need(header + Area::SIZE * num as usize)?;
    Ok(&body[header..])
}

/// Find shmid 1 and shmid 2 and check they lie in a 64-bit memory BAR, are mapped as device
/// memory by the platform and do not overlap. Returns (regions addr, len, notify addr, len).
fn shm_layout<'a, P: Platform>(
    platform: &P,
    bars: &[Option<Bar>; 6],
    regions: impl Iterator<Item = &'a ShmRegion>,
    total: usize,
) -> Result<(u64, u64, u64, u64), ConfigError> {
    let mut found: [Option<ShmRegion>; 2] = [None, None];
    for region in regions {
        let slot = match region.id {
            VIRTIO_ISM_SHM_ID_REGIONS => 0,
            VIRTIO_ISM_SHM_ID_NOTIFY => 1,
            _ => continue,
        };
        if found[slot].is_some() {
            return Err(ConfigError::DuplicateShm(region.id));
        }
        let is_64 = bars
            .get(usize::from(region.bar))
            .copied()
            .flatten()
            .is_some_and(|b| b.kind == BarKind::Memory64);
        if !is_64 {
            return Err(ConfigError::ShmBar(region.id));
        }
        if !platform.map_mmio(region.addr, region.len) {
            return Err(ConfigError::ShmNotMmio(region.id));
        }
        found[slot] = Some(*region);
    }
    // Caps beyond what the transport kept could hide a duplicate; refuse rather than guess.
    if total > crate::virtio::MAX_SHM_REGIONS {
        return Err(ConfigError::TooManyShm(total));
    }
    let regions = found[0].ok_or(ConfigError::MissingShm(VIRTIO_ISM_SHM_ID_REGIONS))?;
    let notify = found[1].ok_or(ConfigError::MissingShm(VIRTIO_ISM_SHM_ID_NOTIFY))?;
    // Both ranges were checked inside their BARs, so the ends do not overflow.
    if regions.addr < notify.addr + notify.len && notify.addr < regions.addr + regions.len {
        return Err(ConfigError::ShmOverlap);
    }
    Ok((regions.addr, regions.len, notify.addr, notify.len))
}

/// Read the 32-byte config space until two generation reads agree around it.
fn read_config<P: Platform>(transport: &VirtioPciDevice<'_, P>) -> Result<ConfigSpace, IsmError> {
    let window = transport
        .device_config()
        .filter(|w| w.len() >= ConfigSpace::SIZE as u64)
        .ok_or(ConfigError::ConfigWindow)?;
    for _ in 0..CONFIG_TRIES {
        let before = transport.config_generation()?;
        let mut raw = [0u8; ConfigSpace::SIZE];
        for (i, word) in raw.chunks_exact_mut(4).enumerate() {
            let value = window
                .read_u32(4 * i as u64)
                .map_err(|e| IsmError::Transport(e.into()))?;
            word.copy_from_slice(&value.to_le_bytes());
        }
        if transport.config_generation()? == before {
            return ConfigSpace::decode(&raw).map_err(|_| ConfigError::ConfigWindow.into());
        }
    }
    Err(ConfigError::Unstable.into())
}

/// Check the config against itself and the shared-memory regions.
fn validate_layout(
    config: &ConfigSpace,
    (regions_addr, regions_len, notify_addr, notify_len): (u64, u64, u64, u64),
) -> Result<WindowGeometry, ConfigError> {
    if !config.chunk_size.is_power_of_two() || config.chunk_size < PAGE_SIZE {
        return Err(ConfigError::ChunkSize(config.chunk_size));
    }
    if !config.notify_size.is_power_of_two() || config.notify_size > MAX_NOTIFY_SIZE {
        return Err(ConfigError::NotifySize(config.notify_size));
    }
    if config.devid == 0 {
        return Err(ConfigError::ZeroDevid);
    }
    if regions_len == 0 || !regions_len.is_multiple_of(config.chunk_size) {
        return Err(ConfigError::RegionWindow {
            len: regions_len,
            chunk_size: config.chunk_size,
        });
    }
    let chunks = regions_len / config.chunk_size;
    let needed = chunks
        .checked_mul(config.notify_size)
        .ok_or(ConfigError::NotifyWindow {
            len: notify_len,
            needed: u64::MAX,
        })?;
    if notify_len < needed {
        return Err(ConfigError::NotifyWindow {
            len: notify_len,
            needed,
        });
    }
    Ok(WindowGeometry {
        regions_addr,
        regions_len,
        notify_addr,
        notify_len,
        chunk_size: config.chunk_size,
        notify_size: config.notify_size,
    })
}
