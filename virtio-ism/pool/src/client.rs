// SPDX-License-Identifier: Apache-2.0
//! The VMM side of the broker protocol: [`BrokerSession`] implements [`PoolSession`] over
//! the broker socket, and [`query_status`] / [`revoke`] serve operator tools.
//!
//! A device session outlives its broker: when the connection breaks (the broker was killed
//! or restarted), the session's reader thread reconnects with capped exponential backoff and
//! resumes the session (same devid) on the restarted broker, handing back every region it
//! holds (a duplicate of each lease is kept for that) and every doorbell it published.
//! Meanwhile every request fails at once with [`PoolError::Connection`]; a request the
//! broker leaves unanswered fails after [`ClientOptions::reply_timeout`]. See docs/pool.md,
//! "Failure model".

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::events::EventQueue;
use crate::local::DoorbellPage;
use crate::seqpacket;
use crate::session::{
    DevId, GrantTarget, Perms, PoolError, PoolEvent, PoolSession, RegionLease, SessionInfo, Token,
};
use crate::status::PoolStatus;
use crate::wire::{
    self, DOORBELL_VERSION, MAX_VERSION, MIN_VERSION, RESUME_VERSION, Reply, Request, Role,
    error_code,
};

/// Largest status report accepted.
const MAX_STATUS_LEN: u32 = 64 << 20;

/// How a device session deals with a slow or lost broker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// How long a request waits for the broker's answer. After a timeout the session
    /// fails requests at once until the broker answers anything again (a late answer to an
    /// ALLOC or ATTACH is given back with a DETACH sent before the next request).
    pub reply_timeout: Duration,
    /// Reconnect and resume the session after the connection broke (needs a broker of
    /// protocol version 4). The session then keeps a duplicate of every lease and doorbell
    /// (made on the calling thread), and its reader thread, to resume, connects and sends:
    /// `socket` (AF_UNIX), `connect`, `setsockopt`, `sendmsg`, `shutdown`
    /// (docs/seccomp.md). Off, the reader thread only receives (`recvmsg`, and `poll` when
    /// a receive returns nothing) and the session ends with its connection.
    pub reconnect: bool,
    /// First wait before reconnecting; doubled after every failed attempt up to
    /// `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            reply_timeout: Duration::from_secs(5),
            reconnect: true,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

fn connection_error(text: &str) -> PoolError {
    PoolError::Connection(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        text.to_string(),
    ))
}

/// A reply with the descriptors that came with it.
struct Answer {
    id: u64,
    reply: Reply,
    fds: Vec<OwnedFd>,
}

/// The connection as requests see it.
#[derive(Default)]
struct Link {
    socket: Option<Arc<OwnedFd>>,
    /// Why there is no usable connection (set while it is down or resuming).
    down: Option<String>,
    /// A request went unanswered past its timeout: fail at once until the broker answers
    /// anything.
    unresponsive: bool,
    /// The request id a caller waits for.
    waiting: Option<u64>,
    answer: Option<Answer>,
    stopping: bool,
    /// The connection a resume is being attempted on (shut down when the session stops,
    /// so the attempt ends at once).
    resuming: Option<Arc<OwnedFd>>,
}

struct Shared {
    path: PathBuf,
    options: ClientOptions,
    info: SessionInfo,
    version: u16,
    /// Proves the session is ours to a restarted broker (0: the broker cannot resume).
    resume_key: u64,
    link: Mutex<Link>,
    /// Signalled when an answer arrives, the link changes or the session stops.
    changed: Condvar,
    events: EventQueue,
    next_id: AtomicU64,
    /// A duplicate of every lease this session holds, handed back on resume.
    held: Mutex<BTreeMap<Token, OwnedFd>>,
    /// A duplicate of every doorbell this session published, published again on resume.
    doorbells: Mutex<BTreeMap<Token, OwnedFd>>,
    /// Regions detached while the broker could not be told (or did not answer): sent again
    /// after a resume, in case the broker still counts them.
    undone: Mutex<Vec<Token>>,
    /// Regions leased in answer to a request that had timed out: given back (DETACH) before
    /// the next request.
    late: Mutex<Vec<Token>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn link(&self) -> MutexGuard<'_, Link> {
        lock(&self.link)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Forgets `token` (detached or revoked): not handed back on resume.
    fn forget(&self, token: Token) {
        lock(&self.held).remove(&token);
        lock(&self.doorbells).remove(&token);
    }
}

/// A device's session with the host broker.
pub struct BrokerSession {
    shared: Arc<Shared>,
    /// One request in flight at a time; replies are matched by id.
    request_lock: Mutex<()>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for BrokerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSession")
            .field("info", &self.shared.info)
            .field("version", &self.shared.version)
            .finish_non_exhaustive()
    }
}

/// What a hello told the client.
struct Welcome {
    version: u16,
    gid: u64,
    devid: u64,
    resume_key: u64,
}

/// Sends a hello and returns what the answer says.
fn handshake(socket: &OwnedFd, role: Role) -> Result<Welcome, PoolError> {
    let hello = Request::Hello {
        min_version: MIN_VERSION,
        max_version: MAX_VERSION,
        role,
    };
    // A broker that refuses the connection says why and closes at once, so the hello may
    // find the socket closed: the reason is still there to read.
    if let Err(e) = seqpacket::send(socket.as_fd(), &hello.encode(1), None) {
        return match recv_reply(socket) {
            Ok(((_, Reply::Error(refusal)), _)) => Err(refusal.into_pool_error()),
            _ => Err(PoolError::Connection(e)),
        };
    }
    let (answer, _fds) = recv_reply(socket)?;
    match answer {
        (
            1,
            Reply::HelloOk {
                version,
                gid,
                devid,
                resume_key,
            },
        ) if (MIN_VERSION..=MAX_VERSION).contains(&version) => Ok(Welcome {
            version,
            gid,
            devid,
            resume_key,
        }),
        (_, Reply::HelloOk { version, .. }) => Err(PoolError::Protocol(format!(
            "Broker chose unsupported protocol version {version}"
        ))),
        (_, Reply::Error(e)) => Err(e.into_pool_error()),
        (_, other) => Err(PoolError::Protocol(format!(
            "Unexpected answer to hello: {other:?}"
        ))),
    }
}

/// Receives and decodes one broker message.
fn recv_reply(socket: &OwnedFd) -> Result<((u64, Reply), Vec<OwnedFd>), PoolError> {
    let packet = seqpacket::recv(socket.as_fd())
        .map_err(PoolError::Connection)?
        .ok_or_else(|| connection_error("Broker closed the connection"))?;
    if packet.truncated {
        return Err(PoolError::Protocol("Oversized message from broker".into()));
    }
    let decoded = wire::decode_reply(&packet.bytes)
        .map_err(|e| PoolError::Protocol(format!("Malformed message from broker: {e}")))?;
    let expected = match &decoded.1 {
        Reply::Lease { .. } => 1,
        Reply::Doorbells { devids, .. } => devids.len(),
        _ => 0,
    };
    if packet.fds.len() != expected {
        return Err(PoolError::Protocol(format!(
            "Broker sent {} descriptors with a message that carries {expected}",
            packet.fds.len()
        )));
    }
    Ok((decoded, packet.fds))
}

impl BrokerSession {
    /// Connects to the broker at `path` as a device and opens a session.
    pub fn connect(path: impl AsRef<Path>) -> Result<Arc<BrokerSession>, PoolError> {
        Self::connect_with(path, ClientOptions::default(), None)
    }

    /// [`connect`](Self::connect) without reconnecting (`reconnect: false`), running
    /// `thread_start` first on the session's reader thread (a VMM applies that thread's
    /// seccomp filter there). For VMMs whose reader-thread filter allows receiving only (the
    /// cloud-hypervisor patch, until it allows what reconnecting needs); others use
    /// [`connect_with`](Self::connect_with).
    pub fn connect_with_thread_start(
        path: impl AsRef<Path>,
        thread_start: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> Result<Arc<BrokerSession>, PoolError> {
        let options = ClientOptions {
            reconnect: false,
            ..ClientOptions::default()
        };
        Self::connect_with(path, options, thread_start)
    }

    /// [`connect_with_thread_start`](Self::connect_with_thread_start) with `options`
    /// for timeouts and reconnection.
    pub fn connect_with(
        path: impl AsRef<Path>,
        options: ClientOptions,
        thread_start: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> Result<Arc<BrokerSession>, PoolError> {
        let path = path.as_ref().to_path_buf();
        let socket = seqpacket::connect(&path).map_err(PoolError::Connection)?;
        let welcome = handshake(&socket, Role::Device)?;
        if welcome.devid == 0 {
            return Err(PoolError::Protocol("Broker assigned devid 0".into()));
        }
        // A broker that stops reading must not block a request for longer than it may wait.
        seqpacket::set_send_timeout(socket.as_fd(), options.reply_timeout)
            .map_err(PoolError::Connection)?;
        let shared = Arc::new(Shared {
            path,
            options,
            info: SessionInfo {
                gid: welcome.gid,
                devid: DevId(welcome.devid),
            },
            version: welcome.version,
            resume_key: welcome.resume_key,
            link: Mutex::new(Link {
                socket: Some(Arc::new(socket)),
                ..Link::default()
            }),
            changed: Condvar::new(),
            events: EventQueue::new().map_err(PoolError::Connection)?,
            next_id: AtomicU64::new(2),
            held: Mutex::new(BTreeMap::new()),
            doorbells: Mutex::new(BTreeMap::new()),
            undone: Mutex::new(Vec::new()),
            late: Mutex::new(Vec::new()),
        });
        let reader_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name("ism-pool-client".into())
            .spawn(move || {
                if let Some(hook) = thread_start {
                    hook();
                }
                run_reader(&reader_shared)
            })
            .map_err(PoolError::Connection)?;
        Ok(Arc::new(BrokerSession {
            shared,
            request_lock: Mutex::new(()),
            reader: Mutex::new(Some(reader)),
        }))
    }

    /// The protocol version agreed with the broker.
    pub fn version(&self) -> u16 {
        self.shared.version
    }

    /// Whether the session is connected to a broker that answers (false while the broker
    /// is down, being reconnected to, or left a request unanswered).
    pub fn is_connected(&self) -> bool {
        let link = self.shared.link();
        link.down.is_none() && !link.unresponsive
    }

    /// Sends `request` and waits for its answer.
    fn call(&self, request: Request) -> Result<(Reply, Vec<OwnedFd>), PoolError> {
        self.call_with(request, None)
    }

    /// Sends `request` with `fd` attached and waits for its answer, at most
    /// `reply_timeout`. Fails at once while the broker is down or unresponsive.
    fn call_with(
        &self,
        request: Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(Reply, Vec<OwnedFd>), PoolError> {
        let _one_at_a_time = lock(&self.request_lock);
        let shared = &self.shared;
        let id = shared.next_id();
        let socket = {
            let mut link = shared.link();
            if let Some(reason) = &link.down {
                return Err(connection_error(&format!(
                    "Pool broker unavailable: {reason}"
                )));
            }
            if link.unresponsive {
                return Err(PoolError::Connection(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "Pool broker does not answer",
                )));
            }
            let Some(socket) = link.socket.clone() else {
                return Err(connection_error("Pool broker unavailable"));
            };
            link.waiting = Some(id);
            link.answer = None;
            socket
        };
        // Leases that came after their request timed out go back first; their answers
        // (OK, or NotHeld after a resume released them) are not waited for.
        let late = std::mem::take(&mut *lock(&shared.late));
        for token in late {
            let detach = Request::Detach { token };
            let _ = seqpacket::send(socket.as_fd(), &detach.encode(shared.next_id()), None);
        }
        if let Err(e) = seqpacket::send(socket.as_fd(), &request.encode(id), fd) {
            let mut link = shared.link();
            link.waiting = None;
            if e.kind() == std::io::ErrorKind::WouldBlock {
                link.unresponsive = true;
            }
            return Err(PoolError::Connection(e));
        }
        let deadline = Instant::now() + shared.options.reply_timeout;
        let mut link = shared.link();
        loop {
            if let Some(answer) = link.answer.take()
                && answer.id == id
            {
                link.waiting = None;
                // Kept before the reader can resume (it waits until the answer is taken),
                // so a resume right after this lease hands it back too.
                if let (true, Reply::Lease { token, .. }, Some(fd)) =
                    (shared.options.reconnect, &answer.reply, answer.fds.first())
                {
                    match fd.try_clone() {
                        Ok(copy) => {
                            lock(&shared.held).insert(*token, copy);
                        }
                        Err(e) => log::warn!(
                            "Cannot keep a copy of region {token} ({e}): a broker restart will lose it"
                        ),
                    }
                }
                shared.changed.notify_all();
                return Ok((answer.reply, answer.fds));
            }
            if let Some(reason) = link.down.clone() {
                link.waiting = None;
                return Err(connection_error(&reason));
            }
            let now = Instant::now();
            if now >= deadline {
                link.waiting = None;
                link.unresponsive = true;
                log::warn!(
                    "Pool broker left a request unanswered for {:?}; failing requests until it answers",
                    shared.options.reply_timeout
                );
                return Err(PoolError::Connection(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "No answer from broker",
                )));
            }
            link = shared
                .changed
                .wait_timeout(link, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn call_lease(&self, request: Request) -> Result<RegionLease, PoolError> {
        let (reply, fds) = self.call(request)?;
        match (reply, fds.into_iter().next()) {
            (
                Reply::Lease {
                    token,
                    size,
                    writable,
                },
                Some(fd),
            ) => {
                if let Err(e) = check_lease_fd(&fd, size, writable) {
                    self.shared.forget(token);
                    return Err(e);
                }
                Ok(RegionLease {
                    token,
                    size,
                    fd,
                    writable,
                })
            }
            (Reply::Lease { .. }, None) => Err(PoolError::Protocol(
                "Lease arrived without a descriptor".into(),
            )),
            (Reply::Error(e), _) => Err(e.into_pool_error()),
            (other, _) => Err(PoolError::Protocol(format!("Unexpected answer: {other:?}"))),
        }
    }

    fn call_unit(&self, request: Request) -> Result<(), PoolError> {
        unit_answer(self.call(request)?)
    }

    fn doorbells_supported(&self) -> Result<(), PoolError> {
        if self.shared.version < DOORBELL_VERSION {
            return Err(PoolError::DoorbellsUnsupported);
        }
        Ok(())
    }

    /// One PEER_DOORBELLS page.
    fn doorbell_page(&self, token: Token, start: u32) -> Result<DoorbellPage, PoolError> {
        match self.call(Request::PeerDoorbells { token, start })? {
            (
                Reply::Doorbells {
                    generation,
                    total,
                    start: got,
                    devids,
                },
                fds,
            ) if got == start.min(total) => {
                for fd in &fds {
                    if !is_eventfd(fd.as_fd()) {
                        return Err(PoolError::Protocol(
                            "Broker sent a doorbell that is not an eventfd".into(),
                        ));
                    }
                }
                Ok(DoorbellPage {
                    generation,
                    total,
                    doorbells: devids.into_iter().zip(fds).collect(),
                })
            }
            (Reply::Error(e), _) => Err(e.into_pool_error()),
            (other, _) => Err(PoolError::Protocol(format!("Unexpected answer: {other:?}"))),
        }
    }
}

/// How many times a paged doorbell listing restarts because the set kept changing.
const DOORBELL_LIST_ATTEMPTS: usize = 8;

fn unit_answer((reply, fds): (Reply, Vec<OwnedFd>)) -> Result<(), PoolError> {
    match (reply, fds.is_empty()) {
        (Reply::Ok, true) => Ok(()),
        (Reply::Error(e), _) => Err(e.into_pool_error()),
        (other, _) => Err(PoolError::Protocol(format!("Unexpected answer: {other:?}"))),
    }
}

/// Whether `fd` is an eventfd (what a doorbell must be).
fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

/// A lease must be exactly what the broker says: a file of `size` bytes whose access mode
/// matches `writable`. A broker bug here would otherwise turn into a SIGBUS in the VMM.
fn check_lease_fd(fd: &OwnedFd, size: u64, writable: bool) -> Result<(), PoolError> {
    let stat = rustix::fs::fstat(fd).map_err(|e| PoolError::Connection(e.into()))?;
    if stat.st_size as u64 != size {
        return Err(PoolError::Protocol(format!(
            "Lease descriptor is {} bytes, broker said {size}",
            stat.st_size
        )));
    }
    let mode = rustix::fs::fcntl_getfl(fd).map_err(|e| PoolError::Connection(e.into()))?
        & rustix::fs::OFlags::RWMODE;
    if writable != (mode == rustix::fs::OFlags::RDWR) {
        return Err(PoolError::Protocol(
            "Lease descriptor mode does not match".into(),
        ));
    }
    Ok(())
}

/// The reader thread: reads the connection until it breaks, then (if the session can be
/// resumed) reconnects with backoff and resumes, for as long as the session lives.
fn run_reader(shared: &Shared) {
    loop {
        let Some(socket) = shared.link().socket.clone() else {
            return;
        };
        let reason = read_loop(shared, &socket);
        // Hung up before reconnecting: the connection may have ended on this side only (a
        // receive error), and a broker that still sees it would keep the session, and its
        // regions, as they were while the resume comes in. Callers may still hold the
        // socket for a moment: shut down, not just dropped.
        seqpacket::shutdown(socket.as_fd());
        drop(socket);
        {
            let mut link = shared.link();
            link.socket = None;
            link.down = Some(reason.clone());
            shared.changed.notify_all();
            if link.stopping {
                return;
            }
        }
        if !shared.options.reconnect || shared.resume_key == 0 {
            log::warn!("Pool broker connection lost ({reason}); this session cannot resume");
            return;
        }
        log::warn!(
            "Pool broker connection lost ({reason}); device {} reconnects",
            shared.info.devid.0
        );
        if !reconnect(shared) {
            return;
        }
    }
}

/// Reconnects and resumes until it works (true), the session is dropped or the broker
/// refuses for good (false).
fn reconnect(shared: &Shared) -> bool {
    let mut backoff = shared.options.backoff_min;
    let mut attempts = 0u64;
    loop {
        {
            let link = shared.link();
            let (link, _) = shared
                .changed
                .wait_timeout_while(link, backoff, |link| !link.stopping)
                .unwrap_or_else(|e| e.into_inner());
            if link.stopping {
                return false;
            }
        }
        attempts += 1;
        // An answer delivered before the connection broke is taken (and its lease kept)
        // before the held regions are listed.
        {
            let link = shared.link();
            let _ = shared
                .changed
                .wait_timeout_while(link, shared.options.reply_timeout, |link| {
                    link.answer.is_some()
                })
                .unwrap_or_else(|e| e.into_inner());
        }
        match resume(shared) {
            Ok(socket) => {
                let tokens: Vec<Token> = lock(&shared.held).keys().copied().collect();
                {
                    let mut link = shared.link();
                    if link.stopping {
                        seqpacket::shutdown(socket.as_fd());
                        return false;
                    }
                    // Detaches the broker may have missed: not held now, so not handed back,
                    // but a region handed back before the device let go of it would stay
                    // counted. Their answers (or NotHeld refusals) are dropped unread.
                    let undone = std::mem::take(&mut *lock(&shared.undone));
                    for token in undone {
                        if !lock(&shared.held).contains_key(&token) {
                            let detach = Request::Detach { token };
                            let _ = seqpacket::send(
                                socket.as_fd(),
                                &detach.encode(shared.next_id()),
                                None,
                            );
                        }
                    }
                    link.socket = Some(socket);
                    link.down = None;
                    link.unresponsive = false;
                    shared.changed.notify_all();
                }
                log::info!(
                    "Device {} resumed its pool session after {attempts} attempts, {} regions handed back",
                    shared.info.devid.0,
                    tokens.len()
                );
                // Peers may have published their doorbells again before this session was
                // back: let the device ask for them.
                for token in tokens {
                    shared.events.push(PoolEvent::DoorbellsChanged { token });
                }
                return true;
            }
            Err(Resume::Retry(why)) => {
                log::debug!("Reconnecting to the pool broker failed: {why}");
                backoff = (backoff * 2).min(shared.options.backoff_max);
            }
            Err(Resume::Refused(why)) => {
                log::error!(
                    "The pool broker refused to resume device {}: {why}; its pool requests fail from now on",
                    shared.info.devid.0
                );
                let mut link = shared.link();
                link.down = Some(format!("Session lost: {why}"));
                return false;
            }
        }
    }
}

/// Why a resume attempt failed.
enum Resume {
    /// The broker is not there (yet), too busy, or hung: try again later.
    Retry(String),
    /// The broker does not know this session any more: give up.
    Refused(String),
}

/// Waits for the answer to request `id` on a connection being resumed; events that come
/// meanwhile are queued.
fn resume_answer(shared: &Shared, socket: &OwnedFd, id: u64) -> Result<Reply, Resume> {
    loop {
        match recv_reply(socket) {
            Ok(((_, Reply::Event(event)), _)) => shared.events.push(event),
            Ok(((got, reply), _)) if got == id => return Ok(reply),
            Ok(_) => {}
            Err(e) => return Err(Resume::Retry(e.to_string())),
        }
    }
}

/// One resume attempt: connect, RESUME, hand back every held region (REREGISTER with a
/// duplicate of its lease) and published doorbell, RESUME_DONE.
fn resume(shared: &Shared) -> Result<Arc<OwnedFd>, Resume> {
    let retry = |e: std::io::Error| Resume::Retry(e.to_string());
    let socket = Arc::new(seqpacket::connect(&shared.path).map_err(retry)?);
    {
        let mut link = shared.link();
        if link.stopping {
            return Err(Resume::Retry("the session is closing".into()));
        }
        link.resuming = Some(socket.clone());
    }
    let result = resume_on(shared, &socket);
    shared.link().resuming = None;
    result.map(|()| socket)
}

/// [`resume`] on the connected `socket`.
fn resume_on(shared: &Shared, socket: &OwnedFd) -> Result<(), Resume> {
    let retry = |e: std::io::Error| Resume::Retry(e.to_string());
    // A hung broker fails the attempt instead of stalling this thread.
    seqpacket::set_recv_timeout(socket.as_fd(), Some(shared.options.reply_timeout))
        .map_err(retry)?;
    seqpacket::set_send_timeout(socket.as_fd(), shared.options.reply_timeout).map_err(retry)?;
    let send = |request: &Request, id: u64, fd: Option<BorrowedFd<'_>>| {
        seqpacket::send(socket.as_fd(), &request.encode(id), fd).map_err(retry)
    };
    let hello = Request::Resume {
        min_version: RESUME_VERSION,
        max_version: MAX_VERSION,
        devid: shared.info.devid,
        key: shared.resume_key,
    };
    send(&hello, 1, None)?;
    match resume_answer(shared, socket, 1)? {
        Reply::HelloOk { gid, devid, .. }
            if gid == shared.info.gid && devid == shared.info.devid.0 => {}
        Reply::HelloOk { gid, devid, .. } => {
            return Err(Resume::Refused(format!(
                "broker resumed gid {gid:#x} devid {devid} instead"
            )));
        }
        Reply::Error(e) if e.code == error_code::RESUME_REFUSED => {
            return Err(Resume::Refused(e.text));
        }
        Reply::Error(e) => return Err(Resume::Retry(e.into_pool_error().to_string())),
        other => return Err(Resume::Retry(format!("unexpected answer {other:?}"))),
    }
    // The descriptors are sent as they are kept (this thread duplicates nothing).
    let held: Vec<Token> = lock(&shared.held).keys().copied().collect();
    let mut refused = Vec::new();
    for token in &held {
        let id = shared.next_id();
        {
            let kept = lock(&shared.held);
            let Some(fd) = kept.get(token) else {
                continue;
            };
            send(&Request::Reregister { token: *token }, id, Some(fd.as_fd()))?;
        }
        match resume_answer(shared, socket, id)? {
            Reply::Ok => {}
            Reply::Error(e) => {
                log::warn!(
                    "The restarted broker refused region {token}: {}",
                    e.into_pool_error()
                );
                refused.push(*token);
            }
            other => return Err(Resume::Retry(format!("unexpected answer {other:?}"))),
        }
    }
    // A region the broker does not take back is gone for this device: it must unmap it.
    for token in refused {
        shared.forget(token);
        shared.events.push(PoolEvent::Revoked { token });
    }
    let doorbells: Vec<Token> = lock(&shared.doorbells).keys().copied().collect();
    for token in &doorbells {
        let id = shared.next_id();
        {
            let kept = lock(&shared.doorbells);
            let Some(fd) = kept.get(token) else {
                continue;
            };
            send(
                &Request::PublishDoorbell { token: *token },
                id,
                Some(fd.as_fd()),
            )?;
        }
        if let Reply::Error(e) = resume_answer(shared, socket, id)? {
            log::warn!(
                "Publishing the doorbell of {token} again failed: {}",
                e.into_pool_error()
            );
        }
    }
    let id = shared.next_id();
    send(&Request::ResumeDone, id, None)?;
    resume_answer(shared, socket, id)?;
    seqpacket::set_recv_timeout(socket.as_fd(), None).map_err(retry)?;
    Ok(())
}

/// Reads every broker message: answers go to the waiting request, events to the queue.
/// Returns why the connection ended.
fn read_loop(shared: &Shared, socket: &Arc<OwnedFd>) -> String {
    loop {
        match recv_reply(socket) {
            Ok(((_, Reply::Event(event)), _)) => {
                if let PoolEvent::Revoked { token } = event {
                    shared.forget(token);
                }
                shared.link().unresponsive = false;
                shared.events.push(event);
            }
            Ok(((id, reply), fds)) => {
                let mut link = shared.link();
                link.unresponsive = false;
                if link.waiting == Some(id) {
                    link.answer = Some(Answer { id, reply, fds });
                } else if let Reply::Lease { token, .. } = &reply {
                    // The answer to an ALLOC or ATTACH that timed out: the device never saw
                    // it, so the next request gives the region back (from the caller's
                    // thread: this one only receives while connected).
                    log::info!(
                        "Region {token} was leased after its request timed out; giving it back"
                    );
                    lock(&shared.late).push(*token);
                }
                shared.changed.notify_all();
            }
            Err(PoolError::Protocol(text)) => {
                log::warn!("Ignoring bad message from broker: {text}");
            }
            // Requests then fail with Connection(reason): keep the cause, not the
            // "connection failed" the request's error says already.
            Err(PoolError::Connection(cause)) => break cause.to_string(),
            Err(e) => break e.to_string(),
        }
    }
}

impl Drop for BrokerSession {
    fn drop(&mut self) {
        // The broker sees the hang-up and releases every region this session held.
        {
            let mut link = self.shared.link();
            link.stopping = true;
            for socket in link.socket.iter().chain(&link.resuming) {
                seqpacket::shutdown(socket.as_fd());
            }
            self.shared.changed.notify_all();
        }
        if let Some(reader) = lock(&self.reader).take() {
            let _ = reader.join();
        }
    }
}

impl PoolSession for BrokerSession {
    fn info(&self) -> SessionInfo {
        self.shared.info
    }

    fn alloc(&self, size: u64) -> Result<RegionLease, PoolError> {
        self.call_lease(Request::Alloc { size })
    }

    fn attach(&self, token: Token, want: Perms) -> Result<RegionLease, PoolError> {
        self.call_lease(Request::Attach { token, want })
    }

    /// Forgets the region first: even if the broker cannot be told now, a resumed session
    /// does not hand it back, so the restarted broker releases it.
    fn detach(&self, token: Token) -> Result<(), PoolError> {
        self.shared.forget(token);
        let result = self.call_unit(Request::Detach { token });
        if let Err(PoolError::Connection(_)) = &result
            && self.shared.options.reconnect
        {
            lock(&self.shared.undone).push(token);
        }
        result
    }

    fn grant(&self, token: Token, target: GrantTarget, perms: Perms) -> Result<(), PoolError> {
        self.call_unit(Request::Grant {
            token,
            target,
            perms,
        })
    }

    /// Kept (a duplicate) before asking, so a doorbell published while the broker is down
    /// is published on resume.
    fn publish_doorbell(&self, token: Token, doorbell: BorrowedFd<'_>) -> Result<(), PoolError> {
        self.doorbells_supported()?;
        if self.shared.options.reconnect
            && let Ok(copy) = doorbell.try_clone_to_owned()
        {
            lock(&self.shared.doorbells).insert(token, copy);
        }
        let result =
            unit_answer(self.call_with(Request::PublishDoorbell { token }, Some(doorbell))?);
        if let Err(e) = &result
            && !matches!(e, PoolError::Connection(_))
        {
            lock(&self.shared.doorbells).remove(&token);
        }
        result
    }

    fn withdraw_doorbell(&self, token: Token) -> Result<(), PoolError> {
        self.doorbells_supported()?;
        lock(&self.shared.doorbells).remove(&token);
        self.call_unit(Request::WithdrawDoorbell { token })
    }

    /// Reads the list page by page; if the set changes meanwhile (the generation moves), it
    /// starts over, so the answer is always one consistent set.
    fn peer_doorbells(&self, token: Token) -> Result<Vec<(DevId, OwnedFd)>, PoolError> {
        self.doorbells_supported()?;
        'attempt: for _ in 0..DOORBELL_LIST_ATTEMPTS {
            let first = self.doorbell_page(token, 0)?;
            let mut doorbells = first.doorbells;
            while doorbells.len() < first.total as usize {
                let start = u32::try_from(doorbells.len()).unwrap_or(u32::MAX);
                let page = self.doorbell_page(token, start)?;
                if page.generation != first.generation || page.doorbells.is_empty() {
                    continue 'attempt;
                }
                doorbells.extend(page.doorbells);
            }
            return Ok(doorbells);
        }
        Err(PoolError::Protocol(
            "Doorbell set kept changing while being listed".into(),
        ))
    }

    fn take_events(&self) -> Vec<PoolEvent> {
        self.shared.events.take()
    }

    fn event_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.shared.events.raw_fd())
    }
}

/// An operator connection: status queries and revocation.
pub struct ObserverClient {
    socket: OwnedFd,
    next_id: u64,
}

impl ObserverClient {
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, PoolError> {
        let socket = seqpacket::connect(path.as_ref()).map_err(PoolError::Connection)?;
        handshake(&socket, Role::Observer)?;
        Ok(ObserverClient { socket, next_id: 2 })
    }

    fn send(&mut self, request: Request) -> Result<u64, PoolError> {
        let id = self.next_id;
        self.next_id += 1;
        seqpacket::send(self.socket.as_fd(), &request.encode(id), None)
            .map_err(PoolError::Connection)?;
        Ok(id)
    }

    fn next_answer(&self, id: u64) -> Result<Reply, PoolError> {
        loop {
            let ((reply_id, reply), _fds) = recv_reply(&self.socket)?;
            if reply_id == id {
                return Ok(reply);
            }
        }
    }

    /// The broker's status report.
    pub fn status(&mut self) -> Result<PoolStatus, PoolError> {
        let id = self.send(Request::Status)?;
        let mut json = Vec::new();
        loop {
            match self.next_answer(id)? {
                Reply::StatusChunk {
                    total,
                    offset,
                    data,
                } => {
                    if total > MAX_STATUS_LEN || offset as usize != json.len() {
                        return Err(PoolError::Protocol("Status chunks out of order".into()));
                    }
                    json.extend_from_slice(&data);
                    if json.len() >= total as usize {
                        break;
                    }
                }
                Reply::Error(e) => return Err(e.into_pool_error()),
                other => {
                    return Err(PoolError::Protocol(format!("Unexpected answer: {other:?}")));
                }
            }
        }
        crate::status::from_json(&json)
            .map_err(|e| PoolError::Protocol(format!("Bad status report: {e}")))
    }

    /// Takes a region away from every holder.
    pub fn revoke(&mut self, token: Token) -> Result<(), PoolError> {
        let id = self.send(Request::Revoke { token })?;
        match self.next_answer(id)? {
            Reply::Ok => Ok(()),
            Reply::Error(e) => Err(e.into_pool_error()),
            other => Err(PoolError::Protocol(format!("Unexpected answer: {other:?}"))),
        }
    }
}

/// Asks the broker at `path` for its status report.
pub fn query_status(path: impl AsRef<Path>) -> Result<PoolStatus, PoolError> {
    ObserverClient::connect(path)?.status()
}

/// Asks the broker at `path` to revoke region `token`.
pub fn revoke(path: impl AsRef<Path>, token: Token) -> Result<(), PoolError> {
    ObserverClient::connect(path)?.revoke(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker that answers the hello, then each request with `before` followed by OK.
    /// Returns how many connections it accepted after the first (reconnections).
    fn scripted_broker(listener: OwnedFd, before: &'static [u8]) -> JoinHandle<usize> {
        std::thread::spawn(move || {
            let conn = seqpacket::accept(listener.as_fd()).unwrap();
            while let Ok(Some(packet)) = seqpacket::recv(conn.as_fd()) {
                let (id, request) = wire::decode_request(&packet.bytes).unwrap();
                let reply = match request {
                    Request::Hello { .. } => Reply::HelloOk {
                        version: MAX_VERSION,
                        gid: 1,
                        devid: 2,
                        resume_key: 3,
                    },
                    _ => {
                        seqpacket::send(conn.as_fd(), before, None).unwrap();
                        Reply::Ok
                    }
                };
                seqpacket::send(conn.as_fd(), &reply.encode(id), None).unwrap();
            }
            rustix::net::sockopt::set_socket_timeout(
                &listener,
                rustix::net::sockopt::Timeout::Recv,
                Some(Duration::from_millis(200)),
            )
            .unwrap();
            std::iter::from_fn(|| seqpacket::accept(listener.as_fd()).ok()).count()
        })
    }

    /// An empty packet reads like the end of the stream on SOCK_SEQPACKET; the session took
    /// it for a hang-up and reconnected while the broker still had it connected. Now it is
    /// a malformed message like any other: ignored, and the answer after it still arrives.
    #[test]
    fn test_an_empty_packet_from_the_broker_is_no_hang_up() {
        let path =
            std::env::temp_dir().join(format!("ism-empty-packet-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let broker = scripted_broker(seqpacket::listen(&path, 4).unwrap(), b"");
        let options = ClientOptions {
            backoff_min: Duration::from_millis(1),
            ..ClientOptions::default()
        };
        let session = BrokerSession::connect_with(&path, options, None).unwrap();
        session.detach(Token(5)).unwrap();
        session.detach(Token(6)).unwrap();
        assert!(session.is_connected());
        drop(session);
        assert_eq!(broker.join().unwrap(), 0, "the session reconnected");
        let _ = std::fs::remove_file(&path);
    }
}
