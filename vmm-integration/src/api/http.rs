// SPDX-License-Identifier: Apache-2.0
//! The HTTP/1.1 server on a unix socket. An "http-server" thread accepts connections and
//! starts one "http-conn" thread per connection, up to [`MAX_CONNECTIONS`]; each parses its
//! requests with `httparse`, routes them with [`super::router`] and sends each action to the
//! main thread.
//!
//! Limits against hostile or broken clients (docs/api.md): a connection waits at most
//! [`IDLE_TIMEOUT`] for a request to start and [`REQUEST_TIMEOUT`] for all of it to arrive,
//! a write of the answer at most [`WRITE_TIMEOUT`]; a request head is at most
//! [`MAX_HEAD_SIZE`] bytes; connections over the cap get a 503 and are closed; an accept
//! error (EMFILE) is logged and retried after [`ACCEPT_BACKOFF`]. A slow client only holds
//! its own thread.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::router::{MAX_BODY_SIZE, RouteError, route};
use super::{ApiResult, ApiSender};
use crate::config::api::Endpoint;

/// Connections served at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// Longest request line plus headers.
pub const MAX_HEAD_SIZE: usize = 64 << 10;
/// Most header lines in a request.
const MAX_HEADERS: usize = 64;
/// How long a connection may sit without starting a request (also a new one).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may take to arrive, from its first byte to its last.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write of an answer may block on a client that does not read.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait after a failed accept (EMFILE, ENFILE, ENOMEM) before trying again.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a refused request's remaining input is read (and dropped) before closing.
const LINGER: Duration = Duration::from_secs(1);
/// How long teardown waits for connection threads to end once their sockets are shut down.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("Failed to open the API socket lock file {0}")]
    LockFile(PathBuf, #[source] io::Error),
    #[error("API socket {0} is in use by another process (lock {1} is held)")]
    InUse(PathBuf, PathBuf),
    #[error("Failed to remove the stale API socket {0}")]
    RemoveStale(PathBuf, #[source] io::Error),
    #[error("Failed to bind the API socket {0}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("File descriptor {0} is not a listening unix socket")]
    NotAListener(RawFd, #[source] io::Error),
    #[error("Failed to take over the API socket")]
    Listener(#[source] io::Error),
    #[error("Failed to make the API socket non-blocking")]
    NonBlocking(#[source] io::Error),
    #[error("Failed to create the API server's stop eventfd")]
    StopEvent(#[source] io::Error),
    #[error("Failed to spawn the http-server thread")]
    Spawn(#[source] io::Error),
}

/// The running server. Dropping it stops the threads and removes the socket it created.
pub struct ApiServer {
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    socket_path: Option<PathBuf>,
    _lock: Option<File>,
}

/// Take `<path>.lock` so two VMMs never share (and unlink) one socket path.
fn lock_socket_path(path: &Path) -> Result<(File, PathBuf), HttpError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| HttpError::LockFile(lock_path.clone(), e))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if ret != 0 {
        return Err(HttpError::InUse(path.to_owned(), lock_path));
    }
    Ok((file, lock_path))
}

/// The API socket, bound (and locked) before the VM is built so a busy path fails early.
pub struct ApiListener {
    listener: UnixListener,
    socket_path: Option<PathBuf>,
    lock: Option<File>,
}

impl ApiListener {
    pub fn bind(endpoint: &Endpoint) -> Result<ApiListener, HttpError> {
        let (listener, socket_path, lock) = bind(endpoint)?;
        Ok(ApiListener {
            listener,
            socket_path,
            lock,
        })
    }
}

impl Drop for ApiListener {
    fn drop(&mut self) {
        // Bound but never served (the VM failed to start): remove the socket file.
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn bind(endpoint: &Endpoint) -> Result<(UnixListener, Option<PathBuf>, Option<File>), HttpError> {
    match endpoint {
        Endpoint::Path(path) => {
            let (lock, _) = lock_socket_path(path)?;
            // We hold the lock, so a socket file left there belongs to a VMM that is gone.
            if path.exists() {
                std::fs::remove_file(path).map_err(|e| HttpError::RemoveStale(path.clone(), e))?;
            }
            let listener =
                UnixListener::bind(path).map_err(|e| HttpError::Bind(path.clone(), e))?;
            Ok((listener, Some(path.clone()), Some(lock)))
        }
        Endpoint::Fd(fd) => {
            // SAFETY: the operator handed this descriptor to the VMM for the API; nothing
            // else in the process owns it, so the listener may take (and later close) it.
            let listener = unsafe { UnixListener::from_raw_fd(*fd) };
            // A unix socket (getsockname fails on anything else).
            listener
                .local_addr()
                .map_err(|e| HttpError::NotAListener(*fd, e))?;
            Ok((listener, None, None))
        }
    }
}

impl ApiServer {
    /// Serve requests on `listener` by sending them through `api`.
    pub fn start(mut bound: ApiListener, api: ApiSender) -> Result<ApiServer, HttpError> {
        let socket_path = bound.socket_path.take();
        let lock = bound.lock.take();
        let listener = bound.listener.try_clone().map_err(HttpError::Listener)?;
        drop(bound);
        // Accept only when poll says a connection waits; a client that went away meanwhile
        // must not block the loop.
        listener
            .set_nonblocking(true)
            .map_err(HttpError::NonBlocking)?;
        let stop = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(HttpError::StopEvent)?);
        let thread_stop = stop.clone();
        // The connection threads are started by the http-server thread: each runs under its
        // filter and adds its own, narrower one.
        let thread = std::thread::Builder::new()
            .name("http-server".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::Thread::HttpServer);
                accept_loop(&listener, &thread_stop, &api);
            })
            .map_err(HttpError::Spawn)?;
        Ok(ApiServer {
            stop,
            thread: Some(thread),
            socket_path,
            _lock: lock,
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::warn!("API: failed to stop the server: {e}");
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Some(path) = &self.socket_path
            && path.exists()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The live connections: their sockets, so teardown can shut them down, and a count to cap.
#[derive(Default)]
struct Connections {
    live: Mutex<Live>,
    ended: Condvar,
}

#[derive(Default)]
struct Live {
    fds: HashMap<u64, RawFd>,
    next_id: u64,
}

impl Connections {
    /// Take a place for `fd` unless [`MAX_CONNECTIONS`] are live; its id.
    fn admit(&self, fd: RawFd) -> Option<u64> {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.fds.len() >= MAX_CONNECTIONS {
            return None;
        }
        let id = live.next_id;
        live.next_id += 1;
        live.fds.insert(id, fd);
        Some(id)
    }

    /// Give the place back; the caller closes the socket after this, so teardown never shuts
    /// down a descriptor number that was reused.
    fn leave(&self, id: u64) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.fds.remove(&id);
        self.ended.notify_all();
    }

    /// Stop every connection: shut the read side of each socket down (a blocked read returns
    /// at once, an answer being written still goes out), wait up to [`DRAIN_TIMEOUT`] for
    /// their threads to leave, then shut down the write side of any left.
    fn close_all(&self) {
        let shut = |live: &Live, how| {
            for fd in live.fds.values() {
                // SAFETY: `fd` is a socket owned by a connection thread, which only closes
                // it after `leave` removed it under this lock; shutdown touches no memory.
                unsafe { libc::shutdown(*fd, how) };
            }
        };
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        shut(&live, libc::SHUT_RD);
        let (live, _) = self
            .ended
            .wait_timeout_while(live, DRAIN_TIMEOUT, |live| !live.fds.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        shut(&live, libc::SHUT_RDWR);
    }
}

/// Whether an accept error comes from a shortage that passes (descriptors, memory) rather than
/// from the one connection.
fn is_resource_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Poll `fds` for input, at most `timeout` (`None`: no limit); whether each has some.
fn poll_in<const N: usize>(fds: [RawFd; N], timeout: Option<Duration>) -> [bool; N] {
    let mut polled = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let timeout_ms = timeout.map_or(-1, |t| libc::c_int::try_from(t.as_millis()).unwrap_or(1000));
    // SAFETY: `polled` is a valid array of N pollfds for the duration of the call.
    let n = unsafe { libc::poll(polled.as_mut_ptr(), N as libc::nfds_t, timeout_ms) };
    if n <= 0 {
        // Timeout, or EINTR: nothing is known to be ready.
        return [false; N];
    }
    polled.map(|p| p.revents != 0)
}

fn accept_loop(listener: &UnixListener, stop: &EventFd, api: &ApiSender) {
    let connections = Arc::new(Connections::default());
    let mut short = false;
    let mut full = false;
    loop {
        let [pending, stopped] = poll_in([listener.as_raw_fd(), stop.as_raw_fd()], None);
        if stopped {
            break;
        }
        if !pending {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => {
                if short {
                    log::info!("API: accepting connections again");
                    short = false;
                }
                stream
            }
            Err(e) if is_resource_shortage(&e) => {
                // The connection waits in the backlog; try again once descriptors may have
                // been freed (or stop).
                if !short {
                    log::warn!("API: failed to accept a connection, retrying: {e}");
                    short = true;
                }
                if poll_in([stop.as_raw_fd()], Some(ACCEPT_BACKOFF))[0] {
                    break;
                }
                continue;
            }
            // EAGAIN (the client left before accept), EINTR, ECONNABORTED...
            Err(e) => {
                log::debug!("API: accept: {e}");
                continue;
            }
        };
        let admitted = serve_or_refuse(stream, &connections, api);
        // One warning per stretch of refusals, not one per refused connection.
        if !admitted && !full {
            log::warn!("API: {MAX_CONNECTIONS} connections are open; refusing more (503)");
        }
        full = !admitted;
    }
    connections.close_all();
}

/// Start a thread for `stream`, or answer 503 and close it when the cap is reached; whether
/// it was admitted.
fn serve_or_refuse(stream: UnixStream, connections: &Arc<Connections>, api: &ApiSender) -> bool {
    let Some(id) = connections.admit(stream.as_raw_fd()) else {
        refuse(
            stream,
            &format!("Too many API connections ({MAX_CONNECTIONS} open)"),
        );
        return false;
    };
    let (conns, api_clone) = (connections.clone(), api.clone());
    let spawned = std::thread::Builder::new()
        .name("http-conn".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::Thread::HttpConnection);
            let mut conn = Connection::new(stream);
            conn.serve(&api_clone);
            conns.leave(id);
            drop(conn);
        });
    if let Err(e) = spawned {
        // The closure, and the socket it owned, is gone: the client sees the connection
        // closed.
        log::warn!("API: failed to start a connection thread: {e}");
        connections.leave(id);
    }
    true
}

/// Answer 503 on a connection that will not be served, without waiting on the client.
fn refuse(mut stream: UnixStream, message: &str) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let response = error_response(503, &[message.to_owned()]);
    let _ = stream.write_all(&response.to_bytes(true));
    close_gently(&mut stream, Duration::ZERO);
}

/// Most bytes read and dropped from a client whose request was refused.
const DRAIN_MAX: usize = 4 << 20;

/// End the answer (EOF for the client), then read and drop what the client still sends, for
/// up to `linger` (zero: only what already arrived) and [`DRAIN_MAX`] bytes. A unix socket
/// closed with unread input makes the client's next read fail with ECONNRESET, so a client
/// still sending a refused request would see a reset instead of the answer's end.
fn close_gently(stream: &mut UnixStream, linger: Duration) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let deadline = Instant::now() + linger;
    let mut drained = 0;
    let mut chunk = [0u8; 16 << 10];
    while drained < DRAIN_MAX {
        let left = deadline.saturating_duration_since(Instant::now());
        let flags = if left.is_zero() {
            libc::MSG_DONTWAIT
        } else {
            if stream.set_read_timeout(Some(left)).is_err() {
                return;
            }
            0
        };
        // SAFETY: receiving into the valid, writable `chunk` of `chunk.len()` bytes.
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                chunk.as_mut_ptr().cast(),
                chunk.len(),
                flags,
            )
        };
        match usize::try_from(n) {
            Ok(0) | Err(_) => return,
            Ok(n) => drained += n,
        }
    }
}

/// An answer: status, body, and whether the body is JSON.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    json: bool,
}

/// The reason phrase of the statuses this server answers with.
fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

impl Response {
    /// Status line, headers and body; `close` adds `Connection: close`.
    fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(160 + self.body.len());
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nServer: ism-vmm API\r\n",
            self.status,
            reason(self.status)
        );
        if self.json {
            out.extend_from_slice(b"Content-Type: application/json\r\n");
        }
        // No Content-Length on a 204 (RFC 9110 8.6).
        if self.status != 204 {
            let _ = write!(out, "Content-Length: {}\r\n", self.body.len());
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

/// An error response: a JSON array of strings, outermost error first.
fn error_response(status: u16, chain: &[String]) -> Response {
    let body = serde_json::to_vec(chain).unwrap_or_else(|_| b"[]".to_vec());
    Response {
        status,
        body,
        json: true,
    }
}

/// Turn a request into a response: everything a client sends goes through here.
pub fn respond(method: &str, url: &str, body: &[u8], api: &ApiSender) -> Response {
    let action = match route(method, url, body) {
        Ok(a) => a,
        Err(e) => return error_response(e.status_code(), &[e.to_string()]),
    };
    reply_response(api.call(action))
}

fn reply_response(result: ApiResult) -> Response {
    match result {
        Ok(Some(value)) => match serde_json::to_vec(&value) {
            Ok(body) => Response {
                status: 200,
                body,
                json: true,
            },
            Err(e) => error_response(500, &[e.to_string()]),
        },
        Ok(None) => Response {
            status: 204,
            body: Vec::new(),
            json: false,
        },
        Err(e) => error_response(e.status_code(), &e.chain()),
    }
}

/// What the server needs from a request's head.
#[derive(Debug)]
struct Head {
    method: String,
    target: String,
    /// Bytes of head (request line, headers and the blank line).
    len: usize,
    content_length: usize,
    /// The connection ends after this request (`Connection: close`, or HTTP/1.0 without
    /// `keep-alive`).
    close: bool,
    /// `Expect: 100-continue`: the client waits for a go-ahead before the body.
    expect_continue: bool,
}

/// Why a request is answered with an error and the connection closed.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("Request head over {MAX_HEAD_SIZE} bytes or {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("Malformed request: {0}")]
    Malformed(String),
    #[error("Invalid Content-Length {0:?}")]
    ContentLength(String),
    #[error(
        "Transfer-Encoding is not supported: send the body with a Content-Length (at most \
         {MAX_BODY_SIZE} bytes)"
    )]
    TransferEncoding,
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("The request did not arrive within {0:?}")]
    Timeout(Duration),
}

impl RequestError {
    fn status_code(&self) -> u16 {
        match self {
            RequestError::HeadTooLarge => 431,
            RequestError::Malformed(_) | RequestError::ContentLength(_) => 400,
            RequestError::TransferEncoding => 411,
            RequestError::Route(e) => e.status_code(),
            RequestError::Timeout(_) => 408,
        }
    }
}

/// Parse a complete head from `buf`; `None` while more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, RequestError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_SIZE => {
            return Err(RequestError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::HeadTooLarge),
        Err(e) => return Err(RequestError::Malformed(e.to_string())),
    };
    if len > MAX_HEAD_SIZE {
        return Err(RequestError::HeadTooLarge);
    }
    let mut content_length: Option<usize> = None;
    let mut connection_close = false;
    let mut keep_alive = false;
    let mut expect_continue = false;
    for header in request.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            let parsed = value
                .parse::<usize>()
                .ok()
                .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| RequestError::ContentLength(value.chars().take(64).collect()))?;
            // Repeated with another value: refuse rather than pick one (request smuggling).
            if content_length.is_some_and(|first| first != parsed) {
                return Err(RequestError::ContentLength(
                    value.chars().take(64).collect(),
                ));
            }
            content_length = Some(parsed);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(RequestError::TransferEncoding);
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                connection_close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if header.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    let http_1_0 = request.version == Some(0);
    let content_length = content_length.unwrap_or(0);
    if content_length > MAX_BODY_SIZE {
        return Err(RouteError::BodyTooLarge(content_length).into());
    }
    Ok(Some(Head {
        method: request.method.unwrap_or_default().to_owned(),
        target: request.path.unwrap_or_default().to_owned(),
        len,
        content_length,
        close: connection_close || (http_1_0 && !keep_alive),
        expect_continue,
    }))
}

/// One client connection: its socket and the bytes read past the last request.
struct Connection {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// How a read ended when it brought no bytes.
enum ReadEnd {
    /// The client closed (or teardown shut the socket down).
    Closed,
    /// The deadline passed.
    TimedOut,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Append what the client sends next, at most `max` bytes, to `into`, waiting until
    /// `deadline` at most.
    fn read_some(
        &mut self,
        deadline: Instant,
        max: usize,
        into: &mut Vec<u8>,
    ) -> Result<usize, ReadEnd> {
        let mut chunk = [0u8; 16 << 10];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadEnd::TimedOut);
            }
            // Zero would mean "no timeout".
            if self.stream.set_read_timeout(Some(left)).is_err() {
                return Err(ReadEnd::Closed);
            }
            let room = chunk.len().min(max);
            match self.stream.read(&mut chunk[..room]) {
                Ok(0) => return Err(ReadEnd::Closed),
                Ok(n) => {
                    into.extend_from_slice(&chunk[..n]);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ReadEnd::TimedOut);
                }
                Err(_) => return Err(ReadEnd::Closed),
            }
        }
    }

    fn send(&mut self, response: &Response, close: bool) -> io::Result<()> {
        self.stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        self.stream.write_all(&response.to_bytes(close))
    }

    /// Answer `e` and end the connection.
    fn fail(&mut self, e: &RequestError) {
        log::debug!("API: refusing a request: {e}");
        if self
            .send(&error_response(e.status_code(), &[e.to_string()]), true)
            .is_ok()
        {
            close_gently(&mut self.stream, LINGER);
        }
    }

    /// Serve requests until the client closes, a limit is hit, or a request asks to close.
    fn serve(&mut self, api: &ApiSender) {
        loop {
            match self.next_request() {
                Ok(Some((head, body))) => {
                    let response = respond(&head.method, &head.target, &body, api);
                    if let Err(e) = self.send(&response, head.close) {
                        log::debug!("API: failed to answer a request: {e}");
                        return;
                    }
                    if head.close {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => return self.fail(&e),
            }
        }
    }

    /// The next request (head and body); `None` when the client closed or stayed idle.
    fn next_request(&mut self) -> Result<Option<(Head, Vec<u8>)>, RequestError> {
        let mut buf = std::mem::take(&mut self.buf);
        // The head: wait up to IDLE_TIMEOUT for its first byte, then up to REQUEST_TIMEOUT
        // from there for the whole request.
        let mut deadline = Instant::now() + IDLE_TIMEOUT;
        let mut started = !buf.is_empty();
        if started {
            deadline = Instant::now() + REQUEST_TIMEOUT;
        }
        buf.reserve(MAX_HEAD_SIZE.saturating_sub(buf.len()).min(16 << 10));
        let head = loop {
            if !buf.is_empty()
                && let Some(head) = parse_head(&buf)?
            {
                break head;
            }
            match self.read_some(deadline, usize::MAX, &mut buf) {
                Ok(_) if !started => {
                    started = true;
                    deadline = Instant::now() + REQUEST_TIMEOUT;
                }
                Ok(_) => {}
                Err(ReadEnd::Closed) => return Ok(None),
                Err(ReadEnd::TimedOut) if !started => return Ok(None),
                Err(ReadEnd::TimedOut) => return Err(RequestError::Timeout(REQUEST_TIMEOUT)),
            }
        };
        if head.expect_continue && head.content_length > 0 {
            let go = b"HTTP/1.1 100 Continue\r\n\r\n";
            self.stream
                .set_write_timeout(Some(WRITE_TIMEOUT))
                .and_then(|()| self.stream.write_all(go))
                .map_err(|e| {
                    RequestError::Malformed(format!("Failed to send 100 Continue: {e}"))
                })?;
        }
        // The body: what came with the head, then exactly the rest, allocated once.
        let end = head.len + head.content_length;
        let mut body = Vec::with_capacity(head.content_length);
        let have = buf.len().min(end);
        body.extend_from_slice(&buf[head.len..have]);
        // Bytes past this request (a pipelined next one) stay for the next call.
        self.buf = buf.split_off(have);
        while body.len() < head.content_length {
            let rest = head.content_length - body.len();
            match self.read_some(deadline, rest, &mut body) {
                Ok(_) => {}
                Err(ReadEnd::Closed) => return Ok(None),
                Err(ReadEnd::TimedOut) => return Err(RequestError::Timeout(REQUEST_TIMEOUT)),
            }
        }
        Ok(Some((head, body)))
    }
}

/// A minimal client for tests and `ism-remote`-like callers in this crate: one request,
/// returns (status, body).
#[cfg(test)]
pub fn simple_request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&[u8]>,
) -> io::Result<(u16, Vec<u8>)> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    let body = body.unwrap_or_default();
    write!(
        stream,
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let start = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(raw.len(), |p| p + 4);
    Ok((status, raw[start..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<Head>, RequestError> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn test_parse_head_reads_length_connection_and_expect() {
        let h = head("PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.method.as_str(), h.target.as_str()),
            ("PUT", "/api/v1/vm.pause")
        );
        assert_eq!(
            (h.content_length, h.close, h.expect_continue),
            (5, false, false)
        );
        assert_eq!(
            h.len,
            "PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 5\r\n\r\n".len()
        );
        let h =
            head("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\nExpect: 100-continue\r\n\r\n")
                .unwrap()
                .unwrap();
        assert!(h.close && h.expect_continue);
        // HTTP/1.0 closes unless it asks to keep the connection.
        assert!(head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().close);
        let kept = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(!kept.unwrap().unwrap().close);
        // Not complete yet.
        assert!(head("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn test_parse_head_refuses_what_it_does_not_frame() {
        let status = |text: &str| head(text).err().map(|e| e.status_code());
        let chunked = "PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(status(chunked), Some(411));
        let two = "PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(status(two), Some(400));
        assert_eq!(
            status("PUT / HTTP/1.1\r\nContent-Length: +1\r\n\r\n"),
            Some(400)
        );
        let big = format!(
            "PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_SIZE + 1
        );
        assert_eq!(status(&big), Some(413));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Some(431));
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_SIZE));
        assert_eq!(status(&long), Some(431));
        assert_eq!(status("GET\0 / HTTP/1.1\r\n\r\n"), Some(400));
    }

    /// Framing against a running server (with no VMM behind it, known routes answer 500):
    /// two pipelined requests on one kept-alive connection, then one with
    /// `Expect: 100-continue` and `Connection: close`.
    #[test]
    fn test_keep_alive_pipelining_and_expect_continue() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ism-http").unwrap();
        let path = dir.as_path().join("api.sock");
        let listener = ApiListener::bind(&Endpoint::Path(path.clone())).unwrap();
        let server = ApiServer::start(listener, ApiSender::new(|_| false)).unwrap();
        let mut stream = UnixStream::connect(&path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(
                b"GET /api/v1/vm.nope HTTP/1.1\r\nHost: x\r\n\r\n\
                  GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n",
            )
            .unwrap();
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("500 Internal") {
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&chunk[..n]);
        }
        let text = String::from_utf8_lossy(&seen).into_owned();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(!text.contains("Connection: close"), "{text}");

        stream
            .write_all(
                b"PUT /api/v1/vm.pause HTTP/1.1\r\nExpect: 100-continue\r\n\
                  Connection: close\r\nContent-Length: 2\r\n\r\n",
            )
            .unwrap();
        let n = stream.read(&mut chunk).unwrap();
        assert_eq!(&chunk[..n], b"HTTP/1.1 100 Continue\r\n\r\n");
        stream.write_all(b"{}").unwrap();
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        let rest = String::from_utf8_lossy(&rest);
        assert!(rest.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{rest}");
        assert!(rest.contains("Connection: close\r\n"), "{rest}");
        assert!(
            rest.ends_with(r#"["Endpoint vm.pause takes no body"]"#),
            "{rest}"
        );
        drop(server);
    }
}
