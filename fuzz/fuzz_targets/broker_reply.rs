// SPDX-License-Identifier: Apache-2.0
//! The VMM side of the broker protocol (`ism_pool::BrokerSession`) against a scripted,
//! hostile broker: arbitrary replies and events, with any number and kind of descriptors,
//! over a real SOCK_SEQPACKET connection.
//!
//! The fuzz thread plays the broker; a second thread connects a `BrokerSession` (hello
//! included) and makes the calls a device makes. For every request the broker receives, it
//! sends the next group of scripted messages; when the script runs out, or a group carries
//! no answer the session would take, it hangs up (the session then fails its calls at once
//! instead of waiting 30 s for an answer).
//!
//! Input layout:
//!   [0]      low 4 bits: n, the number of calls the device makes; bit 6: the broker comes
//!            back once after it hung up (a restart: it accepts the session's reconnection
//!            and plays the remaining groups to the RESUME, REREGISTER, PUBLISH_DOORBELL and
//!            RESUME_DONE the session sends, then to its calls); bit 7: connect as an
//!            operator tool instead (`ObserverClient`: status report, revoke), whose one
//!            request gets one group before the broker hangs up
//!   n × 9    calls: kind u8 (low 4 bits mod 10: alloc, attach, detach, grant, publish
//!            doorbell, withdraw doorbell, peer doorbells, take events, info, wait (up to
//!            50 ms) until the session is connected again or the broker is gone for good;
//!            an operator: even status, odd revoke), le64 argument (size or token;
//!            attach/grant take their perms from the kind's high bits)
//!   then groups, one per request received, each: count u8 (low 3 bits), then count messages:
//!     fds u8     low 5 bits: how many descriptors (at most 16), high 3 bits: which kind
//!                (0 eventfd, 1 memfd read-write, 2 memfd read-only, 3 /dev/null, else eventfd)
//!     pages u8   memfd size in 4 KiB pages
//!     flags u8   bit 0: write the request's id into the header, bit 1: write the length
//!     le16 len, then len bytes (cut to what is left): the message
//!
//! The session reconnects after 20 us (backoff up to 1 ms) instead of 100 ms, so a comeback
//! costs little time (measured on one CPU: about 3 000 inputs/s with 1 ms, 3 300-3 650/s
//! with 20 us).
//!
//! Checks: nothing panics or hangs; a lease is a descriptor of the size and mode the broker
//! announced; peer doorbells are eventfds; no descriptor the broker sent outlives the input.
#![no_main]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use ism_pool::client::{ClientOptions, ObserverClient};
use ism_pool::memory::RegionMemory;
use ism_pool::seqpacket;
use ism_pool::wire::{self, MAX_MESSAGE_LEN, Reply, Request};
use ism_pool::{BrokerSession, DevId, GrantTarget, Perms, PoolSession, Token};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

const MAX_CALLS: usize = 15;
/// Most groups one input scripts (a peer-doorbells listing may ask many times).
const MAX_GROUPS: usize = 64;

#[derive(Debug)]
struct Call {
    kind: u8,
    arg: u64,
}

struct Message {
    bytes: Vec<u8>,
    fd_count: usize,
    fd_kind: u8,
    pages: u64,
    flags: u8,
}

/// One input, parsed.
struct Script {
    observer: bool,
    comeback: bool,
    calls: Vec<Call>,
    groups: Vec<Vec<Message>>,
}

fn parse(input: &[u8]) -> Script {
    let Some((&head, mut rest)) = input.split_first() else {
        return Script {
            observer: false,
            comeback: false,
            calls: Vec::new(),
            groups: Vec::new(),
        };
    };
    let mut calls = Vec::new();
    for _ in 0..usize::from(head & 0xf).min(MAX_CALLS) {
        let Some(raw) = rest.get(..9) else { break };
        calls.push(Call {
            kind: raw[0],
            arg: u64::from_le_bytes(raw[1..9].try_into().unwrap()),
        });
        rest = &rest[9..];
    }
    let mut groups = Vec::new();
    while let Some((&count, tail)) = rest.split_first() {
        if groups.len() == MAX_GROUPS {
            break;
        }
        rest = tail;
        let mut group = Vec::new();
        for _ in 0..count & 7 {
            let Some(raw) = rest.get(..5) else { break };
            let len = usize::from(u16::from_le_bytes([raw[3], raw[4]])).min(rest.len() - 5);
            group.push(Message {
                bytes: rest[5..5 + len].to_vec(),
                fd_count: usize::from(raw[0] & 0x1f).min(seqpacket::MAX_FDS_PER_PACKET),
                fd_kind: raw[0] >> 5,
                pages: u64::from(raw[1]),
                flags: raw[2],
            });
            rest = &rest[5 + len..];
        }
        groups.push(group);
    }
    Script {
        observer: head & 0x80 != 0,
        comeback: head & 0x40 != 0,
        calls,
        groups,
    }
}

fn eventfd() -> OwnedFd {
    let evt = EventFd::new(0).unwrap();
    // SAFETY: `into_raw_fd` gives up ownership of a valid descriptor, taken over here once.
    unsafe { OwnedFd::from_raw_fd(evt.into_raw_fd()) }
}

fn make_fd(kind: u8, pages: u64) -> OwnedFd {
    match kind {
        1 | 2 => {
            let memory = RegionMemory::create("fuzz", pages * 4096, false).unwrap();
            if kind == 1 {
                memory.read_write_fd().unwrap()
            } else {
                memory.read_only_fd().unwrap()
            }
        }
        3 => File::open("/dev/null").unwrap().into(),
        _ => eventfd(),
    }
}

/// Whether the session's reader takes `message` as an answer to request `id` (mirrors
/// what the client accepts: a whole packet that decodes, is no event and carries the
/// descriptors it announces).
fn answer_id(message: &[u8], fds: usize) -> Option<u64> {
    if message.len() > MAX_MESSAGE_LEN || message.is_empty() && fds == 0 {
        return None;
    }
    let (id, reply) = wire::decode_reply(message).ok()?;
    let expected = match &reply {
        Reply::Event(_) => return None,
        Reply::Lease { .. } => 1,
        Reply::Doorbells { devids, .. } => devids.len(),
        _ => 0,
    };
    (fds == expected).then_some(id)
}

/// Whether the session takes `message`, its first answer to its hello, as a welcome it can
/// later resume (version 4 or later, with a resume key).
fn resumable_welcome(message: &[u8], fds: usize) -> bool {
    matches!(
        wire::decode_reply(message),
        Ok((1, Reply::HelloOk { version, devid, resume_key, .. }))
            if fds == 0
                && (wire::RESUME_VERSION..=wire::MAX_VERSION).contains(&version)
                && devid != 0
                && resume_key != 0
    )
}

/// The broker's side of one connection: answer every request with the next group, hang up
/// when the script ends or the session would wait for an answer it never gets. Returns
/// whether the hello it answered lets the session come back after a hang-up.
fn play_broker(
    socket: &OwnedFd,
    observer: bool,
    groups: &mut std::vec::IntoIter<Vec<Message>>,
) -> bool {
    let mut hung_up = false;
    let mut resumable = false;
    while let Ok(Some(packet)) = seqpacket::recv(socket.as_fd()) {
        if hung_up {
            continue;
        }
        let (id, request) = wire::decode_request(&packet.bytes).expect("client sent garbage");
        if std::env::var_os("ISM_FUZZ_DEBUG").is_some() {
            eprintln!(
                "broker_reply: broker got {id} {request:?}{}",
                if hung_up { " (hung up)" } else { "" }
            );
        }
        assert!(
            packet.fds.len() <= 1,
            "client sent {} fds",
            packet.fds.len()
        );
        if matches!(request, Request::PublishDoorbell { .. }) {
            assert_eq!(packet.fds.len(), 1, "doorbell without its descriptor");
        }
        let Some(group) = groups.next() else {
            seqpacket::shutdown(socket.as_fd());
            hung_up = true;
            continue;
        };
        let mut answered = false;
        for mut message in group {
            if message.flags & 1 != 0 && message.bytes.len() >= 16 {
                message.bytes[8..16].copy_from_slice(&id.to_le_bytes());
            }
            if message.flags & 2 != 0 && message.bytes.len() >= 4 {
                let len = message.bytes.len() as u32;
                message.bytes[..4].copy_from_slice(&len.to_le_bytes());
            }
            let fds: Vec<OwnedFd> = (0..message.fd_count)
                .map(|_| make_fd(message.fd_kind, message.pages))
                .collect();
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|fd| fd.as_fd()).collect();
            if seqpacket::send_fds(socket.as_fd(), &message.bytes, &borrowed).is_err() {
                continue;
            }
            // The hello is answered by whatever comes first; later requests (a RESUME
            // too: the session waits for its id) by the last answer (each replaces the one
            // before in the session's inbox).
            match answer_id(&message.bytes, fds.len()) {
                _ if matches!(request, Request::Hello { .. }) => {
                    if !answered {
                        resumable = resumable_welcome(&message.bytes, fds.len());
                    }
                    answered = true
                }
                Some(answer) => answered = answer == id,
                None => {}
            }
        }
        // An operator tool reads until it has its answer (a status report may take several
        // chunks): one group, then hang up.
        let hello = matches!(request, Request::Hello { .. });
        if !answered || observer && !hello {
            seqpacket::shutdown(socket.as_fd());
            hung_up = true;
        }
    }
    resumable
}

fn is_eventfd(fd: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .is_ok_and(|target| target.as_os_str() == "anon_inode:[eventfd]")
}

/// With ISM_FUZZ_DEBUG set, what each call returned.
fn trace<T: std::fmt::Debug, E: std::fmt::Display>(call: &str, result: &Result<T, E>) {
    if std::env::var_os("ISM_FUZZ_DEBUG").is_some() {
        match result {
            Ok(value) => eprintln!("broker_reply: {call} -> {value:?}"),
            Err(e) => eprintln!("broker_reply: {call} -> error: {e}"),
        }
    }
}

/// An operator tool's side: connect and ask.
fn play_observer(path: &Path, calls: &[Call]) {
    let client = ObserverClient::connect(path);
    trace("connect", &client.as_ref().map(|_| ()));
    let Ok(mut client) = client else {
        return;
    };
    for call in calls {
        if call.kind % 2 == 0 {
            let status = client.status();
            trace("status", &status);
            if let Ok(status) = status {
                let json = ism_pool::status::to_json(&status);
                assert_eq!(ism_pool::status::from_json(&json).unwrap(), status);
            }
        } else {
            trace("revoke", &client.revoke(Token(call.arg)));
        }
    }
}

/// Waits (at most 50 ms) until `session` is connected again or the broker is gone for good.
fn wait_for_broker(session: &BrokerSession, broker_gone: &AtomicBool) -> bool {
    let start = Instant::now();
    while !session.is_connected() && !broker_gone.load(Ordering::Acquire) {
        if start.elapsed() > Duration::from_millis(50) {
            break;
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    session.is_connected()
}

/// The device's side: connect and make the calls.
fn play_device(path: &Path, calls: &[Call], broker_gone: &AtomicBool) {
    let options = ClientOptions {
        backoff_min: Duration::from_micros(20),
        backoff_max: Duration::from_millis(1),
        ..ClientOptions::default()
    };
    let session = BrokerSession::connect_with(path, options, None);
    trace("connect", &session);
    let Ok(broker) = session else {
        return;
    };
    let session: Arc<dyn PoolSession> = broker.clone();
    let doorbell = eventfd();
    for call in calls {
        let token = Token(call.arg);
        let perms = Perms(u64::from(call.kind >> 4));
        match (call.kind & 0xf) % 10 {
            0 => {
                let lease = session.alloc(call.arg);
                trace("alloc", &lease);
                if let Ok(lease) = lease {
                    check_lease(&lease.fd, lease.size, lease.writable);
                }
            }
            1 => {
                let lease = session.attach(token, perms);
                trace("attach", &lease);
                if let Ok(lease) = lease {
                    check_lease(&lease.fd, lease.size, lease.writable);
                }
            }
            2 => trace("detach", &session.detach(token)),
            3 => {
                let target = if call.kind & 0x80 != 0 {
                    GrantTarget::Device(DevId(call.arg >> 32))
                } else {
                    GrantTarget::Default
                };
                trace("grant", &session.grant(token, target, perms));
            }
            4 => trace(
                "publish",
                &session.publish_doorbell(token, doorbell.as_fd()),
            ),
            5 => trace("withdraw", &session.withdraw_doorbell(token)),
            6 => {
                let doorbells = session.peer_doorbells(token);
                trace("peer_doorbells", &doorbells);
                if let Ok(doorbells) = doorbells {
                    for (_, fd) in &doorbells {
                        assert!(is_eventfd(fd.as_fd()), "doorbell is no eventfd");
                    }
                }
            }
            7 => drop(session.take_events()),
            8 => drop(session.info()),
            _ => {
                let connected = wait_for_broker(&broker, broker_gone);
                trace("wait", &Ok::<bool, String>(connected));
            }
        }
    }
}

fn check_lease(fd: &OwnedFd, size: u64, writable: bool) {
    let file = File::from(fd.try_clone().unwrap());
    assert_eq!(
        file.metadata().unwrap().len(),
        size,
        "lease of another size"
    );
    // A read-only lease cannot be written through.
    if !writable {
        assert!(std::io::Write::write(&mut &file, b"x").is_err());
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Bound and removed once per input: on tmpfs (`/dev/shm`) where there is one, as making
/// and removing a socket file on a disk filesystem cost a tenth of an input.
fn socket_path() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("ism-fuzz-broker-{}.sock", std::process::id()))
}

/// What the client side is asked to play for one input.
struct Job {
    path: PathBuf,
    observer: bool,
    calls: Vec<Call>,
}

/// Between the broker (the fuzz thread) and the client thread.
struct Signals {
    /// The broker will accept no more connections in this input.
    broker_gone: AtomicBool,
    /// An eventfd: the client side is done (its session dropped: it cannot reconnect any
    /// more).
    client_done: OwnedFd,
}

/// The client side runs on one thread for the whole process, taking one job per input:
/// creating a thread per input (under ASan) cost more than the input itself. A panic there
/// aborts the process (libfuzzer-sys's panic hook), as it did on a thread of its own.
struct ClientThread {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<()>,
    signals: Arc<Signals>,
}

impl ClientThread {
    fn start() -> Self {
        pin_to_one_cpu();
        let (jobs, job_rx) = mpsc::channel::<Job>();
        let (done_tx, done) = mpsc::channel();
        let signals = Arc::new(Signals {
            broker_gone: AtomicBool::new(false),
            client_done: {
                let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
                // SAFETY: `into_raw_fd` gives up ownership of a valid descriptor, taken over
                // here once.
                unsafe { OwnedFd::from_raw_fd(evt.into_raw_fd()) }
            },
        });
        let theirs = signals.clone();
        std::thread::Builder::new()
            .name("fuzz-client".into())
            .spawn(move || {
                for job in job_rx {
                    if job.observer {
                        play_observer(&job.path, &job.calls)
                    } else {
                        play_device(&job.path, &job.calls, &theirs.broker_gone)
                    }
                    rustix::io::write(&theirs.client_done, &1u64.to_ne_bytes())
                        .expect("eventfd write");
                    if done_tx.send(()).is_err() {
                        break;
                    }
                }
            })
            .expect("client thread");
        ClientThread {
            jobs,
            done,
            signals,
        }
    }
}

/// Keeps this thread, and the threads it starts from now on (the client thread and every
/// session's reader), on the CPU it runs on, unless the process was already given one CPU
/// (`taskset -c N`, to run two fuzzers side by side). A request crosses three threads: on
/// one CPU each hand-over is a plain context switch, while waking a thread on another CPU
/// takes an interrupt between CPUs, a VM exit on a virtualised host. Measured on this
/// project's PVM host: 3 235 inputs/s on one CPU, 2 669/s free on two.
fn pin_to_one_cpu() {
    use rustix::thread::{CpuSet, sched_getaffinity, sched_getcpu, sched_setaffinity};
    // Best effort: on failure the target is slower, not wrong.
    if sched_getaffinity(None).is_ok_and(|allowed| allowed.count() > 1) {
        let mut one = CpuSet::new();
        one.set(sched_getcpu());
        let _ = sched_setaffinity(None, &one);
    }
}

thread_local! {
    static CLIENT: ClientThread = ClientThread::start();
}

fn accept(listener: &OwnedFd) -> OwnedFd {
    // libFuzzer's timer signal (SIGALRM, for -timeout) may interrupt the wait; the
    // broker's accept loop retries EINTR too.
    loop {
        match seqpacket::accept(listener.as_fd()) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            accepted => break accepted.unwrap(),
        }
    }
}

/// The session's reconnection, or None once the client side is done without one.
fn accept_comeback(listener: &OwnedFd, client_done: &OwnedFd) -> Option<OwnedFd> {
    use rustix::event::{PollFd, PollFlags, poll};
    loop {
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::new(client_done, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Err(rustix::io::Errno::INTR) => continue,
            result => {
                result.expect("poll");
            }
        }
        if !fds[0].revents().is_empty() {
            return Some(accept(listener));
        }
        if !fds[1].revents().is_empty() {
            return None;
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let script = parse(input);
    CLIENT.with(|client| {
        let before = open_fds();
        let signals = &client.signals;
        signals.broker_gone.store(false, Ordering::Release);
        let path = socket_path();
        let _ = std::fs::remove_file(&path);
        let listener = seqpacket::listen(&path, 1).unwrap();
        client
            .jobs
            .send(Job {
                path: path.clone(),
                observer: script.observer,
                calls: script.calls,
            })
            .expect("client thread gone");
        let mut socket = accept(&listener);
        // Without a comeback nothing else may connect: the path goes at once (a
        // reconnecting session finds nobody there).
        let mut listener = Some(listener);
        let mut comeback = script.comeback && !script.observer;
        if !comeback {
            listener = None;
            let _ = std::fs::remove_file(&path);
        }
        let mut groups = script.groups.into_iter();
        loop {
            let resumable = play_broker(&socket, script.observer, &mut groups);
            drop(socket);
            let next = match &listener {
                // A session that cannot resume is not waited for.
                Some(listener) if comeback && resumable && groups.len() > 0 => {
                    accept_comeback(listener, &signals.client_done)
                }
                _ => None,
            };
            comeback = false;
            match next {
                Some(again) => socket = again,
                None => break,
            }
        }
        drop(listener);
        let _ = std::fs::remove_file(&path);
        signals.broker_gone.store(true, Ordering::Release);
        client.done.recv().expect("client thread gone");
        let _ = rustix::io::read(&signals.client_done, &mut [0u8; 8]);
        assert_eq!(open_fds(), before, "descriptors left over");
    });
});
