// SPDX-License-Identifier: Apache-2.0
//! The CPU policy for PVM hosts (KVM served by `kvm_pvm`).
//!
//! PVM runs guest ring 0 through KVM's instruction emulator and supplies its own CPUID, so the
//! VMM's CPUID trimming is ignored there. The policy is two things: kernel parameters that make
//! a Linux guest avoid the instructions the emulator cannot run, and a small fallback for the
//! few that still reach userspace as KVM_EXIT_INTERNAL_ERROR (emulation failure) with the
//! instruction bytes attached. On hardware KVM the policy is off and nothing here runs.

use std::path::Path;

use kvm_bindings::kvm_run;

use crate::config::PvmMode;

/// Present when /dev/kvm is served by PVM.
const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// Kernel parameters a Linux guest needs on PVM: hide the features whose instructions the
/// emulator cannot run (xsave family, cmpxchg16b, popcnt, SMAP's clac/stac), and turn on the
/// fixups of our guest kernel patch (resources/linux/pvm-guest.patch; other kernels pass the
/// unknown parameter to init, harmlessly).
pub const LINUX_CMDLINE_PARAMS: &str = "noxsave clearcpuid=cx16,popcnt,smap pvm_native_fixups";

/// KVM_INTERNAL_ERROR_EMULATION and the flag saying instruction bytes follow in data[1..].
const INTERNAL_ERROR_EMULATION: u32 = 1;
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// RFLAGS.AC, which clac/stac clear/set.
pub const RFLAGS_AC: u64 = 1 << 18;

/// Whether the PVM policy applies, given the option and the host.
pub fn policy_enabled(mode: PvmMode) -> bool {
    match mode {
        PvmMode::On => true,
        PvmMode::Off => false,
        PvmMode::Auto => Path::new(PVM_MODULE_PATH).exists(),
    }
}

/// An instruction the emulator gave up on that the VMM completes itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulatedInsn {
    /// `int3` (cc): deliver #BP with RIP after the instruction.
    Int3,
    /// `clac` (0f 01 ca): clear RFLAGS.AC.
    Clac,
    /// `stac` (0f 01 cb): set RFLAGS.AC.
    Stac,
    /// `fwait` (9b): no x87 exception is ever pending here, so it does nothing.
    Fwait,
}

impl EmulatedInsn {
    /// Decode the instruction at the start of `bytes`; None if it is not one we complete.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [0xcc, ..] => Some(Self::Int3),
            [0x0f, 0x01, 0xca, ..] => Some(Self::Clac),
            [0x0f, 0x01, 0xcb, ..] => Some(Self::Stac),
            [0x9b, ..] => Some(Self::Fwait),
            _ => None,
        }
    }

    /// Its length in bytes, by which RIP advances.
    pub fn len(self) -> u64 {
        match self {
            Self::Int3 | Self::Fwait => 1,
            Self::Clac | Self::Stac => 3,
        }
    }

    /// RFLAGS after the instruction.
    pub fn apply_rflags(self, rflags: u64) -> u64 {
        match self {
            Self::Clac => rflags & !RFLAGS_AC,
            Self::Stac => rflags | RFLAGS_AC,
            Self::Int3 | Self::Fwait => rflags,
        }
    }
}

/// What KVM said about an internal error: its suberror and, for emulation failures that
/// carry them, the instruction bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InternalError {
    pub suberror: u32,
    pub insn: Option<Vec<u8>>,
}

impl InternalError {
    /// Read the internal-error payload of the last KVM_EXIT_INTERNAL_ERROR.
    pub fn from_run(run: &kvm_run) -> Self {
        // SAFETY: the caller got KVM_EXIT_INTERNAL_ERROR from this kvm_run, so the `internal`
        // member of the exit union is the one KVM filled; every bit pattern is a valid u32/u64.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        Self::from_parts(internal.suberror, &internal.data[..ndata])
    }

    /// `data[0]` holds flags; with the instruction-bytes flag, `data[1..]` read as bytes is
    /// the fetched length followed by that many instruction bytes.
    pub fn from_parts(suberror: u32, data: &[u64]) -> Self {
        let insn = (suberror == INTERNAL_ERROR_EMULATION
            && data
                .first()
                .is_some_and(|f| f & EMULATION_FLAG_INSTRUCTION_BYTES != 0))
        .then(|| {
            let bytes: Vec<u8> = data[1..].iter().flat_map(|w| w.to_le_bytes()).collect();
            let len = usize::from(*bytes.first()?).min(15);
            bytes.get(1..1 + len).map(<[u8]>::to_vec)
        })
        .flatten();
        Self { suberror, insn }
    }

    /// The instruction to complete, if the policy knows it.
    pub fn emulated_insn(&self) -> Option<EmulatedInsn> {
        self.insn.as_deref().and_then(EmulatedInsn::decode)
    }
}

/// Format instruction bytes for an error message.
pub fn hex_bytes(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pack `insn` the way KVM does: a length byte, then the bytes, into u64 words.
    fn pack(insn: &[u8]) -> Vec<u64> {
        let mut bytes = vec![insn.len() as u8];
        bytes.extend_from_slice(insn);
        bytes.resize(16, 0);
        let mut data = vec![EMULATION_FLAG_INSTRUCTION_BYTES];
        for chunk in bytes.chunks(8) {
            data.push(u64::from_le_bytes(chunk.try_into().unwrap()));
        }
        data
    }

    #[test]
    fn test_decode_known_instructions() {
        assert_eq!(
            EmulatedInsn::decode(&[0xcc, 0x90]),
            Some(EmulatedInsn::Int3)
        );
        assert_eq!(
            EmulatedInsn::decode(&[0x0f, 0x01, 0xca]),
            Some(EmulatedInsn::Clac)
        );
        assert_eq!(
            EmulatedInsn::decode(&[0x0f, 0x01, 0xcb]),
            Some(EmulatedInsn::Stac)
        );
        assert_eq!(EmulatedInsn::decode(&[0x9b]), Some(EmulatedInsn::Fwait));
        // xrstor64 and lock cmpxchg16b are not ours to complete.
        assert_eq!(EmulatedInsn::decode(&[0x48, 0x0f, 0xae, 0x2f]), None);
        assert_eq!(EmulatedInsn::decode(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]), None);
        assert_eq!(EmulatedInsn::decode(&[0x0f, 0x01]), None);
        assert_eq!(EmulatedInsn::decode(&[]), None);
    }

    #[test]
    fn test_rflags_and_lengths() {
        assert_eq!(EmulatedInsn::Clac.apply_rflags(0x2 | RFLAGS_AC), 0x2);
        assert_eq!(EmulatedInsn::Stac.apply_rflags(0x2), 0x2 | RFLAGS_AC);
        assert_eq!(EmulatedInsn::Int3.apply_rflags(0x202), 0x202);
        assert_eq!(EmulatedInsn::Clac.len(), 3);
        assert_eq!(EmulatedInsn::Int3.len(), 1);
    }

    #[test]
    fn test_internal_error_extracts_instruction_bytes() {
        let e = InternalError::from_parts(1, &pack(&[0x0f, 0x01, 0xcb]));
        assert_eq!(e.insn.as_deref(), Some(&[0x0f, 0x01, 0xcb][..]));
        assert_eq!(e.emulated_insn(), Some(EmulatedInsn::Stac));
        let long = [0xf0, 0x48, 0x0f, 0xc7, 0x0e, 1, 2, 3, 4, 5];
        let e = InternalError::from_parts(1, &pack(&long));
        assert_eq!(e.insn.as_deref(), Some(&long[..]));
        assert_eq!(e.emulated_insn(), None);
    }

    #[test]
    fn test_internal_error_without_bytes_or_truncated() {
        // No flag: no bytes.
        let mut data = pack(&[0xcc]);
        data[0] = 0;
        assert_eq!(InternalError::from_parts(1, &data).insn, None);
        // Other suberrors never carry bytes.
        assert_eq!(InternalError::from_parts(3, &pack(&[0xcc])).insn, None);
        // A length byte claiming more than was delivered is rejected, not over-read.
        let e = InternalError::from_parts(1, &[1, 0x0f]);
        assert_eq!(e.insn, None);
        assert_eq!(InternalError::from_parts(1, &[1]).insn, None);
    }

    #[test]
    fn test_hex_bytes() {
        assert_eq!(hex_bytes(&[0x0f, 0x01, 0xca]), "0f 01 ca");
    }
}
