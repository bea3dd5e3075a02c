// SPDX-License-Identifier: Apache-2.0
//! Pool configuration and the size syntax used on the command line.

use crate::memory::{HUGE_PAGE_SIZE, PAGE_SIZE};

/// How big the pool is and how much of it one VM may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Total bytes of region memory the pool may have alive at once.
    pub size: u64,
    /// Bytes of regions one VM may hold at once (allocated or attached); `None` = only the
    /// pool size limits it. The broker binary never runs without one (see
    /// [`default_per_vm_limit`]).
    pub per_vm_limit: Option<u64>,
    /// Regions one VM may hold at once (allocated or attached). Each live region is a
    /// descriptor in the process that runs the pool, so this bounds how many one VM can
    /// pin; `None` = no count limit.
    pub per_vm_regions: Option<u64>,
    /// Back regions with huge pages (MFD_HUGETLB, 2 MiB); region sizes must then be
    /// multiples of 2 MiB.
    pub hugepages: bool,
    /// Group id reported to every session; `None` picks a random one, so two independent
    /// pools never look like the same group.
    pub gid: Option<u64>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 1 << 30,
            per_vm_limit: None,
            per_vm_regions: Some(DEFAULT_PER_VM_REGIONS),
            hugepages: false,
            gid: None,
        }
    }
}

/// Regions one VM may hold unless configured otherwise.
pub const DEFAULT_PER_VM_REGIONS: u64 = 1024;

/// The per-VM byte limit the broker uses when none is given: half the pool, rounded down
/// to the page size (at least one page), so that no single VM can take the whole pool.
pub fn default_per_vm_limit(size: u64, page_size: u64) -> u64 {
    let half = size / 2;
    (half - half % page_size).max(page_size)
}

impl PoolConfig {
    /// Granule of region sizes in this pool.
    pub fn page_size(&self) -> u64 {
        if self.hugepages {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        }
    }
}

/// Why a size string was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeParseError {
    #[error("Empty size")]
    Empty,
    #[error("Invalid number in size {0:?}")]
    Number(String),
    #[error("Unknown size suffix {0:?} (use K, M, G or T)")]
    Suffix(String),
    #[error("Size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses `4096`, `64K`, `512M`, `4G`, `1T` (binary multiples; an optional trailing `B` or
/// `iB` is accepted).
pub fn parse_size(text: &str) -> Result<u64, SizeParseError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(SizeParseError::Empty);
    }
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeParseError::Number(text.to_string()));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| SizeParseError::Overflow(text.to_string()))?;
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(SizeParseError::Suffix(suffix.to_string())),
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeParseError::Overflow(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_size_accepts_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("4gib"), Ok(4 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn test_default_per_vm_limit_is_half_the_pool_in_pages() {
        assert_eq!(default_per_vm_limit(4 << 30, PAGE_SIZE), 2 << 30);
        assert_eq!(default_per_vm_limit(3 * PAGE_SIZE, PAGE_SIZE), PAGE_SIZE);
        assert_eq!(default_per_vm_limit(PAGE_SIZE, PAGE_SIZE), PAGE_SIZE);
        assert_eq!(
            default_per_vm_limit(6 * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE),
            3 * HUGE_PAGE_SIZE
        );
    }

    #[test]
    fn test_parse_size_rejects_garbage() {
        assert_eq!(parse_size(""), Err(SizeParseError::Empty));
        assert!(matches!(parse_size("G"), Err(SizeParseError::Number(_))));
        assert!(matches!(parse_size("4X"), Err(SizeParseError::Suffix(_))));
        assert!(matches!(parse_size("-4G"), Err(SizeParseError::Number(_))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeParseError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(SizeParseError::Overflow(_))
        ));
    }
}
