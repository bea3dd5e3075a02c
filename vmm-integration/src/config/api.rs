// SPDX-License-Identifier: Apache-2.0
//! The operator options: `--api-socket`, `--event-monitor` and `--seccomp`. They configure the
//! VMM process, not the VM, so they live beside [`super::VmConfig`] rather than in it (as
//! cloud-hypervisor keeps them out of its `VmConfig`).

use std::os::fd::RawFd;
use std::path::PathBuf;

use super::option_parser::{OptionParser, OptionParserError};

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("Error parsing --api-socket")]
    ParseApiSocket(#[source] OptionParserError),
    #[error("Error parsing --api-socket: expected path=<path>, fd=<n> or a bare path")]
    ApiSocketForm,
    #[error("Error parsing --event-monitor")]
    ParseEventMonitor(#[source] OptionParserError),
    #[error("Error parsing --event-monitor: expected exactly one of path=<path>, fd=<n>")]
    EventMonitorForm,
    #[error("Error parsing --seccomp: {0:?} is not one of true, false, log")]
    Seccomp(String),
}

/// A path to create, or a file descriptor inherited from the parent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Path(PathBuf),
    Fd(RawFd),
}

/// Parse `path=<p>` or `fd=<n>` (and, if `bare_path_ok`, a value without `=` as a path).
fn parse_endpoint(input: &str, bare_path_ok: bool) -> Result<Option<Endpoint>, OptionParserError> {
    if bare_path_ok && !input.contains('=') {
        return Ok((!input.is_empty()).then(|| Endpoint::Path(PathBuf::from(input))));
    }
    let mut parser = OptionParser::new();
    parser.add_all(&["path", "fd"]);
    parser.parse(input)?;
    let path = parser.get("path").filter(|p| !p.is_empty());
    let fd = parser.convert::<RawFd>("fd")?;
    Ok(match (path, fd) {
        (Some(p), None) => Some(Endpoint::Path(PathBuf::from(p))),
        (None, Some(fd)) if fd >= 0 => Some(Endpoint::Fd(fd)),
        _ => None,
    })
}

/// `--api-socket path=<p>|fd=<n>|<p>`: where the REST API listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiSocketConfig {
    pub endpoint: Endpoint,
}

impl ApiSocketConfig {
    pub const SYNTAX: &'static str =
        "HTTP API socket \"path=</path/to/a/socket>|fd=<inherited fd>\" (a bare path also works)";

    pub fn parse(input: &str) -> Result<Self, OperatorError> {
        let endpoint = parse_endpoint(input, true)
            .map_err(OperatorError::ParseApiSocket)?
            .ok_or(OperatorError::ApiSocketForm)?;
        Ok(Self { endpoint })
    }
}

/// `--event-monitor path=<p>|fd=<n>`: where JSON events go. The file is truncated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventMonitorConfig {
    pub endpoint: Endpoint,
}

impl EventMonitorConfig {
    pub const SYNTAX: &'static str =
        "File to report events on: \"path=</path/to/a/file>|fd=<inherited fd>\"";

    pub fn parse(input: &str) -> Result<Self, OperatorError> {
        let endpoint = parse_endpoint(input, false)
            .map_err(OperatorError::ParseEventMonitor)?
            .ok_or(OperatorError::EventMonitorForm)?;
        Ok(Self { endpoint })
    }
}

/// `--seccomp true|false|log`: what a thread's filter does with a syscall it does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// Kill the process (the default, as in cloud-hypervisor).
    #[default]
    Kill,
    /// No filters.
    Off,
    /// Allow, and have the kernel log the syscall (SECCOMP_RET_LOG).
    Log,
}

impl SeccompMode {
    pub const SYNTAX: &'static str = "Seccomp filtering of every VMM thread: true (kill on a forbidden syscall; the default), false, log";

    pub fn parse(input: &str) -> Result<Self, OperatorError> {
        match input {
            "true" | "on" => Ok(Self::Kill),
            "false" | "off" => Ok(Self::Off),
            "log" => Ok(Self::Log),
            other => Err(OperatorError::Seccomp(other.to_owned())),
        }
    }
}

/// The operator options together, as `vmm::run_with` takes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OperatorConfig {
    pub api_socket: Option<ApiSocketConfig>,
    pub event_monitor: Option<EventMonitorConfig>,
    pub seccomp: SeccompMode,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_api_socket_forms() {
        let p = |s| ApiSocketConfig::parse(s).map(|c| c.endpoint);
        assert_eq!(
            p("/tmp/a.sock").unwrap(),
            Endpoint::Path("/tmp/a.sock".into())
        );
        assert_eq!(p("path=/tmp/b").unwrap(), Endpoint::Path("/tmp/b".into()));
        assert_eq!(p("fd=3").unwrap(), Endpoint::Fd(3));
        assert!(p("").is_err());
        assert!(p("fd=-1").is_err());
        assert!(p("fd=x").is_err());
        assert!(p("path=/a,fd=3").is_err());
        assert!(p("socket=/a").is_err());
    }

    #[test]
    fn test_event_monitor_needs_a_key() {
        let p = |s| EventMonitorConfig::parse(s).map(|c| c.endpoint);
        assert_eq!(p("path=/tmp/ev").unwrap(), Endpoint::Path("/tmp/ev".into()));
        assert_eq!(p("fd=4").unwrap(), Endpoint::Fd(4));
        assert!(p("/tmp/ev").is_err());
        assert!(p("path=").is_err());
    }

    #[test]
    fn test_seccomp_values() {
        assert_eq!(SeccompMode::parse("true").unwrap(), SeccompMode::Kill);
        assert_eq!(SeccompMode::parse("false").unwrap(), SeccompMode::Off);
        assert_eq!(SeccompMode::parse("log").unwrap(), SeccompMode::Log);
        assert!(SeccompMode::parse("errno").is_err());
        assert_eq!(SeccompMode::default(), SeccompMode::Kill);
    }
}
