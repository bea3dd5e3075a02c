// SPDX-License-Identifier: Apache-2.0
//! Why an ism request failed, and its HTTP status: [`ControlError`] says who refused (the
//! device, the pool, or nobody because the pool cannot be reached), [`IsmApiError`] adds the
//! request and device it was about, and [`IsmApiError::status_code`] is the one place that
//! turns both into a status (docs/api.md, "Status codes").

use std::fmt;

use virtio_ism_pool_api::PoolError;

/// The cause behind a [`ControlError`], kept whole so the error body lists its chain.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why the pool said no to a request it understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolRefusal {
    /// The request names a region, peer, size or access the pool does not give this device
    /// (no such region, permission denied, invalid size, unknown device).
    Invalid,
    /// The device holds the region already.
    Conflict,
    /// Out of room: the pool's size, the VM's byte or region quota, or the host's memory or
    /// descriptors. Freeing regions may let a retry succeed.
    Capacity,
}

impl fmt::Display for PoolRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoolRefusal::Invalid => "not allowed for this device",
            PoolRefusal::Conflict => "the device holds the region already",
            PoolRefusal::Capacity => "out of room",
        })
    }
}

/// Why an ism device could not do what the API asked: who refused, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The device or its guest refused: the driver has not started it, its window has no
    /// room, or the attach failed with a virtio-ism status the pool did not explain.
    #[error("The device refused the request")]
    Device(#[source] Cause),
    /// The pool answered and refused, for `reason`.
    #[error("The pool refused the request: {reason}")]
    Pool {
        /// What kind of refusal it is.
        reason: PoolRefusal,
        /// The pool's answer (or the device error that carries it).
        #[source]
        source: Cause,
    },
    /// The pool could not be asked: its broker is gone, or answers what this client does
    /// not understand.
    #[error("The region pool is unavailable")]
    PoolUnavailable(#[source] Cause),
    /// Something failed inside the VMM.
    #[error("Internal failure")]
    Internal(#[source] Cause),
}

/// How a [`PoolError`] is classified; see [`ControlError::from_pool`].
enum PoolClass {
    Refused(PoolRefusal),
    Unavailable,
    Internal,
}

fn pool_class(error: &PoolError) -> PoolClass {
    use PoolClass::{Internal, Refused, Unavailable};
    // No catch-all arm: a new PoolError variant has to be placed here.
    match error {
        PoolError::NoSuchRegion(_)
        | PoolError::NotHeld { .. }
        | PoolError::PermissionDenied { .. }
        | PoolError::InvalidSize(_)
        | PoolError::UnknownDevice(_) => Refused(PoolRefusal::Invalid),
        PoolError::AlreadyHeld(_) => Refused(PoolRefusal::Conflict),
        PoolError::PoolExhausted { .. }
        | PoolError::QuotaExceeded { .. }
        | PoolError::RegionQuotaExceeded { .. }
        | PoolError::DescriptorLimit(_)
        | PoolError::CreateMemory(_) => Refused(PoolRefusal::Capacity),
        PoolError::Connection(_) | PoolError::Protocol(_) => Unavailable,
        // Doorbells are not the API's business: reaching one of these is a VMM bug.
        PoolError::NotAnEventfd { .. }
        | PoolError::DupDoorbell(_)
        | PoolError::DoorbellsUnsupported => Internal,
    }
}

/// Whether `error` means the pool cannot be asked (rather than that it refused).
pub(crate) fn pool_unavailable(error: &PoolError) -> bool {
    matches!(pool_class(error), PoolClass::Unavailable)
}

impl ControlError {
    /// `error` classified: an answer of the pool is a [`ControlError::Pool`] refusal, a
    /// broken or refused connection to its broker [`ControlError::PoolUnavailable`].
    pub fn from_pool(error: PoolError) -> Self {
        let class = pool_class(&error);
        Self::classified(class, Box::new(error))
    }

    /// `cause`, an error with a [`PoolError`] in its chain (a device error that names the
    /// step that failed), in the class that pool error puts it in; an internal failure when
    /// there is none.
    pub fn from_pool_cause(cause: Cause) -> Self {
        let mut class = PoolClass::Internal;
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&*cause);
        while let Some(e) = next {
            if let Some(pool) = e.downcast_ref::<PoolError>() {
                class = pool_class(pool);
                break;
            }
            next = e.source();
        }
        Self::classified(class, cause)
    }

    fn classified(class: PoolClass, source: Cause) -> Self {
        match class {
            PoolClass::Refused(reason) => ControlError::Pool { reason, source },
            PoolClass::Unavailable => ControlError::PoolUnavailable(source),
            PoolClass::Internal => ControlError::Internal(source),
        }
    }

    /// A device-side refusal with `cause`.
    pub fn device(cause: impl Into<Cause>) -> Self {
        ControlError::Device(cause.into())
    }

    /// An internal failure with `cause`.
    pub fn internal(cause: impl Into<Cause>) -> Self {
        ControlError::Internal(cause.into())
    }
}

/// Why an ism request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum IsmApiError {
    /// No device has that id.
    #[error("No ism device with id {0:?}")]
    UnknownDeviceId(String),
    /// `vm.ism-remove-region` of a region the device does not hold.
    #[error("Device {0:?} does not hold region {1}")]
    UnknownRegion(String, u64),
    /// `vm.ism-add-region` of a region the device holds.
    #[error("Device {0:?} holds region {1} already")]
    RegionExists(String, u64),
    /// The request's fields do not go together (checked by the router already; a request
    /// built elsewhere is checked again).
    #[error("Invalid request for device {0:?}: {1}")]
    InvalidRequest(String, String),
    /// A grant names a devid that is not in the device's pool.
    #[error("Device {0:?}: peer {1} is not a device of its pool")]
    UnknownPeer(String, u64),
    /// A grant names the device itself.
    #[error("Device {0:?}: peer {1} is the device itself")]
    SelfPeer(String, u64),
    /// `vm.ism-add-region` with `token` failed.
    #[error("Device {id:?} could not attach region {token}")]
    Attach {
        /// The device.
        id: String,
        /// The region.
        token: u64,
        /// Who refused, and why.
        #[source]
        source: ControlError,
    },
    /// `vm.ism-add-region` with `size` failed; nothing is left allocated.
    #[error("Device {id:?} could not create a region of {size} bytes")]
    Create {
        /// The device.
        id: String,
        /// The size asked for.
        size: u64,
        /// Who refused, and why.
        #[source]
        source: ControlError,
    },
    /// The pool's status could not be had (`vm.ism-pool-status`, and the peer check of a
    /// create with grants).
    #[error("Pool status of {id:?} is unavailable")]
    PoolStatus {
        /// The device.
        id: String,
        /// Why.
        #[source]
        source: ControlError,
    },
    /// Parking a device's worker failed (`vm.pause`).
    #[error("Pausing ism device {id:?} failed")]
    Pause {
        /// The device.
        id: String,
        /// Why.
        #[source]
        source: ControlError,
    },
}

impl IsmApiError {
    /// The HTTP status of the error, the only place it is decided:
    ///
    /// | status | when |
    /// |---|---|
    /// | 400 | the request does not fit the device or pool: bad fields, unknown or self peer, the device refused (not started, window full), the pool refused it as invalid (no such region, no permission, bad size) |
    /// | 404 | no device with that id; removal of a region the device does not hold |
    /// | 409 | the device holds the region already; the pool is out of room (pool size, the VM's quota, host descriptors or memory) |
    /// | 500 | a failure inside the VMM |
    /// | 503 | the pool is unavailable: its broker is gone or broken |
    ///
    /// Only statuses cloud-hypervisor's HTTP server has (it lacks 403 and 507), so that
    /// both VMMs answer alike.
    pub fn status_code(&self) -> u16 {
        match self {
            IsmApiError::UnknownDeviceId(_) | IsmApiError::UnknownRegion(..) => 404,
            IsmApiError::RegionExists(..) => 409,
            IsmApiError::InvalidRequest(..)
            | IsmApiError::UnknownPeer(..)
            | IsmApiError::SelfPeer(..) => 400,
            IsmApiError::Attach { source, .. }
            | IsmApiError::Create { source, .. }
            | IsmApiError::PoolStatus { source, .. }
            | IsmApiError::Pause { source, .. } => match source {
                ControlError::Device(_)
                | ControlError::Pool {
                    reason: PoolRefusal::Invalid,
                    ..
                } => 400,
                ControlError::Pool {
                    reason: PoolRefusal::Conflict | PoolRefusal::Capacity,
                    ..
                } => 409,
                ControlError::PoolUnavailable(_) => 503,
                ControlError::Internal(_) => 500,
            },
        }
    }

    /// The error and its sources, outermost first: the body of an error response.
    pub fn chain(&self) -> Vec<String> {
        error_chain(self)
    }
}

/// An error and its sources as text, outermost first: what an API error response carries,
/// for the ism endpoints and for the VMM's own.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> Vec<String> {
    let mut out = vec![error.to_string()];
    let mut source = error.source();
    while let Some(e) = source {
        out.push(e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io;

    use virtio_ism_pool_api::{DevId, MissingPerm, Token};

    use super::*;

    fn attach(source: ControlError) -> IsmApiError {
        IsmApiError::Attach {
            id: "ism0".into(),
            token: 7,
            source,
        }
    }

    #[test]
    fn test_pool_errors_map_to_the_status_of_who_refused() {
        let io = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let cases = [
            (PoolError::NoSuchRegion(Token(7)), 400),
            (
                PoolError::PermissionDenied {
                    token: Token(7),
                    missing: MissingPerm::Write,
                },
                400,
            ),
            (PoolError::InvalidSize(5), 400),
            (PoolError::UnknownDevice(DevId(9)), 400),
            (PoolError::AlreadyHeld(Token(7)), 409),
            (
                PoolError::QuotaExceeded {
                    limit: 1,
                    used: 1,
                    requested: 1,
                },
                409,
            ),
            (PoolError::RegionQuotaExceeded { limit: 1 }, 409),
            (
                PoolError::PoolExhausted {
                    requested: 2,
                    available: 1,
                },
                409,
            ),
            (PoolError::DescriptorLimit(io()), 409),
            (PoolError::Connection(io()), 503),
            (PoolError::Protocol("garbage".into()), 503),
            (PoolError::DoorbellsUnsupported, 500),
        ];
        for (error, status) in cases {
            let text = error.to_string();
            let api = attach(ControlError::from_pool(error));
            assert_eq!(api.status_code(), status, "{text}");
        }
    }

    #[test]
    fn test_an_unreachable_pool_is_503_and_its_cause_is_in_the_body() {
        let error = PoolError::Connection(io::Error::from(io::ErrorKind::ConnectionRefused));
        let api = IsmApiError::PoolStatus {
            id: "ism0".into(),
            source: ControlError::from_pool(error),
        };
        assert_eq!(api.status_code(), 503);
        let chain = api.chain();
        assert_eq!(
            chain[..3],
            [
                "Pool status of \"ism0\" is unavailable",
                "The region pool is unavailable",
                "Pool broker connection failed",
            ]
        );
        assert_eq!(chain.len(), 4, "the io error last: {chain:?}");
    }

    #[test]
    fn test_a_wrapping_cause_keeps_its_text_and_takes_the_pool_errors_class() {
        #[derive(Debug, thiserror::Error)]
        #[error("The pool refused to allocate 4096 bytes")]
        struct Alloc(#[source] PoolError);
        let broken = PoolError::Connection(io::Error::from(io::ErrorKind::BrokenPipe));
        let api = IsmApiError::Create {
            id: "ism0".into(),
            size: 4096,
            source: ControlError::from_pool_cause(Box::new(Alloc(broken))),
        };
        assert_eq!(api.status_code(), 503);
        assert_eq!(api.chain()[2], "The pool refused to allocate 4096 bytes");
        assert_eq!(api.chain()[3], "Pool broker connection failed");
        // Without a pool error in its chain, a cause is an internal failure.
        let api = attach(ControlError::from_pool_cause("no pool here".into()));
        assert_eq!(api.status_code(), 500);
    }

    #[test]
    fn test_device_and_internal_failures() {
        assert_eq!(
            attach(ControlError::device("window full")).status_code(),
            400
        );
        assert_eq!(attach(ControlError::internal("bug")).status_code(), 500);
        assert_eq!(
            IsmApiError::UnknownDeviceId("ism9".into()).status_code(),
            404
        );
        assert_eq!(
            IsmApiError::RegionExists("ism0".into(), 1).status_code(),
            409
        );
    }
}
