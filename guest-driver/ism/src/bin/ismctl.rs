// SPDX-License-Identifier: Apache-2.0
//! ismctl: drive /dev/ismN from a shell.
//!
//! Each invocation is a separate process, and a process's regions are released when it
//! exits, so ismctl hands every region it allocates or attaches back to the driver
//! (`KEEP`) before exiting; the next ismctl call takes it back by token. `detach` ends it.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use ism::{Access, Device, Event, EventKind, EventType, Perms, Region};

#[derive(Parser)]
#[command(name = "ismctl", about = "Inter-VM shared memory (virtio-ism) control")]
struct Cli {
    /// Device node.
    #[arg(short, long, default_value = "/dev/ism0", env = "ISM_NODE")]
    node: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List ism devices and the regions their drivers hold.
    List,
    /// Show the device's identity and geometry.
    Info,
    /// Allocate a region (SIZE in bytes, K/M/G suffixes allowed); prints its token.
    Alloc { size: String },
    /// Attach a region by token.
    Attach {
        token: String,
        /// Ask for a read-only mapping.
        #[arg(long, conflicts_with = "rw")]
        ro: bool,
        /// Ask for a writable mapping (refused unless WRITE is granted).
        #[arg(long)]
        rw: bool,
    },
    /// Stop holding a region.
    Detach { token: String },
    /// Set a region's default grant or one device's grant. PERMS: letters r w a m c
    /// (read, write, attach, manage, clean-default) or a number.
    Grant {
        token: String,
        #[arg(
            long,
            conflicts_with = "device_id",
            required_unless_present = "device_id"
        )]
        default: bool,
        #[arg(long = "device", value_name = "ID")]
        device_id: Option<u64>,
        perms: String,
    },
    /// Copy stdin into the region (from offset 0).
    Write { token: String },
    /// Copy the region to stdout.
    Read {
        token: String,
        /// Bytes to copy (default: the whole region).
        #[arg(long)]
        len: Option<usize>,
    },
    /// Wait for events; with --bind (repeatable), also for kicks of those regions.
    Wait {
        #[arg(long)]
        bind: Vec<String>,
        /// Events to print before exiting.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Seconds to wait at most.
        #[arg(long)]
        timeout: Option<u64>,
        /// After COUNT events, print whatever else arrives within this many seconds.
        #[arg(long, value_name = "SECS")]
        linger: Option<u64>,
    },
    /// Kick a region (interrupt its other holders).
    Kick { token: String },
    /// Show the driver's counters (from /sys/class/misc/ismN/counters/).
    Counters,
}

fn parse_token(s: &str) -> anyhow::Result<u64> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.with_context(|| format!("Bad token {s:?}"))
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.parse().with_context(|| format!("Bad size {s:?}"))?;
    n.checked_mul(1 << shift)
        .filter(|&v| v > 0)
        .with_context(|| format!("Bad size {s:?}"))
}

fn parse_perms(s: &str) -> anyhow::Result<Perms> {
    if let Ok(n) = s.parse::<u64>() {
        return Perms::from_bits(n).with_context(|| format!("Unknown permission bits in {n}"));
    }
    let mut perms = Perms::empty();
    for c in s.chars() {
        perms |= match c {
            'r' => Perms::READ,
            'w' => Perms::WRITE,
            'a' => Perms::ATTACH,
            'm' => Perms::MANAGE,
            'c' => Perms::CLEAN_DEFAULT,
            other => bail!("Unknown permission {other:?} (use r w a m c)"),
        };
    }
    Ok(perms)
}

/// Take a region back from the driver (or attach it) for the length of one command.
fn take<'d>(dev: &'d Device, token: &str, access: Access) -> anyhow::Result<Region<'d>> {
    let token = parse_token(token)?;
    dev.attach(token, access)
        .with_context(|| format!("Cannot attach {token:#x}"))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::List = cli.cmd {
        for node in Device::list_nodes("/dev")? {
            let dev = Device::open(&node)?;
            let info = dev.info()?;
            println!(
                "{} gid={} devid={} chunk={} window={}",
                node.display(),
                info.gid,
                info.devid,
                info.chunk_size,
                info.shm_size
            );
            for token in dev.list()? {
                let r = dev.region_info(token)?;
                println!(
                    "  {token:#018x} size={} kicks={} flags={:?}",
                    r.size, r.kicks, r.flags
                );
            }
        }
        return Ok(());
    }
    let dev = Device::open(&cli.node)?;
    match cli.cmd {
        Cmd::List => unreachable!("handled above"),
        Cmd::Info => {
            let i = dev.info()?;
            print_fields(&[
                ("device", &cli.node.display()),
                ("gid", &i.gid),
                ("devid", &i.devid),
                ("chunk_size", &i.chunk_size),
                ("notify_size", &i.notify_size),
                ("window", &i.shm_size),
                ("event_queue", &i.event_queue),
                ("query", &i.query),
                ("grant", &i.grant),
                (
                    "kick_vectors",
                    &if i.kick_vectors {
                        "per-region"
                    } else if i.kick_pending {
                        "pending-bits"
                    } else {
                        "shared"
                    },
                ),
                ("regions", &i.regions),
            ]);
        }
        Cmd::Alloc { size } => {
            let region = dev.alloc(parse_size(&size)?)?;
            println!("{:#018x} {}", region.token(), region.len());
            region.keep()?;
        }
        Cmd::Attach { token, ro, rw } => {
            let access = if ro {
                Access::ReadOnly
            } else if rw {
                Access::ReadWrite
            } else {
                Access::AsGranted
            };
            let region = take(&dev, &token, access)?;
            println!(
                "{:#018x} {} {}",
                region.token(),
                region.len(),
                if region.is_writable() { "rw" } else { "ro" }
            );
            region.keep()?;
        }
        Cmd::Detach { token } => take(&dev, &token, Access::AsGranted)?.detach()?,
        Cmd::Grant {
            token,
            default,
            device_id,
            perms,
        } => {
            let token = parse_token(&token)?;
            let perms = parse_perms(&perms)?;
            match (default, device_id) {
                (true, _) => dev.grant_default(token, perms)?,
                (false, Some(id)) => dev.grant_device(token, id, perms)?,
                (false, None) => bail!("Give --default or --device ID"),
            }
        }
        Cmd::Write { token } => {
            let region = take(&dev, &token, Access::AsGranted)?;
            let mut data = Vec::new();
            std::io::stdin()
                .take(region.len() as u64 + 1)
                .read_to_end(&mut data)
                .context("Cannot read stdin")?;
            if data.len() > region.len() {
                region.keep()?;
                bail!(
                    "Input is larger than the region ({} bytes)",
                    region_len(&dev, &token)?
                );
            }
            region.write_at(0, &data)?;
            eprintln!("wrote {} bytes", data.len());
            region.keep()?;
        }
        Cmd::Read { token, len } => {
            let region = take(&dev, &token, Access::AsGranted)?;
            let len = len.unwrap_or(region.len()).min(region.len());
            let mut buf = vec![0u8; len];
            region.read_at(0, &mut buf)?;
            region.keep()?;
            std::io::stdout()
                .write_all(&buf)
                .context("Cannot write stdout")?;
        }
        Cmd::Wait {
            bind,
            count,
            timeout,
            linger,
        } => {
            let mut regions = Vec::new();
            for token in &bind {
                let region = take(&dev, token, Access::AsGranted)?;
                dev.bind(region.token())?;
                regions.push(region);
            }
            let keep_all = |regions: Vec<Region<'_>>| -> anyhow::Result<()> {
                for r in regions {
                    r.keep()?;
                }
                Ok(())
            };
            let timeout = timeout.map(Duration::from_secs);
            let mut seen = 0;
            while seen < count {
                let Some(ev) = dev.wait_event_timeout(timeout)? else {
                    keep_all(regions)?;
                    bail!("Timed out after {seen} events");
                };
                println!("{}", format_event(&ev));
                seen += 1;
            }
            if let Some(secs) = linger {
                let end = std::time::Instant::now() + Duration::from_secs(secs);
                loop {
                    let left = end.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match dev.wait_event_timeout(Some(left))? {
                        Some(ev) => println!("{}", format_event(&ev)),
                        None => break,
                    }
                }
            }
            keep_all(regions)?;
        }
        Cmd::Kick { token } => {
            let region = take(&dev, &token, Access::AsGranted)?;
            region.kick()?;
            region.keep()?;
        }
        Cmd::Counters => {
            let c = dev.counters()?;
            print_fields(&[
                ("ctrl_commands", &c.ctrl_commands),
                ("ctrl_errors", &c.ctrl_errors),
                ("ctrl_timeouts", &c.ctrl_timeouts),
                ("late_replies", &c.late_replies),
                ("bad_replies", &c.bad_replies),
                ("kicks_sent", &c.kicks_sent),
                ("kick_irqs", &c.kick_irqs),
                ("config_irqs", &c.config_irqs),
                ("events", &c.events),
                ("events_lost", &c.events_lost),
            ]);
        }
    }
    Ok(())
}

/// One event as `KIND token=0x... devid=N peers=N`.
fn format_event(ev: &Event) -> String {
    let kind = match ev.kind {
        EventKind::Device(EventType::Unknown(raw)) => format!("unknown({raw:#x})"),
        EventKind::Device(t) => format!("{t:?}").to_lowercase(),
        k => format!("{k:?}").to_lowercase(),
    };
    format!(
        "{kind} token={:#018x} devid={} peers={}",
        ev.token, ev.devid, ev.peers
    )
}

/// Print `name value` lines, the values lined up in one column.
fn print_fields(fields: &[(&str, &dyn std::fmt::Display)]) {
    print!("{}", format_fields(fields));
}

fn format_fields(fields: &[(&str, &dyn std::fmt::Display)]) -> String {
    let width = fields.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    fields
        .iter()
        .map(|(name, value)| format!("{name:<width$} {value}\n"))
        .collect()
}

fn region_len(dev: &Device, token: &str) -> anyhow::Result<u64> {
    Ok(dev.region_info(parse_token(token)?)?.size)
}

fn main() -> anyhow::Result<()> {
    run(Cli::parse())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_fields_line_up_after_the_longest_name() {
        let text = format_fields(&[("gid", &7), ("notify_size", &"4"), ("query", &true)]);
        assert_eq!(text, "gid         7\nnotify_size 4\nquery       true\n");
    }

    #[test]
    fn test_kick_event_prints_its_token() {
        let ev = Event {
            kind: EventKind::Kick,
            token: 0xab,
            devid: 0,
            peers: 0,
        };
        assert_eq!(
            format_event(&ev),
            "kick token=0x00000000000000ab devid=0 peers=0"
        );
    }

    #[test]
    fn test_parse_token_hex_and_decimal() {
        assert_eq!(parse_token("0x10").unwrap(), 16);
        assert_eq!(parse_token("16").unwrap(), 16);
        assert!(parse_token("0xzz").is_err());
    }

    #[test]
    fn test_parse_size_suffixes_and_zero() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2M").unwrap(), 2 << 20);
        assert_eq!(parse_size("1g").unwrap(), 1 << 30);
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }

    #[test]
    fn test_parse_perms_letters_and_numbers() {
        assert_eq!(
            parse_perms("rwa").unwrap(),
            Perms::READ | Perms::WRITE | Perms::ATTACH
        );
        assert_eq!(parse_perms("5").unwrap(), Perms::READ | Perms::ATTACH);
        assert!(parse_perms("x").is_err());
        assert!(parse_perms("64").is_err());
    }

    #[test]
    fn test_cli_attach_ro_and_rw_exclude_each_other() {
        assert!(Cli::try_parse_from(["ismctl", "attach", "1", "--rw"]).is_ok());
        assert!(Cli::try_parse_from(["ismctl", "attach", "1", "--ro", "--rw"]).is_err());
    }

    #[test]
    fn test_cli_grant_needs_default_or_device() {
        assert!(Cli::try_parse_from(["ismctl", "grant", "1", "r"]).is_err());
        assert!(Cli::try_parse_from(["ismctl", "grant", "1", "--default", "r"]).is_ok());
        assert!(Cli::try_parse_from(["ismctl", "grant", "1", "--device", "3", "r"]).is_ok());
        assert!(
            Cli::try_parse_from(["ismctl", "grant", "1", "--default", "--device", "3", "r"])
                .is_err()
        );
    }
}
