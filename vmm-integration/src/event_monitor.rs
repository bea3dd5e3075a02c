// SPDX-License-Identifier: Apache-2.0
//! `--event-monitor`: JSON events in cloud-hypervisor's shape, written by an "event-monitor"
//! thread. [`set_monitor`] runs once in `main` before the VM starts; after that any thread
//! reports with [`event!`](crate::event), which costs nothing when no monitor is set.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::api::{Endpoint, EventMonitorConfig};

#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("Failed to open the event monitor file {0}")]
    Open(std::path::PathBuf, #[source] std::io::Error),
    #[error("An event monitor is set already")]
    AlreadySet,
    #[error("Failed to spawn the event-monitor thread")]
    Spawn(#[source] std::io::Error),
}

/// Seconds and nanoseconds since the monitor started.
#[derive(Debug, Serialize)]
pub struct Timestamp {
    pub secs: u64,
    pub nanos: u32,
}

/// One event as written.
#[derive(Debug, Serialize)]
pub struct Event {
    pub timestamp: Timestamp,
    pub source: Cow<'static, str>,
    pub event: Cow<'static, str>,
    pub properties: Option<BTreeMap<Cow<'static, str>, Cow<'static, str>>>,
}

struct Monitor {
    start: Instant,
    tx: std::sync::Mutex<Sender<Option<Event>>>,
}

static MONITOR: OnceLock<Monitor> = OnceLock::new();

/// Start the monitor thread writing to `file`. Events from before this call are lost, so
/// `main` calls it first. Returns the thread, which ends when [`stop`] is called.
pub fn set_monitor(file: File) -> Result<JoinHandle<()>, MonitorError> {
    let (tx, rx) = channel();
    let monitor = Monitor {
        start: Instant::now(),
        tx: std::sync::Mutex::new(tx),
    };
    MONITOR.set(monitor).map_err(|_| MonitorError::AlreadySet)?;
    std::thread::Builder::new()
        .name("event-monitor".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::Thread::EventMonitor);
            write_events(rx, file)
        })
        .map_err(MonitorError::Spawn)
}

fn write_events(rx: Receiver<Option<Event>>, mut file: File) {
    while let Ok(Some(event)) = rx.recv() {
        // Pretty JSON and a blank line, as cloud-hypervisor writes them.
        match serde_json::to_string_pretty(&event) {
            Ok(text) => {
                if let Err(e) = writeln!(file, "{text}\n").and_then(|()| file.flush()) {
                    log::warn!("Event monitor: failed to write an event: {e}");
                }
            }
            Err(e) => log::warn!("Event monitor: failed to serialise an event: {e}"),
        }
    }
}

/// Report `source`/`event` with `properties`. A no-op without a monitor.
pub fn report(
    source: &'static str,
    event: &'static str,
    properties: Option<BTreeMap<Cow<'static, str>, Cow<'static, str>>>,
) {
    let Some(monitor) = MONITOR.get() else {
        return;
    };
    let elapsed: Duration = monitor.start.elapsed();
    log::info!("Event: source = {source} event = {event} properties = {properties:?}");
    let e = Event {
        timestamp: Timestamp {
            secs: elapsed.as_secs(),
            nanos: elapsed.subsec_nanos(),
        },
        source: Cow::Borrowed(source),
        event: Cow::Borrowed(event),
        properties,
    };
    if let Ok(tx) = monitor.tx.lock() {
        let _ = tx.send(Some(e));
    }
}

/// Open the `--event-monitor` target (a path is created or truncated; an fd is taken over)
/// and start the monitor. `None` without the option.
pub fn start(config: Option<&EventMonitorConfig>) -> Result<Option<JoinHandle<()>>, MonitorError> {
    let Some(config) = config else {
        return Ok(None);
    };
    let file = match &config.endpoint {
        Endpoint::Path(path) => {
            File::create(path).map_err(|e| MonitorError::Open(path.clone(), e))?
        }
        // SAFETY: the operator handed this descriptor to the VMM for events; nothing else in
        // the process owns it.
        Endpoint::Fd(fd) => unsafe { File::from_raw_fd(*fd) },
    };
    set_monitor(file).map(Some)
}

/// Flush the events queued so far and end the monitor thread started by [`start`].
pub fn finish(thread: Option<JoinHandle<()>>) {
    stop();
    if let Some(thread) = thread {
        let _ = thread.join();
    }
}

/// Let the monitor thread write what is queued and end (at VMM exit).
pub fn stop() {
    if let Some(monitor) = MONITOR.get()
        && let Ok(tx) = monitor.tx.lock()
    {
        let _ = tx.send(None);
    }
}

/// `event!(source, event)` or `event!(source, event, "key", value, ...)`; values are
/// anything `Into<Cow<'static, str>>` or `&String`/`&str` (copied).
macro_rules! event {
    ($source:expr, $event:expr) => {
        $crate::event_monitor::report($source, $event, None)
    };
    ($source:expr, $event:expr, $($key:expr, $value:expr),+ $(,)?) => {{
        let mut props = std::collections::BTreeMap::new();
        $(
            props.insert(
                std::borrow::Cow::Borrowed($key),
                std::borrow::Cow::Owned(String::from(AsRef::<str>::as_ref(&$value))),
            );
        )+
        $crate::event_monitor::report($source, $event, Some(props))
    }};
}
pub(crate) use event;
