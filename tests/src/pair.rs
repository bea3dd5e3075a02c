// SPDX-License-Identifier: Apache-2.0
//! Guests that talk to each other through virtio-ism: an `ism-pool` broker process and test
//! guests in `ism.test=ism` mode, each in its own VMM process (ism-vmm or cloud-hypervisor,
//! [`IsmSpec::vmm`]), driven by commands written to their serial input: ism-vmm's stdin, or
//! cloud-hypervisor's serial pty (it reads stdin only from a terminal).
//!
//! Every process runs in its own process group and is killed (SIGKILL to the group) when its
//! handle is dropped, so a failing or panicking test leaves nothing behind. Every wait is
//! bounded by the handle's deadline.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::report::{GuestReport, PREFIX};
use crate::uid::{KvmNode, command_as};
use crate::vm::{pool_binary, test_guest};
use crate::vmm_kind::Vmm;

/// Hard limit for one paired-guest VM (the whole test shares the deadline of its VMs).
pub const PAIR_TIMEOUT: Duration = Duration::from_secs(120);

/// A broker with a 1 GiB pool and guests "A" and "B" on `vmm` with the default device: where
/// most paired tests start.
pub fn broker_and_two_guests(vmm: Vmm) -> (PoolBroker, IsmGuest, IsmGuest) {
    let broker = PoolBroker::start("1G");
    let spec = IsmSpec::on(vmm);
    let a = IsmGuest::start("A", &broker, &spec, &[]);
    let b = IsmGuest::start("B", &broker, &spec, &[]);
    (broker, a, b)
}

/// A child process in its own group, killed with its group on drop.
struct Group {
    child: Child,
    reaped: bool,
}

impl Group {
    fn spawn(command: &mut Command) -> std::io::Result<Self> {
        let child = command.process_group(0).spawn()?;
        Ok(Self {
            child,
            reaped: false,
        })
    }

    fn kill(&mut self) {
        if !self.reaped {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) on the process group this child leads; it is not reaped yet, so
            // the id is still ours.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A private directory under the system temp dir, removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// A new directory named after `tag`, this process and a counter.
    pub fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ism-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("Cannot create {}: {e}", dir.display()));
        Self(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `ism-pool` broker on a socket in its own scratch directory (its state file
/// next to the socket).
pub struct PoolBroker {
    group: Group,
    socket: PathBuf,
    log: Arc<Mutex<String>>,
    /// Everything after `--socket <path>`, for a restart.
    args: Vec<String>,
    _dir: ScratchDir,
}

impl PoolBroker {
    /// Start a broker with a pool of `size` (e.g. "1G") and wait until its socket exists.
    /// Every VMM of a test stands for a VM of its own, as it would in a cgroup of its own on
    /// a host, so the pool counts quotas per process here (`--vm-identity process`).
    pub fn start(size: &str) -> Self {
        Self::start_with_args(size, &["--vm-identity", "process"])
    }

    /// As [`PoolBroker::start`], with `extra` broker options instead of the test default.
    pub fn start_with_args(size: &str, extra: &[&str]) -> Self {
        let dir = ScratchDir::new("pool");
        let socket = dir.path().join("pool.sock");
        let mut args = vec!["--size".to_string(), size.to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let log = Arc::new(Mutex::new(String::new()));
        let group = Self::spawn(&socket, &args, &log);
        let mut broker = Self {
            group,
            socket,
            log,
            args,
            _dir: dir,
        };
        broker.wait_listening(|b| b.socket.exists());
        broker
    }

    fn spawn(socket: &Path, args: &[String], log: &Arc<Mutex<String>>) -> Group {
        let binary = pool_binary();
        let mut group = Group::spawn(
            Command::new(&binary)
                .arg("--socket")
                .arg(socket)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        )
        .unwrap_or_else(|e| panic!("Failed to start {}: {e}", binary.display()));
        let stderr = group.child.stderr.take().expect("piped");
        collect(stderr, log.clone());
        group
    }

    /// Waits (10 s at most) until `ready` says the broker serves, failing if it exits.
    fn wait_listening(&mut self, ready: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready(self) {
            if let Ok(Some(status)) = self.group.child.try_wait() {
                self.group.reaped = true;
                panic!("ism-pool exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "ism-pool did not serve {} within 10 s",
                self.socket.display()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL the broker (as a crash or an OOM kill would) and reap it. Its socket file
    /// and state file stay.
    pub fn kill(&mut self) {
        self.group.kill();
    }

    /// Send `signal` (e.g. `libc::SIGSTOP`, `libc::SIGCONT`) to the broker process.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.group.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own child, which is not reaped (the group is killed and
        // reaped only on drop or by `kill`).
        let done = unsafe { libc::kill(pid, signal) };
        assert_eq!(done, 0, "kill({pid}, {signal})");
    }

    /// Start the broker again on the same socket and state file with the same options,
    /// and wait until it answers.
    pub fn restart(&mut self) {
        assert!(self.group.reaped, "restart a broker that was killed");
        self.group = Self::spawn(&self.socket, &self.args, &self.log);
        self.wait_listening(|b| b.try_status().is_some());
    }

    /// The broker's socket path (what `--ism ...,pool=` takes).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// `ism-pool status --json`, parsed; None if it fails (the broker is not serving).
    pub fn try_status(&self) -> Option<serde_json::Value> {
        let output = Command::new(pool_binary())
            .arg("status")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    /// `ism-pool status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let output = Command::new(pool_binary())
            .arg("status")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .stdin(Stdio::null())
            .output()
            .expect("run ism-pool status");
        assert!(
            output.status.success(),
            "ism-pool status failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "ism-pool status --json printed no JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.group.child.id()
    }

    /// Whether the broker process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.group.child.try_wait(), Ok(None))
    }
}

/// Append everything `source` produces to `sink`, from a thread, until EOF.
fn collect(mut source: impl Read + Send + 'static, sink: Arc<Mutex<String>>) {
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match source.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
    });
}

/// The serial console of a guest as it arrives, and whether the VMM closed it.
#[derive(Default)]
struct Console {
    text: String,
    closed: bool,
}

/// One answer of the guest: the `key=value` pairs of one report line.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The raw line (without the prefix).
    pub line: String,
    report: GuestReport,
}

impl Answer {
    fn parse(line: &str) -> Self {
        Self {
            line: line.to_string(),
            report: GuestReport::parse(&format!("{PREFIX}{line}\n")),
        }
    }

    /// Value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.report.get(key)
    }

    /// Value of `key` as a number.
    pub fn number(&self, key: &str) -> Option<u64> {
        self.report.number(key)
    }

    /// `status=`.
    pub fn status(&self) -> &str {
        self.get("status").unwrap_or("")
    }

    /// Panic with `context` unless `status=ok`.
    pub fn ok(self, context: &str) -> Self {
        assert_eq!(self.status(), "ok", "{context}: {}", self.line);
        self
    }
}

/// Options of one guest's virtio-ism device (`--ism id=..,size=..,chunk_size=..,pool=..`)
/// and the VMM it runs under.
#[derive(Clone, Debug)]
pub struct IsmSpec {
    /// Window size, e.g. "64M".
    pub size: String,
    /// Chunk size, e.g. "4K" or "2M".
    pub chunk_size: String,
    pub vmm: Vmm,
    /// Run the VMM as this user (see [`crate::uid`]); `None` runs it as the test's user.
    pub run_as: Option<u32>,
    /// The guest drives the device as a driver written only against the draft
    /// (`ism.draft=1`: no feature bits, no GRANT).
    pub draft: bool,
    /// `--ism draft_default_perm=` (none, ro or rw); `None` leaves the VMM's default.
    pub draft_default_perm: Option<String>,
}

impl Default for IsmSpec {
    fn default() -> Self {
        Self {
            size: "64M".into(),
            chunk_size: "4K".into(),
            vmm: Vmm::IsmVmm,
            run_as: None,
            draft: false,
            draft_default_perm: None,
        }
    }
}

impl IsmSpec {
    /// The default device under `vmm`.
    pub fn on(vmm: Vmm) -> Self {
        Self {
            vmm,
            ..Self::default()
        }
    }
}

/// A test guest in `ism.test=ism` mode under its own ism-vmm, driven over its serial input.
pub struct IsmGuest {
    name: String,
    group: Group,
    /// The serial input: ism-vmm's stdin or cloud-hypervisor's serial pty.
    input: Option<Box<dyn Write + Send>>,
    /// Holds cloud-hypervisor's API socket when the test gave none.
    _dir: Option<ScratchDir>,
    /// The VMM's `/dev/kvm` when it runs as another user.
    _kvm_node: Option<KvmNode>,
    console: Arc<(Mutex<Console>, Condvar)>,
    stderr: Arc<Mutex<String>>,
    deadline: Instant,
    seq: u64,
    /// Where in the console text the next answer search starts.
    cursor: usize,
    /// The `ism=ready` line.
    pub ready: Answer,
}

impl IsmGuest {
    /// Boot a guest named `name` whose device uses `broker`, run `script` (commands separated
    /// by `;`, words by `,`, run before serial input is read) and wait for `ism=ready`.
    pub fn start(name: &str, broker: &PoolBroker, spec: &IsmSpec, script: &[&str]) -> Self {
        Self::start_with_args(name, broker, spec, script, &[])
    }

    /// As [`IsmGuest::start`], with `extra` arguments for ism-vmm (e.g. `--api-socket`).
    pub fn start_with_args(
        name: &str,
        broker: &PoolBroker,
        spec: &IsmSpec,
        script: &[&str],
        extra: &[&str],
    ) -> Self {
        let vmm = spec.vmm.binary();
        let mut cmdline = "ism.test=ism".to_string();
        if spec.draft {
            cmdline.push_str(" ism.draft=1");
        }
        if !script.is_empty() {
            cmdline.push_str(" ism.script=");
            cmdline.push_str(&script.join(";").replace(' ', ","));
        }
        let mut ism = format!(
            "id=ism0,size={},chunk_size={},pool={}",
            spec.size,
            spec.chunk_size,
            broker.socket().display()
        );
        if let Some(policy) = &spec.draft_default_perm {
            ism.push_str(",draft_default_perm=");
            ism.push_str(policy);
        }
        let mut args = spec.vmm.boot_args(&test_guest(), &cmdline);
        // cloud-hypervisor: the serial console on a pty (its serial socket drops what the
        // guest writes before a client connects), found through the API socket.
        let serial_dir = match spec.vmm {
            Vmm::IsmVmm => None,
            Vmm::CloudHypervisor => {
                if let Some(at) = args.iter().position(|a| a == "--serial") {
                    args[at + 1] = "pty".into();
                }
                let given = extra.iter().position(|a| *a == "--api-socket");
                let dir = ScratchDir::new("serial");
                if let Some(uid) = spec.run_as {
                    // The VMM makes its API socket here.
                    std::os::unix::fs::chown(dir.path(), Some(uid), Some(uid))
                        .expect("chown the serial dir");
                }
                let api = match given.and_then(|at| extra.get(at + 1)) {
                    Some(path) => PathBuf::from(path),
                    None => {
                        let path = dir.path().join("api.sock");
                        args.extend(["--api-socket".into(), path.display().to_string()]);
                        path
                    }
                };
                Some((dir, api))
            }
        };
        let kvm_node = spec.run_as.map(KvmNode::for_uid);
        let mut command = match (spec.run_as, &kvm_node) {
            (Some(uid), Some(node)) => command_as(uid, node, &vmm),
            _ => Command::new(&vmm),
        };
        command.args(&args);
        let mut group = Group::spawn(
            command
                .args(["--ism", &ism])
                .args(extra)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .unwrap_or_else(|e| panic!("Failed to start {}: {e}", vmm.display()));
        let console = Arc::new((Mutex::new(Console::default()), Condvar::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        collect(group.child.stderr.take().expect("piped"), stderr.clone());
        let stdout = group.child.stdout.take().expect("piped");
        let (input, dir): (Option<Box<dyn Write + Send>>, _) = match serial_dir {
            None => {
                let feed = console.clone();
                thread::spawn(move || read_console(stdout, &feed));
                let stdin = group.child.stdin.take().expect("piped");
                (Some(Box::new(stdin)), None)
            }
            Some((dir, api)) => {
                // Its stdout carries nothing of the guest's; keep it with the log.
                collect(stdout, stderr.clone());
                let pty = open_serial_pty(&mut group, &api, &stderr);
                let reader = pty.try_clone().expect("clone the serial pty");
                let feed = console.clone();
                thread::spawn(move || read_console(reader, &feed));
                (Some(Box::new(pty)), Some(dir))
            }
        };
        let mut guest = Self {
            name: name.to_string(),
            group,
            input,
            _dir: dir,
            _kvm_node: kvm_node,
            console,
            stderr,
            deadline: Instant::now() + PAIR_TIMEOUT,
            seq: 0,
            cursor: 0,
            ready: Answer::parse(""),
        };
        guest.ready = guest.wait_line(|a| a.get("ism") == Some("ready"), "ism=ready");
        guest.seq = script.iter().filter(|c| !c.trim().is_empty()).count() as u64;
        guest
    }

    /// This guest's name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Give this guest `from_now` more time: every later wait ends at the new deadline.
    pub fn set_timeout(&mut self, from_now: Duration) {
        self.deadline = Instant::now() + from_now;
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.group.child.id()
    }

    /// The device id the guest's device reported.
    pub fn devid(&self) -> u64 {
        self.ready.number("devid").expect("ism=ready has devid")
    }

    /// The answer to the `seq`-th command (counting the script's commands first).
    pub fn answer(&mut self, seq: u64) -> Answer {
        let want = seq.to_string();
        self.wait_line(
            |a| a.get("seq") == Some(want.as_str()),
            &format!("seq={seq}"),
        )
    }

    /// Send one command line and wait for its answer.
    pub fn cmd(&mut self, command: &str) -> Answer {
        self.send(command);
        self.answer(self.seq)
    }

    /// Allocates a region of `size` ("64K"); returns its token. Panics with the guest's
    /// answer if refused.
    pub fn alloc(&mut self, size: &str) -> String {
        let what = format!("{} alloc {size}", self.name);
        let answer = self.cmd(&format!("alloc {size}")).ok(&what);
        answer.get("token").expect("token").to_string()
    }

    /// Allocates a region of `size`, fills it with `seed` and grants `perms` ("rwa") to `peer`
    /// (a devid or "default"); returns its token.
    pub fn shared_region(
        &mut self,
        size: &str,
        seed: impl std::fmt::Display,
        peer: impl std::fmt::Display,
        perms: &str,
    ) -> String {
        let token = self.alloc(size);
        let name = self.name.clone();
        self.cmd(&format!("fill {token} {seed}"))
            .ok(&format!("{name} fill"));
        self.cmd(&format!("grant {token} {peer} {perms}"))
            .ok(&format!("{name} grant"));
        token
    }

    /// Send one command line without waiting; returns its sequence number.
    pub fn send(&mut self, command: &str) -> u64 {
        let input = self.input.as_mut().expect("serial input open");
        if let Err(e) = input
            .write_all(command.as_bytes())
            .and_then(|()| input.write_all(b"\n"))
            .and_then(|()| input.flush())
        {
            panic!(
                "{}: writing {command:?} to serial input failed: {e}\n{}",
                self.name,
                self.describe()
            );
        }
        self.seq += 1;
        self.seq
    }

    /// `poweroff`, then wait for the VMM to exit; returns its exit code.
    pub fn power_off(mut self) -> Option<i32> {
        self.send("poweroff");
        self.wait_exit()
    }

    /// Wait for the VMM to exit by itself (bounded by the deadline); its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        while Instant::now() < self.deadline {
            match self.group.child.try_wait() {
                Ok(Some(status)) => {
                    self.group.reaped = true;
                    return status.code();
                }
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        panic!(
            "{}: VMM did not exit in time\n{}",
            self.name,
            self.describe()
        );
    }

    /// SIGKILL the VMM (its whole process group), as a crash would.
    pub fn kill(&mut self) {
        self.group.kill();
    }

    /// Console and VMM log, for failure messages.
    pub fn describe(&self) -> String {
        let console = self.console.0.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "--- {} serial ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            console.text,
            self.name,
            self.stderr.lock().unwrap_or_else(|e| e.into_inner())
        )
    }

    /// Wait for the first report line after the cursor that `matches`; panic (the drop kills
    /// the VMM) at the deadline or when the console closes first.
    fn wait_line(&mut self, matches: impl Fn(&Answer) -> bool, what: &str) -> Answer {
        let (lock, ready) = &*self.console;
        let mut console = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            while let Some(end) = console.text[self.cursor..].find('\n') {
                let line = console.text[self.cursor..self.cursor + end].trim_end_matches('\r');
                self.cursor += end + 1;
                let Some(at) = line.find(PREFIX) else {
                    continue;
                };
                let answer = Answer::parse(&line[at + PREFIX.len()..]);
                if answer.get("panic").is_some() || answer.get("fault").is_some() {
                    drop(console);
                    panic!(
                        "{}: guest failed: {}\n{}",
                        self.name,
                        answer.line,
                        self.describe()
                    );
                }
                if matches(&answer) {
                    return answer;
                }
            }
            let now = Instant::now();
            if console.closed || now >= self.deadline {
                let why = if console.closed {
                    "console closed"
                } else {
                    "timed out"
                };
                drop(console);
                panic!(
                    "{}: {why} waiting for {what}\n{}",
                    self.name,
                    self.describe()
                );
            }
            console = ready
                .wait_timeout(console, self.deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// cloud-hypervisor's serial pty, once its API reports the path (bounded; panics with the
/// VMM's log if it exits first). cloud-hypervisor keeps the pty raw, so nothing is echoed back.
fn open_serial_pty(group: &mut Group, api: &Path, log: &Mutex<String>) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let path = std::os::unix::net::UnixStream::connect(api)
            .ok()
            .map(|_| crate::api::request(api, "GET", "vm.info", None))
            .filter(|(status, _)| *status == 200)
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .and_then(|info| info["config"]["serial"]["file"].as_str().map(PathBuf::from));
        if let Some(path) = path {
            return std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY)
                .open(&path)
                .unwrap_or_else(|e| panic!("open the serial pty {}: {e}", path.display()));
        }
        if let Ok(Some(status)) = group.child.try_wait() {
            group.reaped = true;
            panic!(
                "VMM exited ({status}) before its serial pty came up:\n{}",
                log.lock().unwrap_or_else(|e| e.into_inner())
            );
        }
        assert!(
            Instant::now() < deadline,
            "no serial pty in vm.info within 20 s:\n{}",
            log.lock().unwrap_or_else(|e| e.into_inner())
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn read_console(mut stdout: impl Read, console: &(Mutex<Console>, Condvar)) {
    let mut buf = [0u8; 4096];
    loop {
        let n = stdout.read(&mut buf).unwrap_or(0);
        let mut state = console.0.lock().unwrap_or_else(|e| e.into_inner());
        if n == 0 {
            state.closed = true;
        } else {
            state.text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        console.1.notify_all();
        if n == 0 {
            return;
        }
    }
}
