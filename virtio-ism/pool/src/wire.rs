// SPDX-License-Identifier: Apache-2.0
//! The broker protocol: message layouts and pure encode/decode functions.
//!
//! Every message is one SOCK_SEQPACKET packet: a 16-byte header followed by a body whose
//! layout depends on the kind. All integers are little-endian. See docs/pool.md.

use crate::session::{DevId, MissingPerm, Perms, PoolError, PoolEvent, Token};

/// Protocol versions this build speaks. Version 2 adds the doorbell exchange
/// (PUBLISH_DOORBELL, WITHDRAW_DOORBELL, PEER_DOORBELLS, DOORBELLS and the
/// DOORBELLS_CHANGED event); version 3 adds error codes 13..15 and the admission and
/// identity fields of the status report; version 4 adds resuming a session after a
/// broker restart (the resume key in HELLO_OK, RESUME, REREGISTER, RESUME_DONE, error code
/// 16); everything else is as in version 1.
pub const MIN_VERSION: u16 = 1;
pub const MAX_VERSION: u16 = 4;
/// First version that can resume a session after a broker restart (and whose status report
/// says what a restarted broker waits for).
pub const RESUME_VERSION: u16 = virtio_ism_pool_api::status::RESUME_VERSION;
/// First version with the doorbell exchange.
pub const DOORBELL_VERSION: u16 = 2;
/// First version with error codes 13..15 (`DescriptorLimit`, `RegionQuotaExceeded`,
/// `UnknownDevice`); older clients get them as codes they know (see
/// [`WireError::for_version`]).
pub const LIMITS_VERSION: u16 = virtio_ism_pool_api::status::LIMITS_VERSION;
/// Most doorbells (and descriptors) one DOORBELLS reply carries; larger sets take several
/// PEER_DOORBELLS requests.
pub const MAX_DOORBELLS_PER_REPLY: usize = 16;
/// First field of a hello body, so that a stray client is told off at once.
pub const HELLO_MAGIC: u32 = u32::from_le_bytes(*b"ISMP");
/// Largest message either side sends or accepts (header included).
pub const MAX_MESSAGE_LEN: usize = 64 * 1024;
pub const HEADER_LEN: usize = 16;
/// Longest error text carried in an ERROR reply.
pub const MAX_ERROR_TEXT: usize = 1024;
/// Bytes of status JSON per STATUS_CHUNK reply.
pub const STATUS_CHUNK_LEN: usize = 32 * 1024;

pub mod kind {
    pub const HELLO: u16 = 0x0001;
    pub const ALLOC: u16 = 0x0002;
    pub const ATTACH: u16 = 0x0003;
    pub const DETACH: u16 = 0x0004;
    pub const GRANT: u16 = 0x0005;
    pub const STATUS: u16 = 0x0006;
    pub const REVOKE: u16 = 0x0007;
    pub const PUBLISH_DOORBELL: u16 = 0x0008;
    pub const WITHDRAW_DOORBELL: u16 = 0x0009;
    pub const PEER_DOORBELLS: u16 = 0x000a;
    pub const RESUME: u16 = 0x000b;
    pub const REREGISTER: u16 = 0x000c;
    pub const RESUME_DONE: u16 = 0x000d;

    pub const HELLO_OK: u16 = 0x8001;
    pub const OK: u16 = 0x8002;
    pub const LEASE: u16 = 0x8003;
    pub const ERROR: u16 = 0x8004;
    pub const EVENT: u16 = 0x8005;
    pub const STATUS_CHUNK: u16 = 0x8006;
    pub const DOORBELLS: u16 = 0x8007;
}

/// What a connection is for, declared in its hello.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A virtio-ism device: gets a devid and may alloc/attach/detach/grant.
    Device,
    /// An operator tool: may query status and revoke (if its uid is trusted).
    Observer,
}

impl Role {
    fn to_raw(self) -> u32 {
        match self {
            Role::Device => 1,
            Role::Observer => 2,
        }
    }
}

/// A decoded client request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello {
        min_version: u16,
        max_version: u16,
        role: Role,
    },
    Alloc {
        size: u64,
    },
    Attach {
        token: Token,
        want: Perms,
    },
    Detach {
        token: Token,
    },
    Grant {
        token: Token,
        target: crate::session::GrantTarget,
        perms: Perms,
    },
    Status,
    Revoke {
        token: Token,
    },
    /// Comes with exactly one descriptor: the eventfd to publish.
    PublishDoorbell {
        token: Token,
    },
    WithdrawDoorbell {
        token: Token,
    },
    /// The other holders' doorbells from index `start` on.
    PeerDoorbells {
        token: Token,
        start: u32,
    },
    /// Instead of HELLO, after a broker restart (version 4): take session `devid` back,
    /// proving it with the resume key its HELLO_OK carried.
    Resume {
        min_version: u16,
        max_version: u16,
        devid: DevId,
        key: u64,
    },
    /// Comes with exactly one descriptor: a lease of `token` this session held before the
    /// restart, handed back (version 4, resumed sessions).
    Reregister {
        token: Token,
    },
    /// A resumed session handed back everything it still holds (version 4).
    ResumeDone,
}

/// A decoded broker message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    HelloOk {
        version: u16,
        gid: u64,
        devid: u64,
        /// Version 4 device sessions: the secret that resumes this session after a broker
        /// restart (0, and not on the wire, otherwise).
        resume_key: u64,
    },
    Ok,
    /// Comes with exactly one file descriptor.
    Lease {
        token: Token,
        size: u64,
        writable: bool,
    },
    Error(WireError),
    Event(PoolEvent),
    StatusChunk {
        total: u32,
        offset: u32,
        data: Vec<u8>,
    },
    /// Doorbells `start..start + devids.len()` of `total`, one descriptor per devid in
    /// order. `generation` changes whenever the region's doorbell set does, so a client
    /// reading several pages can tell that it must start over.
    Doorbells {
        generation: u64,
        total: u32,
        start: u32,
        devids: Vec<DevId>,
    },
}

/// A refusal as it travels: a code, three numeric arguments and a text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError {
    pub code: u32,
    pub args: [u64; 3],
    pub text: String,
}

pub mod error_code {
    pub const NO_SUCH_REGION: u32 = 1;
    pub const NOT_HELD: u32 = 2;
    pub const PERMISSION_DENIED: u32 = 3;
    pub const INVALID_SIZE: u32 = 4;
    pub const POOL_EXHAUSTED: u32 = 5;
    pub const QUOTA_EXCEEDED: u32 = 6;
    pub const ALREADY_HELD: u32 = 7;
    pub const CREATE_MEMORY: u32 = 8;
    pub const PROTOCOL: u32 = 9;
    pub const NOT_AN_EVENTFD: u32 = 10;
    pub const DUP_DOORBELL: u32 = 11;
    pub const DOORBELLS_UNSUPPORTED: u32 = 12;
    pub const DESCRIPTOR_LIMIT: u32 = 13;
    pub const REGION_QUOTA_EXCEEDED: u32 = 14;
    pub const UNKNOWN_DEVICE: u32 = 15;
    /// A RESUME the broker cannot honour: no such session waits to be resumed (it was
    /// reclaimed after the grace period, or the broker lost its state), or the key is
    /// wrong. Retrying does not help.
    pub const RESUME_REFUSED: u32 = 16;
}

fn missing_to_raw(missing: MissingPerm) -> u64 {
    match missing {
        MissingPerm::Attach => 1,
        MissingPerm::Read => 2,
        MissingPerm::Write => 3,
        MissingPerm::Manage => 4,
    }
}

fn missing_from_raw(raw: u64) -> Option<MissingPerm> {
    Some(match raw {
        1 => MissingPerm::Attach,
        2 => MissingPerm::Read,
        3 => MissingPerm::Write,
        4 => MissingPerm::Manage,
        _ => return None,
    })
}

fn bounded_text(text: &str) -> String {
    if text.len() <= MAX_ERROR_TEXT {
        return text.to_string();
    }
    let mut end = MAX_ERROR_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

impl WireError {
    /// The wire form of a pool refusal for a client that agreed on `version`. Codes newer
    /// than the client become the closest code it knows, with the full text: a descriptor
    /// shortage becomes CREATE_MEMORY with its errno (EMFILE/ENFILE), a region-count quota
    /// CREATE_MEMORY with EDQUOT (both map to "no memory" in a device, as they should), an
    /// unknown device PROTOCOL.
    pub fn for_version(error: &PoolError, version: u16) -> Self {
        use error_code::*;
        let mut wire = Self::from_pool_error(error);
        if version >= LIMITS_VERSION {
            return wire;
        }
        match wire.code {
            DESCRIPTOR_LIMIT => wire.code = CREATE_MEMORY,
            REGION_QUOTA_EXCEEDED => {
                wire.code = CREATE_MEMORY;
                wire.args = [rustix::io::Errno::DQUOT.raw_os_error() as u64, 0, 0];
            }
            UNKNOWN_DEVICE => {
                wire.code = PROTOCOL;
                wire.args = [0; 3];
            }
            _ => {}
        }
        wire
    }

    /// The wire form of a pool refusal, for a client of the newest version.
    pub fn from_pool_error(error: &PoolError) -> Self {
        use error_code::*;
        let (code, args, text) = match error {
            PoolError::NoSuchRegion(t) => (NO_SUCH_REGION, [t.0, 0, 0], String::new()),
            PoolError::NotHeld { token } => (NOT_HELD, [token.0, 0, 0], String::new()),
            PoolError::PermissionDenied { token, missing } => (
                PERMISSION_DENIED,
                [token.0, missing_to_raw(*missing), 0],
                String::new(),
            ),
            PoolError::InvalidSize(size) => (INVALID_SIZE, [*size, 0, 0], String::new()),
            PoolError::PoolExhausted {
                requested,
                available,
            } => (POOL_EXHAUSTED, [*requested, *available, 0], String::new()),
            PoolError::QuotaExceeded {
                limit,
                used,
                requested,
            } => (QUOTA_EXCEEDED, [*limit, *used, *requested], String::new()),
            PoolError::AlreadyHeld(t) => (ALREADY_HELD, [t.0, 0, 0], String::new()),
            PoolError::CreateMemory(e) => (
                CREATE_MEMORY,
                [e.raw_os_error().unwrap_or(0) as u64, 0, 0],
                e.to_string(),
            ),
            PoolError::NotAnEventfd { token } => (NOT_AN_EVENTFD, [token.0, 0, 0], String::new()),
            PoolError::DupDoorbell(e) => (
                DUP_DOORBELL,
                [e.raw_os_error().unwrap_or(0) as u64, 0, 0],
                e.to_string(),
            ),
            PoolError::DoorbellsUnsupported => (DOORBELLS_UNSUPPORTED, [0; 3], String::new()),
            PoolError::Connection(e) => (PROTOCOL, [0; 3], format!("Broker connection: {e}")),
            PoolError::Protocol(text) => (PROTOCOL, [0; 3], text.clone()),
            PoolError::DescriptorLimit(e) => (
                DESCRIPTOR_LIMIT,
                [e.raw_os_error().unwrap_or(0) as u64, 0, 0],
                format!("{error}: {e}"),
            ),
            PoolError::RegionQuotaExceeded { limit } => {
                (REGION_QUOTA_EXCEEDED, [*limit, 0, 0], error.to_string())
            }
            PoolError::UnknownDevice(devid) => (UNKNOWN_DEVICE, [devid.0, 0, 0], error.to_string()),
        };
        WireError {
            code,
            args,
            text: bounded_text(&text),
        }
    }

    /// A protocol-level refusal (malformed message and the like).
    pub fn protocol(text: impl Into<String>) -> Self {
        WireError {
            code: error_code::PROTOCOL,
            args: [0; 3],
            text: bounded_text(&text.into()),
        }
    }

    /// The typed error the client hands to its caller.
    pub fn into_pool_error(self) -> PoolError {
        use error_code::*;
        let [a, b, c] = self.args;
        match self.code {
            NO_SUCH_REGION => PoolError::NoSuchRegion(Token(a)),
            NOT_HELD => PoolError::NotHeld { token: Token(a) },
            PERMISSION_DENIED => match missing_from_raw(b) {
                Some(missing) => PoolError::PermissionDenied {
                    token: Token(a),
                    missing,
                },
                None => PoolError::Protocol(format!("Permission denied with unknown reason {b}")),
            },
            INVALID_SIZE => PoolError::InvalidSize(a),
            POOL_EXHAUSTED => PoolError::PoolExhausted {
                requested: a,
                available: b,
            },
            QUOTA_EXCEEDED => PoolError::QuotaExceeded {
                limit: a,
                used: b,
                requested: c,
            },
            ALREADY_HELD => PoolError::AlreadyHeld(Token(a)),
            CREATE_MEMORY => {
                let io = if a != 0 && a <= i32::MAX as u64 {
                    std::io::Error::from_raw_os_error(a as i32)
                } else {
                    std::io::Error::other(self.text.clone())
                };
                PoolError::CreateMemory(std::io::Error::new(
                    io.kind(),
                    format!("Broker: {}", self.text),
                ))
            }
            PROTOCOL => PoolError::Protocol(self.text),
            NOT_AN_EVENTFD => PoolError::NotAnEventfd { token: Token(a) },
            DUP_DOORBELL => {
                PoolError::DupDoorbell(std::io::Error::other(format!("Broker: {}", self.text)))
            }
            DOORBELLS_UNSUPPORTED => PoolError::DoorbellsUnsupported,
            DESCRIPTOR_LIMIT => {
                let kind = if a != 0 && a <= i32::MAX as u64 {
                    std::io::Error::from_raw_os_error(a as i32).kind()
                } else {
                    std::io::ErrorKind::Other
                };
                PoolError::DescriptorLimit(std::io::Error::new(
                    kind,
                    format!("Broker: {}", self.text),
                ))
            }
            REGION_QUOTA_EXCEEDED => PoolError::RegionQuotaExceeded { limit: a },
            UNKNOWN_DEVICE => PoolError::UnknownDevice(DevId(a)),
            RESUME_REFUSED => PoolError::Protocol(self.text),
            other => PoolError::Protocol(format!("Unknown error code {other}: {}", self.text)),
        }
    }
}

/// Why a packet could not be decoded. `id` is the request id when the header was readable,
/// so the answer can name the request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("Message of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    ShortHeader(usize),
    #[error("Message is longer than {MAX_MESSAGE_LEN} bytes")]
    Oversized { id: u64 },
    #[error("Header says {declared} bytes but the message has {actual}")]
    LengthMismatch {
        id: u64,
        declared: u32,
        actual: usize,
    },
    #[error("Unknown message kind {kind:#06x}")]
    UnknownKind { id: u64, kind: u16 },
    #[error("Body of message kind {kind:#06x} is {actual} bytes, expected {expected}")]
    BodyLength {
        id: u64,
        kind: u16,
        expected: usize,
        actual: usize,
    },
    #[error("Bad hello magic {0:#010x}")]
    BadMagic(u32),
    #[error("Unknown role {0}")]
    UnknownRole(u32),
    #[error("Unknown grant target {0}")]
    UnknownTarget(u32),
    #[error("Unknown event kind {0}")]
    UnknownEvent(u32),
    #[error("Status chunk out of range")]
    BadChunk,
    #[error("Doorbell list out of range")]
    BadDoorbells,
    #[error("Error text is not UTF-8")]
    BadText,
}

impl DecodeError {
    /// The request id the error belongs to, 0 if unknown.
    pub fn id(&self) -> u64 {
        match self {
            DecodeError::Oversized { id }
            | DecodeError::LengthMismatch { id, .. }
            | DecodeError::UnknownKind { id, .. }
            | DecodeError::BodyLength { id, .. } => *id,
            _ => 0,
        }
    }
}

/// Little-endian field reader over a body whose length was already checked.
struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn u16(&mut self) -> u16 {
        let (head, rest) = self.bytes.split_at(2);
        self.bytes = rest;
        u16::from_le_bytes([head[0], head[1]])
    }
    fn u32(&mut self) -> u32 {
        let (head, rest) = self.bytes.split_at(4);
        self.bytes = rest;
        u32::from_le_bytes([head[0], head[1], head[2], head[3]])
    }
    fn u64(&mut self) -> u64 {
        let (head, rest) = self.bytes.split_at(8);
        self.bytes = rest;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(head);
        u64::from_le_bytes(raw)
    }
    fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

/// Splits a packet into (kind, id, body) after checking its framing.
fn split_frame(packet: &[u8]) -> Result<(u16, u64, &[u8]), DecodeError> {
    if packet.len() < HEADER_LEN {
        return Err(DecodeError::ShortHeader(packet.len()));
    }
    let mut header = Fields {
        bytes: &packet[..HEADER_LEN],
    };
    let declared = header.u32();
    let kind = header.u16();
    let _reserved = header.u16();
    let id = header.u64();
    if packet.len() > MAX_MESSAGE_LEN {
        return Err(DecodeError::Oversized { id });
    }
    if declared as usize != packet.len() {
        return Err(DecodeError::LengthMismatch {
            id,
            declared,
            actual: packet.len(),
        });
    }
    Ok((kind, id, &packet[HEADER_LEN..]))
}

fn expect_len(id: u64, kind: u16, body: &[u8], expected: usize) -> Result<Fields<'_>, DecodeError> {
    if body.len() != expected {
        return Err(DecodeError::BodyLength {
            id,
            kind,
            expected,
            actual: body.len(),
        });
    }
    Ok(Fields { bytes: body })
}

/// Like [`expect_len`], for bodies with a fixed header and a variable tail.
fn expect_min_len(
    id: u64,
    kind: u16,
    body: &[u8],
    minimum: usize,
) -> Result<Fields<'_>, DecodeError> {
    if body.len() < minimum {
        return Err(DecodeError::BodyLength {
            id,
            kind,
            expected: minimum,
            actual: body.len(),
        });
    }
    Ok(Fields { bytes: body })
}

/// Decodes one client packet. Pure: the broker's whole input path starts here.
pub fn decode_request(packet: &[u8]) -> Result<(u64, Request), DecodeError> {
    let (kind, id, body) = split_frame(packet)?;
    // The body of the requests that carry nothing but a token.
    let token_only = || expect_len(id, kind, body, 8).map(|mut f| Token(f.u64()));
    let request = match kind {
        kind::HELLO => {
            let mut f = expect_len(id, kind, body, 16)?;
            let magic = f.u32();
            if magic != HELLO_MAGIC {
                return Err(DecodeError::BadMagic(magic));
            }
            let min_version = f.u16();
            let max_version = f.u16();
            let role = match f.u32() {
                1 => Role::Device,
                2 => Role::Observer,
                other => return Err(DecodeError::UnknownRole(other)),
            };
            Request::Hello {
                min_version,
                max_version,
                role,
            }
        }
        kind::ALLOC => Request::Alloc {
            size: expect_len(id, kind, body, 8)?.u64(),
        },
        kind::ATTACH => {
            let mut f = expect_len(id, kind, body, 16)?;
            Request::Attach {
                token: Token(f.u64()),
                want: Perms(f.u64()),
            }
        }
        kind::DETACH => Request::Detach {
            token: token_only()?,
        },
        kind::GRANT => {
            let mut f = expect_len(id, kind, body, 32)?;
            let token = Token(f.u64());
            let target_kind = f.u32();
            let _reserved = f.u32();
            let devid = f.u64();
            let perms = Perms(f.u64());
            let target = match target_kind {
                0 => crate::session::GrantTarget::Default,
                1 => crate::session::GrantTarget::Device(DevId(devid)),
                other => return Err(DecodeError::UnknownTarget(other)),
            };
            Request::Grant {
                token,
                target,
                perms,
            }
        }
        kind::STATUS => {
            expect_len(id, kind, body, 0)?;
            Request::Status
        }
        kind::REVOKE => Request::Revoke {
            token: token_only()?,
        },
        kind::PUBLISH_DOORBELL => Request::PublishDoorbell {
            token: token_only()?,
        },
        kind::WITHDRAW_DOORBELL => Request::WithdrawDoorbell {
            token: token_only()?,
        },
        kind::PEER_DOORBELLS => {
            let mut f = expect_len(id, kind, body, 16)?;
            let token = Token(f.u64());
            let start = f.u32();
            Request::PeerDoorbells { token, start }
        }
        kind::RESUME => {
            let mut f = expect_len(id, kind, body, 32)?;
            let magic = f.u32();
            if magic != HELLO_MAGIC {
                return Err(DecodeError::BadMagic(magic));
            }
            let min_version = f.u16();
            let max_version = f.u16();
            let _reserved = f.u64();
            Request::Resume {
                min_version,
                max_version,
                devid: DevId(f.u64()),
                key: f.u64(),
            }
        }
        kind::REREGISTER => Request::Reregister {
            token: token_only()?,
        },
        kind::RESUME_DONE => {
            expect_len(id, kind, body, 0)?;
            Request::ResumeDone
        }
        other => return Err(DecodeError::UnknownKind { id, kind: other }),
    };
    Ok((id, request))
}

/// Decodes one broker packet (the client's input path).
pub fn decode_reply(packet: &[u8]) -> Result<(u64, Reply), DecodeError> {
    let (kind, id, body) = split_frame(packet)?;
    let reply = match kind {
        kind::HELLO_OK => {
            // 24 bytes, or 32 with a resume key (version 4 device sessions).
            let expected = if body.len() == 32 { 32 } else { 24 };
            let mut f = expect_len(id, kind, body, expected)?;
            let version = f.u16();
            let _reserved = f.u16();
            let _reserved = f.u32();
            let gid = f.u64();
            let devid = f.u64();
            let resume_key = if expected == 32 { f.u64() } else { 0 };
            Reply::HelloOk {
                version,
                gid,
                devid,
                resume_key,
            }
        }
        kind::OK => {
            expect_len(id, kind, body, 0)?;
            Reply::Ok
        }
        kind::LEASE => {
            let mut f = expect_len(id, kind, body, 24)?;
            let token = Token(f.u64());
            let size = f.u64();
            let flags = f.u32();
            Reply::Lease {
                token,
                size,
                writable: flags & 1 != 0,
            }
        }
        kind::ERROR => {
            let mut f = expect_min_len(id, kind, body, 32)?;
            let code = f.u32();
            let _reserved = f.u32();
            let args = [f.u64(), f.u64(), f.u64()];
            let text = std::str::from_utf8(f.rest())
                .map_err(|_| DecodeError::BadText)?
                .to_string();
            Reply::Error(WireError { code, args, text })
        }
        kind::EVENT => {
            let mut f = expect_len(id, kind, body, 24)?;
            let event_kind = f.u32();
            let _reserved = f.u32();
            let token = Token(f.u64());
            let peer = DevId(f.u64());
            Reply::Event(match event_kind {
                1 => PoolEvent::PeerAttached { token, peer },
                2 => PoolEvent::PeerDetached { token, peer },
                3 => PoolEvent::Updated { token },
                4 => PoolEvent::Revoked { token },
                5 => PoolEvent::DoorbellsChanged { token },
                other => return Err(DecodeError::UnknownEvent(other)),
            })
        }
        kind::STATUS_CHUNK => {
            let mut f = expect_min_len(id, kind, body, 8)?;
            let total = f.u32();
            let offset = f.u32();
            let data = f.rest().to_vec();
            let end = (offset as u64) + data.len() as u64;
            if end > total as u64 {
                return Err(DecodeError::BadChunk);
            }
            Reply::StatusChunk {
                total,
                offset,
                data,
            }
        }
        kind::DOORBELLS => {
            let mut f = expect_min_len(id, kind, body, 24)?;
            let generation = f.u64();
            let total = f.u32();
            let start = f.u32();
            let count = f.u32() as usize;
            let _reserved = f.u32();
            if count > MAX_DOORBELLS_PER_REPLY || u64::from(start) + count as u64 > u64::from(total)
            {
                return Err(DecodeError::BadDoorbells);
            }
            let expected = 24 + 8 * count;
            if body.len() != expected {
                return Err(DecodeError::BodyLength {
                    id,
                    kind,
                    expected,
                    actual: body.len(),
                });
            }
            let devids = (0..count).map(|_| DevId(f.u64())).collect();
            Reply::Doorbells {
                generation,
                total,
                start,
                devids,
            }
        }
        other => return Err(DecodeError::UnknownKind { id, kind: other }),
    };
    Ok((id, reply))
}

/// Builds a message: header then body.
fn frame(kind: u16, id: u64, body: &[u8]) -> Vec<u8> {
    let len = HEADER_LEN + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(body);
    out
}

struct Body(Vec<u8>);

impl Body {
    fn new() -> Self {
        Body(Vec::new())
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

impl Request {
    pub fn encode(&self, id: u64) -> Vec<u8> {
        let (kind, body) = match self {
            Request::Hello {
                min_version,
                max_version,
                role,
            } => (
                kind::HELLO,
                Body::new()
                    .u32(HELLO_MAGIC)
                    .u16(*min_version)
                    .u16(*max_version)
                    .u32(role.to_raw())
                    .u32(0),
            ),
            Request::Alloc { size } => (kind::ALLOC, Body::new().u64(*size)),
            Request::Attach { token, want } => (kind::ATTACH, Body::new().u64(token.0).u64(want.0)),
            Request::Detach { token } => (kind::DETACH, Body::new().u64(token.0)),
            Request::Grant {
                token,
                target,
                perms,
            } => {
                let (target_kind, devid) = match target {
                    crate::session::GrantTarget::Default => (0, 0),
                    crate::session::GrantTarget::Device(d) => (1, d.0),
                };
                (
                    kind::GRANT,
                    Body::new()
                        .u64(token.0)
                        .u32(target_kind)
                        .u32(0)
                        .u64(devid)
                        .u64(perms.0),
                )
            }
            Request::Status => (kind::STATUS, Body::new()),
            Request::Revoke { token } => (kind::REVOKE, Body::new().u64(token.0)),
            Request::PublishDoorbell { token } => {
                (kind::PUBLISH_DOORBELL, Body::new().u64(token.0))
            }
            Request::WithdrawDoorbell { token } => {
                (kind::WITHDRAW_DOORBELL, Body::new().u64(token.0))
            }
            Request::PeerDoorbells { token, start } => (
                kind::PEER_DOORBELLS,
                Body::new().u64(token.0).u32(*start).u32(0),
            ),
            Request::Resume {
                min_version,
                max_version,
                devid,
                key,
            } => (
                kind::RESUME,
                Body::new()
                    .u32(HELLO_MAGIC)
                    .u16(*min_version)
                    .u16(*max_version)
                    .u64(0)
                    .u64(devid.0)
                    .u64(*key),
            ),
            Request::Reregister { token } => (kind::REREGISTER, Body::new().u64(token.0)),
            Request::ResumeDone => (kind::RESUME_DONE, Body::new()),
        };
        frame(kind, id, &body.0)
    }
}

impl Reply {
    pub fn encode(&self, id: u64) -> Vec<u8> {
        let (kind, body) = match self {
            Reply::HelloOk {
                version,
                gid,
                devid,
                resume_key,
            } => {
                let body = Body::new()
                    .u16(*version)
                    .u16(0)
                    .u32(0)
                    .u64(*gid)
                    .u64(*devid);
                // Clients before version 4 expect exactly 24 bytes.
                let body = if *resume_key != 0 {
                    body.u64(*resume_key)
                } else {
                    body
                };
                (kind::HELLO_OK, body)
            }
            Reply::Ok => (kind::OK, Body::new()),
            Reply::Lease {
                token,
                size,
                writable,
            } => (
                kind::LEASE,
                Body::new()
                    .u64(token.0)
                    .u64(*size)
                    .u32(u32::from(*writable))
                    .u32(0),
            ),
            Reply::Error(error) => (
                kind::ERROR,
                Body::new()
                    .u32(error.code)
                    .u32(0)
                    .u64(error.args[0])
                    .u64(error.args[1])
                    .u64(error.args[2])
                    .bytes(bounded_text(&error.text).as_bytes()),
            ),
            Reply::Event(event) => {
                let (event_kind, token, peer) = match event {
                    PoolEvent::PeerAttached { token, peer } => (1, token, peer.0),
                    PoolEvent::PeerDetached { token, peer } => (2, token, peer.0),
                    PoolEvent::Updated { token } => (3, token, 0),
                    PoolEvent::Revoked { token } => (4, token, 0),
                    PoolEvent::DoorbellsChanged { token } => (5, token, 0),
                };
                (
                    kind::EVENT,
                    Body::new().u32(event_kind).u32(0).u64(token.0).u64(peer),
                )
            }
            Reply::StatusChunk {
                total,
                offset,
                data,
            } => (
                kind::STATUS_CHUNK,
                Body::new().u32(*total).u32(*offset).bytes(data),
            ),
            Reply::Doorbells {
                generation,
                total,
                start,
                devids,
            } => {
                let mut body = Body::new()
                    .u64(*generation)
                    .u32(*total)
                    .u32(*start)
                    .u32(devids.len() as u32)
                    .u32(0);
                for devid in devids {
                    body = body.u64(devid.0);
                }
                (kind::DOORBELLS, body)
            }
        };
        frame(kind, id, &body.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::GrantTarget;

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Hello {
                min_version: 1,
                max_version: 3,
                role: Role::Device,
            },
            Request::Hello {
                min_version: 1,
                max_version: 1,
                role: Role::Observer,
            },
            Request::Alloc { size: 1 << 20 },
            Request::Attach {
                token: Token(0xdead_beef_0123_4567),
                want: Perms::READ,
            },
            Request::Detach { token: Token(9) },
            Request::Grant {
                token: Token(9),
                target: GrantTarget::Default,
                perms: Perms(5),
            },
            Request::Grant {
                token: Token(9),
                target: GrantTarget::Device(DevId(77)),
                perms: Perms(0x1f),
            },
            Request::Status,
            Request::Revoke { token: Token(3) },
            Request::PublishDoorbell { token: Token(8) },
            Request::WithdrawDoorbell { token: Token(8) },
            Request::PeerDoorbells {
                token: Token(8),
                start: 16,
            },
            Request::Resume {
                min_version: 4,
                max_version: 4,
                devid: DevId(3),
                key: 0x1234_5678_9abc_def0,
            },
            Request::Reregister { token: Token(8) },
            Request::ResumeDone,
        ]
    }

    #[test]
    fn test_requests_round_trip() {
        for (i, request) in all_requests().into_iter().enumerate() {
            let id = 1000 + i as u64;
            assert_eq!(decode_request(&request.encode(id)), Ok((id, request)));
        }
    }

    #[test]
    fn test_replies_round_trip() {
        let replies = vec![
            Reply::HelloOk {
                version: 1,
                gid: 5,
                devid: 6,
                resume_key: 0,
            },
            Reply::HelloOk {
                version: 4,
                gid: 5,
                devid: 6,
                resume_key: 0xfeed,
            },
            Reply::Ok,
            Reply::Lease {
                token: Token(1),
                size: 4096,
                writable: true,
            },
            Reply::Error(WireError::from_pool_error(&PoolError::QuotaExceeded {
                limit: 1,
                used: 2,
                requested: 3,
            })),
            Reply::Event(PoolEvent::PeerDetached {
                token: Token(4),
                peer: DevId(2),
            }),
            Reply::Event(PoolEvent::Revoked { token: Token(4) }),
            Reply::StatusChunk {
                total: 10,
                offset: 4,
                data: b"abc".to_vec(),
            },
            Reply::Event(PoolEvent::DoorbellsChanged { token: Token(4) }),
            Reply::Doorbells {
                generation: 9,
                total: 3,
                start: 1,
                devids: vec![DevId(2), DevId(7)],
            },
            Reply::Doorbells {
                generation: 0,
                total: 0,
                start: 0,
                devids: Vec::new(),
            },
        ];
        for reply in replies {
            assert_eq!(decode_reply(&reply.encode(42)), Ok((42, reply)));
        }
    }

    #[test]
    fn test_every_truncation_is_refused() {
        for request in all_requests() {
            let packet = request.encode(7);
            for len in 0..packet.len() {
                assert!(
                    decode_request(&packet[..len]).is_err(),
                    "{request:?} cut at {len}"
                );
            }
        }
    }

    #[test]
    fn test_length_field_must_match() {
        let mut packet = Request::Alloc { size: 4096 }.encode(3);
        packet.push(0);
        assert!(matches!(
            decode_request(&packet),
            Err(DecodeError::LengthMismatch { id: 3, .. })
        ));
        let len = packet.len() as u32;
        packet[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            decode_request(&packet),
            Err(DecodeError::BodyLength { id: 3, .. })
        ));
    }

    #[test]
    fn test_token_only_requests_take_exactly_eight_bytes() {
        for request in [
            Request::Detach { token: Token(1) },
            Request::Revoke { token: Token(1) },
            Request::PublishDoorbell { token: Token(1) },
            Request::WithdrawDoorbell { token: Token(1) },
        ] {
            let mut packet = request.encode(4);
            packet.push(0);
            let len = packet.len() as u32;
            packet[..4].copy_from_slice(&len.to_le_bytes());
            assert!(matches!(
                decode_request(&packet),
                Err(DecodeError::BodyLength {
                    id: 4,
                    expected: 8,
                    actual: 9,
                    ..
                })
            ));
        }
    }

    #[test]
    fn test_oversized_unknown_and_bad_hello_are_refused() {
        let big = vec![0u8; MAX_MESSAGE_LEN + 1];
        assert!(matches!(
            decode_request(&big),
            Err(DecodeError::Oversized { .. })
        ));
        let unknown = frame(0x7777, 5, &[]);
        assert_eq!(
            decode_request(&unknown),
            Err(DecodeError::UnknownKind {
                id: 5,
                kind: 0x7777
            })
        );
        let mut hello = all_requests()[0].encode(1);
        hello[HEADER_LEN] ^= 0xff;
        assert!(matches!(
            decode_request(&hello),
            Err(DecodeError::BadMagic(_))
        ));
    }

    #[test]
    fn test_doorbell_lists_out_of_range_are_refused() {
        let reply = |total, start, n: u64| Reply::Doorbells {
            generation: 1,
            total,
            start,
            devids: (0..n).map(DevId).collect(),
        };
        assert_eq!(
            decode_reply(&reply(2, 1, 2).encode(1)),
            Err(DecodeError::BadDoorbells)
        );
        let many = MAX_DOORBELLS_PER_REPLY as u64 + 1;
        assert_eq!(
            decode_reply(&reply(100, 0, many).encode(1)),
            Err(DecodeError::BadDoorbells)
        );
        // A count that disagrees with the body length.
        let mut packet = reply(4, 0, 2).encode(1);
        packet.truncate(packet.len() - 8);
        let len = packet.len() as u32;
        packet[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            decode_reply(&packet),
            Err(DecodeError::BodyLength { .. })
        ));
    }

    #[test]
    fn test_pool_errors_survive_the_wire() {
        let errors = vec![
            PoolError::NoSuchRegion(Token(1)),
            PoolError::NotHeld { token: Token(2) },
            PoolError::PermissionDenied {
                token: Token(3),
                missing: MissingPerm::Write,
            },
            PoolError::InvalidSize(5),
            PoolError::PoolExhausted {
                requested: 1,
                available: 0,
            },
            PoolError::AlreadyHeld(Token(6)),
            PoolError::Protocol("Bad thing".into()),
            PoolError::NotAnEventfd { token: Token(7) },
            PoolError::DoorbellsUnsupported,
            PoolError::RegionQuotaExceeded { limit: 1024 },
            PoolError::UnknownDevice(DevId(12)),
        ];
        for error in errors {
            let back = WireError::from_pool_error(&error).into_pool_error();
            assert_eq!(back.to_string(), error.to_string());
        }
        let create = PoolError::CreateMemory(std::io::Error::from_raw_os_error(libc_enomem()));
        match WireError::from_pool_error(&create).into_pool_error() {
            PoolError::CreateMemory(e) => assert_eq!(e.kind(), std::io::ErrorKind::OutOfMemory),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn test_descriptor_limit_is_its_own_code_and_old_clients_get_create_memory() {
        let emfile = rustix::io::Errno::MFILE.raw_os_error();
        let error = PoolError::create_memory(std::io::Error::from_raw_os_error(emfile));
        assert!(matches!(error, PoolError::DescriptorLimit(_)));
        let wire = WireError::for_version(&error, LIMITS_VERSION);
        assert_eq!(wire.code, error_code::DESCRIPTOR_LIMIT);
        assert!(
            wire.text.contains("Host descriptor limit reached"),
            "{wire:?}"
        );
        match wire.into_pool_error() {
            PoolError::DescriptorLimit(e) => {
                assert!(e.to_string().contains("Too many open files"), "{e}")
            }
            other => panic!("unexpected {other:?}"),
        }
        // A version-2 client knows no code 13: it gets CREATE_MEMORY with the real errno
        // and the text, never ENOMEM.
        let old = WireError::for_version(&error, 2);
        assert_eq!(old.code, error_code::CREATE_MEMORY);
        assert_eq!(old.args[0], emfile as u64);
        assert!(old.text.contains("Host descriptor limit reached"));
        let quota = WireError::for_version(&PoolError::RegionQuotaExceeded { limit: 8 }, 1);
        assert_eq!(quota.code, error_code::CREATE_MEMORY);
        assert!(quota.text.contains("limit of 8 regions"));
        let unknown = WireError::for_version(&PoolError::UnknownDevice(DevId(3)), 2);
        assert_eq!(unknown.code, error_code::PROTOCOL);
        assert!(
            matches!(unknown.into_pool_error(), PoolError::Protocol(t) if t.contains("No device"))
        );
    }

    fn libc_enomem() -> i32 {
        rustix::io::Errno::NOMEM.raw_os_error()
    }

    #[test]
    fn test_error_text_is_bounded() {
        let long = "é".repeat(MAX_ERROR_TEXT);
        let error = WireError::protocol(long);
        assert!(error.text.len() <= MAX_ERROR_TEXT);
        assert!(error.encode_len_ok());
    }

    impl WireError {
        fn encode_len_ok(&self) -> bool {
            Reply::Error(self.clone()).encode(0).len() <= MAX_MESSAGE_LEN
        }
    }
}
