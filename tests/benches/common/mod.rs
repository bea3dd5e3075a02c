// SPDX-License-Identifier: Apache-2.0
//! What else ran on the machine while a benchmark ran: load averages, and the CPU time the
//! rest of the machine used (everything but this benchmark and the children it reaped) over
//! the run, from /proc/stat and getrusage(2). Shared by the boot and ism benchmarks (a
//! directory, so cargo does not take it for a benchmark of its own).

pub mod paths;

/// Load averages (1/5/15 min) as /proc/loadavg prints them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// A snapshot of the machine's CPU time and this process's own (with reaped children).
#[derive(Clone, Copy)]
pub struct CpuTimes {
    /// Busy, idle and steal time of all CPUs, seconds.
    busy: f64,
    total: f64,
    steal: f64,
    /// This process and its reaped children, seconds.
    own: f64,
}

impl CpuTimes {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<f64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // SAFETY: sysconf has no memory effects.
        let hz = (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64;
        let at = |i: usize| fields.get(i).copied().unwrap_or(0.0) / hz;
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let busy = at(0) + at(1) + at(2) + at(5) + at(6);
        let steal = at(7);
        let total = busy + at(3) + at(4) + steal;
        let own = [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN]
            .into_iter()
            .map(|who| {
                // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
                let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
                // SAFETY: getrusage with a valid pointer to a local.
                unsafe { libc::getrusage(who, &mut usage) };
                let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
                secs(usage.ru_utime) + secs(usage.ru_stime)
            })
            .sum();
        Self {
            busy,
            total,
            steal,
            own,
        }
    }

    /// One sentence on what the rest of the machine used between `start` and now, in CPUs
    /// (1.0 = one CPU fully busy on average), with the steal time of the machine's own host.
    pub fn others_since(start: Self) -> String {
        let end = Self::now();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = (end.total - start.total) / cpus;
        if wall <= 0.0 {
            return "CPU use of other processes: unknown".into();
        }
        let others = ((end.busy - start.busy) - (end.own - start.own)).max(0.0) / wall;
        let steal = (end.steal - start.steal) / wall;
        format!(
            "other processes used {others:.2} of the {cpus:.0} CPUs on average during the run \
             ({:.0} s; CPU time of everything but this benchmark and its VMMs, from /proc/stat), \
             steal by the machine's own host {steal:.2} CPUs",
            wall
        )
    }
}
