// SPDX-License-Identifier: Apache-2.0
//! The broker's per-connection request handler: packets in, replies (and lease fds) out.
//!
//! It owns no socket, so tests and the fuzz target drive it with plain byte slices.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

pub use crate::admission::PeerInfo;
use crate::local::{LocalPool, LocalSession, SessionOwner};
use crate::session::{DevId, PoolError, PoolEvent, PoolSession};
use crate::wire::{
    self, DOORBELL_VERSION, MAX_DOORBELLS_PER_REPLY, MAX_MESSAGE_LEN, MAX_VERSION, MIN_VERSION,
    RESUME_VERSION, Reply, Request, Role, STATUS_CHUNK_LEN, WireError, error_code,
};

/// Per-broker rules a connection applies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionOptions {
    /// Refuse device sessions whose read-only leases the kernel would not enforce (peers
    /// running as root or as the broker's uid, or holding CAP_DAC_OVERRIDE/CAP_FOWNER).
    pub require_uid_split: bool,
}

/// One message to send, with the descriptors it carries: one lease fd with LEASE, one
/// doorbell per devid with DOORBELLS, none otherwise.
#[derive(Debug)]
pub struct Outgoing {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Outgoing {
    fn reply(id: u64, reply: &Reply) -> Self {
        Outgoing {
            bytes: reply.encode(id),
            fds: Vec::new(),
        }
    }

    fn error(id: u64, error: WireError) -> Self {
        Outgoing::reply(id, &Reply::Error(error))
    }
}

/// What handling one packet produced.
#[derive(Debug, Default)]
pub struct Handled {
    pub out: Vec<Outgoing>,
    /// Close the connection after sending `out`.
    pub close: bool,
    /// The request may have changed what the state file records: save it before sending
    /// `out`.
    pub persist: bool,
}

enum State {
    AwaitingHello,
    Device {
        session: Arc<LocalSession>,
        version: u16,
    },
    Observer {
        version: u16,
    },
}

/// The broker side of one client connection.
pub struct Connection {
    pool: Arc<LocalPool>,
    peer: PeerInfo,
    options: ConnectionOptions,
    state: State,
}

impl Connection {
    pub fn new(pool: Arc<LocalPool>, peer: PeerInfo) -> Self {
        Self::with_options(pool, peer, ConnectionOptions::default())
    }

    pub fn with_options(pool: Arc<LocalPool>, peer: PeerInfo, options: ConnectionOptions) -> Self {
        Connection {
            pool,
            peer,
            options,
            state: State::AwaitingHello,
        }
    }

    /// The pool this connection serves.
    pub fn pool(&self) -> &Arc<LocalPool> {
        &self.pool
    }

    /// Whether the client said hello as an observer.
    pub fn is_observer(&self) -> bool {
        matches!(self.state, State::Observer { .. })
    }

    /// The pool session behind this connection, once it said hello as a device.
    pub fn session(&self) -> Option<&Arc<LocalSession>> {
        match &self.state {
            State::Device { session, .. } => Some(session),
            _ => None,
        }
    }

    /// Whether the client has said hello yet.
    pub fn said_hello(&self) -> bool {
        !matches!(self.state, State::AwaitingHello)
    }

    /// Pending pool events of this connection's session, as messages. A version-1 client
    /// does not know DOORBELLS_CHANGED and never publishes doorbells: it does not get it.
    pub fn drain_events(&self) -> Vec<Outgoing> {
        let State::Device { session, version } = &self.state else {
            return Vec::new();
        };
        session
            .take_events()
            .into_iter()
            .filter(|event| {
                *version >= DOORBELL_VERSION || !matches!(event, PoolEvent::DoorbellsChanged { .. })
            })
            .map(|event| Outgoing::reply(0, &Reply::Event(event)))
            .collect()
    }

    /// Handles one received packet whose descriptors were already closed: `fds_attached`
    /// counts them. A request that needs a descriptor is refused.
    pub fn handle_packet(
        &mut self,
        packet: &[u8],
        truncated: bool,
        fds_attached: usize,
    ) -> Handled {
        if fds_attached > 0 {
            let one_answer = matches!(self.state, State::AwaitingHello)
                || (self.is_observer() && !self.peer.trusted);
            return Handled {
                out: vec![Outgoing::error(
                    0,
                    WireError::protocol("Unexpected file descriptors from client"),
                )],
                close: one_answer,
                persist: false,
            };
        }
        self.handle_message(packet, truncated, Vec::new())
    }

    /// Handles one received packet with the descriptors that came with it. `truncated` says
    /// the packet was longer than the receive buffer. Only PUBLISH_DOORBELL may carry a
    /// descriptor (exactly one); descriptors sent with anything else are closed unused.
    pub fn handle_message(&mut self, packet: &[u8], truncated: bool, fds: Vec<OwnedFd>) -> Handled {
        // Before hello, and for an observer that is not trusted, one answer is all there is.
        let one_answer = matches!(self.state, State::AwaitingHello)
            || (self.is_observer() && !self.peer.trusted);
        let refuse = |id: u64, error: WireError| Handled {
            out: vec![Outgoing::error(id, error)],
            close: one_answer,
            persist: false,
        };
        if truncated || packet.len() > MAX_MESSAGE_LEN {
            return refuse(
                0,
                WireError::protocol(format!("Message longer than {MAX_MESSAGE_LEN} bytes")),
            );
        }
        let (id, request) = match wire::decode_request(packet) {
            Ok(decoded) => decoded,
            Err(e) => {
                return refuse(
                    e.id(),
                    WireError::protocol(format!("Malformed message: {e}")),
                );
            }
        };
        let publishing = matches!(
            request,
            Request::PublishDoorbell { .. } | Request::Reregister { .. }
        );
        if fds.len() != usize::from(publishing) {
            let text = if publishing {
                "PUBLISH_DOORBELL and REREGISTER need exactly one descriptor"
            } else {
                "Unexpected file descriptors from client"
            };
            return refuse(id, WireError::protocol(text));
        }
        match (&self.state, request) {
            (
                State::AwaitingHello,
                Request::Hello {
                    min_version,
                    max_version,
                    role,
                },
            ) => self.hello(id, min_version, max_version, role, None),
            (
                State::AwaitingHello,
                Request::Resume {
                    min_version,
                    max_version,
                    devid,
                    key,
                },
            ) => self.hello(
                id,
                min_version.max(RESUME_VERSION),
                max_version,
                Role::Device,
                Some((devid, key)),
            ),
            (State::AwaitingHello, _) => refuse(id, WireError::protocol("Expected hello first")),
            (_, Request::Hello { .. } | Request::Resume { .. }) => {
                refuse(id, WireError::protocol("Hello sent twice"))
            }
            (State::Device { session, version }, request) => {
                let persist = matches!(
                    request,
                    Request::Alloc { .. }
                        | Request::Attach { .. }
                        | Request::Detach { .. }
                        | Request::Grant { .. }
                        | Request::Reregister { .. }
                        | Request::ResumeDone
                );
                Handled {
                    out: vec![device_request(session, *version, id, request, fds)],
                    close: false,
                    persist,
                }
            }
            // An observer that is not trusted gets the one answer it asked for (a refusal,
            // as it may do nothing) and is closed, so it cannot sit on a slot.
            (State::Observer { version }, request) => Handled {
                persist: matches!(request, Request::Revoke { .. }),
                out: self.observer_request(*version, id, request),
                close: !self.peer.trusted,
            },
        }
    }

    /// HELLO, or RESUME when `resume` names the session to take back.
    fn hello(
        &mut self,
        id: u64,
        min_version: u16,
        max_version: u16,
        role: Role,
        resume: Option<(DevId, u64)>,
    ) -> Handled {
        let version = max_version.min(MAX_VERSION);
        if version < min_version.max(MIN_VERSION) {
            return Handled {
                persist: false,
                out: vec![Outgoing::error(
                    id,
                    WireError::protocol(format!(
                        "Unsupported protocol versions {min_version}..={max_version}; broker speaks {MIN_VERSION}..={MAX_VERSION}"
                    )),
                )],
                close: true,
            };
        }
        let gid = self.pool.gid();
        let devid = match role {
            Role::Device if !self.peer.read_only_enforced && self.options.require_uid_split => {
                log::warn!(
                    "Refused a device session from pid {:?} uid {:?}: its read-only leases would not be enforced (--require-uid-split)",
                    self.peer.pid,
                    self.peer.uid
                );
                return Handled {
                    persist: false,
                    out: vec![Outgoing::error(
                        id,
                        WireError::protocol(
                            "Refused: this broker requires VMMs to run under a uid other than root and the broker's, without CAP_DAC_OVERRIDE or CAP_FOWNER (--require-uid-split)",
                        ),
                    )],
                    close: true,
                };
            }
            Role::Device => {
                let opened = match resume {
                    Some((devid, key)) => self
                        .pool
                        .resume_session(self.session_owner(), devid, key)
                        .map_err(|e| {
                            log::warn!(
                                "Refused to resume device {} for pid {:?}: {e}",
                                devid.0,
                                self.peer.pid
                            );
                            WireError {
                                code: error_code::RESUME_REFUSED,
                                ..WireError::from_pool_error(&e)
                            }
                        }),
                    None => self
                        .pool
                        .open_session(self.session_owner())
                        .map_err(|e| WireError::for_version(&e, version)),
                };
                match opened {
                    Ok(session) => {
                        let devid = session.devid().0;
                        if resume.is_some() {
                            log::info!("Device {devid} resumed its session");
                        }
                        self.state = State::Device { session, version };
                        devid
                    }
                    Err(error) => {
                        return Handled {
                            out: vec![Outgoing::error(id, error)],
                            close: true,
                            persist: false,
                        };
                    }
                }
            }
            Role::Observer => {
                self.state = State::Observer { version };
                0
            }
        };
        let resume_key = match &self.state {
            State::Device { session, .. } if version >= RESUME_VERSION => session.resume_key(),
            _ => 0,
        };
        Handled {
            out: vec![Outgoing::reply(
                id,
                &Reply::HelloOk {
                    version,
                    gid,
                    devid,
                    resume_key,
                },
            )],
            close: false,
            persist: devid != 0,
        }
    }

    /// The pool's record of this peer; warns once per device connection whose read-only
    /// leases are advisory only.
    fn session_owner(&self) -> SessionOwner {
        if self.peer.uid.is_some() && !self.peer.read_only_enforced {
            log::warn!(
                "Device session from pid {:?} uid {:?}: read-only leases to it are ADVISORY; as root, the broker's uid or with CAP_DAC_OVERRIDE/CAP_FOWNER it can reopen them read-write. Run VMMs under their own uid (see --require-uid-split)",
                self.peer.pid,
                self.peer.uid
            );
        }
        SessionOwner {
            pid: self.peer.pid,
            uid: self.peer.uid,
            vm: self.peer.vm.clone(),
            read_only_enforced: self.peer.uid.map(|_| self.peer.read_only_enforced),
        }
    }

    fn observer_request(&self, version: u16, id: u64, request: Request) -> Vec<Outgoing> {
        let untrusted = || {
            vec![Outgoing::error(
                id,
                WireError::protocol("Refused: only root or the broker's user may do this"),
            )]
        };
        match request {
            Request::Status if !self.peer.trusted => untrusted(),
            Request::Status => {
                let mut status = self.pool.status().for_version(version);
                status.protocol_version = version;
                status_chunks(id, &status)
            }
            Request::Revoke { .. } if !self.peer.trusted => untrusted(),
            Request::Revoke { token } => {
                vec![result_reply(id, version, self.pool.revoke(token))]
            }
            _ => vec![Outgoing::error(
                id,
                WireError::protocol("Not allowed on an observer connection"),
            )],
        }
    }
}

fn result_reply(id: u64, version: u16, result: Result<(), PoolError>) -> Outgoing {
    match result {
        Ok(()) => Outgoing::reply(id, &Reply::Ok),
        Err(e) => Outgoing::error(id, WireError::for_version(&e, version)),
    }
}

fn device_request(
    session: &LocalSession,
    version: u16,
    id: u64,
    request: Request,
    fds: Vec<OwnedFd>,
) -> Outgoing {
    let doorbell_request = matches!(
        request,
        Request::PublishDoorbell { .. }
            | Request::WithdrawDoorbell { .. }
            | Request::PeerDoorbells { .. }
    );
    let resume_request = matches!(request, Request::Reregister { .. } | Request::ResumeDone);
    if resume_request && version < RESUME_VERSION {
        return Outgoing::error(
            id,
            WireError::protocol(format!("Resuming needs protocol version {RESUME_VERSION}")),
        );
    }
    if doorbell_request && version < DOORBELL_VERSION {
        return Outgoing::error(
            id,
            WireError::protocol(format!(
                "Doorbells need protocol version {DOORBELL_VERSION}"
            )),
        );
    }
    let lease = match request {
        Request::Reregister { token } => {
            let Some(fd) = fds.into_iter().next() else {
                return Outgoing::error(id, WireError::protocol("Region descriptor missing"));
            };
            return result_reply(id, version, session.reregister(token, fd));
        }
        Request::ResumeDone => {
            session.finish_resume();
            return Outgoing::reply(id, &Reply::Ok);
        }
        Request::PublishDoorbell { token } => {
            let Some(doorbell) = fds.first() else {
                return Outgoing::error(id, WireError::protocol("Doorbell descriptor missing"));
            };
            return result_reply(
                id,
                version,
                session.publish_doorbell(token, doorbell.as_fd()),
            );
        }
        Request::WithdrawDoorbell { token } => {
            return result_reply(id, version, session.withdraw_doorbell(token));
        }
        Request::PeerDoorbells { token, start } => {
            return doorbells_reply(session, version, id, token, start);
        }
        Request::Alloc { size } => session.alloc(size),
        Request::Attach { token, want } => session.attach(token, want),
        Request::Detach { token } => return result_reply(id, version, session.detach(token)),
        Request::Grant {
            token,
            target,
            perms,
        } => return result_reply(id, version, session.grant(token, target, perms)),
        Request::Status | Request::Revoke { .. } => {
            return Outgoing::error(
                id,
                WireError::protocol("Not allowed on a device connection; connect as observer"),
            );
        }
        Request::Hello { .. } | Request::Resume { .. } => {
            return Outgoing::error(id, WireError::protocol("Hello sent twice"));
        }
    };
    match lease {
        Ok(lease) => Outgoing {
            bytes: Reply::Lease {
                token: lease.token,
                size: lease.size,
                writable: lease.writable,
            }
            .encode(id),
            fds: vec![lease.fd],
        },
        Err(e) => Outgoing::error(id, WireError::for_version(&e, version)),
    }
}

fn doorbells_reply(
    session: &LocalSession,
    version: u16,
    id: u64,
    token: crate::session::Token,
    start: u32,
) -> Outgoing {
    let page = match session.peer_doorbell_page(token, start as usize, MAX_DOORBELLS_PER_REPLY) {
        Ok(page) => page,
        Err(e) => return Outgoing::error(id, WireError::for_version(&e, version)),
    };
    // A start past the end gets an empty page with the true total.
    let start = start.min(page.total);
    let (devids, fds) = page.doorbells.into_iter().unzip();
    Outgoing {
        bytes: Reply::Doorbells {
            generation: page.generation,
            total: page.total,
            start,
            devids,
        }
        .encode(id),
        fds,
    }
}

fn status_chunks(id: u64, status: &crate::status::PoolStatus) -> Vec<Outgoing> {
    let json = crate::status::to_json(status);
    let Ok(total) = u32::try_from(json.len()) else {
        return vec![Outgoing::error(id, WireError::protocol("Status too large"))];
    };
    let mut out = Vec::new();
    let mut offset = 0usize;
    loop {
        let end = (offset + STATUS_CHUNK_LEN).min(json.len());
        out.push(Outgoing::reply(
            id,
            &Reply::StatusChunk {
                total,
                offset: offset as u32,
                data: json[offset..end].to_vec(),
            },
        ));
        offset = end;
        if offset >= json.len() {
            return out;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolConfig;
    use crate::session::{GrantTarget, Perms, PoolEvent, Token};
    use crate::wire::decode_reply;

    fn pool() -> Arc<LocalPool> {
        LocalPool::new(PoolConfig {
            size: 1 << 20,
            per_vm_limit: Some(1 << 19),
            ..PoolConfig::default()
        })
        .unwrap()
    }

    fn peer(trusted: bool) -> PeerInfo {
        PeerInfo {
            trusted,
            ..PeerInfo::default()
        }
    }

    fn hello(role: Role) -> Vec<u8> {
        Request::Hello {
            min_version: 1,
            max_version: 1,
            role,
        }
        .encode(1)
    }

    fn one_reply(handled: &Handled) -> (u64, Reply) {
        assert_eq!(handled.out.len(), 1);
        decode_reply(&handled.out[0].bytes).unwrap()
    }

    fn device(pool: &Arc<LocalPool>) -> Connection {
        let mut conn = Connection::new(pool.clone(), peer(false));
        let handled = conn.handle_packet(&hello(Role::Device), false, 0);
        assert!(matches!(one_reply(&handled).1, Reply::HelloOk { devid, .. } if devid != 0));
        conn
    }

    #[test]
    fn test_requests_before_hello_close_the_connection() {
        let mut conn = Connection::new(pool(), peer(false));
        let handled = conn.handle_packet(&Request::Alloc { size: 4096 }.encode(5), false, 0);
        assert!(handled.close);
        assert!(matches!(one_reply(&handled), (5, Reply::Error(_))));
        let handled = conn.handle_packet(b"junk", false, 0);
        assert!(handled.close);
    }

    #[test]
    fn test_version_mismatch_is_refused() {
        let mut conn = Connection::new(pool(), peer(false));
        let packet = Request::Hello {
            min_version: MAX_VERSION + 1,
            max_version: MAX_VERSION + 7,
            role: Role::Device,
        }
        .encode(1);
        let handled = conn.handle_packet(&packet, false, 0);
        assert!(handled.close);
        match one_reply(&handled).1 {
            Reply::Error(e) => assert!(e.text.contains("Unsupported protocol versions")),
            other => panic!("unexpected {other:?}"),
        }
        // A client that speaks newer versions too gets the highest common one.
        let mut conn = Connection::new(pool(), peer(false));
        let packet = Request::Hello {
            min_version: 1,
            max_version: 9,
            role: Role::Device,
        }
        .encode(1);
        let handled = conn.handle_packet(&packet, false, 0);
        assert!(matches!(
            one_reply(&handled).1,
            Reply::HelloOk {
                version: MAX_VERSION,
                ..
            }
        ));
        // A version-1 client still gets version 1.
        let mut conn = Connection::new(pool(), peer(false));
        let handled = conn.handle_packet(&hello(Role::Device), false, 0);
        assert!(matches!(
            one_reply(&handled).1,
            Reply::HelloOk { version: 1, .. }
        ));
    }

    /// Version 4: a device session gets a resume key (older ones keep the 24-byte
    /// HELLO_OK); a RESUME the pool cannot honour is error 16 and closes; resume requests
    /// on an older connection are refused; what changes the pool asks to be persisted.
    #[test]
    fn test_resume_key_and_refused_resume() {
        let pool = pool();
        let mut conn = Connection::new(pool.clone(), peer(false));
        let packet = Request::Hello {
            min_version: 1,
            max_version: RESUME_VERSION,
            role: Role::Device,
        }
        .encode(1);
        let handled = conn.handle_packet(&packet, false, 0);
        assert!(handled.persist);
        let Reply::HelloOk {
            devid, resume_key, ..
        } = one_reply(&handled).1
        else {
            panic!("no hello");
        };
        assert_ne!(resume_key, 0);
        assert_eq!(resume_key, conn.session().unwrap().resume_key());
        let handled = conn.handle_packet(&Request::Alloc { size: 4096 }.encode(2), false, 0);
        assert!(handled.persist);
        let handled = conn.handle_packet(&Request::ResumeDone.encode(3), false, 0);
        assert!(matches!(one_reply(&handled).1, Reply::Ok));
        let old = device(&pool);
        assert!(matches!(
            old.session().map(|s| s.devid()),
            Some(d) if d.0 != devid
        ));
        let mut old = old;
        let handled = old.handle_packet(&Request::ResumeDone.encode(4), false, 0);
        assert!(matches!(one_reply(&handled).1, Reply::Error(e) if e.code == error_code::PROTOCOL));
        // Nobody waits to be resumed in a fresh pool, whatever the key.
        let mut conn = Connection::new(pool, peer(false));
        let resume = Request::Resume {
            min_version: RESUME_VERSION,
            max_version: RESUME_VERSION,
            devid: DevId(devid),
            key: resume_key,
        };
        let handled = conn.handle_packet(&resume.encode(1), false, 0);
        assert!(handled.close);
        assert!(matches!(
            one_reply(&handled).1,
            Reply::Error(e) if e.code == error_code::RESUME_REFUSED
        ));
    }

    #[test]
    fn test_alloc_returns_lease_with_fd_and_errors_are_typed() {
        let pool = pool();
        let mut conn = device(&pool);
        let handled = conn.handle_packet(&Request::Alloc { size: 8192 }.encode(9), false, 0);
        assert_eq!(handled.out[0].fds.len(), 1);
        assert!(matches!(
            one_reply(&handled),
            (
                9,
                Reply::Lease {
                    size: 8192,
                    writable: true,
                    ..
                }
            )
        ));
        let handled = conn.handle_packet(&Request::Alloc { size: 1 << 19 }.encode(10), false, 0);
        match one_reply(&handled) {
            (10, Reply::Error(e)) => {
                assert!(matches!(
                    e.into_pool_error(),
                    PoolError::QuotaExceeded { .. }
                ))
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn test_malformed_packets_get_errors_and_connection_survives() {
        let pool = pool();
        let mut conn = device(&pool);
        let mut cut = Request::Attach {
            token: Token(1),
            want: Perms::NONE,
        }
        .encode(4);
        cut.truncate(20);
        for (packet, truncated, fds) in [
            (cut.as_slice(), false, 0),
            (&[1u8, 2, 3][..], false, 0),
            (&Request::Status.encode(6)[..], true, 0),
            (&Request::Status.encode(6)[..], false, 1),
        ] {
            let handled = conn.handle_packet(packet, truncated, fds);
            assert!(!handled.close);
            assert!(matches!(one_reply(&handled).1, Reply::Error(_)));
        }
        let handled = conn.handle_packet(&Request::Alloc { size: 4096 }.encode(11), false, 0);
        assert!(matches!(one_reply(&handled), (11, Reply::Lease { .. })));
    }

    #[test]
    fn test_events_are_drained_as_messages() {
        let pool = pool();
        let mut owner = device(&pool);
        let mut peer_conn = device(&pool);
        let handled = owner.handle_packet(&Request::Alloc { size: 4096 }.encode(2), false, 0);
        let Reply::Lease { token, .. } = one_reply(&handled).1 else {
            panic!("no lease");
        };
        let grant = Request::Grant {
            token,
            target: GrantTarget::Default,
            perms: Perms(Perms::ATTACH.0 | Perms::READ.0),
        };
        owner.handle_packet(&grant.encode(3), false, 0);
        let attach = Request::Attach {
            token,
            want: Perms::NONE,
        };
        let handled = peer_conn.handle_packet(&attach.encode(4), false, 0);
        assert!(matches!(
            one_reply(&handled).1,
            Reply::Lease {
                writable: false,
                ..
            }
        ));
        let events = owner.drain_events();
        assert_eq!(events.len(), 1);
        let peer_devid = peer_conn.session().unwrap().devid();
        assert_eq!(
            decode_reply(&events[0].bytes).unwrap().1,
            Reply::Event(PoolEvent::PeerAttached {
                token,
                peer: peer_devid
            })
        );
    }

    fn device_v(pool: &Arc<LocalPool>, version: u16) -> Connection {
        let mut conn = Connection::new(pool.clone(), peer(false));
        let hello = Request::Hello {
            min_version: version,
            max_version: version,
            role: Role::Device,
        };
        let handled = conn.handle_packet(&hello.encode(1), false, 0);
        assert!(matches!(one_reply(&handled).1, Reply::HelloOk { version: v, .. } if v == version));
        conn
    }

    fn eventfd() -> OwnedFd {
        rustix::event::eventfd(0, rustix::event::EventfdFlags::NONBLOCK).unwrap()
    }

    #[test]
    fn test_doorbells_travel_with_descriptors_on_version_2_only() {
        let pool = pool();
        let mut owner = device_v(&pool, 2);
        let mut peer_conn = device_v(&pool, 2);
        let mut old = device_v(&pool, 1);
        let handled = owner.handle_packet(&Request::Alloc { size: 4096 }.encode(2), false, 0);
        let Reply::Lease { token, .. } = one_reply(&handled).1 else {
            panic!("no lease");
        };
        let grant = Request::Grant {
            token,
            target: GrantTarget::Default,
            perms: Perms(Perms::ATTACH.0 | Perms::READ.0),
        };
        owner.handle_packet(&grant.encode(3), false, 0);
        let attach = Request::Attach {
            token,
            want: Perms::NONE,
        };
        for conn in [&mut peer_conn, &mut old] {
            let handled = conn.handle_packet(&attach.encode(4), false, 0);
            assert!(matches!(one_reply(&handled).1, Reply::Lease { .. }));
        }
        for conn in [&owner, &peer_conn, &old] {
            conn.drain_events();
        }
        let publish = Request::PublishDoorbell { token }.encode(5);
        // Without its descriptor, or with two, it is refused.
        for fds in [vec![], vec![eventfd(), eventfd()]] {
            let handled = owner.handle_message(&publish, false, fds);
            assert!(matches!(one_reply(&handled).1, Reply::Error(_)));
        }
        let doorbell = eventfd();
        let copy = doorbell.try_clone().unwrap();
        let handled = owner.handle_message(&publish, false, vec![copy]);
        assert_eq!(one_reply(&handled), (5, Reply::Ok));
        // The version-2 peer hears of it; the version-1 peer does not (it would not
        // understand the event).
        assert_eq!(peer_conn.drain_events().len(), 1);
        assert!(old.drain_events().is_empty());
        let handled = peer_conn.handle_packet(
            &Request::PeerDoorbells { token, start: 0 }.encode(6),
            false,
            0,
        );
        assert_eq!(handled.out[0].fds.len(), 1);
        let owner_devid = owner.session().unwrap().devid();
        assert_eq!(
            one_reply(&handled),
            (
                6,
                Reply::Doorbells {
                    generation: 1,
                    total: 1,
                    start: 0,
                    devids: vec![owner_devid],
                }
            )
        );
        rustix::io::write(&handled.out[0].fds[0], &1u64.to_ne_bytes()).unwrap();
        let mut value = [0u8; 8];
        assert_eq!(rustix::io::read(&doorbell, &mut value).unwrap(), 8);
        // A start past the end is an empty page with the true total.
        let handled = peer_conn.handle_packet(
            &Request::PeerDoorbells { token, start: 9 }.encode(7),
            false,
            0,
        );
        assert!(matches!(
            one_reply(&handled).1,
            Reply::Doorbells { total: 1, start: 1, ref devids, .. } if devids.is_empty()
        ));
        // Version 1 may not use the doorbell requests at all.
        let handled = old.handle_packet(
            &Request::PeerDoorbells { token, start: 0 }.encode(8),
            false,
            0,
        );
        assert!(handled.out[0].fds.is_empty());
        assert!(matches!(one_reply(&handled).1, Reply::Error(_)));
        // Descriptors on any other request are refused.
        let handled = peer_conn.handle_message(
            &Request::Alloc { size: 4096 }.encode(9),
            false,
            vec![eventfd()],
        );
        assert!(matches!(one_reply(&handled), (9, Reply::Error(_))));
    }

    #[test]
    fn test_status_needs_trusted_observer() {
        let pool = pool();
        let _dev = device(&pool);
        let mut conn = Connection::new(pool.clone(), peer(false));
        conn.handle_packet(&hello(Role::Observer), false, 0);
        let handled = conn.handle_packet(&Request::Status.encode(2), false, 0);
        assert!(matches!(one_reply(&handled).1, Reply::Error(_)));
        let mut conn = Connection::new(pool.clone(), peer(true));
        conn.handle_packet(&hello(Role::Observer), false, 0);
        let handled = conn.handle_packet(&Request::Status.encode(2), false, 0);
        let Reply::StatusChunk {
            total,
            offset,
            data,
        } = one_reply(&handled).1
        else {
            panic!("no status");
        };
        assert_eq!((offset, data.len()), (0, total as usize));
        let status = crate::status::from_json(&data).unwrap();
        assert_eq!(status.sessions.len(), 1);
        assert_eq!(status.protocol_version, 1);
        let handled = conn.handle_packet(&Request::Alloc { size: 4096 }.encode(3), false, 0);
        assert!(matches!(one_reply(&handled).1, Reply::Error(_)));
    }

    #[test]
    fn test_untrusted_observer_is_closed_after_one_answer() {
        let pool = pool();
        for packet in [Request::Status.encode(2), b"junk".to_vec()] {
            let mut conn = Connection::new(pool.clone(), peer(false));
            let handled = conn.handle_packet(&hello(Role::Observer), false, 0);
            assert!(!handled.close);
            let handled = conn.handle_packet(&packet, false, 0);
            assert!(handled.close);
            assert!(matches!(one_reply(&handled).1, Reply::Error(_)));
        }
        let mut conn = Connection::new(pool.clone(), peer(true));
        conn.handle_packet(&hello(Role::Observer), false, 0);
        assert!(!conn.handle_packet(&b"junk"[..], false, 0).close);
        assert!(
            !conn
                .handle_packet(&Request::Status.encode(3), false, 0)
                .close
        );
    }

    #[test]
    fn test_uid_split_is_required_when_asked() {
        let pool = pool();
        let strict = ConnectionOptions {
            require_uid_split: true,
        };
        let root = PeerInfo {
            uid: Some(0),
            trusted: true,
            vmm: true,
            ..PeerInfo::default()
        };
        let mut conn = Connection::with_options(pool.clone(), root.clone(), strict);
        let handled = conn.handle_packet(&hello(Role::Device), false, 0);
        assert!(handled.close);
        match one_reply(&handled).1 {
            Reply::Error(e) => assert!(e.text.contains("--require-uid-split"), "{e:?}"),
            other => panic!("unexpected {other:?}"),
        }
        // Without the option the session opens, and the status says its read-only leases
        // are advisory; an unprivileged VMM's are enforced.
        let mut lax = Connection::new(
            pool.clone(),
            PeerInfo {
                uid: Some(0),
                trusted: true,
                ..PeerInfo::default()
            },
        );
        lax.handle_packet(&hello(Role::Device), false, 0);
        let vmm = PeerInfo {
            uid: Some(107),
            vmm: true,
            read_only_enforced: true,
            ..PeerInfo::default()
        };
        let mut split = Connection::with_options(pool.clone(), vmm, strict);
        let handled = split.handle_packet(&hello(Role::Device), false, 0);
        assert!(matches!(one_reply(&handled).1, Reply::HelloOk { .. }));
        let enforced: Vec<_> = pool
            .status()
            .sessions
            .iter()
            .map(|s| (s.uid, s.read_only_enforced))
            .collect();
        assert_eq!(enforced, [(Some(0), Some(false)), (Some(107), Some(true))]);
    }

    #[test]
    fn test_old_observers_get_a_status_without_new_fields() {
        let pool = pool();
        let _dev = device(&pool);
        for (version, has_new_fields) in [(2, false), (3, true)] {
            let mut conn = Connection::new(pool.clone(), peer(true));
            let hello = Request::Hello {
                min_version: 1,
                max_version: version,
                role: Role::Observer,
            };
            conn.handle_packet(&hello.encode(1), false, 0);
            let handled = conn.handle_packet(&Request::Status.encode(2), false, 0);
            let Reply::StatusChunk { data, .. } = one_reply(&handled).1 else {
                panic!("no status");
            };
            let json = String::from_utf8(data).unwrap();
            assert_eq!(json.contains("\"vm\""), has_new_fields, "{json}");
            assert_eq!(json.contains("per_vm_regions"), has_new_fields, "{json}");
        }
    }

    #[test]
    fn test_large_status_is_chunked() {
        let pool = LocalPool::new(PoolConfig {
            size: 4096 * 1024,
            ..PoolConfig::default()
        })
        .unwrap();
        let session = pool.session().unwrap();
        let _leases: Vec<_> = (0..600).map(|_| session.alloc(4096).unwrap()).collect();
        let chunks = status_chunks(1, &pool.status());
        assert!(chunks.len() > 1);
        let mut json = Vec::new();
        for chunk in &chunks {
            let Reply::StatusChunk { offset, data, .. } = decode_reply(&chunk.bytes).unwrap().1
            else {
                panic!("not a chunk");
            };
            assert_eq!(offset as usize, json.len());
            json.extend_from_slice(&data);
        }
        let status = crate::status::from_json(&json).unwrap();
        assert_eq!(status.regions.len(), 600);
    }
}
