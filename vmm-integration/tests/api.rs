// SPDX-License-Identifier: Apache-2.0
//! The REST API, ism-remote and the event monitor against a running ism-vmm process.

#[allow(dead_code)]
#[path = "../src/layout.rs"]
mod layout;
#[allow(dead_code)]
#[path = "../src/test_guest.rs"]
mod test_guest;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use test_guest::{halt_code, kvm_available, print_code, pvh_elf, write_temp};

const VMM: &str = env!("CARGO_BIN_EXE_ism-vmm");
const REMOTE: &str = env!("CARGO_BIN_EXE_ism-remote");

/// The freestanding test guest, which the `ism-tests` crate's build script builds into
/// `<target>/ism-test-guest`. Built on first use when this test runs before that crate was
/// compiled; a guest that still cannot be found fails the test rather than skipping it.
fn test_guest_elf() -> PathBuf {
    // <target>/<profile>/deps/api-<hash> -> <target>
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("test executable lives in <target>/<profile>/deps")
        .to_path_buf();
    let elf = target.join("ism-test-guest/x86_64-unknown-linux-gnu/release/ism-test-guest");
    if !elf.is_file() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "-p", "ism-tests"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo to build the test guest");
        assert!(status.success(), "building the test guest failed: {status}");
    }
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
    _kernel: vmm_sys_util::tempfile::TempFile,
}

impl Vmm {
    /// Boot a guest that prints "UP" and halts, with the API and the event monitor on, plus
    /// `extra` options.
    fn start(extra: &[&str]) -> Vmm {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ism-api-test").unwrap();
        let mut code = print_code(b"UP\n");
        code.extend(halt_code());
        let kernel = write_temp(&pvh_elf(&code));
        let d = dir.as_path();
        let child = Command::new(VMM)
            .args(["--kernel", kernel.as_path().to_str().unwrap()])
            .args(["--memory", "size=32M", "--rng", "src=/dev/urandom"])
            .arg("--serial")
            .arg(format!("file={}", d.join("serial").display()))
            .arg("--api-socket")
            .arg(d.join("api.sock"))
            .arg("--event-monitor")
            .arg(format!("path={}", d.join("events").display()))
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ism-vmm");
        let vmm = Vmm {
            child,
            dir,
            _kernel: kernel,
        };
        vmm.wait_for(|| vmm.socket().exists() && vmm.serial().contains("UP"));
        vmm
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
    api_session(&[]);
}

/// The same session with every thread under its seccomp filter (kill on a miss).
#[test]
fn test_api_session_under_seccomp() {
    api_session(&["--seccomp", "true"]);
}

fn api_session(extra: &[&str]) {
    if !kvm_available() {
        return;
    }
    let vmm = Vmm::start(extra);
    let sock = vmm.socket();

    let (status, body) = request(&sock, "GET", "vmm.ping", "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["pid"], vmm.child.id());

    // Once the main loop answers, every thread runs under a filter (mode 2) or none (0).
    let want_mode = if extra.contains(&"true") { "2" } else { "0" };
    let tasks = std::fs::read_dir(format!("/proc/{}/task", vmm.child.id())).unwrap();
    let mut names = Vec::new();
    for task in tasks {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap();
        let status = std::fs::read_to_string(dir.join("status")).unwrap();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap()
            .trim()
            .to_owned();
        assert_eq!(mode, want_mode, "thread {comm}");
        names.push(comm.trim().to_owned());
    }
    for expected in [
        "ism-vmm",
        "vcpu0",
        "http-server",
        "event-monitor",
        "signal-handler",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
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
    if !kvm_available() {
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
    if !kvm_available() {
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
    if !kvm_available() {
        return;
    }
    let guest = test_guest_elf();
    let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ism-api-test").unwrap();
    let d = dir.as_path();
    let sock = d.join("api.sock");
    let child = Command::new(VMM)
        .args(["--kernel", guest.to_str().unwrap()])
        .args(["--cmdline", "ism.test=ism ism.script=alloc,1M"])
        .args(["--memory", "size=128M", "--ism", "id=ism0,size=64M"])
        .args(["--seccomp", "true"])
        .arg("--serial")
        .arg(format!("file={}", d.join("serial").display()))
        .arg("--api-socket")
        .arg(&sock)
        .arg("--event-monitor")
        .arg(format!("path={}", d.join("events").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let vmm = Vmm {
        child,
        dir,
        _kernel: write_temp(b""),
    };
    vmm.wait_for(|| vmm.serial().contains("cmd=alloc status=ok"));
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
