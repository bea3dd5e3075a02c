// SPDX-License-Identifier: Apache-2.0
//! `ism-pool`: the host-wide virtio-ism region pool broker, and its status/revoke client.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ism_pool::admission::{AdmissionPolicy, ConnectionLimits, VmIdentity, resolve_group};
use ism_pool::broker::{Broker, BrokerOptions, DEFAULT_GRACE};
use ism_pool::handler::ConnectionOptions;
use ism_pool::state::StateFile;
use ism_pool::{
    DEFAULT_PER_VM_REGIONS, LocalPool, PoolConfig, Token, client, default_per_vm_limit, fdlimit,
    parse_size,
};

/// Host-wide virtio-ism region pool broker.
///
/// Without a subcommand it serves the pool on --socket until killed.
///
/// Run VMMs under a uid of their own (not root, not the broker's): only then does the kernel
/// enforce read-only leases. Name those uids with --vmm-uid or --vmm-group so that they get
/// the reserved connection slots, and let them reach the socket with --socket-group.
#[derive(Parser, Debug)]
#[command(
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// Unix socket to listen on.
    #[arg(long, required = true)]
    socket: Option<PathBuf>,
    /// Pool size, e.g. 4G or 512M (required unless the state file records it).
    #[arg(long, value_parser = size_arg)]
    size: Option<u64>,
    /// Where the pool's identity, configuration, sessions and regions are recorded so that
    /// a restarted broker knows the pool as it was [default: the socket path + ".state"].
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Seconds a restarted broker waits for the recorded sessions to come back before
    /// releasing what they held.
    #[arg(long, default_value_t = DEFAULT_GRACE.as_secs(), value_parser = clap::value_parser!(u64).range(1..))]
    grace: u64,
    /// Back regions with 2 MiB huge pages (region sizes must be multiples of 2M).
    #[arg(long)]
    hugepages: bool,
    /// Most bytes of regions one VM may hold at once, e.g. 1G [default: half the pool].
    #[arg(long, value_parser = size_arg)]
    per_vm_limit: Option<u64>,
    /// Most regions one VM may hold at once (each is a descriptor in the broker)
    /// [default: 1024].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    per_vm_regions: Option<u64>,
    /// What one VM is, for quotas and connection limits: `cgroup` = a VMM uid plus its
    /// cgroup v2 path (one systemd unit per VM; other uids count per uid), `uid` = one VM
    /// per uid, `process` = one VM per process (forking multiplies quotas; tests only).
    #[arg(long, default_value = "cgroup", value_parser = identity_arg)]
    vm_identity: VmIdentity,
    /// Group id reported to devices (default: random).
    #[arg(long, value_parser = u64_arg)]
    gid: Option<u64>,
    /// A uid whose processes are VMMs: they may use the reserved connection slots (root and
    /// the broker's uid always may). Repeatable.
    #[arg(long = "vmm-uid", value_name = "UID")]
    vmm_uids: Vec<u32>,
    /// A group (name or gid) whose member processes are VMMs, like --vmm-uid.
    #[arg(long, value_name = "GROUP", value_parser = group_arg)]
    vmm_group: Option<u32>,
    /// Connections served at once.
    #[arg(long, default_value_t = ConnectionLimits::default().max)]
    max_connections: usize,
    /// Of --max-connections, slots only VMMs (root, the broker's uid, --vmm-uid,
    /// --vmm-group) may take.
    #[arg(long, default_value_t = ConnectionLimits::default().reserved)]
    reserved_connections: usize,
    /// Connections one uid that is not a VMM uid may hold.
    #[arg(long, default_value_t = ConnectionLimits::default().per_other_uid)]
    connections_per_uid: usize,
    /// Connections one VM (see --vm-identity) may hold.
    #[arg(long, default_value_t = ConnectionLimits::default().per_vm)]
    connections_per_vm: usize,
    /// Seconds an observer (status, revoke) may stay idle before it is disconnected.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    observer_timeout: u64,
    /// Permission bits of the socket, in octal.
    #[arg(long, default_value = "0660", value_parser = mode_arg)]
    socket_mode: u32,
    /// Group (name or gid) of the socket, e.g. the VMMs' group.
    #[arg(long, value_name = "GROUP", value_parser = group_arg)]
    socket_group: Option<u32>,
    /// Refuse device sessions from root, the broker's uid or processes with
    /// CAP_DAC_OVERRIDE/CAP_FOWNER: read-only leases to them are advisory only.
    #[arg(long)]
    require_uid_split: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the pool's regions, holders, grants and quota use.
    Status {
        #[arg(long)]
        socket: PathBuf,
        /// Print the raw JSON report.
        #[arg(long)]
        json: bool,
    },
    /// Take a region away from every holder.
    Revoke {
        #[arg(long)]
        socket: PathBuf,
        /// Token of the region (decimal or 0x-prefixed hex).
        #[arg(long, value_parser = u64_arg)]
        token: u64,
    },
}

fn size_arg(text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| e.to_string())
}

fn identity_arg(text: &str) -> Result<VmIdentity, String> {
    text.parse()
        .map_err(|e: ism_pool::admission::AdmissionError| e.to_string())
}

fn group_arg(text: &str) -> Result<u32, String> {
    resolve_group(text).map_err(|e| e.to_string())
}

fn mode_arg(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!(
            "Invalid socket mode {text:?}: octal permission bits, e.g. 0660"
        )),
    }
}

fn u64_arg(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("Invalid number {text:?}: {e}"))
}

/// Raises the descriptor limit and warns when it is too low for `config`.
fn check_descriptor_limit(config: &PoolConfig, limits: &ConnectionLimits) {
    let needed = fdlimit::descriptors_needed(config, limits);
    match fdlimit::raise_descriptor_limit() {
        Ok(limit) => {
            let text = |l: Option<u64>| l.map_or("unlimited".to_string(), |l| l.to_string());
            log::info!(
                "Descriptor limit (RLIMIT_NOFILE) raised from {} to {}; this configuration may need {needed}",
                text(limit.old_soft),
                text(limit.soft)
            );
            if limit.soft.is_some_and(|soft| soft < needed) {
                log::warn!(
                    "The hard descriptor limit {} is below the {needed} this configuration may need (2 x {} connections + regions + doorbells): a busy pool will refuse requests with \"Host descriptor limit reached\". Raise it (systemd LimitNOFILE=, ulimit -Hn) or lower --per-vm-regions or --max-connections",
                    text(limit.hard),
                    limits.max
                );
            }
        }
        Err(e) => log::warn!("{e:#}; this configuration may need {needed} descriptors"),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let socket = args.socket.context("Missing --socket")?;
    let state_path = args.state_file.unwrap_or_else(|| {
        let mut path = socket.clone().into_os_string();
        path.push(".state");
        PathBuf::from(path)
    });
    let state = Arc::new(StateFile::new(state_path));
    // What the last broker on this state file recorded: its gid, configuration, sessions
    // and regions. Options given now override the recorded configuration.
    let recorded = state.load().context("Cannot restore the pool")?;
    let config_record = recorded.as_ref().map(|r| r.config.clone());
    if let (Some(recorded), Some(gid)) = (&recorded, args.gid)
        && recorded.gid != gid
    {
        anyhow::bail!(
            "--gid {gid:#x} differs from the gid {:#x} recorded in {}; remove the state file to start a new pool",
            recorded.gid,
            state.path().display()
        );
    }
    let size = args
        .size
        .or(config_record.as_ref().map(|c| c.size))
        .context("Missing --size")?;
    let hugepages = args.hugepages || config_record.as_ref().is_some_and(|c| c.hugepages);
    let page_size = PoolConfig {
        hugepages,
        ..PoolConfig::default()
    }
    .page_size();
    let config = PoolConfig {
        size,
        per_vm_limit: Some(
            args.per_vm_limit
                .or(config_record.as_ref().and_then(|c| c.per_vm_limit))
                .unwrap_or_else(|| default_per_vm_limit(size, page_size)),
        ),
        per_vm_regions: Some(
            args.per_vm_regions
                .or(config_record.as_ref().and_then(|c| c.per_vm_regions))
                .unwrap_or(DEFAULT_PER_VM_REGIONS),
        ),
        hugepages,
        gid: args.gid,
    };
    if let Some(before) = &config_record
        && *before != ism_pool::state::ConfigRecord::of(&config)
    {
        log::warn!("Pool configuration changed since the last start: was {before:?}");
    }
    let limits = ConnectionLimits {
        max: args.max_connections,
        reserved: args.reserved_connections,
        per_other_uid: args.connections_per_uid,
        per_vm: args.connections_per_vm,
    };
    let options = BrokerOptions {
        admission: AdmissionPolicy {
            vmm_uids: args.vmm_uids,
            vmm_gid: args.vmm_group,
            identity: args.vm_identity,
            limits,
        },
        connection: ConnectionOptions {
            require_uid_split: args.require_uid_split,
        },
        observer_timeout: Duration::from_secs(args.observer_timeout),
        socket_mode: args.socket_mode,
        socket_gid: args.socket_group,
    };
    check_descriptor_limit(&config, &limits);
    let pool: Arc<LocalPool> = match &recorded {
        Some(snapshot) => {
            log::info!(
                "Restoring pool gid {:#x} from {}: {} sessions and {} regions may come back within {} s",
                snapshot.gid,
                state.path().display(),
                snapshot.sessions.len(),
                snapshot.regions.len(),
                args.grace
            );
            LocalPool::restore(config.clone(), snapshot)
        }
        None => LocalPool::new(config.clone()),
    }
    .context("Invalid pool configuration")?;
    let broker = Broker::bind_with(&socket, pool.clone(), options.clone())
        .context("Failed to start the broker")?
        .with_state_file(state.clone(), Duration::from_secs(args.grace));
    log::info!(
        "Serving pool gid {:#x} of {} bytes (per-VM limit {:?} bytes in {:?} regions, VM identity {:?}, huge pages {}) on {} (mode {:#o}, group {:?})",
        pool.gid(),
        config.size,
        config.per_vm_limit,
        config.per_vm_regions,
        options.admission.identity,
        config.hugepages,
        socket.display(),
        options.socket_mode,
        options.socket_gid
    );
    if options.admission.identity == VmIdentity::Process {
        log::warn!(
            "--vm-identity process: every process is a VM of its own, so a VMM that forks multiplies its quotas and connection slots"
        );
    }
    broker.run().context("Broker stopped")?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Status { socket, json }) => {
            let status = client::query_status(&socket)
                .with_context(|| format!("Status query to {} failed", socket.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{status}");
            }
            Ok(())
        }
        Some(Command::Revoke { socket, token }) => {
            client::revoke(&socket, Token(token))
                .with_context(|| format!("Revoking {:#x} failed", token))?;
            println!("Revoked {:#018x}", token);
            Ok(())
        }
    }
}
