// SPDX-License-Identifier: Apache-2.0
//! `--seccomp`: one seccompiler filter per kind of VMM thread, each applied by the thread
//! itself when it starts (a thread's filter also binds every thread it spawns later, which
//! is how device workers started on activation end up under the vCPU filter).
//!
//! The lists are syscall numbers only (no argument checks) and were taken from what each
//! thread does; `--seccomp log` shows anything missing in the kernel log (SECCOMP_RET_LOG,
//! audit type 1326, with the thread's name as `comm`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use crate::config::api::SeccompMode;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("Failed to build the seccomp filter for {0:?}")]
    Build(Thread, #[source] seccompiler::BackendError),
    #[error("Failed to compile the seccomp filter for {0:?}")]
    Compile(Thread, #[source] seccompiler::BackendError),
    #[error("Failed to apply the seccomp filter for {0:?}")]
    Apply(Thread, #[source] seccompiler::Error),
}

/// The kinds of VMM thread, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Thread {
    /// The main thread once the VM runs: API requests, teardown, device shutdown.
    Main,
    /// A vCPU: KVM_RUN, the buses, device activation (which starts device workers, so the
    /// list covers them too).
    Vcpu,
    /// "http-server" and the tiny_http threads it starts.
    HttpServer,
    EventMonitor,
    SignalHandler,
    /// "exit-forward": moves exit events onto the main thread's channel.
    ExitForward,
}

/// What every thread needs: memory, locks, its own exit, signal return, time.
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

fn extra(thread: Thread) -> &'static [libc::c_long] {
    match thread {
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
            libc::SYS_fcntl,
            libc::SYS_writev,
            libc::SYS_lseek,
            libc::SYS_ftruncate,
            libc::SYS_fallocate,
            libc::SYS_flock,
            libc::SYS_restart_syscall,
        ],
        Thread::Vcpu => &[
            libc::SYS_ioctl,
            libc::SYS_exit_group,
            libc::SYS_eventfd2,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_dup,
            libc::SYS_fcntl,
            libc::SYS_memfd_create,
            libc::SYS_fchmod,
            libc::SYS_ftruncate,
            libc::SYS_fallocate,
            libc::SYS_mremap,
            libc::SYS_openat,
            libc::SYS_statx,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_lseek,
            libc::SYS_pread64,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_shutdown,
            libc::SYS_sendmsg,
            libc::SYS_recvmsg,
            libc::SYS_sendto,
            libc::SYS_recvfrom,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_writev,
            libc::SYS_tgkill,
            libc::SYS_restart_syscall,
            libc::SYS_timerfd_create,
            libc::SYS_timerfd_settime,
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
    }
}

/// Whether `thread` may start threads.
fn spawns(thread: Thread) -> bool {
    matches!(thread, Thread::Main | Thread::Vcpu | Thread::HttpServer)
}

/// The syscalls `thread` may make.
pub fn allowed_syscalls(thread: Thread) -> Vec<libc::c_long> {
    let mut list: Vec<libc::c_long> = COMMON.to_vec();
    if spawns(thread) {
        list.extend_from_slice(SPAWN);
    }
    list.extend_from_slice(extra(thread));
    list.sort_unstable();
    list.dedup();
    list
}

/// The compiled filter for `thread` under `mode`; `None` when filtering is off.
pub fn filter(thread: Thread, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        SeccompMode::Kill => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
    };
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> = allowed_syscalls(thread)
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
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
}

fn mode() -> SeccompMode {
    MODE.get().copied().unwrap_or_default()
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

    #[test]
    fn test_every_thread_gets_a_filter_in_kill_and_log_mode_and_none_when_off() {
        for t in [
            Thread::Main,
            Thread::Vcpu,
            Thread::HttpServer,
            Thread::EventMonitor,
            Thread::SignalHandler,
            Thread::ExitForward,
        ] {
            assert!(filter(t, SeccompMode::Kill).unwrap().is_some());
            assert!(filter(t, SeccompMode::Log).unwrap().is_some());
            assert!(filter(t, SeccompMode::Off).unwrap().is_none());
        }
        // Lists differ: only spawning threads may clone, only vCPUs may memfd_create.
        assert!(!allowed_syscalls(Thread::EventMonitor).contains(&libc::SYS_clone3));
        assert!(allowed_syscalls(Thread::Vcpu).contains(&libc::SYS_memfd_create));
        assert!(!allowed_syscalls(Thread::HttpServer).contains(&libc::SYS_memfd_create));
    }

    /// In a child process: apply the event monitor's filter in kill mode, then make a
    /// syscall it does not allow (getppid). The child must die of SIGSYS.
    #[test]
    fn test_a_forbidden_syscall_kills_the_process() {
        let program = filter(Thread::EventMonitor, SeccompMode::Kill)
            .unwrap()
            .unwrap();
        // SAFETY: fork in a test; the child only applies a filter, makes raw syscalls and
        // exits, all async-signal-safe.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(3) };
            }
            // SAFETY: a syscall with no arguments.
            unsafe { libc::syscall(libc::SYS_getppid) };
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFSIGNALED(status), "status {status:#x}");
        assert_eq!(libc::WTERMSIG(status), libc::SIGSYS);
    }

    /// The same in log mode: the syscall goes through and the child exits normally.
    #[test]
    fn test_log_mode_lets_a_forbidden_syscall_through() {
        let program = filter(Thread::EventMonitor, SeccompMode::Log)
            .unwrap()
            .unwrap();
        // SAFETY: as above.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            if seccompiler::apply_filter(&program).is_err() {
                // SAFETY: leaving the forked child.
                unsafe { libc::_exit(3) };
            }
            // SAFETY: a syscall with no arguments.
            let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
            // SAFETY: leaving the forked child.
            unsafe { libc::_exit(if ppid > 0 { 7 } else { 4 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child with a valid status pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 7);
    }
}
