// SPDX-License-Identifier: Apache-2.0
//! Issue 15: the broker dies (SIGKILL), hangs (SIGSTOP) or loses a peer VMM, with real
//! processes: a real `ism-pool` daemon killed and restarted on the same socket and state
//! file, device sessions (`BrokerSession`, what a VMM's virtio-ism device uses) in this
//! process and, for the peer that is killed, in a child process (this test binary re-run).
//!
//! Every test prints what it measured; none asserts on timing beyond generous bounds.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ism_pool::client::{BrokerSession, ClientOptions, query_status};
use ism_pool::{GrantTarget, PoolError, PoolEvent, PoolSession, PoolStatus, Token};

const PAGE: u64 = 4096;
/// Set for the child that plays a peer VMM attaching and detaching in a loop.
const CHILD_SOCKET_ENV: &str = "ISM_RESTART_TEST_SOCKET";
const CHILD_TOKEN_ENV: &str = "ISM_RESTART_TEST_TOKEN";
/// READ | WRITE | ATTACH.
const RWA: u64 = 7;

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A real `ism-pool` on a private socket, with its state file next to it.
struct Broker {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    args: Vec<String>,
}

impl Broker {
    fn start(extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ism-restart-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("pool.sock");
        let mut args: Vec<String> = ["--size", "256M", "--per-vm-limit", "256M"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut broker = Broker {
            child: None,
            dir,
            socket,
            args,
        };
        broker.launch();
        broker
    }

    fn launch(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_ism-pool"))
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.args)
            .env("RUST_LOG", "error")
            .spawn()
            .expect("start ism-pool");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while query_status(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "ism-pool did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("broker running").id()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// SIGKILL, as an OOM kill or a crash would.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("broker running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts it again with the same options on the same socket and state file.
    fn restart(&mut self) {
        assert!(self.child.is_none());
        self.launch();
    }

    fn status(&self) -> PoolStatus {
        query_status(&self.socket).unwrap()
    }

    fn state_file(&self) -> PathBuf {
        let mut path = self.socket.clone().into_os_string();
        path.push(".state");
        PathBuf::from(path)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn options() -> ClientOptions {
    ClientOptions {
        reply_timeout: Duration::from_secs(1),
        reconnect: true,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    }
}

fn session(socket: &Path) -> Arc<BrokerSession> {
    BrokerSession::connect_with(socket, options(), None).unwrap()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_connected(sessions: &[&Arc<BrokerSession>]) {
    wait_until("the sessions to resume", Duration::from_secs(15), || {
        sessions.iter().all(|s| s.is_connected())
    });
}

fn eventfd() -> OwnedFd {
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap()
}

fn write_u64(fd: &OwnedFd, offset: u64, value: u64) {
    assert_eq!(
        rustix::io::pwrite(fd, &value.to_le_bytes(), offset).unwrap(),
        8
    );
}

fn read_u64(fd: &OwnedFd, offset: u64) -> u64 {
    let mut buf = [0u8; 8];
    assert_eq!(rustix::io::pread(fd, &mut buf, offset).unwrap(), 8);
    u64::from_le_bytes(buf)
}

fn is_unavailable(error: &PoolError) -> bool {
    matches!(error, PoolError::Connection(_))
}

fn held_by(status: &PoolStatus, devid: u64) -> BTreeSet<u64> {
    status
        .sessions
        .iter()
        .find(|s| s.devid == devid)
        .map(|s| s.held.iter().copied().collect())
        .unwrap_or_default()
}

/// Steady traffic between two holders (writes into the shared region and doorbell kicks
/// straight between their eventfds) survives a SIGKILL of the broker; while it is down,
/// control requests fail at once with `Connection`; after the restart both sessions are
/// back with their devids, the region with its owner and grants, the gid is the same, and
/// alloc, attach and grant work again with fresh tokens.
#[test]
fn test_broker_killed_during_traffic_comes_back_with_everything() {
    let mut broker = Broker::start(&[]);
    let a = session(&broker.socket);
    let b = session(&broker.socket);
    let (a_dev, b_dev) = (a.info().devid, b.info().devid);
    let gid = a.info().gid;
    let region = a.alloc(PAGE).unwrap();
    let token = region.token;
    a.grant(token, GrantTarget::Device(b_dev), ism_pool::Perms(RWA))
        .unwrap();
    let b_region = b.attach(token, ism_pool::Perms::NONE).unwrap();
    assert!(b_region.writable);
    // Doorbells: each publishes its own, and the other rings it directly.
    let a_bell = eventfd();
    let b_bell = eventfd();
    a.publish_doorbell(token, a_bell.as_fd()).unwrap();
    b.publish_doorbell(token, b_bell.as_fd()).unwrap();
    let to_b = a.peer_doorbells(token).unwrap().pop().unwrap();
    assert_eq!(to_b.0, b_dev);

    // Traffic: A writes a sequence number and rings B's doorbell; B checks what it sees.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let fd = region.fd.try_clone().unwrap();
        let bell = to_b.1;
        std::thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                write_u64(&fd, 0, seq);
                rustix::io::write(&bell, &1u64.to_le_bytes()).unwrap();
                sent.store(seq, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let reader = {
        let stop = stop.clone();
        let fd = b_region.fd.try_clone().unwrap();
        let bell = b_bell.try_clone().unwrap();
        std::thread::spawn(move || {
            let (mut kicks, mut last) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let mut buf = [0u8; 8];
                if rustix::io::read(&bell, &mut buf).is_ok() {
                    kicks += u64::from_le_bytes(buf);
                    let seen = read_u64(&fd, 0);
                    assert!(seen >= last, "sequence went back from {last} to {seen}");
                    last = seen;
                }
            }
            (kicks, last)
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    broker.kill();
    let before = sent.load(Ordering::Relaxed);
    // While it is down: a defined failure, at once, and nothing a holder has is freed.
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    assert!(is_unavailable(&a.alloc(PAGE).unwrap_err()));
    assert!(is_unavailable(
        &a.grant(token, GrantTarget::Default, ism_pool::Perms(5))
            .unwrap_err()
    ));
    assert!(is_unavailable(
        &b.attach(Token(1), ism_pool::Perms::NONE).unwrap_err()
    ));
    let outage_answer = started.elapsed();
    assert!(
        outage_answer < Duration::from_millis(500),
        "{outage_answer:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let during = sent.load(Ordering::Relaxed) - before;
    assert!(during > 0, "traffic stopped while the broker was down");

    broker.restart();
    wait_connected(&[&a, &b]);
    let status = broker.status();
    assert_eq!(status.gid, gid, "the pool's identity survives");
    let entry = status.regions.iter().find(|r| r.token == token.0).unwrap();
    assert_eq!(entry.owner, a_dev.0);
    assert_eq!(entry.holders, vec![a_dev.0, b_dev.0]);
    assert_eq!(entry.grants, vec![(b_dev.0, RWA)]);
    assert_eq!(status.used, PAGE);
    wait_until("both doorbells republished", Duration::from_secs(5), || {
        let status = broker.status();
        let entry = status.regions.iter().find(|r| r.token == token.0).unwrap();
        entry.doorbells == vec![a_dev.0, b_dev.0]
    });
    // B hears that the doorbells may have changed and gets A's again.
    wait_until("B's doorbell refresh", Duration::from_secs(5), || {
        b.take_events()
            .contains(&PoolEvent::DoorbellsChanged { token })
    });
    assert_eq!(b.peer_doorbells(token).unwrap()[0].0, a_dev);

    // Everything works again, and a new region never gets an old token.
    let fresh = a.alloc(2 * PAGE).unwrap();
    assert_ne!(fresh.token, token);
    a.grant(
        fresh.token,
        GrantTarget::Device(b_dev),
        ism_pool::Perms(RWA),
    )
    .unwrap();
    let attached = b.attach(fresh.token, ism_pool::Perms::NONE).unwrap();
    write_u64(&fresh.fd, 8, 0x1515);
    assert_eq!(read_u64(&attached.fd, 8), 0x1515);
    b.detach(fresh.token).unwrap();
    a.grant(token, GrantTarget::Default, ism_pool::Perms(5))
        .unwrap();

    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    rustix::io::write(&b_bell, &1u64.to_le_bytes()).unwrap();
    let (kicks, last) = reader.join().unwrap();
    println!(
        "traffic: {} writes, {kicks} kicks received, {during} writes while the broker was down, control answer during the outage in {outage_answer:?}",
        sent.load(Ordering::Relaxed)
    );
    assert_eq!(last, sent.load(Ordering::Relaxed));
    let mode = std::fs::metadata(broker.state_file()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);
}

/// What one storm thread believes its two sessions hold.
type Books = BTreeMap<u64, BTreeSet<u64>>;

/// Two pairs of sessions run alloc / grant / attach / detach as fast as they can while the
/// broker is SIGKILLed and restarted; afterwards every session holds exactly what it was
/// told it holds, and everything works.
#[test]
fn test_broker_killed_during_an_alloc_attach_grant_detach_storm() {
    let mut broker = Broker::start(&[]);
    let stop = Arc::new(AtomicBool::new(false));
    let books: Arc<Mutex<Books>> = Arc::default();
    let mut storms = Vec::new();
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let owner = session(&broker.socket);
        let peer = session(&broker.socket);
        sessions.push(owner.clone());
        sessions.push(peer.clone());
        let (stop, books) = (stop.clone(), books.clone());
        storms.push(std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, 0u64);
            let (o, p) = (owner.info().devid.0, peer.info().devid.0);
            let hold = |devid: u64, token: Token, held: bool| {
                let mut books = books.lock().unwrap();
                let set = books.entry(devid).or_default();
                if held {
                    set.insert(token.0);
                } else {
                    set.remove(&token.0);
                }
            };
            books.lock().unwrap().entry(o).or_default();
            books.lock().unwrap().entry(p).or_default();
            while !stop.load(Ordering::Relaxed) {
                let Ok(lease) = owner.alloc(PAGE) else {
                    failed += 1;
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let token = lease.token;
                hold(o, token, true);
                let shared = owner
                    .grant(
                        token,
                        GrantTarget::Device(peer.info().devid),
                        ism_pool::Perms(RWA),
                    )
                    .is_ok()
                    && peer.attach(token, ism_pool::Perms::NONE).is_ok();
                if shared {
                    hold(p, token, true);
                    // Detach forgets the region whatever the broker answers.
                    let _ = peer.detach(token);
                    hold(p, token, false);
                    ok += 1;
                } else {
                    failed += 1;
                }
                let _ = owner.detach(token);
                hold(o, token, false);
            }
            (ok, failed)
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    broker.kill();
    std::thread::sleep(Duration::from_millis(300));
    broker.restart();
    let refs: Vec<&Arc<BrokerSession>> = sessions.iter().collect();
    wait_connected(&refs);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for (i, storm) in storms.into_iter().enumerate() {
        let (ok, failed) = storm.join().unwrap();
        println!("storm {i}: {ok} full cycles, {failed} refused (most while the broker was down)");
        assert!(ok > 0);
    }
    // Late answers are given back; then the broker's books and the sessions' agree.
    let books = books.lock().unwrap().clone();
    wait_until(
        "the broker's books to settle",
        Duration::from_secs(5),
        || {
            let status = broker.status();
            books
                .iter()
                .all(|(devid, held)| held_by(&status, *devid) == *held)
        },
    );
    let status = broker.status();
    assert!(status.regions.is_empty(), "{:?}", status.regions);
    assert_eq!(status.used, 0);
    // And the pool works for every session.
    let (owner, peer) = (&sessions[0], &sessions[3]);
    let lease = owner.alloc(PAGE).unwrap();
    owner
        .grant(
            lease.token,
            GrantTarget::Device(peer.info().devid),
            ism_pool::Perms(RWA),
        )
        .unwrap();
    peer.attach(lease.token, ism_pool::Perms::NONE).unwrap();
}

/// A broker stopped for longer than the reply timeout: the request fails with a timeout
/// after about that long, later ones at once; once it runs again the session recovers, and
/// the region it leased to the timed-out ALLOC is given back with the next request.
#[test]
fn test_broker_stopped_longer_than_the_timeout() {
    let broker = Broker::start(&[]);
    let a = session(&broker.socket);
    let kept = a.alloc(PAGE).unwrap();
    broker.signal("-STOP");
    let started = Instant::now();
    let error = a.alloc(PAGE).unwrap_err();
    let waited = started.elapsed();
    assert!(
        matches!(&error, PoolError::Connection(e) if e.kind() == std::io::ErrorKind::TimedOut),
        "{error:?}"
    );
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(5));
    let started = Instant::now();
    assert!(is_unavailable(&a.alloc(PAGE).unwrap_err()));
    let next = started.elapsed();
    assert!(next < Duration::from_millis(200), "{next:?}");
    std::thread::sleep(Duration::from_millis(1500));
    broker.signal("-CONT");
    println!("stopped broker: first request failed after {waited:?}, the next after {next:?}");
    wait_connected(&[&a]);
    let fresh = a.alloc(PAGE).unwrap();
    let status = broker.status();
    let held = held_by(&status, a.info().devid.0);
    assert_eq!(
        held,
        BTreeSet::from([kept.token.0, fresh.token.0]),
        "{status:?}"
    );
    assert_eq!(status.regions.len(), 2);
}

/// The child: a peer VMM that attaches and detaches one region in a loop until killed.
#[test]
fn child_attach_loop() {
    let (Ok(socket), Ok(token)) = (
        std::env::var(CHILD_SOCKET_ENV),
        std::env::var(CHILD_TOKEN_ENV),
    ) else {
        return;
    };
    let token = Token(token.parse().unwrap());
    let peer = session(Path::new(&socket));
    println!("child devid {}", peer.info().devid.0);
    loop {
        if peer.attach(token, ism_pool::Perms::NONE).is_ok() {
            let _ = peer.detach(token);
        }
    }
}

/// A peer VMM SIGKILLed in the middle of attaching: its session goes, the owner keeps the
/// region and its contents, hears that the peer left, and can allocate and grant again.
#[test]
fn test_peer_vmm_killed_during_attach() {
    let broker = Broker::start(&[]);
    let a = session(&broker.socket);
    let region = a.alloc(PAGE).unwrap();
    write_u64(&region.fd, 0, 42);
    a.grant(region.token, GrantTarget::Default, ism_pool::Perms(RWA))
        .unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_attach_loop",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_SOCKET_ENV, &broker.socket)
        .env(CHILD_TOKEN_ENV, region.token.0.to_string())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the peer to attach", Duration::from_secs(10), || {
        a.take_events()
            .iter()
            .any(|e| matches!(e, PoolEvent::PeerAttached { .. }))
    });
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("the peer's session to go", Duration::from_secs(5), || {
        broker.status().sessions.len() == 1
    });
    let status = broker.status();
    assert_eq!(status.regions.len(), 1);
    assert_eq!(status.regions[0].holders, vec![a.info().devid.0]);
    assert_eq!(read_u64(&region.fd, 0), 42);
    let more = a.alloc(PAGE).unwrap();
    a.grant(more.token, GrantTarget::Default, ism_pool::Perms(5))
        .unwrap();
}

/// A session that does not come back within the grace period is released: the holder
/// that did come back hears it left, and the state file forgets it.
#[test]
fn test_sessions_that_do_not_come_back_are_released_after_the_grace_period() {
    let mut broker = Broker::start(&["--grace", "2"]);
    let a = session(&broker.socket);
    let b = session(&broker.socket);
    let b_dev = b.info().devid;
    let region = a.alloc(PAGE).unwrap();
    a.grant(region.token, GrantTarget::Default, ism_pool::Perms(RWA))
        .unwrap();
    let _b_region = b.attach(region.token, ism_pool::Perms::NONE).unwrap();
    broker.kill();
    // B's VMM is gone too.
    drop(b);
    broker.restart();
    wait_connected(&[&a]);
    let restarted = Instant::now();
    // The operator sees what the broker still waits for.
    assert_eq!(broker.status().waiting_sessions, vec![b_dev.0]);
    wait_until("B's hold to be released", Duration::from_secs(10), || {
        a.take_events().contains(&PoolEvent::PeerDetached {
            token: region.token,
            peer: b_dev,
        })
    });
    let released = restarted.elapsed();
    println!("absent session released {released:?} after the restart (grace 2 s)");
    assert!(released >= Duration::from_millis(1500));
    let state = std::fs::read_to_string(broker.state_file()).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["sessions"].as_array().unwrap().len(), 1);
    assert_eq!(broker.status().regions[0].holders, vec![a.info().devid.0]);
    assert!(broker.status().waiting_sessions.is_empty());
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 10 000 alloc/free cycles leave the broker's and the client's descriptor counts and
/// memory flat.
#[test]
fn test_ten_thousand_alloc_free_cycles_keep_descriptors_and_memory_flat() {
    let broker = Broker::start(&[]);
    let a = session(&broker.socket);
    let me = std::process::id();
    let cycle = || {
        let lease = a.alloc(PAGE).unwrap();
        a.detach(lease.token).unwrap();
    };
    for _ in 0..100 {
        cycle();
    }
    let start = (
        fd_count(broker.pid()),
        rss_kib(broker.pid()),
        fd_count(me),
        rss_kib(me),
    );
    let started = Instant::now();
    for _ in 0..10_000 {
        cycle();
    }
    let end = (
        fd_count(broker.pid()),
        rss_kib(broker.pid()),
        fd_count(me),
        rss_kib(me),
    );
    println!(
        "10000 alloc/free cycles in {:?}: broker fds {} -> {}, RSS {} -> {} KiB; client fds {} -> {}, RSS {} -> {} KiB",
        started.elapsed(),
        start.0,
        end.0,
        start.1,
        end.1,
        start.2,
        end.2,
        start.3,
        end.3
    );
    assert!(end.0 <= start.0 + 4, "broker descriptors grew");
    assert!(end.2 <= start.2 + 16, "client descriptors grew");
    assert!(end.1 <= start.1 + 16 * 1024, "broker memory grew");
    assert!(end.3 <= start.3 + 64 * 1024, "client memory grew");
    assert!(broker.status().regions.is_empty());
}

/// A session opened without reconnecting (what a VMM whose pool-client filter only
/// receives uses) ends with the broker, as before version 4: nothing comes back.
#[test]
fn test_a_session_without_reconnect_ends_with_the_broker() {
    let mut broker = Broker::start(&["--grace", "1"]);
    let a = BrokerSession::connect_with_thread_start(&broker.socket, None).unwrap();
    let lease = a.alloc(PAGE).unwrap();
    write_u64(&lease.fd, 0, 7);
    broker.kill();
    broker.restart();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!a.is_connected());
    assert!(is_unavailable(&a.alloc(PAGE).unwrap_err()));
    let status = broker.status();
    assert!(status.sessions.is_empty() && status.regions.is_empty());
    // The memory the device mapped stays its own.
    assert_eq!(read_u64(&lease.fd, 0), 7);
}

/// A session dropped while it tries to resume on a broker that does not answer ends at
/// once, not after the reply timeout: a VMM's shutdown is not held up by a hung broker.
#[test]
fn test_dropping_a_session_stops_a_hanging_resume_at_once() {
    let mut broker = Broker::start(&[]);
    let slow = ClientOptions {
        reply_timeout: Duration::from_secs(20),
        ..options()
    };
    let a = BrokerSession::connect_with(&broker.socket, slow, None).unwrap();
    broker.kill();
    // Something that accepts connections on the socket and never answers.
    std::fs::remove_file(&broker.socket).unwrap();
    let _mute = ism_pool::seqpacket::listen(&broker.socket, 8).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(!a.is_connected());
    let started = Instant::now();
    drop(a);
    let took = started.elapsed();
    println!("session dropped during a hanging resume in {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
}
