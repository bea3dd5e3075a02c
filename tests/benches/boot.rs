// SPDX-License-Identifier: Apache-2.0
//! Boot benchmark: time from spawning ism-vmm to the test guest's first serial line, total
//! time to ACPI power-off, and the VMM's peak RSS, for a 128 MiB guest. Prints the median of
//! several runs per configuration and writes docs/benchmarks.md. Asserts nothing about time.
//!
//! Run with `cargo build --release -p ism-vmm && cargo bench -p ism-tests --bench boot`. Set
//! `ISM_BENCH_RUNS` to change the number of runs (default 9). Set `ISM_CLOUD_HYPERVISOR` to
//! a cloud-hypervisor binary to boot the same guest with the same options under it too, in
//! runs interleaved with ism-vmm's, and add a comparison table (ratio of the medians).

use std::fmt::Write as _;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ism_tests::report::PREFIX;
use ism_tests::{GuestReport, kvm_available, test_guest, vmm_binary};

/// Goals from the project brief.
const FIRST_LINE_GOAL: Duration = Duration::from_millis(50);
const RSS_GOAL_KIB: u64 = 20 * 1024;
/// Goal against cloud-hypervisor: at most this many times its first line and power-off time.
const VS_CLOUD_HYPERVISOR_GOAL: f64 = 1.5;
/// A VM that runs longer than this is killed and the benchmark fails.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A VMM binary under test.
struct Vmm {
    name: &'static str,
    binary: PathBuf,
}

/// One boot: the same three figures for either VMM.
#[derive(Clone, Copy)]
struct Sample {
    first_line: Duration,
    total: Duration,
    rss_kib: u64,
}

/// Medians over the runs of one VMM in one configuration.
struct Row {
    config: &'static str,
    vmm: &'static str,
    first_line: Duration,
    total: Duration,
    rss_kib: u64,
    runs: usize,
}

fn median<T: Ord + Copy>(mut values: Vec<T>) -> T {
    values.sort();
    values[values.len() / 2]
}

/// The command line of `VmRun::guest_test("boot")` (tests/src/vm.rs), plus `--console off`,
/// which cloud-hypervisor needs next to `--serial tty` and ism-vmm accepts.
fn boot_args(cpus: &str) -> Vec<String> {
    [
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
    .collect()
}

/// Read the serial console to EOF; when the first complete report line arrived.
fn read_serial(mut stdout: impl Read, start: Instant) -> (String, Option<Duration>) {
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

/// Boot the test guest once under `binary`. The same runner serves both VMMs: the end is
/// taken when the process exits (waitid, not polling), and the peak RSS from wait4.
fn run_once(binary: &Path, cpus: &str) -> Result<Sample, String> {
    let start = Instant::now();
    let mut child = Command::new(binary)
        .args(boot_args(cpus))
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
            boot_args(cpus).join(" ")
        )),
    }
}

/// `runs` boots per VMM, interleaved (the order alternates between rounds), after one
/// unmeasured warm-up boot each (page cache: binaries, guest image).
fn measure(config: &'static str, cpus: &str, vmms: &[Vmm], runs: usize) -> Vec<Row> {
    let boot = |vmm: &Vmm| {
        run_once(&vmm.binary, cpus).unwrap_or_else(|e| panic!("benchmark boot failed: {e}"))
    };
    for vmm in vmms {
        boot(vmm);
    }
    let mut samples: Vec<Vec<Sample>> = vmms.iter().map(|_| Vec::new()).collect();
    for round in 0..runs {
        let mut order: Vec<usize> = (0..vmms.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            samples[i].push(boot(&vmms[i]));
        }
    }
    vmms.iter()
        .zip(samples)
        .map(|(vmm, s)| Row {
            config,
            vmm: vmm.name,
            first_line: median(s.iter().map(|x| x.first_line).collect()),
            total: median(s.iter().map(|x| x.total).collect()),
            rss_kib: median(s.iter().map(|x| x.rss_kib).collect()),
            runs,
        })
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// The comparison table; and whether ism-vmm met the goal against cloud-hypervisor in every
/// configuration.
fn comparison(rows: &[Row]) -> (String, bool) {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| configuration | measure | ism-vmm | cloud-hypervisor | ism-vmm ÷ cloud-hypervisor |"
    );
    let _ = writeln!(table, "|---|---|---:|---:|---:|");
    let mut met = true;
    for pair in rows.chunks(2) {
        let [ism, ch] = pair else { continue };
        let ratio = |a: f64, b: f64| a / b;
        let first = ratio(ism.first_line.as_secs_f64(), ch.first_line.as_secs_f64());
        let total = ratio(ism.total.as_secs_f64(), ch.total.as_secs_f64());
        let rss = ratio(ism.rss_kib as f64, ch.rss_kib as f64);
        met &= first <= VS_CLOUD_HYPERVISOR_GOAL && total <= VS_CLOUD_HYPERVISOR_GOAL && rss < 1.0;
        for (measure, a, b, r) in [
            (
                "first serial line (ms)",
                ms(ism.first_line),
                ms(ch.first_line),
                first,
            ),
            ("power-off exit (ms)", ms(ism.total), ms(ch.total), total),
            ("peak RSS (MiB)", mib(ism.rss_kib), mib(ch.rss_kib), rss),
        ] {
            let _ = writeln!(
                table,
                "| {} | {measure} | {a} | {b} | {r:.2}x |",
                ism.config
            );
        }
    }
    (table, met)
}

/// First line of `binary --version`, or "version unknown".
fn version(binary: &Path) -> String {
    Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "version unknown".into())
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
        .unwrap_or(9);
    let vmm = vmm_binary();
    let mut vmms = vec![Vmm {
        name: "ism-vmm",
        binary: vmm.clone(),
    }];
    let cloud_hypervisor = std::env::var_os("ISM_CLOUD_HYPERVISOR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from);
    if let Some(ch) = &cloud_hypervisor {
        println!("comparing with {} ({})", ch.display(), version(ch));
        vmms.push(Vmm {
            name: "cloud-hypervisor",
            binary: ch.clone(),
        });
    }
    // Other work on the machine skews timings; say how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let rows: Vec<Row> = [
        ("1 vCPU, 128 MiB", "boot=1"),
        ("2 vCPUs, 128 MiB", "boot=2"),
    ]
    .into_iter()
    .flat_map(|(config, cpus)| measure(config, cpus, &vmms, runs))
    .collect();
    let ism_rows: Vec<&Row> = rows.iter().filter(|r| r.vmm == "ism-vmm").collect();

    let mut table = String::new();
    let _ = writeln!(
        table,
        "| configuration | first serial line (ms) | power-off exit (ms) | peak RSS (MiB) | runs |"
    );
    let _ = writeln!(table, "|---|---:|---:|---:|---:|");
    for r in &ism_rows {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} |",
            r.config,
            ms(r.first_line),
            ms(r.total),
            mib(r.rss_kib),
            r.runs
        );
    }
    println!("{table}");
    let first_ok = ism_rows.iter().all(|r| r.first_line < FIRST_LINE_GOAL);
    let rss_ok = ism_rows.iter().all(|r| r.rss_kib < RSS_GOAL_KIB);
    println!(
        "goals: first line < {} ms: {}; peak RSS < {} MiB: {}",
        FIRST_LINE_GOAL.as_millis(),
        if first_ok { "met" } else { "MISSED" },
        RSS_GOAL_KIB / 1024,
        if rss_ok { "met" } else { "MISSED" }
    );
    let harness_rss = own_peak_rss_kib();
    println!(
        "benchmark process peak RSS {} MiB (a floor for every RSS reading)",
        mib(harness_rss)
    );

    let versus = cloud_hypervisor.as_ref().map(|ch| {
        let (table, met) = comparison(&rows);
        println!("{table}");
        println!(
            "goal vs cloud-hypervisor: first line and power-off within {VS_CLOUD_HYPERVISOR_GOAL}x, peak RSS lower: {}",
            if met { "met" } else { "MISSED" }
        );
        format!(
            "### Against cloud-hypervisor\n\n\
             The same guest and options under `{}` ({}), each boot interleaved with an \
             ism-vmm boot (the order alternates), same runner; ratios are of the medians.\n\n\
             {table}\n\
             Goal: within {VS_CLOUD_HYPERVISOR_GOAL}x of cloud-hypervisor's first serial line \
             and power-off time, with a lower peak RSS ({}).\n\n",
            ch.display(),
            version(ch),
            if met { "met" } else { "missed" }
        )
    });

    let doc = format!(
        "# Benchmarks\n\n\
         ## Boot of the test guest\n\n\
         Generated by `cargo bench -p ism-tests --bench boot` (tests/benches/boot.rs); do not \
         edit by hand. Set `ISM_CLOUD_HYPERVISOR` to a cloud-hypervisor binary for the \
         comparison.\n\n\
         What is measured: `ism-vmm --kernel <test guest> --cmdline ism.test=boot --cpus <n> \
         --memory size=128M --serial tty --console off`, from spawning the process to the \
         guest's first complete `ISM-TEST` line on the serial console, and to the process \
         exiting after the guest's ACPI power-off; peak RSS is the VMM's `ru_maxrss` from \
         wait4(2) (it cannot read below the benchmark process's own peak, {} MiB here, which \
         Linux carries into a spawned child). Median of {runs} runs after one warm-up run, \
         with `{}`; 1-minute load average at the start: {load} (on {} CPUs).\n\n\
         {table}\n\
         Goals: first serial line < {} ms ({}), peak RSS < {} MiB ({}).\n\n\
         {}\
         Context: on these machines KVM is PVM, so guest ring 0 runs in KVM's instruction \
         emulator (about 1000x native). The test guest keeps ring 0 to a few hundred \
         instructions (static page tables, GDT/TSS/IDT load, drop to ring 3) and does its work \
         in ring 3, which runs natively; every serial byte is still a VM exit to the VMM. \
         Where boot time went and what changed it: docs/vmm.md, \"Boot time\".\n",
        mib(harness_rss),
        vmm.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        FIRST_LINE_GOAL.as_millis(),
        if first_ok { "met" } else { "missed" },
        RSS_GOAL_KIB / 1024,
        if rss_ok { "met" } else { "missed" },
        versus.unwrap_or_default(),
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
