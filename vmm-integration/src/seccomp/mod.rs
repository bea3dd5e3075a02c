// SPDX-License-Identifier: Apache-2.0
//! `--seccomp`: one seccompiler filter per kind of VMM thread, each applied by the thread
//! itself when it starts.
//!
//! A filter is a syscall list plus argument checks where an argument decides what the call
//! can do: `ioctl` only with the request numbers the thread issues ([`allowed_ioctls`]),
//! `socket` only for the address families it opens, `mmap`/`mprotect` never with
//! `PROT_EXEC` (the VMM maps no code after startup). `--seccomp log` shows anything missing
//! in the kernel log (SECCOMP_RET_LOG, audit type 1326, with the thread's name as `comm`).
//!
//! Filters stack: a thread keeps the filter of the thread that spawned it and adds its own,
//! and a syscall must pass both. Device workers are started on activation by the vCPU that
//! wrote DRIVER_OK, so the vCPU filter is built as the vCPU's own needs plus those of the
//! workers it starts ([`Thread::Vcpu`]); each worker then narrows to its own list.

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
    /// A vCPU: KVM_RUN, the buses, device activation and reset (activation starts the
    /// device workers, whose filters stack on this one).
    Vcpu,
    /// "http-server" and the tiny_http threads it starts.
    HttpServer,
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
    pub const ALL: [Thread; 10] = [
        Thread::Main,
        Thread::Vcpu,
        Thread::HttpServer,
        Thread::EventMonitor,
        Thread::SignalHandler,
        Thread::ExitForward,
        Thread::IsmWorker,
        Thread::RngWorker,
        Thread::PoolClient,
        Thread::SerialInput,
    ];
}

/// What every thread needs: memory, locks, its own exit, signal return, time. `mmap` and
/// `mprotect` are further checked (no PROT_EXEC).
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
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_read,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sched_yield,
    libc::SYS_sigaltstack,
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
/// pool (create and seal a memfd, reopen it read-only through /proc/self/fd).
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
    libc::SYS_fchmod,
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

fn extra(thread: Thread) -> Vec<libc::c_long> {
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
            libc::SYS_fchmod,
            libc::SYS_memfd_create,
            libc::SYS_flock,
            libc::SYS_restart_syscall,
        ],
        Thread::Vcpu => &[
            libc::SYS_ioctl,
            libc::SYS_exit_group,
            libc::SYS_eventfd2,
            libc::SYS_dup,
            libc::SYS_fcntl,
            libc::SYS_tgkill,
            libc::SYS_restart_syscall,
            libc::SYS_writev,
            // The workers it starts apply their own filters on top (adding a filter only
            // narrows; other seccomp operations stay refused, see `rules`).
            libc::SYS_seccomp,
        ],
        Thread::HttpServer => &[
            libc::SYS_openat,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_shutdown,
            libc::SYS_writev,
            libc::SYS_poll,
            libc::SYS_fcntl,
            libc::SYS_ioctl,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
            libc::SYS_socket,
            libc::SYS_connect,
        ],
        Thread::EventMonitor => &[libc::SYS_fsync, libc::SYS_fcntl],
        Thread::SignalHandler => &[libc::SYS_rt_sigtimedwait],
        Thread::ExitForward => &[],
        // getrandom: the std HashMap's keys, seeded once per thread.
        Thread::IsmWorker => &[libc::SYS_ioctl, libc::SYS_getrandom],
        Thread::RngWorker => &[],
        Thread::PoolClient => &[libc::SYS_recvmsg],
        Thread::SerialInput => &[],
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
        // Device reset on a vCPU gives regions back to the pool, and the workers this
        // thread starts keep its filter: they can only do what it allows.
        Thread::Vcpu => {
            list.extend(allowed_syscalls(Thread::IsmWorker));
            list.extend(allowed_syscalls(Thread::RngWorker));
        }
        _ => {}
    }
    list
}

/// Whether `thread` may start threads.
fn spawns(thread: Thread) -> bool {
    matches!(thread, Thread::Main | Thread::Vcpu | Thread::HttpServer)
}

/// The syscalls `thread` may make (some only with the arguments [`filter`] checks).
pub fn allowed_syscalls(thread: Thread) -> Vec<libc::c_long> {
    let mut list: Vec<libc::c_long> = COMMON.to_vec();
    if spawns(thread) {
        list.extend_from_slice(SPAWN);
    }
    list.extend(extra(thread));
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
        Thread::IsmWorker => ISM_WORKER.to_vec(),
        // tiny_http makes its sockets non-blocking and back.
        Thread::HttpServer => vec![FIONBIO],
        Thread::EventMonitor
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
        // Unix sockets only: the API socket, the event monitor, the broker.
        Thread::Main | Thread::HttpServer => &[libc::AF_UNIX],
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
fn rules(thread: Thread) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut map = BTreeMap::new();
    for nr in allowed_syscalls(thread) {
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

/// The compiled filter for `thread` under `mode`; `None` when filtering is off.
pub fn filter(thread: Thread, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules = rules(thread).map_err(|e| SeccompError::Build(thread, e))?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| SeccompError::Build(thread, e))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e| SeccompError::Compile(thread, e))?;
    Ok(Some(program))
}

static MODE: OnceLock<SeccompMode> = OnceLock::new();

/// Set the process-wide mode once, in `main`, before any thread starts.
pub fn set_mode(mode: SeccompMode) {
    let _ = MODE.set(mode);
    if mode != SeccompMode::Off {
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

/// The mode `main` set; off when it set none (unit tests that start device workers run
/// unfiltered).
fn mode() -> SeccompMode {
    MODE.get().copied().unwrap_or(SeccompMode::Off)
}

/// Apply `thread`'s filter to the calling thread under the process-wide mode.
pub fn apply(thread: Thread) -> Result<(), SeccompError> {
    if let Some(program) = filter(thread, mode())? {
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
        filter(thread, mode).unwrap().unwrap()
    }

    /// Exit code 7 when the syscall returned (whatever its result).
    fn returned(_ret: libc::c_long) -> i32 {
        7
    }

    #[test]
    fn test_every_thread_gets_a_filter_in_kill_and_log_mode_and_none_when_off() {
        for t in Thread::ALL {
            assert!(filter(t, SeccompMode::Kill).unwrap().is_some());
            assert!(filter(t, SeccompMode::Log).unwrap().is_some());
            assert!(filter(t, SeccompMode::Off).unwrap().is_none());
        }
        // Lists differ: only spawning threads may clone, only the ism worker (and the vCPUs
        // that start it) may create memfds, only vCPUs may run.
        assert!(!allowed_syscalls(Thread::EventMonitor).contains(&libc::SYS_clone3));
        assert!(!allowed_syscalls(Thread::IsmWorker).contains(&libc::SYS_clone3));
        assert!(allowed_syscalls(Thread::Vcpu).contains(&libc::SYS_memfd_create));
        assert!(allowed_syscalls(Thread::IsmWorker).contains(&libc::SYS_memfd_create));
        assert!(!allowed_syscalls(Thread::HttpServer).contains(&libc::SYS_memfd_create));
        assert!(!allowed_syscalls(Thread::RngWorker).contains(&libc::SYS_memfd_create));
        assert!(allowed_ioctls(Thread::Vcpu).contains(&ioctls::KVM_RUN));
        assert!(!allowed_ioctls(Thread::IsmWorker).contains(&ioctls::KVM_RUN));
        assert!(allowed_ioctls(Thread::RngWorker).is_empty());
    }

    /// A stacked worker filter only narrows: whatever the worker allows, the vCPU that
    /// starts it must allow too, or the worker would die on it.
    #[test]
    fn test_vcpu_filter_covers_the_workers_it_starts() {
        let vcpu = allowed_syscalls(Thread::Vcpu);
        let vcpu_ioctls = allowed_ioctls(Thread::Vcpu);
        for worker in [Thread::IsmWorker, Thread::RngWorker] {
            for nr in allowed_syscalls(worker) {
                assert!(vcpu.contains(&nr), "{worker:?}: syscall {nr}");
            }
            for request in allowed_ioctls(worker) {
                assert!(
                    vcpu_ioctls.contains(&request),
                    "{worker:?}: ioctl {request:#x}"
                );
            }
        }
    }

    /// The syscall each thread kind must not make, and what a compromised thread of that
    /// kind would try with it.
    fn forbidden(thread: Thread) -> (libc::c_long, fn() -> libc::c_long) {
        match thread {
            // Device workers and the pool client have no business opening sockets.
            Thread::IsmWorker | Thread::RngWorker | Thread::PoolClient | Thread::Vcpu => (
                libc::SYS_socket,
                // SAFETY: a socket syscall with plain integer arguments.
                || unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) },
            ),
            // The serial input thread only reads stdin: no files.
            Thread::SerialInput => (
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
            assert!(!allowed_syscalls(thread).contains(&nr), "{thread:?}");
            let status = in_child(&[&program(thread, SeccompMode::Kill)], || returned(call()));
            assert!(killed_by_sigsys(status), "{thread:?} true: {status:#x}");
            let status = in_child(&[&program(thread, SeccompMode::Log)], || returned(call()));
            assert!(exited_with(status, 7), "{thread:?} log: {status:#x}");
        }
    }

    /// Filters stack: a worker started by a vCPU keeps the vCPU filter and adds its own, so
    /// tgkill (which a vCPU may make) kills an ism worker; a call both allow goes through.
    #[test]
    fn test_a_worker_filter_stacked_on_the_vcpu_filter_narrows_it() {
        let vcpu = program(Thread::Vcpu, SeccompMode::Kill);
        let worker = program(Thread::IsmWorker, SeccompMode::Kill);
        // SAFETY: signal 0 only checks that the thread exists.
        let tgkill = || unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::syscall(libc::SYS_gettid),
                0,
            )
        };
        assert!(exited_with(in_child(&[&vcpu], || returned(tgkill())), 7));
        assert!(killed_by_sigsys(in_child(&[&vcpu, &worker], || returned(
            tgkill()
        ))));
        // SAFETY: eventfd2 with plain integer arguments.
        let eventfd = || unsafe { libc::syscall(libc::SYS_eventfd2, 0, 0) };
        assert!(exited_with(
            in_child(&[&vcpu, &worker], || returned(eventfd())),
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
            (Thread::HttpServer, ioctls::KVM_IRQFD, libc::FIONBIO),
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
        for thread in [Thread::Vcpu, Thread::IsmWorker, Thread::Main] {
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

    /// The API server opens unix sockets only.
    #[test]
    fn test_socket_families_are_checked() {
        let kill = program(Thread::HttpServer, SeccompMode::Kill);
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

    /// The request numbers in `ioctls` are the ones kvm-ioctls issues: every KVM call a
    /// vCPU and the ism worker make, made through kvm-ioctls under that thread's filter in
    /// kill mode, leaves the child alive (the calls may fail; they must not be filtered).
    #[test]
    fn test_kvm_calls_pass_the_filters_of_the_threads_that_make_them() {
        use kvm_bindings::{KvmIrqRouting, kvm_irq_routing_entry, kvm_userspace_memory_region};
        use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch};
        use vmm_sys_util::eventfd::EventFd;

        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: /dev/kvm missing: KVM ioctl numbers not checked under the filters");
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
        let worker = [
            &program(Thread::Vcpu, SeccompMode::Kill),
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
}
