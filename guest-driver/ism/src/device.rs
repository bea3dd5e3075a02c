// SPDX-License-Identifier: Apache-2.0
//! An open /dev/ismN.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bitflags::bitflags;

use crate::error::{CommandError, Error, Result};
use crate::event::Event;
use crate::region::Region;
use crate::uapi;

bitflags! {
    /// Permissions of a grant.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Perms: u64 {
        const READ = uapi::VIRTIO_ISM_PERM_READ;
        const WRITE = uapi::VIRTIO_ISM_PERM_WRITE;
        const ATTACH = uapi::VIRTIO_ISM_PERM_ATTACH;
        const MANAGE = uapi::VIRTIO_ISM_PERM_MANAGE;
        /// SET_DEFAULT: clear the default; SET_FOR_DEVICE: drop the device's override.
        const CLEAN_DEFAULT = uapi::VIRTIO_ISM_PERM_CLEAN_DEFAULT;
    }
}

bitflags! {
    /// What the driver knows of a region.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct RegionFlags: u32 {
        const WRITE = uapi::VIRTIO_ISM_REGION_F_WRITE;
        const OWNER = uapi::VIRTIO_ISM_REGION_F_OWNER;
        const BOUND = uapi::VIRTIO_ISM_REGION_F_BOUND;
        const KEPT = uapi::VIRTIO_ISM_REGION_F_KEPT;
        const MINE = uapi::VIRTIO_ISM_REGION_F_MINE;
        const HOTPLUGGED = uapi::VIRTIO_ISM_REGION_F_HOTPLUGGED;
        /// Kicks arrive on an MSI-X vector of the region's own.
        const OWN_VECTOR = uapi::VIRTIO_ISM_REGION_F_OWN_VECTOR;
    }
}

/// The access ATTACH asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Writable if WRITE is granted, else read-only.
    AsGranted,
    ReadOnly,
    ReadWrite,
}

impl Access {
    fn raw(self) -> u32 {
        match self {
            Self::AsGranted => 0,
            Self::ReadOnly => uapi::VIRTIO_ISM_PERM_READ as u32,
            Self::ReadWrite => (uapi::VIRTIO_ISM_PERM_READ | uapi::VIRTIO_ISM_PERM_WRITE) as u32,
        }
    }
}

/// The device's identity and geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Info {
    pub gid: u64,
    pub devid: u64,
    pub chunk_size: u64,
    pub notify_size: u64,
    pub event_queue: bool,
    pub query: bool,
    /// Regions are owner-only until GRANTed (`VIRTIO_ISM_F_GRANT` negotiated).
    pub grant: bool,
    /// BIND gives each region an MSI-X vector of its own, so a kick names its region.
    pub kick_vectors: bool,
    /// Regions on the shared vector get the device's pending bits, so a kick names its
    /// region there too. Without this or `kick_vectors` a kick is reported for every
    /// bound region.
    pub kick_pending: bool,
    pub shm_size: u64,
    pub regions: u64,
    pub instance: u32,
}

/// A region the driver holds, as REGION_INFO describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    pub token: u64,
    pub size: u64,
    pub flags: RegionFlags,
    /// Kicks received for the region while bound.
    pub kicks: u64,
    /// (offset in the device window, size) of each area, in order.
    pub areas: Vec<(u64, u64)>,
}

/// Driver counters, read from sysfs (`/sys/class/misc/ismN/counters/`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Control commands completed.
    pub ctrl_commands: u64,
    /// ... with a status other than OK.
    pub ctrl_errors: u64,
    /// Commands the device did not answer in time.
    pub ctrl_timeouts: u64,
    /// Answers that came after their command timed out.
    pub late_replies: u64,
    /// Replies refused: bad offset, size or count.
    pub bad_replies: u64,
    pub kicks_sent: u64,
    /// Interrupts on regions' own vectors.
    pub kick_irqs: u64,
    /// Interrupts on the config vector (config changes and shared-vector kicks).
    pub config_irqs: u64,
    /// Event queue entries received.
    pub events: u64,
    /// Events dropped because a reader's queue was full.
    pub events_lost: u64,
}

impl Counters {
    /// The counter file names, in the order of the fields.
    pub const NAMES: [&'static str; 10] = [
        "ctrl_commands",
        "ctrl_errors",
        "ctrl_timeouts",
        "late_replies",
        "bad_replies",
        "kicks_sent",
        "kick_irqs",
        "config_irqs",
        "events",
        "events_lost",
    ];

    /// The sysfs directory of device instance `n`.
    pub fn sysfs_dir(instance: u32) -> PathBuf {
        PathBuf::from(format!("/sys/class/misc/ism{instance}/counters"))
    }

    /// Read every counter from `dir` (one decimal number per file, named as the field).
    pub fn read_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<u64> {
            let path = dir.join(name);
            let text = std::fs::read_to_string(&path).map_err(|source| Error::ReadCounter {
                path: path.clone(),
                source,
            })?;
            text.trim().parse().map_err(|_| Error::ReadCounter {
                path,
                source: io::Error::from(io::ErrorKind::InvalidData),
            })
        };
        Ok(Self {
            ctrl_commands: read("ctrl_commands")?,
            ctrl_errors: read("ctrl_errors")?,
            ctrl_timeouts: read("ctrl_timeouts")?,
            late_replies: read("late_replies")?,
            bad_replies: read("bad_replies")?,
            kicks_sent: read("kicks_sent")?,
            kick_irqs: read("kick_irqs")?,
            config_irqs: read("config_irqs")?,
            events: read("events")?,
            events_lost: read("events_lost")?,
        })
    }
}

/// An open /dev/ismN. Regions it allocates or attaches are released when it closes
/// (unless kept with [`Device::keep`]).
#[derive(Debug)]
pub struct Device {
    fd: OwnedFd,
}

impl Device {
    /// Open a device node, e.g. `/dev/ism0`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let open_err = |source| Error::Open {
            path: path.to_path_buf(),
            source,
        };
        let cpath = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| open_err(io::Error::from_raw_os_error(libc::EINVAL)))?;
        // SAFETY: a NUL-terminated path; the returned fd is checked and then owned.
        let fd = unsafe { libc::open(cpath.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(open_err(io::Error::last_os_error()));
        }
        // SAFETY: fd is a freshly opened descriptor nobody else owns.
        Ok(Self::from_fd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Use an already open device file.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    /// Every /dev/ism* node, sorted.
    pub fn list_nodes(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
        let dir = dir.as_ref();
        let entries = std::fs::read_dir(dir).map_err(|source| Error::ListDevices {
            dir: dir.to_path_buf(),
            source,
        })?;
        let mut nodes: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix("ism"))
                    .is_some_and(|rest| {
                        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit())
                    })
            })
            .collect();
        nodes.sort();
        Ok(nodes)
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// One ioctl whose argument is `*arg`.
    fn ioctl<T>(&self, op: &'static str, request: u32, arg: &mut T) -> Result<()> {
        loop {
            // SAFETY: `arg` is a live, exclusively borrowed value of the type the request
            // number encodes (checked against the uapi header by tests/c_layout.rs).
            let ret = unsafe {
                libc::ioctl(
                    self.fd.as_raw_fd(),
                    request as libc::c_ulong,
                    std::ptr::from_mut(arg),
                )
            };
            if ret >= 0 {
                return Ok(());
            }
            let errno = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if errno != libc::EINTR {
                return Err(Error::Command {
                    op,
                    source: CommandError::from_errno(errno),
                });
            }
        }
    }

    fn token_ioctl(&self, op: &'static str, request: u32, token: u64) -> Result<()> {
        let mut arg = uapi::virtio_ism_token_op {
            token,
            ..Default::default()
        };
        self.ioctl(op, request, &mut arg)
    }

    /// The device's identity and geometry.
    pub fn info(&self) -> Result<Info> {
        let mut raw = uapi::virtio_ism_info::default();
        self.ioctl("INFO", uapi::VIRTIO_ISM_IOC_INFO, &mut raw)?;
        Ok(Info {
            gid: raw.gid,
            devid: raw.devid,
            chunk_size: raw.chunk_size,
            notify_size: raw.notify_size,
            event_queue: raw.features & uapi::VIRTIO_ISM_INFO_F_EVENT_QUEUE != 0,
            query: raw.features & uapi::VIRTIO_ISM_INFO_F_QUERY != 0,
            grant: raw.features & uapi::VIRTIO_ISM_INFO_F_GRANT != 0,
            kick_vectors: raw.flags & uapi::VIRTIO_ISM_INFO_KICK_VECTORS != 0,
            kick_pending: raw.flags & uapi::VIRTIO_ISM_INFO_KICK_PENDING != 0,
            shm_size: raw.shm_size,
            regions: raw.nr_regions,
            instance: raw.instance,
        })
    }

    /// Allocate a region of `size` bytes (rounded up to pages) and map it.
    pub fn alloc(&self, size: u64) -> Result<Region<'_>> {
        let mut raw = uapi::virtio_ism_region {
            size,
            ..Default::default()
        };
        self.ioctl("ALLOC", uapi::VIRTIO_ISM_IOC_ALLOC, &mut raw)?;
        Region::map(self, &raw)
    }

    /// Attach a region by token (or take back one the driver kept) and map it.
    pub fn attach(&self, token: u64, access: Access) -> Result<Region<'_>> {
        let mut raw = uapi::virtio_ism_region {
            token,
            perm: access.raw(),
            ..Default::default()
        };
        self.ioctl("ATTACH", uapi::VIRTIO_ISM_IOC_ATTACH, &mut raw)?;
        Region::map(self, &raw)
    }

    /// Stop holding a region; every mapping of it (any process) is removed first.
    pub fn detach(&self, token: u64) -> Result<()> {
        self.token_ioctl("DETACH", uapi::VIRTIO_ISM_IOC_DETACH, token)
    }

    /// Hand a region this file holds to the driver: it survives this file, and a later
    /// ATTACH of its token (from any file) takes it back without a device command.
    pub fn keep(&self, token: u64) -> Result<()> {
        self.token_ioctl("KEEP", uapi::VIRTIO_ISM_IOC_KEEP, token)
    }

    /// Set the default grant of a region.
    pub fn grant_default(&self, token: u64, perms: Perms) -> Result<()> {
        let mut raw = uapi::virtio_ism_grant {
            token,
            perms: perms.bits(),
            ..Default::default()
        };
        self.ioctl("GRANT", uapi::VIRTIO_ISM_IOC_GRANT, &mut raw)
    }

    /// Set one peer device's grant of a region (`devid` != 0).
    pub fn grant_device(&self, token: u64, devid: u64, perms: Perms) -> Result<()> {
        if devid == 0 {
            return Err(Error::Command {
                op: "GRANT",
                source: CommandError::Refused,
            });
        }
        let mut raw = uapi::virtio_ism_grant {
            token,
            perms: perms.bits(),
            peer_devid: devid,
            ..Default::default()
        };
        self.ioctl("GRANT", uapi::VIRTIO_ISM_IOC_GRANT, &mut raw)
    }

    /// Have peers' kicks of a region raise [`crate::EventKind::Kick`] events.
    pub fn bind(&self, token: u64) -> Result<()> {
        self.token_ioctl("BIND", uapi::VIRTIO_ISM_IOC_BIND, token)
    }

    /// Stop kick interrupts for a region.
    pub fn unbind(&self, token: u64) -> Result<()> {
        self.token_ioctl("UNBIND", uapi::VIRTIO_ISM_IOC_UNBIND, token)
    }

    /// Kick a region this file holds: every other holder that bound it is interrupted.
    pub fn kick(&self, token: u64) -> Result<()> {
        self.token_ioctl("KICK", uapi::VIRTIO_ISM_IOC_KICK, token)
    }

    /// Tokens of every region the driver holds on this device.
    pub fn list(&self) -> Result<Vec<u64>> {
        let mut tokens: Vec<u64> = Vec::new();
        for _ in 0..4 {
            let mut raw = uapi::virtio_ism_list {
                tokens: tokens.as_mut_ptr() as u64,
                max_tokens: tokens.capacity().min(u32::MAX as usize) as u32,
                ..Default::default()
            };
            self.ioctl("LIST", uapi::VIRTIO_ISM_IOC_LIST, &mut raw)?;
            let n = raw.nr_tokens as usize;
            if n <= tokens.capacity() {
                // SAFETY: the driver wrote n <= capacity tokens into the buffer.
                unsafe { tokens.set_len(n) };
                return Ok(tokens);
            }
            tokens.reserve(n + 8);
        }
        Err(Error::Command {
            op: "LIST",
            source: CommandError::Busy,
        })
    }

    /// Size, flags and areas of a region the driver holds.
    pub fn region_info(&self, token: u64) -> Result<RegionInfo> {
        let mut areas: Vec<uapi::virtio_ism_region_area> = Vec::new();
        for _ in 0..4 {
            let mut raw = uapi::virtio_ism_region_info {
                token,
                areas: areas.as_mut_ptr() as u64,
                max_areas: areas.capacity().min(u32::MAX as usize) as u32,
                ..Default::default()
            };
            self.ioctl("REGION_INFO", uapi::VIRTIO_ISM_IOC_REGION_INFO, &mut raw)?;
            let n = raw.nr_areas as usize;
            if n <= areas.capacity() {
                // SAFETY: the driver wrote n <= capacity areas into the buffer.
                unsafe { areas.set_len(n) };
                return Ok(RegionInfo {
                    token,
                    size: raw.size,
                    flags: RegionFlags::from_bits_retain(raw.region_flags),
                    kicks: raw.kicks,
                    areas: areas.iter().map(|a| (a.offset, a.size)).collect(),
                });
            }
            areas.reserve(n);
        }
        Err(Error::Command {
            op: "REGION_INFO",
            source: CommandError::Busy,
        })
    }

    /// The driver's counters for this device, from sysfs.
    pub fn counters(&self) -> Result<Counters> {
        Counters::read_dir(&Counters::sysfs_dir(self.info()?.instance))
    }

    /// Block until an event arrives.
    pub fn wait_event(&self) -> Result<Event> {
        let mut rec = uapi::virtio_ism_event_record::default();
        let size = std::mem::size_of_val(&rec);
        loop {
            // SAFETY: reads at most size bytes into rec, a plain-data struct.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    std::ptr::from_mut(&mut rec).cast(),
                    size,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::ReadEvent(err));
            }
            if n as usize != size {
                return Err(Error::ShortEvent(n as usize));
            }
            return Ok(rec.into());
        }
    }

    /// Wait up to `timeout` (None: forever) for an event.
    pub fn wait_event_timeout(&self, timeout: Option<Duration>) -> Result<Option<Event>> {
        if let Some(t) = timeout {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = t.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let ret = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ret < 0 {
                return Err(Error::Poll(io::Error::last_os_error()));
            }
            if ret == 0 {
                return Ok(None);
            }
        }
        self.wait_event().map(Some)
    }
}

/// For epoll/async runtimes: the fd is readable when an event is queued.
impl AsFd for Device {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_list_nodes_takes_only_ism_digits() {
        let dir = std::env::temp_dir().join(format!("ism-nodes-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in ["ism0", "ism12", "ism", "ismx", "tty0", "ism3a"] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let nodes = Device::list_nodes(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let names: Vec<_> = nodes
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["ism0", "ism12"]);
    }

    #[test]
    fn test_ioctl_on_a_non_ism_file_maps_enotty() {
        // /dev/null answers unknown ioctls with ENOTTY: the errno path end to end.
        let dev = Device::open("/dev/null").unwrap();
        match dev.info() {
            Err(Error::Command {
                op: "INFO",
                source: CommandError::NotSupported,
            }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn test_counters_read_every_file_of_the_sysfs_dir() {
        let dir = std::env::temp_dir().join(format!("ism-counters-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, name) in Counters::NAMES.iter().enumerate() {
            std::fs::write(dir.join(name), format!("{}\n", i + 1)).unwrap();
        }
        let c = Counters::read_dir(&dir).unwrap();
        assert_eq!(c.ctrl_commands, 1);
        assert_eq!(c.late_replies, 4);
        assert_eq!(c.config_irqs, 8);
        assert_eq!(c.events_lost, 10);
        std::fs::write(dir.join("kick_irqs"), "x\n").unwrap();
        let err = Counters::read_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("kick_irqs"), "{err}");
        std::fs::remove_file(dir.join("events")).unwrap();
        std::fs::write(dir.join("kick_irqs"), "0\n").unwrap();
        assert!(Counters::read_dir(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_open_missing_node_names_the_path() {
        let err = Device::open("/nonexistent/ism9").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ism9"), "{err}");
    }

    #[test]
    fn test_grant_device_refuses_devid_zero_without_a_syscall() {
        let dev = Device::open("/dev/null").unwrap();
        assert!(matches!(
            dev.grant_device(1, 0, Perms::READ),
            Err(Error::Command {
                source: CommandError::Refused,
                ..
            })
        ));
    }
}
