// SPDX-License-Identifier: Apache-2.0
//! `--rng src=<entropy source>`: the virtio-rng device.

use std::path::PathBuf;

use super::option_parser::OptionParser;
use super::{Error, ValidationError, VmConfig};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RngConfig {
    pub src: PathBuf,
    pub id: Option<String>,
}

pub const DEFAULT_RNG_SOURCE: &str = "/dev/urandom";

impl RngConfig {
    pub const SYNTAX: &'static str =
        "Random number generator parameters \"src=<entropy_source_path>,id=<device_id>\"";

    pub fn parse(input: &str) -> Result<Self, Error> {
        let mut parser = OptionParser::new();
        parser.add_all(&["src", "id"]);
        parser.parse(input).map_err(Error::ParseRng)?;
        Ok(Self {
            src: PathBuf::from(
                parser
                    .get("src")
                    .unwrap_or_else(|| DEFAULT_RNG_SOURCE.to_owned()),
            ),
            id: parser.get("id"),
        })
    }

    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ValidationError> {
        if self.src.as_os_str().is_empty() {
            return Err(ValidationError::RngSourceEmpty);
        }
        if let Some(id) = &self.id {
            super::validate_identifier(id)?;
        }
        Ok(())
    }
}
