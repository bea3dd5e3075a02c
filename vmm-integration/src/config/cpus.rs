// SPDX-License-Identifier: Apache-2.0
//! `--cpus boot=N[,max=N]`.

use super::option_parser::OptionParser;
use super::{Error, ValidationError, VmConfig};

/// The vCPU count. CPU hotplug is not supported, so `max`, when given, must equal `boot`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpusConfig {
    pub boot_vcpus: u8,
    pub max_vcpus: u8,
}

/// APIC ids are 8 bits in the MADT entries we write and 0xff is the broadcast id.
pub const MAX_VCPUS: u8 = 254;
pub const DEFAULT_VCPUS: u8 = 1;

impl Default for CpusConfig {
    fn default() -> Self {
        Self {
            boot_vcpus: DEFAULT_VCPUS,
            max_vcpus: DEFAULT_VCPUS,
        }
    }
}

impl CpusConfig {
    pub const SYNTAX: &'static str = "CPU parameters \"boot=<boot_vcpus>,max=<max_vcpus>\"";

    pub fn parse(input: &str) -> Result<Self, Error> {
        let mut parser = OptionParser::new();
        parser.add_all(&["boot", "max"]);
        parser.parse(input).map_err(Error::ParseCpus)?;
        let boot_vcpus = parser
            .convert::<u8>("boot")
            .map_err(Error::ParseCpus)?
            .unwrap_or(DEFAULT_VCPUS);
        let max_vcpus = parser
            .convert::<u8>("max")
            .map_err(Error::ParseCpus)?
            .unwrap_or(boot_vcpus);
        Ok(Self {
            boot_vcpus,
            max_vcpus,
        })
    }

    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ValidationError> {
        if self.boot_vcpus == 0 || self.boot_vcpus > MAX_VCPUS {
            return Err(ValidationError::CpusCount(self.boot_vcpus));
        }
        if self.max_vcpus != self.boot_vcpus {
            return Err(ValidationError::CpusHotplugUnsupported);
        }
        Ok(())
    }
}
