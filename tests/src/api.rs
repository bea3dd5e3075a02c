// SPDX-License-Identifier: Apache-2.0
//! The REST API of a running VMM (ism-vmm and cloud-hypervisor serve the same ism endpoints)
//! and its event monitor, for the API tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::pair::ScratchDir;

/// Where a VMM serves its API and writes its events: the options to give it, and reading both.
pub struct ApiEndpoint {
    dir: ScratchDir,
}

impl Default for ApiEndpoint {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiEndpoint {
    pub fn new() -> Self {
        Self {
            dir: ScratchDir::new("api"),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    fn events_path(&self) -> PathBuf {
        self.dir.path().join("events.json")
    }

    /// `--api-socket <socket> --event-monitor path=<file>`, as both VMMs take them.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--api-socket".into(),
            self.socket().display().to_string(),
            "--event-monitor".into(),
            format!("path={}", self.events_path().display()),
        ]
    }

    /// `method /api/v1/<endpoint>` with a JSON `body`: (status, body).
    pub fn request(&self, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
        request(&self.socket(), method, endpoint, body)
    }

    /// The body of a request that must answer `status`.
    pub fn expect(&self, method: &str, endpoint: &str, body: Option<&str>, status: u16) -> String {
        let (got, reply) = self.request(method, endpoint, body);
        assert_eq!(got, status, "{method} {endpoint} {body:?}: {reply}");
        reply
    }

    /// The body of a GET that must succeed, as JSON.
    pub fn get(&self, endpoint: &str) -> serde_json::Value {
        json(&self.expect("GET", endpoint, None, 200))
    }

    /// Every event the monitor wrote so far (both VMMs write JSON objects one after another).
    pub fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.events_path()).unwrap_or_default();
        serde_json::Deserializer::from_str(&text)
            .into_iter::<serde_json::Value>()
            .map_while(Result::ok)
            .collect()
    }

    /// Wait (up to 20 s) until `count` events of `source`/`event` whose properties contain
    /// `props` were written; returns them.
    pub fn wait_events(
        &self,
        source: &str,
        event: &str,
        props: &[(&str, &str)],
        count: usize,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found: Vec<serde_json::Value> = self
                .events()
                .into_iter()
                .filter(|e| {
                    e["source"] == source
                        && e["event"] == event
                        && props
                            .iter()
                            .all(|(k, v)| e["properties"][*k].as_str() == Some(*v))
                })
                .collect();
            if found.len() >= count {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{count} {source}/{event} events with {props:?} did not come; events: {:#?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Parse a JSON reply, with the text in the panic message.
pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

/// One HTTP/1.1 request on the unix socket `socket`: (status, body). Reads exactly the body
/// the reply announces, so it works whether or not the server closes the connection.
pub fn request(socket: &Path, method: &str, endpoint: &str, body: Option<&str>) -> (u16, String) {
    let mut stream = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connect to {}: {e}", socket.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set a read timeout");
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .unwrap_or_else(|e| panic!("send {method} {endpoint}: {e}"));
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let (header_end, length) = loop {
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read the reply to {method} {endpoint}: {e}"));
        assert!(
            n > 0,
            "{method} {endpoint}: connection closed before the reply"
        );
        raw.extend_from_slice(&buf[..n]);
        if let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (at + 4, length);
        }
    };
    while raw.len() < header_end + length {
        let n = stream
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("read the body of {method} {endpoint}: {e}"));
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    let status = String::from_utf8_lossy(&raw[..header_end])
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end = raw.len().min(header_end + length);
    (
        status,
        String::from_utf8_lossy(&raw[header_end..end]).into_owned(),
    )
}
