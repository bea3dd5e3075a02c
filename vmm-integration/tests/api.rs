// SPDX-License-Identifier: Apache-2.0
//! The REST API, ism-remote and the event monitor against a running ism-vmm process.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use ism_vmm::test_guest::{halt_code, kvm_available_for, print_code, pvh_elf, write_temp};

const VMM: &str = env!("CARGO_BIN_EXE_ism-vmm");
const REMOTE: &str = env!("CARGO_BIN_EXE_ism-remote");

/// The freestanding test guest, which the `ism-tests` crate's build script builds into
/// `<target>/ism-test-guest`. Built on first use when this test runs before that crate was
/// compiled; a guest that still cannot be found fails the test rather than skipping it.
fn test_guest_elf() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(build_test_guest).clone()
}

/// `cargo build -p ism-tests` once per test process: its build script rebuilds the guest when
/// the guest's sources changed, so a stale guest from an earlier build is never used.
fn build_test_guest() -> PathBuf {
    // <target>/<profile>/deps/api-<hash> -> <target>
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test executable lives in <target>/<profile>/deps")
        .to_path_buf();
    let elf = target.join("ism-test-guest/x86_64-unknown-linux-gnu/release/ism-test-guest");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "ism-tests"])
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo to build the test guest");
    assert!(status.success(), "building the test guest failed: {status}");
    assert!(
        elf.is_file(),
        "test guest {} missing after building ism-tests",
        elf.display()
    );
    elf
}

/// One request on a fresh connection; (status, body).
fn request(socket: &Path, method: &str, endpoint: &str, body: &str) -> (u16, String) {
    let mut s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
    let body = raw
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    (status, body)
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

struct Vmm {
    child: Child,
    dir: vmm_sys_util::tempdir::TempDir,
    _kernel: Option<vmm_sys_util::tempfile::TempFile>,
}

impl Vmm {
    /// Boot a guest that prints "UP" and halts, with the API and the event monitor on, plus
    /// `extra` options.
    fn start(extra: &[&str]) -> Vmm {
        let mut code = print_code(b"UP\n");
        code.extend(halt_code());
        let kernel = write_temp(&pvh_elf(&code));
        let kernel_path = kernel.as_path().to_str().unwrap().to_owned();
        let mut args = vec!["--kernel", kernel_path.as_str()];
        args.extend(["--memory", "size=32M", "--rng", "src=/dev/urandom"]);
        args.extend(extra);
        let vmm = Vmm::spawn(&args, Some(kernel));
        vmm.wait_for(|| vmm.socket().exists() && vmm.serial().contains("UP"));
        vmm
    }

    /// Spawn ism-vmm with `args` plus its serial console, API socket and event monitor in a
    /// fresh temporary directory; `kernel` is kept alive as long as the VMM.
    fn spawn(args: &[&str], kernel: Option<vmm_sys_util::tempfile::TempFile>) -> Vmm {
        Vmm::spawn_with(Command::new(VMM), args, kernel)
    }

    /// [`Vmm::spawn`] from a prepared `command` (e.g. with resource limits).
    fn spawn_with(
        mut command: Command,
        args: &[&str],
        kernel: Option<vmm_sys_util::tempfile::TempFile>,
    ) -> Vmm {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ism-api-test").unwrap();
        let d = dir.as_path();
        let child = command
            .args(args)
            .arg("--serial")
            .arg(format!("file={}", d.join("serial").display()))
            .arg("--api-socket")
            .arg(d.join("api.sock"))
            .arg("--event-monitor")
            .arg(format!("path={}", d.join("events").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ism-vmm");
        Vmm {
            child,
            dir,
            _kernel: kernel,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.as_path().join("api.sock")
    }

    fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.as_path().join("serial")).unwrap_or_default()
    }

    fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.as_path().join("events")).unwrap();
        serde_json::Deserializer::from_str(&text)
            .into_iter::<serde_json::Value>()
            .map(Result::unwrap)
            .collect()
    }

    fn wait_for(&self, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            assert!(Instant::now() < deadline, "the VMM did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait for the process to end; (status code, stderr).
    fn wait(mut self) -> (i32, String, Vmm) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the VMM did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status.code().unwrap_or(-1), err, self)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn test_api_queries_bad_requests_and_shutdown_with_events() {
    api_session(&["--seccomp", "false"]);
}

/// The same session under the default `--seccomp` (true): every thread under its filter,
/// kill on a miss.
#[test]
fn test_api_session_under_seccomp() {
    api_session(&[]);
}

/// (name, seccomp mode) of every thread of process `pid`.
fn thread_modes(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        // A thread that ended since the listing has no files left.
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue;
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_owned();
        threads.push((comm.trim().to_owned(), mode));
    }
    threads
}

fn api_session(extra: &[&str]) {
    if !kvm_or_skip("api_session") {
        return;
    }
    let vmm = Vmm::start(extra);
    let sock = vmm.socket();

    let (status, body) = request(&sock, "GET", "vmm.ping", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["pid"], vmm.child.id());

    // Every thread runs under a filter (mode 2) or none (0). A thread names itself and
    // applies its filter when it starts, which may be after the first answer on a loaded
    // host: look again (for at most 10 s) until every expected thread is up.
    let want_mode = if extra.contains(&"false") { "0" } else { "2" };
    let expected = [
        "ism-vmm",
        "vcpu0",
        "http-server",
        "event-monitor",
        "signal-handler",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let threads = thread_modes(vmm.child.id());
        let all_up = expected
            .iter()
            .all(|name| threads.iter().any(|(comm, _)| comm == name));
        let filtered = threads.iter().all(|(_, mode)| mode == want_mode);
        if all_up && filtered {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "threads (name, seccomp mode) {threads:?}: want {expected:?} all in mode {want_mode}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (status, body) = request(&sock, "GET", "vm.info", "");
    assert_eq!(status, 200, "{body}");
    let info = json(&body);
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["memory"]["size"], 32 << 20);
    assert_eq!(info["devices"][0]["id"], "_rng0");
    assert_eq!(info["devices"][0]["bdf"], "0000:00:01.0");

    let (status, body) = request(&sock, "GET", "vm.counters", "");
    assert_eq!(status, 200, "{body}");
    assert!(json(&body)["__vcpus"].is_object(), "{body}");

    // Refused requests: each a JSON array of messages, and the VM keeps running.
    for (method, endpoint, body, want) in [
        ("GET", "vm.nothing", "", 404),
        ("POST", "vm.info", "", 405),
        ("PUT", "vm.shutdown", "{\"now\":true}", 400),
        ("PUT", "vm.ism-add-region", "{\"id\":", 400),
        (
            "PUT",
            "vm.ism-add-region",
            r#"{"id":"ism0","token":1,"extra":1}"#,
            400,
        ),
        (
            "PUT",
            "vm.ism-add-region",
            r#"{"id":"ism0","token":1}"#,
            404,
        ),
        (
            "PUT",
            "vm.ism-remove-region",
            r#"{"id":"ism0","token":1}"#,
            404,
        ),
    ] {
        let (status, reply) = request(&sock, method, endpoint, body);
        assert_eq!(status, want, "{method} {endpoint} {body}: {reply}");
        assert!(json(&reply).as_array().is_some_and(|a| !a.is_empty()));
    }
    let (status, body) = request(&sock, "GET", "vm.ism-regions", "");
    assert_eq!((status, json(&body)), (200, serde_json::json!({})));

    // ism-remote speaks the same API.
    let out = Command::new(REMOTE)
        .arg("--api-socket")
        .arg(&sock)
        .arg("ping")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let ping = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(ping["pid"], vmm.child.id());
    let out = Command::new(REMOTE)
        .arg("--api-socket")
        .arg(&sock)
        .args(["ism-remove-region", "id=nope,token=3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );

    let out = Command::new(REMOTE)
        .arg("--api-socket")
        .arg(&sock)
        .arg("shutdown")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let (code, stderr, vmm) = vmm.wait();
    assert_eq!(code, 0, "{stderr}");
    assert!(!sock.exists(), "the socket is removed at exit");

    let events = vmm.events();
    let names: Vec<String> = events
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["source"].as_str().unwrap(),
                e["event"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            "vmm/starting",
            "vm/booting",
            "vm/booted",
            "vm/shutdown",
            "vmm/shutdown"
        ],
        "{events:?}"
    );
    let mut last = 0.0;
    for e in &events {
        let t = e["timestamp"]["secs"].as_f64().unwrap()
            + e["timestamp"]["nanos"].as_f64().unwrap() / 1e9;
        assert!(t >= last, "timestamps go forward: {events:?}");
        last = t;
        assert!(e["properties"].is_null());
    }
}

#[test]
fn test_a_second_vmm_on_the_same_socket_is_refused() {
    if !kvm_or_skip("test_a_second_vmm_on_the_same_socket_is_refused") {
        return;
    }
    let first = Vmm::start(&[]);
    let sock = first.socket();
    let mut code = print_code(b"2\n");
    code.extend(halt_code());
    let kernel = write_temp(&pvh_elf(&code));
    let out = Command::new(VMM)
        .args([
            "--kernel",
            kernel.as_path().to_str().unwrap(),
            "--memory",
            "size=32M",
        ])
        .arg("--api-socket")
        .arg(format!("path={}", sock.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another process"), "{err}");
    // The first VMM still answers.
    assert_eq!(request(&sock, "GET", "vmm.ping", "").0, 200);
    let (status, _) = request(&sock, "PUT", "vm.reboot", "");
    assert_eq!(status, 204);
    let (code, stderr, vmm) = first.wait();
    assert_eq!(code, 0, "{stderr}");
    let names: Vec<String> = vmm
        .events()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.contains(&"rebooting".to_owned()), "{names:?}");
}

/// The test guest (built by the tests crate) reading virtio-rng, with every VMM thread under
/// its filter in kill mode: a missing syscall would kill the VMM with SIGSYS.
#[test]
fn test_rng_guest_runs_clean_under_seccomp() {
    if !kvm_or_skip("test_rng_guest_runs_clean_under_seccomp") {
        return;
    }
    let guest = test_guest_elf();
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ism-api-test").unwrap();
    let serial = dir.as_path().join("serial");
    let out = Command::new(VMM)
        .args([
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            "ism.test=rng",
        ])
        .args(["--memory", "size=128M", "--rng", "src=/dev/urandom"])
        .args(["--seccomp", "true"])
        .arg("--serial")
        .arg(format!("file={}", serial.display()))
        .arg("--event-monitor")
        .arg(format!("path={}", dir.as_path().join("events").display()))
        .output()
        .unwrap();
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{console}");
    assert!(console.contains("ISM-TEST result=pass"), "{console}");
    // The device was activated (from a vCPU thread, under the vCPU filter).
    let events = std::fs::read_to_string(dir.as_path().join("events")).unwrap();
    assert!(events.contains("\"activated\""), "{events}");
}

/// Region unplug end to end: the test guest allocates a region on its ism device; the API
/// lists it, revokes it (the guest is sent a REVOKE event), and refuses what no longer holds.
/// Runs under seccomp in kill mode, with the embedded pool.
#[test]
fn test_ism_region_revoke_through_the_api() {
    if !kvm_or_skip("test_ism_region_revoke_through_the_api") {
        return;
    }
    let guest = test_guest_elf();
    let mut args = vec!["--kernel", guest.to_str().unwrap()];
    args.extend(["--cmdline", "ism.test=ism ism.script=alloc,1M"]);
    args.extend(["--memory", "size=128M", "--ism", "id=ism0,size=64M"]);
    args.extend(["--seccomp", "true"]);
    let vmm = Vmm::spawn(&args, None);
    let sock = vmm.socket();
    // Up to the key after the token: the serial file may hold half a line.
    vmm.wait_for(|| {
        vmm.serial()
            .lines()
            .any(|l| l.contains("cmd=alloc status=ok") && l.contains(" size="))
    });
    let (status, body) = request(&sock, "GET", "vm.ism-regions", "");
    assert_eq!(status, 200, "{body}");
    let tokens = json(&body)["ism0"].as_array().unwrap().clone();
    assert_eq!(tokens.len(), 1, "{body}");
    let token = tokens[0].as_u64().unwrap();
    // The guest printed the same token.
    assert!(vmm.serial().contains(&format!("token={token:#x}")));

    let events_before =
        json(&request(&sock, "GET", "vm.counters", "").1)["ism0"]["events_delivered"]
            .as_u64()
            .unwrap();
    let body = format!(r#"{{"id":"ism0","token":{token}}}"#);
    let (status, reply) = request(&sock, "PUT", "vm.ism-remove-region", &body);
    assert_eq!(status, 204, "{reply}");
    let (status, reply) = request(&sock, "GET", "vm.ism-regions", "");
    assert_eq!(
        (status, json(&reply)),
        (200, serde_json::json!({"ism0": []}))
    );
    // Revoked twice: 404. The guest was the only holder, so the pool freed the region and
    // attaching it again is refused.
    assert_eq!(request(&sock, "PUT", "vm.ism-remove-region", &body).0, 404);
    let add = format!(r#"{{"id":"ism0","token":{token},"access":"rw"}}"#);
    let (status, reply) = request(&sock, "PUT", "vm.ism-add-region", &add);
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("NoEnt"), "{reply}");
    let counters = json(&request(&sock, "GET", "vm.counters", "").1);
    assert_eq!(
        counters["ism0"]["events_delivered"].as_u64().unwrap(),
        events_before + 1,
        "the REVOKE event reached the guest: {counters}"
    );

    assert_eq!(request(&sock, "PUT", "vm.shutdown", "").0, 204);
    let (code, stderr, vmm) = vmm.wait();
    assert_eq!(code, 0, "{stderr}");
    let revoked: Vec<_> = vmm
        .events()
        .into_iter()
        .filter(|e| e["event"] == "region-revoked")
        .collect();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["properties"]["token"], token.to_string());
}

/// The last `ISM-TEST progress=<n>` count on a serial console.
fn last_progress(serial: &str) -> u64 {
    serial
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix("ISM-TEST progress="))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// vm.pause stops a guest that counts on its console, vm.resume lets it go on, both refuse
/// the wrong state with 409, vm.info follows, and a paused VM still shuts down. Two vCPUs
/// (the second waits for a SIPI inside KVM_RUN), under seccomp in kill mode.
#[test]
fn test_pause_and_resume_a_counting_guest() {
    if !kvm_or_skip("test_pause_and_resume_a_counting_guest") {
        return;
    }
    let guest = test_guest_elf();
    let mut args = vec!["--kernel", guest.to_str().unwrap()];
    args.extend(["--cmdline", "ism.test=progress"]);
    args.extend(["--memory", "size=128M", "--cpus", "boot=2"]);
    args.extend(["--seccomp", "true"]);
    let vmm = Vmm::spawn(&args, None);
    let sock = vmm.socket();
    vmm.wait_for(|| sock.exists() && last_progress(&vmm.serial()) >= 5);
    let state = || json(&request(&sock, "GET", "vm.info", "").1)["state"].clone();
    assert_eq!(state(), "Running");
    let (status, body) = request(&sock, "PUT", "vm.resume", "");
    assert_eq!(status, 409, "{body}");
    assert_eq!(json(&body)[0], "The VM is not paused");

    for round in 0..2 {
        let (status, body) = request(&sock, "PUT", "vm.pause", "");
        assert_eq!(status, 204, "{body}");
        assert_eq!(state(), "Paused");
        // Every vCPU is parked once the answer came: the console stands still.
        let paused_at = vmm.serial();
        std::thread::sleep(Duration::from_millis(700));
        assert_eq!(
            vmm.serial(),
            paused_at,
            "round {round}: the guest ran while paused"
        );
        let (status, body) = request(&sock, "PUT", "vm.pause", "");
        assert_eq!(status, 409, "{body}");
        assert_eq!(json(&body)[0], "The VM is already paused");

        let out = Command::new(REMOTE)
            .arg("--api-socket")
            .arg(&sock)
            .arg("resume")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(state(), "Running");
        let before = last_progress(&paused_at);
        vmm.wait_for(|| last_progress(&vmm.serial()) >= before + 5);
    }

    // Shutdown while paused: the parked vCPUs leave and the VMM exits cleanly.
    let out = Command::new(REMOTE)
        .arg("--api-socket")
        .arg(&sock)
        .arg("pause")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(request(&sock, "PUT", "vm.shutdown", "").0, 204);
    let (code, stderr, vmm) = vmm.wait();
    assert_eq!(code, 0, "{stderr}");
    let names: Vec<String> = vmm
        .events()
        .iter()
        .filter(|e| e["source"] == "vm")
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "booting", "booted", "pausing", "paused", "resuming", "resumed", "pausing", "paused",
            "resuming", "resumed", "pausing", "paused", "shutdown"
        ],
        "{names:?}"
    );
}

/// A test guest running the ism shell with its console on the VMM's stdin/stdout, the API
/// and the event monitor on.
struct ShellVmm {
    vmm: Vmm,
    stdin: ChildStdin,
    console: Arc<Mutex<String>>,
    seq: u64,
}

impl ShellVmm {
    fn start(ism: &[&str]) -> ShellVmm {
        let guest = test_guest_elf();
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ism-api-test").unwrap();
        let d = dir.as_path();
        let mut command = Command::new(VMM);
        command
            .args(["--kernel", guest.to_str().unwrap()])
            .args(["--cmdline", "ism.test=ism"])
            .args(["--memory", "size=128M", "--serial", "tty"])
            // Every thread under its filter in kill mode: a syscall the new paths need and
            // the filters lack kills the VMM.
            .args(["--seccomp", "true"]);
        for device in ism {
            command.args(["--ism", device]);
        }
        let mut child = command
            .arg("--api-socket")
            .arg(d.join("api.sock"))
            .arg("--event-monitor")
            .arg(format!("path={}", d.join("events").display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let console = Arc::new(Mutex::new(String::new()));
        let sink = console.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut text = sink.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        let shell = ShellVmm {
            vmm: Vmm {
                child,
                dir,
                _kernel: None,
            },
            stdin,
            console,
            seq: 0,
        };
        shell.wait_line("ism=ready");
        shell.check_thread_filters(ism.iter().any(|d| d.contains("pool=")));
        shell
    }

    /// Every thread is filtered (Seccomp: 2). The ism worker, started by a vCPU on
    /// activation, has two filters (the vCPU's and its own, stacked); the serial input
    /// thread and, with a broker, the pool client's reader have their own.
    fn check_thread_filters(&self, broker: bool) {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.vmm.child.id())).unwrap();
        let mut threads = Vec::new();
        for task in tasks {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap()
                    .trim()
                    .to_owned()
            };
            assert_eq!(field("Seccomp:"), "2", "thread {comm}");
            threads.push((comm.trim().to_owned(), field("Seccomp_filters:")));
        }
        let filters = |name: &str| -> Vec<&str> {
            threads
                .iter()
                .filter(|(comm, _)| comm == name)
                .map(|(_, n)| n.as_str())
                .collect()
        };
        assert_eq!(filters("serial-input"), ["1"], "{threads:?}");
        assert_eq!(filters("vcpu0"), ["1"], "{threads:?}");
        let workers = filters("virtio-ism");
        assert!(!workers.is_empty(), "{threads:?}");
        assert!(workers.iter().all(|n| *n == "2"), "{threads:?}");
        if broker {
            assert!(!filters("ism-pool-client").is_empty(), "{threads:?}");
            assert!(
                filters("ism-pool-client").iter().all(|n| *n == "1"),
                "{threads:?}"
            );
        }
    }

    /// The first console line containing `needle`, waiting for it.
    fn wait_line(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(line) = self
                .console
                .lock()
                .unwrap()
                .lines()
                .find(|l| l.contains(needle))
            {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the console:\n{}",
                self.console.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Run a shell command; its answer line, which must say status=ok.
    fn cmd(&mut self, command: &str) -> String {
        self.seq += 1;
        writeln!(self.stdin, "{command}").unwrap();
        let line = self.wait_line(&format!("seq={} ", self.seq));
        assert!(line.contains("status=ok"), "{command}: {line}");
        line
    }

    fn socket(&self) -> PathBuf {
        self.vmm.socket()
    }
}

/// `key=value` from a console line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

fn hex(text: &str) -> u64 {
    u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap()
}

fn ism_events(vmm: &Vmm) -> Vec<serde_json::Value> {
    vmm.events()
        .into_iter()
        .filter(|e| e["source"] == "ism")
        .collect()
}

/// Region creation through the API on the embedded pool: bad requests change nothing, a good
/// one is allocated, granted to the named peer, reported to the guest (REGION_ADDED) and to
/// the event monitor; vm.ism-pool-status answers from the embedded pool; what the guest
/// itself does (alloc, grant, detach) is on the event monitor with its properties.
#[test]
fn test_region_create_with_grants_pool_status_and_guest_events() {
    if !kvm_or_skip("test_region_create_with_grants_pool_status_and_guest_events") {
        return;
    }
    // Two devices on one embedded pool: the guest drives ism0, ism1 is the named peer.
    let mut shell = ShellVmm::start(&["id=ism0,size=64M", "id=ism1,size=8M"]);
    let sock = shell.socket();
    let own = field(&shell.wait_line("ism=ready"), "devid")
        .parse::<u64>()
        .unwrap();

    let pool = || {
        let (status, body) = request(&sock, "GET", "vm.ism-pool-status", "");
        assert_eq!(status, 200, "{body}");
        json(&body)
    };
    let status = pool();
    assert_eq!(status["ism0"], status["ism1"], "one embedded pool");
    let mut devids: Vec<u64> = status["ism0"]["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["devid"].as_u64().unwrap())
        .collect();
    devids.sort_unstable();
    assert_eq!(devids.len(), 2, "{status}");
    assert!(devids.contains(&own));
    let peer = *devids.iter().find(|d| **d != own).unwrap();
    assert_eq!(status["ism0"]["used"], 0);
    assert_eq!(status["ism0"]["protocol_version"], 0);

    // Refused, each with a message, and nothing allocated.
    for (body, want, says) in [
        (
            r#"{"id":"ism0","size":0}"#.to_owned(),
            400,
            "size 0".to_owned(),
        ),
        (
            r#"{"id":"ism0","size":5000}"#.into(),
            400,
            "size 5000".into(),
        ),
        (
            r#"{"id":"ism0","size":4096,"token":1}"#.into(),
            400,
            "not both".into(),
        ),
        (
            r#"{"id":"ism0","size":4096,"sise":1}"#.into(),
            400,
            "unknown field".into(),
        ),
        (
            r#"{"id":"ism0","size":4096,"grants":[{"peer":77,"perm":"ro"}]}"#.into(),
            400,
            "peer 77 is not a device of its pool".into(),
        ),
        (
            format!(r#"{{"id":"ism0","size":4096,"grants":[{{"peer":{own},"perm":"ro"}}]}}"#),
            400,
            "the device itself".into(),
        ),
        (
            r#"{"id":"ism0","size":134217728}"#.into(),
            400,
            "does not fit".into(),
        ),
        (
            r#"{"id":"ism7","size":4096}"#.into(),
            404,
            "No ism device".into(),
        ),
    ] {
        let (status, reply) = request(&sock, "PUT", "vm.ism-add-region", &body);
        assert_eq!(status, want, "{body}: {reply}");
        assert!(reply.contains(&says), "{body}: {reply}");
    }
    assert_eq!(pool()["ism0"]["used"], 0, "nothing was allocated");
    assert!(pool()["ism0"]["regions"].as_array().unwrap().is_empty());

    // Created, with a read-only grant for the peer and read-write for everyone else.
    let body = format!(
        r#"{{"id":"ism0","size":131072,"grants":[{{"peer":{peer},"perm":"ro"}}],"default_perm":"rw"}}"#
    );
    let (status, reply) = request(&sock, "PUT", "vm.ism-add-region", &body);
    assert_eq!(status, 200, "{reply}");
    let created = json(&reply);
    let token = created["token"].as_u64().unwrap();
    assert_eq!(created["areas"][0]["size"], 131072);
    let region = pool()["ism0"]["regions"][0].clone();
    assert_eq!(region["token"], token);
    assert_eq!(region["size"], 131072);
    assert_eq!(region["owner"], own);
    assert_eq!(region["holders"], serde_json::json!([own]));
    // ATTACH|READ for the peer, ATTACH|READ|WRITE by default.
    assert_eq!(region["grants"], serde_json::json!([[peer, 5]]));
    assert_eq!(region["default_perms"], 7);
    assert_eq!(pool()["ism0"]["used"], 131072);
    let (_, regions) = request(&sock, "GET", "vm.ism-regions", "");
    assert_eq!(json(&regions)["ism0"], serde_json::json!([token]));

    // The guest heard of it through its event queue, without asking.
    let events = shell.cmd("events");
    assert_eq!(field(&events, "region_added"), "1", "{events}");

    // Guest-driven changes, reported with their properties.
    let alloc = shell.cmd("alloc 64K");
    let guest_token = hex(field(&alloc, "token"));
    shell.cmd(&format!("grant {guest_token:#x} {peer} ra"));
    shell.cmd(&format!("grant {guest_token:#x} default r"));
    shell.cmd(&format!("detach {guest_token:#x}"));

    assert_eq!(request(&sock, "PUT", "vm.shutdown", "").0, 204);
    let ShellVmm { vmm, .. } = shell;
    let (code, stderr, vmm) = vmm.wait();
    assert_eq!(code, 0, "{stderr}");
    let events = ism_events(&vmm);
    let find = |event: &str, token: u64| -> Vec<serde_json::Value> {
        events
            .iter()
            .filter(|e| {
                e["event"] == event && e["properties"]["token"] == token.to_string().as_str()
            })
            .map(|e| e["properties"].clone())
            .collect()
    };
    let api_alloc = find("region-allocated", token);
    assert_eq!(api_alloc.len(), 1, "{events:?}");
    assert_eq!(api_alloc[0]["id"], "ism0");
    assert_eq!(api_alloc[0]["size"], "131072");
    assert_eq!(api_alloc[0]["origin"], "api");
    let api_grant = find("region-granted", token);
    assert_eq!(api_grant.len(), 1, "{events:?}");
    assert_eq!(api_grant[0]["peer"], peer.to_string());
    assert_eq!(api_grant[0]["perm"], "ro");

    let allocated = find("region-allocated", guest_token);
    assert_eq!(allocated.len(), 1, "{events:?}");
    assert_eq!(allocated[0]["id"], "ism0");
    assert_eq!(allocated[0]["size"], "65536");
    assert_eq!(allocated[0]["origin"], "guest");
    let granted = find("region-granted", guest_token);
    assert_eq!(granted.len(), 2, "{events:?}");
    assert_eq!(granted[0]["peer"], peer.to_string());
    assert_eq!(granted[0]["perm"], "RA");
    assert_eq!(granted[1]["peer"], "default");
    assert_eq!(granted[1]["perm"], "R");
    let detached = find("region-detached", guest_token);
    assert_eq!(detached.len(), 1, "{events:?}");
    assert_eq!(detached[0]["id"], "ism0");
    // In order: allocated, granted twice, detached.
    let order: Vec<&str> = events
        .iter()
        .filter(|e| e["properties"]["token"] == guest_token.to_string().as_str())
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "region-allocated",
            "region-granted",
            "region-granted",
            "region-detached"
        ]
    );
}

/// The `ism-pool` broker binary of this target dir, built once per test process.
fn pool_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // <target>/<profile>/deps/api-<hash> -> <target>/<profile>
            let exe = std::env::current_exe().expect("test executable path");
            let profile_dir = exe.ancestors().nth(2).expect("<target>/<profile>/deps");
            let target = exe.ancestors().nth(3).expect("<target>/<profile>/deps");
            let status = Command::new(env!("CARGO"))
                .args(["build", "--quiet", "-p", "ism-pool", "--bin", "ism-pool"])
                .env("CARGO_TARGET_DIR", target)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo to build ism-pool");
            assert!(status.success(), "building ism-pool failed: {status}");
            let binary = profile_dir.join("ism-pool");
            assert!(binary.is_file(), "{} missing", binary.display());
            binary
        })
        .clone()
}

/// An `ism-pool` broker on a socket in its own directory; killed on drop.
struct Broker {
    child: Child,
    dir: vmm_sys_util::tempdir::TempDir,
}

impl Broker {
    fn start() -> Broker {
        Broker::start_with(&["--size", "64M"])
    }

    /// A broker with `args` besides its socket.
    fn start_with(args: &[&str]) -> Broker {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ism-api-pool").unwrap();
        let child = Command::new(pool_binary())
            .arg("--socket")
            .arg(dir.as_path().join("pool.sock"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let broker = Broker { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !broker.socket().exists() {
            assert!(Instant::now() < deadline, "ism-pool did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        broker
    }

    fn socket(&self) -> PathBuf {
        self.dir.as_path().join("pool.sock")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A broker that dies under a running VMM is a 503 with its cause, not a 400: the pool's
/// status, a region created (the device's session cannot reach the broker) and a region
/// attached (the device says EAGAIN; the broker does not answer) all say the pool is
/// unavailable, and the VMM serves on.
#[test]
fn test_a_pool_that_is_down_is_503_with_its_cause() {
    if !kvm_or_skip("test_a_pool_that_is_down_is_503_with_its_cause") {
        return;
    }
    let mut broker = Broker::start();
    let device = format!("id=ism0,pool={},size=16M", broker.socket().display());
    let mut shell = ShellVmm::start(&[device.as_str()]);
    let sock = shell.socket();
    let (status, body) = request(&sock, "GET", "vm.ism-pool-status", "");
    assert_eq!(status, 200, "{body}");
    // The guest holds a region of the live pool.
    shell.cmd("alloc 4096");

    broker.child.kill().unwrap();
    broker.child.wait().unwrap();
    assert!(
        broker.socket().exists(),
        "a stale socket: connect is refused"
    );

    let down = |method: &str, endpoint: &str, body: &str| {
        let (status, reply) = request(&sock, method, endpoint, body);
        assert_eq!(status, 503, "{method} {endpoint} {body}: {reply}");
        let chain: Vec<String> = serde_json::from_str(&reply).unwrap();
        assert!(
            chain.iter().any(|m| m == "The region pool is unavailable"),
            "{chain:?}"
        );
        assert!(
            chain.iter().any(|m| m == "Pool broker connection failed"),
            "the cause: {chain:?}"
        );
        chain
    };
    let chain = down("GET", "vm.ism-pool-status", "");
    assert_eq!(chain[0], "Pool status of \"ism0\" is unavailable");
    assert!(chain[3].contains("Connection refused"), "{chain:?}");
    let chain = down("PUT", "vm.ism-add-region", r#"{"id":"ism0","size":4096}"#);
    assert_eq!(
        chain[0],
        "Device \"ism0\" could not create a region of 4096 bytes"
    );
    assert_ne!(chain[3], chain[4], "the session's own cause: {chain:?}");
    let chain = down("PUT", "vm.ism-add-region", r#"{"id":"ism0","token":1}"#);
    assert_eq!(chain[0], "Device \"ism0\" could not attach region 1");
    assert!(chain[2].contains("status Again"), "{chain:?}");

    // Requests that do not need the pool are answered as before.
    let (status, body) = request(&sock, "GET", "vm.ism-regions", "");
    assert_eq!(status, 200, "{body}");
    let (status, _) = request(&sock, "GET", "vmm.ping", "");
    assert_eq!(status, 200);
    assert_alive(&mut shell.vmm);
}

/// The properties of `vmm`'s ism events named `event` about `token`, waiting (the monitor
/// writes asynchronously) until there are `count`.
fn wait_events(vmm: &Vmm, event: &str, token: u64, count: usize) -> Vec<serde_json::Value> {
    let token = token.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found: Vec<serde_json::Value> = ism_events(vmm)
            .into_iter()
            .filter(|e| e["event"] == event && e["properties"]["token"] == token.as_str())
            .map(|e| e["properties"].clone())
            .collect();
        if found.len() >= count {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{count} {event} events for {token} expected, got {found:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two VMMs on one broker: what one guest does to a shared region shows up on both event
/// streams (attach and detach on the attacher's, peer attached and gone on the owner's),
/// including a peer whose VMM is killed and a region the operator revokes; the API creates a
/// region granted to the other VMM's device, which that guest can attach, and answers
/// vm.ism-pool-status from the broker.
#[test]
fn test_paired_guests_report_peer_and_pool_events() {
    if !kvm_or_skip("test_paired_guests_report_peer_and_pool_events") {
        return;
    }
    let broker = Broker::start();
    let device = format!("id=ism0,size=16M,pool={}", broker.socket().display());
    let mut owner = ShellVmm::start(&[&device]);
    let mut peer = ShellVmm::start(&[&device]);
    let owner_devid: u64 = field(&owner.wait_line("ism=ready"), "devid")
        .parse()
        .unwrap();
    let peer_devid: u64 = field(&peer.wait_line("ism=ready"), "devid")
        .parse()
        .unwrap();
    assert_ne!(owner_devid, peer_devid);

    let alloc = owner.cmd("alloc 128K");
    let token = hex(field(&alloc, "token"));
    owner.cmd(&format!("grant {token:#x} {peer_devid} rwa"));
    peer.cmd(&format!("attach {token:#x} rw"));
    let attached = wait_events(&peer.vmm, "region-attached", token, 1);
    assert_eq!(attached[0]["id"], "ism0");
    assert_eq!(attached[0]["size"], "131072");
    assert_eq!(attached[0]["perm"], "RW");
    assert_eq!(attached[0]["origin"], "guest");
    let joined = wait_events(&owner.vmm, "peer-attached", token, 1);
    assert_eq!(joined[0]["peer"], peer_devid.to_string());
    assert_eq!(joined[0]["id"], "ism0");

    peer.cmd(&format!("detach {token:#x}"));
    wait_events(&peer.vmm, "region-detached", token, 1);
    let gone = wait_events(&owner.vmm, "peer-gone", token, 1);
    assert_eq!(gone[0]["peer"], peer_devid.to_string());

    // A region the API creates for the owner, granted read-only to the peer's device (in
    // another VMM): the pool knows that devid, and the peer's guest can attach it.
    let sock = owner.socket();
    let status = json(&request(&sock, "GET", "vm.ism-pool-status", "").1);
    assert!(
        status["ism0"]["protocol_version"].as_u64().unwrap() > 0,
        "{status}"
    );
    let body =
        format!(r#"{{"id":"ism0","size":65536,"grants":[{{"peer":{peer_devid},"perm":"ro"}}]}}"#);
    let (code, reply) = request(&sock, "PUT", "vm.ism-add-region", &body);
    assert_eq!(code, 200, "{reply}");
    let api_token = json(&reply)["token"].as_u64().unwrap();
    let status = json(&request(&sock, "GET", "vm.ism-pool-status", "").1);
    let region = status["ism0"]["regions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["token"] == api_token)
        .unwrap_or_else(|| panic!("{api_token} in {status}"))
        .clone();
    assert_eq!(region["grants"], serde_json::json!([[peer_devid, 5]]));
    let line = peer.cmd(&format!("attach {api_token:#x} ro"));
    assert!(line.contains("status=ok"), "{line}");
    let attached = wait_events(&peer.vmm, "region-attached", api_token, 1);
    assert_eq!(attached[0]["perm"], "R");
    // Read-only means read-only: asking for write access is refused by the pool.
    peer.cmd(&format!("detach {api_token:#x}"));
    peer.seq += 1;
    writeln!(peer.stdin, "attach {api_token:#x} rw").unwrap();
    let refused = peer.wait_line(&format!("seq={} ", peer.seq));
    assert!(!refused.contains("status=ok"), "{refused}");

    // The peer attaches the first region again and its VMM dies: the owner hears it.
    peer.cmd(&format!("attach {token:#x} ro"));
    wait_events(&owner.vmm, "peer-attached", token, 2);
    let ShellVmm {
        vmm: mut peer_vmm, ..
    } = peer;
    peer_vmm.child.kill().unwrap();
    peer_vmm.child.wait().unwrap();
    let gone = wait_events(&owner.vmm, "peer-gone", token, 2);
    assert_eq!(gone[1]["peer"], peer_devid.to_string());

    // The operator revokes the region: the owner's device reports it, origin "pool".
    let out = Command::new(pool_binary())
        .args(["revoke", "--socket"])
        .arg(broker.socket())
        .args(["--token", &token.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let revoked = wait_events(&owner.vmm, "region-revoked", token, 1);
    assert_eq!(revoked[0]["origin"], "pool");
    assert_eq!(revoked[0]["id"], "ism0");
    let events = owner.cmd("events");
    assert_eq!(field(&events, "revoke"), "1", "{events}");

    assert_eq!(request(&sock, "PUT", "vm.shutdown", "").0, 204);
    let ShellVmm { vmm, .. } = owner;
    let (code, stderr, _) = vmm.wait();
    assert_eq!(code, 0, "{stderr}");
}

// ---- Hostile API callers and resource limits (issue 14) ----

/// Whether KVM is there; when not, one loud line saying which test did not run.
fn kvm_or_skip(test: &str) -> bool {
    kvm_available_for(test)
}

/// The VMM process has not ended.
fn assert_alive(vmm: &mut Vmm) {
    let status = vmm.child.try_wait().unwrap();
    assert!(status.is_none(), "the VMM died: {status:?}");
}

/// Send `head` then `body` on a fresh connection from another thread (the server may answer
/// and close before it read everything; the write error is ignored) and read the answer:
/// (status, body).
fn raw_exchange(socket: &Path, head: Vec<u8>, body: Vec<u8>) -> (u16, String) {
    let s = UnixStream::connect(socket).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut writer = s.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        let _ = writer
            .write_all(&head)
            .and_then(|()| writer.write_all(&body));
    });
    let mut raw = Vec::new();
    let _ = (&s).read_to_end(&mut raw);
    let _ = sending.join();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_owned();
    (status, body)
}

/// Hold `count` regions in the broker's pool from this process (its own session, as a
/// "VM"): the VMM's `vm.ism-pool-status` then lists them all. The leases' memfds are closed;
/// the session keeps the regions until it ends.
fn fill_pool(socket: &Path, count: usize) -> std::sync::Arc<ism_pool::BrokerSession> {
    use ism_pool::PoolSession;
    let session = ism_pool::BrokerSession::connect(socket).expect("a pool session");
    for n in 0..count {
        let lease = session
            .alloc(4096)
            .unwrap_or_else(|e| panic!("region {n}: {e}"));
        drop(lease.fd);
    }
    session
}

/// Finding 1: requests whose handling grows a large buffer (glibc: mremap) used to kill a
/// VMM under `--seccomp true`. A 1 MiB body (the most the API takes), a 1 MiB header line
/// (refused with 431 after 64 KiB), and `vm.ism-pool-status` for a pool of 2000 regions are
/// answered, and the VMM lives on. Broker flags relied on: `--size`, `--per-vm-limit`,
/// `--per-vm-regions` and `--vm-identity process` (the test process holds the regions).
#[test]
fn test_large_bodies_headers_and_pool_status_under_seccomp() {
    if !kvm_or_skip("test_large_bodies_headers_and_pool_status_under_seccomp") {
        return;
    }
    const REGIONS: usize = 2000;
    // Generous, explicit limits: 2000 regions of 4 KiB from one session.
    let broker = Broker::start_with(&[
        "--size",
        "256M",
        "--per-vm-limit",
        "256M",
        "--per-vm-regions",
        "4096",
        "--vm-identity",
        "process",
    ]);
    let ism = format!("id=ism0,pool={},size=16M", broker.socket().display());
    let mut vmm = Vmm::start(&["--seccomp", "true", "--ism", &ism]);
    let sock = vmm.socket();

    // First, while glibc's mmap threshold is still at its start (128 KiB): the answer's
    // buffers grow past it, so glibc moves them with mremap.
    let _holder = fill_pool(&broker.socket(), REGIONS);
    let (status, reply) = request(&sock, "GET", "vm.ism-pool-status", "");
    assert_eq!(status, 200, "{}", &reply[..reply.len().min(500)]);
    let regions = json(&reply)["ism0"]["regions"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(regions >= REGIONS, "{regions} regions listed");
    assert!(reply.len() > 200 << 10, "{} bytes", reply.len());
    assert_alive(&mut vmm);

    // A body of exactly 1 MiB: valid JSON padded with spaces (the token does not exist).
    let mut body = br#"{"id":"ism0","token":1}"#.to_vec();
    body.resize(1 << 20, b' ');
    let head = format!(
        "PUT /api/v1/vm.ism-add-region HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let (status, reply) = raw_exchange(&sock, head.into_bytes(), body);
    assert_eq!(status, 400, "{reply}");
    assert_alive(&mut vmm);

    // A 1 MiB header line.
    let mut head = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
    head.resize(head.len() + (1 << 20), b'a');
    head.extend_from_slice(b"\r\n\r\n");
    let (status, reply) = raw_exchange(&sock, head, Vec::new());
    assert_eq!(status, 431, "{reply}");
    assert_alive(&mut vmm);

    assert_eq!(request(&sock, "GET", "vmm.ping", "").0, 200);
}

/// A guest with one virtio-ism device of 2048 MSI-X vectors (an irqfd each).
const ISM_2048_VECTORS: &str = "size=256M";

/// Spawn the "UP" guest with `extra` options under RLIMIT_NOFILE `soft`:`hard`.
fn spawn_with_nofile(extra: &[&str], soft: u64, hard: u64) -> Vmm {
    use std::os::unix::process::CommandExt;
    let mut code = print_code(b"UP\n");
    code.extend(halt_code());
    let kernel = write_temp(&pvh_elf(&code));
    let kernel_path = kernel.as_path().to_str().unwrap().to_owned();
    let mut args = vec!["--kernel", kernel_path.as_str(), "--memory", "size=32M"];
    args.extend(extra);
    let mut command = Command::new(VMM);
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit,
    // which is async-signal-safe, with a valid pointer to a copied struct.
    unsafe {
        command.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Vmm::spawn_with(command, &args, Some(kernel))
}

/// Finding 2: with the usual soft limit of 1024 and a higher hard limit (65536, or this
/// process's hard limit if lower: raising it needs CAP_SYS_RESOURCE), the VMM raises the soft
/// limit and starts a device of 2048 vectors (a regression test: this worked before).
#[test]
fn test_a_device_of_2048_vectors_starts_under_a_1024_soft_limit() {
    if !kvm_or_skip("test_a_device_of_2048_vectors_starts_under_a_1024_soft_limit") {
        return;
    }
    let mut ours = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid `ours`.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut ours) };
    assert_eq!(got, 0);
    let hard = ours.rlim_max.min(65536);
    assert!(
        hard >= 4096,
        "this process's hard descriptor limit {hard} is too low"
    );
    let args = ["--seccomp", "true", "--ism", ISM_2048_VECTORS];
    let mut vmm = spawn_with_nofile(&args, 1024, hard);
    vmm.wait_for(|| vmm.socket().exists() && vmm.serial().contains("UP"));
    assert_eq!(request(&vmm.socket(), "GET", "vmm.ping", "").0, 200);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", vmm.child.id())).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft = hard.to_string();
    assert_eq!(
        open_files.split_whitespace().nth(3),
        Some(soft.as_str()),
        "{open_files}"
    );
    assert_alive(&mut vmm);
}

/// Finding 2: a hard limit too low for the configuration is refused before the VM is built,
/// saying how many descriptors are needed and how to raise the limit; no panic, nothing
/// about memory.
#[test]
fn test_a_hard_fd_limit_too_low_is_refused_with_the_number_needed() {
    if !kvm_or_skip("test_a_hard_fd_limit_too_low_is_refused_with_the_number_needed") {
        return;
    }
    let vmm = spawn_with_nofile(&["--ism", ISM_2048_VECTORS], 1024, 1024);
    let (code, stderr, _vmm) = vmm.wait();
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("needs about"), "{stderr}");
    assert!(stderr.contains("file descriptors"), "{stderr}");
    assert!(stderr.contains("prlimit --nofile="), "{stderr}");
    assert!(
        stderr.contains("hard limit (RLIMIT_NOFILE) is 1024"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!stderr.to_lowercase().contains("memory"), "{stderr}");
}

/// The API's connection cap (vmm-integration/src/api/http.rs MAX_CONNECTIONS).
const API_CONNECTIONS: usize = 16;

/// Finding 5: a client that announces a body and sends a few bytes holds only its own
/// connection: another client's `vm.info` is answered while the slow one is still
/// connected, waiting.
#[test]
fn test_a_slow_body_does_not_hold_up_other_clients() {
    if !kvm_or_skip("test_a_slow_body_does_not_hold_up_other_clients") {
        return;
    }
    let mut vmm = Vmm::start(&["--seccomp", "true"]);
    let sock = vmm.socket();
    let mut slow = UnixStream::connect(&sock).unwrap();
    slow.write_all(
        b"PUT /api/v1/vm.ism-add-region HTTP/1.1\r\nHost: localhost\r\n\
          Content-Length: 100000\r\n\r\n{\"id",
    )
    .unwrap();
    // Let the server start reading the slow request first.
    std::thread::sleep(Duration::from_millis(200));

    // Well within the server's 10 s request timeout, which would end the slow client.
    let other = std::thread::spawn({
        let sock = sock.clone();
        move || request(&sock, "GET", "vm.info", "")
    });
    let deadline = Instant::now() + Duration::from_secs(6);
    while !other.is_finished() {
        assert!(
            Instant::now() < deadline,
            "vm.info was not answered while a slow client sends its body"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, body) = other.join().unwrap();
    assert_eq!(status, 200, "{body}");
    // The slow client's thread runs under the http-server's filter and its own.
    let filters: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", vmm.child.id()))
        .unwrap()
        .filter_map(|task| {
            let dir = task.ok()?.path();
            let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            (comm.trim() == "http-conn").then(|| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Seccomp_filters:"))
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
        })
        .collect();
    // (The other client's thread may not have ended yet.)
    assert!(
        !filters.is_empty() && filters.iter().all(|n| n == "2"),
        "http-conn threads and their filters: {filters:?}"
    );
    // The slow client is still connected and unanswered.
    slow.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let read = slow.read(&mut byte);
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the slow client was answered or closed: {read:?}"
    );
    assert_alive(&mut vmm);
}

/// Finding 5: connections over the cap are answered 503 and closed; idle connections are
/// closed after the idle timeout, so clients are served again (not locked out for good).
#[test]
fn test_idle_connections_over_the_cap_do_not_lock_out_clients() {
    if !kvm_or_skip("test_idle_connections_over_the_cap_do_not_lock_out_clients") {
        return;
    }
    let mut vmm = Vmm::start(&["--seccomp", "true"]);
    let sock = vmm.socket();
    let idle: Vec<UnixStream> = (0..API_CONNECTIONS)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    // Every idle connection has its place once the server accepted them all.
    std::thread::sleep(Duration::from_millis(300));
    let ping = || {
        let head = "GET /api/v1/vmm.ping HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        raw_exchange(&sock, head.as_bytes().to_vec(), Vec::new())
    };
    let (status, body) = ping();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("Too many API connections"), "{body}");

    // The idle ones are closed after the idle timeout (5 s); then clients are served.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = ping();
        if status == 200 {
            break;
        }
        assert_eq!(status, 503);
        assert!(
            Instant::now() < deadline,
            "still refused after the idle timeout"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for mut conn in idle {
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            conn.read(&mut buf).unwrap_or(0),
            0,
            "an idle connection is still open"
        );
    }
    assert_alive(&mut vmm);
}

/// Finding 5: descriptors running out (EMFILE) while accepting leaves the API working once
/// connections close, and the VMM alive (tiny_http used to panic there, and with seccomp the
/// panic killed the VMM).
#[test]
fn test_emfile_on_accept_leaves_the_api_working() {
    if !kvm_or_skip("test_emfile_on_accept_leaves_the_api_working") {
        return;
    }
    let mut vmm = Vmm::start(&["--seccomp", "true"]);
    let sock = vmm.socket();
    let pid = vmm.child.id() as libc::pid_t;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    // Room for three connections, then accept fails with EMFILE.
    let limit = libc::rlimit {
        rlim_cur: open + 3,
        rlim_max: open + 3,
    };
    // SAFETY: prlimit on our own child with a valid new limit and no old-limit pointer.
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());

    let clients: Vec<UnixStream> = (0..12)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_alive(&mut vmm);
    drop(clients);

    // Once those are closed (the server reads EOF on each), requests are answered again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, _) = request(&sock, "GET", "vmm.ping", "");
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the API did not come back: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_alive(&mut vmm);
}
