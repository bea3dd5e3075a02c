// SPDX-License-Identifier: Apache-2.0
//! The VM's configuration: the only place where option strings become types.
//!
//! `main` collects the raw strings into [`VmParams`]; [`VmConfig::parse`] turns each into its
//! typed `XxxConfig` (every one has `SYNTAX`, `parse(&str)` and `validate(&VmConfig)`, as in
//! cloud-hypervisor) and validates the whole. Later options (`--ism`, `--api-socket`,
//! `--event-monitor`, `--seccomp`) slot in as one more field here and one more file beside.

pub mod api;
mod cpus;
mod ism;
mod memory;
pub mod option_parser;
mod payload;
mod platform;
mod rng;
mod serial;

use std::path::PathBuf;

pub use cpus::CpusConfig;
pub use ism::{IsmDeviceConfig, IsmValidationError};
pub use memory::MemoryConfig;
pub use option_parser::OptionParserError;
pub use payload::PayloadConfig;
pub use platform::{PlatformConfig, PvmMode};
pub use rng::RngConfig;
pub use serial::{ConsoleConfig, SerialConfig, SerialMode};

/// An option string that could not be parsed. The message names the option.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Error parsing --cpus")]
    ParseCpus(#[source] OptionParserError),
    #[error("Error parsing --memory")]
    ParseMemory(#[source] OptionParserError),
    #[error("Error parsing --serial")]
    ParseSerial(#[source] OptionParserError),
    #[error("Error parsing --serial: expected exactly one of off, null, tty, file=<path>")]
    ParseSerialMode,
    #[error("Error parsing --console")]
    ParseConsole(#[source] OptionParserError),
    #[error("Error parsing --console: only \"off\" is supported (no virtio-console device)")]
    ConsoleUnsupported,
    #[error("Error parsing --ism")]
    ParseIsm(#[source] OptionParserError),
    #[error("Error parsing --rng")]
    ParseRng(#[source] OptionParserError),
    #[error("Error parsing --platform")]
    ParsePlatform(#[source] OptionParserError),
    #[error("Error parsing --platform: pvm={0} is not one of auto, on, off")]
    ParsePlatformPvm(String),
    #[error("Error parsing --kernel: a kernel is required")]
    KernelMissing,
    #[error("Invalid VM configuration")]
    Validation(#[source] ValidationError),
}

/// A configuration whose options parse but do not make a VM together.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("--cpus: boot={0} is outside 1..=254")]
    CpusCount(u8),
    #[error("--cpus: max must equal boot (CPU hotplug is not supported)")]
    CpusHotplugUnsupported,
    #[error("--memory: size={0} is below the 8 MiB minimum")]
    MemoryTooSmall(u64),
    #[error("--memory: size={0} is not a multiple of {1}")]
    MemoryUnaligned(u64, u64),
    #[error("--cmdline: {0} bytes is too long")]
    CmdlineTooLong(usize),
    #[error("--cmdline: only printable ASCII is allowed")]
    CmdlineNotPrintable,
    #[error("--rng: src is empty")]
    RngSourceEmpty,
    #[error("Identifier {0:?} is invalid (empty, or starts with \"__\")")]
    InvalidIdentifier(String),
    #[error(transparent)]
    Ism(IsmValidationError),
}

/// Device ids are user-chosen names; `__` is reserved for ids the VMM makes up.
pub(crate) fn validate_identifier(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() || id.starts_with("__") {
        return Err(ValidationError::InvalidIdentifier(id.to_owned()));
    }
    Ok(())
}

/// The raw option strings, as the command line gave them.
#[derive(Clone, Debug, Default)]
pub struct VmParams {
    pub cpus: Option<String>,
    pub memory: Option<String>,
    pub kernel: Option<String>,
    pub initramfs: Option<String>,
    pub cmdline: Option<String>,
    pub serial: Option<String>,
    pub console: Option<String>,
    pub rng: Option<String>,
    pub platform: Option<String>,
    /// One string per `--ism`.
    pub ism: Vec<String>,
}

/// Everything the VMM needs to build a VM, typed and validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub cpus: CpusConfig,
    pub memory: MemoryConfig,
    pub payload: PayloadConfig,
    pub serial: SerialConfig,
    pub console: ConsoleConfig,
    pub rng: Option<RngConfig>,
    pub platform: PlatformConfig,
    pub ism: Vec<IsmDeviceConfig>,
}

impl VmConfig {
    /// Parse every option, then validate the whole configuration.
    pub fn parse(params: VmParams) -> Result<Self, Error> {
        let kernel = params
            .kernel
            .filter(|k| !k.is_empty())
            .ok_or(Error::KernelMissing)?;
        let config = VmConfig {
            cpus: params
                .cpus
                .as_deref()
                .map(CpusConfig::parse)
                .transpose()?
                .unwrap_or_default(),
            memory: params
                .memory
                .as_deref()
                .map(MemoryConfig::parse)
                .transpose()?
                .unwrap_or_default(),
            payload: PayloadConfig {
                kernel: PathBuf::from(kernel),
                initramfs: params.initramfs.map(PathBuf::from),
                cmdline: params.cmdline.unwrap_or_default(),
            },
            serial: params
                .serial
                .as_deref()
                .map(SerialConfig::parse)
                .transpose()?
                .unwrap_or_default(),
            console: params
                .console
                .as_deref()
                .map(ConsoleConfig::parse)
                .transpose()?
                .unwrap_or_default(),
            rng: params.rng.as_deref().map(RngConfig::parse).transpose()?,
            platform: params
                .platform
                .as_deref()
                .map(PlatformConfig::parse)
                .transpose()?
                .unwrap_or_default(),
            ism: params
                .ism
                .iter()
                .map(|s| IsmDeviceConfig::parse(s))
                .collect::<Result<_, _>>()?,
        };
        config.validate().map_err(Error::Validation)?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        self.cpus.validate(self)?;
        self.memory.validate(self)?;
        self.payload.validate(self)?;
        self.serial.validate(self)?;
        self.console.validate(self)?;
        if let Some(rng) = &self.rng {
            rng.validate(self)?;
        }
        self.platform.validate(self)?;
        for ism in &self.ism {
            ism.validate(self)?;
        }
        let rng_id = self.rng.as_ref().and_then(|r| r.id.as_deref());
        ism::validate_ism_devices(&self.ism, rng_id.as_slice())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(kernel: &str) -> VmParams {
        VmParams {
            kernel: Some(kernel.to_owned()),
            ..Default::default()
        }
    }

    #[test]
    fn test_valid_vm_config_defaults() {
        let cfg = VmConfig::parse(params("/k")).unwrap();
        assert_eq!(cfg.cpus.boot_vcpus, 1);
        assert_eq!(cfg.memory.size, 512 << 20);
        assert!(!cfg.memory.shared);
        assert_eq!(cfg.serial.mode, SerialMode::Null);
        assert_eq!(cfg.platform.pvm, PvmMode::Auto);
        assert!(cfg.rng.is_none());
        assert_eq!(cfg.payload.kernel, PathBuf::from("/k"));
    }

    #[test]
    fn test_valid_vm_config_cpus() {
        let mut p = params("/k");
        p.cpus = Some("boot=4".into());
        assert_eq!(VmConfig::parse(p).unwrap().cpus.boot_vcpus, 4);
        let mut p = params("/k");
        p.cpus = Some("boot=2,max=2".into());
        assert_eq!(VmConfig::parse(p).unwrap().cpus.max_vcpus, 2);
    }

    #[test]
    fn test_invalid_vm_config_cpus() {
        for bad in ["boot=0", "boot=255", "boot=x", "boot=2,max=4", "bogus=1"] {
            let mut p = params("/k");
            p.cpus = Some(bad.into());
            let err = VmConfig::parse(p).unwrap_err();
            assert!(format!("{err:#}").contains("cpus") || matches!(err, Error::Validation(_)));
        }
    }

    #[test]
    fn test_valid_vm_config_memory() {
        let mut p = params("/k");
        p.memory = Some("size=1G,shared=on,hugepages=off".into());
        let m = VmConfig::parse(p).unwrap().memory;
        assert_eq!(m.size, 1 << 30);
        assert!(m.shared && !m.hugepages);
        assert!(m.backed_by_shared_memory());
    }

    #[test]
    fn test_invalid_vm_config_memory() {
        type Check = fn(&Error) -> bool;
        let cases: &[(&str, Check)] = &[
            ("size=1M", |e| {
                matches!(e, Error::Validation(ValidationError::MemoryTooSmall(_)))
            }),
            ("size=12345678", |e| {
                matches!(e, Error::Validation(ValidationError::MemoryUnaligned(..)))
            }),
            ("size=9M,hugepages=on", |e| {
                matches!(e, Error::Validation(ValidationError::MemoryUnaligned(..)))
            }),
            ("size=1G,shared=maybe", |e| {
                matches!(e, Error::ParseMemory(_))
            }),
            ("sizes=1G", |e| matches!(e, Error::ParseMemory(_))),
        ];
        for (input, check) in cases {
            let mut p = params("/k");
            p.memory = Some((*input).into());
            let err = VmConfig::parse(p).unwrap_err();
            assert!(check(&err), "{input}: {err:?}");
        }
    }

    #[test]
    fn test_valid_vm_config_serial_console() {
        for (input, mode) in [
            ("tty", SerialMode::Tty),
            ("off", SerialMode::Off),
            ("null", SerialMode::Null),
            ("file=/tmp/s.log", SerialMode::File("/tmp/s.log".into())),
        ] {
            let mut p = params("/k");
            p.serial = Some(input.into());
            p.console = Some("off".into());
            assert_eq!(VmConfig::parse(p).unwrap().serial.mode, mode);
        }
    }

    #[test]
    fn test_invalid_vm_config_serial_console() {
        for bad in ["", "tty,off", "file=", "socket=/x", "file"] {
            let mut p = params("/k");
            p.serial = Some(bad.into());
            assert!(VmConfig::parse(p).is_err(), "{bad}");
        }
        let mut p = params("/k");
        p.console = Some("tty".into());
        assert!(matches!(
            VmConfig::parse(p).unwrap_err(),
            Error::ConsoleUnsupported
        ));
    }

    #[test]
    fn test_valid_and_invalid_vm_config_rng() {
        let mut p = params("/k");
        p.rng = Some("src=/dev/random".into());
        let rng = VmConfig::parse(p).unwrap().rng.unwrap();
        assert_eq!(rng.src, PathBuf::from("/dev/random"));
        let mut p = params("/k");
        p.rng = Some(String::new());
        assert_eq!(
            VmConfig::parse(p).unwrap().rng.unwrap().src,
            PathBuf::from("/dev/urandom")
        );
        for bad in ["src=", "size=1", "src=/dev/random,id=__x"] {
            let mut p = params("/k");
            p.rng = Some(bad.into());
            assert!(VmConfig::parse(p).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_valid_and_invalid_vm_config_platform() {
        for (input, mode) in [
            ("pvm=on", PvmMode::On),
            ("pvm=off", PvmMode::Off),
            ("pvm=auto", PvmMode::Auto),
        ] {
            let mut p = params("/k");
            p.platform = Some(input.into());
            assert_eq!(VmConfig::parse(p).unwrap().platform.pvm, mode);
        }
        let mut p = params("/k");
        p.platform = Some("pvm=sometimes".into());
        assert!(matches!(
            VmConfig::parse(p).unwrap_err(),
            Error::ParsePlatformPvm(_)
        ));
    }

    #[test]
    fn test_invalid_vm_config_payload() {
        assert!(matches!(
            VmConfig::parse(VmParams::default()).unwrap_err(),
            Error::KernelMissing
        ));
        let mut p = params("/k");
        p.cmdline = Some("a".repeat(70_000));
        assert!(VmConfig::parse(p).is_err());
        let mut p = params("/k");
        p.cmdline = Some("console=ttyS0\n".into());
        assert!(VmConfig::parse(p).is_err());
    }
}
