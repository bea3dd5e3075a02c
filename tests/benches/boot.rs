// SPDX-License-Identifier: Apache-2.0
//! Boot benchmark: time from spawning the VMM to the test guest's first serial line, total
//! time to ACPI power-off, and the VMM's peak RSS, for a 128 MiB guest, under ism-vmm and
//! patched cloud-hypervisor, each without and with an `--ism` device (embedded pool). Boots
//! of all four are interleaved in one run; prints the medians, ratios and what `--ism` adds,
//! and writes docs/benchmarks.md. Asserts nothing about time.
//!
//! Run with `cargo bench -p ism-tests --bench boot` (builds release ism-vmm on first use;
//! `ISM_VMM` overrides). cloud-hypervisor is found like the tests find it
//! (`ism_tests::cloud_hypervisor_dir()`: `ISM_CLOUD_HYPERVISOR_DIR`, else the cached build of
//! `resources/cloud-hypervisor.sh`); `ISM_CLOUD_HYPERVISOR` names a binary to use instead
//! (without `--ism` support its `--ism` rows are left out). Without cloud-hypervisor the
//! ism-vmm rows still run. `ISM_BENCH_RUNS` changes the number of runs (default 51).

mod common;

use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ism_tests::vm::read_serial;
use ism_tests::{GuestReport, Vmm, kvm_available, test_guest};

use common::CpuTimes;
use common::paths::version;

/// Goals from the project brief.
const FIRST_LINE_GOAL: Duration = Duration::from_millis(50);
const RSS_GOAL_KIB: u64 = 20 * 1024;
/// Goal against cloud-hypervisor: at most this many times its first line and power-off time.
const VS_CLOUD_HYPERVISOR_GOAL: f64 = 1.5;
/// Goals for what `--ism` may add to cloud-hypervisor's boot (first serial line) and peak RSS.
const ISM_BOOT_GOAL: Duration = Duration::from_millis(1);
const ISM_RSS_GOAL_KIB: i64 = 2 * 1024;
/// The device of the `--ism` rows: the window the ism benchmark's guests use, no `pool=` (the
/// pool embedded in the VMM).
const ISM_ARGS: [&str; 2] = ["--ism", "id=ism0,size=64M,chunk_size=4K"];
/// A VM that runs longer than this is killed and the benchmark fails.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A VMM configuration under test: a binary, with or without the `--ism` device.
struct Variant {
    vmm: Vmm,
    binary: PathBuf,
    ism: bool,
}

impl Variant {
    /// The command line of `VmRun::guest_test("boot")` (tests/src/vm.rs), plus `--console
    /// off`, which cloud-hypervisor needs next to `--serial tty` and ism-vmm accepts, plus
    /// the `--ism` device.
    fn args(&self, cpus: &str) -> Vec<String> {
        let mut args: Vec<String> = [
            "--kernel",
            &test_guest().display().to_string(),
            "--cmdline",
            "ism.test=boot",
            "--cpus",
            cpus,
            "--memory",
            "size=128M",
            "--serial",
            "tty",
            "--console",
            "off",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.ism {
            args.extend(ISM_ARGS.iter().map(|s| s.to_string()));
        }
        args
    }
}

/// One boot: the same three figures for every VMM.
#[derive(Clone, Copy)]
struct Sample {
    first_line: Duration,
    total: Duration,
    rss_kib: u64,
}

/// Medians over the runs of one variant in one configuration, and the runs themselves (in
/// round order, for paired differences).
struct Row {
    config: &'static str,
    vmm: Vmm,
    ism: bool,
    first_line: Duration,
    total: Duration,
    rss_kib: u64,
    samples: Vec<Sample>,
}

impl Row {
    fn name(&self) -> String {
        format!(
            "{}{}",
            self.vmm.name(),
            if self.ism { " --ism" } else { "" }
        )
    }
}

fn median<T: Ord + Copy>(mut values: Vec<T>) -> T {
    values.sort();
    values[values.len() / 2]
}

/// Boot the test guest once under `variant`. The same runner serves every VMM: the end is
/// taken when the process exits (waitid, not polling), and the peak RSS from wait4.
fn run_once(variant: &Variant, cpus: &str) -> Result<Sample, String> {
    let binary = &variant.binary;
    let args = variant.args(cpus);
    let start = Instant::now();
    let mut child = Command::new(binary)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
    let pid = child.id() as libc::pid_t;
    let stdout = child.stdout.take().expect("piped");
    let serial = thread::spawn(move || read_serial(stdout, start));
    let mut stderr = child.stderr.take().expect("piped");
    let log = thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    let (done, done_rx) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(TIMEOUT) {
            // SAFETY: kill(2) on the process group the child leads; it is not reaped yet
            // (the main thread reaps only after this thread has finished), so the id is
            // still ours.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
    });
    // Wait for the exit without reaping, so the watchdog can never signal a recycled id.
    loop {
        // SAFETY: an all-zero siginfo_t is a valid value for waitid to overwrite.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with a valid pointer to a local.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            break;
        }
    }
    let total = start.elapsed();
    let _ = done.send(());
    let _ = watchdog.join();
    let mut raw = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own exited child, with valid pointers to locals.
    unsafe { libc::wait4(pid, &mut raw, 0, &mut usage) };
    let (stdout, first_line) = serial.join().unwrap_or_default();
    let stderr = log.join().unwrap_or_default();
    let passed = GuestReport::parse(&stdout).passed();
    let exited_0 = libc::WIFEXITED(raw) && libc::WEXITSTATUS(raw) == 0;
    match first_line {
        Some(first_line) if passed && exited_0 => Ok(Sample {
            first_line,
            total,
            rss_kib: usage.ru_maxrss as u64,
        }),
        _ => Err(format!(
            "{} {}: wait status {raw:#x}, passed {passed}\n--- serial ---\n{stdout}\n--- stderr ---\n{stderr}",
            binary.display(),
            args.join(" ")
        )),
    }
}

/// `runs` boots per variant, interleaved (the order reverses every other round), after one
/// unmeasured warm-up boot each (page cache: binaries, guest image).
fn measure(config: &'static str, cpus: &str, variants: &[Variant], runs: usize) -> Vec<Row> {
    let boot = |variant: &Variant| {
        run_once(variant, cpus).unwrap_or_else(|e| panic!("benchmark boot failed: {e}"))
    };
    for variant in variants {
        boot(variant);
    }
    let mut samples: Vec<Vec<Sample>> = variants.iter().map(|_| Vec::new()).collect();
    for round in 0..runs {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            samples[i].push(boot(&variants[i]));
        }
    }
    variants
        .iter()
        .zip(samples)
        .map(|(variant, s)| Row {
            config,
            vmm: variant.vmm,
            ism: variant.ism,
            first_line: median(s.iter().map(|x| x.first_line).collect()),
            total: median(s.iter().map(|x| x.total).collect()),
            rss_kib: median(s.iter().map(|x| x.rss_kib).collect()),
            samples: s,
        })
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn goal(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

/// What `--ism` adds to one VMM in one configuration: differences of the medians (with, minus
/// without), and the median of the differences of boots in the same round.
struct IsmCost {
    first_line_ms: f64,
    total_ms: f64,
    rss_kib: i64,
    paired_first_line_ms: f64,
    paired_rss_kib: i64,
}

fn ism_cost(without: &Row, with: &Row) -> IsmCost {
    let ms_of = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut paired_first: Vec<f64> = with
        .samples
        .iter()
        .zip(&without.samples)
        .map(|(w, o)| ms_of(w.first_line) - ms_of(o.first_line))
        .collect();
    paired_first.sort_by(f64::total_cmp);
    let paired_rss = median(
        with.samples
            .iter()
            .zip(&without.samples)
            .map(|(w, o)| w.rss_kib as i64 - o.rss_kib as i64)
            .collect(),
    );
    IsmCost {
        first_line_ms: ms_of(with.first_line) - ms_of(without.first_line),
        total_ms: ms_of(with.total) - ms_of(without.total),
        rss_kib: with.rss_kib as i64 - without.rss_kib as i64,
        paired_first_line_ms: paired_first[paired_first.len() / 2],
        paired_rss_kib: paired_rss,
    }
}

fn find<'a>(rows: &'a [Row], config: &str, vmm: Vmm, ism: bool) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.config == config && r.vmm == vmm && r.ism == ism)
}

/// What `--ism` adds to `vmm` in each configuration that has both rows.
fn ism_costs(rows: &[Row], configs: &[&'static str], vmm: Vmm) -> Vec<(&'static str, IsmCost)> {
    configs
        .iter()
        .filter_map(|c| {
            Some((
                *c,
                ism_cost(find(rows, c, vmm, false)?, find(rows, c, vmm, true)?),
            ))
        })
        .collect()
}

/// Where `--ism`'s boot time goes, from the eventfd probes and the measured costs.
fn ism_cost_text(
    rows: &[Row],
    configs: &[&'static str],
    single: Option<(f64, f64)>,
    threaded: Option<(f64, f64)>,
) -> String {
    let (Some((create, close)), Some((create_threaded, _))) = (single, threaded) else {
        return String::new();
    };
    let worst = |vmm| {
        ism_costs(rows, configs, vmm)
            .iter()
            .map(|(_, k)| k.paired_first_line_ms)
            .fold(f64::NAN, f64::max)
    };
    let (ism_vmm, ch) = (worst(Vmm::IsmVmm), worst(Vmm::CloudHypervisor));
    let mut text = format!(
        "Where `--ism`'s boot time goes: the device gets {ISM_VECTORS} MSI-X vectors (one per \
         4 KiB chunk plus two, at most 2048), and each VMM creates an eventfd for every vector \
         (its irqfd) while it builds the device, before the guest runs, and closes them at \
         exit. Creating {ISM_VECTORS} eventfds in a freshly forked process takes {create:.1} ms \
         here (closing them {close:.1} ms); in a process with a second thread it takes \
         {create_threaded:.1} ms, because each time the fd table doubles the kernel waits \
         for an RCU grace period (expand_fdtable calls synchronize_rcu when threads share the \
         table)."
    );
    if ism_vmm > 2.0 * create + 1.0 {
        let _ = write!(
            text,
            " ism-vmm (up to {ism_vmm:+.1} ms) pays those grace periods: it builds its devices \
             after starting its signal-handler thread. cloud-hypervisor grows its fd table to \
             4096 entries at start, while still single-threaded (`expand_fdtable()` in its \
             main.rs), and pays only for the eventfds themselves. Growing the table first, or \
             creating a vector's irqfd only when the guest enables MSI-X or binds the vector, \
             would take this off ism-vmm's boot path."
        );
    }
    let goal_ms = ISM_BOOT_GOAL.as_secs_f64() * 1000.0;
    if ch >= goal_ms && create >= goal_ms / 2.0 {
        let _ = write!(
            text,
            " For cloud-hypervisor (up to {ch:+.1} ms) the eventfds alone are about {create:.1} \
             ms, so the {} ms goal needs the irqfds created lazily or fewer vectors per device.",
            ISM_BOOT_GOAL.as_millis()
        );
    } else if ch >= goal_ms {
        let _ = write!(
            text,
            " For cloud-hypervisor (up to {ch:+.1} ms) the eventfds are only {create:.1} ms of it."
        );
    }
    text.push_str("\n\n");
    text
}

/// The table of every variant's medians.
fn all_rows_table(rows: &[Row], runs: usize) -> String {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| configuration | VMM | first serial line (ms) | power-off exit (ms) | peak RSS (MiB) | runs |"
    );
    let _ = writeln!(table, "|---|---|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {runs} |",
            r.config,
            r.name(),
            ms(r.first_line),
            ms(r.total),
            mib(r.rss_kib),
        );
    }
    table
}

/// Side by side with cloud-hypervisor, per configuration and measure: both VMMs without and
/// with `--ism`, their ratios, and what `--ism` adds to each.
fn comparison_table(rows: &[Row], configs: &[&'static str]) -> String {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| configuration | measure | ism-vmm | cloud-hypervisor | ism-vmm ÷ cloud-hypervisor | ism-vmm --ism | cloud-hypervisor --ism | ism-vmm --ism ÷ cloud-hypervisor --ism | --ism adds to cloud-hypervisor | --ism adds to ism-vmm |"
    );
    let _ = writeln!(table, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &config in configs {
        let get = |vmm, ism| find(rows, config, vmm, ism);
        let (Some(iv), Some(ch)) = (get(Vmm::IsmVmm, false), get(Vmm::CloudHypervisor, false))
        else {
            continue;
        };
        let iv_ism = get(Vmm::IsmVmm, true);
        let ch_ism = get(Vmm::CloudHypervisor, true);
        type Measure = fn(&Row) -> f64;
        let measures: [(&str, Measure, &str); 3] = [
            (
                "first serial line (ms)",
                |r| r.first_line.as_secs_f64() * 1000.0,
                "ms",
            ),
            (
                "power-off exit (ms)",
                |r| r.total.as_secs_f64() * 1000.0,
                "ms",
            ),
            ("peak RSS (MiB)", |r| r.rss_kib as f64 / 1024.0, "MiB"),
        ];
        for (measure, value, unit) in measures {
            let cell =
                |r: Option<&Row>| r.map_or("n/a".to_string(), |r| format!("{:.1}", value(r)));
            let ratio = |a: Option<&Row>, b: Option<&Row>| match (a, b) {
                (Some(a), Some(b)) => format!("{:.2}x", value(a) / value(b)),
                _ => "n/a".into(),
            };
            let adds = |with: Option<&Row>, without: &Row| {
                with.map_or("n/a".to_string(), |w| {
                    format!("{:+.1} {unit}", value(w) - value(without))
                })
            };
            let _ = writeln!(
                table,
                "| {config} | {measure} | {} | {} | {} | {} | {} | {} | {} | {} |",
                cell(Some(iv)),
                cell(Some(ch)),
                ratio(Some(iv), Some(ch)),
                cell(iv_ism),
                cell(ch_ism),
                ratio(iv_ism, ch_ism),
                adds(ch_ism, ch),
                adds(iv_ism, iv),
            );
        }
    }
    table
}

/// This process's own peak RSS in KiB (VmHWM). A child's ru_maxrss starts from the high-water
/// mark of the memory of the process that spawned it (Linux carries it across exec), so no
/// VMM reading can be below this. (Not getrusage: that would include what cargo's own peak
/// left in this process.)
fn own_peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// MSI-X vectors of the `--ism` rows' device: one per chunk plus two, at most 2048 (64 MiB
/// in 4 KiB chunks: 2048). Both VMMs create an eventfd (the vector's irqfd) for each.
const ISM_VECTORS: usize = 2048;

/// Milliseconds to create `n` eventfds and then to close them, in a freshly forked process
/// (a small fd table, as a VMM starts with), with a second thread alive when `threaded`: the
/// fd table then grows under an RCU grace period (the kernel's expand_fdtable waits in
/// synchronize_rcu when threads share the table). Called while this process has one thread.
fn eventfd_probe(n: usize, threaded: bool) -> Option<(f64, f64)> {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) into a local array of two ints.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: this process is single-threaded here, so the child may run ordinary code.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        if threaded {
            thread::spawn(|| {
                loop {
                    thread::park();
                }
            });
        }
        let start = Instant::now();
        let made: Vec<i32> = (0..n)
            // SAFETY: plain syscall; the result is checked below.
            .map(|_| unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) })
            .collect();
        let created = start.elapsed().as_secs_f64() * 1000.0;
        let start = Instant::now();
        for fd in &made {
            // SAFETY: closing the eventfds made above, once each.
            unsafe { libc::close(*fd) };
        }
        let closed = start.elapsed().as_secs_f64() * 1000.0;
        let ok = made.iter().all(|fd| *fd >= 0);
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&(if ok { created } else { -1.0 }).to_le_bytes());
        out[8..].copy_from_slice(&closed.to_le_bytes());
        // SAFETY: writes 16 bytes from a local to the pipe, then leaves the child without
        // running the parent's destructors.
        unsafe {
            libc::write(fds[1], out.as_ptr().cast(), out.len());
            libc::_exit(0);
        }
    }
    // SAFETY: the parent's copy of the write end, closed once.
    unsafe { libc::close(fds[1]) };
    let mut buf = [0u8; 16];
    // SAFETY: reads up to 16 bytes into a local, then closes the read end and reaps the
    // child (pid < 0: fork failed, nothing to reap).
    let n_read = unsafe {
        let n_read = libc::read(fds[0], buf.as_mut_ptr().cast(), buf.len());
        libc::close(fds[0]);
        if pid > 0 {
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        n_read
    };
    if n_read != 16 {
        return None;
    }
    let created = f64::from_le_bytes(buf[..8].try_into().ok()?);
    let closed = f64::from_le_bytes(buf[8..].try_into().ok()?);
    (created >= 0.0).then_some((created, closed))
}

/// Median (create, close) ms of `runs` [`eventfd_probe`]s.
fn eventfd_cost(threaded: bool, runs: usize) -> Option<(f64, f64)> {
    let probes: Vec<(f64, f64)> = (0..runs)
        .filter_map(|_| eventfd_probe(ISM_VECTORS, threaded))
        .collect();
    if probes.is_empty() {
        return None;
    }
    let mid = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Some((
        mid(probes.iter().map(|p| p.0).collect()),
        mid(probes.iter().map(|p| p.1).collect()),
    ))
}

/// The cloud-hypervisor binary: `ISM_CLOUD_HYPERVISOR` if set, else the patched build the tests
/// use. The error says why there is none.
fn cloud_hypervisor() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("ISM_CLOUD_HYPERVISOR").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "ISM_CLOUD_HYPERVISOR={} is no file",
                path.display()
            ))
        };
    }
    Vmm::CloudHypervisor.available()?;
    Ok(Vmm::CloudHypervisor.binary())
}

/// Whether `binary --help` lists `--ism` (the patched build does, upstream does not).
fn has_ism_option(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--help")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("--ism"))
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would too. Only run for real
    // when asked to benchmark.
    if !std::env::args().any(|a| a == "--bench") {
        println!("boot benchmark: run with `cargo bench -p ism-tests`");
        return;
    }
    if !kvm_available() {
        println!("SKIPPED: /dev/kvm missing or not accessible; the boot benchmark needs KVM");
        return;
    }
    let runs = std::env::var("ISM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or(51);
    // While this process has one thread: what the device's eventfds cost a VMM.
    let eventfds_single = eventfd_cost(false, 5);
    let eventfds_threaded = eventfd_cost(true, 5);
    let vmm = Vmm::IsmVmm.binary();
    let mut variants = vec![
        Variant {
            vmm: Vmm::IsmVmm,
            binary: vmm.clone(),
            ism: false,
        },
        Variant {
            vmm: Vmm::IsmVmm,
            binary: vmm.clone(),
            ism: true,
        },
    ];
    // Why cloud-hypervisor rows are missing, for the document.
    let mut missing = Vec::new();
    let ch = match cloud_hypervisor() {
        Ok(ch) => {
            println!("comparing with {} ({})", ch.display(), version(&ch));
            variants.push(Variant {
                vmm: Vmm::CloudHypervisor,
                binary: ch.clone(),
                ism: false,
            });
            if has_ism_option(&ch) {
                variants.push(Variant {
                    vmm: Vmm::CloudHypervisor,
                    binary: ch.clone(),
                    ism: true,
                });
            } else {
                let why = format!(
                    "{} has no --ism option (not the patched build)",
                    ch.display()
                );
                println!("SKIPPED: the cloud-hypervisor --ism rows: {why}");
                missing.push(why);
            }
            Some(ch)
        }
        Err(why) => {
            println!(
                "SKIPPED: NO CLOUD-HYPERVISOR ROWS in the boot benchmark: {why} (only ism-vmm runs)"
            );
            missing.push(why);
            None
        }
    };
    // Other work on the machine skews timings; say how busy it was.
    let load_before = common::load_average();
    let cpu_start = CpuTimes::now();
    let configs = [
        ("1 vCPU, 128 MiB", "boot=1"),
        ("2 vCPUs, 128 MiB", "boot=2"),
    ];
    let rows: Vec<Row> = configs
        .into_iter()
        .flat_map(|(config, cpus)| measure(config, cpus, &variants, runs))
        .collect();
    let load_after = common::load_average();
    let others = CpuTimes::others_since(cpu_start);
    let config_names: Vec<&'static str> = configs.iter().map(|(c, _)| *c).collect();

    let table = all_rows_table(&rows, runs);
    println!("{table}");
    // The brief's goals for ism-vmm, without and with the device.
    let verdicts = |check: &dyn Fn(&Row) -> bool| {
        [false, true]
            .map(|ism| {
                let mine = rows.iter().filter(|r| r.vmm == Vmm::IsmVmm && r.ism == ism);
                format!(
                    "ism-vmm{}: {}",
                    if ism { " --ism" } else { "" },
                    goal(mine.into_iter().all(check))
                )
            })
            .join(", ")
    };
    let first_ok = verdicts(&|r| r.first_line < FIRST_LINE_GOAL);
    let rss_ok = verdicts(&|r| r.rss_kib < RSS_GOAL_KIB);
    println!(
        "goals: first line < {} ms ({first_ok}); peak RSS < {} MiB ({rss_ok})",
        FIRST_LINE_GOAL.as_millis(),
        RSS_GOAL_KIB / 1024,
    );
    let harness_rss = own_peak_rss_kib();
    println!(
        "benchmark process peak RSS {} MiB (a floor for every RSS reading)",
        mib(harness_rss)
    );
    println!("load average before {load_before}, after {load_after}; {others}");

    let versus = match &ch {
        None => format!(
            "### Against cloud-hypervisor\n\n\
             NOT MEASURED in this run: {}.\n\n",
            missing.join("; ")
        ),
        Some(ch) => {
            let table = comparison_table(&rows, &config_names);
            println!("{table}");
            let mut goals = String::new();
            // ism-vmm against cloud-hypervisor, without and with the device.
            for ism in [false, true] {
                let pairs: Vec<(&Row, &Row)> = config_names
                    .iter()
                    .filter_map(|c| {
                        Some((
                            find(&rows, c, Vmm::IsmVmm, ism)?,
                            find(&rows, c, Vmm::CloudHypervisor, ism)?,
                        ))
                    })
                    .collect();
                if pairs.is_empty() {
                    continue;
                }
                let worst =
                    |f: fn(&Row) -> f64| pairs.iter().map(|(a, b)| f(a) / f(b)).fold(0.0, f64::max);
                let first = worst(|r| r.first_line.as_secs_f64());
                let total = worst(|r| r.total.as_secs_f64());
                let rss = worst(|r| r.rss_kib as f64);
                let met = first <= VS_CLOUD_HYPERVISOR_GOAL
                    && total <= VS_CLOUD_HYPERVISOR_GOAL
                    && rss < 1.0;
                let _ = writeln!(
                    goals,
                    "- ism-vmm{0} within {VS_CLOUD_HYPERVISOR_GOAL}x of cloud-hypervisor{0}'s first \
                     serial line and power-off time, with a lower peak RSS: worst ratios {first:.2}x, \
                     {total:.2}x, {rss:.2}x, {1}",
                    if ism { " --ism" } else { "" },
                    goal(met)
                );
            }
            // What --ism adds to cloud-hypervisor (the goal), and to ism-vmm (for comparison).
            for vmm in [Vmm::CloudHypervisor, Vmm::IsmVmm] {
                let costs = ism_costs(&rows, &config_names, vmm);
                if costs.is_empty() {
                    continue;
                }
                let each = costs
                    .iter()
                    .map(|(c, k)| {
                        format!(
                            "{c}: {:+.2} ms to the first serial line (difference of the medians \
                             {:+.2} ms; power-off exit {:+.2} ms), {:+.2} MiB peak RSS \
                             (difference of the medians {:+.2} MiB)",
                            k.paired_first_line_ms,
                            k.first_line_ms,
                            k.total_ms,
                            k.paired_rss_kib as f64 / 1024.0,
                            k.rss_kib as f64 / 1024.0,
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                if vmm == Vmm::CloudHypervisor {
                    let boot_met = costs.iter().all(|(_, k)| {
                        k.paired_first_line_ms < ISM_BOOT_GOAL.as_secs_f64() * 1000.0
                    });
                    let rss_met = costs
                        .iter()
                        .all(|(_, k)| k.paired_rss_kib < ISM_RSS_GOAL_KIB);
                    let _ = writeln!(
                        goals,
                        "- `--ism` adds < {} ms to cloud-hypervisor's boot (first serial line) and \
                         < {} MiB to its peak RSS (median of the same-round differences): \
                         {each}; boot {}, RSS {}",
                        ISM_BOOT_GOAL.as_millis(),
                        ISM_RSS_GOAL_KIB / 1024,
                        goal(boot_met),
                        goal(rss_met)
                    );
                } else {
                    let _ = writeln!(
                        goals,
                        "- for comparison, what `--ism` adds to ism-vmm: {each}"
                    );
                }
            }
            print!("{goals}");
            format!(
                "### Against cloud-hypervisor\n\n\
                 The same guest and options under `{}` ({}), the patched build with the \
                 virtio-ism device; its boots interleaved with ism-vmm's in the same run (the \
                 order of the four reverses every other round), same runner. Ratios and \
                 differences in the table are of the medians. The `--ism` goal is judged on \
                 same-round differences (a boot with `--ism` minus the boot without it made \
                 right next to it), which cancel most of the drift of the machine's load; their \
                 median is given first, the difference of the medians in brackets.\n\n\
                 {table}\n\
                 Goals:\n\n{goals}\n{}",
                common::paths::shown_path(ch),
                version(ch),
                missing
                    .iter()
                    .map(|why| format!("NOT MEASURED in this run: the `--ism` rows ({why}).\n\n"))
                    .collect::<String>(),
            )
        }
    };

    let doc = format!(
        "# Benchmarks\n\n\
         ## Boot of the test guest\n\n\
         Generated by `cargo bench -p ism-tests --bench boot` (tests/benches/boot.rs); do not \
         edit by hand.\n\n\
         What is measured: `<VMM> --kernel <test guest> --cmdline ism.test=boot --cpus <n> \
         --memory size=128M --serial tty --console off`, and the same with `{}` (the \
         window of the ism benchmark's guests, no `pool=`: the pool embedded in the VMM, \
         default `pool_size` 1 GiB), under ism-vmm (`{}`) and, below, patched \
         cloud-hypervisor; from spawning the process to the guest's first complete \
         `ISM-TEST` line on the serial console, and to the process exiting after the guest's \
         ACPI power-off. The `boot` guest does not touch the ism device, so the `--ism` rows \
         show what creating the device, its pool and its BAR costs the VMM. Peak RSS is the \
         VMM's `ru_maxrss` from wait4(2) (it cannot read below the benchmark process's own \
         peak, {} MiB here, which Linux carries into a spawned child). Median of {runs} runs \
         of each after one warm-up run, all interleaved.\n\n\
         Load ({} CPUs): load average (1/5/15 min) before: {load_before}, after: \
         {load_after}; {others}. Boot times move with the load; the interleaving keeps the \
         comparisons fair.\n\n\
         {table}\n\
         Goals: first serial line < {} ms ({first_ok}), peak RSS < {} MiB ({rss_ok}).\n\n\
         {versus}\
         {why}\
         Context: on these machines KVM is PVM, so guest ring 0 runs in KVM's instruction \
         emulator (about 1000x native). The test guest keeps ring 0 to a few hundred \
         instructions (static page tables, GDT/TSS/IDT load, drop to ring 3) and does its work \
         in ring 3, which runs natively; every serial byte is still a VM exit to the VMM. \
         Where boot time went and what changed it: docs/vmm.md, \"Boot time\".\n",
        ISM_ARGS.join(" "),
        common::paths::shown_path(&vmm),
        mib(harness_rss),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        FIRST_LINE_GOAL.as_millis(),
        RSS_GOAL_KIB / 1024,
        why = ism_cost_text(&rows, &config_names, eventfds_single, eventfds_threaded),
    );
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    // Keep the sections other benchmarks (tests/benches/ism.rs) wrote after this one.
    let others = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find("\n## Inter-VM").map(|i| old[i..].to_string()))
        .unwrap_or_default();
    let doc = format!("{}\n{others}", doc.trim_end());
    match std::fs::write(&path, doc) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => println!("could not write {}: {e}", path.display()),
    }
}
