// SPDX-License-Identifier: Apache-2.0
//! ism-vmm: command line -> VmConfig -> [`ism_vmm::run`].

use clap::{Arg, ArgAction, ArgMatches, Command};

use ism_vmm::config::api::{
    ApiSocketConfig, EventMonitorConfig, OperatorConfig, OperatorError, SeccompMode,
};
use ism_vmm::config::{
    ConsoleConfig, CpusConfig, IsmDeviceConfig, MemoryConfig, PlatformConfig, RngConfig,
    SerialConfig, VmConfig, VmParams,
};

/// Every option, sorted alphabetically by long name (a test keeps it so, as in
/// cloud-hypervisor).
fn cli_options_sorted() -> Vec<Arg> {
    vec![
        Arg::new("api-socket")
            .long("api-socket")
            .help(ApiSocketConfig::SYNTAX)
            .num_args(1),
        Arg::new("cmdline")
            .long("cmdline")
            .help("Kernel command line")
            .num_args(1),
        Arg::new("console")
            .long("console")
            .help(ConsoleConfig::SYNTAX)
            .num_args(1),
        Arg::new("cpus")
            .long("cpus")
            .help(CpusConfig::SYNTAX)
            .num_args(1),
        Arg::new("event-monitor")
            .long("event-monitor")
            .help(EventMonitorConfig::SYNTAX)
            .num_args(1),
        Arg::new("initramfs")
            .long("initramfs")
            .help("Path to initramfs image")
            .num_args(1),
        Arg::new("ism")
            .long("ism")
            .help(IsmDeviceConfig::SYNTAX)
            .num_args(1)
            .action(ArgAction::Append),
        Arg::new("kernel")
            .long("kernel")
            .help("Path to kernel to load: an ELF with a PVH note (vmlinux) or a bzImage")
            .num_args(1),
        Arg::new("memory")
            .long("memory")
            .help(MemoryConfig::SYNTAX)
            .num_args(1),
        Arg::new("platform")
            .long("platform")
            .help(PlatformConfig::SYNTAX)
            .num_args(1),
        Arg::new("rng")
            .long("rng")
            .help(RngConfig::SYNTAX)
            .num_args(1),
        Arg::new("seccomp")
            .long("seccomp")
            .help(SeccompMode::SYNTAX)
            .num_args(1),
        Arg::new("serial")
            .long("serial")
            .help(SerialConfig::SYNTAX)
            .num_args(1),
        Arg::new("v")
            .short('v')
            .action(ArgAction::Count)
            .help("Sets the level of debugging output"),
    ]
}

fn create_app() -> Command {
    Command::new("ism-vmm")
        .version(env!("CARGO_PKG_VERSION"))
        .about("A rust-vmm based VMM in the cloud-hypervisor family, hosting virtio-ism")
        .args(cli_options_sorted())
}

fn vm_params(matches: &ArgMatches) -> VmParams {
    let get = |name: &str| matches.get_one::<String>(name).cloned();
    VmParams {
        cpus: get("cpus"),
        memory: get("memory"),
        kernel: get("kernel"),
        initramfs: get("initramfs"),
        cmdline: get("cmdline"),
        serial: get("serial"),
        console: get("console"),
        rng: get("rng"),
        platform: get("platform"),
        ism: matches
            .get_many::<String>("ism")
            .map(|v| v.cloned().collect())
            .unwrap_or_default(),
    }
}

fn operator_config(matches: &ArgMatches) -> Result<OperatorConfig, OperatorError> {
    let get = |name: &str| matches.get_one::<String>(name);
    Ok(OperatorConfig {
        api_socket: get("api-socket")
            .map(|s| ApiSocketConfig::parse(s))
            .transpose()?,
        event_monitor: get("event-monitor")
            .map(|s| EventMonitorConfig::parse(s))
            .transpose()?,
        seccomp: get("seccomp")
            .map(|s| SeccompMode::parse(s))
            .transpose()?
            .unwrap_or_default(),
    })
}

fn init_logging(verbosity: u8) {
    let level = match verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    env_logger::Builder::new()
        .filter_level(level)
        .format_timestamp_millis()
        .init();
}

fn main() {
    // First: a panic anywhere, also in a thread under a seccomp filter, prints its message.
    ism_vmm::install_panic_hook();
    let matches = match create_app().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            use clap::error::ErrorKind;
            let status = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                _ => 1,
            };
            let _ = e.print();
            std::process::exit(status);
        }
    };
    init_logging(matches.get_count("v"));

    let config = match VmConfig::parse(vm_params(&matches)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {:#}", anyhow::Error::new(e));
            std::process::exit(1);
        }
    };
    let operator = match operator_config(&matches) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("Error: {:#}", anyhow::Error::new(e));
            std::process::exit(1);
        }
    };
    std::process::exit(ism_vmm::run(&config, &operator));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cli_options_sorted() {
        let names: Vec<String> = cli_options_sorted()
            .iter()
            .map(|a| {
                a.get_long()
                    .map(str::to_owned)
                    .or_else(|| a.get_short().map(String::from))
                    .unwrap()
            })
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn test_cli_to_vm_config() {
        let m = create_app()
            .try_get_matches_from([
                "ism-vmm",
                "--kernel",
                "/k",
                "--cpus",
                "boot=2",
                "--memory",
                "size=64M,shared=on",
                "--serial",
                "tty",
                "--console",
                "off",
                "--cmdline",
                "console=ttyS0",
                "-vv",
            ])
            .unwrap();
        assert_eq!(m.get_count("v"), 2);
        let cfg = VmConfig::parse(vm_params(&m)).unwrap();
        assert_eq!(cfg.cpus.boot_vcpus, 2);
        assert_eq!(cfg.memory.size, 64 << 20);
        assert_eq!(cfg.payload.cmdline, "console=ttyS0");
        assert!(
            create_app()
                .try_get_matches_from(["ism-vmm", "--bogus"])
                .is_err()
        );
    }
}
