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
        };
        config.layout()?;
        Ok(config)
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
}
