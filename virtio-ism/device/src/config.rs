// SPDX-License-Identifier: Apache-2.0
//! Device configuration given by the VMM, and the shared-memory window layout derived from it.

/// Smallest chunk: one x86 page, the granule of a host mapping.
pub const MIN_CHUNK_SIZE: u64 = 4096;
/// Largest notify slot: one page, so a VMM may give each slot its own page.
pub const MAX_NOTIFY_SIZE: u64 = 4096;
/// Most chunks one window may have; bounds the device's own bookkeeping (a bitmap of
/// 4 Mi bits is 512 KiB).
pub const MAX_CHUNKS: u64 = 1 << 22;

/// What the VMM chooses for one virtio-ism device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IsmConfig {
    /// Bytes of shmid 1 (the region area); a non-zero multiple of `chunk_size`.
    pub shm_size: u64,
    /// Allocation granule; a power of two >= 4096.
    pub chunk_size: u64,
    /// Bytes of notify area per chunk; a power of two in 1..=4096.
    pub notify_size: u64,
    /// What every other device of the pool may do with a region allocated by a driver that
    /// did not negotiate `VIRTIO_ISM_F_GRANT` (and so can never grant).
    pub draft_default_perm: DraftDefaultPerm,
}

/// The operator's policy for regions of drivers that never grant (`draft_default_perm=`).
///
/// Right after such a driver's ALLOC the device grants the pool's default target (every
/// other device of the pool) ATTACH plus the chosen access; never MANAGE. Any device of the
/// pool that learns the token can then attach the region: tokens are random 64-bit values,
/// but they travel through guests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DraftDefaultPerm {
    /// Owner-only, like every region of a granting driver before its first GRANT.
    #[default]
    None,
    /// Others may attach read-only (ATTACH | READ).
    ReadOnly,
    /// Others may attach read-write (ATTACH | READ | WRITE).
    ReadWrite,
}

impl DraftDefaultPerm {
    /// The permission bits granted to the default target, or None for no grant.
    pub fn grant_bits(self) -> Option<u64> {
        use virtio_ism_proto::defs::perm::{
            VIRTIO_ISM_PERM_ATTACH, VIRTIO_ISM_PERM_READ, VIRTIO_ISM_PERM_WRITE,
        };
        match self {
            Self::None => None,
            Self::ReadOnly => Some(VIRTIO_ISM_PERM_ATTACH | VIRTIO_ISM_PERM_READ),
            Self::ReadWrite => {
                Some(VIRTIO_ISM_PERM_ATTACH | VIRTIO_ISM_PERM_READ | VIRTIO_ISM_PERM_WRITE)
            }
        }
    }

    /// The option value: `none`, `ro` or `rw`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::ReadOnly => "ro",
            Self::ReadWrite => "rw",
        }
    }
}

impl std::str::FromStr for DraftDefaultPerm {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "ro" => Ok(Self::ReadOnly),
            "rw" => Ok(Self::ReadWrite),
            other => Err(ConfigError::DraftDefaultPerm(other.to_string())),
        }
    }
}

impl std::fmt::Display for DraftDefaultPerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an `IsmConfig` was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("Chunk size {0} is not a power of two >= 4096")]
    ChunkSize(u64),
    #[error(
        "Shared-memory size {shm_size} is not a non-zero multiple of the chunk size {chunk_size}"
    )]
    ShmSize { shm_size: u64, chunk_size: u64 },
    #[error("Too many chunks: {0} (at most {MAX_CHUNKS})")]
    TooManyChunks(u64),
    #[error("Notify size {0} is not a power of two in 1..=4096")]
    NotifySize(u64),
    #[error("Window size {0} is not a power of two")]
    WindowSize(u64),
    #[error("Shared-memory window size overflows")]
    WindowOverflow,
    #[error("draft_default_perm={0:?} is not one of none, ro, rw")]
    DraftDefaultPerm(String),
}

/// Where things are in the device's shared-memory window (one 64-bit BAR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowLayout {
    pub chunk_size: u64,
    pub notify_size: u64,
    /// Number of chunks in shmid 1.
    pub chunks: u64,
    /// shmid 1: window offset 0, this long.
    pub shm_size: u64,
    /// shmid 2: starts right after shmid 1.
    pub notify_offset: u64,
    /// shmid 2 length: one `notify_size` slot per chunk.
    pub notify_len: u64,
    /// Whole window: shmid 1 + shmid 2 rounded up to a power of two.
    pub window_size: u64,
}

impl IsmConfig {
    /// The largest configuration whose whole window (shmid 1 + shmid 2) fits in
    /// `window_size` bytes, for a VMM that budgets the BAR first.
    pub fn for_window(
        window_size: u64,
        chunk_size: u64,
        notify_size: u64,
    ) -> Result<Self, ConfigError> {
        if !window_size.is_power_of_two() {
            return Err(ConfigError::WindowSize(window_size));
        }
        let per_chunk = chunk_size
            .checked_add(notify_size)
            .ok_or(ConfigError::WindowOverflow)?;
        let chunks = (window_size / per_chunk.max(1)).min(MAX_CHUNKS);
        let config = Self {
            shm_size: chunks * chunk_size,
            chunk_size,
            notify_size,
            draft_default_perm: DraftDefaultPerm::None,
        };
        config.layout()?;
        Ok(config)
    }

    /// This configuration with `policy` for regions of drivers that never grant.
    pub fn with_draft_default_perm(self, policy: DraftDefaultPerm) -> Self {
        Self {
            draft_default_perm: policy,
            ..self
        }
    }

    /// Check the configuration and lay out the window.
    pub fn layout(&self) -> Result<WindowLayout, ConfigError> {
        if !self.chunk_size.is_power_of_two() || self.chunk_size < MIN_CHUNK_SIZE {
            return Err(ConfigError::ChunkSize(self.chunk_size));
        }
        if self.shm_size == 0 || !self.shm_size.is_multiple_of(self.chunk_size) {
            return Err(ConfigError::ShmSize {
                shm_size: self.shm_size,
                chunk_size: self.chunk_size,
            });
        }
        let chunks = self.shm_size / self.chunk_size;
        if chunks > MAX_CHUNKS {
            return Err(ConfigError::TooManyChunks(chunks));
        }
        if !self.notify_size.is_power_of_two() || self.notify_size > MAX_NOTIFY_SIZE {
            return Err(ConfigError::NotifySize(self.notify_size));
        }
        let notify_len = chunks * self.notify_size;
        let window_size = self
            .shm_size
            .checked_add(notify_len)
            .and_then(u64::checked_next_power_of_two)
            .ok_or(ConfigError::WindowOverflow)?;
        Ok(WindowLayout {
            chunk_size: self.chunk_size,
            notify_size: self.notify_size,
            chunks,
            shm_size: self.shm_size,
            notify_offset: self.shm_size,
            notify_len,
            window_size,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_layout_places_notify_after_regions_and_rounds_window() {
        let layout = IsmConfig {
            shm_size: 64 << 20,
            chunk_size: 1 << 20,
            notify_size: 4,
            draft_default_perm: DraftDefaultPerm::None,
        }
        .layout()
        .unwrap();
        assert_eq!(layout.chunks, 64);
        assert_eq!(layout.notify_offset, 64 << 20);
        assert_eq!(layout.notify_len, 256);
        assert_eq!(layout.window_size, 128 << 20);
    }

    #[test]
    fn test_for_window_fits_regions_and_notify_area_in_the_window() {
        let config = IsmConfig::for_window(1 << 20, 64 << 10, 4).unwrap();
        assert_eq!(config.shm_size, 15 * (64 << 10));
        let layout = config.layout().unwrap();
        assert_eq!(layout.window_size, 1 << 20);
        assert!(layout.notify_offset + layout.notify_len <= layout.window_size);
        // A window of exactly chunks * chunk_size leaves no room for the last chunk's slot.
        let config = IsmConfig::for_window(1 << 30, 1 << 20, 1).unwrap();
        assert_eq!(config.shm_size, 1023 << 20);
        assert!(IsmConfig::for_window(3 << 20, 1 << 20, 1).is_err());
        assert!(IsmConfig::for_window(32 << 10, 64 << 10, 4).is_err());
    }

    #[test]
    fn test_layout_rejects_bad_values() {
        let good = IsmConfig {
            shm_size: 1 << 20,
            chunk_size: 4096,
            notify_size: 1,
            draft_default_perm: DraftDefaultPerm::None,
        };
        assert!(good.layout().is_ok());
        let bad_chunk = IsmConfig {
            chunk_size: 2048,
            ..good
        };
        assert_eq!(bad_chunk.layout(), Err(ConfigError::ChunkSize(2048)));
        let odd_chunk = IsmConfig {
            chunk_size: 12288,
            ..good
        };
        assert!(odd_chunk.layout().is_err());
        let bad_shm = IsmConfig {
            shm_size: (1 << 20) + 1,
            ..good
        };
        assert!(matches!(bad_shm.layout(), Err(ConfigError::ShmSize { .. })));
        let bad_notify = IsmConfig {
            notify_size: 3,
            ..good
        };
        assert_eq!(bad_notify.layout(), Err(ConfigError::NotifySize(3)));
        let huge = IsmConfig {
            shm_size: 1 << 40,
            ..good
        };
        assert!(matches!(huge.layout(), Err(ConfigError::TooManyChunks(_))));
    }

    #[test]
    fn test_draft_default_perm_parses_and_never_grants_manage() {
        use virtio_ism_proto::defs::perm::VIRTIO_ISM_PERM_MANAGE;
        for (text, policy) in [
            ("none", DraftDefaultPerm::None),
            ("ro", DraftDefaultPerm::ReadOnly),
            ("rw", DraftDefaultPerm::ReadWrite),
        ] {
            assert_eq!(text.parse::<DraftDefaultPerm>(), Ok(policy));
            assert_eq!(policy.to_string(), text);
            assert_eq!(policy.grant_bits().unwrap_or(0) & VIRTIO_ISM_PERM_MANAGE, 0);
        }
        assert_eq!(DraftDefaultPerm::None.grant_bits(), None);
        assert_eq!(DraftDefaultPerm::ReadOnly.grant_bits(), Some(0b101));
        assert_eq!(DraftDefaultPerm::ReadWrite.grant_bits(), Some(0b111));
        assert!("RW".parse::<DraftDefaultPerm>().is_err());
        assert_eq!(
            IsmConfig::for_window(1 << 20, 4096, 4)
                .unwrap()
                .draft_default_perm,
            DraftDefaultPerm::None
        );
    }
}
