// SPDX-License-Identifier: Apache-2.0
//! Little-endian field access on byte buffers. Every structure in this crate names its field
//! offsets as constants and goes through these two functions, so no caller computes offsets.

use core::fmt;

/// A buffer was too short for the structure being read or written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShortBuffer {
    /// Bytes the structure needs.
    pub needed: usize,
    /// Bytes the buffer had.
    pub got: usize,
}

impl fmt::Display for ShortBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Buffer too short: {} bytes needed, {} given",
            self.needed, self.got
        )
    }
}

/// Fail unless `buf` holds at least `needed` bytes.
pub fn check_len(buf: &[u8], needed: usize) -> Result<(), ShortBuffer> {
    if buf.len() < needed {
        Err(ShortBuffer {
            needed,
            got: buf.len(),
        })
    } else {
        Ok(())
    }
}

pub(crate) fn get_u64(buf: &[u8], offset: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&buf[offset..offset + 8]);
    u64::from_le_bytes(raw)
}

pub(crate) fn get_u32(buf: &[u8], offset: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&buf[offset..offset + 4]);
    u32::from_le_bytes(raw)
}

pub(crate) fn put_u64(buf: &mut [u8], offset: usize, value: u64) {
    buf[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn put_u32(buf: &mut [u8], offset: usize, value: u32) {
    buf[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
}

/// A fixed-size wire structure: `SIZE` bytes, decoded from and encoded to little-endian bytes.
/// `decode` reads only the first `SIZE` bytes; `encode` writes only the first `SIZE` bytes.
pub trait WireStruct: Sized {
    /// Encoded size in bytes.
    const SIZE: usize;

    /// Decode from `buf`, which must hold at least `SIZE` bytes.
    fn decode(buf: &[u8]) -> Result<Self, ShortBuffer>;

    /// Encode into `buf`, which must hold at least `SIZE` bytes; returns `SIZE`.
    fn encode(&self, buf: &mut [u8]) -> Result<usize, ShortBuffer>;

    /// Encode into a fresh array-like buffer of `N` bytes (N >= SIZE; the tail stays zero).
    fn to_bytes<const N: usize>(&self) -> Result<[u8; N], ShortBuffer> {
        let mut out = [0u8; N];
        self.encode(&mut out)?;
        Ok(out)
    }
}

/// Declare a structure made only of little-endian u64 fields at consecutive offsets.
macro_rules! le64_struct {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident @ $off:literal),+ $(,)? } size $size:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: u64,)+
        }

        impl $name {
            $(
                #[doc = concat!("Byte offset of `", stringify!($field), "`.")]
                #[allow(non_upper_case_globals)]
                pub const $field: usize = $off;
            )+
        }

        impl $crate::wire::WireStruct for $name {
            const SIZE: usize = $size;

            fn decode(buf: &[u8]) -> Result<Self, $crate::wire::ShortBuffer> {
                $crate::wire::check_len(buf, $size)?;
                Ok(Self { $($field: $crate::wire::get_u64(buf, $off),)+ })
            }

            fn encode(&self, buf: &mut [u8]) -> Result<usize, $crate::wire::ShortBuffer> {
                $crate::wire::check_len(buf, $size)?;
                $($crate::wire::put_u64(buf, $off, self.$field);)+
                Ok($size)
            }
        }
    };
}

pub(crate) use le64_struct;
