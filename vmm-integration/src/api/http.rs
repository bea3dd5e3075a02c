// SPDX-License-Identifier: Apache-2.0
//! The HTTP/1.1 server on a unix socket, on its own "http-server" thread. It parses with
//! tiny_http, routes with [`super::router`], and sends each action to the main thread.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use tiny_http::{Header, Request, Response, Server, StatusCode};

use super::router::{MAX_BODY_SIZE, RouteError, route};
use super::{ApiResult, ApiSender};
use crate::config::api::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("Failed to open the API socket lock file {0}")]
    LockFile(PathBuf, #[source] std::io::Error),
    #[error("API socket {0} is in use by another process (lock {1} is held)")]
    InUse(PathBuf, PathBuf),
    #[error("Failed to remove the stale API socket {0}")]
    RemoveStale(PathBuf, #[source] std::io::Error),
    #[error("Failed to bind the API socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
    #[error("File descriptor {0} is not a listening unix socket")]
    NotAListener(RawFd, #[source] std::io::Error),
    #[error("Failed to start the HTTP server")]
    Server(#[source] std::io::Error),
    #[error("Failed to spawn the http-server thread")]
    Spawn(#[source] std::io::Error),
}

/// The running server. Dropping it stops the thread and removes the socket it created.
pub struct ApiServer {
    server: Option<Arc<Server>>,
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
            // tiny_http wakes its accept thread at teardown by connecting to the path.
            let addr = listener
                .local_addr()
                .map_err(|e| HttpError::NotAListener(*fd, e))?;
            if addr.as_pathname().is_none() {
                return Err(HttpError::NotAListener(
                    *fd,
                    std::io::Error::other("the socket is not bound to a path"),
                ));
            }
            Ok((listener, None, None))
        }
    }
}

impl ApiServer {
    /// Serve requests on `listener` by sending them through `api`.
    pub fn start(mut bound: ApiListener, api: ApiSender) -> Result<ApiServer, HttpError> {
        let socket_path = bound.socket_path.take();
        let lock = bound.lock.take();
        let listener = bound.listener.try_clone().map_err(HttpError::Server)?;
        drop(bound);
        // The server (and the accept and connection threads tiny_http starts) is made on
        // the http-server thread, so they all run under its seccomp filter.
        let (made_tx, made_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("http-server".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::Thread::HttpServer);
                match Server::from_listener(listener, None) {
                    Ok(server) => {
                        let server = Arc::new(server);
                        if made_tx.send(Ok(server.clone())).is_ok() {
                            serve(&server, &api);
                        }
                    }
                    Err(e) => {
                        let _ = made_tx.send(Err(std::io::Error::other(e.to_string())));
                    }
                }
            })
            .map_err(HttpError::Spawn)?;
        let server = match made_rx.recv() {
            Ok(Ok(server)) => server,
            Ok(Err(e)) => return Err(HttpError::Server(e)),
            Err(_) => return Err(HttpError::Server(std::io::Error::other("thread ended"))),
        };
        Ok(ApiServer {
            server: Some(server),
            thread: Some(thread),
            socket_path,
            _lock: lock,
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(server) = &self.server {
            server.unblock();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The last reference: tiny_http wakes its accept thread and removes the socket.
        drop(self.server.take());
        if let Some(path) = &self.socket_path
            && path.exists()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn serve(server: &Server, api: &ApiSender) {
    // recv fails once the server is unblocked at teardown.
    while let Ok(request) = server.recv() {
        if let Err(e) = handle(request, api) {
            log::debug!("API: failed to answer a request: {e}");
        }
    }
}

fn json_header() -> Header {
    Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..])
        .expect("a static, valid header")
}

fn server_header() -> Header {
    Header::from_bytes(&b"Server"[..], &b"ism-vmm API"[..]).expect("a static, valid header")
}

/// An error response: a JSON array of strings, outermost error first.
fn error_response(status: u16, chain: &[String]) -> Response<std::io::Cursor<Vec<u8>>> {
    let body = serde_json::to_vec(chain).unwrap_or_else(|_| b"[]".to_vec());
    Response::from_data(body)
        .with_status_code(StatusCode(status))
        .with_header(json_header())
        .with_header(server_header())
}

/// Turn a request into a response: everything a client sends goes through here.
pub fn respond(
    method: &str,
    url: &str,
    body: &[u8],
    api: &ApiSender,
) -> Response<std::io::Cursor<Vec<u8>>> {
    let action = match route(method, url, body) {
        Ok(a) => a,
        Err(e) => return error_response(e.status_code(), &[e.to_string()]),
    };
    reply_response(api.call(action))
}

fn reply_response(result: ApiResult) -> Response<std::io::Cursor<Vec<u8>>> {
    match result {
        Ok(Some(value)) => match serde_json::to_vec(&value) {
            Ok(body) => Response::from_data(body)
                .with_header(json_header())
                .with_header(server_header()),
            Err(e) => error_response(500, &[e.to_string()]),
        },
        Ok(None) => Response::from_data(Vec::new())
            .with_status_code(StatusCode(204))
            .with_header(server_header()),
        Err(e) => error_response(e.status_code(), &e.chain()),
    }
}

fn handle(mut request: Request, api: &ApiSender) -> std::io::Result<()> {
    // Refuse an announced oversize body before reading any of it.
    if let Some(len) = request.body_length()
        && len > MAX_BODY_SIZE
    {
        let e = RouteError::BodyTooLarge(len);
        return request.respond(error_response(e.status_code(), &[e.to_string()]));
    }
    let mut body = Vec::new();
    // One byte past the cap is enough to know a chunked body is too large.
    if let Err(e) = request
        .as_reader()
        .take(MAX_BODY_SIZE as u64 + 1)
        .read_to_end(&mut body)
    {
        return request.respond(error_response(
            400,
            &[format!("Failed to read the body: {e}")],
        ));
    }
    let method = request.method().as_str().to_owned();
    let url = request.url().to_owned();
    let response = respond(&method, &url, &body, api);
    request.respond(response)
}

/// A minimal client for tests and `ism-remote`-like callers in this crate: one request,
/// returns (status, body).
#[cfg(test)]
pub fn simple_request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&[u8]>,
) -> std::io::Result<(u16, Vec<u8>)> {
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
