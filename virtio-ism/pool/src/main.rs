// SPDX-License-Identifier: Apache-2.0
//! `ism-pool`: the host-wide virtio-ism region pool broker, and its status/revoke client.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ism_pool::broker::Broker;
use ism_pool::{LocalPool, PoolConfig, Token, client, parse_size};

/// Host-wide virtio-ism region pool broker.
///
/// Without a subcommand it serves the pool on --socket until killed.
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
    /// Pool size, e.g. 4G or 512M.
    #[arg(long, value_parser = size_arg, required = true)]
    size: Option<u64>,
    /// Back regions with 2 MiB huge pages (region sizes must be multiples of 2M).
    #[arg(long)]
    hugepages: bool,
    /// Most bytes of regions one VM (VMM process) may hold at once, e.g. 1G.
    #[arg(long, value_parser = size_arg)]
    per_vm_limit: Option<u64>,
    /// Group id reported to devices (default: random).
    #[arg(long, value_parser = u64_arg)]
    gid: Option<u64>,
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

fn u64_arg(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("Invalid number {text:?}: {e}"))
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let socket = args.socket.context("Missing --socket")?;
    let config = PoolConfig {
        size: args.size.context("Missing --size")?,
        per_vm_limit: args.per_vm_limit,
        hugepages: args.hugepages,
        gid: args.gid,
    };
    let pool: Arc<LocalPool> =
        LocalPool::new(config.clone()).context("Invalid pool configuration")?;
    let broker = Broker::bind(&socket, pool.clone()).context("Failed to start the broker")?;
    log::info!(
        "Serving pool gid {:#x} of {} bytes (per-VM limit {:?}, huge pages {}) on {}",
        pool.gid(),
        config.size,
        config.per_vm_limit,
        config.hugepages,
        socket.display()
    );
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
