// SPDX-License-Identifier: Apache-2.0
//! The ism test guest: a freestanding x86_64 program booted by `ism-vmm --kernel` (or
//! cloud-hypervisor's) through its PVH note. Ring 0 (boot.rs, assembly) sets up paging, GDT/TSS/IDT and drops to ring 3
//! with IOPL 3, where everything else runs natively: serial output, ACPI, PCI, virtio.
//!
//! It runs the test named by `ism.test=<name>` on its command line and reports on COM1 in
//! lines `ISM-TEST key=value ...`, ending with `ISM-TEST result=pass|fail`, then powers the VM
//! off through ACPI (or resets it, for `ism.test=reboot`).

#![no_std]
#![no_main]

#[macro_use]
mod serial;
mod acpi;
mod apic;
mod bench;
mod boot;
mod cases;
mod io;
mod ism_shell;
mod paging;
mod platform;
mod progress;
mod start_info;

use core::cell::UnsafeCell;

use acpi::Acpi;
use start_info::StartInfo;

/// A value written once at startup and read afterwards, on the guest's single CPU.
struct Global<T>(UnsafeCell<Option<T>>);

// SAFETY: the guest runs ring-3 code on one CPU only; interrupt handlers (ring 0, assembly)
// never touch these values.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    const fn new() -> Self {
        Self(UnsafeCell::new(None))
    }

    fn set(&self, value: T) -> &T {
        // SAFETY: single CPU, called once from ism_guest_main before any reader exists.
        unsafe { (*self.0.get()).insert(value) }
    }

    fn get(&self) -> Option<&T> {
        // SAFETY: after `set`, the value is only read.
        unsafe { (*self.0.get()).as_ref() }
    }
}

static ACPI: Global<Acpi> = Global::new();

/// Ring-3 entry, called by `ism_user_entry` with the start-info address from ebx.
#[unsafe(no_mangle)]
extern "C" fn ism_guest_main(start_info_paddr: u32) -> ! {
    boot::fill_idt();
    report!("hello=1 start_info={start_info_paddr:#x}");
    let info = match StartInfo::read(start_info_paddr.into()) {
        Ok(info) => info,
        Err(e) => {
            report!("error=start_info detail={e:?}");
            finish(false);
        }
    };
    let acpi = match Acpi::discover(info.rsdp) {
        Some(acpi) => ACPI.set(acpi),
        None => {
            report!("error=acpi detail=no_rsdp");
            finish(false);
        }
    };
    let apic_id = apic::init();
    boot::enable_interrupts();
    report!(
        "cpus={} mem_bytes={} memmap_entries={} apic_id={} acpi_tables={} ecam={} s5={} phys_bits={}",
        acpi.cpus,
        info.ram_bytes,
        info.memmap_entries,
        apic_id,
        acpi.tables,
        acpi.ecam.map_or(0, |e| e.base),
        acpi.s5_slp_typ.map_or(-1, i32::from),
        paging::phys_bits(),
    );
    let test = info.param("ism.test").unwrap_or("boot");
    report!("test={test}");
    // SAFETY: the only call.
    let platform = unsafe { platform::GuestPlatform::take(&info) };
    let ctx = cases::Context {
        platform: &platform,
        acpi,
        apic_id,
        script: info.param("ism.script"),
        draft: info.param("ism.draft") == Some("1"),
    };
    let pass = cases::run(test, &ctx);
    finish(pass)
}

/// Print the verdict and power off.
fn finish(pass: bool) -> ! {
    report!("result={}", if pass { "pass" } else { "fail" });
    power_off()
}

fn power_off() -> ! {
    if let Some(acpi) = ACPI.get() {
        acpi.power_off();
    }
    settle();
    report!("poweroff=failed");
    loop {
        boot::idle();
    }
}

/// Give the VMM time to act on a power-off or reset write (it stops the vCPU asynchronously)
/// before reporting that nothing happened.
fn settle() {
    for _ in 0..100_000_000u32 {
        core::hint::spin_loop();
    }
}

/// Ring-3 side of an exception: ring 0 recorded it and switched here on a fresh stack.
#[unsafe(no_mangle)]
extern "C" fn ism_guest_fault() -> ! {
    let [vector, error, rip, cr2, cs, rsp, count, _] = boot::fault_record();
    if count > 1 {
        // Faulted while reporting a fault: just stop.
        power_off();
    }
    report!(
        "fault vector={vector} error={error:#x} rip={rip:#x} cr2={cr2:#x} cs={cs:#x} rsp={rsp:#x}"
    );
    finish(false)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(l) => report!("panic=\"{}\" at={}:{}", info.message(), l.file(), l.line()),
        None => report!("panic=\"{}\"", info.message()),
    }
    finish(false)
}
