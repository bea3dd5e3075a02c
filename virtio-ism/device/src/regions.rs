// SPDX-License-Identifier: Apache-2.0
//! The regions one device holds: pool leases mapped into chunk slots of its window, their
//! interrupt vectors and the events about them. Every control command ends up here, after the
//! request was copied out of guest memory and validated; nothing here touches guest memory.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use ism_pool::{
    DevId, GrantTarget, MissingPerm, Perms, PoolError, PoolEvent, PoolSession, RegionLease,
    SessionInfo, Token,
};
use log::{debug, warn};
use virtio_device::{VirtioInterrupt, VirtioInterruptType};
use virtio_ism_proto::defs::{VIRTIO_MSI_NO_VECTOR, perm, region_flags};
use virtio_ism_proto::{Area, Event, EventType, Status};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::chunks::{ChunkMap, Extent};
use crate::config::WindowLayout;
use crate::doorbell::DoorbellRinger;
use crate::metrics::IsmMetrics;
use crate::notify::{NotifyWiring, WireOutcome};
use crate::window::ShmWindow;

/// Granule the pool sizes regions in.
pub const PAGE_SIZE: u64 = 4096;
/// Highest MSI-X vector EVENT_VECTOR accepts (an MSI-X table has at most 2048 entries).
pub const MAX_MSIX_VECTOR: u64 = 2047;
/// Events kept for the event queue while the driver posts no buffers; past this they are
/// dropped and an OVERFLOW event tells the driver to re-sync with QUERY.
pub const MAX_PENDING_EVENTS: usize = 256;

/// One region held by this device.
#[derive(Debug)]
pub struct Region {
    pub token: Token,
    pub size: u64,
    pub writable: bool,
    /// This device allocated it.
    pub owner: bool,
    /// The host attached it (hotplug), not the driver.
    pub hotplugged: bool,
    pub extents: Vec<Extent>,
    /// MSI-X vector bound with EVENT_VECTOR.
    pub vector: Option<u16>,
    /// Other holders this device knows of.
    pub peers: u64,
    /// Doorbells the other holders published (their irqfds for this region), from the pool.
    pub doorbells: Vec<(DevId, OwnedFd)>,
    /// How the notify slot of the first chunk is wired.
    pub route: Route,
}

/// Where a guest write to a region's notify slot goes (see `notify.rs`).
#[derive(Debug, Default)]
pub enum Route {
    /// An MMIO exit to the VMM, which calls `IsmHandle::handle_notify`.
    #[default]
    Trap,
    /// A KVM ioeventfd on the slot signals the only peer's doorbell directly.
    ZeroHop,
    /// A KVM ioeventfd on the slot signals this eventfd; the worker rings every doorbell.
    OneHop(EventFd),
}

/// The facts about a region an event carries (the region may be gone already).
#[derive(Clone, Copy, Debug)]
pub struct EventSubject {
    pub token: Token,
    pub offset: u64,
    pub peers: u64,
    pub vector: Option<u16>,
}

/// A failed command: the status to return and, for E2BIG, how many entries were needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: Status,
    pub needed: Option<u64>,
}

impl From<Status> for Refusal {
    fn from(status: Status) -> Self {
        Self {
            status,
            needed: None,
        }
    }
}

/// The status a pool refusal becomes on the wire.
pub fn pool_status(err: &PoolError) -> Status {
    match err {
        PoolError::NoSuchRegion(_) | PoolError::NotHeld { .. } => Status::NoEnt,
        PoolError::PermissionDenied { missing, .. } => match missing {
            MissingPerm::Attach => Status::PermAttach,
            MissingPerm::Read => Status::PermRead,
            MissingPerm::Write => Status::PermWrite,
            MissingPerm::Manage => Status::Err,
        },
        PoolError::PoolExhausted { .. }
        | PoolError::QuotaExceeded { .. }
        | PoolError::RegionQuotaExceeded { .. }
        | PoolError::DescriptorLimit(_)
        | PoolError::CreateMemory(_) => Status::NoMem,
        _ => Status::Err,
    }
}

/// What one device holds and how it is mapped. Only ever used under the lock in [`Regions`];
/// never calls the pool.
pub struct RegionTable {
    layout: WindowLayout,
    info: SessionInfo,
    window: Arc<dyn ShmWindow>,
    chunks: ChunkMap,
    regions: BTreeMap<Token, Region>,
    events: VecDeque<Event>,
    overflowed: bool,
    /// The driver negotiated the event queue and activated it.
    event_queue: bool,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    metrics: Arc<IsmMetrics>,
    /// How notify slots are bound to eventfds in the kernel; without one every kick traps.
    wiring: Option<Arc<dyn NotifyWiring>>,
    /// Watches the one-hop eventfds; epoll data is the region token.
    kick_epoll: Epoll,
    /// Writes peers' doorbells without ever blocking on them.
    ringer: DoorbellRinger,
}

impl RegionTable {
    pub fn new(
        layout: WindowLayout,
        info: SessionInfo,
        window: Arc<dyn ShmWindow>,
        metrics: Arc<IsmMetrics>,
        kick_epoll: Epoll,
        ringer: DoorbellRinger,
    ) -> Self {
        Self {
            layout,
            info,
            chunks: ChunkMap::new(layout.chunks),
            window,
            regions: BTreeMap::new(),
            events: VecDeque::new(),
            overflowed: false,
            event_queue: false,
            interrupt: None,
            metrics,
            wiring: None,
            kick_epoll,
            ringer,
        }
    }

    pub fn info(&self) -> SessionInfo {
        self.info
    }

    /// Called at activation and reset.
    pub fn set_active(&mut self, interrupt: Option<Arc<dyn VirtioInterrupt>>, event_queue: bool) {
        self.interrupt = interrupt;
        self.event_queue = event_queue;
        self.events.clear();
        self.overflowed = false;
    }

    pub fn is_active(&self) -> bool {
        self.interrupt.is_some()
    }

    pub fn region(&self, token: Token) -> Option<&Region> {
        self.regions.get(&token)
    }

    pub fn tokens(&self) -> Vec<Token> {
        self.regions.keys().copied().collect()
    }

    /// Areas of a region, in order, as the driver sees them (offsets in shmid 1).
    pub fn areas(&self, region: &Region) -> Vec<Area> {
        let mut remaining = region.size;
        region
            .extents
            .iter()
            .map(|extent| {
                let len = (extent.count * self.layout.chunk_size).min(remaining);
                remaining -= len;
                Area {
                    offset: extent.first * self.layout.chunk_size,
                    size: len,
                }
            })
            .collect()
    }

    fn chunks_for(&self, size: u64) -> Result<u64, Refusal> {
        let count = size.div_ceil(self.layout.chunk_size);
        if count > self.chunks.free_count() {
            return Err(Status::NoSpc.into());
        }
        Ok(count)
    }

    /// First half of ALLOC_REGION, before the pool is asked: validate `size` and check the
    /// reply buffer can take the areas. Returns the size to ask the pool for. Deciding E2BIG
    /// here means the driver's retry sees the same placement and the pool is not touched.
    pub fn check_alloc(&self, size: u64, capacity: u64) -> Result<u64, Refusal> {
        if size == 0 {
            return Err(Status::Err.into());
        }
        let size = size
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or(Refusal::from(Status::NoSpc))?;
        self.place(size, capacity)?;
        Ok(size)
    }

    /// Choose slots for `size` bytes whose areas fit in `capacity` reply entries.
    fn place(&self, size: u64, capacity: u64) -> Result<Vec<Extent>, Refusal> {
        let count = self.chunks_for(size)?;
        let plan = self
            .chunks
            .plan(count)
            .ok_or(Refusal::from(Status::NoSpc))?;
        if plan.len() as u64 > capacity {
            return Err(Refusal {
                status: Status::TooBig,
                needed: Some(plan.len() as u64),
            });
        }
        Ok(plan)
    }

    /// Second half of ALLOC/ATTACH: map a lease the pool granted into free slots. On failure
    /// the caller gives the lease back to the pool.
    pub fn install_lease(
        &mut self,
        lease: RegionLease,
        capacity: u64,
        owner: bool,
        hotplugged: bool,
    ) -> Result<Vec<Area>, Refusal> {
        if self.regions.contains_key(&lease.token) {
            return Err(Status::Err.into());
        }
        if lease.size == 0 || !lease.size.is_multiple_of(PAGE_SIZE) {
            warn!(
                "virtio-ism: pool lease {} has bad size {}",
                lease.token, lease.size
            );
            return Err(Status::Err.into());
        }
        let plan = self.place(lease.size, capacity)?;
        let token = lease.token;
        self.install(lease, plan, owner, hotplugged)?;
        Ok(self.areas(&self.regions[&token]))
    }

    /// Map a lease into the planned slots and record the region.
    fn install(
        &mut self,
        lease: RegionLease,
        plan: Vec<Extent>,
        owner: bool,
        hotplugged: bool,
    ) -> Result<(), Refusal> {
        let mut mapped: Vec<(u64, u64)> = Vec::with_capacity(plan.len());
        let mut fd_offset = 0u64;
        for extent in &plan {
            let window_offset = extent.first * self.layout.chunk_size;
            let len = (extent.count * self.layout.chunk_size).min(lease.size - fd_offset);
            if let Err(e) = self.window.map(
                window_offset,
                lease.fd.as_fd(),
                fd_offset,
                len,
                lease.writable,
            ) {
                warn!("virtio-ism: mapping region {} failed: {e}", lease.token);
                for (off, len) in mapped {
                    let _ = self.window.unmap(off, len);
                }
                return Err(Status::Err.into());
            }
            mapped.push((window_offset, len));
            fd_offset += len;
        }
        self.chunks.commit(&plan, lease.token);
        IsmMetrics::inc(&self.metrics.regions_attached);
        IsmMetrics::add(&self.metrics.bytes_mapped, lease.size);
        self.regions.insert(
            lease.token,
            Region {
                token: lease.token,
                size: lease.size,
                writable: lease.writable,
                owner,
                hotplugged,
                extents: plan,
                vector: None,
                peers: 0,
                doorbells: Vec::new(),
                route: Route::Trap,
            },
        );
        Ok(())
    }

    /// Unmap a region and free its slots; the pool side is the caller's business.
    pub fn uninstall(&mut self, token: Token) -> Option<Region> {
        self.unroute(token);
        let region = self.regions.remove(&token)?;
        for area in self.areas(&region) {
            if let Err(e) = self.window.unmap(area.offset, area.size) {
                warn!("virtio-ism: unmapping region {token} failed: {e}");
            }
        }
        self.chunks.release(&region.extents);
        IsmMetrics::sub(&self.metrics.regions_attached, 1);
        IsmMetrics::sub(&self.metrics.bytes_mapped, region.size);
        Some(region)
    }

    /// EVENT_VECTOR_SET.
    pub fn set_vector(&mut self, token: Token, vector: u64) -> Result<(), Refusal> {
        let region = self
            .regions
            .get_mut(&token)
            .ok_or(Refusal::from(Status::NoEnt))?;
        region.vector = match vector {
            VIRTIO_MSI_NO_VECTOR => None,
            v if v <= MAX_MSIX_VECTOR => Some(v as u16),
            _ => return Err(Status::Err.into()),
        };
        Ok(())
    }

    /// QUERY_REGION flags word.
    pub fn flags(region: &Region) -> u64 {
        let mut flags = region_flags::VIRTIO_ISM_REGION_READ;
        if region.writable {
            flags |= region_flags::VIRTIO_ISM_REGION_WRITE;
        }
        if region.owner {
            flags |= region_flags::VIRTIO_ISM_REGION_OWNER;
        }
        if region.hotplugged {
            flags |= region_flags::VIRTIO_ISM_REGION_HOTPLUGGED;
        }
        flags
    }

    /// Unmap everything and forget the driver (device reset, shutdown). Returns the tokens
    /// the caller must give back to the pool.
    pub fn uninstall_all(&mut self) -> Vec<Token> {
        let tokens = self.tokens();
        for token in &tokens {
            self.uninstall(*token);
        }
        self.set_active(None, false);
        tokens
    }

    /// Fold what the pool reported into the table and queue the resulting events.
    pub fn absorb(&mut self, events: Vec<PoolEvent>) {
        for event in events {
            match event {
                PoolEvent::PeerAttached { token, peer } => {
                    if let Some(region) = self.regions.get_mut(&token) {
                        region.peers += 1;
                        let subject = self.subject(&self.regions[&token]);
                        self.post_event(EventType::Attach, subject, peer.0);
                    }
                }
                PoolEvent::PeerDetached { token, peer } => {
                    if let Some(region) = self.regions.get_mut(&token) {
                        region.peers = region.peers.saturating_sub(1);
                        let subject = self.subject(&self.regions[&token]);
                        self.post_event(EventType::Detach, subject, peer.0);
                    }
                }
                PoolEvent::Updated { token } => {
                    if let Some(region) = self.regions.get(&token) {
                        let subject = self.subject(region);
                        self.post_event(EventType::Update, subject, 0);
                    }
                }
                // Regions::absorb_pool_events asks the pool for the new doorbells.
                PoolEvent::DoorbellsChanged { .. } => {}
                PoolEvent::Revoked { token } => {
                    // The pool already dropped our hold; just unmap.
                    if let Some(region) = self.uninstall(token) {
                        let subject = self.subject(&region);
                        self.post_event(EventType::Revoke, subject, 0);
                    }
                }
            }
        }
    }

    /// What an event says about a region.
    pub fn subject(&self, region: &Region) -> EventSubject {
        EventSubject {
            token: region.token,
            offset: region
                .extents
                .first()
                .map_or(0, |e| e.first * self.layout.chunk_size),
            peers: region.peers,
            vector: region.vector,
        }
    }

    /// Queue an event for the event queue, or, without one, raise the region's vector (the
    /// only way a draft driver can hear about it).
    pub fn post_event(&mut self, kind: EventType, subject: EventSubject, devid: u64) {
        if self.event_queue {
            if self.events.len() >= MAX_PENDING_EVENTS {
                IsmMetrics::add(&self.metrics.events_dropped, self.events.len() as u64);
                self.events.clear();
                self.overflowed = true;
            }
            self.events.push_back(Event {
                ev_type: kind.raw(),
                offset: subject.offset,
                devid,
                peers: subject.peers,
                token: subject.token.0,
            });
        } else if let (Some(vector), Some(interrupt)) = (subject.vector, &self.interrupt) {
            let _ = interrupt.trigger(VirtioInterruptType::Vector(vector));
        }
    }

    /// Next event to deliver (an OVERFLOW marker first if events were dropped).
    pub fn peek_event(&self) -> Option<Event> {
        if self.overflowed {
            return Some(Event {
                ev_type: EventType::Overflow.raw(),
                ..Event::default()
            });
        }
        self.events.front().copied()
    }

    /// `delivered` (returned by `peek_event`) reached the driver.
    pub fn pop_event(&mut self, delivered: &Event) {
        if self.overflowed {
            if delivered.kind() == EventType::Overflow {
                self.overflowed = false;
            }
        } else if self.events.front() == Some(delivered) {
            self.events.pop_front();
        }
        IsmMetrics::inc(&self.metrics.events_delivered);
    }

    /// The region whose notify slot is at `offset` within shmid 2.
    pub fn notify_target(&self, offset: u64) -> Option<Token> {
        let slot = offset / self.layout.notify_size;
        if slot >= self.layout.chunks {
            return None;
        }
        self.chunks.owner(slot)
    }

    /// Bind notify slots through `wiring` from now on (and re-route what is held).
    pub fn set_wiring(&mut self, wiring: Option<Arc<dyn NotifyWiring>>) {
        for token in self.tokens() {
            self.unroute(token);
        }
        self.wiring = wiring;
        self.rewire_all();
    }

    /// The epoll instance watching one-hop eventfds (for the worker's loop).
    pub fn kick_epoll_fd(&self) -> RawFd {
        self.kick_epoll.as_raw_fd()
    }

    /// The eventfd that raises this guest's interrupt for `token` (its bound vector's irqfd),
    /// to publish as this device's doorbell for the region.
    pub fn own_doorbell(&self, token: Token) -> Option<EventFd> {
        let vector = self.regions.get(&token)?.vector?;
        self.interrupt
            .as_ref()?
            .notifier(VirtioInterruptType::Vector(vector))
    }

    /// The pool says these are the other holders' doorbells for `token` now.
    pub fn set_peer_doorbells(&mut self, token: Token, doorbells: Vec<(DevId, OwnedFd)>) {
        let Some(region) = self.regions.get_mut(&token) else {
            return;
        };
        region.doorbells = doorbells;
        self.reroute(token);
    }

    /// Window offset of the notify slot drivers ring for `region` (its first chunk's).
    fn notify_slot(&self, region: &Region) -> Option<u64> {
        region
            .extents
            .first()
            .map(|e| self.layout.notify_offset + e.first * self.layout.notify_size)
    }

    /// Undo the wiring of `token`'s notify slot: writes trap again.
    fn unroute(&mut self, token: Token) {
        let Some(region) = self.regions.get_mut(&token) else {
            return;
        };
        let route = std::mem::take(&mut region.route);
        if matches!(route, Route::Trap) {
            return;
        }
        let slot = self.notify_slot(&self.regions[&token]);
        if let (Some(wiring), Some(slot)) = (&self.wiring, slot)
            && let Err(e) = wiring.unwire(slot, self.layout.notify_size)
        {
            warn!("virtio-ism: unwiring the notify slot of {token} failed: {e}");
        }
        match route {
            Route::ZeroHop => IsmMetrics::sub(&self.metrics.kick_routes_zero_hop, 1),
            Route::OneHop(evt) => {
                IsmMetrics::sub(&self.metrics.kick_routes_one_hop, 1);
                let _ = self.kick_epoll.ctl(
                    ControlOperation::Delete,
                    evt.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            Route::Trap => {}
        }
    }

    /// Wire `token`'s notify slot for the doorbells it has now: straight to the only peer's
    /// doorbell, else to a one-hop eventfd the worker fans out, else (no peer, or the VMM
    /// out of resources) leave it trapping. A route slower than wanted counts a fallback.
    fn reroute(&mut self, token: Token) {
        self.unroute(token);
        let Some(wiring) = self.wiring.clone() else {
            return;
        };
        let Some(region) = self.regions.get(&token) else {
            return;
        };
        let Some(slot) = self.notify_slot(region) else {
            return;
        };
        let len = self.layout.notify_size;
        let route = match region.doorbells.as_slice() {
            [] => return,
            [(_, doorbell)] => match wiring.wire(slot, len, doorbell.as_fd()) {
                Ok(WireOutcome::Wired) => Some(Route::ZeroHop),
                outcome => {
                    log_refusal(token, "zero-hop", outcome);
                    self.one_hop(&*wiring, token, slot)
                }
            },
            _ => self.one_hop(&*wiring, token, slot),
        };
        match route {
            Some(Route::ZeroHop) => IsmMetrics::inc(&self.metrics.kick_routes_zero_hop),
            Some(Route::OneHop(_)) => IsmMetrics::inc(&self.metrics.kick_routes_one_hop),
            _ => {}
        }
        let wanted_zero_hop = self.regions[&token].doorbells.len() == 1;
        if !matches!(route, Some(Route::ZeroHop)) && (wanted_zero_hop || route.is_none()) {
            IsmMetrics::inc(&self.metrics.kick_fallbacks);
        }
        if let (Some(route), Some(region)) = (route, self.regions.get_mut(&token)) {
            region.route = route;
        }
    }

    /// Wire the slot to a fresh eventfd the worker watches; None if anything refuses.
    fn one_hop(&self, wiring: &dyn NotifyWiring, token: Token, slot: u64) -> Option<Route> {
        let evt = match EventFd::new(EFD_NONBLOCK) {
            Ok(evt) => evt,
            Err(e) => {
                warn!("virtio-ism: no eventfd for the kicks of {token}: {e}");
                return None;
            }
        };
        let fd = evt.as_raw_fd();
        if let Err(e) = self.kick_epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token.0),
        ) {
            warn!("virtio-ism: watching the kicks of {token} failed: {e}");
            return None;
        }
        match wiring.wire(slot, self.layout.notify_size, borrow_eventfd(&evt)) {
            Ok(WireOutcome::Wired) => Some(Route::OneHop(evt)),
            outcome => {
                log_refusal(token, "one-hop", outcome);
                let _ = self
                    .kick_epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                None
            }
        }
    }

    /// Wire every region again (the VMM moved the window, or the wiring changed).
    pub fn rewire_all(&mut self) {
        for token in self.tokens() {
            self.reroute(token);
        }
    }

    /// Write every peer doorbell of `token`; returns how many were rung.
    pub fn ring_doorbells(&self, token: Token) -> usize {
        let Some(region) = self.regions.get(&token) else {
            return 0;
        };
        let doorbells: Vec<BorrowedFd<'_>> = region
            .doorbells
            .iter()
            .map(|(_, doorbell)| doorbell.as_fd())
            .collect();
        let rung = self.ringer.ring(&doorbells);
        IsmMetrics::add(&self.metrics.doorbell_writes, rung as u64);
        rung
    }

    /// Serve the one-hop eventfds that fired: ring the doorbells of their regions. Returns
    /// how many regions were kicked.
    pub fn serve_one_hop_kicks(&self) -> usize {
        let mut events = [EpollEvent::default(); 16];
        let mut kicked = 0;
        loop {
            let ready = match self.kick_epoll.wait(0, &mut events) {
                Ok(ready) => ready,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("virtio-ism: waiting on kick eventfds failed: {e}");
                    return kicked;
                }
            };
            for event in &events[..ready] {
                let token = Token(event.data());
                let Some(Route::OneHop(evt)) = self.regions.get(&token).map(|r| &r.route) else {
                    continue;
                };
                // Nothing to read means another pass already served it.
                if evt.read().is_ok() {
                    IsmMetrics::inc(&self.metrics.kicks_one_hop);
                    self.ring_doorbells(token);
                    kicked += 1;
                }
            }
            if ready < events.len() {
                return kicked;
            }
        }
    }

    /// A peer kicked `token`: raise its vector. Returns whether an interrupt was raised.
    pub fn deliver_kick(&self, token: Token) -> bool {
        let Some(vector) = self.regions.get(&token).and_then(|r| r.vector) else {
            return false;
        };
        let Some(interrupt) = &self.interrupt else {
            return false;
        };
        if interrupt
            .trigger(VirtioInterruptType::Vector(vector))
            .is_ok()
        {
            IsmMetrics::inc(&self.metrics.kicks_delivered);
            true
        } else {
            false
        }
    }
}

/// vmm-sys-util's EventFd does not implement AsFd.
fn borrow_eventfd(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `evt` and stays open while the borrow (tied to
    // `evt`'s lifetime) lives.
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}

fn log_refusal(token: Token, route: &str, outcome: std::io::Result<WireOutcome>) {
    match outcome {
        Ok(WireOutcome::Wired) => {}
        Ok(WireOutcome::NoResources) => {
            debug!("virtio-ism: no resources for a {route} kick route of {token}")
        }
        Err(e) => warn!("virtio-ism: wiring a {route} kick route of {token} failed: {e}"),
    }
}

/// Signal one peer doorbell without ever blocking: a peer could hand over an eventfd whose
/// counter is full and whose O_NONBLOCK is clear, and this runs on the device's threads.
/// The region table behind its lock, plus the pool session. Shared by the worker thread
/// (control and event queues) and the VMM-facing handle (hotplug, doorbells, reset).
///
/// Pool calls (possibly IPC to a broker) are made without holding the table lock, so a
/// doorbell or hotplug never waits for the broker; slots are chosen again under the lock once
/// the pool answered.
pub struct Regions {
    table: Mutex<RegionTable>,
    session: Arc<dyn PoolSession>,
    /// Serialises doorbell refreshes, so an older answer from the pool never overwrites a
    /// newer one.
    refresh: Mutex<()>,
}

impl Regions {
    pub fn new(table: RegionTable, session: Arc<dyn PoolSession>) -> Self {
        Self {
            table: Mutex::new(table),
            session,
            refresh: Mutex::new(()),
        }
    }

    /// The pool session (host-side region creation and status go straight to it).
    pub fn session(&self) -> &Arc<dyn PoolSession> {
        &self.session
    }

    pub fn lock(&self) -> MutexGuard<'_, RegionTable> {
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// ALLOC_REGION. `capacity` is how many areas the driver's reply buffer holds.
    pub fn alloc(&self, size: u64, capacity: u64) -> Result<(Token, Vec<Area>), Refusal> {
        let size = self.lock().check_alloc(size, capacity)?;
        let lease = self.session.alloc(size).map_err(|e| {
            debug!("virtio-ism: pool refused alloc of {size} bytes: {e}");
            Refusal::from(pool_status(&e))
        })?;
        let token = lease.token;
        let installed = self.lock().install_lease(lease, capacity, true, false);
        if installed.is_err() {
            self.give_back(token);
        }
        installed.map(|areas| (token, areas))
    }

    /// ATTACH_REGION (or a host hot-add when `hotplugged`). `rw_perm` keeps only READ/WRITE;
    /// 0 means "whatever is granted".
    pub fn attach(
        &self,
        token: Token,
        rw_perm: u64,
        capacity: u64,
        hotplugged: bool,
    ) -> Result<Vec<Area>, Refusal> {
        if self.lock().region(token).is_some() {
            return Err(Status::Err.into());
        }
        let want = Perms(rw_perm & (perm::VIRTIO_ISM_PERM_READ | perm::VIRTIO_ISM_PERM_WRITE));
        let lease = self.session.attach(token, want).map_err(|e| {
            debug!("virtio-ism: pool refused attach of {token}: {e}");
            Refusal::from(pool_status(&e))
        })?;
        let installed = self
            .lock()
            .install_lease(lease, capacity, false, hotplugged);
        if installed.is_err() {
            self.give_back(token);
        } else {
            self.refresh_doorbells(token);
        }
        installed
    }

    /// EVENT_VECTOR_SET, then publish the vector's irqfd as this device's doorbell for the
    /// region (or withdraw it when unbound or the transport has none).
    pub fn set_vector(&self, token: Token, vector: u64) -> Result<(), Refusal> {
        let doorbell = {
            let mut table = self.lock();
            table.set_vector(token, vector)?;
            table.own_doorbell(token)
        };
        self.publish_doorbell(token, doorbell.as_ref());
        Ok(())
    }

    /// Publish (or, with None, withdraw) this device's doorbell for `token`. A failure only
    /// costs the fast path: peers then reach this guest through their trap path, if at all.
    fn publish_doorbell(&self, token: Token, doorbell: Option<&EventFd>) {
        let result = match doorbell {
            Some(doorbell) => self
                .session
                .publish_doorbell(token, borrow_eventfd(doorbell)),
            None => self.session.withdraw_doorbell(token),
        };
        match result {
            Ok(()) | Err(PoolError::DoorbellsUnsupported) => {}
            Err(e) => warn!("virtio-ism: publishing the doorbell of {token} failed: {e}"),
        }
    }

    /// Publish every bound vector's current irqfd again (the transport changed which
    /// eventfd raises a vector).
    pub fn republish_doorbells(&self) {
        let doorbells: Vec<(Token, Option<EventFd>)> = {
            let table = self.lock();
            table
                .tokens()
                .into_iter()
                .map(|token| (token, table.own_doorbell(token)))
                .collect()
        };
        for (token, doorbell) in doorbells {
            self.publish_doorbell(token, doorbell.as_ref());
        }
    }

    /// Ask the pool for the other holders' doorbells of `token` and re-route its kicks.
    pub fn refresh_doorbells(&self, token: Token) {
        let _one_at_a_time = self.refresh.lock().unwrap_or_else(|e| e.into_inner());
        let doorbells = match self.session.peer_doorbells(token) {
            Ok(doorbells) => doorbells,
            Err(PoolError::DoorbellsUnsupported) => return,
            Err(e) => {
                // Typically NotHeld: the region went away meanwhile.
                debug!("virtio-ism: no doorbells for {token}: {e}");
                Vec::new()
            }
        };
        self.lock().set_peer_doorbells(token, doorbells);
    }

    /// DETACH_REGION.
    pub fn detach(&self, token: Token) -> Result<(), Refusal> {
        self.lock()
            .uninstall(token)
            .ok_or(Refusal::from(Status::NoEnt))?;
        self.give_back(token);
        Ok(())
    }

    fn give_back(&self, token: Token) {
        if let Err(e) = self.session.detach(token) {
            warn!("virtio-ism: pool detach of {token} failed: {e}");
        }
    }

    /// GRANT_SET_DEFAULT / GRANT_SET_FOR_DEVICE: the pool checks ownership and MANAGE.
    pub fn grant(&self, token: Token, target: GrantTarget, perms: u64) -> Result<(), Refusal> {
        if perms & !perm::VIRTIO_ISM_PERM_ALL != 0 {
            return Err(Status::Err.into());
        }
        if let GrantTarget::Device(DevId(0)) = target {
            return Err(Status::Err.into());
        }
        self.session
            .grant(token, target, Perms(perms))
            .map_err(|e| Refusal::from(pool_status(&e)))
    }

    /// Unmap everything and give every region back (device reset, shutdown).
    pub fn release_all(&self) {
        let tokens = self.lock().uninstall_all();
        for token in tokens {
            self.give_back(token);
        }
    }

    /// Host hot-unplug: drop the region, give it back and tell the driver it was revoked.
    pub fn revoke(&self, token: Token) -> bool {
        let removed = {
            let mut table = self.lock();
            let region = table.uninstall(token);
            if let Some(region) = &region {
                let subject = table.subject(region);
                table.post_event(EventType::Revoke, subject, 0);
            }
            region.is_some()
        };
        if removed {
            self.give_back(token);
        }
        removed
    }

    /// Take what the pool reported and fold it into the table. Returns the reports.
    pub fn absorb_pool_events(&self) -> Vec<PoolEvent> {
        let events = self.session.take_events();
        if events.is_empty() {
            return events;
        }
        let mut changed: Vec<Token> = events
            .iter()
            .filter_map(|event| match event {
                PoolEvent::DoorbellsChanged { token } => Some(*token),
                _ => None,
            })
            .collect();
        changed.sort();
        changed.dedup();
        self.lock().absorb(events.clone());
        for token in changed {
            self.refresh_doorbells(token);
        }
        events
    }
}
