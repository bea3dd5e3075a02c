// SPDX-License-Identifier: Apache-2.0
//! `--serial` (the 16550 on COM1) and `--console` (virtio-console, not provided: only `off`).

use std::path::PathBuf;

use super::option_parser::{OptionParser, OptionParserError};
use super::{Error, ValidationError, VmConfig};

/// Where the COM1 serial port goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// No serial device at all.
    Off,
    /// A serial device whose output is dropped (cloud-hypervisor's default).
    Null,
    /// Output to stdout, input from stdin.
    Tty,
    /// Output appended to a file.
    File(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialConfig {
    pub mode: SerialMode,
}

/// Parse an output option (cloud-hypervisor's `off|null|tty|pty|file=<path>` family) that
/// accepts the words `valueless` and `file=<path>`.
fn parse_output(input: &str, valueless: &[&str]) -> Result<OptionParser, OptionParserError> {
    let mut parser = OptionParser::new();
    for word in valueless {
        parser.add_valueless(word);
    }
    parser.add("file");
    parser.parse(input)?;
    Ok(parser)
}

impl Default for SerialConfig {
    fn default() -> Self {
        Self {
            mode: SerialMode::Null,
        }
    }
}

impl SerialConfig {
    pub const SYNTAX: &'static str = "Control serial port: off|null|tty|file=</path/to/a/file>";

    pub fn parse(input: &str) -> Result<Self, Error> {
        let parser = parse_output(input, &["off", "null", "tty"]).map_err(Error::ParseSerial)?;
        let given = ["off", "null", "tty", "file"]
            .iter()
            .filter(|k| parser.is_set(k))
            .count();
        if given != 1 {
            return Err(Error::ParseSerialMode);
        }
        let mode = if parser.is_set("off") {
            SerialMode::Off
        } else if parser.is_set("null") {
            SerialMode::Null
        } else if parser.is_set("tty") {
            SerialMode::Tty
        } else {
            let path = parser.get("file").unwrap_or_default();
            if path.is_empty() {
                return Err(Error::ParseSerialMode);
            }
            SerialMode::File(PathBuf::from(path))
        };
        Ok(Self { mode })
    }

    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ValidationError> {
        Ok(())
    }
}

/// `--console`: the virtio-console device. Only `off` is accepted: this VMM has no
/// virtio-console, and saying so beats silently ignoring `tty`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleConfig;

impl ConsoleConfig {
    pub const SYNTAX: &'static str = "Control (virtio) console: off (no virtio-console device)";

    pub fn parse(input: &str) -> Result<Self, Error> {
        let parser =
            parse_output(input, &["off", "null", "tty", "pty"]).map_err(Error::ParseConsole)?;
        if parser.is_set("off")
            && !["null", "tty", "pty", "file"]
                .iter()
                .any(|k| parser.is_set(k))
        {
            Ok(Self)
        } else {
            Err(Error::ConsoleUnsupported)
        }
    }

    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ValidationError> {
        Ok(())
    }
}
