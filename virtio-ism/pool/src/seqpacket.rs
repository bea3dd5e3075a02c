// SPDX-License-Identifier: Apache-2.0
//! Unix SOCK_SEQPACKET sockets carrying one protocol message per packet, with file
//! descriptors passed by SCM_RIGHTS.
//!
//! Packets keep message boundaries, so a malformed message never desynchronises the stream
//! and an oversized one is detected (MSG_TRUNC) and answered instead of closing the link.

use std::cell::RefCell;
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::wire::MAX_MESSAGE_LEN;

/// Most descriptors sent or accepted with one packet (a full DOORBELLS reply); more are
/// closed by the kernel.
pub const MAX_FDS_PER_PACKET: usize = crate::wire::MAX_DOORBELLS_PER_REPLY;

fn new_socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A listening socket at `path`.
pub fn listen(path: &Path, backlog: i32) -> io::Result<OwnedFd> {
    let socket = new_socket()?;
    rustix::net::bind(&socket, &SocketAddrUnix::new(path)?)?;
    rustix::net::listen(&socket, backlog)?;
    Ok(socket)
}

pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rustix::net::accept_with(listener, SocketFlags::CLOEXEC)?)
}

pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let socket = new_socket()?;
    rustix::net::connect(&socket, &SocketAddrUnix::new(path)?)?;
    Ok(socket)
}

/// Bounds how long a send may block on a peer that does not read.
pub fn set_send_timeout(socket: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_timeout(
        socket,
        rustix::net::sockopt::Timeout::Send,
        Some(timeout),
    )?)
}

/// Bounds how long a receive may block (`None`: for ever).
pub fn set_recv_timeout(socket: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_socket_timeout(
        socket,
        rustix::net::sockopt::Timeout::Recv,
        timeout,
    )?)
}

/// Sends one packet, with `fd` attached if given.
pub fn send(socket: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
    match fd {
        Some(fd) => send_fds(socket, bytes, &[fd]),
        None => send_fds(socket, bytes, &[]),
    }
}

/// Sends one packet with up to MAX_FDS_PER_PACKET descriptors attached.
pub fn send_fds(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS_PER_PACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "Too many descriptors for one packet",
        ));
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_PACKET))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("Control buffer too small"));
    }
    let sent = rustix::net::sendmsg(
        socket,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if sent != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "Short packet send",
        ));
    }
    Ok(())
}

/// One received packet.
#[derive(Debug)]
pub struct Packet {
    /// At most MAX_MESSAGE_LEN bytes of it.
    pub bytes: Vec<u8>,
    /// The packet was longer than MAX_MESSAGE_LEN; `bytes` holds its start.
    pub truncated: bool,
    /// Descriptors that came with it (received close-on-exec).
    pub fds: Vec<OwnedFd>,
}

/// Receives one packet; `None` at end of stream.
pub fn recv(socket: BorrowedFd<'_>) -> io::Result<Option<Packet>> {
    RECV_BUFFER.with_borrow_mut(|buffer| recv_into(socket, buffer))
}

thread_local! {
    /// Room for the longest message, kept per thread: most packets are a few dozen bytes,
    /// and a fresh zeroed 64 KiB buffer per packet cost more than receiving it.
    static RECV_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; MAX_MESSAGE_LEN].into_boxed_slice());
}

fn recv_into(socket: BorrowedFd<'_>, bytes: &mut [u8]) -> io::Result<Option<Packet>> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_PACKET))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    // CMSG_CLOEXEC: region fds must not leak into processes the VMM spawns.
    // TRUNC: report the real length of an oversized packet.
    let mut flags = RecvFlags::CMSG_CLOEXEC | RecvFlags::TRUNC;
    let mut reset = None;
    let received = loop {
        match rustix::net::recvmsg(socket, &mut [IoSliceMut::new(bytes)], &mut control, flags) {
            Ok(received) => break received,
            Err(rustix::io::Errno::INTR) => continue,
            // A peer that closed with our packets unread (a broker refusing a connection
            // right after sending why) makes the kernel report ECONNRESET before the
            // packets it sent are read: read those first (without blocking).
            Err(rustix::io::Errno::CONNRESET) if reset.is_none() => {
                reset = Some(rustix::io::Errno::CONNRESET);
                flags |= RecvFlags::DONTWAIT;
            }
            Err(e) => return Err(reset.unwrap_or(e).into()),
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received_fds) = message {
            fds.extend(received_fds);
        }
    }
    // SOCK_SEQPACKET reports an empty packet and the end of the stream alike (0 bytes): only
    // a hung-up socket is the end. An empty packet is a message like any other (a malformed
    // one), not a reason to drop the connection.
    if received.bytes == 0 && fds.is_empty() && hung_up(socket) {
        return Ok(None);
    }
    let truncated = received.bytes > MAX_MESSAGE_LEN || received.flags.contains(ReturnFlags::TRUNC);
    Ok(Some(Packet {
        bytes: bytes[..received.bytes.min(MAX_MESSAGE_LEN)].to_vec(),
        truncated,
        fds,
    }))
}

/// Whether the peer closed or shut down its sending side, or this side shut down: nothing
/// more will arrive once what is queued has been read.
fn hung_up(socket: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(&socket, PollFlags::RDHUP)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(_) => fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::RDHUP),
        // Cannot tell: the end, as before.
        Err(_) => true,
    }
}

/// Stops both directions so that a thread blocked in `recv` on this socket returns.
pub fn shutdown(socket: BorrowedFd<'_>) {
    let _ = rustix::net::shutdown(socket, rustix::net::Shutdown::Both);
}

/// Waits until `socket` or `extra` is readable (or hung up), or `timeout` passes; returns
/// (socket ready, extra ready), both false on timeout.
pub fn wait_readable(
    socket: BorrowedFd<'_>,
    extra: Option<BorrowedFd<'_>>,
    timeout: Option<Duration>,
) -> io::Result<(bool, bool)> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let wanted = PollFlags::IN;
    let ready = |flags: PollFlags| {
        flags.intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR | PollFlags::NVAL)
    };
    let timeout = timeout.map(|t| Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    loop {
        let result = match extra {
            Some(extra) => {
                let mut fds = [PollFd::new(&socket, wanted), PollFd::new(&extra, wanted)];
                rustix::event::poll(&mut fds, timeout.as_ref())
                    .map(|_| (ready(fds[0].revents()), ready(fds[1].revents())))
            }
            None => {
                let mut fds = [PollFd::new(&socket, wanted)];
                rustix::event::poll(&mut fds, timeout.as_ref())
                    .map(|_| (ready(fds[0].revents()), false))
            }
        };
        match result {
            Ok(readiness) => return Ok(readiness),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Peer process id, uid and gid, from SO_PEERCRED (as they were at connect time).
pub fn peer_credentials(socket: BorrowedFd<'_>) -> io::Result<(u32, u32, u32)> {
    let cred = rustix::net::sockopt::socket_peercred(socket)?;
    Ok((
        cred.pid.as_raw_nonzero().get() as u32,
        cred.uid.as_raw(),
        cred.gid.as_raw(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    #[test]
    fn test_an_empty_packet_is_a_packet() {
        let (a, b) = pair();
        send(a.as_fd(), b"", None).unwrap();
        send(a.as_fd(), b"next", None).unwrap();
        let empty = recv(b.as_fd())
            .unwrap()
            .expect("an empty packet, not the end");
        assert!(empty.bytes.is_empty() && empty.fds.is_empty() && !empty.truncated);
        assert_eq!(recv(b.as_fd()).unwrap().unwrap().bytes, b"next");
    }

    #[test]
    fn test_the_end_of_the_stream_is_none() {
        // The peer closes, with an empty packet still queued.
        let (a, b) = pair();
        send(a.as_fd(), b"", None).unwrap();
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none());
        // The peer stops sending.
        let (a, b) = pair();
        rustix::net::shutdown(&a, rustix::net::Shutdown::Write).unwrap();
        assert!(recv(b.as_fd()).unwrap().is_none());
        // This side shuts down (how a reader thread is stopped).
        let (_a, b) = pair();
        shutdown(b.as_fd());
        assert!(recv(b.as_fd()).unwrap().is_none());
    }

    #[test]
    fn test_a_packet_longer_than_a_message_is_cut_and_flagged() {
        let (a, b) = pair();
        let long = vec![7u8; MAX_MESSAGE_LEN + 10];
        send(a.as_fd(), &long, None).unwrap();
        send(a.as_fd(), b"short", None).unwrap();
        let cut = recv(b.as_fd()).unwrap().unwrap();
        assert!(cut.truncated);
        assert_eq!(cut.bytes.len(), MAX_MESSAGE_LEN);
        // The buffer kept between calls holds nothing of the long packet for the next.
        let next = recv(b.as_fd()).unwrap().unwrap();
        assert!(!next.truncated);
        assert_eq!(next.bytes, b"short");
    }
}
