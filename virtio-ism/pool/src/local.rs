// SPDX-License-Identifier: Apache-2.0
//! The pool itself: regions, grants, holders, quotas and events, all in one process.
//!
//! A VMM started without a broker socket uses a [`LocalPool`] directly; the broker daemon
//! runs one too and gives every connection a [`LocalSession`] of it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::PoolConfig;
use crate::events::EventQueue;
use crate::memory::{FileIdentity, RegionMemory};
use crate::session::{
    DevId, GrantTarget, MissingPerm, Perms, PoolError, PoolEvent, PoolSession, RegionLease,
    SessionInfo, Token,
};
use crate::state::{ConfigRecord, PoolSnapshot, RegionRecord, STATE_FORMAT, SessionRecord};
use crate::status::{PoolStatus, RegionStatus, SessionStatus};
use crate::token::{mint_token, random_nonzero_u64};

/// Every permission an owner has.
const OWNER_PERMS: Perms =
    Perms(Perms::READ.0 | Perms::WRITE.0 | Perms::ATTACH.0 | Perms::MANAGE.0);

/// Which VM a session's quotas are charged to. The broker derives it from the peer's
/// credentials (see `admission::VmIdentity`); an in-process session is a VM of its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum VmKey {
    /// One session alone (in-process sessions).
    Session(DevId),
    /// One process (SO_PEERCRED pid): forked children count as new VMs.
    Process(u32),
    /// Every process of one uid.
    Uid(u32),
    /// Every process of one uid in one cgroup v2 (a systemd unit per VM); forked children
    /// stay in their parent's cgroup.
    Cgroup { uid: u32, path: Arc<str> },
}

impl std::fmt::Display for VmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmKey::Session(devid) => write!(f, "session {}", devid.0),
            VmKey::Process(pid) => write!(f, "pid {pid}"),
            VmKey::Uid(uid) => write!(f, "uid {uid}"),
            VmKey::Cgroup { uid, path } => write!(f, "uid {uid} cgroup {path}"),
        }
    }
}

/// Who opens a session, as the broker learned it from SO_PEERCRED and /proc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionOwner {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    /// The account charged; `None` makes the session a VM of its own.
    pub vm: Option<VmKey>,
    /// Whether the kernel enforces this session's read-only leases (the peer can neither
    /// reopen a lease read-write nor chmod it); `None` when unknown (in-process).
    pub read_only_enforced: Option<bool>,
}

/// What one VM holds: bytes and regions (each region is a descriptor in the broker).
#[derive(Clone, Copy, Debug, Default)]
struct VmUse {
    bytes: u64,
    regions: u64,
}

struct Region {
    memory: RegionMemory,
    /// Which memfd `memory` is (recorded in the state file).
    file: FileIdentity,
    owner: DevId,
    default_perms: Perms,
    grants: BTreeMap<DevId, Perms>,
    holders: BTreeSet<DevId>,
    /// Each holder's published doorbell (the pool's own duplicate).
    doorbells: BTreeMap<DevId, OwnedFd>,
    /// Bumped whenever `doorbells` changes, so a paged listing can detect a change.
    doorbell_generation: u64,
}

impl Region {
    fn effective_perms(&self, devid: DevId) -> Perms {
        if devid == self.owner {
            return OWNER_PERMS;
        }
        self.grants
            .get(&devid)
            .copied()
            .unwrap_or(self.default_perms)
    }
}

struct SessionSlot {
    vm: VmKey,
    owner: SessionOwner,
    held: BTreeSet<Token>,
    events: Arc<EventQueue>,
    /// The secret that lets this session's VMM take it over again after a broker restart.
    key: u64,
    /// A resumed session: regions it held before the restart that it has not handed back
    /// yet (cleared when it says it is done).
    pending: BTreeSet<Token>,
    /// Resumed and not done handing back: if its connection drops now, the session goes
    /// back to waiting for a resume instead of ending (a hiccup during a resume must not
    /// lose it). Since when.
    resuming: Option<Instant>,
}

/// A session recorded before a restart that has not come back yet.
struct RecordedSession {
    key: u64,
    held: BTreeSet<Token>,
    /// Since when it is waiting (the restart, or its connection dropping mid-resume).
    since: Instant,
}

/// A region recorded before a restart that no holder has handed back yet.
struct RecordedRegion {
    size: u64,
    file: FileIdentity,
    owner: DevId,
    default_perms: Perms,
    grants: BTreeMap<DevId, Perms>,
}

/// What a restarted pool still waits for.
#[derive(Default)]
struct Recovery {
    sessions: BTreeMap<DevId, RecordedSession>,
    regions: HashMap<Token, RecordedRegion>,
}

#[derive(Default)]
struct PoolState {
    next_devid: u64,
    used: u64,
    regions: HashMap<Token, Region>,
    sessions: BTreeMap<DevId, SessionSlot>,
    vm_used: HashMap<VmKey, VmUse>,
    recovery: Recovery,
    /// Tokens recorded before a restart: never minted again, so a token is never handed
    /// to a different region.
    reserved: HashSet<Token>,
}

impl PoolState {
    /// The VM `devid`'s session is charged to.
    fn vm_of(&self, devid: DevId) -> Result<VmKey, PoolError> {
        Ok(self
            .sessions
            .get(&devid)
            .ok_or_else(session_closed)?
            .vm
            .clone())
    }

    fn notify_holders(&self, region: &Region, except: Option<DevId>, event: PoolEvent) {
        for holder in &region.holders {
            if Some(*holder) == except {
                continue;
            }
            if let Some(slot) = self.sessions.get(holder) {
                slot.events.push(event);
            }
        }
    }

    /// Charges one region of `bytes` to `vm`.
    fn charge(&mut self, vm: &VmKey, bytes: u64) {
        let used = self.vm_used.entry(vm.clone()).or_default();
        used.bytes += bytes;
        used.regions += 1;
    }

    /// Gives back one region of `bytes` charged to `vm`.
    fn refund(&mut self, vm: &VmKey, bytes: u64) {
        if let Some(used) = self.vm_used.get_mut(vm) {
            used.bytes = used.bytes.saturating_sub(bytes);
            used.regions = used.regions.saturating_sub(1);
            if used.regions == 0 {
                self.vm_used.remove(vm);
            }
        }
    }

    /// Drops `devid`'s hold on `token`; frees the region when it was the last holder.
    fn release(&mut self, devid: DevId, token: Token) {
        let Some(vm) = self.sessions.get_mut(&devid).map(|slot| {
            slot.held.remove(&token);
            slot.vm.clone()
        }) else {
            return;
        };
        let Some(region) = self.regions.get_mut(&token) else {
            return;
        };
        if !region.holders.remove(&devid) {
            return;
        }
        let had_doorbell = region.doorbells.remove(&devid).is_some();
        if had_doorbell {
            region.doorbell_generation += 1;
        }
        let size = region.memory.size();
        self.refund(&vm, size);
        let region = &self.regions[&token];
        if region.holders.is_empty() {
            // Dropping the region closes the pool's memfd; the pages go once every lease
            // handed out for it is closed as well.
            self.regions.remove(&token);
            self.used -= size;
        } else {
            self.notify_holders(region, None, PoolEvent::PeerDetached { token, peer: devid });
            if had_doorbell {
                self.notify_holders(region, None, PoolEvent::DoorbellsChanged { token });
            }
        }
    }

    /// Who may still hand `token` back: recorded sessions that have not resumed, and
    /// resumed ones that have not handed it back yet.
    fn claimants(&self) -> HashMap<Token, BTreeSet<DevId>> {
        let mut claimants: HashMap<Token, BTreeSet<DevId>> = HashMap::new();
        for (devid, recorded) in &self.recovery.sessions {
            for token in &recorded.held {
                claimants.entry(*token).or_default().insert(*devid);
            }
        }
        for (devid, slot) in &self.sessions {
            for token in &slot.pending {
                claimants.entry(*token).or_default().insert(*devid);
            }
        }
        claimants
    }

    /// Forgets recorded regions nobody can hand back any more.
    fn forget_unclaimed(&mut self) {
        let claimants = self.claimants();
        self.recovery
            .regions
            .retain(|token, _| claimants.contains_key(token));
    }

    /// `devid` held `token` before a restart and will not hand it back: the holders that
    /// did come back hear that it left.
    fn abandon(&self, devid: DevId, token: Token) {
        if let Some(region) = self.regions.get(&token) {
            self.notify_holders(region, None, PoolEvent::PeerDetached { token, peer: devid });
        }
    }

    /// A session whose connection dropped in the middle of its resume goes back to
    /// waiting for one: what it handed back so far is recorded again (a region nobody else
    /// holds goes back to the recorded ones), its doorbells are withdrawn.
    fn suspend(&mut self, devid: DevId) {
        let Some(slot) = self.sessions.remove(&devid) else {
            return;
        };
        for token in &slot.held {
            let Some(region) = self.regions.get_mut(token) else {
                continue;
            };
            region.holders.remove(&devid);
            let size = region.memory.size();
            if region.doorbells.remove(&devid).is_some() {
                region.doorbell_generation += 1;
                let region = &self.regions[token];
                self.notify_holders(region, None, PoolEvent::DoorbellsChanged { token: *token });
            }
            self.refund(&slot.vm, size);
            if self.regions[token].holders.is_empty()
                && let Some(region) = self.regions.remove(token)
            {
                self.used -= size;
                self.recovery.regions.insert(
                    *token,
                    RecordedRegion {
                        size,
                        file: region.file,
                        owner: region.owner,
                        default_perms: region.default_perms,
                        grants: region.grants,
                    },
                );
            }
        }
        self.recovery.sessions.insert(
            devid,
            RecordedSession {
                key: slot.key,
                held: slot.held.union(&slot.pending).copied().collect(),
                since: Instant::now(),
            },
        );
    }

    /// The region `devid` holds under `token`.
    fn held_region(&mut self, devid: DevId, token: Token) -> Result<&mut Region, PoolError> {
        let region = self
            .regions
            .get_mut(&token)
            .ok_or(PoolError::NoSuchRegion(token))?;
        if !region.holders.contains(&devid) {
            return Err(PoolError::NotHeld { token });
        }
        Ok(region)
    }
}

/// One page of the doorbells other holders published for a region.
#[derive(Debug)]
pub struct DoorbellPage {
    /// Changes whenever the region's doorbell set does.
    pub generation: u64,
    /// Doorbells of other holders in all.
    pub total: u32,
    /// Duplicates, from the requested index on, in devid order.
    pub doorbells: Vec<(DevId, OwnedFd)>,
}

/// Whether `fd` is an eventfd: a doorbell is written by peers (8 bytes, or by KVM), so
/// anything else (a pipe that blocks, a socket) is refused.
fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

/// An in-process region pool.
pub struct LocalPool {
    config: PoolConfig,
    gid: u64,
    state: Mutex<PoolState>,
}

impl std::fmt::Debug for LocalPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPool")
            .field("config", &self.config)
            .field("gid", &self.gid)
            .finish_non_exhaustive()
    }
}

impl LocalPool {
    /// A pool of `config.size` bytes. Fails with `InvalidSize` if the size is zero or not a
    /// multiple of the page size, or the per-VM limit is zero.
    pub fn new(config: PoolConfig) -> Result<Arc<Self>, PoolError> {
        let page = config.page_size();
        if config.size == 0 || !config.size.is_multiple_of(page) {
            return Err(PoolError::InvalidSize(config.size));
        }
        if let Some(limit) = config.per_vm_limit
            && limit == 0
        {
            return Err(PoolError::InvalidSize(limit));
        }
        let gid = match config.gid {
            Some(gid) => gid,
            None => random_nonzero_u64()?,
        };
        Ok(Arc::new(LocalPool {
            config,
            gid,
            state: Mutex::new(PoolState {
                next_devid: 1,
                ..PoolState::default()
            }),
        }))
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    pub fn gid(&self) -> u64 {
        self.gid
    }

    /// A new session with a fresh devid, charged as a VM of its own.
    pub fn session(self: &Arc<Self>) -> Result<Arc<dyn PoolSession>, PoolError> {
        Ok(self.open_session(SessionOwner::default())?)
    }

    /// A new session; sessions opened with the same `owner.vm` share the per-VM quotas.
    pub fn open_session(
        self: &Arc<Self>,
        owner: SessionOwner,
    ) -> Result<Arc<LocalSession>, PoolError> {
        let events = Arc::new(EventQueue::new().map_err(PoolError::create_memory)?);
        let mut state = self.lock();
        let devid = DevId(state.next_devid);
        // Devids are never reused, so a grant made to a device that went away can never
        // be inherited by a newcomer.
        state.next_devid += 1;
        let vm = owner.vm.clone().unwrap_or(VmKey::Session(devid));
        let key = random_nonzero_u64()?;
        state.sessions.insert(
            devid,
            SessionSlot {
                vm,
                owner,
                held: BTreeSet::new(),
                events: events.clone(),
                key,
                pending: BTreeSet::new(),
                resuming: None,
            },
        );
        Ok(Arc::new(LocalSession {
            pool: self.clone(),
            devid,
            events,
            closed: AtomicBool::new(false),
        }))
    }

    /// Takes a region away from every holder (operator action): they get `Revoked` and the
    /// region is freed. Memory already mapped stays mapped until each holder unmaps it.
    pub fn revoke(&self, token: Token) -> Result<(), PoolError> {
        let mut state = self.lock();
        let region = state
            .regions
            .remove(&token)
            .ok_or(PoolError::NoSuchRegion(token))?;
        let size = region.memory.size();
        state.used -= size;
        for holder in &region.holders {
            let Some(slot) = state.sessions.get_mut(holder) else {
                continue;
            };
            slot.held.remove(&token);
            slot.events.push(PoolEvent::Revoked { token });
            let vm = slot.vm.clone();
            state.refund(&vm, size);
        }
        Ok(())
    }

    /// A pool restarted from `snapshot` (see [`LocalPool::snapshot`]): the same gid, devids
    /// continuing where they stopped, and every recorded session and region waiting to be
    /// taken back ([`LocalPool::resume_session`], [`LocalSession::reregister`]). Recorded
    /// tokens are never minted again.
    pub fn restore(
        mut config: PoolConfig,
        snapshot: &PoolSnapshot,
    ) -> Result<Arc<Self>, PoolError> {
        config.gid = Some(snapshot.gid);
        let pool = Self::new(config)?;
        {
            let mut state = pool.lock();
            let highest = snapshot
                .sessions
                .iter()
                .map(|s| s.devid)
                .chain(
                    snapshot
                        .regions
                        .iter()
                        .flat_map(|r| r.holders.iter().copied()),
                )
                .max()
                .unwrap_or(0);
            state.next_devid = snapshot.next_devid.max(highest.saturating_add(1)).max(1);
            for region in &snapshot.regions {
                let token = Token(region.token);
                state.reserved.insert(token);
                state.recovery.regions.insert(
                    token,
                    RecordedRegion {
                        size: region.size,
                        file: region.file,
                        owner: DevId(region.owner),
                        default_perms: Perms(region.default_perms),
                        grants: region
                            .grants
                            .iter()
                            .map(|(d, p)| (DevId(*d), Perms(*p)))
                            .collect(),
                    },
                );
            }
            for session in &snapshot.sessions {
                let held = session
                    .held
                    .iter()
                    .map(|t| Token(*t))
                    .filter(|t| state.recovery.regions.contains_key(t))
                    .collect();
                state.recovery.sessions.insert(
                    DevId(session.devid),
                    RecordedSession {
                        key: session.key,
                        held,
                        since: Instant::now(),
                    },
                );
            }
            state.forget_unclaimed();
        }
        Ok(pool)
    }

    /// Everything a restarted pool needs (see [`crate::state`]), including what a restarted
    /// pool still waits for, so that a second restart loses nothing either.
    pub fn snapshot(&self) -> PoolSnapshot {
        let state = self.lock();
        let claimants = state.claimants();
        let mut sessions: Vec<SessionRecord> = state
            .sessions
            .iter()
            .map(|(devid, slot)| SessionRecord {
                devid: devid.0,
                key: slot.key,
                held: slot.held.union(&slot.pending).map(|t| t.0).collect(),
            })
            .chain(
                state
                    .recovery
                    .sessions
                    .iter()
                    .map(|(devid, recorded)| SessionRecord {
                        devid: devid.0,
                        key: recorded.key,
                        held: recorded.held.iter().map(|t| t.0).collect(),
                    }),
            )
            .collect();
        sessions.sort_by_key(|s| s.devid);
        let holders = |token: &Token, live: Option<&BTreeSet<DevId>>| -> Vec<u64> {
            let mut all: BTreeSet<DevId> = live.cloned().unwrap_or_default();
            if let Some(waiting) = claimants.get(token) {
                all.extend(waiting);
            }
            all.into_iter().map(|d| d.0).collect()
        };
        let grants =
            |grants: &BTreeMap<DevId, Perms>| grants.iter().map(|(d, p)| (d.0, p.0)).collect();
        let mut regions: Vec<RegionRecord> = state
            .regions
            .iter()
            .map(|(token, region)| RegionRecord {
                token: token.0,
                size: region.memory.size(),
                file: region.file,
                owner: region.owner.0,
                default_perms: region.default_perms.0,
                grants: grants(&region.grants),
                holders: holders(token, Some(&region.holders)),
            })
            .chain(
                state
                    .recovery
                    .regions
                    .iter()
                    .map(|(token, recorded)| RegionRecord {
                        token: token.0,
                        size: recorded.size,
                        file: recorded.file,
                        owner: recorded.owner.0,
                        default_perms: recorded.default_perms.0,
                        grants: grants(&recorded.grants),
                        holders: holders(token, None),
                    }),
            )
            .collect();
        regions.sort_by_key(|r| r.token);
        PoolSnapshot {
            format: STATE_FORMAT,
            gid: self.gid,
            config: ConfigRecord::of(&self.config),
            next_devid: state.next_devid,
            sessions,
            regions,
        }
    }

    /// Whether sessions recorded before a restart may still come back.
    pub fn recovering(&self) -> bool {
        !self.lock().recovery.sessions.is_empty()
    }

    /// Takes back the recorded session `devid` after a restart, if `key` is its key: the
    /// same devid, and the regions it held waiting for [`LocalSession::reregister`]. A
    /// session can be taken back once; an unknown devid and a wrong key are refused alike.
    pub fn resume_session(
        self: &Arc<Self>,
        owner: SessionOwner,
        devid: DevId,
        key: u64,
    ) -> Result<Arc<LocalSession>, PoolError> {
        let events = Arc::new(EventQueue::new().map_err(PoolError::create_memory)?);
        let mut state = self.lock();
        let known = state
            .recovery
            .sessions
            .get(&devid)
            .is_some_and(|recorded| recorded.key == key);
        let Some(recorded) = known
            .then(|| state.recovery.sessions.remove(&devid))
            .flatten()
        else {
            return Err(PoolError::Protocol(format!(
                "Resume refused: no session {} waiting to be resumed with that key",
                devid.0
            )));
        };
        let vm = owner.vm.clone().unwrap_or(VmKey::Session(devid));
        state.sessions.insert(
            devid,
            SessionSlot {
                vm,
                owner,
                held: BTreeSet::new(),
                events: events.clone(),
                key,
                pending: recorded.held,
                resuming: Some(Instant::now()),
            },
        );
        Ok(Arc::new(LocalSession {
            pool: self.clone(),
            devid,
            events,
            closed: AtomicBool::new(false),
        }))
    }

    /// A resumed session hands back region `token` with `fd`, a lease it got before the
    /// restart. Accepted only if the session held the region then and has not handed it
    /// back yet, and `fd` is that region's memfd: the same file (device and inode as
    /// recorded), of the recorded size, owned by this process's uid and sealed as the pool
    /// seals. The first holder back restores the region (memory, owner, grants); a
    /// writable lease replaces a read-only one the pool had so far.
    fn reregister(&self, devid: DevId, token: Token, fd: OwnedFd) -> Result<(), PoolError> {
        use rustix::fs::{OFlags, SealFlags};
        let refuse =
            |why: &str| PoolError::Protocol(format!("Re-registration of {token} refused: {why}"));
        let stat = rustix::fs::fstat(&fd).map_err(|_| refuse("not a file"))?;
        let file = FileIdentity {
            dev: stat.st_dev,
            ino: stat.st_ino,
        };
        let size = stat.st_size as u64;
        if stat.st_uid != rustix::process::geteuid().as_raw() {
            return Err(refuse("the file was not made by the pool"));
        }
        let seals = rustix::fs::fcntl_get_seals(&fd).map_err(|_| refuse("not a sealed memfd"))?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL) {
            return Err(refuse("not sealed as region memory is"));
        }
        let writable = rustix::fs::fcntl_getfl(&fd)
            .map_err(|_| refuse("unreadable descriptor flags"))?
            & OFlags::RWMODE
            == OFlags::RDWR;
        let mut state = self.lock();
        let vm = state.vm_of(devid)?;
        let pending = state
            .sessions
            .get(&devid)
            .is_some_and(|slot| slot.pending.contains(&token));
        if !pending {
            return Err(PoolError::NotHeld { token });
        }
        let matches = match (
            state.regions.get(&token),
            state.recovery.regions.get(&token),
        ) {
            (Some(region), _) => region.file == file && region.memory.size() == size,
            (None, Some(recorded)) => recorded.file == file && recorded.size == size,
            (None, None) => return Err(PoolError::NoSuchRegion(token)),
        };
        if !matches {
            log::warn!(
                "Device {} handed back a descriptor for {token} that is not its memory ({file:?}, {size} bytes)",
                devid.0
            );
            return Err(refuse("the descriptor is not the region's memory"));
        }
        if let Some(region) = state.regions.get_mut(&token) {
            if writable && !region.memory.writable() {
                region.memory = RegionMemory::adopt(fd, size, true);
            }
            region.holders.insert(devid);
        } else if let Some(recorded) = state.recovery.regions.remove(&token) {
            state.regions.insert(
                token,
                Region {
                    memory: RegionMemory::adopt(fd, size, writable),
                    file,
                    owner: recorded.owner,
                    default_perms: recorded.default_perms,
                    grants: recorded.grants,
                    holders: BTreeSet::from([devid]),
                    doorbells: BTreeMap::new(),
                    doorbell_generation: 0,
                },
            );
            state.used += size;
        }
        state.charge(&vm, size);
        if let Some(slot) = state.sessions.get_mut(&devid) {
            slot.pending.remove(&token);
            slot.held.insert(token);
        }
        Ok(())
    }

    /// A resumed session handed back all it has: what it did not hand back it no longer
    /// holds (the other holders hear it left).
    fn finish_resume(&self, devid: DevId) {
        let mut state = self.lock();
        let pending = match state.sessions.get_mut(&devid) {
            Some(slot) => {
                slot.resuming = None;
                std::mem::take(&mut slot.pending)
            }
            None => return,
        };
        for token in pending {
            state.abandon(devid, token);
        }
        state.forget_unclaimed();
    }

    /// Ends the grace period of sessions that have waited `grace` or longer: those that
    /// did not come back are gone, with their holds and grants; those that came back and
    /// did not finish handing back keep what they handed back; regions nobody handed back
    /// are forgotten (their tokens stay reserved). Returns the devids given up.
    pub fn expire_recovery(&self, grace: Duration) -> Vec<DevId> {
        let mut state = self.lock();
        let expired: Vec<DevId> = state
            .recovery
            .sessions
            .iter()
            .filter(|(_, recorded)| recorded.since.elapsed() >= grace)
            .map(|(devid, _)| *devid)
            .collect();
        let gone: Vec<(DevId, RecordedSession)> = expired
            .into_iter()
            .filter_map(|devid| Some((devid, state.recovery.sessions.remove(&devid)?)))
            .collect();
        for (devid, recorded) in &gone {
            for token in &recorded.held {
                state.abandon(*devid, *token);
            }
            for region in state.regions.values_mut() {
                region.grants.remove(devid);
            }
        }
        let unfinished: Vec<(DevId, BTreeSet<Token>)> = state
            .sessions
            .iter_mut()
            .filter(|(_, slot)| slot.resuming.is_some_and(|since| since.elapsed() >= grace))
            .map(|(devid, slot)| {
                slot.resuming = None;
                (*devid, std::mem::take(&mut slot.pending))
            })
            .filter(|(_, pending)| !pending.is_empty())
            .collect();
        for (devid, pending) in unfinished {
            for token in pending {
                state.abandon(devid, token);
            }
        }
        state.forget_unclaimed();
        gone.into_iter().map(|(devid, _)| devid).collect()
    }

    /// A snapshot of every region and session.
    pub fn status(&self) -> PoolStatus {
        let state = self.lock();
        let mut regions: Vec<RegionStatus> = state
            .regions
            .iter()
            .map(|(token, region)| RegionStatus {
                token: token.0,
                size: region.memory.size(),
                owner: region.owner.0,
                default_perms: region.default_perms.0,
                grants: region.grants.iter().map(|(d, p)| (d.0, p.0)).collect(),
                holders: region.holders.iter().map(|d| d.0).collect(),
                doorbells: region.doorbells.keys().map(|d| d.0).collect(),
            })
            .collect();
        regions.sort_by_key(|r| r.token);
        PoolStatus {
            protocol_version: 0,
            gid: self.gid,
            size: self.config.size,
            used: state.used,
            per_vm_limit: self.config.per_vm_limit,
            per_vm_regions: self.config.per_vm_regions,
            hugepages: self.config.hugepages,
            sessions: state
                .sessions
                .iter()
                .map(|(devid, slot)| {
                    let used = state.vm_used.get(&slot.vm).copied().unwrap_or_default();
                    SessionStatus {
                        devid: devid.0,
                        pid: slot.owner.pid,
                        vm_used: used.bytes,
                        held: slot.held.iter().map(|t| t.0).collect(),
                        uid: slot.owner.uid,
                        vm: Some(slot.vm.to_string()),
                        vm_regions: Some(used.regions),
                        read_only_enforced: slot.owner.read_only_enforced,
                    }
                })
                .collect(),
            regions,
            waiting_sessions: state.recovery.sessions.keys().map(|d| d.0).collect(),
            waiting_regions: {
                let mut tokens: Vec<u64> = state.recovery.regions.keys().map(|t| t.0).collect();
                tokens.sort_unstable();
                tokens
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves the state consistent (every mutation is
        // completed before anything that can panic), so keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `vm` may hold one more region of `size` bytes.
    fn check_quota(&self, state: &PoolState, vm: &VmKey, size: u64) -> Result<(), PoolError> {
        let used = state.vm_used.get(vm).copied().unwrap_or_default();
        if let Some(limit) = self.config.per_vm_regions
            && used.regions >= limit
        {
            return Err(PoolError::RegionQuotaExceeded { limit });
        }
        if let Some(limit) = self.config.per_vm_limit {
            let used = used.bytes;
            if used.checked_add(size).is_none_or(|total| total > limit) {
                return Err(PoolError::QuotaExceeded {
                    limit,
                    used,
                    requested: size,
                });
            }
        }
        Ok(())
    }

    fn alloc(&self, devid: DevId, size: u64) -> Result<RegionLease, PoolError> {
        let page = self.config.page_size();
        if size == 0 || !size.is_multiple_of(page) {
            return Err(PoolError::InvalidSize(size));
        }
        let mut state = self.lock();
        let vm = state.vm_of(devid)?;
        self.check_quota(&state, &vm, size)?;
        // Regions handed back after a restart are taken whatever the (possibly smaller) size
        // the pool was restarted with, so `used` may exceed it.
        let available = self.config.size.saturating_sub(state.used);
        if size > available {
            return Err(PoolError::PoolExhausted {
                requested: size,
                available,
            });
        }
        let token = mint_token(|t| state.regions.contains_key(&t) || state.reserved.contains(&t))?;
        let memory = RegionMemory::create(&format!("ism-{token}"), size, self.config.hugepages)
            .map_err(|e| PoolError::create_memory(e.into_io()))?;
        let file = memory.identity().map_err(PoolError::create_memory)?;
        let fd = memory
            .read_write_fd()
            .map_err(|e| PoolError::create_memory(e.into_io()))?;
        state.regions.insert(
            token,
            Region {
                memory,
                file,
                owner: devid,
                default_perms: Perms::NONE,
                grants: BTreeMap::new(),
                holders: BTreeSet::from([devid]),
                doorbells: BTreeMap::new(),
                doorbell_generation: 0,
            },
        );
        state.used += size;
        state.charge(&vm, size);
        if let Some(slot) = state.sessions.get_mut(&devid) {
            slot.held.insert(token);
        }
        Ok(RegionLease {
            token,
            size,
            fd,
            writable: true,
        })
    }

    fn attach(&self, devid: DevId, token: Token, want: Perms) -> Result<RegionLease, PoolError> {
        let mut state = self.lock();
        let vm = state.vm_of(devid)?;
        let region = state
            .regions
            .get(&token)
            .ok_or(PoolError::NoSuchRegion(token))?;
        if region.holders.contains(&devid) {
            return Err(PoolError::AlreadyHeld(token));
        }
        let granted = region.effective_perms(devid);
        let writable = check_attach(token, granted, want)?;
        let size = region.memory.size();
        self.check_quota(&state, &vm, size)?;
        let fd = if writable {
            region.memory.read_write_fd()
        } else {
            region.memory.read_only_fd()
        }
        .map_err(|e| PoolError::create_memory(e.into_io()))?;
        state.charge(&vm, size);
        if let Some(slot) = state.sessions.get_mut(&devid) {
            slot.held.insert(token);
        }
        let region = state
            .regions
            .get_mut(&token)
            .expect("region looked up above");
        region.holders.insert(devid);
        let region = &state.regions[&token];
        state.notify_holders(
            region,
            Some(devid),
            PoolEvent::PeerAttached { token, peer: devid },
        );
        Ok(RegionLease {
            token,
            size,
            fd,
            writable,
        })
    }

    fn detach(&self, devid: DevId, token: Token) -> Result<(), PoolError> {
        let mut state = self.lock();
        let region = state
            .regions
            .get(&token)
            .ok_or(PoolError::NoSuchRegion(token))?;
        if !region.holders.contains(&devid) {
            return Err(PoolError::NotHeld { token });
        }
        state.release(devid, token);
        Ok(())
    }

    fn grant(
        &self,
        devid: DevId,
        token: Token,
        target: GrantTarget,
        perms: Perms,
    ) -> Result<(), PoolError> {
        let mut state = self.lock();
        let bits = Perms(perms.0 & OWNER_PERMS.0);
        let clean = perms.contains(Perms::CLEAN_DEFAULT);
        // A grant may only name a device that is connected now. Devids are never reused,
        // so a grant to one never issued yet would be inherited by whoever gets it next,
        // and one to a departed device could never be used (its grants are dropped when it
        // leaves). Removing a grant (CLEAN_DEFAULT) is allowed for any devid.
        let unknown_peer = match target {
            GrantTarget::Device(peer) if !clean => {
                !state.sessions.contains_key(&peer) && !state.recovery.sessions.contains_key(&peer)
            }
            _ => false,
        };
        let region = state
            .regions
            .get_mut(&token)
            .ok_or(PoolError::NoSuchRegion(token))?;
        if !region.holders.contains(&devid) {
            return Err(PoolError::NotHeld { token });
        }
        if !region.effective_perms(devid).contains(Perms::MANAGE) {
            return Err(PoolError::PermissionDenied {
                token,
                missing: MissingPerm::Manage,
            });
        }
        if let (true, GrantTarget::Device(peer)) = (unknown_peer, target) {
            return Err(PoolError::UnknownDevice(peer));
        }
        // Bits this pool does not know are ignored, so newer drivers still work.
        match target {
            GrantTarget::Default if clean => region.default_perms = Perms::NONE,
            GrantTarget::Default => region.default_perms = bits,
            // CLEAN_DEFAULT on a device grant drops the override: the device falls back to
            // the default.
            GrantTarget::Device(peer) if clean => {
                region.grants.remove(&peer);
            }
            GrantTarget::Device(peer) => {
                region.grants.insert(peer, bits);
            }
        }
        let region = &state.regions[&token];
        state.notify_holders(region, Some(devid), PoolEvent::Updated { token });
        Ok(())
    }

    fn publish_doorbell(
        &self,
        devid: DevId,
        token: Token,
        doorbell: BorrowedFd<'_>,
    ) -> Result<(), PoolError> {
        if !is_eventfd(doorbell) {
            return Err(PoolError::NotAnEventfd { token });
        }
        let copy = doorbell
            .try_clone_to_owned()
            .map_err(PoolError::dup_doorbell)?;
        let mut state = self.lock();
        let region = state.held_region(devid, token)?;
        region.doorbells.insert(devid, copy);
        region.doorbell_generation += 1;
        let region = &state.regions[&token];
        state.notify_holders(region, Some(devid), PoolEvent::DoorbellsChanged { token });
        Ok(())
    }

    fn withdraw_doorbell(&self, devid: DevId, token: Token) -> Result<(), PoolError> {
        let mut state = self.lock();
        let region = state.held_region(devid, token)?;
        if region.doorbells.remove(&devid).is_none() {
            return Ok(());
        }
        region.doorbell_generation += 1;
        let region = &state.regions[&token];
        state.notify_holders(region, Some(devid), PoolEvent::DoorbellsChanged { token });
        Ok(())
    }

    fn doorbell_page(
        &self,
        devid: DevId,
        token: Token,
        start: usize,
        max: usize,
    ) -> Result<DoorbellPage, PoolError> {
        let mut state = self.lock();
        let region = state.held_region(devid, token)?;
        let others = region.doorbells.iter().filter(|(peer, _)| **peer != devid);
        let total = others.clone().count();
        let doorbells = others
            .skip(start)
            .take(max)
            .map(|(peer, fd)| Ok((*peer, fd.try_clone().map_err(PoolError::dup_doorbell)?)))
            .collect::<Result<Vec<_>, PoolError>>()?;
        Ok(DoorbellPage {
            generation: region.doorbell_generation,
            total: u32::try_from(total).unwrap_or(u32::MAX),
            doorbells,
        })
    }

    fn close_session(&self, devid: DevId) {
        let mut state = self.lock();
        if state
            .sessions
            .get(&devid)
            .is_some_and(|slot| slot.resuming.is_some())
        {
            log::warn!(
                "Device {} went away in the middle of its resume; it may resume again",
                devid.0
            );
            state.suspend(devid);
            return;
        }
        let held: Vec<Token> = match state.sessions.get(&devid) {
            Some(slot) => slot.held.iter().copied().collect(),
            None => return,
        };
        for token in held {
            state.release(devid, token);
        }
        if let Some(slot) = state.sessions.remove(&devid)
            && !slot.pending.is_empty()
        {
            for token in &slot.pending {
                state.abandon(devid, *token);
            }
            state.forget_unclaimed();
        }
        // Grants naming the departed device can never be used again (devids are never
        // reused); drop them so that grant tables stay bounded.
        for region in state.regions.values_mut() {
            region.grants.remove(&devid);
        }
    }
}

fn session_closed() -> PoolError {
    PoolError::Protocol("Session is closed".to_string())
}

/// Checks an attach against the granted bits; returns whether the lease is writable.
///
/// Any mapping needs READ (a file cannot be mapped write-only); WRITE makes it writable.
fn check_attach(token: Token, granted: Perms, want: Perms) -> Result<bool, PoolError> {
    let denied = |missing| PoolError::PermissionDenied { token, missing };
    if !granted.contains(Perms::ATTACH) {
        return Err(denied(MissingPerm::Attach));
    }
    if !granted.contains(Perms::READ) {
        return Err(denied(MissingPerm::Read));
    }
    if want.contains(Perms::WRITE) && !granted.contains(Perms::WRITE) {
        return Err(denied(MissingPerm::Write));
    }
    let asked_any = want.0 & (Perms::READ.0 | Perms::WRITE.0) != 0;
    Ok(if asked_any {
        want.contains(Perms::WRITE)
    } else {
        granted.contains(Perms::WRITE)
    })
}

/// One device's session of a [`LocalPool`]. Closing it (dropping it, or [`close`]) drops
/// every region it holds.
///
/// [`close`]: LocalSession::close
pub struct LocalSession {
    pool: Arc<LocalPool>,
    devid: DevId,
    events: Arc<EventQueue>,
    closed: AtomicBool,
}

impl std::fmt::Debug for LocalSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSession")
            .field("devid", &self.devid)
            .finish_non_exhaustive()
    }
}

impl LocalSession {
    pub fn devid(&self) -> DevId {
        self.devid
    }

    pub fn pool(&self) -> &Arc<LocalPool> {
        &self.pool
    }

    /// Up to `max` doorbells of the other holders of `token`, from index `start` on (the
    /// broker's paged PEER_DOORBELLS).
    pub fn peer_doorbell_page(
        &self,
        token: Token,
        start: usize,
        max: usize,
    ) -> Result<DoorbellPage, PoolError> {
        self.pool.doorbell_page(self.devid, token, start, max)
    }

    /// The event queue's eventfd, for poll.
    /// The secret that lets this session be resumed after a broker restart.
    pub fn resume_key(&self) -> u64 {
        self.pool
            .lock()
            .sessions
            .get(&self.devid)
            .map_or(0, |slot| slot.key)
    }

    /// Hands back a region this session held before a broker restart (see
    /// [`LocalPool::resume_session`]).
    pub fn reregister(&self, token: Token, fd: OwnedFd) -> Result<(), PoolError> {
        self.pool.reregister(self.devid, token, fd)
    }

    /// This resumed session has handed back everything it still holds.
    pub fn finish_resume(&self) {
        self.pool.finish_resume(self.devid)
    }

    pub fn event_fd_borrowed(&self) -> std::os::fd::BorrowedFd<'_> {
        self.events.fd()
    }

    /// Releases every region this session holds; later requests fail.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.pool.close_session(self.devid);
        }
    }
}

impl Drop for LocalSession {
    fn drop(&mut self) {
        self.close();
    }
}

impl PoolSession for LocalSession {
    fn info(&self) -> SessionInfo {
        SessionInfo {
            gid: self.pool.gid,
            devid: self.devid,
        }
    }

    fn alloc(&self, size: u64) -> Result<RegionLease, PoolError> {
        self.pool.alloc(self.devid, size)
    }

    fn attach(&self, token: Token, want: Perms) -> Result<RegionLease, PoolError> {
        self.pool.attach(self.devid, token, want)
    }

    fn detach(&self, token: Token) -> Result<(), PoolError> {
        self.pool.detach(self.devid, token)
    }

    fn grant(&self, token: Token, target: GrantTarget, perms: Perms) -> Result<(), PoolError> {
        self.pool.grant(self.devid, token, target, perms)
    }

    fn publish_doorbell(&self, token: Token, doorbell: BorrowedFd<'_>) -> Result<(), PoolError> {
        self.pool.publish_doorbell(self.devid, token, doorbell)
    }

    fn withdraw_doorbell(&self, token: Token) -> Result<(), PoolError> {
        self.pool.withdraw_doorbell(self.devid, token)
    }

    fn peer_doorbells(&self, token: Token) -> Result<Vec<(DevId, OwnedFd)>, PoolError> {
        Ok(self
            .pool
            .doorbell_page(self.devid, token, 0, usize::MAX)?
            .doorbells)
    }

    fn take_events(&self) -> Vec<PoolEvent> {
        self.events.take()
    }

    fn status(&self) -> Option<PoolStatus> {
        Some(self.pool.status())
    }

    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.events.raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE;
    use std::os::fd::AsFd;

    fn pool(size: u64, per_vm_limit: Option<u64>) -> Arc<LocalPool> {
        LocalPool::new(PoolConfig {
            size,
            per_vm_limit,
            ..PoolConfig::default()
        })
        .unwrap()
    }

    fn write_at(lease: &RegionLease, offset: u64, data: &[u8]) {
        assert_eq!(
            rustix::io::pwrite(&lease.fd, data, offset).unwrap(),
            data.len()
        );
    }

    fn read_at(lease: &RegionLease, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        assert_eq!(rustix::io::pread(&lease.fd, &mut buf, offset).unwrap(), len);
        buf
    }

    #[test]
    fn test_sessions_share_gid_and_get_distinct_nonzero_devids() {
        let pool = pool(16 * PAGE_SIZE, None);
        let a = pool.session().unwrap();
        let b = pool.session().unwrap();
        assert_eq!(a.info().gid, pool.gid());
        assert_eq!(b.info().gid, pool.gid());
        assert_ne!(a.info().devid, b.info().devid);
        assert_ne!(a.info().devid.0, 0);
        assert_ne!(pool.gid(), 0);
    }

    #[test]
    fn test_new_rejects_bad_sizes() {
        assert!(matches!(
            LocalPool::new(PoolConfig {
                size: 0,
                ..PoolConfig::default()
            }),
            Err(PoolError::InvalidSize(0))
        ));
        assert!(matches!(
            LocalPool::new(PoolConfig {
                size: 4097,
                ..PoolConfig::default()
            }),
            Err(PoolError::InvalidSize(4097))
        ));
        assert!(
            LocalPool::new(PoolConfig {
                size: 4 << 20,
                hugepages: true,
                per_vm_limit: None,
                ..PoolConfig::default()
            })
            .is_ok()
        );
        assert!(matches!(
            LocalPool::new(PoolConfig {
                size: 4096,
                per_vm_limit: Some(0),
                ..PoolConfig::default()
            }),
            Err(PoolError::InvalidSize(0))
        ));
    }

    #[test]
    fn test_alloc_gives_writable_zeroed_lease_with_random_token() {
        let pool = pool(16 * PAGE_SIZE, None);
        let a = pool.session().unwrap();
        let lease = a.alloc(2 * PAGE_SIZE).unwrap();
        assert!(lease.writable);
        assert_eq!(lease.size, 2 * PAGE_SIZE);
        assert_ne!(lease.token.0, 0);
        assert_eq!(read_at(&lease, PAGE_SIZE, 4), vec![0; 4]);
        write_at(&lease, 0, b"hi");
        assert!(matches!(a.alloc(0), Err(PoolError::InvalidSize(0))));
        assert!(matches!(a.alloc(100), Err(PoolError::InvalidSize(100))));
    }

    #[test]
    fn test_attach_needs_grant_and_sees_same_memory() {
        let pool = pool(16 * PAGE_SIZE, None);
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let lease = owner.alloc(PAGE_SIZE).unwrap();
        let token = lease.token;
        assert!(matches!(
            peer.attach(token, Perms::NONE),
            Err(PoolError::PermissionDenied {
                missing: MissingPerm::Attach,
                ..
            })
        ));
        owner
            .grant(
                token,
                GrantTarget::Device(peer.info().devid),
                Perms::ATTACH.union(Perms::READ).union(Perms::WRITE),
            )
            .unwrap();
        let peer_lease = peer.attach(token, Perms::NONE).unwrap();
        assert!(peer_lease.writable);
        write_at(&lease, 10, b"from owner");
        assert_eq!(read_at(&peer_lease, 10, 10), b"from owner");
        write_at(&peer_lease, 100, b"from peer");
        assert_eq!(read_at(&lease, 100, 9), b"from peer");
        assert!(matches!(
            peer.attach(token, Perms::NONE),
            Err(PoolError::AlreadyHeld(_))
        ));
        assert!(matches!(
            peer.attach(Token(12345), Perms::NONE),
            Err(PoolError::NoSuchRegion(Token(12345)))
        ));
    }

    #[test]
    fn test_read_only_grant_gives_read_only_lease() {
        let pool = pool(16 * PAGE_SIZE, None);
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let token = owner.alloc(PAGE_SIZE).unwrap().token;
        owner
            .grant(
                token,
                GrantTarget::Default,
                Perms::ATTACH.union(Perms::READ),
            )
            .unwrap();
        assert!(matches!(
            peer.attach(token, Perms::READ.union(Perms::WRITE)),
            Err(PoolError::PermissionDenied {
                missing: MissingPerm::Write,
                ..
            })
        ));
        let lease = peer.attach(token, Perms::NONE).unwrap();
        assert!(!lease.writable);
        assert!(rustix::io::pwrite(&lease.fd, b"x", 0).is_err());
    }

    #[test]
    fn test_attach_without_read_is_refused() {
        let pool = pool(16 * PAGE_SIZE, None);
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let token = owner.alloc(PAGE_SIZE).unwrap().token;
        owner
            .grant(token, GrantTarget::Default, Perms::ATTACH)
            .unwrap();
        assert!(matches!(
            peer.attach(token, Perms::NONE),
            Err(PoolError::PermissionDenied {
                missing: MissingPerm::Read,
                ..
            })
        ));
    }

    #[test]
    fn test_writable_grant_can_still_attach_read_only() {
        let pool = pool(16 * PAGE_SIZE, None);
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let token = owner.alloc(PAGE_SIZE).unwrap().token;
        owner
            .grant(
                token,
                GrantTarget::Default,
                Perms(Perms::ATTACH.0 | Perms::READ.0 | Perms::WRITE.0),
            )
            .unwrap();
        let lease = peer.attach(token, Perms::READ).unwrap();
        assert!(!lease.writable);
    }

    #[test]
    fn test_device_grant_overrides_default_and_clean_default_clears() {
        let pool = pool(16 * PAGE_SIZE, None);
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let other = pool.session().unwrap();
        let token = owner.alloc(PAGE_SIZE).unwrap().token;
        let rw = Perms(Perms::ATTACH.0 | Perms::READ.0 | Perms::WRITE.0);
        owner.grant(token, GrantTarget::Default, rw).unwrap();
        owner
            .grant(token, GrantTarget::Device(peer.info().devid), Perms::NONE)
            .unwrap();
        assert!(matches!(
            peer.attach(token, Perms::NONE),
            Err(PoolError::PermissionDenied {
                missing: MissingPerm::Attach,
                ..
            })
        ));
        // Dropping the override falls back to the default.
        owner
            .grant(
                token,
                GrantTarget::Device(peer.info().devid),
                Perms::CLEAN_DEFAULT,
            )
            .unwrap();
        assert!(peer.attach(token, Perms::NONE).unwrap().writable);
        // Clearing the default locks everyone else out.
        owner
            .grant(token, GrantTarget::Default, Perms::CLEAN_DEFAULT)
            .unwrap();
        assert!(matches!(
            other.attach(token, Perms::NONE),
            Err(PoolError::PermissionDenied {
                missing: MissingPerm::Attach,
                ..
            })
        ));
    }

    #[test]
    fn test_grant_needs_manage_and_holding() {
        let pool = pool(16 * PAGE_SIZE, None);
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let third = pool.session().unwrap();
        let token = owner.alloc(PAGE_SIZE).unwrap().token;
        let all = Perms(Perms::ATTACH.0 | Perms::READ.0 | Perms::WRITE.0);
        assert!(matches!(
            peer.grant(token, GrantTarget::Default, all),
            Err(PoolError::NotHeld { .. })
        ));
        owner.grant(token, GrantTarget::Default, all).unwrap();
        peer.attach(token, Perms::NONE).unwrap();
        assert!(matches!(
            peer.grant(token, GrantTarget::Device(third.info().devid), all),
            Err(PoolError::PermissionDenied {
                missing: MissingPerm::Manage,
                ..
            })
        ));
        owner
            .grant(
                token,
                GrantTarget::Device(peer.info().devid),
                all.union(Perms::MANAGE),
            )
            .unwrap();
        peer.grant(token, GrantTarget::Default, Perms::NONE)
            .unwrap();
        assert!(third.attach(token, Perms::NONE).is_err());
        // The owner keeps every permission whatever the grants say.
        owner
            .grant(token, GrantTarget::Device(owner.info().devid), Perms::NONE)
            .unwrap();
        owner
            .grant(token, GrantTarget::Default, Perms::NONE)
            .unwrap();
    }

    #[test]
    fn test_grant_to_a_device_not_connected_is_refused() {
        let pool = pool(16 * PAGE_SIZE, None);
        let owner = pool.session().unwrap();
        let token = owner.alloc(PAGE_SIZE).unwrap().token;
        let rw = Perms(Perms::ATTACH.0 | Perms::READ.0 | Perms::WRITE.0);
        let next = DevId(owner.info().devid.0 + 1);
        assert!(matches!(
            owner.grant(token, GrantTarget::Device(next), rw),
            Err(PoolError::UnknownDevice(d)) if d == next
        ));
        assert!(matches!(
            owner.grant(token, GrantTarget::Device(DevId(0)), rw),
            Err(PoolError::UnknownDevice(_))
        ));
        // The device that gets that devid inherits nothing.
        let newcomer = pool.session().unwrap();
        assert_eq!(newcomer.info().devid, next);
        assert!(matches!(
            newcomer.attach(token, Perms::NONE),
            Err(PoolError::PermissionDenied {
                missing: MissingPerm::Attach,
                ..
            })
        ));
        // A grant to a connected device is dropped when it leaves, and it cannot be
        // renewed afterwards; removing one is always allowed.
        owner.grant(token, GrantTarget::Device(next), rw).unwrap();
        assert_eq!(pool.status().regions[0].grants, [(next.0, rw.0)]);
        drop(newcomer);
        assert!(pool.status().regions[0].grants.is_empty());
        assert!(matches!(
            owner.grant(token, GrantTarget::Device(next), rw),
            Err(PoolError::UnknownDevice(_))
        ));
        owner
            .grant(token, GrantTarget::Device(next), Perms::CLEAN_DEFAULT)
            .unwrap();
    }

    #[test]
    fn test_region_count_quota_is_per_vm_and_refunded() {
        let pool = LocalPool::new(PoolConfig {
            size: 64 * PAGE_SIZE,
            per_vm_regions: Some(2),
            ..PoolConfig::default()
        })
        .unwrap();
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let a = owner.alloc(PAGE_SIZE).unwrap().token;
        owner.alloc(PAGE_SIZE).unwrap();
        assert!(matches!(
            owner.alloc(PAGE_SIZE),
            Err(PoolError::RegionQuotaExceeded { limit: 2 })
        ));
        owner
            .grant(
                a,
                GrantTarget::Default,
                Perms(Perms::ATTACH.0 | Perms::READ.0),
            )
            .unwrap();
        peer.alloc(PAGE_SIZE).unwrap();
        peer.attach(a, Perms::NONE).unwrap();
        assert!(matches!(
            peer.alloc(PAGE_SIZE),
            Err(PoolError::RegionQuotaExceeded { limit: 2 })
        ));
        owner.detach(a).unwrap();
        owner.alloc(PAGE_SIZE).unwrap();
        let status = pool.status();
        assert_eq!(status.per_vm_regions, Some(2));
        assert!(status.sessions.iter().all(|s| s.vm_regions == Some(2)));
    }

    #[test]
    fn test_events_reach_other_holders() {
        let pool = pool(16 * PAGE_SIZE, None);
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let token = owner.alloc(PAGE_SIZE).unwrap().token;
        owner
            .grant(
                token,
                GrantTarget::Default,
                Perms(Perms::ATTACH.0 | Perms::READ.0),
            )
            .unwrap();
        assert!(owner.take_events().is_empty());
        peer.attach(token, Perms::NONE).unwrap();
        let peer_id = peer.info().devid;
        assert_eq!(
            owner.take_events(),
            vec![PoolEvent::PeerAttached {
                token,
                peer: peer_id
            }]
        );
        assert!(peer.take_events().is_empty());
        owner
            .grant(token, GrantTarget::Default, Perms::NONE)
            .unwrap();
        assert_eq!(peer.take_events(), vec![PoolEvent::Updated { token }]);
        assert!(owner.take_events().is_empty());
        peer.detach(token).unwrap();
        assert_eq!(
            owner.take_events(),
            vec![PoolEvent::PeerDetached {
                token,
                peer: peer_id
            }]
        );
    }

    #[test]
    fn test_dropped_session_detaches_and_region_survives() {
        let pool = pool(16 * PAGE_SIZE, None);
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let lease = owner.alloc(PAGE_SIZE).unwrap();
        let token = lease.token;
        owner
            .grant(
                token,
                GrantTarget::Default,
                Perms(Perms::ATTACH.0 | Perms::READ.0 | Perms::WRITE.0),
            )
            .unwrap();
        let peer_lease = peer.attach(token, Perms::NONE).unwrap();
        write_at(&lease, 0, b"kept");
        owner.take_events();
        let owner_id = owner.info().devid;
        drop(owner);
        drop(lease);
        assert_eq!(
            peer.take_events(),
            vec![PoolEvent::PeerDetached {
                token,
                peer: owner_id
            }]
        );
        assert_eq!(read_at(&peer_lease, 0, 4), b"kept");
        let status = pool.status();
        assert_eq!(status.regions.len(), 1);
        assert_eq!(status.regions[0].holders, vec![peer.info().devid.0]);
        assert_eq!(status.used, PAGE_SIZE);
    }

    #[test]
    fn test_last_holder_leaving_frees_region_and_quota() {
        let pool = pool(4 * PAGE_SIZE, Some(4 * PAGE_SIZE));
        let a = pool.session().unwrap();
        let token = a.alloc(4 * PAGE_SIZE).unwrap().token;
        assert!(matches!(
            a.alloc(PAGE_SIZE),
            Err(PoolError::QuotaExceeded { .. })
        ));
        a.detach(token).unwrap();
        assert_eq!(pool.status().used, 0);
        assert!(pool.status().regions.is_empty());
        assert!(matches!(
            a.attach(token, Perms::NONE),
            Err(PoolError::NoSuchRegion(_))
        ));
        assert!(matches!(a.detach(token), Err(PoolError::NoSuchRegion(_))));
        a.alloc(4 * PAGE_SIZE).unwrap();
        drop(a);
        let status = pool.status();
        assert_eq!(status.used, 0);
        assert!(status.sessions.is_empty());
    }

    #[test]
    fn test_a_session_reports_its_pools_status() {
        let pool = pool(1 << 20, Some(1 << 19));
        let a = pool.open_session(SessionOwner::default()).unwrap();
        let b = pool.open_session(SessionOwner::default()).unwrap();
        let token = a.alloc(2 * PAGE_SIZE).unwrap().token;
        a.grant(
            token,
            GrantTarget::Device(b.devid()),
            Perms::ATTACH.union(Perms::READ),
        )
        .unwrap();
        let status = PoolSession::status(&*b).expect("an in-process pool reports its status");
        assert_eq!(status, pool.status());
        assert_eq!(status.used, 2 * PAGE_SIZE);
        assert_eq!(status.per_vm_limit, Some(1 << 19));
        assert_eq!(status.sessions.len(), 2);
        assert_eq!(status.regions[0].grants, [(b.devid().0, 5)]);
    }

    #[test]
    fn test_quota_and_pool_limits_are_reported() {
        let pool = pool(8 * PAGE_SIZE, Some(4 * PAGE_SIZE));
        let a = pool.session().unwrap();
        let b = pool.session().unwrap();
        let c = pool.session().unwrap();
        a.alloc(3 * PAGE_SIZE).unwrap();
        match a.alloc(2 * PAGE_SIZE) {
            Err(PoolError::QuotaExceeded {
                limit,
                used,
                requested,
            }) => {
                assert_eq!(
                    (limit, used, requested),
                    (4 * PAGE_SIZE, 3 * PAGE_SIZE, 2 * PAGE_SIZE)
                );
            }
            other => panic!("expected QuotaExceeded, got {other:?}"),
        }
        b.alloc(4 * PAGE_SIZE).unwrap();
        match c.alloc(2 * PAGE_SIZE) {
            Err(PoolError::PoolExhausted {
                requested,
                available,
            }) => {
                assert_eq!((requested, available), (2 * PAGE_SIZE, PAGE_SIZE));
            }
            other => panic!("expected PoolExhausted, got {other:?}"),
        }
        c.alloc(PAGE_SIZE).unwrap();
    }

    #[test]
    fn test_attach_counts_against_quota() {
        let pool = pool(8 * PAGE_SIZE, Some(4 * PAGE_SIZE));
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let token = owner.alloc(3 * PAGE_SIZE).unwrap().token;
        owner
            .grant(
                token,
                GrantTarget::Default,
                Perms(Perms::ATTACH.0 | Perms::READ.0),
            )
            .unwrap();
        peer.alloc(2 * PAGE_SIZE).unwrap();
        assert!(matches!(
            peer.attach(token, Perms::NONE),
            Err(PoolError::QuotaExceeded { .. })
        ));
    }

    #[test]
    fn test_sessions_of_one_vm_share_quota() {
        let pool = pool(8 * PAGE_SIZE, Some(4 * PAGE_SIZE));
        let vm = |key| SessionOwner {
            vm: Some(key),
            ..SessionOwner::default()
        };
        let a = pool.open_session(vm(VmKey::Process(42))).unwrap();
        let b = pool.open_session(vm(VmKey::Process(42))).unwrap();
        let c = pool.open_session(vm(VmKey::Process(43))).unwrap();
        a.alloc(3 * PAGE_SIZE).unwrap();
        assert!(matches!(
            b.alloc(2 * PAGE_SIZE),
            Err(PoolError::QuotaExceeded { .. })
        ));
        c.alloc(2 * PAGE_SIZE).unwrap();
    }

    #[test]
    fn test_revoke_notifies_every_holder_and_frees() {
        let pool = pool(8 * PAGE_SIZE, Some(4 * PAGE_SIZE));
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let token = owner.alloc(4 * PAGE_SIZE).unwrap().token;
        owner
            .grant(
                token,
                GrantTarget::Default,
                Perms(Perms::ATTACH.0 | Perms::READ.0),
            )
            .unwrap();
        peer.attach(token, Perms::NONE).unwrap();
        owner.take_events();
        pool.revoke(token).unwrap();
        assert_eq!(owner.take_events(), vec![PoolEvent::Revoked { token }]);
        assert_eq!(peer.take_events(), vec![PoolEvent::Revoked { token }]);
        assert_eq!(pool.status().used, 0);
        assert!(matches!(
            owner.detach(token),
            Err(PoolError::NoSuchRegion(_))
        ));
        owner.alloc(4 * PAGE_SIZE).unwrap();
        assert!(matches!(
            pool.revoke(Token(1)),
            Err(PoolError::NoSuchRegion(_))
        ));
    }

    fn eventfd() -> OwnedFd {
        rustix::event::eventfd(0, rustix::event::EventfdFlags::NONBLOCK).unwrap()
    }

    fn read_counter(fd: &OwnedFd) -> Option<u64> {
        let mut value = [0u8; 8];
        rustix::io::read(fd, &mut value)
            .ok()
            .map(|_| u64::from_ne_bytes(value))
    }

    fn shared_region(pool: &Arc<LocalPool>) -> (Arc<dyn PoolSession>, Arc<dyn PoolSession>, Token) {
        let owner = pool.session().unwrap();
        let peer = pool.session().unwrap();
        let token = owner.alloc(PAGE_SIZE).unwrap().token;
        owner
            .grant(
                token,
                GrantTarget::Default,
                Perms(Perms::ATTACH.0 | Perms::READ.0),
            )
            .unwrap();
        peer.attach(token, Perms::NONE).unwrap();
        owner.take_events();
        (owner, peer, token)
    }

    #[test]
    fn test_published_doorbell_reaches_other_holders_only() {
        let pool = pool(16 * PAGE_SIZE, None);
        let (owner, peer, token) = shared_region(&pool);
        let outsider = pool.session().unwrap();
        let doorbell = eventfd();
        owner.publish_doorbell(token, doorbell.as_fd()).unwrap();
        assert_eq!(
            peer.take_events(),
            vec![PoolEvent::DoorbellsChanged { token }]
        );
        assert!(owner.take_events().is_empty());
        let given = peer.peer_doorbells(token).unwrap();
        assert_eq!(given.len(), 1);
        assert_eq!(given[0].0, owner.info().devid);
        // Writing the copy signals the publisher's eventfd.
        rustix::io::write(&given[0].1, &1u64.to_ne_bytes()).unwrap();
        assert_eq!(read_counter(&doorbell), Some(1));
        // Not handed back to its publisher; nothing for a session without the region.
        assert!(owner.peer_doorbells(token).unwrap().is_empty());
        assert!(matches!(
            outsider.peer_doorbells(token),
            Err(PoolError::NotHeld { .. })
        ));
        assert!(matches!(
            outsider.publish_doorbell(token, eventfd().as_fd()),
            Err(PoolError::NotHeld { .. })
        ));
        assert!(matches!(
            owner.publish_doorbell(Token(99), eventfd().as_fd()),
            Err(PoolError::NoSuchRegion(_))
        ));
        assert_eq!(
            pool.status().regions[0].doorbells,
            vec![owner.info().devid.0]
        );
    }

    #[test]
    fn test_republish_replaces_and_withdraw_removes() {
        let pool = pool(16 * PAGE_SIZE, None);
        let (owner, peer, token) = shared_region(&pool);
        let first = eventfd();
        let second = eventfd();
        owner.publish_doorbell(token, first.as_fd()).unwrap();
        owner.publish_doorbell(token, second.as_fd()).unwrap();
        assert_eq!(peer.take_events().len(), 2);
        let given = peer.peer_doorbells(token).unwrap();
        assert_eq!(given.len(), 1);
        rustix::io::write(&given[0].1, &1u64.to_ne_bytes()).unwrap();
        assert_eq!(read_counter(&first), None);
        assert_eq!(read_counter(&second), Some(1));
        owner.withdraw_doorbell(token).unwrap();
        assert_eq!(
            peer.take_events(),
            vec![PoolEvent::DoorbellsChanged { token }]
        );
        assert!(peer.peer_doorbells(token).unwrap().is_empty());
        // Withdrawing nothing is fine and tells nobody.
        owner.withdraw_doorbell(token).unwrap();
        assert!(peer.take_events().is_empty());
    }

    #[test]
    fn test_only_eventfds_are_doorbells() {
        let pool = pool(16 * PAGE_SIZE, None);
        let (owner, _peer, token) = shared_region(&pool);
        let memfd =
            rustix::fs::memfd_create("not-a-doorbell", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        assert!(matches!(
            owner.publish_doorbell(token, memfd.as_fd()),
            Err(PoolError::NotAnEventfd { .. })
        ));
    }

    #[test]
    fn test_detach_and_close_withdraw_doorbells() {
        let pool = pool(16 * PAGE_SIZE, None);
        let (owner, peer, token) = shared_region(&pool);
        let third = pool.session().unwrap();
        third.attach(token, Perms::NONE).unwrap();
        peer.publish_doorbell(token, eventfd().as_fd()).unwrap();
        third.publish_doorbell(token, eventfd().as_fd()).unwrap();
        owner.take_events();
        let peer_id = peer.info().devid;
        peer.detach(token).unwrap();
        assert_eq!(
            owner.take_events(),
            vec![
                PoolEvent::PeerDetached {
                    token,
                    peer: peer_id
                },
                PoolEvent::DoorbellsChanged { token }
            ]
        );
        let left: Vec<DevId> = owner
            .peer_doorbells(token)
            .unwrap()
            .into_iter()
            .map(|(devid, _)| devid)
            .collect();
        assert_eq!(left, vec![third.info().devid]);
        let third_id = third.info().devid;
        drop(third);
        assert_eq!(
            owner.take_events(),
            vec![
                PoolEvent::PeerDetached {
                    token,
                    peer: third_id
                },
                PoolEvent::DoorbellsChanged { token }
            ]
        );
        assert!(owner.peer_doorbells(token).unwrap().is_empty());
    }

    #[test]
    fn test_event_fd_is_provided() {
        let pool = pool(8 * PAGE_SIZE, None);
        let a = pool.session().unwrap();
        assert!(a.event_fd().is_some());
    }

    /// A pool restored from a snapshot takes back exactly what was recorded: the right
    /// session key, the very memfd of each region (once per holder), owners and grants.
    #[test]
    fn test_restored_pool_takes_back_recorded_sessions_and_regions_only() {
        let before = pool(16 * PAGE_SIZE, None);
        let a = before.open_session(SessionOwner::default()).unwrap();
        let b = before.open_session(SessionOwner::default()).unwrap();
        let lease = a.alloc(2 * PAGE_SIZE).unwrap();
        let token = lease.token;
        write_at(&lease, 0, b"kept");
        a.grant(token, GrantTarget::Device(b.devid()), Perms(7))
            .unwrap();
        let b_lease = b.attach(token, Perms::READ).unwrap();
        let snapshot = before.snapshot();
        assert_eq!(snapshot.sessions.len(), 2);
        assert_eq!(snapshot.regions[0].holders, vec![a.devid().0, b.devid().0]);
        let (a_key, a_devid, b_key, b_devid) =
            (a.resume_key(), a.devid(), b.resume_key(), b.devid());
        assert_ne!(a_key, b_key);
        // The broker died: its sessions and memfds are gone, the holders' leases are not.
        std::mem::forget(a);
        std::mem::forget(b);
        drop(before);

        let after = LocalPool::restore(
            PoolConfig {
                size: 16 * PAGE_SIZE,
                ..PoolConfig::default()
            },
            &snapshot,
        )
        .unwrap();
        assert_eq!(after.gid(), snapshot.gid);
        assert!(after.recovering());
        let owner = SessionOwner::default;
        assert!(after.resume_session(owner(), a_devid, b_key).is_err());
        assert!(after.resume_session(owner(), DevId(99), a_key).is_err());
        let a = after.resume_session(owner(), a_devid, a_key).unwrap();
        assert!(after.resume_session(owner(), a_devid, a_key).is_err());
        // A foreign file of the right size is not the region.
        let foreign = RegionMemory::create("foreign", 2 * PAGE_SIZE, false).unwrap();
        assert!(matches!(
            a.reregister(token, foreign.read_write_fd().unwrap()),
            Err(PoolError::Protocol(_))
        ));
        // A token it never held is not accepted; its own region is, once.
        assert!(matches!(
            a.reregister(Token(token.0 ^ 1), lease.fd.try_clone().unwrap()),
            Err(PoolError::NotHeld { .. })
        ));
        a.reregister(token, lease.fd.try_clone().unwrap()).unwrap();
        assert!(matches!(
            a.reregister(token, lease.fd.try_clone().unwrap()),
            Err(PoolError::NotHeld { .. })
        ));
        a.finish_resume();
        // New regions never get a recorded token, and devids continue.
        let c = after.open_session(SessionOwner::default()).unwrap();
        assert!(c.devid().0 > b_devid.0);
        assert_ne!(c.alloc(PAGE_SIZE).unwrap().token, token);
        // B is recorded: it can be granted to and can come back with its read-only lease.
        a.grant(token, GrantTarget::Device(b_devid), Perms(7))
            .unwrap();
        let b = after.resume_session(owner(), b_devid, b_key).unwrap();
        b.reregister(token, b_lease.fd.try_clone().unwrap())
            .unwrap();
        b.finish_resume();
        assert!(!after.recovering());
        let status = after.status();
        let region = status.regions.iter().find(|r| r.token == token.0).unwrap();
        assert_eq!(region.owner, a_devid.0);
        assert_eq!(region.holders, vec![a_devid.0, b_devid.0]);
        assert_eq!(region.grants, vec![(b_devid.0, 7)]);
        // The memory is the same.
        let d = after.session().unwrap();
        a.grant(token, GrantTarget::Default, Perms(5)).unwrap();
        let again = d.attach(token, Perms::READ).unwrap();
        assert_eq!(read_at(&again, 0, 4), b"kept");
    }

    /// A connection that drops in the middle of a resume leaves the session waiting to be
    /// resumed again, with everything it held; one that finished its resume closes as usual.
    #[test]
    fn test_a_resume_cut_short_can_be_resumed_again() {
        let before = pool(16 * PAGE_SIZE, None);
        let a = before.open_session(SessionOwner::default()).unwrap();
        let lease = a.alloc(PAGE_SIZE).unwrap();
        let other = a.alloc(PAGE_SIZE).unwrap();
        let snapshot = before.snapshot();
        let (key, devid) = (a.resume_key(), a.devid());
        std::mem::forget(a);
        drop(before);
        let after = LocalPool::restore(
            PoolConfig {
                size: 16 * PAGE_SIZE,
                ..PoolConfig::default()
            },
            &snapshot,
        )
        .unwrap();
        let a = after
            .resume_session(SessionOwner::default(), devid, key)
            .unwrap();
        a.reregister(lease.token, lease.fd.try_clone().unwrap())
            .unwrap();
        assert_eq!(after.status().used, PAGE_SIZE);
        drop(a);
        // Nothing is lost: both regions are recorded again, the session can come back.
        assert_eq!(after.status().used, 0);
        assert!(after.recovering());
        assert_eq!(after.snapshot().regions.len(), 2);
        let a = after
            .resume_session(SessionOwner::default(), devid, key)
            .unwrap();
        a.reregister(lease.token, lease.fd.try_clone().unwrap())
            .unwrap();
        a.reregister(other.token, other.fd.try_clone().unwrap())
            .unwrap();
        a.finish_resume();
        assert_eq!(after.status().used, 2 * PAGE_SIZE);
        drop(a);
        assert!(!after.recovering());
        assert_eq!(after.status().used, 0);
        assert!(after.snapshot().regions.is_empty());
    }

    /// Sessions that never come back lose their holds at the end of the grace period, and
    /// the holders that did come back hear it.
    #[test]
    fn test_expired_recovery_releases_absent_sessions() {
        let before = pool(16 * PAGE_SIZE, None);
        let a = before.open_session(SessionOwner::default()).unwrap();
        let b = before.open_session(SessionOwner::default()).unwrap();
        let lease = a.alloc(PAGE_SIZE).unwrap();
        a.grant(lease.token, GrantTarget::Default, Perms(7))
            .unwrap();
        let _b_lease = b.attach(lease.token, Perms::NONE).unwrap();
        let snapshot = before.snapshot();
        let (a_key, a_devid, b_devid) = (a.resume_key(), a.devid(), b.devid());
        std::mem::forget(a);
        std::mem::forget(b);
        drop(before);
        let after = LocalPool::restore(
            PoolConfig {
                size: 16 * PAGE_SIZE,
                ..PoolConfig::default()
            },
            &snapshot,
        )
        .unwrap();
        let a = after
            .resume_session(SessionOwner::default(), a_devid, a_key)
            .unwrap();
        a.reregister(lease.token, lease.fd.try_clone().unwrap())
            .unwrap();
        a.finish_resume();
        assert_eq!(after.snapshot().regions[0].holders.len(), 2);
        assert_eq!(after.expire_recovery(Duration::ZERO), vec![b_devid]);
        assert!(a.take_events().contains(&PoolEvent::PeerDetached {
            token: lease.token,
            peer: b_devid
        }));
        let snapshot = after.snapshot();
        assert_eq!(snapshot.sessions.len(), 1);
        assert_eq!(snapshot.regions[0].holders, vec![a_devid.0]);
    }
}
