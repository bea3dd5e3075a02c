// SPDX-License-Identifier: Apache-2.0
//! The VMM side of the broker protocol: [`BrokerSession`] implements [`PoolSession`] over
//! the broker socket, and [`query_status`] / [`revoke`] serve operator tools.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::events::EventQueue;
use crate::local::DoorbellPage;
use crate::seqpacket;
use crate::session::{
    DevId, GrantTarget, Perms, PoolError, PoolEvent, PoolSession, RegionLease, SessionInfo, Token,
};
use crate::status::PoolStatus;
use crate::wire::{self, DOORBELL_VERSION, MAX_VERSION, MIN_VERSION, Reply, Request, Role};

/// How long a request waits for the broker's answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest status report accepted.
const MAX_STATUS_LEN: u32 = 64 << 20;

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

#[derive(Default)]
struct Inbox {
    answer: Option<Answer>,
    /// Set when the connection is gone; later requests fail with it.
    closed: Option<String>,
}

struct Shared {
    socket: OwnedFd,
    inbox: Mutex<Inbox>,
    arrived: Condvar,
    events: EventQueue,
}

/// A device's session with the host broker.
pub struct BrokerSession {
    shared: Arc<Shared>,
    info: SessionInfo,
    version: u16,
    next_id: AtomicU64,
    /// One request in flight at a time; replies are matched by id.
    request_lock: Mutex<()>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for BrokerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerSession")
            .field("info", &self.info)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// Sends a hello and returns (version, gid, devid) from the answer.
fn handshake(socket: &OwnedFd, role: Role) -> Result<(u16, u64, u64), PoolError> {
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
            },
        ) if (MIN_VERSION..=MAX_VERSION).contains(&version) => Ok((version, gid, devid)),
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
        Self::connect_with_thread_start(path, None)
    }

    /// [`connect`](Self::connect), running `thread_start` first on the session's reader
    /// thread (a VMM applies that thread's seccomp filter there).
    pub fn connect_with_thread_start(
        path: impl AsRef<Path>,
        thread_start: Option<Arc<dyn Fn() + Send + Sync>>,
    ) -> Result<Arc<BrokerSession>, PoolError> {
        let socket = seqpacket::connect(path.as_ref()).map_err(PoolError::Connection)?;
        let (version, gid, devid) = handshake(&socket, Role::Device)?;
        if devid == 0 {
            return Err(PoolError::Protocol("Broker assigned devid 0".into()));
        }
        let shared = Arc::new(Shared {
            socket,
            inbox: Mutex::new(Inbox::default()),
            arrived: Condvar::new(),
            events: EventQueue::new().map_err(PoolError::Connection)?,
        });
        let reader_shared = shared.clone();
        let reader = std::thread::Builder::new()
            .name("ism-pool-client".into())
            .spawn(move || {
                if let Some(hook) = thread_start {
                    hook();
                }
                read_loop(&reader_shared)
            })
            .map_err(PoolError::Connection)?;
        Ok(Arc::new(BrokerSession {
            shared,
            info: SessionInfo {
                gid,
                devid: DevId(devid),
            },
            version,
            next_id: AtomicU64::new(2),
            request_lock: Mutex::new(()),
            reader: Mutex::new(Some(reader)),
        }))
    }

    /// The protocol version agreed with the broker.
    pub fn version(&self) -> u16 {
        self.version
    }

    /// Sends `request` and waits for its answer.
    fn call(&self, request: Request) -> Result<(Reply, Vec<OwnedFd>), PoolError> {
        self.call_with(request, None)
    }

    /// Sends `request` with `fd` attached and waits for its answer.
    fn call_with(
        &self,
        request: Request,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(Reply, Vec<OwnedFd>), PoolError> {
        let _one_at_a_time = self.request_lock.lock().unwrap_or_else(|e| e.into_inner());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(reason) = &inbox.closed {
                return Err(connection_error(reason));
            }
        }
        seqpacket::send(self.shared.socket.as_fd(), &request.encode(id), fd)
            .map_err(PoolError::Connection)?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        let mut inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(answer) = inbox.answer.take() {
                // Answers to earlier requests that timed out are stale: drop them.
                if answer.id == id {
                    return Ok((answer.reply, answer.fds));
                }
                continue;
            }
            if let Some(reason) = &inbox.closed {
                return Err(connection_error(reason));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PoolError::Connection(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "No answer from broker",
                )));
            }
            inbox = self
                .shared
                .arrived
                .wait_timeout(inbox, deadline - now)
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
                check_lease_fd(&fd, size, writable)?;
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
        if self.version < DOORBELL_VERSION {
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

/// Reads every broker message: answers go to the waiting request, events to the queue.
fn read_loop(shared: &Shared) {
    let reason = loop {
        match recv_reply(&shared.socket) {
            Ok(((_, Reply::Event(event)), _)) => shared.events.push(event),
            Ok(((id, reply), fds)) => {
                let mut inbox = shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
                inbox.answer = Some(Answer { id, reply, fds });
                shared.arrived.notify_all();
            }
            Err(PoolError::Protocol(text)) => {
                log::warn!("Ignoring bad message from broker: {text}");
            }
            // Requests then fail with Connection(reason): keep the cause, not the
            // "connection failed" the request's error says already.
            Err(PoolError::Connection(cause)) => break cause.to_string(),
            Err(e) => break e.to_string(),
        }
    };
    let mut inbox = shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
    inbox.closed = Some(reason);
    shared.arrived.notify_all();
}

impl Drop for BrokerSession {
    fn drop(&mut self) {
        // The broker sees the hang-up and releases every region this session held.
        seqpacket::shutdown(self.shared.socket.as_fd());
        if let Some(reader) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = reader.join();
        }
    }
}

impl PoolSession for BrokerSession {
    fn info(&self) -> SessionInfo {
        self.info
    }

    fn alloc(&self, size: u64) -> Result<RegionLease, PoolError> {
        self.call_lease(Request::Alloc { size })
    }

    fn attach(&self, token: Token, want: Perms) -> Result<RegionLease, PoolError> {
        self.call_lease(Request::Attach { token, want })
    }

    fn detach(&self, token: Token) -> Result<(), PoolError> {
        self.call_unit(Request::Detach { token })
    }

    fn grant(&self, token: Token, target: GrantTarget, perms: Perms) -> Result<(), PoolError> {
        self.call_unit(Request::Grant {
            token,
            target,
            perms,
        })
    }

    fn publish_doorbell(&self, token: Token, doorbell: BorrowedFd<'_>) -> Result<(), PoolError> {
        self.doorbells_supported()?;
        unit_answer(self.call_with(Request::PublishDoorbell { token }, Some(doorbell))?)
    }

    fn withdraw_doorbell(&self, token: Token) -> Result<(), PoolError> {
        self.doorbells_supported()?;
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
