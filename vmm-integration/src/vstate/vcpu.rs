// SPDX-License-Identifier: Apache-2.0
//! One vCPU: its set-up (CPUID, MSRs, LAPIC, boot registers) and its run loop, which
//! dispatches port and MMIO exits to the buses and turns the exits that end the VM into an
//! [`ExitEvent`] for the main thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kvm_bindings::{CpuId, Msrs, kvm_lapic_state, kvm_msr_entry};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use super::cpuid::vcpu_cpuid;
use super::pause::{self, PauseState};
use super::pvm::{EmulatedInsn, InternalError, hex_bytes};
use crate::boot::{BootEntry, BootError, cpu::boot_vcpu_state};
use crate::bus::IoBuses;
use crate::exit::{ExitEvent, ExitNotifier};
use crate::legacy::power::ResetRequested;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("Failed to create vCPU {0}")]
    Create(u8, #[source] kvm_ioctls::Error),
    #[error("Failed to set CPUID on vCPU {0}")]
    SetCpuid(u8, #[source] kvm_ioctls::Error),
    #[error("Failed to set MSRs on vCPU {0}")]
    SetMsrs(u8, #[source] kvm_ioctls::Error),
    #[error("Failed to build the MSR list")]
    MsrList,
    #[error("Failed to get or set the local APIC of vCPU {0}")]
    Lapic(u8, #[source] kvm_ioctls::Error),
    #[error("Failed to get or set the registers of vCPU {0}")]
    Registers(u8, #[source] kvm_ioctls::Error),
    #[error("Failed to set up the boot state of vCPU {0}")]
    BootState(u8, #[source] BootError),
}

/// Counters for exits nothing handled, and for the PVM policy's work.
#[derive(Default)]
pub struct ExitCounters {
    pub unhandled_pio_reads: AtomicU64,
    pub unhandled_pio_writes: AtomicU64,
    pub unhandled_mmio_reads: AtomicU64,
    pub unhandled_mmio_writes: AtomicU64,
    pub pvm_completed_insns: AtomicU64,
}

/// Everything a vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuShared {
    pub buses: Arc<IoBuses>,
    pub exit: ExitNotifier,
    pub reset: ResetRequested,
    /// Set by the main thread when the VM is being torn down.
    pub stop: Arc<AtomicBool>,
    pub counters: Arc<ExitCounters>,
    /// Whether the PVM instruction fallback is on.
    pub pvm_policy: bool,
    /// `vm.pause`: the thread parks here between KVM_RUNs while a pause is requested.
    pub pause: Arc<PauseState>,
}

/// Clears the thread's immediate-exit registration before the vCPU (and its kvm_run
/// mapping) is dropped, so a late kick signal never writes to unmapped memory.
struct ImmediateExitRegistration;

impl Drop for ImmediateExitRegistration {
    fn drop(&mut self) {
        pause::register_immediate_exit(std::ptr::null_mut());
    }
}

/// MSR numbers set at boot.
mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_MISC_ENABLE: fast string operations.
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
    /// MTRRs enabled, default type write-back.
    pub const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
}

/// LAPIC register offsets and LVT delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| lapic.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

/// Replace an LVT entry's delivery mode (bits 8..11).
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    shared: VcpuShared,
}

impl Vcpu {
    pub fn new(vm: &VmFd, id: u8, shared: VcpuShared) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VcpuError::Create(id, e))?;
        Ok(Self { fd, id, shared })
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// CPUID, MSRs and LAPIC for every vCPU; boot registers for the boot vCPU (the others
    /// wait for INIT/SIPI from the guest).
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        vcpus: u8,
        boot: Option<(&GuestMemoryMmap, &BootEntry)>,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        self.fd
            .set_cpuid2(&vcpu_cpuid(supported_cpuid, id, vcpus))
            .map_err(|e| VcpuError::SetCpuid(id, e))?;
        self.setup_msrs()?;
        self.setup_lapic()?;
        if let Some((mem, entry)) = boot {
            let sregs = self
                .fd
                .get_sregs()
                .map_err(|e| VcpuError::Registers(id, e))?;
            let (regs, sregs, fpu) =
                boot_vcpu_state(mem, entry, sregs).map_err(|e| VcpuError::BootState(id, e))?;
            self.fd
                .set_sregs(&sregs)
                .map_err(|e| VcpuError::Registers(id, e))?;
            self.fd
                .set_regs(&regs)
                .map_err(|e| VcpuError::Registers(id, e))?;
            self.fd
                .set_fpu(&fpu)
                .map_err(|e| VcpuError::Registers(id, e))?;
        }
        Ok(())
    }

    fn setup_msrs(&self) -> Result<(), VcpuError> {
        let entries: Vec<kvm_msr_entry> = [
            (msr::IA32_SYSENTER_CS, 0),
            (msr::IA32_SYSENTER_ESP, 0),
            (msr::IA32_SYSENTER_EIP, 0),
            (msr::STAR, 0),
            (msr::CSTAR, 0),
            (msr::KERNEL_GS_BASE, 0),
            (msr::SYSCALL_MASK, 0),
            (msr::LSTAR, 0),
            (msr::IA32_TSC, 0),
            (msr::IA32_MISC_ENABLE, msr::MISC_ENABLE_FAST_STRING),
            (msr::MTRR_DEF_TYPE, msr::MTRR_ENABLE_WB),
        ]
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::MsrList)?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| VcpuError::SetMsrs(self.id, e))?;
        if set != entries.len() {
            // KVM stops at the first MSR it refuses; PVM refuses some. Not fatal: the guest
            // initialises them itself.
            log::warn!(
                "vCPU{}: KVM set {set} of {} boot MSRs (stopped at {:#x})",
                self.id,
                entries.len(),
                entries[set].index
            );
        }
        Ok(())
    }

    /// LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as PC firmware leaves them.
    fn setup_lapic(&self) -> Result<(), VcpuError> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| VcpuError::Lapic(self.id, e))?;
        let lvt0 = lapic_reg(&lapic, APIC_LVT0);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT0,
            with_delivery_mode(lvt0, APIC_MODE_EXTINT),
        );
        let lvt1 = lapic_reg(&lapic, APIC_LVT1);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT1,
            with_delivery_mode(lvt1, APIC_MODE_NMI),
        );
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| VcpuError::Lapic(self.id, e))
    }

    /// Run until the VM stops; report why (unless the main thread asked us to stop).
    /// Parks while a pause is requested.
    pub fn run(mut self) {
        pause::register_immediate_exit(&mut self.fd.get_kvm_run().immediate_exit);
        // Locals drop before the `self` parameter: the registration is cleared first.
        let _registered = ImmediateExitRegistration;
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            if self.shared.pause.requested() {
                self.shared.pause.park(&self.shared.stop);
                continue;
            }
            if let Some(event) = self.run_once() {
                if !self.shared.stop.load(Ordering::Acquire) {
                    self.shared.exit.notify(event);
                }
                return;
            }
        }
    }

    /// One KVM_RUN; `Some` when the VM must stop.
    fn run_once(&mut self) -> Option<ExitEvent> {
        let shared = &self.shared;
        let counters = &shared.counters;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick (pause or teardown) set immediate_exit; the caller checks why.
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) => {
                return Some(ExitEvent::Error(format!(
                    "vCPU{}: KVM_RUN failed: {e}",
                    self.id
                )));
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !shared.buses.pio_read(port, data) {
                    data.fill(0xff);
                    counters.unhandled_pio_reads.fetch_add(1, Ordering::Relaxed);
                    log::debug!("Unhandled port read {port:#x} ({} bytes)", data.len());
                }
                None
            }
            VcpuExit::IoOut(port, data) => {
                if !shared.buses.pio_write(port, data) {
                    counters
                        .unhandled_pio_writes
                        .fetch_add(1, Ordering::Relaxed);
                    log::debug!("Unhandled port write {port:#x} {data:x?}");
                }
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                if !shared.buses.mmio_read(addr, data) {
                    data.fill(0xff);
                    counters
                        .unhandled_mmio_reads
                        .fetch_add(1, Ordering::Relaxed);
                    log::debug!("Unhandled MMIO read {addr:#x} ({} bytes)", data.len());
                }
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !shared.buses.mmio_write(addr, data) {
                    counters
                        .unhandled_mmio_writes
                        .fetch_add(1, Ordering::Relaxed);
                    log::debug!("Unhandled MMIO write {addr:#x} {data:x?}");
                }
                None
            }
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => None,
            VcpuExit::Shutdown => Some(self.triple_fault()),
            VcpuExit::SystemEvent(kind, _) => Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitEvent::Shutdown("KVM system event"),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitEvent::Reboot("KVM system event"),
                other => ExitEvent::Error(format!(
                    "vCPU{}: KVM system event {other} (guest crash) at {}",
                    self.id,
                    self.where_am_i()
                )),
            }),
            VcpuExit::InternalError => self.internal_error(),
            VcpuExit::FailEntry(reason, cpu) => Some(ExitEvent::Error(format!(
                "vCPU{}: KVM entry failed: hardware reason {reason:#x} on host CPU {cpu}",
                self.id
            ))),
            VcpuExit::Hlt => Some(ExitEvent::Error(format!(
                "vCPU{}: halted with the in-kernel irqchip expected to handle HLT, at {}",
                self.id,
                self.where_am_i()
            ))),
            other => {
                let what = format!("{other:?}");
                Some(ExitEvent::Error(format!(
                    "vCPU{}: unexpected KVM exit {what} at {}",
                    self.id,
                    self.where_am_i()
                )))
            }
        }
    }

    fn where_am_i(&self) -> String {
        match self.fd.get_regs() {
            Ok(regs) => format!("RIP {:#x}", regs.rip),
            Err(_) => "unknown RIP".to_owned(),
        }
    }

    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted. After a reset request that is how a
    /// reboot ends; otherwise the guest crashed.
    fn triple_fault(&self) -> ExitEvent {
        if self.shared.reset.is_set() {
            ExitEvent::Reboot("triple fault after a reset request")
        } else {
            ExitEvent::Error(format!(
                "vCPU{}: triple fault (KVM_EXIT_SHUTDOWN) at {}",
                self.id,
                self.where_am_i()
            ))
        }
    }

    /// KVM_EXIT_INTERNAL_ERROR: complete the instruction under the PVM policy, or stop.
    fn internal_error(&mut self) -> Option<ExitEvent> {
        let error = InternalError::from_run(self.fd.get_kvm_run());
        if self.shared.pvm_policy
            && let Some(insn) = error.emulated_insn()
        {
            return match self.complete_insn(insn) {
                Ok(()) => {
                    self.shared
                        .counters
                        .pvm_completed_insns
                        .fetch_add(1, Ordering::Relaxed);
                    log::debug!("vCPU{}: completed {insn:?} for the PVM emulator", self.id);
                    None
                }
                Err(e) => Some(ExitEvent::Error(format!(
                    "vCPU{}: failed to complete {insn:?} at {}: {e}",
                    self.id,
                    self.where_am_i()
                ))),
            };
        }
        let bytes = error
            .insn
            .as_deref()
            .map(|b| format!(", instruction bytes [{}]", hex_bytes(b)))
            .unwrap_or_default();
        Some(ExitEvent::Error(format!(
            "vCPU{}: KVM internal error (suberror {}) at {}{bytes}",
            self.id,
            error.suberror,
            self.where_am_i()
        )))
    }

    /// Do what `insn` would have done: advance RIP past it, update RFLAGS, and for int3
    /// deliver #BP (a trap: the saved RIP is the next instruction's).
    fn complete_insn(&self, insn: EmulatedInsn) -> Result<(), kvm_ioctls::Error> {
        let mut regs = self.fd.get_regs()?;
        regs.rip = regs.rip.wrapping_add(insn.len());
        regs.rflags = insn.apply_rflags(regs.rflags);
        self.fd.set_regs(&regs)?;
        if insn == EmulatedInsn::Int3 {
            const BP_VECTOR: u8 = 3;
            let mut events = self.fd.get_vcpu_events()?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            self.fd.set_vcpu_events(&events)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lvt_delivery_mode_keeps_other_bits() {
        // Masked, vector 0x20, fixed mode -> ExtINT, still masked, same vector.
        let reg = (1 << 16) | 0x20;
        assert_eq!(
            with_delivery_mode(reg, APIC_MODE_EXTINT),
            (1 << 16) | 0x700 | 0x20
        );
        assert_eq!(with_delivery_mode(0x700, APIC_MODE_NMI), 0x400);
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT1, 0xdead_beef);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0xdead_beef);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0);
    }
}
