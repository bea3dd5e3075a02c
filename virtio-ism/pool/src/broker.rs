// SPDX-License-Identifier: Apache-2.0
//! The broker daemon's server: a listening socket, one thread per client connection, all
//! sharing one [`LocalPool`].

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::handler::{Connection, Outgoing, PeerInfo};
use crate::local::LocalPool;
use crate::seqpacket;
use crate::wire::{Reply, WireError};

/// Connections served at once; beyond it newcomers are told so and closed.
pub const MAX_CONNECTIONS: usize = 1024;
/// Connections one process may have open at once, so that one VMM cannot use up the rest.
pub const MAX_CONNECTIONS_PER_PROCESS: usize = 64;
/// A client must say hello within this time, or it is disconnected.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that does not read its replies for this long is disconnected.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

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
}

/// A bound, listening broker.
pub struct Broker {
    pool: Arc<LocalPool>,
    listener: OwnedFd,
    path: PathBuf,
    connections: Arc<ConnectionCount>,
}

impl Broker {
    /// Listens on `path`. A socket file left by a dead broker is replaced; a live one is not.
    pub fn bind(path: &Path, pool: Arc<LocalPool>) -> Result<Broker, BrokerError> {
        if path.exists() {
            if seqpacket::connect(path).is_ok() {
                return Err(BrokerError::AlreadyRunning(path.to_path_buf()));
            }
            std::fs::remove_file(path)
                .map_err(|e| BrokerError::RemoveStale(path.to_path_buf(), e))?;
        }
        let listener =
            seqpacket::listen(path, 128).map_err(|e| BrokerError::Listen(path.to_path_buf(), e))?;
        Ok(Broker {
            pool,
            listener,
            path: path.to_path_buf(),
            connections: Arc::new(ConnectionCount::default()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients until accept fails.
    pub fn run(&self) -> Result<(), BrokerError> {
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
        let peer = peer_info(&socket);
        let slot = match ConnectionSlot::take(&self.connections, peer.pid) {
            Ok(slot) => slot,
            Err(reason) => {
                log::warn!("Refused connection from pid {:?}: {reason}", peer.pid);
                let error = Reply::Error(WireError::protocol(reason));
                let _ = seqpacket::send(socket.as_fd(), &error.encode(0), None);
                return;
            }
        };
        let pool = self.pool.clone();
        let spawned = std::thread::Builder::new()
            .name("ism-pool-conn".into())
            .spawn(move || {
                let _slot = slot;
                serve_connection(socket, Connection::new(pool, peer));
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

/// Open connections, in total and per peer process.
#[derive(Default)]
struct ConnectionCount {
    total: AtomicUsize,
    per_process: Mutex<HashMap<u32, usize>>,
}

/// One counted connection; dropping it gives the slot back.
struct ConnectionSlot {
    count: Arc<ConnectionCount>,
    pid: Option<u32>,
}

impl ConnectionSlot {
    fn take(count: &Arc<ConnectionCount>, pid: Option<u32>) -> Result<Self, &'static str> {
        if count.total.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            count.total.fetch_sub(1, Ordering::AcqRel);
            return Err("Too many connections");
        }
        // From here on, dropping the slot undoes the counts taken.
        let mut slot = ConnectionSlot {
            count: count.clone(),
            pid: None,
        };
        if let Some(pid) = pid {
            let mut per_process = count.per_process.lock().unwrap_or_else(|e| e.into_inner());
            let open = per_process.entry(pid).or_insert(0);
            if *open >= MAX_CONNECTIONS_PER_PROCESS {
                return Err("Too many connections from this process");
            }
            *open += 1;
            slot.pid = Some(pid);
        }
        Ok(slot)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.count.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(pid) = self.pid {
            let mut per_process = self
                .count
                .per_process
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(open) = per_process.get_mut(&pid) {
                *open -= 1;
                if *open == 0 {
                    per_process.remove(&pid);
                }
            }
        }
    }
}

fn peer_info(socket: &OwnedFd) -> PeerInfo {
    match seqpacket::peer_credentials(socket.as_fd()) {
        Ok((pid, uid)) => {
            let own_uid = rustix::process::geteuid().as_raw();
            PeerInfo {
                pid: Some(pid),
                trusted: uid == 0 || uid == own_uid,
            }
        }
        Err(e) => {
            log::warn!("No peer credentials: {e}");
            PeerInfo {
                pid: None,
                trusted: false,
            }
        }
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
fn serve_connection(socket: OwnedFd, mut connection: Connection) {
    if let Err(e) = seqpacket::set_send_timeout(socket.as_fd(), SEND_TIMEOUT) {
        log::warn!("Failed to set send timeout: {e}");
    }
    let hello_deadline = std::time::Instant::now() + HELLO_TIMEOUT;
    loop {
        let events = connection.session().cloned();
        let timeout = if connection.said_hello() {
            None
        } else {
            let left = hello_deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                log::info!("Client did not say hello in time");
                break;
            }
            Some(left)
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
        if send_all(&socket, handled.out).is_err() || handled.close {
            break;
        }
    }
    if let Some(session) = connection.session() {
        log::info!("Device {} disconnected", session.devid().0);
    }
}
