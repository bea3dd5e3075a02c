// SPDX-License-Identifier: Apache-2.0
//! The broker daemon's server: a listening socket, one thread per client connection, all
//! sharing one [`LocalPool`].

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::{AdmissionPolicy, ConnectionCount, ConnectionSlot, PeerInfo};
use crate::handler::{Connection, ConnectionOptions, Outgoing};
use crate::local::LocalPool;
use crate::seqpacket;
use crate::state::StateFile;
use crate::wire::{Reply, WireError};

/// A client must say hello within this time, or it is disconnected.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Socket mode unless configured: owner and group may connect, nobody else.
pub const DEFAULT_SOCKET_MODE: u32 = 0o660;
/// How long an observer may wait between requests unless configured.
pub const DEFAULT_OBSERVER_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not read its replies for this long is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a restarted broker waits for the sessions it recorded unless configured.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(60);
/// How often sessions waiting for a resume are checked against the grace period.
const GRACE_CHECK: Duration = Duration::from_secs(1);

/// Failures while starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("Another broker is already listening on {0}")]
    AlreadyRunning(PathBuf),
    #[error("Failed to remove stale socket {0}")]
    RemoveStale(PathBuf, #[source] io::Error),
    #[error("Failed to listen on {0}")]
    Listen(PathBuf, #[source] io::Error),
    #[error("Failed to accept a connection")]
    Accept(#[source] io::Error),
    #[error("Invalid socket mode {0:#o}: only permission bits (0..=0o777) are allowed")]
    SocketMode(u32),
    #[error("Failed to set the mode of {0} to {1:#o}")]
    Chmod(PathBuf, u32, #[source] io::Error),
    #[error("Failed to give {0} to group {1}")]
    Chown(PathBuf, u32, #[source] io::Error),
    #[error("Invalid connection limits")]
    Limits(#[source] crate::admission::AdmissionError),
}

/// How the broker admits clients and who may use its socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerOptions {
    pub admission: AdmissionPolicy,
    pub connection: ConnectionOptions,
    /// How long an observer may stay idle between requests.
    pub observer_timeout: Duration,
    /// Permission bits of the socket file.
    pub socket_mode: u32,
    /// Group of the socket file (`None` leaves the broker's group).
    pub socket_gid: Option<u32>,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            admission: AdmissionPolicy::default(),
            connection: ConnectionOptions::default(),
            observer_timeout: DEFAULT_OBSERVER_TIMEOUT,
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_gid: None,
        }
    }
}

/// A bound, listening broker.
pub struct Broker {
    pool: Arc<LocalPool>,
    listener: OwnedFd,
    path: PathBuf,
    options: BrokerOptions,
    connections: Arc<ConnectionCount>,
    /// Where the pool is recorded for a restart, and how long a restarted broker waits for
    /// the recorded sessions.
    state: Option<(Arc<StateFile>, Duration)>,
}

impl Broker {
    /// Listens on `path` with the default options.
    pub fn bind(path: &Path, pool: Arc<LocalPool>) -> Result<Broker, BrokerError> {
        Self::bind_with(path, pool, BrokerOptions::default())
    }

    /// Listens on `path`. A socket file left by a dead broker is replaced; a live one is not.
    /// The socket gets `options.socket_mode` and `options.socket_gid`; it is created with
    /// no access for group and others, so nobody connects before those are applied.
    pub fn bind_with(
        path: &Path,
        pool: Arc<LocalPool>,
        options: BrokerOptions,
    ) -> Result<Broker, BrokerError> {
        use rustix::fs::{Gid, Mode};
        if options.socket_mode > 0o777 {
            return Err(BrokerError::SocketMode(options.socket_mode));
        }
        options
            .admission
            .limits
            .validate()
            .map_err(BrokerError::Limits)?;
        if path.exists() {
            if seqpacket::connect(path).is_ok() {
                return Err(BrokerError::AlreadyRunning(path.to_path_buf()));
            }
            std::fs::remove_file(path)
                .map_err(|e| BrokerError::RemoveStale(path.to_path_buf(), e))?;
        }
        // The umask is process-wide; the broker binds before it starts any thread.
        let old_umask = rustix::process::umask(Mode::from_raw_mode(0o077));
        let listener = seqpacket::listen(path, 128);
        rustix::process::umask(old_umask);
        let listener = listener.map_err(|e| BrokerError::Listen(path.to_path_buf(), e))?;
        let owned_path = || path.to_path_buf();
        if let Some(gid) = options.socket_gid {
            rustix::fs::chown(path, None, Some(Gid::from_raw(gid)))
                .map_err(|e| BrokerError::Chown(owned_path(), gid, e.into()))?;
        }
        rustix::fs::chmod(path, Mode::from_raw_mode(options.socket_mode))
            .map_err(|e| BrokerError::Chmod(owned_path(), options.socket_mode, e.into()))?;
        Ok(Broker {
            pool,
            listener,
            path: path.to_path_buf(),
            options,
            connections: Arc::new(ConnectionCount::default()),
            state: None,
        })
    }

    /// Records the pool in `state` (before answering every request that changes it), and,
    /// if the pool was restored from it, gives the recorded sessions `grace` to come back.
    pub fn with_state_file(mut self, state: Arc<StateFile>, grace: Duration) -> Self {
        self.state = Some((state, grace));
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients until accept fails.
    pub fn run(&self) -> Result<(), BrokerError> {
        if let Some((state, grace)) = &self.state {
            save_state(&self.pool, Some(state));
            if self.pool.recovering() {
                log::info!(
                    "Waiting {} s for the recorded sessions to resume",
                    grace.as_secs_f64()
                );
            }
            // Sessions wait for their resume from the restart, or from a connection that
            // dropped in the middle of one: checked every second, for the broker's life.
            let pool = self.pool.clone();
            let state = state.clone();
            let grace = *grace;
            let spawned = std::thread::Builder::new()
                .name("ism-pool-grace".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(GRACE_CHECK.min(grace));
                        let gone = pool.expire_recovery(grace);
                        if !gone.is_empty() {
                            let gone: Vec<u64> = gone.iter().map(|d| d.0).collect();
                            log::warn!(
                                "Grace period over: sessions {gone:?} did not come back; their holds are released"
                            );
                            save_state(&pool, Some(&state));
                        }
                    }
                });
            if let Err(e) = spawned {
                log::warn!("Failed to start the grace timer: {e}");
            }
        }
        loop {
            let socket = match seqpacket::accept(self.listener.as_fd()) {
                Ok(socket) => socket,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc_errno::EINTR | libc_errno::ECONNABORTED)
                    ) =>
                {
                    continue;
                }
                // Out of fds or memory: back off instead of spinning, keep serving.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            libc_errno::EMFILE
                                | libc_errno::ENFILE
                                | libc_errno::ENOMEM
                                | libc_errno::ENOBUFS
                        )
                    ) =>
                {
                    log::warn!("Accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) => return Err(BrokerError::Accept(e)),
            };
            self.spawn_connection(socket);
        }
    }

    fn spawn_connection(&self, socket: OwnedFd) {
        let peer = peer_info(&socket, &self.options.admission);
        let slot =
            match ConnectionSlot::take(&self.connections, &peer, &self.options.admission.limits) {
                Ok(slot) => slot,
                Err(reason) => {
                    log::warn!(
                        "Refused connection from pid {:?} uid {:?}: {reason}",
                        peer.pid,
                        peer.uid
                    );
                    let error = Reply::Error(WireError::protocol(reason));
                    let _ = seqpacket::send(socket.as_fd(), &error.encode(0), None);
                    return;
                }
            };
        let pool = self.pool.clone();
        let options = self.options.connection;
        let observer_timeout = self.options.observer_timeout;
        let state = self.state.as_ref().map(|(state, _)| state.clone());
        let spawned = std::thread::Builder::new()
            .name("ism-pool-conn".into())
            .spawn(move || {
                let _slot = slot;
                let connection = Connection::with_options(pool.clone(), peer, options);
                serve_connection(socket, connection, observer_timeout, state.as_deref());
                // The session is closed now: record that it is gone.
                save_state(&pool, state.as_deref());
            });
        if let Err(e) = spawned {
            log::warn!("Failed to start a connection thread: {e}");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Errno values used above (rustix exposes them as `Errno`; std gives raw codes).
mod libc_errno {
    use rustix::io::Errno;
    pub const EINTR: i32 = Errno::INTR.raw_os_error();
    pub const ECONNABORTED: i32 = Errno::CONNABORTED.raw_os_error();
    pub const EMFILE: i32 = Errno::MFILE.raw_os_error();
    pub const ENFILE: i32 = Errno::NFILE.raw_os_error();
    pub const ENOMEM: i32 = Errno::NOMEM.raw_os_error();
    pub const ENOBUFS: i32 = Errno::NOBUFS.raw_os_error();
}

fn peer_info(socket: &OwnedFd, policy: &AdmissionPolicy) -> PeerInfo {
    match seqpacket::peer_credentials(socket.as_fd()) {
        Ok((pid, uid, gid)) => PeerInfo::from_credentials(pid, uid, gid, policy),
        Err(e) => {
            log::warn!("No peer credentials: {e}");
            PeerInfo::default()
        }
    }
}

/// Records the pool (if the broker has a state file). A failure is logged: the broker keeps
/// serving, but a restart would lose what the file missed.
fn save_state(pool: &LocalPool, state: Option<&StateFile>) {
    if let Some(state) = state
        && let Err(e) = state.save(|| pool.snapshot())
    {
        log::error!("{e}: a broker restart would lose the latest changes");
    }
}

fn send_all(socket: &OwnedFd, out: Vec<Outgoing>) -> io::Result<()> {
    for message in out {
        let fds: Vec<_> = message.fds.iter().map(|fd| fd.as_fd()).collect();
        seqpacket::send_fds(socket.as_fd(), &message.bytes, &fds)?;
        // The lease or doorbell fds are closed here: the client now owns its copies.
    }
    Ok(())
}

/// Runs one connection until the client goes away (exit, crash or protocol violation).
/// Dropping the connection closes its session, which releases every region it held.
fn serve_connection(
    socket: OwnedFd,
    mut connection: Connection,
    observer_timeout: Duration,
    state: Option<&StateFile>,
) {
    if let Err(e) = seqpacket::set_send_timeout(socket.as_fd(), SEND_TIMEOUT) {
        log::warn!("Failed to set send timeout: {e}");
    }
    // Before hello: the hello deadline. An observer: idle time since its last request.
    // A device: none (its connection is the VM's life).
    let mut deadline = Some(Instant::now() + HELLO_TIMEOUT);
    loop {
        let events = connection.session().cloned();
        let timeout = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    log::info!("Client idle too long (no hello, or an idle observer)");
                    break;
                }
                Some(left)
            }
            None => None,
        };
        let (socket_ready, events_ready) = match seqpacket::wait_readable(
            socket.as_fd(),
            events.as_ref().map(|s| s.event_fd_borrowed()),
            timeout,
        ) {
            Ok(ready) => ready,
            Err(e) => {
                log::warn!("Poll failed: {e}");
                break;
            }
        };
        if events_ready && send_all(&socket, connection.drain_events()).is_err() {
            break;
        }
        if !socket_ready {
            continue;
        }
        let packet = match seqpacket::recv(socket.as_fd()) {
            Ok(Some(packet)) => packet,
            Ok(None) => break,
            Err(e) => {
                log::debug!("Receive failed: {e}");
                break;
            }
        };
        // Descriptors are used only by PUBLISH_DOORBELL; the rest close unused.
        let handled = connection.handle_message(&packet.bytes, packet.truncated, packet.fds);
        // Recorded before the client hears of it: a client never holds what the file does
        // not know.
        if handled.persist {
            save_state(connection.pool(), state);
        }
        if send_all(&socket, handled.out).is_err() || handled.close {
            break;
        }
        deadline = if !connection.said_hello() {
            deadline
        } else if connection.is_observer() {
            Some(Instant::now() + observer_timeout)
        } else {
            None
        };
    }
    if let Some(session) = connection.session() {
        log::info!("Device {} disconnected", session.devid().0);
        session.close();
    }
}
