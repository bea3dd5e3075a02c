// SPDX-License-Identifier: Apache-2.0
//! `--kernel`, `--initramfs` and `--cmdline`: what the guest boots.

use std::path::PathBuf;

use super::{ValidationError, VmConfig};
use crate::layout;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PayloadConfig {
    /// An ELF vmlinux with a PVH note, or a bzImage.
    pub kernel: PathBuf,
    pub initramfs: Option<PathBuf>,
    pub cmdline: String,
}

impl PayloadConfig {
    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ValidationError> {
        // The loader appends policy parameters and a NUL; keep headroom for both.
        if self.cmdline.len() + 128 > layout::CMDLINE_MAX_SIZE {
            return Err(ValidationError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.cmdline.bytes().any(|b| !(0x20..0x7f).contains(&b)) {
            return Err(ValidationError::CmdlineNotPrintable);
        }
        Ok(())
    }
}
