// SPDX-License-Identifier: Apache-2.0
//! ism-remote: drive a running ism-vmm through its REST API, in the style of
//! cloud-hypervisor's `ch-remote --api-socket <path> <command> [arg]`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Arg, Command};

// The request/response bodies and the option-string parser are the VMM's own.
use ism_vmm::config::option_parser::{ByteSized, OptionParser, OptionParserError};
use ism_vmm::rest::{
    GrantPerm, IsmAddRegionRequest, IsmGrant, IsmRemoveRegionRequest, RegionAccess,
};

#[derive(Debug, thiserror::Error)]
enum RemoteError {
    #[error("Failed to connect to the API socket {0}")]
    Connect(PathBuf, #[source] std::io::Error),
    #[error("Failed to send the request")]
    Send(#[source] std::io::Error),
    #[error("Failed to read the response")]
    Receive(#[source] std::io::Error),
    #[error("Malformed response: {0}")]
    Malformed(String),
    #[error("The VMM answered {0}: {1}")]
    Status(u16, String),
    #[error("Error parsing the {0} argument")]
    Parse(&'static str, #[source] OptionParserError),
    #[error("The {0} argument needs {1}")]
    Missing(&'static str, &'static str),
    #[error("access={0:?} is not one of granted, read, rw")]
    Access(String),
    #[error("Permission {0:?} is not one of none, ro, rw")]
    Perm(String),
    #[error("Grant {0:?} is not <peer devid>:<ro|rw>")]
    Grant(String),
    #[error("Invalid ism-add-region argument: {0}")]
    AddRegion(String),
    #[error("Failed to serialise the request")]
    Serialise(#[source] serde_json::Error),
}

/// One HTTP/1.1 request on a fresh connection; returns the status and the body.
fn request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
) -> Result<(u16, String), RemoteError> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| RemoteError::Connect(socket.to_owned(), e))?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body.as_bytes()))
        .map_err(RemoteError::Send)?;
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader
        .read_line(&mut status_line)
        .map_err(RemoteError::Receive)?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| RemoteError::Malformed(status_line.trim_end().to_owned()))?;
    let mut length: Option<usize> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(RemoteError::Receive)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok();
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => reader
            .take(n as u64)
            .read_to_end(&mut body)
            .map_err(RemoteError::Receive)?,
        None => reader
            .read_to_end(&mut body)
            .map_err(RemoteError::Receive)?,
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn parse_access(s: Option<String>) -> Result<RegionAccess, RemoteError> {
    match s.as_deref() {
        None | Some("granted") => Ok(RegionAccess::Granted),
        Some("read") => Ok(RegionAccess::Read),
        Some("rw") => Ok(RegionAccess::ReadWrite),
        Some(other) => Err(RemoteError::Access(other.to_owned())),
    }
}

fn parse_perm(s: &str) -> Result<GrantPerm, RemoteError> {
    match s {
        "none" => Ok(GrantPerm::None),
        "ro" => Ok(GrantPerm::Ro),
        "rw" => Ok(GrantPerm::Rw),
        other => Err(RemoteError::Perm(other.to_owned())),
    }
}

/// `[2:ro,3:rw]` (or a single `2:ro`): per-peer grants.
fn parse_grants(s: &str) -> Result<Vec<IsmGrant>, RemoteError> {
    let list = s
        .strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .unwrap_or(s);
    list.split(',')
        .filter(|g| !g.is_empty())
        .map(|g| {
            let (peer, perm) = g
                .split_once(':')
                .ok_or_else(|| RemoteError::Grant(g.to_owned()))?;
            Ok(IsmGrant {
                peer: peer.parse().map_err(|_| RemoteError::Grant(g.to_owned()))?,
                perm: parse_perm(perm)?,
            })
        })
        .collect()
}

/// Parse the options of `command` (which include `id`) from `input`; returns the parser and
/// the ISM device id, which every region command needs.
fn parse_region_command(
    command: &'static str,
    input: &str,
    options: &[&str],
) -> Result<(OptionParser, String), RemoteError> {
    let mut parser = OptionParser::new();
    parser.add_all(options);
    parser
        .parse(input)
        .map_err(|e| RemoteError::Parse(command, e))?;
    let id = parser
        .get("id")
        .ok_or(RemoteError::Missing(command, "id=<ism device id>"))?;
    Ok((parser, id))
}

/// `id=<ism id>,token=<n>[,access=granted|read|rw]` (attach) or
/// `id=<ism id>,size=<bytes>[,grants=[<peer>:<ro|rw>,...]][,default_perm=none|ro|rw]`
/// (create), checked as the VMM checks it.
fn parse_add_region(input: &str) -> Result<IsmAddRegionRequest, RemoteError> {
    const COMMAND: &str = "ism-add-region";
    let (parser, id) = parse_region_command(
        COMMAND,
        input,
        &["id", "token", "access", "size", "grants", "default_perm"],
    )?;
    let req = IsmAddRegionRequest {
        id,
        token: parser
            .convert::<u64>("token")
            .map_err(|e| RemoteError::Parse(COMMAND, e))?,
        access: parser
            .get("access")
            .map(|a| parse_access(Some(a)))
            .transpose()?,
        size: parser
            .convert::<ByteSized>("size")
            .map_err(|e| RemoteError::Parse(COMMAND, e))?
            .map(|b| b.0),
        grants: parser
            .get("grants")
            .map(|g| parse_grants(&g))
            .transpose()?
            .unwrap_or_default(),
        default_perm: parser
            .get("default_perm")
            .map(|p| parse_perm(&p))
            .transpose()?,
    };
    req.kind().map_err(RemoteError::AddRegion)?;
    Ok(req)
}

/// `id=<ism id>,token=<n>`.
fn parse_remove_region(input: &str) -> Result<IsmRemoveRegionRequest, RemoteError> {
    const COMMAND: &str = "ism-remove-region";
    let (parser, id) = parse_region_command(COMMAND, input, &["id", "token"])?;
    let token = parser
        .convert::<u64>("token")
        .map_err(|e| RemoteError::Parse(COMMAND, e))?
        .ok_or(RemoteError::Missing(COMMAND, "token=<region token>"))?;
    Ok(IsmRemoveRegionRequest { id, token })
}

fn create_app() -> Command {
    let region = |name: &'static str, help: &'static str, syntax: &'static str| {
        Command::new(name)
            .about(help)
            .arg(Arg::new("region").required(true).help(syntax))
    };
    Command::new("ism-remote")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Remotely control a running ism-vmm through its REST API")
        .arg(
            Arg::new("api-socket")
                .long("api-socket")
                .help("HTTP API socket path (UNIX domain socket)")
                .required(true)
                .num_args(1),
        )
        .subcommand_required(true)
        .subcommand(Command::new("ping").about("Ping the VMM (vmm.ping)"))
        .subcommand(Command::new("info").about("VM configuration, state and devices (vm.info)"))
        .subcommand(Command::new("counters").about("Per-device counters (vm.counters)"))
        .subcommand(Command::new("shutdown").about("Stop the VM (vm.shutdown)"))
        .subcommand(Command::new("reboot").about("Reboot request; the VMM exits (vm.reboot)"))
        .subcommand(Command::new("pause").about("Pause every vCPU (vm.pause)"))
        .subcommand(Command::new("resume").about("Resume a paused VM (vm.resume)"))
        .subcommand(region(
            "ism-add-region",
            "Attach a pool region to an ism device, or create one (vm.ism-add-region)",
            "id=<ism device id>,token=<region token>[,access=granted|read|rw] to attach, or \
             id=<ism device id>,size=<bytes>[,grants=[<peer devid>:<ro|rw>,...]]\
             [,default_perm=none|ro|rw] to create",
        ))
        .subcommand(region(
            "ism-remove-region",
            "Revoke a region from an ism device (vm.ism-remove-region)",
            "id=<ism device id>,token=<region token>",
        ))
        .subcommand(Command::new("ism-regions").about("Regions each ism device holds"))
        .subcommand(Command::new("ism-pool-status").about("The pool as each ism device sees it"))
}

fn run(matches: &clap::ArgMatches) -> Result<String, RemoteError> {
    let socket = PathBuf::from(
        matches
            .get_one::<String>("api-socket")
            .expect("required by clap"),
    );
    let (command, sub) = matches.subcommand().expect("required by clap");
    let region_arg = || {
        sub.get_one::<String>("region")
            .map(String::as_str)
            .unwrap_or_default()
    };
    let (method, endpoint, body) = match command {
        "ping" => ("GET", "vmm.ping", None),
        "info" => ("GET", "vm.info", None),
        "counters" => ("GET", "vm.counters", None),
        "shutdown" => ("PUT", "vm.shutdown", None),
        "reboot" => ("PUT", "vm.reboot", None),
        "pause" => ("PUT", "vm.pause", None),
        "resume" => ("PUT", "vm.resume", None),
        "ism-regions" => ("GET", "vm.ism-regions", None),
        "ism-pool-status" => ("GET", "vm.ism-pool-status", None),
        "ism-add-region" => {
            let req = parse_add_region(region_arg())?;
            let json = serde_json::to_string(&req).map_err(RemoteError::Serialise)?;
            ("PUT", "vm.ism-add-region", Some(json))
        }
        "ism-remove-region" => {
            let req = parse_remove_region(region_arg())?;
            let json = serde_json::to_string(&req).map_err(RemoteError::Serialise)?;
            ("PUT", "vm.ism-remove-region", Some(json))
        }
        other => unreachable!("clap knows no command {other}"),
    };
    let (status, body) = request(&socket, method, endpoint, body.as_deref())?;
    if !(200..300).contains(&status) {
        return Err(RemoteError::Status(status, body));
    }
    Ok(body)
}

fn main() -> ExitCode {
    let matches = create_app().get_matches();
    match run(&matches) {
        Ok(body) => {
            if !body.is_empty() {
                // Pretty-print JSON answers; anything else as it came.
                match serde_json::from_str::<serde_json::Value>(&body) {
                    Ok(v) => println!(
                        "{}",
                        serde_json::to_string_pretty(&v).unwrap_or(body.clone())
                    ),
                    Err(_) => println!("{body}"),
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("Error: {:#}", anyhow::Error::new(e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cli_parses_every_command() {
        for cmd in [
            "ping",
            "info",
            "counters",
            "shutdown",
            "reboot",
            "pause",
            "resume",
            "ism-regions",
            "ism-pool-status",
        ] {
            assert!(
                create_app()
                    .try_get_matches_from(["ism-remote", "--api-socket", "/s", cmd])
                    .is_ok(),
                "{cmd}"
            );
        }
        assert!(
            create_app()
                .try_get_matches_from(["ism-remote", "--api-socket", "/s", "ism-add-region"])
                .is_err()
        );
    }

    #[test]
    fn test_region_argument() {
        let req = parse_add_region("id=ism0,token=42,access=rw").unwrap();
        assert_eq!(
            (req.id.as_str(), req.token, req.access),
            ("ism0", Some(42), Some(RegionAccess::ReadWrite))
        );
        let req = parse_add_region("id=ism0,size=1M,grants=[2:ro,3:rw],default_perm=ro").unwrap();
        assert_eq!(req.size, Some(1 << 20));
        assert_eq!(
            req.grants,
            [
                IsmGrant {
                    peer: 2,
                    perm: GrantPerm::Ro
                },
                IsmGrant {
                    peer: 3,
                    perm: GrantPerm::Rw
                }
            ]
        );
        assert_eq!(req.default_perm, Some(GrantPerm::Ro));
        assert_eq!(
            parse_add_region("id=a,size=8K,grants=4:rw")
                .unwrap()
                .grants
                .len(),
            1
        );
        assert!(parse_add_region("id=ism0").is_err());
        assert!(parse_add_region("token=1").is_err());
        assert!(parse_add_region("id=a,token=x").is_err());
        assert!(parse_add_region("id=a,token=1,size=4K").is_err());
        assert!(parse_add_region("id=a,size=100").is_err());
        assert!(parse_add_region("id=a,size=4K,grants=[2:all]").is_err());
        assert!(parse_add_region("id=a,size=4K,grants=[two:ro]").is_err());
        assert!(parse_add_region("id=a,token=1,access=all").is_err());
        assert!(parse_remove_region("id=a,token=1,access=rw").is_err());
        assert_eq!(parse_remove_region("id=a,token=1").unwrap().token, 1);
    }
}
