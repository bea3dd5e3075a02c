// SPDX-License-Identifier: Apache-2.0
//! `--platform pvm=auto|on|off`: platform quirks. `pvm` selects the policy for PVM hosts
//! (KVM served by `kvm_pvm`, where guest ring 0 is emulated): `auto` turns it on when
//! /sys/module/kvm_pvm exists.

use super::option_parser::OptionParser;
use super::{Error, ValidationError, VmConfig};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PvmMode {
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlatformConfig {
    pub pvm: PvmMode,
}

impl PlatformConfig {
    pub const SYNTAX: &'static str = "Platform parameters \"pvm=auto|on|off\"";

    pub fn parse(input: &str) -> Result<Self, Error> {
        let mut parser = OptionParser::new();
        parser.add("pvm");
        parser.parse(input).map_err(Error::ParsePlatform)?;
        let pvm = match parser.get("pvm").as_deref() {
            None | Some("auto") => PvmMode::Auto,
            Some("on" | "true") => PvmMode::On,
            Some("off" | "false") => PvmMode::Off,
            Some(other) => return Err(Error::ParsePlatformPvm(other.to_owned())),
        };
        Ok(Self { pvm })
    }

    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ValidationError> {
        Ok(())
    }
}
