// SPDX-License-Identifier: Apache-2.0
//! The broker with several client processes: a real `ism-pool` daemon, and clients that
//! are this test binary re-run as a child (`client_process`), driven line by line over its
//! stdin/stdout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ism_pool::client::{BrokerSession, query_status};
use ism_pool::wire::{self, MAX_MESSAGE_LEN, Reply, Request, Role};
use ism_pool::{GrantTarget, Perms, PoolSession, RegionLease, Token, seqpacket};

const CHILD_SOCKET_ENV: &str = "ISM_POOL_TEST_SOCKET";
/// Set for a child that speaks the raw protocol instead of opening a `BrokerSession`.
const CHILD_RAW_ENV: &str = "ISM_POOL_TEST_RAW";
/// Marks answer lines; libtest may print its own text before it on the same line.
const REPLY_PREFIX: &str = "@ism-client@ ";

/// A running `ism-pool` daemon on a private socket; killed when dropped.
struct BrokerProcess {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    /// What it logged (only with [`BrokerProcess::start_logged`]).
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

fn private_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ism-pool-test-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

impl BrokerProcess {
    fn start(args: &[&str]) -> Self {
        Self::launch(args, None, false)
    }

    /// Starts the broker under `sh -c "<shell>; exec ism-pool ..."` (e.g. to set ulimits)
    /// and keeps what it logs at info level and above.
    fn start_logged(args: &[&str], shell: &str) -> Self {
        Self::launch(args, Some(shell), true)
    }

    fn launch(args: &[&str], shell: Option<&str>, logged: bool) -> Self {
        let dir = private_dir();
        let socket = dir.join("pool.sock");
        let binary = env!("CARGO_BIN_EXE_ism-pool");
        let mut command = match shell {
            Some(shell) => {
                let mut command = Command::new("sh");
                command.args(["-c", &format!("{shell} && exec \"$0\" \"$@\""), binary]);
                command
            }
            None => Command::new(binary),
        };
        command
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", if logged { "info" } else { "warn" });
        if logged {
            command.stderr(Stdio::piped());
        }
        let mut child = command.spawn().expect("start ism-pool");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        let broker = BrokerProcess {
            child,
            dir,
            socket,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while seqpacket::connect(&broker.socket).is_err() {
            assert!(Instant::now() < deadline, "broker did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        broker
    }

    /// Lets processes of any uid reach the socket's directory and run `exe` copied into
    /// it (the test binary, as a client running under another uid).
    fn open_to_other_uids(&self) -> PathBuf {
        set_mode(&self.dir, 0o755);
        let exe = self.dir.join("client");
        if !exe.exists() {
            std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
            set_mode(&exe, 0o755);
        }
        exe
    }

    /// Everything the broker logged so far.
    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `ism-pool status --json`, parsed loosely (fields of any version).
    fn status_json(&self) -> serde_json::Value {
        let output = Command::new(env!("CARGO_BIN_EXE_ism-pool"))
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A client process speaking to the broker through `BrokerSession`.
struct ClientProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl ClientProcess {
    fn spawn(socket: &Path) -> Self {
        Self::spawn_with(socket, &std::env::current_exe().unwrap(), None)
    }

    fn spawn_with(socket: &Path, exe: &Path, uid: Option<u32>) -> Self {
        let mut client = Self::launch(socket, exe, uid, false);
        assert!(client.cmd("connect").starts_with("devid "));
        client
    }

    /// A child speaking the raw protocol (see `run_raw_command`), as `uid` if given.
    fn spawn_raw(socket: &Path, exe: &Path, uid: Option<u32>) -> Self {
        Self::launch(socket, exe, uid, true)
    }

    fn launch(socket: &Path, exe: &Path, uid: Option<u32>, raw: bool) -> Self {
        let mut command = Command::new(exe);
        if raw {
            command.env(CHILD_RAW_ENV, "1");
        }
        command
            .args([
                "--ignored",
                "--exact",
                "client_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_SOCKET_ENV, socket)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(uid) = uid {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(uid);
        }
        let mut child = command.spawn().expect("spawn client process");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        ClientProcess {
            child,
            stdin,
            stdout,
        }
    }

    /// Sends one command line and returns the child's answer.
    fn cmd(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        loop {
            let mut answer = String::new();
            let n = self.stdout.read_line(&mut answer).unwrap();
            assert!(n > 0, "client exited while running {line:?}");
            if let Some(at) = answer.find(REPLY_PREFIX) {
                return answer[at + REPLY_PREFIX.len()..].trim_end().to_string();
            }
        }
    }

    fn devid(&mut self) -> u64 {
        self.cmd("connect")
            .strip_prefix("devid ")
            .unwrap()
            .parse()
            .unwrap()
    }

    fn alloc(&mut self, size: u64) -> u64 {
        let answer = self.cmd(&format!("alloc {size}"));
        parse_token(&answer).unwrap_or_else(|| panic!("alloc failed: {answer}"))
    }
}

impl Drop for ClientProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_token(answer: &str) -> Option<u64> {
    answer.strip_prefix("token ")?.parse().ok()
}

/// Maps `lease` shared with `prot`; returns the address or the errno.
fn map(lease: &RegionLease, prot: rustix::mm::ProtFlags) -> Result<*mut u8, rustix::io::Errno> {
    // SAFETY: a fresh mapping chosen by the kernel (no address hint) cannot alias any Rust
    // object; the fd is a valid memfd of `lease.size` bytes.
    unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            lease.size as usize,
            prot,
            rustix::mm::MapFlags::SHARED,
            lease.fd.as_fd(),
            0,
        )
    }
    .map(|p| p.cast::<u8>())
}

fn unmap(addr: *mut u8, lease: &RegionLease) {
    // SAFETY: `addr` came from `map` with this lease's size and nothing refers to it now.
    unsafe { rustix::mm::munmap(addr.cast(), lease.size as usize) }.unwrap();
}

/// Waits up to `timeout` for `fd` to become readable.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    let timeout = rustix::event::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    rustix::event::poll(&mut fds, Some(&timeout)).unwrap_or(0) == 1
}

fn new_eventfd() -> OwnedFd {
    rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
    )
    .unwrap()
}

/// Doorbell commands: this process's own doorbells by token.
fn run_doorbell_command(
    session: &BrokerSession,
    doorbells: &mut HashMap<u64, OwnedFd>,
    words: &[&str],
) -> Option<String> {
    let token = words.get(1).and_then(|t| t.parse().ok()).unwrap_or(0u64);
    Some(match words.first().copied().unwrap_or("") {
        // publish TOKEN: a fresh eventfd becomes this session's doorbell for TOKEN.
        "publish" => {
            let doorbell = new_eventfd();
            match session.publish_doorbell(Token(token), doorbell.as_fd()) {
                Ok(()) => {
                    doorbells.insert(token, doorbell);
                    "ok".into()
                }
                Err(e) => format!("err {e:?}"),
            }
        }
        "withdraw" => match session.withdraw_doorbell(Token(token)) {
            Ok(()) => "ok".into(),
            Err(e) => format!("err {e:?}"),
        },
        // doorbells TOKEN: the devids whose doorbells this session is given.
        "doorbells" => match session.peer_doorbells(Token(token)) {
            Ok(list) => {
                let devids: Vec<u64> = list.iter().map(|(devid, _)| devid.0).collect();
                format!("doorbells {devids:?}")
            }
            Err(e) => format!("err {e:?}"),
        },
        // ring TOKEN: write every peer doorbell of TOKEN once.
        "ring" => match session.peer_doorbells(Token(token)) {
            Ok(list) => {
                for (_, doorbell) in &list {
                    rustix::io::write(doorbell, &1u64.to_ne_bytes()).unwrap();
                }
                let devids: Vec<u64> = list.iter().map(|(devid, _)| devid.0).collect();
                format!("rang {devids:?}")
            }
            Err(e) => format!("err {e:?}"),
        },
        // fired TOKEN: waits up to 5 s for this process's own doorbell to be written.
        "fired" => {
            let Some(doorbell) = doorbells.get(&token) else {
                return Some("err no doorbell".into());
            };
            if !wait_readable(doorbell, Duration::from_secs(5)) {
                return Some("idle".into());
            }
            let mut count = [0u8; 8];
            rustix::io::read(doorbell, &mut count).unwrap();
            format!("fired {}", u64::from_ne_bytes(count))
        }
        _ => return None,
    })
}

/// Runs one child command against the session and its leases.
fn run_child_command(
    session: &BrokerSession,
    leases: &mut HashMap<u64, RegionLease>,
    words: &[&str],
) -> String {
    use rustix::mm::ProtFlags;
    let num = |i: usize| -> u64 {
        let text = words.get(i).copied().unwrap_or("0");
        text.parse().unwrap_or(0)
    };
    match words.first().copied().unwrap_or("") {
        "connect" => format!("devid {}", session.info().devid.0),
        "alloc" => match session.alloc(num(1)) {
            Ok(lease) => {
                let token = lease.token.0;
                leases.insert(token, lease);
                format!("token {token}")
            }
            Err(e) => format!("err {e:?}"),
        },
        "attach" => match session.attach(Token(num(1)), Perms(num(2))) {
            Ok(lease) => {
                let writable = lease.writable;
                leases.insert(lease.token.0, lease);
                format!("lease writable={}", u8::from(writable))
            }
            Err(e) => format!("err {e:?}"),
        },
        "detach" => match session.detach(Token(num(1))) {
            Ok(()) => {
                leases.remove(&num(1));
                "ok".into()
            }
            Err(e) => format!("err {e:?}"),
        },
        "grant" => {
            let target = match words.get(2).copied() {
                Some("default") => GrantTarget::Default,
                _ => GrantTarget::Device(ism_pool::DevId(num(2))),
            };
            match session.grant(Token(num(1)), target, Perms(num(3))) {
                Ok(()) => "ok".into(),
                Err(e) => format!("err {e:?}"),
            }
        }
        // write TOKEN OFFSET TEXT, through a writable shared mapping.
        "write" => {
            let Some(lease) = leases.get(&num(1)) else {
                return "err no lease".into();
            };
            let text = words.get(3).copied().unwrap_or("").as_bytes();
            match map(lease, ProtFlags::READ | ProtFlags::WRITE) {
                Ok(addr) => {
                    for (i, byte) in text.iter().enumerate() {
                        // SAFETY: offset + i is inside the mapping (tests keep offsets small).
                        unsafe { addr.add(num(2) as usize + i).write_volatile(*byte) };
                    }
                    unmap(addr, lease);
                    "ok".into()
                }
                Err(e) => format!("err {e:?}"),
            }
        }
        // read TOKEN OFFSET LEN, through a read-only shared mapping.
        "read" => {
            let Some(lease) = leases.get(&num(1)) else {
                return "err no lease".into();
            };
            match map(lease, ProtFlags::READ) {
                Ok(addr) => {
                    let bytes: Vec<u8> = (0..num(3) as usize)
                        // SAFETY: offset + i is inside the mapping.
                        .map(|i| unsafe { addr.add(num(2) as usize + i).read_volatile() })
                        .collect();
                    unmap(addr, lease);
                    format!("data {}", String::from_utf8_lossy(&bytes))
                }
                Err(e) => format!("err {e:?}"),
            }
        }
        // Every way to get write access out of a lease: map writable, map read-only then
        // mprotect, write(2), reopen through procfs.
        "escalate" => {
            let Some(lease) = leases.get(&num(1)) else {
                return "err no lease".into();
            };
            let mut results = Vec::new();
            results.push(match map(lease, ProtFlags::READ | ProtFlags::WRITE) {
                Ok(addr) => {
                    unmap(addr, lease);
                    "mapw=ok".to_string()
                }
                Err(e) => format!("mapw={}", e.raw_os_error()),
            });
            results.push(match map(lease, ProtFlags::READ) {
                Ok(addr) => {
                    // SAFETY: changes protection of our own fresh mapping only.
                    let r = unsafe {
                        rustix::mm::mprotect(
                            addr.cast(),
                            lease.size as usize,
                            rustix::mm::MprotectFlags::READ | rustix::mm::MprotectFlags::WRITE,
                        )
                    };
                    unmap(addr, lease);
                    match r {
                        Ok(()) => "mprotect=ok".to_string(),
                        Err(e) => format!("mprotect={}", e.raw_os_error()),
                    }
                }
                Err(e) => format!("mapr={}", e.raw_os_error()),
            });
            results.push(match rustix::io::pwrite(&lease.fd, b"x", 0) {
                Ok(_) => "write=ok".to_string(),
                Err(e) => format!("write={}", e.raw_os_error()),
            });
            let path = format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&lease.fd)
            );
            results.push(
                match rustix::fs::open(
                    path.as_str(),
                    rustix::fs::OFlags::RDWR,
                    rustix::fs::Mode::empty(),
                ) {
                    Ok(_) => "reopen=ok".to_string(),
                    Err(e) => format!("reopen={}", e.raw_os_error()),
                },
            );
            results.join(" ")
        }
        // events N: waits up to 5 s until N events arrived, then prints them.
        "events" => {
            let want = num(1) as usize;
            let mut events = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(5);
            while events.len() < want && Instant::now() < deadline {
                events.extend(session.take_events());
                if events.len() >= want {
                    break;
                }
                // SAFETY: the session owns the eventfd and outlives this borrow.
                let fd =
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(session.event_fd().unwrap()) };
                let mut fds = [rustix::event::PollFd::new(
                    &fd,
                    rustix::event::PollFlags::IN,
                )];
                let timeout = rustix::event::Timespec {
                    tv_sec: 0,
                    tv_nsec: 100_000_000,
                };
                let _ = rustix::event::poll(&mut fds, Some(&timeout));
            }
            format!("events {events:?}")
        }
        // allocmany N SIZE: allocates until N regions or the first refusal.
        "allocmany" => {
            let mut allocated = 0;
            let mut refusal = String::from("none");
            for _ in 0..num(1) {
                match session.alloc(num(2)) {
                    Ok(lease) => {
                        leases.insert(lease.token.0, lease);
                        allocated += 1;
                    }
                    Err(e) => {
                        refusal = format!("{e:?}");
                        break;
                    }
                }
            }
            format!("allocated {allocated} err {refusal}")
        }
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(60));
        },
        other => format!("err unknown command {other:?}"),
    }
}

/// Child side: not a test of its own; the tests below run this binary with
/// `--ignored --exact client_process` and drive it over stdin/stdout.
#[test]
#[ignore = "client process entry point, run by the other tests"]
fn client_process() {
    let socket = std::env::var(CHILD_SOCKET_ENV).expect("run by the broker tests only");
    if std::env::var_os(CHILD_RAW_ENV).is_some() {
        let mut open = Vec::new();
        for line in std::io::stdin().lock().lines() {
            let line = line.unwrap();
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&"exit") {
                break;
            }
            let answer = run_raw_command(Path::new(&socket), &mut open, &words);
            println!("{REPLY_PREFIX}{answer}");
        }
        return;
    }
    let session = BrokerSession::connect(Path::new(&socket)).expect("connect to broker");
    let mut leases = HashMap::new();
    let mut doorbells = HashMap::new();
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"exit") {
            break;
        }
        let answer = run_doorbell_command(&session, &mut doorbells, &words)
            .unwrap_or_else(|| run_child_command(&session, &mut leases, &words));
        println!("{REPLY_PREFIX}{answer}");
    }
}

const RW: u64 = Perms::ATTACH.0 | Perms::READ.0 | Perms::WRITE.0;
const RO: u64 = Perms::ATTACH.0 | Perms::READ.0;

#[test]
fn test_data_written_in_one_process_is_read_in_another() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let mut owner = ClientProcess::spawn(&broker.socket);
    let mut peer = ClientProcess::spawn(&broker.socket);
    let token = owner.alloc(65536);
    assert_eq!(
        owner.cmd(&format!("write {token} 100 hello-from-owner")),
        "ok"
    );
    assert_eq!(owner.cmd(&format!("grant {token} default {RW}")), "ok");
    assert_eq!(peer.cmd(&format!("attach {token} 0")), "lease writable=1");
    assert_eq!(
        peer.cmd(&format!("read {token} 100 16")),
        "data hello-from-owner"
    );
    assert_eq!(peer.cmd(&format!("write {token} 5000 answer")), "ok");
    assert_eq!(owner.cmd(&format!("read {token} 5000 6")), "data answer");
    let peer_devid = peer.devid();
    assert_eq!(
        owner.cmd("events 1"),
        format!(
            "events [PeerAttached {{ token: {:?}, peer: DevId({peer_devid}) }}]",
            Token(token)
        )
    );
}

#[test]
fn test_refusals_without_permission() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let mut owner = ClientProcess::spawn(&broker.socket);
    let mut peer = ClientProcess::spawn(&broker.socket);
    let token = owner.alloc(4096);
    let peer_devid = peer.devid();
    assert!(
        peer.cmd(&format!("attach {token} 0"))
            .contains("missing: Attach")
    );
    assert!(
        peer.cmd(&format!("grant {token} default {RW}"))
            .contains("NotHeld")
    );
    assert!(peer.cmd("attach 12345 0").contains("NoSuchRegion"));
    assert_eq!(owner.cmd(&format!("grant {token} {peer_devid} {RO}")), "ok");
    let want_write = Perms::READ.0 | Perms::WRITE.0;
    assert!(
        peer.cmd(&format!("attach {token} {want_write}"))
            .contains("missing: Write")
    );
    assert_eq!(peer.cmd(&format!("attach {token} 0")), "lease writable=0");
    assert!(
        peer.cmd(&format!("attach {token} 0"))
            .contains("AlreadyHeld")
    );
    assert!(
        peer.cmd(&format!("grant {token} default {RW}"))
            .contains("missing: Manage")
    );
    // A third device is still locked out: the grant named the peer only.
    let mut third = ClientProcess::spawn(&broker.socket);
    assert!(
        third
            .cmd(&format!("attach {token} 0"))
            .contains("missing: Attach")
    );
}

#[test]
fn test_read_only_lease_cannot_be_made_writable() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let mut owner = ClientProcess::spawn(&broker.socket);
    let mut peer = ClientProcess::spawn(&broker.socket);
    let token = owner.alloc(4096);
    assert_eq!(owner.cmd(&format!("write {token} 0 secret")), "ok");
    assert_eq!(owner.cmd(&format!("grant {token} default {RO}")), "ok");
    assert_eq!(peer.cmd(&format!("attach {token} 0")), "lease writable=0");
    let eacces = rustix::io::Errno::ACCESS.raw_os_error();
    let ebadf = rustix::io::Errno::BADF.raw_os_error();
    let answer = peer.cmd(&format!("escalate {token}"));
    assert!(answer.contains(&format!("mapw={eacces}")), "{answer}");
    assert!(answer.contains(&format!("mprotect={eacces}")), "{answer}");
    assert!(answer.contains(&format!("write={ebadf}")), "{answer}");
    assert_eq!(peer.cmd(&format!("read {token} 0 6")), "data secret");
    // The owner's lease is untouched by the reader's read-only fd.
    assert_eq!(owner.cmd(&format!("write {token} 0 SECRET")), "ok");
    assert_eq!(peer.cmd(&format!("read {token} 0 6")), "data SECRET");
}

#[test]
fn test_read_only_lease_cannot_be_reopened_writable_by_another_user() {
    if !rustix::process::geteuid().is_root() {
        println!("SKIPPED: not root, cannot run a client under another uid");
        return;
    }
    let broker = BrokerProcess::start(&["--size", "16M"]);
    // The client runs as nobody, like a VMM under its own uid; it needs to reach the
    // socket and its own executable.
    let mode = |path: &Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    mode(&broker.dir, 0o755);
    mode(&broker.socket, 0o777);
    let exe = broker.dir.join("client");
    std::fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    mode(&exe, 0o755);
    let mut owner = ClientProcess::spawn(&broker.socket);
    let mut peer = ClientProcess::spawn_with(&broker.socket, &exe, Some(65534));
    let token = owner.alloc(4096);
    assert_eq!(owner.cmd(&format!("grant {token} default {RO}")), "ok");
    assert_eq!(peer.cmd(&format!("attach {token} 0")), "lease writable=0");
    let eacces = rustix::io::Errno::ACCESS.raw_os_error();
    let answer = peer.cmd(&format!("escalate {token}"));
    assert!(answer.contains(&format!("reopen={eacces}")), "{answer}");
    assert!(answer.contains(&format!("mapw={eacces}")), "{answer}");
}

#[test]
fn test_killed_client_is_reclaimed_and_peer_data_survives() {
    // Each client process stands for a VM of its own here.
    let broker = BrokerProcess::start(&[
        "--size",
        "16M",
        "--per-vm-limit",
        "2M",
        "--vm-identity",
        "process",
    ]);
    let mut owner = ClientProcess::spawn(&broker.socket);
    let mut peer = ClientProcess::spawn(&broker.socket);
    let owner_devid = owner.devid();
    let peer_devid = peer.devid();
    let token = owner.alloc(1 << 20);
    let private = owner.alloc(4096 * 4);
    assert!(private != token);
    assert_eq!(owner.cmd(&format!("write {token} 64 survives")), "ok");
    assert_eq!(owner.cmd(&format!("grant {token} default {RW}")), "ok");
    assert_eq!(peer.cmd(&format!("attach {token} 0")), "lease writable=1");

    owner.child.kill().unwrap();
    owner.child.wait().unwrap();

    assert_eq!(
        peer.cmd("events 1"),
        format!(
            "events [PeerDetached {{ token: {:?}, peer: DevId({owner_devid}) }}]",
            Token(token)
        )
    );
    assert_eq!(peer.cmd(&format!("read {token} 64 8")), "data survives");
    let status = query_status(&broker.socket).unwrap();
    assert_eq!(status.regions.len(), 1, "{status:?}");
    assert_eq!(status.regions[0].token, token);
    assert_eq!(status.regions[0].holders, vec![peer_devid]);
    assert_eq!(status.used, 1 << 20);
    assert_eq!(status.sessions.len(), 1);
    assert_eq!(status.sessions[0].vm_used, 1 << 20);

    assert_eq!(peer.cmd(&format!("detach {token}")), "ok");
    let status = query_status(&broker.socket).unwrap();
    assert!(status.regions.is_empty());
    assert_eq!(status.used, 0);
}

#[test]
fn test_quota_and_pool_exhaustion_errors() {
    // Each client process stands for a VM of its own here.
    let broker = BrokerProcess::start(&[
        "--size",
        "1M",
        "--per-vm-limit",
        "512K",
        "--vm-identity",
        "process",
    ]);
    let mut a = ClientProcess::spawn(&broker.socket);
    let mut b = ClientProcess::spawn(&broker.socket);
    let mut c = ClientProcess::spawn(&broker.socket);
    a.alloc(512 << 10);
    assert_eq!(
        a.cmd("alloc 4096"),
        format!(
            "err QuotaExceeded {{ limit: {}, used: {}, requested: 4096 }}",
            512 << 10,
            512 << 10
        )
    );
    b.alloc(512 << 10);
    assert_eq!(
        c.cmd("alloc 4096"),
        "err PoolExhausted { requested: 4096, available: 0 }"
    );
    assert_eq!(c.cmd("alloc 100"), "err InvalidSize(100)");
    drop(a);
    // Once the first VM is gone its region is freed and the pool has room again.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let answer = c.cmd("alloc 4096");
        if parse_token(&answer).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "pool never recovered: {answer}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A raw protocol connection from this process, for sending broken messages.
fn raw_connect(socket: &Path) -> std::os::fd::OwnedFd {
    let conn = seqpacket::connect(socket).unwrap();
    let hello = Request::Hello {
        min_version: 1,
        max_version: 1,
        role: Role::Device,
    };
    seqpacket::send(conn.as_fd(), &hello.encode(1), None).unwrap();
    let answer = raw_answer(&conn).unwrap();
    assert!(matches!(answer, (1, Reply::HelloOk { .. })), "{answer:?}");
    conn
}

fn raw_answer(conn: &std::os::fd::OwnedFd) -> Option<(u64, Reply)> {
    // A connection the broker closed reads as end of stream or as a reset.
    let packet = seqpacket::recv(conn.as_fd()).ok()??;
    Some(wire::decode_reply(&packet.bytes).unwrap())
}

#[test]
fn test_malformed_messages_are_answered_and_others_keep_working() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let mut good = ClientProcess::spawn(&broker.socket);
    good.alloc(4096);

    let conn = raw_connect(&broker.socket);
    let alloc = Request::Alloc { size: 4096 }.encode(7);
    let mut bad_length = alloc.clone();
    bad_length[0] = 200;
    let mut unknown_kind = alloc.clone();
    unknown_kind[4] = 0x55;
    let mut oversized = alloc.clone();
    oversized.resize(MAX_MESSAGE_LEN + 4096, 0);
    let broken: Vec<(&str, Vec<u8>)> = vec![
        ("truncated header", alloc[..10].to_vec()),
        ("truncated body", alloc[..20].to_vec()),
        ("length mismatch", bad_length),
        ("unknown kind", unknown_kind),
        ("oversized", oversized),
        (
            "garbage",
            b"\xff\xfe\xfd\xfc this is not a message at all".to_vec(),
        ),
        (
            "second hello",
            Request::Hello {
                min_version: 1,
                max_version: 1,
                role: Role::Device,
            }
            .encode(8),
        ),
        ("status on device connection", Request::Status.encode(9)),
        // Reads like the end of the stream on SOCK_SEQPACKET: the broker took it for a
        // hang-up and dropped the connection.
        ("empty packet", Vec::new()),
    ];
    for (what, packet) in &broken {
        seqpacket::send(conn.as_fd(), packet, None).unwrap();
        match raw_answer(&conn) {
            Some((_, Reply::Error(e))) => assert_eq!(e.code, wire::error_code::PROTOCOL, "{what}"),
            other => panic!("{what}: expected an error, got {other:?}"),
        }
        // The other client is not disturbed.
        assert!(parse_token(&good.cmd("alloc 4096")).is_some(), "{what}");
    }
    // A message carrying a descriptor is refused too (and the descriptor dropped).
    let devnull = std::fs::File::open("/dev/null").unwrap();
    seqpacket::send(conn.as_fd(), &alloc, Some(devnull.as_fd())).unwrap();
    assert!(matches!(raw_answer(&conn), Some((_, Reply::Error(_)))));
    // The same connection still works after all that.
    seqpacket::send(conn.as_fd(), &alloc, None).unwrap();
    assert!(matches!(
        raw_answer(&conn),
        Some((7, Reply::Lease { size: 4096, .. }))
    ));

    // Garbage before hello: answered, then the connection is closed.
    let early = seqpacket::connect(&broker.socket).unwrap();
    seqpacket::send(early.as_fd(), b"GET / HTTP/1.1\r\n\r\n", None).unwrap();
    assert!(matches!(raw_answer(&early), Some((_, Reply::Error(_)))));
    assert!(raw_answer(&early).is_none());
    assert!(parse_token(&good.cmd("alloc 4096")).is_some());
}

#[test]
fn test_status_subcommand_prints_regions_and_holders() {
    let broker = BrokerProcess::start(&["--size", "16M", "--per-vm-limit", "4M"]);
    let mut owner = ClientProcess::spawn(&broker.socket);
    let mut peer = ClientProcess::spawn(&broker.socket);
    let token = owner.alloc(2 << 20);
    assert_eq!(owner.cmd(&format!("grant {token} default {RO}")), "ok");
    assert_eq!(peer.cmd(&format!("attach {token} 0")), "lease writable=0");
    let output = Command::new(env!("CARGO_BIN_EXE_ism-pool"))
        .args(["status", "--socket"])
        .arg(&broker.socket)
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let (owner_devid, peer_devid) = (owner.devid(), peer.devid());
    assert!(text.contains("2M of 16M used, per-VM limit 4M"), "{text}");
    assert!(text.contains(&format!("{token:#018x} 2M")), "{text}");
    assert!(text.contains(&format!("owner {owner_devid}")), "{text}");
    assert!(
        text.contains(&format!("holders [{owner_devid}, {peer_devid}]")),
        "{text}"
    );
    assert!(text.contains("default RA"), "{text}");
}

#[test]
fn test_second_broker_on_same_socket_is_refused_and_stale_socket_reused() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let second = Command::new(env!("CARGO_BIN_EXE_ism-pool"))
        .arg("--socket")
        .arg(&broker.socket)
        .args(["--size", "16M"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already listening"));
    // A SIGKILLed broker leaves its socket file behind; a new one takes it over.
    let socket = broker.socket.clone();
    let dir = broker.dir.clone();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ism-pool"))
        .arg("--socket")
        .arg(&socket)
        .args(["--size", "16M"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(10));
    let _ = child.kill();
    let _ = child.wait();
    drop(broker);
    std::fs::create_dir_all(&dir).unwrap();
    let stale = seqpacket::listen(&socket, 1).unwrap();
    drop(stale);
    assert!(socket.exists());
    let mut restarted = Command::new(env!("CARGO_BIN_EXE_ism-pool"))
        .arg("--socket")
        .arg(&socket)
        .args(["--size", "16M"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let session = loop {
        if let Ok(session) = BrokerSession::connect(&socket) {
            break session;
        }
        assert!(
            Instant::now() < deadline,
            "restarted broker did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(session.alloc(4096).is_ok());
    let _ = restarted.kill();
    let _ = restarted.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The thread-start hook runs on the session's reader thread (a VMM confines it there).
#[test]
fn test_thread_start_hook_runs_on_the_reader_thread() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let session = BrokerSession::connect_with_thread_start(
        &broker.socket,
        Some(std::sync::Arc::new(move || {
            let name = std::thread::current().name().map(str::to_owned);
            let _ = tx.lock().unwrap().send(name);
        })),
    )
    .unwrap();
    let name = rx.recv_timeout(Duration::from_secs(5)).expect("hook ran");
    assert_eq!(name.as_deref(), Some("ism-pool-client"));
    // The session works after the hook, and the hook ran once.
    assert!(session.alloc(4096).is_ok());
    assert!(rx.try_recv().is_err());
}

#[test]
fn test_in_process_client_drop_releases_regions() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let session = BrokerSession::connect(&broker.socket).unwrap();
    assert_ne!(session.info().devid.0, 0);
    let lease = session.alloc(8192).unwrap();
    assert!(lease.writable);
    assert_eq!(query_status(&broker.socket).unwrap().used, 8192);
    drop(session);
    let deadline = Instant::now() + Duration::from_secs(5);
    while query_status(&broker.socket).unwrap().used != 0 {
        assert!(Instant::now() < deadline, "regions not released");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The lease fd still works in this process; only the broker's bookkeeping let go.
    assert_eq!(rustix::io::pwrite(&lease.fd, b"x", 0).unwrap(), 1);
}

#[test]
fn test_hugepage_pool_allocates_or_fails_cleanly() {
    let broker = BrokerProcess::start(&["--size", "8M", "--hugepages"]);
    let session = BrokerSession::connect(&broker.socket).unwrap();
    assert!(matches!(
        session.alloc(4096),
        Err(ism_pool::PoolError::InvalidSize(4096))
    ));
    let free_huge_pages = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("HugePages_Free:")
                .map(|v| v.trim().parse::<u64>().unwrap())
        })
        .unwrap_or(0);
    match session.alloc(2 << 20) {
        Ok(lease) => {
            assert!(free_huge_pages > 0);
            assert_eq!(lease.size, 2 << 20);
        }
        Err(ism_pool::PoolError::CreateMemory(e)) => {
            println!("no huge pages on this host ({free_huge_pages} free): {e}");
            assert!(
                free_huge_pages == 0,
                "allocation failed with {free_huge_pages} free: {e}"
            );
            // The failed allocation gave its bytes back.
            assert_eq!(query_status(&broker.socket).unwrap().used, 0);
        }
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

#[test]
fn test_one_process_cannot_take_every_connection() {
    // With one VM per process, a process is capped at --connections-per-vm.
    let broker = BrokerProcess::start(&["--size", "16M", "--vm-identity", "process"]);
    // --connections-per-vm defaults to 64.
    let limit = 64;
    let mut open: Vec<_> = (0..limit).map(|_| raw_connect(&broker.socket)).collect();
    let refused = seqpacket::connect(&broker.socket).unwrap();
    match raw_answer(&refused) {
        Some((_, Reply::Error(e))) => assert!(e.text.contains("Too many connections"), "{e:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(raw_answer(&refused).is_none());
    // Another process is still served.
    let mut other = ClientProcess::spawn(&broker.socket);
    assert!(parse_token(&other.cmd("alloc 4096")).is_some());
    // Closing one connection frees a slot.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let conn = seqpacket::connect(&broker.socket).unwrap();
        let hello = Request::Hello {
            min_version: 1,
            max_version: 1,
            role: Role::Device,
        };
        let sent = seqpacket::send(conn.as_fd(), &hello.encode(1), None);
        if sent.is_ok() && matches!(raw_answer(&conn), Some((1, Reply::HelloOk { .. }))) {
            break;
        }
        assert!(Instant::now() < deadline, "slot never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn test_revoke_subcommand_tells_every_holder() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let mut owner = ClientProcess::spawn(&broker.socket);
    let mut peer = ClientProcess::spawn(&broker.socket);
    let token = owner.alloc(4096);
    assert_eq!(owner.cmd(&format!("grant {token} default {RO}")), "ok");
    assert_eq!(peer.cmd(&format!("attach {token} 0")), "lease writable=0");
    assert!(owner.cmd("events 1").contains("PeerAttached"));
    let output = Command::new(env!("CARGO_BIN_EXE_ism-pool"))
        .args(["revoke", "--socket"])
        .arg(&broker.socket)
        .arg("--token")
        .arg(format!("{token:#x}"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let revoked = format!("events [Revoked {{ token: {:?} }}]", Token(token));
    assert_eq!(owner.cmd("events 1"), revoked);
    assert_eq!(peer.cmd("events 1"), revoked);
    assert!(
        owner
            .cmd(&format!("detach {token}"))
            .contains("NoSuchRegion")
    );
    let status = query_status(&broker.socket).unwrap();
    assert!(status.regions.is_empty());
    assert_eq!(status.used, 0);
}

#[test]
fn test_requests_fail_cleanly_when_the_broker_dies() {
    let mut broker = BrokerProcess::start(&["--size", "16M"]);
    let session = BrokerSession::connect(&broker.socket).unwrap();
    session.alloc(4096).unwrap();
    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    assert!(matches!(
        session.alloc(4096),
        Err(ism_pool::PoolError::Connection(_))
    ));
    assert!(matches!(
        BrokerSession::connect(&broker.socket),
        Err(ism_pool::PoolError::Connection(_))
    ));
}

#[test]
fn test_doorbell_published_in_one_process_rings_in_another() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let mut owner = ClientProcess::spawn(&broker.socket);
    let mut peer = ClientProcess::spawn(&broker.socket);
    let mut outsider = ClientProcess::spawn(&broker.socket);
    let owner_devid = owner.devid();
    let peer_devid = peer.devid();
    let token = owner.alloc(1 << 20);
    assert_eq!(owner.cmd(&format!("grant {token} default {RW}")), "ok");
    assert_eq!(peer.cmd(&format!("attach {token} 0")), "lease writable=1");
    assert_eq!(peer.cmd("events 0"), "events []", "nothing published yet");
    assert_eq!(owner.cmd(&format!("publish {token}")), "ok");
    assert_eq!(
        peer.cmd("events 1"),
        format!("events [DoorbellsChanged {{ token: {:?} }}]", Token(token))
    );
    // The peer gets the owner's doorbell and writing it wakes the owner's eventfd.
    assert_eq!(
        peer.cmd(&format!("ring {token}")),
        format!("rang [{owner_devid}]")
    );
    assert_eq!(owner.cmd(&format!("fired {token}")), "fired 1");
    // Nobody is handed their own doorbell, and a process that does not hold the region
    // gets none (nor may it publish one).
    assert_eq!(owner.cmd(&format!("doorbells {token}")), "doorbells []");
    assert!(
        outsider
            .cmd(&format!("doorbells {token}"))
            .starts_with("err NotHeld")
    );
    assert!(
        outsider
            .cmd(&format!("publish {token}"))
            .starts_with("err NotHeld")
    );
    // Both sides published: each sees exactly the other.
    assert_eq!(peer.cmd(&format!("publish {token}")), "ok");
    assert_eq!(
        owner.cmd(&format!("doorbells {token}")),
        format!("doorbells [{peer_devid}]")
    );
    let status = query_status(&broker.socket).unwrap();
    let mut published = status.regions[0].doorbells.clone();
    published.sort();
    assert_eq!(published, vec![owner_devid, peer_devid]);
    // Withdrawn: the peer is told and gets nothing any more.
    peer.cmd("events 1");
    assert_eq!(owner.cmd(&format!("withdraw {token}")), "ok");
    assert_eq!(
        peer.cmd("events 1"),
        format!("events [DoorbellsChanged {{ token: {:?} }}]", Token(token))
    );
    assert_eq!(peer.cmd(&format!("doorbells {token}")), "doorbells []");
}

#[test]
fn test_killed_publisher_doorbell_is_withdrawn() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let mut owner = ClientProcess::spawn(&broker.socket);
    let mut peer = ClientProcess::spawn(&broker.socket);
    let owner_devid = owner.devid();
    let token = owner.alloc(1 << 20);
    assert_eq!(owner.cmd(&format!("grant {token} default {RW}")), "ok");
    assert_eq!(peer.cmd(&format!("attach {token} 0")), "lease writable=1");
    assert_eq!(owner.cmd(&format!("publish {token}")), "ok");
    assert_eq!(peer.cmd("events 1").matches("DoorbellsChanged").count(), 1);
    assert_eq!(
        peer.cmd(&format!("doorbells {token}")),
        format!("doorbells [{owner_devid}]")
    );

    owner.child.kill().unwrap();
    owner.child.wait().unwrap();

    assert_eq!(
        peer.cmd("events 2"),
        format!(
            "events [PeerDetached {{ token: {t:?}, peer: DevId({owner_devid}) }}, \
             DoorbellsChanged {{ token: {t:?} }}]",
            t = Token(token)
        )
    );
    assert_eq!(peer.cmd(&format!("doorbells {token}")), "doorbells []");
    assert!(
        query_status(&broker.socket).unwrap().regions[0]
            .doorbells
            .is_empty()
    );
}

#[test]
fn test_large_doorbell_sets_arrive_whole_over_several_replies() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let owner = BrokerSession::connect(&broker.socket).unwrap();
    assert_eq!(owner.version(), wire::MAX_VERSION);
    let token = owner.alloc(4096).unwrap().token;
    owner.grant(token, GrantTarget::Default, Perms(RO)).unwrap();
    let count = 2 * wire::MAX_DOORBELLS_PER_REPLY + 3;
    let mut peers = Vec::new();
    for _ in 0..count {
        let peer = BrokerSession::connect(&broker.socket).unwrap();
        let _lease = peer.attach(token, Perms::NONE).unwrap();
        let doorbell = new_eventfd();
        peer.publish_doorbell(token, doorbell.as_fd()).unwrap();
        peers.push((peer, doorbell));
    }
    let list = owner.peer_doorbells(token).unwrap();
    let mut got: Vec<u64> = list.iter().map(|(devid, _)| devid.0).collect();
    let mut want: Vec<u64> = peers.iter().map(|(p, _)| p.info().devid.0).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    // Each descriptor is the doorbell of the devid it came with.
    for (devid, fd) in &list {
        rustix::io::write(fd, &1u64.to_ne_bytes()).unwrap();
        let (_, own) = peers
            .iter()
            .find(|(p, _)| p.info().devid == *devid)
            .unwrap();
        assert!(wait_readable(own, Duration::from_secs(5)));
        let mut value = [0u8; 8];
        rustix::io::read(own, &mut value).unwrap();
    }
    // A pipe is not a doorbell.
    let (read_end, _write_end) = rustix::pipe::pipe().unwrap();
    assert!(matches!(
        owner.publish_doorbell(token, read_end.as_fd()),
        Err(ism_pool::PoolError::NotAnEventfd { .. })
    ));
}

/// What came back on a raw connection within a time limit.
#[derive(Debug)]
enum Received {
    Reply(Reply),
    /// The broker closed the connection.
    Closed,
    /// Nothing arrived in time.
    Silent,
}

fn receive_within(conn: &OwnedFd, timeout: Duration) -> Received {
    match seqpacket::wait_readable(conn.as_fd(), None, Some(timeout)) {
        Ok((true, _)) => {}
        _ => return Received::Silent,
    }
    match seqpacket::recv(conn.as_fd()) {
        Ok(Some(packet)) => Received::Reply(wire::decode_reply(&packet.bytes).unwrap().1),
        _ => Received::Closed,
    }
}

/// Connects and says hello as `role`; the connection and the broker's answer.
fn raw_hello(socket: &Path, role: Role) -> Result<(OwnedFd, Received), String> {
    let conn = seqpacket::connect(socket).map_err(|e| format!("connect: {e}"))?;
    let hello = Request::Hello {
        min_version: 1,
        max_version: wire::MAX_VERSION,
        role,
    };
    // A refused connection may be closed before the hello goes out; the reason is still
    // there to read.
    let sent = seqpacket::send(conn.as_fd(), &hello.encode(1), None);
    let answer = receive_within(&conn, Duration::from_secs(5));
    if let (Err(e), Received::Closed | Received::Silent) = (sent, &answer) {
        return Err(format!("send: {e}"));
    }
    Ok((conn, answer))
}

/// Raw child commands:
/// - `open N device|observer`: opens up to N connections that said hello, keeps them, and
///   answers `opened K refused TEXT` (TEXT: why the next one was refused);
/// - `observe`: an observer asks for STATUS; answers `answer error|status then
///   closed|open` (whether the broker closed the connection afterwards).
fn run_raw_command(socket: &Path, open: &mut Vec<OwnedFd>, words: &[&str]) -> String {
    match words.first().copied().unwrap_or("") {
        "open" => {
            let count: usize = words.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            let role = if words.get(2) == Some(&"observer") {
                Role::Observer
            } else {
                Role::Device
            };
            let mut opened = 0;
            let mut refusal = "none".to_string();
            for _ in 0..count {
                match raw_hello(socket, role) {
                    Ok((conn, Received::Reply(Reply::HelloOk { .. }))) => {
                        open.push(conn);
                        opened += 1;
                    }
                    Ok((_, Received::Reply(Reply::Error(e)))) => {
                        refusal = e.text;
                        break;
                    }
                    Ok((_, other)) => {
                        refusal = format!("{other:?}");
                        break;
                    }
                    Err(e) => {
                        refusal = e;
                        break;
                    }
                }
            }
            format!("opened {opened} refused {refusal}")
        }
        "observe" => {
            let conn = match raw_hello(socket, Role::Observer) {
                Ok((conn, Received::Reply(Reply::HelloOk { .. }))) => conn,
                Ok((_, other)) => return format!("hello {other:?}"),
                Err(e) => return e,
            };
            seqpacket::send(conn.as_fd(), &Request::Status.encode(2), None).unwrap();
            let answer = match receive_within(&conn, Duration::from_secs(5)) {
                Received::Reply(Reply::Error(_)) => "error",
                Received::Reply(Reply::StatusChunk { .. }) => "status",
                _ => "nothing",
            };
            let after = match receive_within(&conn, Duration::from_secs(3)) {
                Received::Closed => "closed",
                _ => "open",
            };
            format!("answer {answer} then {after}")
        }
        other => format!("err unknown command {other:?}"),
    }
}

fn skip_unless_root(what: &str) -> bool {
    if rustix::process::geteuid().is_root() {
        return false;
    }
    println!("SKIPPED: not root, cannot {what}");
    true
}

const NOBODY: u32 = 65534;

// Finding 2: one guest exhausted the broker's descriptors.

/// With the default soft limit of 1024 one guest holding ~1014 regions made every other
/// VM's ALLOC fail. Now the broker raises its soft limit and one VM stops at its region
/// quota, so another VM still allocates.
#[test]
fn test_one_guest_cannot_exhaust_the_broker_descriptors() {
    if skip_unless_root("run a second VM under another uid") {
        return;
    }
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    if hard.is_some_and(|hard| hard < 4096) {
        println!("SKIPPED: hard RLIMIT_NOFILE {hard:?} is below 4096");
        return;
    }
    let broker = BrokerProcess::start_logged(&["--size", "64M"], "ulimit -Sn 1024");
    let exe = broker.open_to_other_uids();
    set_mode(&broker.socket, 0o777);
    let mut greedy = ClientProcess::spawn(&broker.socket);
    let mut other = ClientProcess::spawn_with(&broker.socket, &exe, Some(NOBODY));
    assert_eq!(
        greedy.cmd("allocmany 1100 4096"),
        "allocated 1024 err RegionQuotaExceeded { limit: 1024 }"
    );
    assert!(parse_token(&other.cmd("alloc 4096")).is_some());
    let status = broker.status_json();
    assert_eq!(status["per_vm_regions"], 1024);
    let regions: Vec<u64> = status["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["vm_regions"].as_u64().unwrap())
        .collect();
    assert!(regions.contains(&1024) && regions.contains(&1), "{status}");
    assert!(
        broker.log().contains("raised from 1024"),
        "{}",
        broker.log()
    );
}

/// When the descriptors do run out, the guest is told so (not "out of memory"), and the
/// broker warned at start that its hard limit was too low.
#[test]
fn test_descriptor_shortage_is_reported_as_such() {
    let broker =
        BrokerProcess::start_logged(&["--size", "16M"], "ulimit -Sn 128 && ulimit -Hn 128");
    let mut guest = ClientProcess::spawn(&broker.socket);
    let answer = guest.cmd("allocmany 200 4096");
    assert!(
        answer.contains("err DescriptorLimit") && answer.contains("Host descriptor limit"),
        "{answer}"
    );
    let log = broker.log();
    assert!(log.contains("hard descriptor limit 128 is below"), "{log}");
}

// Finding 3: any process could take every connection slot.

#[test]
fn test_untrusted_observer_gets_one_answer_then_is_closed() {
    if skip_unless_root("run an observer under another uid") {
        return;
    }
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let exe = broker.open_to_other_uids();
    set_mode(&broker.socket, 0o777);
    let mut stranger = ClientProcess::spawn_raw(&broker.socket, &exe, Some(NOBODY));
    assert_eq!(stranger.cmd("observe"), "answer error then closed");
    // A trusted observer keeps its connection for further requests.
    let mut operator =
        ClientProcess::spawn_raw(&broker.socket, &std::env::current_exe().unwrap(), None);
    assert_eq!(operator.cmd("observe"), "answer status then open");
}

#[test]
fn test_idle_observer_is_disconnected() {
    let broker = BrokerProcess::start(&["--size", "16M", "--observer-timeout", "1"]);
    let (conn, answer) = raw_hello(&broker.socket, Role::Observer).unwrap();
    assert!(
        matches!(answer, Received::Reply(Reply::HelloOk { .. })),
        "{answer:?}"
    );
    let started = Instant::now();
    assert!(matches!(
        receive_within(&conn, Duration::from_secs(5)),
        Received::Closed
    ));
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// 17 processes of one uid with 64 connections each filled all 1024 slots; now one uid
/// that is not a VMM uid gets a few, and a VMM is still served.
#[test]
fn test_processes_of_one_uid_cannot_take_every_slot() {
    if skip_unless_root("run clients under another uid") {
        return;
    }
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let exe = broker.open_to_other_uids();
    set_mode(&broker.socket, 0o777);
    let mut forks: Vec<_> = (0..17)
        .map(|_| ClientProcess::spawn_raw(&broker.socket, &exe, Some(NOBODY)))
        .collect();
    let mut opened = 0;
    for fork in &mut forks {
        let answer = fork.cmd("open 64 device");
        opened += answer
            .strip_prefix("opened ")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap();
    }
    // --connections-per-uid defaults to 16.
    assert_eq!(opened, 16);
    let mut vmm = ClientProcess::spawn(&broker.socket);
    assert!(parse_token(&vmm.cmd("alloc 4096")).is_some());
}

#[test]
fn test_reserved_slots_are_kept_for_vmm_uids() {
    if skip_unless_root("run clients under other uids") {
        return;
    }
    let broker = BrokerProcess::start(&[
        "--size",
        "16M",
        "--max-connections",
        "16",
        "--reserved-connections",
        "6",
        "--connections-per-uid",
        "4",
        "--vmm-uid",
        "60001",
    ]);
    let exe = broker.open_to_other_uids();
    set_mode(&broker.socket, 0o777);
    let open = |uid: u32, count: usize| {
        let mut client = ClientProcess::spawn_raw(&broker.socket, &exe, Some(uid));
        let answer = client.cmd(&format!("open {count} device"));
        (client, answer)
    };
    let (_a, answer) = open(60010, 8);
    assert_eq!(
        answer,
        "opened 4 refused Too many connections from uid 60010"
    );
    let (_b, answer) = open(60011, 4);
    assert_eq!(answer, "opened 4 refused none");
    let (_c, answer) = open(60012, 4);
    assert_eq!(
        answer,
        "opened 2 refused Too many connections: the remaining slots are reserved for VMMs"
    );
    // The VMM uid is not bound by the per-uid cap and gets the reserved slots.
    let (_vmm, answer) = open(60001, 8);
    assert_eq!(answer, "opened 6 refused Too many connections");
}

// Finding 4: the per-VM quota was per process.

/// Processes of one VM (same uid and cgroup, like a VMM and its forked children) share
/// one quota.
#[test]
fn test_forked_processes_share_their_vm_quota() {
    let broker = BrokerProcess::start(&["--size", "16M", "--per-vm-limit", "1M"]);
    let mut parent = ClientProcess::spawn(&broker.socket);
    let mut child = ClientProcess::spawn(&broker.socket);
    parent.alloc(1 << 20);
    assert_eq!(
        child.cmd("alloc 4096"),
        format!(
            "err QuotaExceeded {{ limit: {}, used: {}, requested: 4096 }}",
            1 << 20,
            1 << 20
        )
    );
}

#[test]
fn test_one_vm_cannot_take_the_whole_pool_by_default() {
    let broker = BrokerProcess::start(&["--size", "1M"]);
    let mut vm = ClientProcess::spawn(&broker.socket);
    assert_eq!(
        vm.cmd(&format!("alloc {}", 1 << 20)),
        format!(
            "err QuotaExceeded {{ limit: {}, used: 0, requested: {} }}",
            512 << 10,
            1 << 20
        )
    );
    vm.alloc(512 << 10);
}

// Finding 6: read-only leases hold only with a uid split.

/// A VMM under its own uid reaches a socket of mode 0660 through --socket-group, and its
/// read-only lease cannot be reopened read-write; a root holder can do exactly that, which
/// is why the broker warns about such sessions, reports them, and can refuse them.
#[test]
fn test_read_only_leases_are_enforced_only_with_a_uid_split() {
    if skip_unless_root("run a client under another uid") {
        return;
    }
    let broker = BrokerProcess::start_logged(
        &["--size", "16M", "--socket-group", &NOBODY.to_string()],
        "true",
    );
    let exe = broker.open_to_other_uids();
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&broker.socket).unwrap();
        assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, NOBODY));
    }
    let mut owner = ClientProcess::spawn(&broker.socket);
    let mut unprivileged = ClientProcess::spawn_with(&broker.socket, &exe, Some(NOBODY));
    let mut root_reader = ClientProcess::spawn(&broker.socket);
    let token = owner.alloc(4096);
    assert_eq!(owner.cmd(&format!("grant {token} default {RO}")), "ok");
    let eacces = rustix::io::Errno::ACCESS.raw_os_error();
    for reader in [&mut unprivileged, &mut root_reader] {
        assert_eq!(reader.cmd(&format!("attach {token} 0")), "lease writable=0");
    }
    let answer = unprivileged.cmd(&format!("escalate {token}"));
    assert!(answer.contains(&format!("reopen={eacces}")), "{answer}");
    let answer = root_reader.cmd(&format!("escalate {token}"));
    assert!(answer.contains("reopen=ok"), "{answer}");
    assert!(broker.log().contains("ADVISORY"), "{}", broker.log());
    let status = broker.status_json();
    let enforced = |devid: u64| {
        status["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["devid"] == devid)
            .map(|s| s["read_only_enforced"].clone())
            .unwrap()
    };
    assert_eq!(enforced(unprivileged.devid()), true);
    assert_eq!(enforced(root_reader.devid()), false);

    let strict = BrokerProcess::start(&[
        "--size",
        "16M",
        "--socket-group",
        &NOBODY.to_string(),
        "--require-uid-split",
    ]);
    let exe = strict.open_to_other_uids();
    match BrokerSession::connect(&strict.socket) {
        Err(e) => assert!(e.to_string().contains("--require-uid-split"), "{e}"),
        Ok(_) => panic!("a root device session was accepted"),
    }
    let mut vmm = ClientProcess::spawn_with(&strict.socket, &exe, Some(NOBODY));
    assert!(parse_token(&vmm.cmd("alloc 4096")).is_some());
}

// Finding 7: grants to devids not issued yet were inherited.

#[test]
fn test_grant_to_a_devid_not_yet_issued_is_refused() {
    let broker = BrokerProcess::start(&["--size", "16M"]);
    let mut owner = ClientProcess::spawn(&broker.socket);
    let token = owner.alloc(4096);
    let next = owner.devid() + 1;
    let answer = owner.cmd(&format!("grant {token} {next} {RW}"));
    assert_eq!(answer, format!("err UnknownDevice(DevId({next}))"));
    let mut newcomer = ClientProcess::spawn(&broker.socket);
    assert_eq!(newcomer.devid(), next);
    assert!(
        newcomer
            .cmd(&format!("attach {token} 0"))
            .contains("missing: Attach")
    );
}
