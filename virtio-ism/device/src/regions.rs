// SPDX-License-Identifier: Apache-2.0
//! Region bookkeeping: pool leases mapped into chunk slots of the window, their vectors and
//! peers, and the [`Regions`] lock around them that control commands and the VMM go through.
//!
//! Every control command ends up here, after the request was copied out of guest memory and
//! validated; nothing here touches guest memory. The events a change produces wait in
//! [`crate::events`]; kicks are routed by [`crate::kick_routes`].

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, warn};
use virtio_device::{VirtioInterrupt, VirtioInterruptType};
use virtio_ism_pool_api::{
    DevId, GrantTarget, MissingPerm, Perms, PoolError, PoolEvent, PoolSession, RegionLease,
    SessionInfo, Token,
};
use virtio_ism_proto::defs::features::{VIRTIO_ISM_F_GRANT, VIRTIO_ISM_F_VECTOR_EVENTS, bit};
use virtio_ism_proto::defs::{VIRTIO_MSI_NO_VECTOR, perm, region_flags};
use virtio_ism_proto::{Area, Event, EventType, Status};
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::eventfd::EventFd;

use crate::chunks::{ChunkMap, Extent};
use crate::config::{DraftDefaultPerm, WindowLayout};
use crate::doorbell::DoorbellRinger;
use crate::events::PendingEvents;
use crate::kick_inbox::{FiredKick, KickInbox, PendingKick};
use crate::kick_routes::{KickRoutes, Route, borrow_eventfd};
use crate::metrics::IsmMetrics;
use crate::notify::NotifyWiring;
use crate::window::ShmWindow;

/// Granule the pool sizes regions in.
pub const PAGE_SIZE: u64 = 4096;
/// Highest MSI-X vector EVENT_VECTOR accepts (an MSI-X table has at most 2048 entries).
pub const MAX_MSIX_VECTOR: u64 = 2047;

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
    /// Bound with EVENT_VECTOR_PENDING_SET: peers' kicks go through this inbox, which sets
    /// a bit in driver memory before the vector is raised.
    pub pending: Option<PendingKick>,
}

/// The facts about a region an event carries (the region may be gone already).
#[derive(Clone, Copy, Debug)]
pub struct EventSubject {
    pub token: Token,
    pub offset: u64,
    pub peers: u64,
    pub vector: Option<u16>,
}

/// Why a kick took the trap route (see `IsmMetrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrappedKick {
    /// No peer doorbell known for the region: nothing in the kernel could carry it.
    WithoutDoorbell,
    /// The slot counts as wired now: the write landed while it was being re-wired.
    WhileWired,
    /// A slot that is never wired (not the region's first chunk's), or the VMM had no room.
    Expected,
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
        // The broker is down, being reconnected to, or did not answer in time: nothing
        // changed, and the command may work when retried (docs/pool.md, "Failure model").
        PoolError::Connection(_) => Status::Again,
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
    events: PendingEvents,
    /// The driver negotiated the event queue and activated it.
    event_queue: bool,
    /// Features the driver negotiated (0 while inactive).
    features: u64,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
    metrics: Arc<IsmMetrics>,
    routes: KickRoutes,
    /// Inboxes of the regions bound with a pending bit.
    inbox: KickInbox,
    /// Regions kicked through the trap while no peer doorbell was known: the worker rings
    /// them once it has absorbed the pool's reports.
    held_kicks: BTreeSet<Token>,
}

impl RegionTable {
    pub fn new(
        layout: WindowLayout,
        info: SessionInfo,
        window: Arc<dyn ShmWindow>,
        metrics: Arc<IsmMetrics>,
        kick_epoll: Epoll,
        inbox_epoll: Epoll,
        ringer: DoorbellRinger,
    ) -> Self {
        Self {
            layout,
            info,
            chunks: ChunkMap::new(layout.chunks),
            window,
            regions: BTreeMap::new(),
            events: PendingEvents::new(metrics.clone()),
            event_queue: false,
            features: 0,
            interrupt: None,
            routes: KickRoutes::new(layout, metrics.clone(), kick_epoll, ringer),
            inbox: KickInbox::new(inbox_epoll),
            metrics,
            held_kicks: BTreeSet::new(),
        }
    }

    pub fn info(&self) -> SessionInfo {
        self.info
    }

    /// Called at activation (with the negotiated features) and reset.
    pub fn set_active(
        &mut self,
        interrupt: Option<Arc<dyn VirtioInterrupt>>,
        event_queue: bool,
        features: u64,
    ) {
        self.interrupt = interrupt;
        self.event_queue = event_queue;
        self.features = features;
        self.events.clear();
    }

    /// Whether the driver negotiated feature bit `nr`.
    pub fn negotiated(&self, nr: u32) -> bool {
        self.features & bit(nr) != 0
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
                pending: None,
            },
        );
        Ok(())
    }

    /// Unmap a region and free its slots; the pool side is the caller's business.
    pub fn uninstall(&mut self, token: Token) -> Option<Region> {
        let mut region = self.regions.remove(&token)?;
        self.routes.unroute(&mut region);
        for area in self.areas(&region) {
            if let Err(e) = self.window.unmap(area.offset, area.size) {
                warn!("virtio-ism: unmapping region {token} failed: {e}");
            }
        }
        self.chunks.release(&region.extents);
        self.held_kicks.remove(&token);
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
        region.pending = None;
        Ok(())
    }

    /// EVENT_VECTOR_PENDING_SET: bind `vector` and record each peer kick in bit `bit` of the
    /// le64 at guest-physical `addr` first. The caller checked that `addr` is guest memory.
    pub fn set_vector_pending(
        &mut self,
        token: Token,
        vector: u64,
        addr: u64,
        bit: u64,
    ) -> Result<(), Refusal> {
        if vector > MAX_MSIX_VECTOR || bit > 63 || !addr.is_multiple_of(8) {
            return Err(Status::Err.into());
        }
        if !self.regions.contains_key(&token) {
            return Err(Status::NoEnt.into());
        }
        let pending = self.inbox.open(token, addr, bit as u32).map_err(|e| {
            warn!("virtio-ism: no kick inbox for {token}: {e}");
            Refusal::from(Status::Err)
        })?;
        let region = self
            .regions
            .get_mut(&token)
            .ok_or(Refusal::from(Status::NoEnt))?;
        region.vector = Some(vector as u16);
        region.pending = Some(pending);
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
        self.set_active(None, false, 0);
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

    /// Queue an event for the event queue, or, without one, raise the region's vector if the
    /// driver negotiated `VIRTIO_ISM_F_VECTOR_EVENTS`. A driver that negotiated neither hears
    /// nothing: the draft's region vector fires for kicks only, and a draft driver counts
    /// every interrupt on it as a kick.
    pub fn post_event(&mut self, kind: EventType, subject: EventSubject, devid: u64) {
        if self.event_queue {
            self.events.push(Event {
                ev_type: kind.raw(),
                offset: subject.offset,
                devid,
                peers: subject.peers,
                token: subject.token.0,
            });
        } else if self.negotiated(VIRTIO_ISM_F_VECTOR_EVENTS)
            && let (Some(vector), Some(interrupt)) = (subject.vector, &self.interrupt)
        {
            let _ = interrupt.trigger(VirtioInterruptType::Vector(vector));
        }
    }

    /// Next event to deliver (an OVERFLOW marker first if events were dropped).
    pub fn peek_event(&self) -> Option<Event> {
        self.events.peek()
    }

    /// `delivered` (returned by `peek_event`) reached the driver.
    pub fn pop_event(&mut self, delivered: &Event) {
        self.events.pop(delivered);
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
        for region in self.regions.values_mut() {
            self.routes.unroute(region);
        }
        self.routes.set_wiring(wiring);
        self.rewire_all();
    }

    /// The epoll instance watching one-hop eventfds (for the worker's loop).
    pub fn kick_epoll_fd(&self) -> RawFd {
        self.routes.kick_epoll_fd()
    }

    /// The eventfd that raises this guest's interrupt for `token` (its bound vector's irqfd),
    /// to publish as this device's doorbell for the region.
    pub fn own_doorbell(&self, token: Token) -> Option<EventFd> {
        let region = self.regions.get(&token)?;
        let vector = region.vector?;
        if let Some(pending) = &region.pending {
            return pending
                .inbox
                .try_clone()
                .inspect_err(|e| warn!("virtio-ism: duplicating the kick inbox of {token}: {e}"))
                .ok();
        }
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
        self.routes.reroute(region);
    }

    /// Wire every region again (the VMM moved the window, or the wiring changed).
    pub fn rewire_all(&mut self) {
        for region in self.regions.values_mut() {
            self.routes.reroute(region);
        }
    }

    /// Classify a trapped write at window offset `slot` to a notify slot of `token`.
    pub fn trapped_kick_kind(&self, token: Token, slot: u64) -> TrappedKick {
        let Some(region) = self.regions.get(&token) else {
            return TrappedKick::Expected;
        };
        if region.doorbells.is_empty() {
            return TrappedKick::WithoutDoorbell;
        }
        let wired_slot = region
            .extents
            .first()
            .map(|e| self.layout.notify_offset + e.first * self.layout.notify_size);
        let on_wired_slot = wired_slot
            .is_some_and(|wired| (wired..wired + self.layout.notify_size).contains(&slot));
        if on_wired_slot && !matches!(region.route, Route::Trap) {
            TrappedKick::WhileWired
        } else {
            TrappedKick::Expected
        }
    }

    /// Keep a trapped kick of `token` that found no peer doorbell, for
    /// [`RegionTable::serve_held_kicks`].
    pub fn hold_kick(&mut self, token: Token) {
        self.held_kicks.insert(token);
    }

    /// Ring the doorbells of the regions whose kicks were held, now that the pool's reports
    /// are absorbed; a region still without a doorbell drops its kick (no peer has a vector
    /// bound). Returns how many held kicks rang a doorbell.
    pub fn serve_held_kicks(&mut self) -> usize {
        let mut delivered = 0;
        for token in std::mem::take(&mut self.held_kicks) {
            if self.ring_doorbells(token) > 0 {
                IsmMetrics::inc(&self.metrics.kicks_delivered_late);
                delivered += 1;
            }
        }
        delivered
    }

    /// Write every peer doorbell of `token`; returns how many were rung.
    pub fn ring_doorbells(&self, token: Token) -> usize {
        self.regions
            .get(&token)
            .map_or(0, |region| self.routes.ring(region))
    }

    /// Serve the one-hop eventfds that fired: ring the doorbells of their regions. Returns
    /// how many regions were kicked.
    pub fn serve_one_hop_kicks(&self) -> usize {
        self.routes.serve_one_hop_kicks(&self.regions)
    }

    /// The epoll instance over the pending-bit inboxes (for the worker's loop).
    pub fn inbox_epoll_fd(&self) -> RawFd {
        self.inbox.epoll_fd()
    }

    /// Consume the inboxes that fired: what the worker must record and raise.
    pub fn take_fired_kicks(&self) -> Vec<FiredKick> {
        self.inbox.take_fired(&self.regions)
    }

    /// A peer kicked `token`: raise its vector (through the inbox when it has a pending
    /// bit, so the worker records the bit first). Returns whether the kick was passed on.
    pub fn deliver_kick(&self, token: Token) -> bool {
        let Some(region) = self.regions.get(&token) else {
            return false;
        };
        let Some(vector) = region.vector else {
            return false;
        };
        if let Some(pending) = &region.pending {
            let delivered = pending.inbox.write(1).is_ok();
            if delivered {
                IsmMetrics::inc(&self.metrics.kicks_delivered);
            }
            return delivered;
        }
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

/// The region table behind its lock, plus the pool session. Shared by the worker thread
/// (control and event queues) and the VMM-facing handle (hotplug, doorbells, reset).
///
/// Pool calls (possibly IPC to a broker) are made without holding the table lock, so a
/// doorbell or hotplug never waits for the broker; slots are chosen again under the lock once
/// the pool answered.
pub struct Regions {
    table: Mutex<RegionTable>,
    session: Arc<dyn PoolSession>,
    /// What regions of drivers without `VIRTIO_ISM_F_GRANT` grant everyone at ALLOC.
    draft_default_perm: DraftDefaultPerm,
    /// Serialises doorbell refreshes, so an older answer from the pool never overwrites a
    /// newer one.
    refresh: Mutex<()>,
}

impl Regions {
    pub fn new(
        table: RegionTable,
        session: Arc<dyn PoolSession>,
        draft_default_perm: DraftDefaultPerm,
    ) -> Self {
        Self {
            table: Mutex::new(table),
            session,
            draft_default_perm,
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
    ///
    /// For a driver that did not negotiate `VIRTIO_ISM_F_GRANT` the operator's
    /// `draft_default_perm` is granted to the pool's default target right away (it can never
    /// grant itself); if the pool refuses that grant the region is freed again and the driver
    /// gets ERR.
    pub fn alloc(&self, size: u64, capacity: u64) -> Result<(Token, Vec<Area>), Refusal> {
        let (size, draft_grant) = {
            let table = self.lock();
            let size = table.check_alloc(size, capacity)?;
            let draft_grant = if table.negotiated(VIRTIO_ISM_F_GRANT) {
                None
            } else {
                self.draft_default_perm.grant_bits()
            };
            (size, draft_grant)
        };
        let lease = self.session.alloc(size).map_err(|e| {
            debug!("virtio-ism: pool refused alloc of {size} bytes: {e}");
            Refusal::from(pool_status(&e))
        })?;
        let token = lease.token;
        let installed = self.lock().install_lease(lease, capacity, true, false);
        if installed.is_err() {
            self.give_back(token);
            return installed.map(|areas| (token, areas));
        }
        if let Some(bits) = draft_grant
            && let Err(e) = self.session.grant(token, GrantTarget::Default, Perms(bits))
        {
            warn!("virtio-ism: draft_default_perm grant on new region {token} refused: {e}");
            self.lock().uninstall(token);
            self.give_back(token);
            return Err(Status::Err.into());
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

    /// EVENT_VECTOR_PENDING_SET, then publish the region's kick inbox as this device's
    /// doorbell for it.
    pub fn set_vector_pending(
        &self,
        token: Token,
        vector: u64,
        addr: u64,
        bit: u64,
    ) -> Result<(), Refusal> {
        let doorbell = {
            let mut table = self.lock();
            table.set_vector_pending(token, vector, addr, bit)?;
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
            // Without a broker to ask, the routes it gave stay: peers' doorbells keep
            // working while it is down, and a resumed session asks again.
            Err(PoolError::DoorbellsUnsupported | PoolError::Connection(_)) => return,
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

    /// Take what the pool reported and fold it into the table, then ring the doorbells of
    /// kicks held for want of one. Returns the reports.
    pub fn absorb_pool_events(&self) -> Vec<PoolEvent> {
        let events = self.absorb_reports();
        self.lock().serve_held_kicks();
        events
    }

    fn absorb_reports(&self) -> Vec<PoolEvent> {
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
