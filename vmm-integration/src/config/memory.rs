// SPDX-License-Identifier: Apache-2.0
//! `--memory size=<bytes>,shared=on|off,hugepages=on|off`.

use super::option_parser::{ByteSized, OptionParser, Toggle};
use super::{Error, ValidationError, VmConfig};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Guest RAM in bytes.
    pub size: u64,
    /// Back RAM with a memfd mapped MAP_SHARED, so another process can map it.
    pub shared: bool,
    /// Back RAM with 2 MiB huge pages (hugetlbfs memfd).
    pub hugepages: bool,
}

pub const DEFAULT_MEMORY_SIZE: u64 = 512 << 20;
/// Enough for the boot structures below 1 MiB plus a small kernel.
pub const MIN_MEMORY_SIZE: u64 = 8 << 20;
/// Size of the huge pages used with `hugepages=on`.
pub const HUGEPAGE_SIZE: u64 = 2 << 20;
const PAGE_SIZE: u64 = 4096;

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: DEFAULT_MEMORY_SIZE,
            shared: false,
            hugepages: false,
        }
    }
}

impl MemoryConfig {
    pub const SYNTAX: &'static str =
        "Memory parameters \"size=<guest_memory_size>,shared=on|off,hugepages=on|off\"";

    pub fn parse(input: &str) -> Result<Self, Error> {
        let mut parser = OptionParser::new();
        parser.add_all(&["size", "shared", "hugepages"]);
        parser.parse(input).map_err(Error::ParseMemory)?;
        let default = Self::default();
        Ok(Self {
            size: parser
                .convert::<ByteSized>("size")
                .map_err(Error::ParseMemory)?
                .map_or(default.size, |s| s.0),
            shared: parser
                .convert::<Toggle>("shared")
                .map_err(Error::ParseMemory)?
                .is_some_and(|t| t.0),
            hugepages: parser
                .convert::<Toggle>("hugepages")
                .map_err(Error::ParseMemory)?
                .is_some_and(|t| t.0),
        })
    }

    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ValidationError> {
        if self.size < MIN_MEMORY_SIZE {
            return Err(ValidationError::MemoryTooSmall(self.size));
        }
        let align = if self.hugepages {
            HUGEPAGE_SIZE
        } else {
            PAGE_SIZE
        };
        if !self.size.is_multiple_of(align) {
            return Err(ValidationError::MemoryUnaligned(self.size, align));
        }
        Ok(())
    }

    /// Whether another process can map guest RAM (needed by devices that share it).
    pub fn backed_by_shared_memory(&self) -> bool {
        self.shared || self.hugepages
    }
}
