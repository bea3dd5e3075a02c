// SPDX-License-Identifier: Apache-2.0
//! Ringing peers' doorbell eventfds from userspace without ever blocking.
//!
//! A doorbell is an eventfd a peer VMM published through the pool: its KVM irqfd. The
//! descriptor shares its open file description with the peer, so the peer decides whether
//! it is `O_NONBLOCK` and can fill its counter at any time. A `write(2)` of 1 then blocks
//! the ism worker, or a vCPU on the trapped path while it holds the region table, until the
//! peer lets it go. `poll` before `write` only narrows that window.
//!
//! The kernel's own `eventfd_signal()` never blocks (it saturates the counter), and Linux AIO
//! calls it on completion for a request submitted with `IOCB_FLAG_RESFD`. So a ring is an
//! `IOCB_CMD_POLL` for `POLLIN` on a private eventfd whose counter is always 1: the poll is
//! ready at once, the request completes inside `io_submit`, and completion signals every
//! doorbell named as its `aio_resfd`. The kernel also checks that each doorbell really is an
//! eventfd. Completions are reaped right away, so the context never fills.
//!
//! Where AIO is unavailable (`io_setup` fails: not built in, or `fs.aio-max-nr` reached) the
//! ringer falls back to `poll` + `write` and says so once, since a hostile peer can then stall
//! a ring.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use log::warn;
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::fd::OwnedFd;

/// Requests in flight at once; a submission larger than this is split.
const MAX_BATCH: usize = 64;

/// `struct iocb` from `<linux/aio_abi.h>` (x86_64 / little-endian field order).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Iocb {
    aio_data: u64,
    aio_key: u32,
    aio_rw_flags: i32,
    aio_lio_opcode: u16,
    aio_reqprio: i16,
    aio_fildes: u32,
    aio_buf: u64,
    aio_nbytes: u64,
    aio_offset: i64,
    aio_reserved2: u64,
    aio_flags: u32,
    aio_resfd: u32,
}

/// `struct io_event` from `<linux/aio_abi.h>`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const IOCB_CMD_POLL: u16 = 5;
const IOCB_FLAG_RESFD: u32 = 1;

/// An AIO context plus the always-ready eventfd its poll requests watch.
struct AioRinger {
    context: u64,
    ready: OwnedFd,
}

impl AioRinger {
    fn new() -> io::Result<Self> {
        let ready = rustix::event::eventfd(1, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        let mut context: u64 = 0;
        // SAFETY: io_setup writes the new context id into `context`, a valid u64 we own.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                MAX_BATCH as libc::c_long,
                &mut context as *mut u64,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(AioRinger { context, ready })
    }

    /// Signal each doorbell once; returns how many the kernel accepted.
    fn ring(&self, doorbells: &[BorrowedFd<'_>]) -> usize {
        doorbells
            .chunks(MAX_BATCH)
            .map(|batch| self.ring_batch(batch))
            .sum()
    }

    fn ring_batch(&self, doorbells: &[BorrowedFd<'_>]) -> usize {
        let iocbs: Vec<Iocb> = doorbells
            .iter()
            .map(|doorbell| Iocb {
                aio_lio_opcode: IOCB_CMD_POLL,
                aio_fildes: self.ready.as_raw_fd() as u32,
                aio_buf: libc::POLLIN as u64,
                aio_flags: IOCB_FLAG_RESFD,
                aio_resfd: doorbell.as_raw_fd() as u32,
                ..Iocb::default()
            })
            .collect();
        let mut pointers: Vec<*const Iocb> = iocbs.iter().map(|iocb| iocb as *const Iocb).collect();
        let mut submitted = 0;
        while submitted < pointers.len() {
            let rest = &mut pointers[submitted..];
            // SAFETY: `rest` points at live iocbs that outlive the call; the kernel copies
            // each one in before io_submit returns and only reads `ready` and the doorbell
            // descriptors, which stay open for the call.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.context,
                    rest.len() as libc::c_long,
                    rest.as_mut_ptr(),
                )
            };
            if ret > 0 {
                submitted += ret as usize;
                continue;
            }
            // The request at `submitted` was refused (e.g. EINVAL: not an eventfd); skip it.
            if ret < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EAGAIN) && self.reap() > 0 {
                    continue;
                }
                log::debug!("virtio-ism: a doorbell refused its signal: {e}");
            }
            pointers.remove(submitted);
        }
        self.reap();
        submitted
    }

    /// Collect finished requests without waiting. Each completed inside io_submit.
    fn reap(&self) -> usize {
        let mut events = [IoEvent::default(); MAX_BATCH];
        let mut total = 0;
        loop {
            let zero = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `events` has room for MAX_BATCH entries and `zero` is a valid
            // timespec; both outlive the call.
            let ret = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.context,
                    0 as libc::c_long,
                    MAX_BATCH as libc::c_long,
                    events.as_mut_ptr(),
                    &zero as *const libc::timespec,
                )
            };
            if ret <= 0 {
                return total;
            }
            total += ret as usize;
            if (ret as usize) < MAX_BATCH {
                return total;
            }
        }
    }
}

impl Drop for AioRinger {
    fn drop(&mut self) {
        // SAFETY: destroys the context this ringer created; nothing uses it afterwards.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.context) };
    }
}

/// Rings doorbells; see the module documentation.
pub struct DoorbellRinger {
    aio: Option<AioRinger>,
}

impl DoorbellRinger {
    /// A ringer backed by AIO, or by `poll` + `write` (with a warning) when AIO is missing.
    pub fn new() -> Self {
        match AioRinger::new() {
            Ok(aio) => DoorbellRinger { aio: Some(aio) },
            Err(e) => {
                warn!(
                    "virtio-ism: Linux AIO is unavailable ({e}); doorbells are written with \
                     write(2), which a hostile peer can make block"
                );
                DoorbellRinger { aio: None }
            }
        }
    }

    /// Whether rings go through AIO and so can never block.
    #[cfg(test)]
    pub fn never_blocks(&self) -> bool {
        self.aio.is_some()
    }

    /// Signal each doorbell once; returns how many were signalled.
    pub fn ring(&self, doorbells: &[BorrowedFd<'_>]) -> usize {
        match &self.aio {
            Some(aio) => aio.ring(doorbells),
            None => doorbells
                .iter()
                .filter(|fd| write_if_writable(**fd))
                .count(),
        }
    }
}

impl Default for DoorbellRinger {
    fn default() -> Self {
        Self::new()
    }
}

fn write_if_writable(doorbell: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(&doorbell, PollFlags::OUT)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match rustix::event::poll(&mut fds, Some(&now)) {
        Ok(1) if fds[0].revents().contains(PollFlags::OUT) => {
            rustix::io::write(doorbell.as_fd(), &1u64.to_ne_bytes()).is_ok()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The eventfd counter's ceiling for write(2).
    const FULL: u64 = u64::MAX - 1;

    /// Read the counter if it is non-zero within 10 ms (the descriptor may be blocking).
    fn read_counter(fd: &OwnedFd) -> Option<u64> {
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        let wait = Timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        };
        if rustix::event::poll(&mut fds, Some(&wait)).ok()? == 0 {
            return None;
        }
        let mut buf = [0u8; 8];
        rustix::io::read(fd, &mut buf)
            .ok()
            .map(|_| u64::from_ne_bytes(buf))
    }

    #[test]
    fn test_ring_signals_each_doorbell_once() {
        let ringer = DoorbellRinger::new();
        assert!(ringer.never_blocks(), "this host has Linux AIO");
        let bells: Vec<OwnedFd> = (0..3)
            .map(|_| rustix::event::eventfd(0, EventfdFlags::NONBLOCK).unwrap())
            .collect();
        let borrowed: Vec<BorrowedFd<'_>> = bells.iter().map(|b| b.as_fd()).collect();
        for _ in 0..200 {
            assert_eq!(ringer.ring(&borrowed), 3);
        }
        for bell in &bells {
            assert_eq!(read_counter(bell), Some(200));
        }
    }

    #[test]
    fn test_ring_refuses_what_is_not_an_eventfd() {
        let ringer = DoorbellRinger::new();
        let (reader, writer) = rustix::pipe::pipe().unwrap();
        let bell = rustix::event::eventfd(0, EventfdFlags::NONBLOCK).unwrap();
        let fds = [writer.as_fd(), bell.as_fd(), reader.as_fd()];
        assert_eq!(ringer.ring(&fds), 1);
        assert_eq!(read_counter(&bell), Some(1));
    }

    /// A full counter on a blocking descriptor: the signal saturates instead of waiting.
    #[test]
    fn test_ring_does_not_block_on_a_full_blocking_doorbell() {
        let ringer = DoorbellRinger::new();
        let bell = rustix::event::eventfd(0, EventfdFlags::empty()).unwrap();
        rustix::io::write(&bell, &FULL.to_ne_bytes()).unwrap();
        assert_eq!(ringer.ring(&[bell.as_fd()]), 1);
        assert_eq!(read_counter(&bell), Some(u64::MAX));
    }

    /// What could block a ring is `write(2)` on a descriptor whose flags and counter the peer
    /// controls (a peer that keeps its doorbell blocking and refills it the moment it is
    /// drained made poll-then-write stall for 300-700 ms). So: ring from a thread that may
    /// not `write` or `poll` at all, against a full blocking doorbell and an empty one; every
    /// ring must still land (the kernel's `eventfd_signal()` saturates instead of waiting).
    #[test]
    fn test_ring_never_writes_or_polls_the_doorbell() {
        use seccompiler::{SeccompAction, SeccompFilter, TargetArch};
        let full = rustix::event::eventfd(0, EventfdFlags::empty()).unwrap();
        rustix::io::write(&full, &FULL.to_ne_bytes()).unwrap();
        let empty = rustix::event::eventfd(0, EventfdFlags::empty()).unwrap();
        let ringer = DoorbellRinger::new();
        let refused: std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            [libc::SYS_write, libc::SYS_poll, libc::SYS_ppoll]
                .into_iter()
                .map(|nr| (nr, Vec::new()))
                .collect();
        let filter: seccompiler::BpfProgram = SeccompFilter::new(
            refused,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EPERM as u32),
            TargetArch::x86_64,
        )
        .unwrap()
        .try_into()
        .unwrap();
        let rung = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    seccompiler::apply_filter(&filter).unwrap();
                    (0..1000)
                        .map(|_| ringer.ring(&[full.as_fd(), empty.as_fd()]))
                        .sum::<usize>()
                })
                .join()
                .unwrap()
        });
        assert_eq!(rung, 2000);
        assert_eq!(read_counter(&full), Some(u64::MAX));
        assert_eq!(read_counter(&empty), Some(1000));
    }
}
