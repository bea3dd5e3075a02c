// SPDX-License-Identifier: Apache-2.0
//! Running a VMM (ism-vmm or cloud-hypervisor, see [`crate::Vmm`]) under a hard timeout.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::report::{GuestReport, PREFIX};
use crate::vmm_kind::Vmm;

/// Default hard limit for one VM.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether /dev/kvm exists and can be opened read-write.
pub fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The freestanding test guest built by build.rs.
pub fn test_guest() -> PathBuf {
    PathBuf::from(env!("ISM_TEST_GUEST"))
}

/// The ism-vmm binary: `$ISM_VMM` if set, else `ism-vmm` in this test executable's profile
/// dir (`<target>/<profile>/deps/<test>` -> `<target>/<profile>/ism-vmm`), brought up to date
/// once per process with `cargo build -p ism-vmm` (cargo does not build other packages'
/// binaries for `cargo test --workspace`; it holds no lock while tests run). Panics, saying
/// why and how to build it by hand, if that fails.
pub fn vmm_binary() -> PathBuf {
    static VMM: OnceLock<PathBuf> = OnceLock::new();
    VMM.get_or_init(|| {
        if let Some(path) = std::env::var_os("ISM_VMM") {
            return PathBuf::from(path);
        }
        build_vmm()
    })
    .clone()
}

/// The ism-pool broker binary: `$ISM_POOL` if set, else built like [`vmm_binary`].
pub fn pool_binary() -> PathBuf {
    static POOL: OnceLock<PathBuf> = OnceLock::new();
    POOL.get_or_init(|| {
        if let Some(path) = std::env::var_os("ISM_POOL") {
            return PathBuf::from(path);
        }
        build_binary("ism-pool", "ism-pool", "ISM_POOL")
    })
    .clone()
}

fn build_vmm() -> PathBuf {
    build_binary("ism-vmm", "ism-vmm", "ISM_VMM")
}

/// `cargo build -p <package>` with this test executable's profile and target dir; the path of
/// `binary` in that profile dir.
fn build_binary(package: &str, binary: &str, env_override: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<exe>
    let (Some(profile_dir), Some(target_dir)) = (exe.ancestors().nth(2), exe.ancestors().nth(3))
    else {
        panic!("Cannot locate the target dir from {}", exe.display());
    };
    let path = profile_dir.join(binary);
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| if n == "debug" { "dev" } else { n })
        .unwrap_or("dev")
        .to_string();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!(
        "ism-tests: building {package} (profile {profile}) into {}",
        target_dir.display()
    );
    let output = Command::new(cargo)
        .current_dir(&workspace)
        .args(["build", "-p", package, "--profile", &profile])
        .env("CARGO_TARGET_DIR", target_dir)
        .stdin(Stdio::null())
        .output();
    match output {
        Ok(out) if out.status.success() && path.is_file() => path,
        Ok(out) => panic!(
            "Building {package} failed ({}); build it by hand with `cargo build -p {package}` or \
             set {env_override}=/path/to/{binary}. Expected it at {}.\n{}",
            out.status,
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "Cannot run cargo to build {package} ({e}); build it by hand with `cargo build -p \
             {package}` or set {env_override}=/path/to/{binary}"
        ),
    }
}

/// What a finished (or killed) VM left behind.
#[derive(Debug)]
pub struct VmOutcome {
    /// Exit status; `None` if it was killed at the timeout.
    pub status: Option<ExitStatus>,
    /// Serial console (the VMM's stdout).
    pub stdout: String,
    /// The VMM's log and errors.
    pub stderr: String,
    /// Parsed `ISM-TEST` lines.
    pub report: GuestReport,
    /// From spawn to exit (or kill).
    pub elapsed: Duration,
    /// From spawn to the first complete `ISM-TEST` line on the serial console.
    pub first_line: Option<Duration>,
    /// Peak resident set size of the VMM in KiB (wait4 rusage).
    pub peak_rss_kib: u64,
}

impl VmOutcome {
    /// The process exit code, if it exited normally.
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }

    /// Everything a failed assertion should show.
    pub fn describe(&self) -> String {
        format!(
            "status={:?} elapsed={:?}\n--- serial ---\n{}\n--- stderr ---\n{}",
            self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Kills the VMM's process group unless it was reaped.
struct ChildGuard {
    child: Child,
    reaped: bool,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.reaped {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) with the process group we created for this child (it is its own
            // group leader and not yet reaped, so the id is still ours).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// A VM to run: VMM arguments plus a timeout.
pub struct VmRun {
    vmm: Vmm,
    args: Vec<String>,
    timeout: Duration,
}

impl VmRun {
    /// Boot the test guest under ism-vmm with `ism.test=<test>`, 1 vCPU, 128 MiB, serial on
    /// stdout.
    pub fn guest_test(test: &str) -> Self {
        Self::guest_test_on(Vmm::IsmVmm, test)
    }

    /// [`VmRun::guest_test`] under `vmm`.
    pub fn guest_test_on(vmm: Vmm, test: &str) -> Self {
        Self {
            vmm,
            args: vmm.boot_args(&test_guest(), &format!("ism.test={test}")),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Arbitrary ism-vmm arguments.
    pub fn with_args<I: IntoIterator<Item = S>, S: Into<String>>(args: I) -> Self {
        Self {
            vmm: Vmm::IsmVmm,
            args: args.into_iter().map(Into::into).collect(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Append more arguments (a repeatable option may appear several times).
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Replace the value of option `--name` (or append the option).
    pub fn set(mut self, name: &str, value: &str) -> Self {
        let flag = format!("--{name}");
        match self.args.iter().position(|a| *a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.into(),
            _ => {
                self.args.push(flag);
                self.args.push(value.into());
            }
        }
        self
    }

    /// Change the hard timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Run to completion or the timeout (then the VMM is killed and `status` is None).
    pub fn run(&self) -> VmOutcome {
        // Resolve (maybe build) the VMM before the clock starts.
        let vmm = self.vmm.binary();
        let start = Instant::now();
        let child = Command::new(&vmm)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("Failed to start {}: {e}", vmm.display()));
        let mut guard = ChildGuard {
            child,
            reaped: false,
        };
        let pid = guard.child.id() as libc::pid_t;

        let stdout = guard.child.stdout.take().expect("piped");
        let stdout_reader = thread::spawn(move || read_serial(stdout, start));
        let mut stderr = guard.child.stderr.take().expect("piped");
        let stderr_reader = thread::spawn(move || {
            let mut text = Vec::new();
            let _ = stderr.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        });

        let mut status = None;
        let mut peak_rss_kib = 0;
        while start.elapsed() < self.timeout {
            let mut raw = 0;
            // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: wait4 on our own child, with valid pointers to locals.
            let r = unsafe { libc::wait4(pid, &mut raw, libc::WNOHANG, &mut usage) };
            if r == pid {
                guard.reaped = true;
                status = Some(ExitStatus::from_raw(raw));
                peak_rss_kib = usage.ru_maxrss as u64;
                break;
            }
            if r < 0 {
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        let elapsed = start.elapsed();
        // Kill (on timeout) before joining the readers, so their pipes close.
        drop(guard);
        let (stdout, first_line) = stdout_reader.join().unwrap_or_default();
        let stderr = stderr_reader.join().unwrap_or_default();
        VmOutcome {
            status,
            report: GuestReport::parse(&stdout),
            stdout,
            stderr,
            elapsed,
            first_line,
            peak_rss_kib,
        }
    }
}

/// Read the serial console to EOF; also when the first complete report line arrived.
pub fn read_serial(mut stdout: impl Read, start: Instant) -> (String, Option<Duration>) {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    let mut first = None;
    loop {
        match stdout.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                text.extend_from_slice(&buf[..n]);
                if first.is_none() {
                    let so_far = String::from_utf8_lossy(&text);
                    if so_far
                        .find(PREFIX)
                        .is_some_and(|at| so_far[at..].contains('\n'))
                    {
                        first = Some(start.elapsed());
                    }
                }
            }
        }
    }
    (String::from_utf8_lossy(&text).into_owned(), first)
}
