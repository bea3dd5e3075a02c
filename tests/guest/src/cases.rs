// SPDX-License-Identifier: Apache-2.0
//! The tests the guest can run, selected by `ism.test=<name>`.

use ism_guest_driver::pci::{
    self, ConfigAccess, EcamConfig, MSIX_CAP_ID, MsixCapability, PciAddress, PciFunction,
    PortConfig, regs, x86_msi_address,
};
use ism_guest_driver::virtio::rng::VirtioRng;
use ism_guest_driver::virtio::{
    NO_VECTOR, VirtioPciDevice, device_type, find_virtio_caps, modern_device_type,
};

use crate::acpi::{self, Acpi};
use crate::platform::GuestPlatform;
use crate::{apic, boot};

/// Interrupt vector the virtio-rng queue's MSI-X entry sends.
const RNG_VECTOR: u8 = 0x41;

/// What every test may use.
pub struct Context<'a> {
    pub platform: &'a GuestPlatform,
    pub acpi: &'a Acpi,
    pub apic_id: u8,
    /// `ism.script=`: commands for `ism.test=ism` to run before reading COM1.
    pub script: Option<&'a str>,
    /// `ism.draft=1`: `ism.test=ism` drives the device as a driver written only against the
    /// draft (no feature bits, no GRANT, every interrupt on a region's vector is a kick).
    pub draft: bool,
}

/// Run test `name`; true if it passed.
pub fn run(name: &str, ctx: &Context<'_>) -> bool {
    match name {
        "boot" => true,
        "pci" => pci_list(ctx),
        "rng" => rng(ctx),
        "virtio" => virtio_list(ctx),
        "irq" => timer_interrupts(),
        "ism" => crate::ism_shell::run(ctx, ctx.script),
        "progress" => crate::progress::run(),
        "reboot" => reboot(ctx),
        "panic" => panic!("requested by ism.test=panic"),
        "fault" => {
            // SAFETY: ud2 raises #UD, which the fault path reports; nothing after it runs.
            unsafe { core::arch::asm!("ud2", options(nomem, nostack)) };
            false
        }
        "pagefault" => {
            // 128 GiB: above RAM and ism-vmm's PCI windows; nothing maps it before this test.
            let unmapped = 0x20_0000_0000usize as *const u64;
            // SAFETY: deliberately faults (#PF) to exercise the fault path; nothing after runs.
            let value = unsafe { unmapped.read_volatile() };
            report!("pagefault=missed value={value}");
            false
        }
        other => {
            report!("error=unknown_test name={other}");
            false
        }
    }
}

/// Config access through ECAM when MCFG describes it, else ports 0xcf8/0xcfc.
pub(crate) enum AnyConfig<'p> {
    Ecam(EcamConfig<'p, GuestPlatform>),
    Ports(PortConfig<'p, GuestPlatform>),
}

impl ConfigAccess for AnyConfig<'_> {
    fn read_u32(&self, addr: PciAddress, offset: u16) -> u32 {
        match self {
            AnyConfig::Ecam(c) => c.read_u32(addr, offset),
            AnyConfig::Ports(c) => c.read_u32(addr, offset),
        }
    }
    fn write_u32(&self, addr: PciAddress, offset: u16, value: u32) {
        match self {
            AnyConfig::Ecam(c) => c.write_u32(addr, offset, value),
            AnyConfig::Ports(c) => c.write_u32(addr, offset, value),
        }
    }
    fn write_u16(&self, addr: PciAddress, offset: u16, value: u16) {
        match self {
            AnyConfig::Ecam(c) => c.write_u16(addr, offset, value),
            AnyConfig::Ports(c) => c.write_u16(addr, offset, value),
        }
    }
}

pub(crate) fn config<'p>(ctx: &Context<'p>) -> (AnyConfig<'p>, u8, u8) {
    use ism_guest_driver::Platform as _;
    match ctx.acpi.ecam {
        Some(e)
            if ctx.platform.map_mmio(
                e.base,
                (u64::from(e.end_bus) + 1 - u64::from(e.start_bus)) << 20,
            ) =>
        {
            // SAFETY: the window comes from the MCFG table; the platform mapped it as device
            // memory.
            let ecam = unsafe { EcamConfig::new(ctx.platform, e.base, e.start_bus, e.end_bus) };
            (AnyConfig::Ecam(ecam), e.start_bus, e.end_bus)
        }
        _ => (AnyConfig::Ports(PortConfig::new(ctx.platform)), 0, 0),
    }
}

fn pci_list(ctx: &Context<'_>) -> bool {
    let (config, start, end) = config(ctx);
    report!(
        "pci_access={}",
        if matches!(config, AnyConfig::Ecam(_)) {
            "ecam"
        } else {
            "ports"
        }
    );
    let mut count = 0;
    for f in pci::enumerate(&config, start, end) {
        report!(
            "pci={} vendor={:04x} device={:04x} class={:06x}",
            f.address,
            f.vendor_id,
            f.device_id,
            f.class
        );
        count += 1;
    }
    report!("pci_functions={count}");
    count > 0
}

/// Every modern virtio function with its validated capabilities, including shared-memory
/// regions (`shm=<id> bar= offset= len= addr=` lines).
fn virtio_list(ctx: &Context<'_>) -> bool {
    let (config, start, end) = config(ctx);
    let mut devices = 0;
    let mut ok = true;
    for f in pci::enumerate(&config, start, end) {
        let Some(kind) = modern_device_type(f.vendor_id, f.device_id) else {
            continue;
        };
        devices += 1;
        let caps = pci::read_bars(&config, f.address)
            .map_err(|e| report!("error=bars device={} detail=\"{e}\"", f.address))
            .ok()
            .and_then(|bars| {
                find_virtio_caps(&config, f.address, &bars)
                    .map_err(|e| report!("error=virtio_caps device={} detail=\"{e}\"", f.address))
                    .ok()
            });
        let Some(caps) = caps else {
            ok = false;
            continue;
        };
        report!(
            "virtio={} type={kind} common={:#x} notify={:#x} notify_mult={} isr={:#x} device_cfg={:#x} shm_count={}",
            f.address,
            caps.common.addr,
            caps.notify.addr,
            caps.notify_multiplier,
            caps.isr.addr,
            caps.device.map_or(0, |d| d.addr),
            caps.shm_total()
        );
        for shm in caps.shm_regions() {
            report!(
                "shm={} device={} bar={} offset={:#x} len={:#x} addr={:#x}",
                shm.id,
                f.address,
                shm.bar,
                shm.offset,
                shm.len,
                shm.addr
            );
        }
    }
    report!("virtio_devices={devices}");
    ok && devices > 0
}

fn find_virtio(config: &AnyConfig<'_>, start: u8, end: u8, kind: u16) -> Option<PciFunction> {
    pci::enumerate(config, start, end)
        .find(|f| modern_device_type(f.vendor_id, f.device_id) == Some(kind))
}

fn rng(ctx: &Context<'_>) -> bool {
    let (config, start, end) = config(ctx);
    let Some(function) = find_virtio(&config, start, end, device_type::RNG) else {
        report!("error=no_virtio_rng");
        return false;
    };
    let addr = function.address;
    report!("rng_device={addr}");
    let bars = match pci::read_bars(&config, addr) {
        Ok(bars) => bars,
        Err(e) => {
            report!("error=bars detail=\"{e}\"");
            return false;
        }
    };
    pci::enable_command_bits(
        &config,
        addr,
        regs::COMMAND_MEMORY | regs::COMMAND_BUS_MASTER | regs::COMMAND_INTX_DISABLE,
    );
    let caps = match find_virtio_caps(&config, addr, &bars) {
        Ok(caps) => caps,
        Err(e) => {
            report!("error=virtio_caps detail=\"{e}\"");
            return false;
        }
    };
    // SAFETY: caps were validated against this function's BARs, decoding is on.
    let device = match unsafe { VirtioPciDevice::new(ctx.platform, caps) } {
        Ok(d) => d,
        Err(e) => {
            report!("error=virtio_map detail=\"{e}\"");
            return false;
        }
    };

    let msix = pci::CapabilityIter::new(&config, addr)
        .find(|c| c.id == MSIX_CAP_ID)
        .and_then(|c| MsixCapability::parse(&config, addr, c));
    let mut vector = NO_VECTOR;
    if let Some(msix) = msix {
        // SAFETY: the BARs are this function's, decoding is on.
        match unsafe { msix.map_table(ctx.platform, &bars) } {
            Ok(table) => match table.program(0, x86_msi_address(ctx.apic_id), RNG_VECTOR.into()) {
                Ok(()) => {
                    msix.enable(&config, addr);
                    vector = 0;
                }
                Err(e) => report!("warn=msix_program detail=\"{e}\""),
            },
            Err(e) => report!("warn=msix_table detail=\"{e}\""),
        }
    }
    report!("rng_msix={}", vector != NO_VECTOR);

    let mut rng = match VirtioRng::new(ctx.platform, device, vector) {
        Ok(rng) => rng,
        Err(e) => {
            report!("error=rng_init detail=\"{e}\"");
            return false;
        }
    };
    let mut first = [0u8; 64];
    let mut second = [0u8; 64];
    let (n1, n2) = match (
        rng.read(&mut first, 10_000_000),
        rng.read(&mut second, 10_000_000),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            report!("error=rng_read detail=\"{e}\"");
            return false;
        }
    };
    let distinct = distinct_bytes(&first[..n1]);
    let differ = first[..n1] != second[..n2];
    // The MSI follows the used-ring update from another host thread; wait for it (bounded
    // by about a second of timer ticks, so a loaded host does not make this flaky).
    wait_for_irq(RNG_VECTOR, 1, 1000);
    report!(
        "rng_bytes={n1} rng_bytes2={n2} rng_distinct={distinct} rng_reads_differ={differ} rng_irqs={} dma_used={}",
        boot::irq_count(RNG_VECTOR),
        ctx.platform.dma_used()
    );
    n1 > 0 && n2 > 0 && distinct > 1 && differ
}

fn distinct_bytes(bytes: &[u8]) -> u32 {
    let mut seen = [false; 256];
    for b in bytes {
        seen[usize::from(*b)] = true;
    }
    seen.iter().filter(|s| **s).count() as u32
}

/// Halt until `vector` has been seen `count` times, or `max_ticks` LAPIC timer ticks (about
/// 1 ms each) have passed. Returns whether the count was reached.
pub(crate) fn wait_for_irq(vector: u8, count: u64, max_ticks: u64) -> bool {
    if boot::irq_count(vector) >= count {
        return true;
    }
    let start = boot::irq_count(apic::TIMER_VECTOR);
    apic::start_periodic_timer(1_000_000);
    while boot::irq_count(vector) < count && boot::irq_count(apic::TIMER_VECTOR) - start < max_ticks
    {
        boot::idle();
    }
    apic::stop_timer();
    boot::irq_count(vector) >= count
}

fn timer_interrupts() -> bool {
    const TICKS: u64 = 10;
    // About 1 ms per tick at KVM's 1 GHz APIC bus; the count only needs to be reached.
    apic::start_periodic_timer(1_000_000);
    let before = boot::irq_count(apic::TIMER_VECTOR);
    let mut waits = 0u64;
    while boot::irq_count(apic::TIMER_VECTOR) - before < TICKS && waits < 10 * TICKS {
        boot::idle();
        waits += 1;
    }
    apic::stop_timer();
    let ticks = boot::irq_count(apic::TIMER_VECTOR) - before;
    report!("timer_irqs={ticks} idles={waits}");
    ticks >= TICKS
}

fn reboot(ctx: &Context<'_>) -> bool {
    report!("reboot=acpi");
    ctx.acpi.reset();
    crate::settle();
    report!("reboot=i8042");
    acpi::i8042_reset();
    crate::settle();
    report!("error=reboot_ignored");
    false
}
