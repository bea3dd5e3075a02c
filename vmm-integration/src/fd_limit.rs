// SPDX-License-Identifier: Apache-2.0
//! The descriptor limit (RLIMIT_NOFILE), settled in `main` before any thread starts.
//!
//! A virtio-ism device opens one irqfd per MSI-X vector (up to 2048) at startup, more than the
//! usual soft limit of 1024. The VMM raises the soft limit to the hard one (no privilege
//! needed), and refuses to start, saying how many descriptors it needs, when even the hard
//! limit is too low for the configuration, instead of failing half-way through device setup
//! with "Too many open files".

use std::io;

use crate::config::VmConfig;
use crate::devices::ism::MAX_ISM_VECTORS;

#[derive(Debug, thiserror::Error)]
pub enum FdLimitError {
    #[error("Failed to read the descriptor limit (RLIMIT_NOFILE)")]
    Get(#[source] io::Error),
    #[error(
        "This configuration needs about {needed} file descriptors ({why}), but the hard limit \
         (RLIMIT_NOFILE) is {hard}. Raise it to at least {needed}: `prlimit --nofile={needed}:{needed} \
         ism-vmm ...` or `ulimit -n {needed}` as root, or LimitNOFILE={needed} in a systemd unit"
    )]
    TooLow { needed: u64, hard: u64, why: String },
}

/// Descriptors the VMM itself holds besides its devices' interrupts: stdio, KVM and the VM,
/// guest memory, eventfds of the serial port, exits, pause and workers, the API socket and
/// its lock, the event monitor, broker sessions and the API's connections
/// ([`crate::api::http::MAX_CONNECTIONS`]), with room to spare.
const BASE: u64 = 64 + crate::api::http::MAX_CONNECTIONS as u64;
/// Per vCPU: its KVM fd and the mapping of its `kvm_run`.
const PER_VCPU: u64 = 2;
/// Per virtio device other than virtio-ism: a few vectors' irqfds, queue ioeventfds, its
/// worker's epoll and kill eventfds.
const PER_VIRTIO_DEVICE: u64 = 8;
/// Per virtio-ism device besides its MSI-X irqfds: queue ioeventfds, the worker's epoll and
/// eventfds, the pool session (held regions and doorbells come on top, as the guest maps
/// them; with a broker each counts twice, since the session keeps a duplicate to hand back
/// to a restarted broker).
const PER_ISM_DEVICE: u64 = 32;

/// How many descriptors `config` needs at startup, and what most of them are for.
pub fn descriptors_needed(config: &VmConfig) -> (u64, String) {
    let vcpus = u64::from(config.cpus.boot_vcpus);
    let mut needed = BASE + PER_VCPU * vcpus;
    if config.rng.is_some() {
        needed += PER_VIRTIO_DEVICE;
    }
    let mut vectors = 0;
    for ism in &config.ism {
        // An invalid window was refused when the config was validated; count the maximum.
        let chunks = ism.device_config().map_or(MAX_ISM_VECTORS, |c| {
            c.layout().map_or(MAX_ISM_VECTORS, |l| l.chunks)
        });
        vectors += chunks.saturating_add(2).min(MAX_ISM_VECTORS);
        needed += PER_ISM_DEVICE;
    }
    needed += vectors;
    let why = if vectors > 0 {
        format!(
            "{vectors} irqfds for the MSI-X vectors of {} virtio-ism device(s), {vcpus} vCPU(s)",
            config.ism.len()
        )
    } else {
        format!("{vcpus} vCPU(s) and the VMM's own")
    };
    (needed, why)
}

fn get() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// The most descriptors a process may have whatever its limit (`fs.nr_open`); the soft limit
/// cannot be set above it, even when the hard limit is "unlimited".
fn nr_open() -> Option<libc::rlim_t> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raise the soft limit to the hard one and check that it covers `needed` descriptors;
/// returns the soft limit in force. Raising is best effort (logged): only a hard limit below
/// `needed` is an error.
pub fn raise(needed: u64, why: String) -> Result<u64, FdLimitError> {
    let limit = get().map_err(FdLimitError::Get)?;
    let mut target = limit.rlim_max;
    if target == libc::RLIM_INFINITY {
        target = nr_open().unwrap_or(limit.rlim_cur).max(limit.rlim_cur);
    }
    let mut soft = limit.rlim_cur;
    if soft < target {
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the valid `raised`; raising the soft limit up to the hard
        // one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            log::info!("Raised the soft descriptor limit from {soft} to {target}");
            soft = target;
        } else {
            log::warn!(
                "Failed to raise the soft descriptor limit from {soft} to {target}: {}",
                io::Error::last_os_error()
            );
        }
    } else {
        log::debug!("Descriptor limit: {soft} (hard {})", limit.rlim_max);
    }
    if soft < needed {
        return Err(FdLimitError::TooLow {
            needed,
            hard: limit.rlim_max,
            why,
        });
    }
    Ok(soft)
}

/// How many descriptors the table is grown to, at least, before any thread starts.
const FD_TABLE_SIZE: u64 = 4096;

/// Grow the descriptor table to hold `needed` (at least [`FD_TABLE_SIZE`]) descriptors, up to
/// `soft`, now, while the process has one thread. Growing it later, with threads running,
/// waits for an RCU grace period at every doubling (`expand_fdtable`): about 50 ms for a
/// device's 2048 irqfds on the project's machines. Best effort: failures only cost time.
pub fn grow_table(needed: u64, soft: u64) {
    let size = needed.max(FD_TABLE_SIZE).min(soft);
    let Ok(last) = libc::c_int::try_from(size.saturating_sub(1)) else {
        return;
    };
    if last <= 2 {
        return;
    }
    // SAFETY: fcntl F_GETFD only asks whether descriptor `last` is open.
    if unsafe { libc::fcntl(last, libc::F_GETFD) } != -1 {
        return;
    }
    // SAFETY: dup2 of stderr onto the free descriptor `last` (checked above) grows the table;
    // closing `last` right away leaves every other descriptor as it was.
    unsafe {
        if libc::dup2(libc::STDERR_FILENO, last) == last {
            libc::close(last);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::VmParams;

    fn config(ism: &[&str]) -> VmConfig {
        VmConfig::parse(VmParams {
            kernel: Some("/k".into()),
            ism: ism.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn test_an_ism_device_needs_an_irqfd_per_vector() {
        let (plain, _) = descriptors_needed(&config(&[]));
        assert!(plain < 1024, "{plain}");
        // 256 MiB of 64 KiB chunks: more chunks than vectors, so the MSI-X maximum.
        let (big, why) = descriptors_needed(&config(&["size=256M"]));
        assert!(big >= plain + MAX_ISM_VECTORS, "{big}");
        assert!(why.contains("2048 irqfds"), "{why}");
    }

    #[test]
    fn test_too_low_says_how_many_and_how_to_raise() {
        let e = FdLimitError::TooLow {
            needed: 2200,
            hard: 1024,
            why: "x".into(),
        };
        let text = e.to_string();
        assert!(text.contains("needs about 2200 file descriptors"), "{text}");
        assert!(text.contains("prlimit --nofile=2200:2200"), "{text}");
        assert!(!text.to_lowercase().contains("memory"), "{text}");
    }
}
