// SPDX-License-Identifier: Apache-2.0
//! The process-wide panic hook: one line on stderr with the thread, the location and the
//! message, written with plain `write(2)`, then `abort()`.
//!
//! std's default hook can make syscalls a thread's seccomp filter refuses (it resolves the
//! working directory to shorten backtrace paths: `getcwd`), so a panic in a filtered thread
//! used to end the VMM with a silent SIGSYS. This hook formats into a buffer on the stack and
//! needs only `write`; `abort()` needs `rt_sigprocmask`, `gettid`, `getpid` and
//! `tgkill(getpid(), tid, SIGABRT)`, which every filter allows (seccomp/mod.rs).
//!
//! A panic anywhere ends the VMM: a thread that died half-way through a device or API
//! operation would leave the VM in a state nothing else expects.

use std::fmt::Write as _;
use std::panic::PanicHookInfo;

/// The longest message written; the rest of a longer one is cut (and marked with `...`).
const MESSAGE_MAX: usize = 1024;

/// A fixed buffer that takes what fits and remembers whether something did not.
struct Line {
    buf: [u8; MESSAGE_MAX],
    len: usize,
    cut: bool,
}

impl Line {
    const fn new() -> Self {
        Self {
            buf: [0; MESSAGE_MAX],
            len: 0,
            cut: false,
        }
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Room for the text: `...` and the newline always fit after it.
const TEXT_MAX: usize = MESSAGE_MAX - 4;

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut take = s.len().min(TEXT_MAX - self.len);
        // Keep the line valid UTF-8.
        while !s.is_char_boundary(take) {
            take -= 1;
        }
        self.buf[self.len..self.len + take].copy_from_slice(&s.as_bytes()[..take]);
        self.len += take;
        self.cut |= take < s.len();
        Ok(())
    }
}

impl Line {
    /// Append bytes that always fit (`...` and the newline).
    fn finish(&mut self) {
        if self.cut {
            self.buf[self.len..self.len + 3].copy_from_slice(b"...");
            self.len += 3;
        }
        self.buf[self.len] = b'\n';
        self.len += 1;
    }
}

/// The line the hook writes for a panic in `thread` at `location` with `payload`.
fn format_message(thread: &str, location: &str, payload: &str) -> Line {
    let mut line = Line::new();
    let _ = write!(
        line,
        "ism-vmm: thread '{thread}' panicked at {location}: {payload}"
    );
    line.finish();
    line
}

/// The panic's message, when it is a string (`panic!` with or without arguments).
fn payload<'a>(info: &'a PanicHookInfo<'_>) -> &'a str {
    if let Some(s) = info.payload().downcast_ref::<&str>() {
        s
    } else if let Some(s) = info.payload().downcast_ref::<String>() {
        s
    } else {
        "Box<dyn Any>"
    }
}

/// Write all of `bytes` to stderr with `write(2)`; give up on an error.
fn write_stderr(mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: writing from a valid, initialised buffer of `bytes.len()` bytes.
        let n = unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => bytes = &bytes[n..],
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return,
        }
    }
}

fn hook(info: &PanicHookInfo<'_>) {
    let current = std::thread::current();
    let thread = current.name().unwrap_or("<unnamed>");
    let mut location = Line::new();
    match info.location() {
        Some(l) => {
            let _ = write!(location, "{}:{}:{}", l.file(), l.line(), l.column());
        }
        None => {
            let _ = location.write_str("<unknown>");
        }
    }
    let location = std::str::from_utf8(location.as_bytes()).unwrap_or("<unknown>");
    write_stderr(format_message(thread, location, payload(info)).as_bytes());
    std::process::abort();
}

/// Install the hook; `main` does it before any thread starts.
pub fn install() {
    std::panic::set_hook(Box::new(hook));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_message_names_thread_location_and_payload() {
        let line = format_message("vcpu0", "src/x.rs:1:2", "boom");
        assert_eq!(
            line.as_bytes(),
            b"ism-vmm: thread 'vcpu0' panicked at src/x.rs:1:2: boom\n"
        );
    }

    #[test]
    fn test_a_long_message_is_cut_on_a_char_boundary_and_marked() {
        let long = "\u{e9}".repeat(2 * MESSAGE_MAX);
        let line = format_message("t", "l", &long);
        let text = std::str::from_utf8(line.as_bytes()).expect("valid UTF-8");
        assert!(text.len() <= MESSAGE_MAX);
        assert!(text.ends_with("...\n"), "{text}");
    }
}
