// SPDX-License-Identifier: Apache-2.0
//! `--ism`: one virtio-ism device per occurrence (repeatable).
//!
//! `pool=<socket>` names the host pool broker; without it the device takes regions from a
//! pool embedded in this VMM (`pool_size=` bytes, shared by every embedded-pool device).

use std::path::PathBuf;

use super::option_parser::{ByteSized, OptionParser};
use super::{Error, ValidationError, VmConfig};

/// Default shared-memory window (the 64-bit BAR): regions plus notify slots.
pub const DEFAULT_ISM_WINDOW_SIZE: u64 = 64 << 20;
/// Default allocation granule of the window.
pub const DEFAULT_ISM_CHUNK_SIZE: u64 = 64 << 10;
/// Bytes of notify area per chunk: a 32-bit doorbell register, any width accepted.
pub const ISM_NOTIFY_SIZE: u64 = 4;
/// Smallest window: one 4 KiB chunk and its notify slot round up to 8 KiB.
pub const MIN_ISM_WINDOW_SIZE: u64 = 8 << 10;
/// Largest window: the 64-bit MMIO window must also hold every other device's BARs.
pub const MAX_ISM_WINDOW_SIZE: u64 = 64 << 30;
/// PCI slots on bus 0 (slot 0 is the host bridge).
const PCI_SLOTS: u8 = 32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsmDeviceConfig {
    /// Device id; `None` gets "_ism<n>" at wiring time.
    pub id: Option<String>,
    /// Pool broker socket; `None` = the embedded pool.
    pub pool: Option<PathBuf>,
    /// Size of the embedded pool (only with no `pool=`).
    pub pool_size: Option<u64>,
    /// Whole shared-memory window (BAR) size, a power of two.
    pub size: u64,
    pub chunk_size: u64,
    pub pci_segment: u16,
    /// The PCI slot the device must land on, if the user asked for one.
    pub pci_device_id: Option<u8>,
    /// What other devices of the pool may do with regions allocated by a driver that does
    /// not negotiate `VIRTIO_ISM_F_GRANT` (`draft_default_perm=none|ro|rw`).
    pub draft_default_perm: virtio_ism::DraftDefaultPerm,
}

/// Why an `--ism` option parses but cannot make a device.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IsmValidationError {
    #[error("--ism: size={0} is not a power of two in 8K..=64G")]
    WindowSize(u64),
    #[error("--ism: chunk_size={0} is not a power of two >= 4096")]
    ChunkSize(u64),
    #[error("--ism: size={size} has no room for one chunk of chunk_size={chunk_size}")]
    NoChunk { size: u64, chunk_size: u64 },
    #[error("--ism: pool_size is only for the embedded pool (drop pool= or pool_size=)")]
    PoolSizeWithBroker,
    #[error("--ism: pool_size={0} is not a non-zero multiple of 4096")]
    PoolSize(u64),
    #[error("--ism: embedded-pool devices disagree on pool_size ({0} vs {1})")]
    PoolSizeConflict(u64, u64),
    #[error("--ism: pool socket path is empty")]
    PoolPathEmpty,
    #[error("--ism: pci_segment={0} is not supported (only segment 0 exists)")]
    PciSegment(u16),
    #[error("--ism: pci_device_id={0} is outside 1..=31 (0 is the host bridge)")]
    PciDeviceId(u8),
    #[error("--ism: pci_device_id={0} is requested twice")]
    DuplicatePciDeviceId(u8),
    #[error("Device id {0:?} is used twice")]
    DuplicateId(String),
}

impl IsmDeviceConfig {
    pub const SYNTAX: &'static str = "virtio-ism device parameters \
        \"pool=<broker_socket>,pool_size=<embedded_pool_bytes>,size=<window_bytes>,\
        chunk_size=<bytes>,id=<device_id>,pci_segment=<segment_id>,pci_device_id=<slot>,\
        draft_default_perm=none|ro|rw\" \
        (repeatable; without pool= the device uses a pool embedded in this VMM; \
        draft_default_perm: what every other device of the pool may do with regions of a \
        driver that never grants (no VIRTIO_ISM_F_GRANT), default none = owner-only)";

    pub fn parse(input: &str) -> Result<Self, Error> {
        let mut parser = OptionParser::new();
        parser.add_all(&[
            "pool",
            "pool_size",
            "size",
            "chunk_size",
            "id",
            "pci_segment",
            "pci_device_id",
            "draft_default_perm",
        ]);
        parser.parse(input).map_err(Error::ParseIsm)?;
        let bytes = |name| {
            parser
                .convert::<ByteSized>(name)
                .map(|v| v.map(|b| b.0))
                .map_err(Error::ParseIsm)
        };
        Ok(Self {
            id: parser.get("id"),
            pool: parser.get("pool").map(PathBuf::from),
            pool_size: bytes("pool_size")?,
            size: bytes("size")?.unwrap_or(DEFAULT_ISM_WINDOW_SIZE),
            chunk_size: bytes("chunk_size")?.unwrap_or(DEFAULT_ISM_CHUNK_SIZE),
            pci_segment: parser
                .convert::<u16>("pci_segment")
                .map_err(Error::ParseIsm)?
                .unwrap_or(0),
            pci_device_id: parser
                .convert::<u8>("pci_device_id")
                .map_err(Error::ParseIsm)?,
            draft_default_perm: parser
                .convert::<virtio_ism::DraftDefaultPerm>("draft_default_perm")
                .map_err(Error::ParseIsm)?
                .unwrap_or_default(),
        })
    }

    /// The device model's configuration for this window: as many chunks as fit beside
    /// their notify slots.
    pub fn device_config(&self) -> Result<virtio_ism::IsmConfig, virtio_ism::ConfigError> {
        virtio_ism::IsmConfig::for_window(self.size, self.chunk_size, ISM_NOTIFY_SIZE)
            .map(|c| c.with_draft_default_perm(self.draft_default_perm))
    }

    /// Checks on this device alone; [`validate_ism_devices`] checks them together.
    pub fn validate(&self, _vm: &VmConfig) -> Result<(), ValidationError> {
        let err = |e| Err(ValidationError::Ism(e));
        if let Some(id) = &self.id {
            super::validate_identifier(id)?;
        }
        if !self.size.is_power_of_two()
            || !(MIN_ISM_WINDOW_SIZE..=MAX_ISM_WINDOW_SIZE).contains(&self.size)
        {
            return err(IsmValidationError::WindowSize(self.size));
        }
        if !self.chunk_size.is_power_of_two()
            || self.chunk_size < virtio_ism::config::MIN_CHUNK_SIZE
        {
            return err(IsmValidationError::ChunkSize(self.chunk_size));
        }
        if self.device_config().is_err() {
            return err(IsmValidationError::NoChunk {
                size: self.size,
                chunk_size: self.chunk_size,
            });
        }
        match (&self.pool, self.pool_size) {
            (Some(_), Some(_)) => return err(IsmValidationError::PoolSizeWithBroker),
            (Some(path), None) if path.as_os_str().is_empty() => {
                return err(IsmValidationError::PoolPathEmpty);
            }
            (None, Some(size)) if size == 0 || !size.is_multiple_of(4096) => {
                return err(IsmValidationError::PoolSize(size));
            }
            _ => {}
        }
        if self.pci_segment != 0 {
            return err(IsmValidationError::PciSegment(self.pci_segment));
        }
        if let Some(slot) = self.pci_device_id
            && !(1..PCI_SLOTS).contains(&slot)
        {
            return err(IsmValidationError::PciDeviceId(slot));
        }
        Ok(())
    }
}

/// Checks across every `--ism`: unique ids (also against `other_ids`, the ids of other
/// devices), unique requested slots, one embedded pool size.
pub fn validate_ism_devices(
    devices: &[IsmDeviceConfig],
    other_ids: &[&str],
) -> Result<(), ValidationError> {
    let err = |e| Err(ValidationError::Ism(e));
    let mut ids: Vec<&str> = other_ids.to_vec();
    let mut slots = Vec::new();
    let mut pool_size: Option<u64> = None;
    for dev in devices {
        if let Some(id) = &dev.id {
            if ids.contains(&id.as_str()) {
                return err(IsmValidationError::DuplicateId(id.clone()));
            }
            ids.push(id);
        }
        if let Some(slot) = dev.pci_device_id {
            if slots.contains(&slot) {
                return err(IsmValidationError::DuplicatePciDeviceId(slot));
            }
            slots.push(slot);
        }
        if let Some(size) = dev.pool_size {
            match pool_size {
                Some(first) if first != size => {
                    return err(IsmValidationError::PoolSizeConflict(first, size));
                }
                _ => pool_size = Some(size),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_valid(input: &str) -> IsmDeviceConfig {
        let cfg = IsmDeviceConfig::parse(input).unwrap();
        let vm = crate::config::VmConfig::parse(crate::config::VmParams {
            kernel: Some("/k".into()),
            ..Default::default()
        })
        .unwrap();
        cfg.validate(&vm).unwrap();
        cfg
    }

    fn validation_error(input: &str) -> IsmValidationError {
        let cfg = IsmDeviceConfig::parse(input).unwrap();
        let vm = crate::config::VmConfig::parse(crate::config::VmParams {
            kernel: Some("/k".into()),
            ..Default::default()
        })
        .unwrap();
        match cfg.validate(&vm).unwrap_err() {
            ValidationError::Ism(e) => e,
            other => panic!("{input}: not an ism error: {other:?}"),
        }
    }

    #[test]
    fn test_valid_ism_config_defaults() {
        let cfg = parse_valid("");
        assert_eq!(cfg.size, DEFAULT_ISM_WINDOW_SIZE);
        assert_eq!(cfg.chunk_size, DEFAULT_ISM_CHUNK_SIZE);
        assert_eq!(cfg.pool, None);
        assert_eq!(cfg.pool_size, None);
        assert_eq!(cfg.id, None);
        assert_eq!(cfg.pci_segment, 0);
        assert_eq!(cfg.pci_device_id, None);
        assert_eq!(cfg.draft_default_perm, virtio_ism::DraftDefaultPerm::None);
        assert_eq!(
            cfg.device_config().unwrap().draft_default_perm,
            virtio_ism::DraftDefaultPerm::None
        );
    }

    #[test]
    fn test_draft_default_perm_reaches_the_device_config() {
        use virtio_ism::DraftDefaultPerm;
        for (text, policy) in [
            ("none", DraftDefaultPerm::None),
            ("ro", DraftDefaultPerm::ReadOnly),
            ("rw", DraftDefaultPerm::ReadWrite),
        ] {
            let cfg = parse_valid(&format!("draft_default_perm={text}"));
            assert_eq!(cfg.draft_default_perm, policy);
            assert_eq!(cfg.device_config().unwrap().draft_default_perm, policy);
        }
    }

    #[test]
    fn test_valid_ism_config_all_options() {
        let cfg = parse_valid("id=ism0,size=256M,chunk_size=4K,pool=/run/ism.sock");
        assert_eq!(cfg.id.as_deref(), Some("ism0"));
        assert_eq!(cfg.size, 256 << 20);
        assert_eq!(cfg.chunk_size, 4096);
        assert_eq!(cfg.pool, Some(PathBuf::from("/run/ism.sock")));
        let layout = cfg.device_config().unwrap().layout().unwrap();
        assert_eq!(layout.window_size, 256 << 20);
        assert!(layout.notify_offset + layout.notify_len <= layout.window_size);

        let cfg = parse_valid("pool_size=1G,size=1M,chunk_size=64K,pci_segment=0,pci_device_id=5");
        assert_eq!(cfg.pool_size, Some(1 << 30));
        assert_eq!(cfg.pci_device_id, Some(5));
        // 16 chunks plus their slots overflow 1 MiB: one chunk goes.
        assert_eq!(cfg.device_config().unwrap().shm_size, 15 * (64 << 10));
    }

    #[test]
    fn test_invalid_ism_config_syntax() {
        for bad in [
            "sizes=1M",
            "size=lots",
            "chunk_size=-1",
            "pci_segment=x",
            "pci_device_id=300",
            "pool_size=1Q",
            "draft_default_perm=rwm",
            "draft_default_perm=RW",
        ] {
            assert!(
                matches!(IsmDeviceConfig::parse(bad), Err(Error::ParseIsm(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn test_invalid_ism_config_values() {
        use IsmValidationError as E;
        assert_eq!(validation_error("size=3M"), E::WindowSize(3 << 20));
        assert_eq!(validation_error("size=4K"), E::WindowSize(4096));
        assert_eq!(validation_error("size=128G"), E::WindowSize(128 << 30));
        assert_eq!(validation_error("chunk_size=2K"), E::ChunkSize(2048));
        assert_eq!(validation_error("chunk_size=12K"), E::ChunkSize(12 << 10));
        assert_eq!(
            validation_error("size=1M,chunk_size=1M"),
            E::NoChunk {
                size: 1 << 20,
                chunk_size: 1 << 20
            }
        );
        assert_eq!(
            validation_error("pool=/s,pool_size=1G"),
            E::PoolSizeWithBroker
        );
        assert_eq!(validation_error("pool_size=1000"), E::PoolSize(1000));
        assert_eq!(validation_error("pool_size=0"), E::PoolSize(0));
        assert_eq!(validation_error("pci_segment=1"), E::PciSegment(1));
        assert_eq!(validation_error("pci_device_id=0"), E::PciDeviceId(0));
        assert_eq!(validation_error("pci_device_id=32"), E::PciDeviceId(32));
        let cfg = IsmDeviceConfig::parse("id=__x").unwrap();
        let vm = crate::config::VmConfig::parse(crate::config::VmParams {
            kernel: Some("/k".into()),
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(
            cfg.validate(&vm),
            Err(ValidationError::InvalidIdentifier(_))
        ));
    }

    #[test]
    fn test_ism_devices_validated_together() {
        use IsmValidationError as E;
        let dev = |s: &str| IsmDeviceConfig::parse(s).unwrap();
        assert!(validate_ism_devices(&[dev("id=a"), dev("id=b"), dev("")], &[]).is_ok());
        assert_eq!(
            validate_ism_devices(&[dev("id=a"), dev("id=a")], &[]),
            Err(ValidationError::Ism(E::DuplicateId("a".into())))
        );
        assert_eq!(
            validate_ism_devices(&[dev("id=rng")], &["rng"]),
            Err(ValidationError::Ism(E::DuplicateId("rng".into())))
        );
        assert_eq!(
            validate_ism_devices(&[dev("pci_device_id=3"), dev("pci_device_id=3")], &[]),
            Err(ValidationError::Ism(E::DuplicatePciDeviceId(3)))
        );
        assert_eq!(
            validate_ism_devices(&[dev("pool_size=1G"), dev("pool_size=2G")], &[]),
            Err(ValidationError::Ism(E::PoolSizeConflict(1 << 30, 2 << 30)))
        );
        assert!(validate_ism_devices(&[dev("pool_size=1G"), dev("pool_size=1G")], &[]).is_ok());
    }
}
