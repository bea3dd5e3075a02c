// SPDX-License-Identifier: Apache-2.0
//! `--seccomp`: one seccompiler filter per kind of VMM thread, each applied by the thread
//! itself when it starts.
//!
//! A filter is a syscall list plus argument checks where an argument decides what the call
//! can do: `ioctl` only with the request numbers the thread issues ([`allowed_ioctls`]),
//! `socket` only for the address families it opens, `mmap`/`mprotect` never with
//! `PROT_EXEC` (the VMM maps no code after startup), `openat` only read-only, `tgkill`
//! (where a thread needs no other) only for `abort()`'s SIGABRT to its own process.
//! `--seccomp log` shows anything missing in the kernel log (SECCOMP_RET_LOG, audit type
//! 1326, with the thread's name as `comm`).
//!
//! What a filter allows also depends on the configuration, fixed once in `main`
//! ([`Policy`]): `fchmod` only when a device uses the embedded pool, which creates memfds.
//! A panic in a filtered thread goes through [`crate::panic_hook`], which needs nothing a
//! filter refuses.
//!
//! Filters stack: a thread keeps the filter of the thread that spawned it and adds its own,
//! and a syscall must pass both. Device workers are started on activation by the
//! device-manager thread (a vCPU that writes DRIVER_OK only queues the activation and
//! waits, `virtio_pci::Lifecycle`), so that thread's filter is built as its own needs plus
//! those of the workers it starts ([`Thread::DeviceManager`]); each worker then narrows to its
//! own list. A vCPU starts no thread and adds no filter.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use crate::config::api::SeccompMode;

mod ioctls;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("Failed to build the seccomp filter for {0:?}")]
    Build(Thread, #[source] BackendError),
    #[error("Failed to compile the seccomp filter for {0:?}")]
    Compile(Thread, #[source] BackendError),
    #[error("Failed to apply the seccomp filter for {0:?}")]
    Apply(Thread, #[source] seccompiler::Error),
}

/// The kinds of VMM thread, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    /// The main thread once the VM runs: API requests, teardown, device shutdown.
    Main,
    /// A vCPU: KVM_RUN and the buses (register accesses, BAR moves, MSI-X, trapped
    /// doorbells). Device activation and reset it hands to the device-manager thread.
    Vcpu,
    /// "device-manager": runs device activation and reset for the vCPUs (activation starts
    /// the device workers, whose filters stack on this one).
    DeviceManager,
    /// "http-server": accepts API connections and starts a thread for each.
    HttpServer,
    /// "http-conn": one API connection (reads a request, waits for the main thread's answer,
    /// writes it); its filter stacks on the http-server's.
    HttpConnection,
    EventMonitor,
    SignalHandler,
    /// "exit-forward": moves exit events onto the main thread's channel.
    ExitForward,
    /// "virtio-ism": the device's queue worker (control requests, region map/unmap, pool
    /// calls, doorbell wiring).
    IsmWorker,
    /// "virtio-rng": reads the entropy source into the guest's buffers.
    RngWorker,
    /// "ism-pool-client": reads the broker socket (replies and pool events).
    PoolClient,
    /// "serial-input" (`--serial tty`): stdin to the serial port.
    SerialInput,
}

impl Thread {
    /// Every kind.
    #[cfg(test)]
    pub const ALL: [Thread; 12] = [
        Thread::Main,
        Thread::Vcpu,
        Thread::DeviceManager,
        Thread::HttpServer,
        Thread::HttpConnection,
        Thread::EventMonitor,
        Thread::SignalHandler,
        Thread::ExitForward,
        Thread::IsmWorker,
        Thread::RngWorker,
        Thread::PoolClient,
        Thread::SerialInput,
    ];
}

/// What every thread needs: memory, locks, its own exit, signal return, time, and what
/// `abort()` makes after a panic (`rt_sigprocmask`, `gettid`, `getpid`, `tgkill`, see
/// [`abort_only`]). `mmap` and `mprotect` are further checked (no PROT_EXEC). `mremap`: glibc
/// grows large allocations (an API body, a long pool status) with it, as cloud-hypervisor
/// allows it; it cannot add permissions to a mapping.
const COMMON: &[libc::c_long] = &[
    libc::SYS_brk,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_futex,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_madvise,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_read,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_write,
];

/// Starting threads (the std runtime's calls around clone3).
const SPAWN: &[libc::c_long] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_sched_getaffinity,
    libc::SYS_prctl,
    libc::SYS_getrandom,
];

/// What a virtio-ism worker needs for pool calls, on either pool backend: the broker client
/// (send on the session socket, check a received memfd's size and name) or the embedded
/// pool (create and seal a memfd, reopen it read-only through /proc/self/fd). The embedded
/// pool's `fchmod` is [`EMBEDDED_POOL`], only when a device uses it.
const POOL_CALLS: &[libc::c_long] = &[
    libc::SYS_sendmsg,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_fcntl,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_openat,
];

/// Ringing peers' doorbells through Linux AIO (virtio-ism's DoorbellRinger): a context is
/// made with each device and destroyed with it, and every ring submits and reaps.
const DOORBELL_AIO: &[libc::c_long] = &[
    libc::SYS_io_setup,
    libc::SYS_io_destroy,
    libc::SYS_io_submit,
    libc::SYS_io_getevents,
];

/// The embedded pool makes its memfds mode 0400 (`fchmod`) so that no other uid can reopen
/// them; a VMM whose devices all use a broker never does.
const EMBEDDED_POOL: &[libc::c_long] = &[libc::SYS_fchmod];

/// An epoll loop over eventfds (every device worker).
const EPOLL_LOOP: &[libc::c_long] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_dup,
    libc::SYS_fcntl,
];

fn extra(thread: Thread, embedded_pool: bool) -> Vec<libc::c_long> {
    let own: &[libc::c_long] = match thread {
        Thread::Main => &[
            libc::SYS_ioctl,
            libc::SYS_tgkill,
            libc::SYS_exit_group,
            libc::SYS_eventfd2,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_openat,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_shutdown,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_readlink,
            libc::SYS_fcntl,
            libc::SYS_writev,
            libc::SYS_lseek,
            libc::SYS_ftruncate,
            libc::SYS_fallocate,
            libc::SYS_memfd_create,
            libc::SYS_flock,
            libc::SYS_restart_syscall,
        ],
        // KVM_RUN and the exits it hands to the buses: queue eventfds made and registered
        // at DRIVER_OK (`eventfd2`, `dup`, `fcntl`), MSI-X and BAR moves (ioctls), trapped
        // doorbells (AIO, below), serial output (`writev`); `getrandom` for std HashMap keys
        // in device code the buses reach. No threads, no files, no sockets, no filters.
        Thread::Vcpu => &[
            libc::SYS_ioctl,
            libc::SYS_exit_group,
            libc::SYS_eventfd2,
            libc::SYS_dup,
            libc::SYS_fcntl,
            libc::SYS_tgkill,
            libc::SYS_restart_syscall,
            libc::SYS_writev,
            libc::SYS_getrandom,
        ],
        // Activation and reset: ioeventfds and memory slots unwired (ioctls), the worker
        // started; the workers it starts apply their own filters on top (adding a filter
        // only narrows; other seccomp operations stay refused, see `rules`).
        Thread::DeviceManager => &[
            libc::SYS_ioctl,
            libc::SYS_eventfd2,
            libc::SYS_dup,
            libc::SYS_fcntl,
            libc::SYS_restart_syscall,
            // Log lines from the devices it activates (as on the vCPU before).
            libc::SYS_writev,
            libc::SYS_seccomp,
        ],
        // Accept (the listener was made non-blocking before the filter), poll the listener
        // and the stop eventfd, answer 503 over the cap, shut connections down at teardown,
        // and everything its connection threads do (their filters stack on this one, and
        // `seccomp` lets them add theirs). No files, no sockets of its own, no ioctl.
        Thread::HttpServer => &[
            libc::SYS_fcntl,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_writev,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_setsockopt,
            libc::SYS_seccomp,
        ],
        // Read a request and write its answer on the one socket, with timeouts
        // (SO_RCVTIMEO/SO_SNDTIMEO); `fcntl(F_GETFD)` (only that: see `rules`) is std's check,
        // in debug builds, that a descriptor it closes is open.
        Thread::HttpConnection => &[
            libc::SYS_fcntl,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_writev,
            libc::SYS_setsockopt,
        ],
        Thread::EventMonitor => &[libc::SYS_fsync, libc::SYS_fcntl],
        // fcntl: F_GETFD only (see `rules`), std's debug-build check on closing a descriptor.
        Thread::SignalHandler => &[libc::SYS_rt_sigtimedwait, libc::SYS_fcntl],
        Thread::ExitForward => &[libc::SYS_fcntl],
        // getrandom: the std HashMap's keys, seeded once per thread.
        Thread::IsmWorker => &[libc::SYS_ioctl, libc::SYS_getrandom],
        Thread::RngWorker => &[],
        // Read the broker socket; after the broker died, reconnect (an AF_UNIX socket only,
        // see `socket_domains`), bound the handshake with SO_RCVTIMEO/SO_SNDTIMEO, hand
        // back the session's regions and doorbells (sendmsg with SCM_RIGHTS; the worker
        // made the duplicates it sends) and DETACHes the restarted broker may have missed;
        // fcntl is F_GETFD only (see `rules`); poll tells the end of the stream from an
        // empty packet (both read as 0 bytes).
        Thread::PoolClient => &[
            libc::SYS_recvmsg,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_fcntl,
            libc::SYS_sendmsg,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_setsockopt,
            libc::SYS_shutdown,
        ],
        Thread::SerialInput => &[libc::SYS_fcntl],
    };
    let mut list = own.to_vec();
    match thread {
        Thread::IsmWorker => {
            list.extend_from_slice(EPOLL_LOOP);
            list.extend_from_slice(POOL_CALLS);
            list.extend_from_slice(DOORBELL_AIO);
        }
        // Devices are made (vm.add-ism) and dropped here.
        Thread::Main => list.extend_from_slice(DOORBELL_AIO),
        Thread::RngWorker => list.extend_from_slice(EPOLL_LOOP),
        // Trapped doorbell writes ring the peers' doorbells.
        Thread::Vcpu => list.extend_from_slice(DOORBELL_AIO),
        // Device reset gives regions back to the pool, and the workers this thread starts
        // keep its filter: they can only do what it allows.
        Thread::DeviceManager => {
            list.extend(allowed_syscalls(Thread::IsmWorker, embedded_pool));
            list.extend(allowed_syscalls(Thread::RngWorker, embedded_pool));
        }
        _ => {}
    }
    // API region hotplug (main), device activation and reset (device-manager) and the
    // worker make embedded-pool calls.
    if embedded_pool
        && matches!(
            thread,
            Thread::Main | Thread::DeviceManager | Thread::IsmWorker
        )
    {
        list.extend_from_slice(EMBEDDED_POOL);
    }
    list
}

/// Threads whose only `fcntl` is std's check, in debug builds, that a descriptor it closes
/// is open (`F_GETFD`): they never change descriptor flags.
fn fcntl_getfd_only(thread: Thread) -> bool {
    matches!(
        thread,
        Thread::HttpServer
            | Thread::HttpConnection
            | Thread::SignalHandler
            | Thread::ExitForward
            | Thread::PoolClient
            | Thread::SerialInput
    )
}

/// Whether `thread` may start threads.
fn spawns(thread: Thread) -> bool {
    matches!(
        thread,
        Thread::Main | Thread::DeviceManager | Thread::HttpServer
    )
}

/// The syscalls `thread` may make (some only with the arguments [`filter`] checks), when
/// `embedded_pool` says whether a device uses the embedded pool.
pub fn allowed_syscalls(thread: Thread, embedded_pool: bool) -> Vec<libc::c_long> {
    let mut list: Vec<libc::c_long> = COMMON.to_vec();
    if spawns(thread) {
        list.extend_from_slice(SPAWN);
    }
    list.extend(extra(thread, embedded_pool));
    list.sort_unstable();
    list.dedup();
    list
}

/// The ioctl request numbers `thread` may issue (empty: no ioctl at all).
pub fn allowed_ioctls(thread: Thread) -> Vec<u64> {
    use ioctls::*;
    let list: Vec<u64> = match thread {
        // Device teardown and API region hotplug (slots, doorbells, irqfds), the terminal
        // restored at exit.
        Thread::Main => [DEVICE_WIRING, TERMINAL].concat(),
        Thread::Vcpu => [VCPU, DEVICE_WIRING].concat(),
        // Activation wires (and a failed one unwires) slots and doorbells; reset unwires.
        Thread::DeviceManager => [DEVICE_WIRING, ISM_WORKER].concat(),
        Thread::IsmWorker => ISM_WORKER.to_vec(),
        Thread::HttpServer
        | Thread::HttpConnection
        | Thread::EventMonitor
        | Thread::SignalHandler
        | Thread::ExitForward
        | Thread::RngWorker
        | Thread::PoolClient
        | Thread::SerialInput => Vec::new(),
    };
    let mut list = list;
    list.sort_unstable();
    list.dedup();
    list
}

/// The address families `thread` may open sockets in.
pub fn socket_domains(thread: Thread) -> &'static [libc::c_int] {
    match thread {
        // Unix sockets only: the event monitor, the broker; the pool client reconnecting
        // to a restarted broker.
        Thread::Main | Thread::PoolClient => &[libc::AF_UNIX],
        _ => &[],
    }
}

fn arg_is(index: u8, value: u64) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        value,
    )?])
}

/// Whether `thread` may send any signal to any thread of the process (vCPU kicks, pause);
/// the others may only `tgkill` for `abort()` ([`abort_only`]).
fn signals_threads(thread: Thread) -> bool {
    matches!(thread, Thread::Main | Thread::Vcpu)
}

/// `tgkill(getpid(), _, SIGABRT)`: what glibc's `abort()` sends (to the calling thread), after
/// the panic hook wrote its message. The filter is built in the thread that applies it, so
/// `getpid()` here is the VMM's own pid.
fn abort_only() -> Result<SeccompRule, BackendError> {
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    SeccompRule::new(vec![
        SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, pid as u64)?,
        SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::SIGABRT as u64,
        )?,
    ])
}

/// `__O_TMPFILE`, the bit of `O_TMPFILE` that is not `O_DIRECTORY` (asm-generic/fcntl.h); the
/// libc crate only has the combined `O_TMPFILE`.
const O_TMPFILE_BIT: libc::c_int = 0o20000000;

/// Any of these in `openat`'s flags opens (or makes) a file for writing.
pub const OPEN_WRITE_FLAGS: libc::c_int =
    libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND | O_TMPFILE_BIT;

/// `flags` (argument 2 of openat) without [`OPEN_WRITE_FLAGS`]: no thread opens a file for
/// writing once filtered (the files the VMM writes are opened before the filters apply), so
/// a thread holding a read-only region cannot reopen `/proc/self/fd/<n>` read-write.
fn read_only_open() -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(OPEN_WRITE_FLAGS as u64),
        0,
    )?])
}

/// `prot` (argument 2 of mmap and mprotect) without PROT_EXEC.
fn no_exec() -> Result<SeccompRule, BackendError> {
    SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )?])
}

/// The seccompiler rules for `thread`: an empty list allows the syscall outright.
fn rules(thread: Thread, policy: &Policy) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut map = BTreeMap::new();
    for nr in allowed_syscalls(thread, policy.embedded_pool) {
        let rules = match nr {
            libc::SYS_ioctl => allowed_ioctls(thread)
                .into_iter()
                // The request is an unsigned int in the kernel: compare the low 32 bits.
                .map(|request| arg_is(1, request))
                .collect::<Result<Vec<_>, _>>()?,
            libc::SYS_socket => socket_domains(thread)
                .iter()
                .map(|&domain| arg_is(0, domain as u64))
                .collect::<Result<Vec<_>, _>>()?,
            libc::SYS_mmap | libc::SYS_mprotect => vec![no_exec()?],
            libc::SYS_openat => vec![read_only_open()?],
            // The embedded pool only ever makes a memfd owner-read-only.
            libc::SYS_fchmod => vec![arg_is(1, libc::S_IRUSR.into())?],
            libc::SYS_fcntl if fcntl_getfd_only(thread) => {
                vec![arg_is(1, libc::F_GETFD as u64)?]
            }
            libc::SYS_tgkill if !signals_threads(thread) => vec![abort_only()?],
            // Only adding a filter (a stacked worker filter).
            libc::SYS_seccomp => vec![arg_is(0, libc::SECCOMP_SET_MODE_FILTER.into())?],
            // Naming a new thread, and no_new_privs before a filter is added.
            libc::SYS_prctl => [
                libc::PR_SET_NAME,
                libc::PR_GET_NAME,
                libc::PR_SET_NO_NEW_PRIVS,
            ]
            .into_iter()
            .map(|option| arg_is(0, option as u64))
            .collect::<Result<Vec<_>, _>>()?,
            _ => Vec::new(),
        };
        // A syscall whose argument list came out empty is not allowed at all (an empty
        // rule list would mean "any arguments").
        let checked = matches!(nr, libc::SYS_ioctl | libc::SYS_socket);
        if checked && rules.is_empty() {
            continue;
        }
        map.insert(nr, rules);
    }
    Ok(map)
}

/// What the filters depend on besides the thread kind, fixed once in `main`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `--seccomp`.
    pub mode: SeccompMode,
    /// Some `--ism` device has no `pool=` socket and takes regions from the embedded pool.
    pub embedded_pool: bool,
}

/// The compiled filter for `thread` under `policy`; `None` when filtering is off.
pub fn filter(thread: Thread, policy: &Policy) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match policy.mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules = rules(thread, policy).map_err(|e| SeccompError::Build(thread, e))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(thread, e))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e| SeccompError::Compile(thread, e))?;
    Ok(Some(program))
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Set the process-wide policy once, in `main`, before any thread starts.
pub fn set_policy(policy: Policy) {
    let _ = POLICY.set(policy);
    if policy.mode != SeccompMode::Off {
        fix_malloc_arena_limit();
    }
}

/// Every thread allocates from glibc's main arena. Extra arenas make glibc open files from
/// whichever thread needs them: /sys/devices/system/cpu/online when it first works out the
/// arena limit, /proc/sys/vm/overcommit_memory the first time a `free` shrinks a non-main
/// heap (both seen killing the pool client's reader under load). Small allocations stay
/// per-thread in the tcache; nothing here is allocation-heavy.
fn fix_malloc_arena_limit() {
    // SAFETY: mallopt takes the allocator lock and only sets a parameter.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) } != 1 {
        log::warn!("Failed to set the malloc arena limit: a filtered thread may die on openat");
    }
}

/// The policy `main` set; filtering off when it set none (unit tests that start device
/// workers run unfiltered).
fn policy() -> Policy {
    POLICY.get().copied().unwrap_or(Policy {
        mode: SeccompMode::Off,
        embedded_pool: false,
    })
}

/// Apply `thread`'s filter to the calling thread under the process-wide policy.
pub fn apply(thread: Thread) -> Result<(), SeccompError> {
    if let Some(program) = filter(thread, &policy())? {
        seccompiler::apply_filter(&program).map_err(|e| SeccompError::Apply(thread, e))?;
    }
    Ok(())
}

/// [`apply`] at the top of a thread: a thread that cannot be filtered must not run
/// unfiltered, so the failure ends the process.
pub fn apply_or_exit(thread: Thread) {
    if let Err(e) = apply(thread) {
        log::error!("{e}: {:?}", std::error::Error::source(&e));
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::os::fd::AsRawFd;

    /// Fork; the child applies `programs` in order (filters stack), runs `body` and exits
    /// with its result. Returns the child's wait status. `body` must stay async-signal-safe
    /// (raw syscalls, no allocation): the test process has other threads.
    fn in_child(programs: &[&BpfProgram], body: impl FnOnce() -> i32) -> libc::c_int {
        // SAFETY: fork in a test; the child only applies filters, runs `body` (raw syscalls)
        // and leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            for program in programs {
                if seccompiler::apply_filter(program).is_err() {
                    // SAFETY: leaving the forked child.
                    unsafe { libc::_exit(100) };
                }
            }
            let code = body();
            // SAFETY: leaving the forked child, its only thread, with exit (worker filters
            // allow exit, not exit_group).
            unsafe { libc::syscall(libc::SYS_exit, code) };
            unreachable!();
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    }

    fn killed_by_sigsys(status: libc::c_int) -> bool {
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS
    }

    fn exited_with(status: libc::c_int, code: i32) -> bool {
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == code
    }

    fn program(thread: Thread, mode: SeccompMode) -> BpfProgram {
        let policy = Policy {
            mode,
            embedded_pool: true,
        };
        filter(thread, &policy).unwrap().unwrap()
    }

    /// Exit code 7 when the syscall returned (whatever its result).
    fn returned(_ret: libc::c_long) -> i32 {
        7
    }

    #[test]
    fn test_every_thread_gets_a_filter_in_kill_and_log_mode_and_none_when_off() {
        for t in Thread::ALL {
            for mode in [SeccompMode::Kill, SeccompMode::Log, SeccompMode::Off] {
                let policy = Policy {
                    mode,
                    embedded_pool: false,
                };
                let built = filter(t, &policy).unwrap();
                assert_eq!(built.is_some(), mode != SeccompMode::Off, "{t:?} {mode:?}");
            }
        }
        // Lists differ: only spawning threads may clone, only the ism worker (and the
        // device-manager thread that starts it) may create memfds, only vCPUs may run.
        assert!(!allowed_syscalls(Thread::EventMonitor, true).contains(&libc::SYS_clone3));
        assert!(!allowed_syscalls(Thread::IsmWorker, true).contains(&libc::SYS_clone3));
        assert!(allowed_syscalls(Thread::DeviceManager, true).contains(&libc::SYS_memfd_create));
        assert!(!allowed_syscalls(Thread::Vcpu, true).contains(&libc::SYS_memfd_create));
        assert!(allowed_syscalls(Thread::IsmWorker, true).contains(&libc::SYS_memfd_create));
        assert!(!allowed_syscalls(Thread::HttpServer, true).contains(&libc::SYS_memfd_create));
        assert!(!allowed_syscalls(Thread::RngWorker, true).contains(&libc::SYS_memfd_create));
        assert!(allowed_ioctls(Thread::Vcpu).contains(&ioctls::KVM_RUN));
        assert!(!allowed_ioctls(Thread::IsmWorker).contains(&ioctls::KVM_RUN));
        assert!(allowed_ioctls(Thread::RngWorker).is_empty());
    }

    /// A stacked worker filter only narrows: whatever the worker allows, the device-manager
    /// thread that starts it must allow too, or the worker would die on it.
    #[test]
    fn test_device_manager_filter_covers_the_workers_it_starts() {
        for embedded_pool in [false, true] {
            let parent = allowed_syscalls(Thread::DeviceManager, embedded_pool);
            let parent_ioctls = allowed_ioctls(Thread::DeviceManager);
            for worker in [Thread::IsmWorker, Thread::RngWorker] {
                for nr in allowed_syscalls(worker, embedded_pool) {
                    assert!(parent.contains(&nr), "{worker:?}: syscall {nr}");
                }
                for request in allowed_ioctls(worker) {
                    assert!(
                        parent_ioctls.contains(&request),
                        "{worker:?}: ioctl {request:#x}"
                    );
                }
            }
        }
    }

    /// A vCPU hands activation and reset to the device-manager thread, so it starts no
    /// thread, adds no filter and makes no pool calls: under its filter (in a child, kill
    /// mode) clone, memfd_create, sendmsg and seccomp kill, for either pool backend.
    #[test]
    fn test_vcpu_filter_refuses_thread_starts_and_pool_calls() {
        fn clone() -> libc::c_long {
            // SAFETY: clone with no flags and no stack: killed by the filter before it runs
            // (were it allowed, it would fork the forked test child, which exits at once).
            unsafe { libc::syscall(libc::SYS_clone, 0, 0, 0, 0, 0) }
        }
        fn clone3() -> libc::c_long {
            // SAFETY: a null clone_args with size 0 fails with EINVAL if it is ever run.
            unsafe { libc::syscall(libc::SYS_clone3, 0, 0) }
        }
        fn memfd_create() -> libc::c_long {
            // SAFETY: a NUL-terminated name and no flags; the descriptor dies with the child.
            unsafe { libc::syscall(libc::SYS_memfd_create, c"ism".as_ptr(), 0) }
        }
        fn sendmsg() -> libc::c_long {
            // SAFETY: a bad descriptor and a null message: EBADF if it is ever run.
            unsafe { libc::syscall(libc::SYS_sendmsg, -1, 0, 0) }
        }
        fn seccomp() -> libc::c_long {
            // SAFETY: a null filter program: EFAULT if it is ever run.
            unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    std::ptr::null::<u8>(),
                )
            }
        }
        type Call = (&'static str, libc::c_long, fn() -> libc::c_long);
        let calls: [Call; 5] = [
            ("clone", libc::SYS_clone, clone),
            ("clone3", libc::SYS_clone3, clone3),
            ("memfd_create", libc::SYS_memfd_create, memfd_create),
            ("sendmsg", libc::SYS_sendmsg, sendmsg),
            ("seccomp", libc::SYS_seccomp, seccomp),
        ];
        for embedded_pool in [false, true] {
            let list = allowed_syscalls(Thread::Vcpu, embedded_pool);
            for (name, nr, _) in calls {
                assert!(!list.contains(&nr), "vCPU may call {name}");
            }
            for nr in [libc::SYS_openat, libc::SYS_fchmod, libc::SYS_socket] {
                assert!(!list.contains(&nr), "vCPU may call {nr}");
            }
        }
        let vcpu = program(Thread::Vcpu, SeccompMode::Kill);
        for (name, _, call) in calls {
            let status = in_child(&[&vcpu], || returned(call()));
            assert!(killed_by_sigsys(status), "{name}: {status:#x}");
        }
        // The device-manager thread, which starts the workers, may.
        let manager = allowed_syscalls(Thread::DeviceManager, true);
        for (name, nr, _) in calls {
            assert!(manager.contains(&nr), "device-manager may not call {name}");
        }
    }

    /// The same for the API: a connection thread's filter stacks on the http-server's.
    #[test]
    fn test_http_server_filter_covers_its_connection_threads() {
        let server = allowed_syscalls(Thread::HttpServer, true);
        for nr in allowed_syscalls(Thread::HttpConnection, true) {
            assert!(server.contains(&nr), "syscall {nr}");
        }
        // A connection thread cannot accept, start threads or add filters.
        let conn = allowed_syscalls(Thread::HttpConnection, true);
        for nr in [libc::SYS_accept4, libc::SYS_clone3, libc::SYS_seccomp] {
            assert!(!conn.contains(&nr), "syscall {nr}");
        }
    }

    /// The syscall each thread kind must not make, and what a compromised thread of that
    /// kind would try with it.
    fn forbidden(thread: Thread) -> (libc::c_long, fn() -> libc::c_long) {
        match thread {
            // Device workers have no business opening sockets.
            Thread::IsmWorker | Thread::RngWorker | Thread::Vcpu => (
                libc::SYS_socket,
                // SAFETY: a socket syscall with plain integer arguments.
                || unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) },
            ),
            // The serial input thread only reads stdin, the pool client its broker socket:
            // no files.
            Thread::SerialInput | Thread::PoolClient => (
                libc::SYS_openat,
                // SAFETY: a NUL-terminated path and plain flags.
                || unsafe {
                    libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        c"/etc/passwd".as_ptr(),
                        libc::O_RDONLY,
                    )
                },
            ),
            // Nothing here may start a process.
            _ => (
                libc::SYS_getppid,
                // SAFETY: a syscall with no arguments.
                || unsafe { libc::syscall(libc::SYS_getppid) },
            ),
        }
    }

    /// Per thread kind, in a child: `true` dies of SIGSYS on the forbidden syscall, `log`
    /// lets it through.
    #[test]
    fn test_a_forbidden_syscall_kills_in_true_and_passes_in_log_for_every_thread() {
        for thread in Thread::ALL {
            let (nr, call) = forbidden(thread);
            assert!(!allowed_syscalls(thread, true).contains(&nr), "{thread:?}");
            let status = in_child(&[&program(thread, SeccompMode::Kill)], || returned(call()));
            assert!(killed_by_sigsys(status), "{thread:?} true: {status:#x}");
            let status = in_child(&[&program(thread, SeccompMode::Log)], || returned(call()));
            assert!(exited_with(status, 7), "{thread:?} log: {status:#x}");
        }
    }

    /// Filters stack: a worker started by the device-manager thread keeps that thread's
    /// filter and adds its own, so sched_getaffinity (which the device-manager thread may
    /// make, to start threads) kills an ism worker; a call both allow goes through.
    #[test]
    fn test_a_worker_filter_stacked_on_the_device_manager_filter_narrows_it() {
        let manager = program(Thread::DeviceManager, SeccompMode::Kill);
        let worker = program(Thread::IsmWorker, SeccompMode::Kill);
        let affinity = || {
            let mut mask = [0u64; 16];
            // SAFETY: the calling thread's CPU mask into a buffer of the given size.
            unsafe {
                libc::syscall(
                    libc::SYS_sched_getaffinity,
                    0,
                    std::mem::size_of_val(&mask),
                    mask.as_mut_ptr(),
                )
            }
        };
        assert!(exited_with(
            in_child(&[&manager], || returned(affinity())),
            7
        ));
        assert!(killed_by_sigsys(in_child(&[&manager, &worker], || {
            returned(affinity())
        })));
        // SAFETY: eventfd2 with plain integer arguments.
        let eventfd = || unsafe { libc::syscall(libc::SYS_eventfd2, 0, 0) };
        assert!(exited_with(
            in_child(&[&manager, &worker], || returned(eventfd())),
            7
        ));
    }

    fn ioctl(fd: libc::c_int, request: u64) -> libc::c_long {
        let mut arg: libc::c_int = 0;
        // SAFETY: every call here is on fd -1, which fails with EBADF before the argument
        // (a valid int anyway) is read.
        unsafe { libc::syscall(libc::SYS_ioctl, fd, request, &mut arg) }
    }

    /// An ioctl request off a thread's list kills (`true`) or is logged (`log`); one on the
    /// list goes through.
    #[test]
    fn test_an_ioctl_request_not_on_the_list_is_caught() {
        // The ism worker may map slots but not run a vCPU; a vCPU may not touch the terminal.
        let cases = [
            (
                Thread::IsmWorker,
                ioctls::KVM_RUN,
                ioctls::KVM_SET_USER_MEMORY_REGION,
            ),
            (Thread::Vcpu, libc::TCSETS, ioctls::KVM_RUN),
            (Thread::Main, ioctls::KVM_RUN, libc::TCGETS),
        ];
        for (thread, off_list, on_list) in cases {
            assert!(!allowed_ioctls(thread).contains(&off_list));
            assert!(allowed_ioctls(thread).contains(&on_list));
            let kill = program(thread, SeccompMode::Kill);
            let log = program(thread, SeccompMode::Log);
            let status = in_child(&[&kill], || returned(ioctl(-1, off_list)));
            assert!(
                killed_by_sigsys(status),
                "{thread:?} {off_list:#x}: {status:#x}"
            );
            let status = in_child(&[&log], || returned(ioctl(-1, off_list)));
            assert!(exited_with(status, 7), "{thread:?} log: {status:#x}");
            let status = in_child(&[&kill], || returned(ioctl(-1, on_list)));
            assert!(
                exited_with(status, 7),
                "{thread:?} {on_list:#x}: {status:#x}"
            );
        }
        // A thread with no ioctl at all.
        let status = in_child(&[&program(Thread::RngWorker, SeccompMode::Kill)], || {
            returned(ioctl(-1, libc::FIONBIO))
        });
        assert!(killed_by_sigsys(status));
    }

    /// No thread maps executable memory; non-executable mappings go through.
    #[test]
    fn test_executable_mappings_are_caught() {
        let map = |prot: libc::c_int| {
            // SAFETY: an anonymous private mapping; the child exits right after.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if addr == libc::MAP_FAILED { 5 } else { 7 }
        };
        let protect = |prot: libc::c_int| {
            // SAFETY: as above, then mprotect on the page just mapped.
            let addr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            // SAFETY: `addr` is the page mapped above (or MAP_FAILED, which fails cleanly).
            returned(unsafe { libc::mprotect(addr, 4096, prot) }.into())
        };
        for thread in [
            Thread::Vcpu,
            Thread::DeviceManager,
            Thread::IsmWorker,
            Thread::Main,
        ] {
            let kill = program(thread, SeccompMode::Kill);
            let rw = libc::PROT_READ | libc::PROT_WRITE;
            assert!(exited_with(in_child(&[&kill], || map(rw)), 7));
            let rx = libc::PROT_READ | libc::PROT_EXEC;
            assert!(
                killed_by_sigsys(in_child(&[&kill], || map(rx))),
                "{thread:?}"
            );
            assert!(exited_with(in_child(&[&kill], || protect(rw)), 7));
            assert!(
                killed_by_sigsys(in_child(&[&kill], || protect(rx))),
                "{thread:?}"
            );
        }
    }

    /// The main thread and the pool client (reconnecting to a restarted broker) open unix
    /// sockets only.
    #[test]
    fn test_socket_families_are_checked() {
        for thread in [Thread::Main, Thread::PoolClient] {
            let kill = program(thread, SeccompMode::Kill);
            // SAFETY: socket with plain integer arguments.
            let open = |family: libc::c_int| unsafe {
                libc::syscall(libc::SYS_socket, family, libc::SOCK_STREAM, 0)
            };
            assert!(exited_with(
                in_child(&[&kill], || returned(open(libc::AF_UNIX))),
                7
            ));
            assert!(killed_by_sigsys(in_child(&[&kill], || returned(open(
                libc::AF_INET
            )))));
            assert!(killed_by_sigsys(in_child(&[&kill], || returned(open(
                libc::AF_NETLINK
            )))));
        }
    }

    /// The request numbers in `ioctls` are the ones kvm-ioctls issues: every KVM call a
    /// vCPU and the ism worker make, made through kvm-ioctls under that thread's filter in
    /// kill mode, leaves the child alive (the calls may fail; they must not be filtered).
    #[test]
    fn test_kvm_calls_pass_the_filters_of_the_threads_that_make_them() {
        use kvm_bindings::{KvmIrqRouting, kvm_irq_routing_entry, kvm_userspace_memory_region};
        use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch};
        use vmm_sys_util::eventfd::EventFd;

        if !crate::test_guest::kvm_available_for("KVM ioctl numbers not checked under the filters")
        {
            return;
        }
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mut vcpu = vm.create_vcpu(0).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let routing = KvmIrqRouting::from_entries(&[kvm_irq_routing_entry::default()]).unwrap();
        // Removing an absent slot: valid, and touches no memory.
        let no_slot = kvm_userspace_memory_region {
            slot: 7,
            ..Default::default()
        };
        let vcpu_status = in_child(&[&program(Thread::Vcpu, SeccompMode::Kill)], || {
            let _ = vcpu.get_regs().and_then(|r| vcpu.set_regs(&r));
            let _ = vcpu
                .get_vcpu_events()
                .and_then(|e| vcpu.set_vcpu_events(&e));
            // immediate_exit makes KVM_RUN return EINTR at once.
            vcpu.set_kvm_immediate_exit(1);
            let _ = vcpu.run();
            // SAFETY: removing a slot that does not exist maps nothing.
            let _ = unsafe { vm.set_user_memory_region(no_slot) };
            let _ = vm.register_ioevent(&evt, &IoEventAddress::Mmio(0xd000_0000), NoDatamatch);
            let _ = vm.unregister_ioevent(&evt, &IoEventAddress::Mmio(0xd000_0000), NoDatamatch);
            let _ = vm
                .register_irqfd(&evt, 5)
                .and_then(|()| vm.unregister_irqfd(&evt, 5));
            let _ = vm.set_gsi_routing(&routing);
            7
        });
        assert!(exited_with(vcpu_status, 7), "vCPU: {vcpu_status:#x}");
        // Activation and reset on the device-manager thread wire and unwire the same.
        let manager_status = in_child(
            &[&program(Thread::DeviceManager, SeccompMode::Kill)],
            || {
                // SAFETY: as above.
                let _ = unsafe { vm.set_user_memory_region(no_slot) };
                let _ = vm.register_ioevent(&evt, &IoEventAddress::Mmio(0xd000_0000), NoDatamatch);
                let _ =
                    vm.unregister_ioevent(&evt, &IoEventAddress::Mmio(0xd000_0000), NoDatamatch);
                let _ = vm
                    .register_irqfd(&evt, 5)
                    .and_then(|()| vm.unregister_irqfd(&evt, 5));
                let _ = vm.set_gsi_routing(&routing);
                7
            },
        );
        assert!(
            exited_with(manager_status, 7),
            "device-manager: {manager_status:#x}"
        );
        let worker = [
            &program(Thread::DeviceManager, SeccompMode::Kill),
            &program(Thread::IsmWorker, SeccompMode::Kill),
        ];
        let worker_status = in_child(&worker, || {
            // SAFETY: as above.
            let _ = unsafe { vm.set_user_memory_region(no_slot) };
            let _ = vm.register_ioevent(&evt, &IoEventAddress::Mmio(0xd000_0000), NoDatamatch);
            let _ = vm.unregister_ioevent(&evt, &IoEventAddress::Mmio(0xd000_0000), NoDatamatch);
            7
        });
        assert!(
            exited_with(worker_status, 7),
            "ism worker: {worker_status:#x}"
        );
        // The main thread checks and restores the terminal (here: not a terminal).
        let main_status = in_child(&[&program(Thread::Main, SeccompMode::Kill)], || {
            // SAFETY: termios is plain data; the calls fail cleanly on a non-terminal.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let _ = unsafe { libc::tcgetattr(evt.as_raw_fd(), &mut t) };
            // SAFETY: as above.
            let _ = unsafe { libc::tcsetattr(evt.as_raw_fd(), libc::TCSANOW, &t) };
            7
        });
        assert!(exited_with(main_status, 7), "main: {main_status:#x}");
    }

    /// glibc grows large buffers with mremap (an API body, a long pool status): every thread
    /// may make it.
    #[test]
    fn test_every_thread_may_grow_a_mapping_with_mremap() {
        let grow = || {
            // SAFETY: an anonymous private mapping, grown (and maybe moved) by mremap; the
            // child exits right after.
            unsafe {
                let addr = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                let grown = libc::mremap(addr, 4096, 1 << 20, libc::MREMAP_MAYMOVE);
                if grown == libc::MAP_FAILED { 5 } else { 7 }
            }
        };
        for thread in Thread::ALL {
            let status = in_child(&[&program(thread, SeccompMode::Kill)], grow);
            assert!(exited_with(status, 7), "{thread:?}: {status:#x}");
        }
    }

    /// Open `path` with `flags` by a raw openat; 7 when the call returned.
    fn open_with(path: &std::ffi::CStr, flags: libc::c_int) -> i32 {
        // SAFETY: a NUL-terminated path and plain flags; the descriptor is left to the
        // child's exit.
        returned(unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                path.as_ptr(),
                flags,
                0o600,
            )
        })
    }

    /// A compromised thread holding a read-only region cannot reopen its memfd read-write
    /// through /proc/self/fd: under every filter that allows openat, an open for writing
    /// (O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND, O_TMPFILE) kills, a read-only open
    /// passes.
    #[test]
    fn test_openat_for_writing_is_refused_on_every_thread() {
        let memfd = vmm_sys_util::tempfile::TempFile::new_with_prefix("/tmp/ism-seccomp")
            .expect("a temporary file");
        let proc_path =
            std::ffi::CString::new(format!("/proc/self/fd/{}", memfd.as_file().as_raw_fd()))
                .expect("no NUL");
        let new_path =
            std::ffi::CString::new(format!("{}.new", memfd.as_path().display())).expect("no NUL");
        let stacks: Vec<(&str, Vec<BpfProgram>)> = vec![
            ("main", vec![program(Thread::Main, SeccompMode::Kill)]),
            (
                "device-manager",
                vec![program(Thread::DeviceManager, SeccompMode::Kill)],
            ),
            (
                "ism worker",
                vec![
                    program(Thread::DeviceManager, SeccompMode::Kill),
                    program(Thread::IsmWorker, SeccompMode::Kill),
                ],
            ),
        ];
        for (name, stack) in &stacks {
            let stack: Vec<&BpfProgram> = stack.iter().collect();
            let flags = libc::O_RDONLY | libc::O_CLOEXEC;
            let status = in_child(&stack, || open_with(&proc_path, flags));
            assert!(exited_with(status, 7), "{name} read-only: {status:#x}");
            for flags in [
                libc::O_RDWR,
                libc::O_WRONLY,
                libc::O_RDONLY | libc::O_TRUNC,
                libc::O_RDONLY | libc::O_APPEND,
                libc::O_RDWR | libc::O_CLOEXEC | libc::O_NOCTTY,
            ] {
                let status = in_child(&stack, || open_with(&proc_path, flags));
                assert!(killed_by_sigsys(status), "{name} {flags:#o}: {status:#x}");
            }
            for flags in [
                libc::O_WRONLY | libc::O_CREAT,
                libc::O_TMPFILE | libc::O_RDWR,
            ] {
                let status = in_child(&stack, || open_with(&new_path, flags));
                assert!(killed_by_sigsys(status), "{name} {flags:#o}: {status:#x}");
            }
        }
        // Threads that open nothing at all.
        for thread in [
            Thread::Vcpu,
            Thread::HttpServer,
            Thread::HttpConnection,
            Thread::RngWorker,
            Thread::PoolClient,
        ] {
            assert!(!allowed_syscalls(thread, true).contains(&libc::SYS_openat));
        }
    }

    /// fchmod (the embedded pool's memfds) only when a device uses the embedded pool, only
    /// on the threads that make pool calls, and only to owner-read-only.
    #[test]
    fn test_fchmod_only_with_the_embedded_pool_on_pool_threads() {
        let file = vmm_sys_util::tempfile::TempFile::new_with_prefix("/tmp/ism-seccomp")
            .expect("a temporary file");
        let fd = file.as_file().as_raw_fd();
        // SAFETY: fchmod on an open descriptor with a plain mode.
        let chmod = || returned(unsafe { libc::syscall(libc::SYS_fchmod, fd, 0o400) });
        let build = |thread, embedded_pool| {
            let policy = Policy {
                mode: SeccompMode::Kill,
                embedded_pool,
            };
            filter(thread, &policy).unwrap().unwrap()
        };
        // SAFETY: as above; the mode that would make the file writable again.
        let chmod_writable = || returned(unsafe { libc::syscall(libc::SYS_fchmod, fd, 0o600) });
        for thread in [Thread::Main, Thread::DeviceManager, Thread::IsmWorker] {
            let with = build(thread, true);
            assert!(exited_with(in_child(&[&with], chmod), 7), "{thread:?}");
            assert!(
                killed_by_sigsys(in_child(&[&with], chmod_writable)),
                "{thread:?}"
            );
            let without = build(thread, false);
            assert!(killed_by_sigsys(in_child(&[&without], chmod)), "{thread:?}");
        }
        for thread in Thread::ALL {
            if !matches!(
                thread,
                Thread::Main | Thread::DeviceManager | Thread::IsmWorker
            ) {
                assert!(
                    !allowed_syscalls(thread, true).contains(&libc::SYS_fchmod),
                    "{thread:?}"
                );
            }
        }
    }

    /// Set in the re-executed test binary: the thread kind to panic under.
    const PANIC_CHILD_ENV: &str = "ISM_VMM_TEST_PANIC_UNDER";

    fn thread_by_name(name: &str) -> Option<Thread> {
        Thread::ALL.into_iter().find(|t| format!("{t:?}") == name)
    }

    /// The child's part: install the VMM's panic hook, start a thread named like the kind,
    /// which applies the kind's filter (in kill mode; for a device worker the vCPU's first,
    /// as they stack) and panics.
    fn panic_under_filter(thread: Thread) -> ! {
        crate::panic_hook::install();
        let policy = Policy {
            mode: SeccompMode::Kill,
            embedded_pool: true,
        };
        let name = format!("test-{thread:?}");
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let parent = match thread {
                    Thread::IsmWorker | Thread::RngWorker => Some(Thread::DeviceManager),
                    Thread::HttpConnection => Some(Thread::HttpServer),
                    _ => None,
                };
                if let Some(parent) = parent {
                    let first = filter(parent, &policy).unwrap().unwrap();
                    seccompiler::apply_filter(&first).unwrap();
                }
                let program = filter(thread, &policy).unwrap().unwrap();
                seccompiler::apply_filter(&program).unwrap();
                panic!("deliberate panic under the {thread:?} filter");
            })
            .unwrap();
        let _ = handle.join();
        // Only reached if the panic did not end the process.
        std::process::exit(3);
    }

    /// A panic in a filtered thread prints the hook's line (thread, location, message) and
    /// ends the process with SIGABRT, not a silent SIGSYS: for every thread kind, in a
    /// re-executed copy of this test binary.
    #[test]
    fn test_a_panic_under_any_filter_prints_its_message_and_aborts() {
        if let Ok(name) = std::env::var(PANIC_CHILD_ENV) {
            let thread = thread_by_name(&name).expect("a thread kind");
            panic_under_filter(thread);
        }
        let exe = std::env::current_exe().unwrap();
        for thread in Thread::ALL {
            let out = std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "seccomp::tests::test_a_panic_under_any_filter_prints_its_message_and_aborts",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(PANIC_CHILD_ENV, format!("{thread:?}"))
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            use std::os::unix::process::ExitStatusExt;
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGABRT),
                "{thread:?}: {:?}\n{stderr}",
                out.status
            );
            let expected = format!(
                "ism-vmm: thread 'test-{thread:?}' panicked at vmm-integration/src/seccomp/mod.rs:"
            );
            assert!(stderr.contains(&expected), "{thread:?}: {stderr}");
            assert!(
                stderr.contains(&format!(": deliberate panic under the {thread:?} filter\n")),
                "{thread:?}: {stderr}"
            );
        }
    }
}
