// SPDX-License-Identifier: Apache-2.0
//! Wiring and exit handling: config -> VM (KVM VM, memory, vCPUs) -> devices -> buses, then
//! wait for the first exit event and tear down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{Killable, SIGRTMIN, create_sigset, register_signal_handler};

use crate::acpi::{AcpiError, AcpiInputs, create_acpi_tables};
use crate::api::http::ApiListener;
use crate::boot::{self, BootEntry, BootError, BootInputs};
use crate::bus::{BusError, IoBuses};
use crate::config::api::OperatorConfig;
use crate::config::{SerialMode, VmConfig};
use crate::control::{self, VmmApi};
use crate::devices::DevicePauser;
use crate::devices::ism::kvm_slots::KvmSlotBackend;
use crate::devices::ism::{IsmSetupError, add_ism_devices};
use crate::devices::virtio_rng::{RngError, VirtioRng};
use crate::exit::{ExitEvent, ExitNotifier};
use crate::interrupt::KvmInterruptOps;
use crate::layout;
use crate::legacy::cmos::Cmos;
use crate::legacy::power::{AcpiPowerPort, I8042ResetPort, ResetRequested};
use crate::legacy::serial::{self, EventFdTrigger, SerialDevice};
use crate::memory::{self, MemoryError, MemorySlots};
use crate::pci::{PciError, PciManager};
use crate::terminal::RawTerminal;
use crate::virtio_pci::{DeviceManager, Lifecycle};
use crate::vstate::pause::{self, PauseError, PauseState};
use crate::vstate::pvm;
use crate::vstate::vcpu::{ExitCounters, Vcpu, VcpuError, VcpuShared};
use crate::vstate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("Failed to set up the KVM VM")]
    Vm(#[source] VmError),
    #[error("Failed to set up guest memory")]
    Memory(#[source] MemoryError),
    #[error("Failed to create the ACPI tables")]
    Acpi(#[source] AcpiError),
    #[error("Failed to load the guest payload")]
    Boot(#[source] BootError),
    #[error("Failed to read the CPUID KVM supports")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("Failed to set up a vCPU")]
    Vcpu(#[source] VcpuError),
    #[error("Failed to spawn thread {0}")]
    SpawnThread(String, #[source] std::io::Error),
    #[error("Failed to block the stop signals")]
    BlockSignal(#[source] vmm_sys_util::errno::Error),
    #[error("Failed to register the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("Failed to create the serial interrupt eventfd")]
    SerialEventFd(#[source] std::io::Error),
    #[error("Failed to register the serial irqfd on GSI {0}")]
    SerialIrqfd(u32, #[source] kvm_ioctls::Error),
    #[error("Failed to open the serial output file {0}")]
    SerialFile(std::path::PathBuf, #[source] std::io::Error),
    #[error("Failed to put the terminal in raw mode")]
    RawTerminal(#[source] std::io::Error),
    #[error("Failed to place device {0} on the I/O bus")]
    Bus(&'static str, #[source] BusError),
    #[error("Failed to set up PCI")]
    Pci(#[source] PciError),
    #[error("Failed to create the virtio-rng device")]
    Rng(#[source] RngError),
    #[error("Failed to set up virtio-ism")]
    Ism(#[source] IsmSetupError),
    #[error("Failed to serve the REST API")]
    Api(#[source] crate::api::http::HttpError),
}

/// vCPU threads are kicked out of KVM_RUN with this real-time signal at teardown.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // KVM_RUN returns EINTR (now, or at once if the thread was about to enter it); the stop
    // and pause flags tell the thread why.
    pause::on_kick_signal();
}

/// How long `vm.pause` waits for every vCPU to leave KVM_RUN.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A running VM: the pieces teardown needs.
struct RunningVm {
    vcpu_threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    pause: Arc<PauseState>,
    counters: Arc<ExitCounters>,
    _raw_terminal: Option<RawTerminal>,
}

/// Build the VM from `config`, run it until it stops, tear it down. Returns why it stopped.
#[cfg_attr(not(test), allow(dead_code))]
pub fn run(config: &VmConfig) -> Result<ExitEvent, VmmError> {
    run_with(config, &OperatorConfig::default())
}

/// As [`run`], with the operator options: the REST API is served while the VM runs.
pub fn run_with(config: &VmConfig, operator: &OperatorConfig) -> Result<ExitEvent, VmmError> {
    let (exit, exit_rx) = ExitNotifier::new();
    let pvm_policy = pvm::policy_enabled(config.platform.pvm);
    if pvm_policy {
        log::info!("PVM policy on: instruction fallback and Linux kernel parameters");
    }
    crate::event!("vm", "booting");
    // Bound before the VM is built, so a busy socket path fails before the guest runs.
    let api_listener = operator
        .api_socket
        .as_ref()
        .map(|a| ApiListener::bind(&a.endpoint))
        .transpose()
        .map_err(VmmError::Api)?;

    // Before any thread exists, so every thread inherits the mask and only the
    // "signal-handler" thread receives these.
    spawn_signal_handler(ExitNotifier::clone(&exit))?;
    // Virtio activation and reset run here, not on the vCPU that wrote the status; the
    // device workers start from this thread and stack their filters on its filter.
    let device_manager = DeviceManager::new();
    let lifecycle = device_manager.lifecycle();
    let device_thread = device_manager
        .spawn(|| crate::seccomp::apply_or_exit(crate::seccomp::Thread::DeviceManager))
        .map_err(|e| VmmError::SpawnThread("device-manager".into(), e))?;
    // Guest RAM before the VM: the VM registers it before creating its irqchip, and advises it
    // to huge pages before anything touches it (vstate/vm.rs).
    let mem = memory::create_guest_memory(&config.memory).map_err(VmmError::Memory)?;
    let vm = Vm::new(&mem).map_err(VmmError::Vm)?;
    // KVM slots past guest RAM, for devices that map memory into the guest (virtio-ism).
    let memory_slots = Arc::new(MemorySlots::new(
        vm.first_free_slot(),
        u32::try_from(vm.kvm().get_nr_memslots()).unwrap_or(0),
    ));
    let guest_memory = GuestMemoryAtomic::new(mem.clone());

    let buses = Arc::new(IoBuses::new());
    let reset = ResetRequested::default();

    add_platform_devices(&buses, &exit, &reset)?;
    let serial = add_serial_device(&vm, &buses, &config.serial.mode)?;
    let (pci, ism_handles) =
        add_pci_devices(&vm, &guest_memory, &buses, &memory_slots, config, lifecycle)?;

    let ram_end = memory::ram_end(config.memory.size);
    let rsdp_addr = create_acpi_tables(
        &mem,
        &AcpiInputs {
            vcpus: config.cpus.boot_vcpus,
            mmio64_start: layout::mmio64_start(ram_end),
        },
    )
    .map_err(VmmError::Acpi)?;
    let entry = boot::load_payload(
        &mem,
        &BootInputs {
            payload: &config.payload,
            ram_size: config.memory.size,
            rsdp_addr,
            linux_extra_cmdline: pvm_policy.then_some(pvm::LINUX_CMDLINE_PARAMS),
        },
    )
    .map_err(VmmError::Boot)?;
    log::info!("Guest entry: {entry:x?}");

    let raw_terminal = match (&config.serial.mode, &serial) {
        (SerialMode::Tty, Some(dev)) => {
            let raw = RawTerminal::stdin().map_err(VmmError::RawTerminal)?;
            serial::spawn_stdin_reader(dev.clone())
                .map_err(|e| VmmError::SpawnThread("serial-input".into(), e))?;
            raw
        }
        _ => None,
    };

    // Observers are set before any vCPU runs, so no guest-driven ism event is missed.
    let ism = crate::ism_api::ism_entries(ism_handles, &config.ism);
    let running = start_vcpus(&vm, &mem, &entry, config, &buses, &exit, &reset, pvm_policy)?;
    let running = RunningVm {
        _raw_terminal: raw_terminal,
        ..running
    };

    crate::event!("vm", "booted");
    let vcpus = VcpuPauser {
        pause: running.pause.clone(),
        devices: pci.device_pauser(),
        // Ids stay valid until the JoinHandles are joined in teardown, after the API loop.
        threads: running
            .vcpu_threads
            .iter()
            .map(std::os::unix::thread::JoinHandleExt::as_pthread_t)
            .collect(),
    };
    let mut api = VmmApi::new(config, &pci, running.counters.clone(), ism).with_vcpus(&vcpus);
    let waited = control::wait_for_exit(exit_rx, api_listener, &mut api);
    teardown(running);
    // After the vCPUs: none is left waiting on a job that would not run.
    device_thread.stop();
    let event = waited.map_err(VmmError::Api)?;
    match &event {
        ExitEvent::Reboot(_) => crate::event!("vm", "rebooting"),
        _ => crate::event!("vm", "shutdown"),
    }
    // Devices go first (their workers stop), then guest memory, which nothing touches now.
    drop(pci);
    drop(guest_memory);
    Ok(event)
}

/// Signals that stop the VMM cleanly (vCPUs stopped, terminal restored).
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Block the stop signals in this thread (and so in every thread spawned after) and turn
/// them into an exit event from a thread named "signal-handler".
fn spawn_signal_handler(exit: ExitNotifier) -> Result<(), VmmError> {
    let set = create_sigset(&STOP_SIGNALS).map_err(VmmError::BlockSignal)?;
    // SAFETY: `set` is a valid sigset; blocking signals already blocked is a no-op.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(VmmError::BlockSignal(vmm_sys_util::errno::Error::new(ret)));
    }
    std::thread::Builder::new()
        .name("signal-handler".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            crate::seccomp::apply_or_exit(crate::seccomp::Thread::SignalHandler);
            // SAFETY: `set` is a valid, initialised sigset and `sig` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                exit.notify(ExitEvent::Error(format!("Stopped by signal {sig}")));
            }
        })
        .map(drop)
        .map_err(|e| VmmError::SpawnThread("signal-handler".into(), e))
}

fn add_platform_devices(
    buses: &IoBuses,
    exit: &ExitNotifier,
    reset: &ResetRequested,
) -> Result<(), VmmError> {
    let acpi = AcpiPowerPort::new(exit.clone(), reset.clone());
    buses
        .register_pio(layout::ACPI_SLEEP_PORT, 1, Arc::new(Mutex::new(acpi)))
        .map_err(|e| VmmError::Bus("acpi-power", e))?;
    let i8042 = I8042ResetPort::new(exit.clone(), reset.clone());
    buses
        .register_pio(layout::I8042_PORT, 1, Arc::new(Mutex::new(i8042)))
        .map_err(|e| VmmError::Bus("i8042", e))?;
    buses
        .register_pio(layout::CMOS_PORT, 2, Arc::new(Mutex::new(Cmos::default())))
        .map_err(|e| VmmError::Bus("cmos", e))
}

type ComSerial = Arc<Mutex<SerialDevice<EventFdTrigger>>>;

fn add_serial_device(
    vm: &Vm,
    buses: &IoBuses,
    mode: &SerialMode,
) -> Result<Option<ComSerial>, VmmError> {
    let out = match mode {
        SerialMode::Off => return Ok(None),
        SerialMode::Null => serial::null_output(),
        SerialMode::Tty => serial::stdout_output(),
        SerialMode::File(path) => {
            serial::file_output(path).map_err(|e| VmmError::SerialFile(path.clone(), e))?
        }
    };
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::SerialEventFd)?;
    vm.fd()
        .register_irqfd(&evt, layout::COM1_IRQ)
        .map_err(|e| VmmError::SerialIrqfd(layout::COM1_IRQ, e))?;
    let dev = Arc::new(Mutex::new(SerialDevice::new(EventFdTrigger::new(evt), out)));
    buses
        .register_pio(layout::COM1_PORT, 8, dev.clone())
        .map_err(|e| VmmError::Bus("serial", e))?;
    Ok(Some(dev))
}

/// The PCI root complex and the virtio devices on it. The host bridge is always there (as in
/// cloud-hypervisor); each virtio option adds a device.
fn add_pci_devices(
    vm: &Vm,
    mem: &GuestMemoryAtomic<GuestMemoryMmap>,
    buses: &Arc<IoBuses>,
    memory_slots: &Arc<MemorySlots>,
    config: &VmConfig,
    lifecycle: Lifecycle,
) -> Result<(PciManager, Vec<(String, virtio_ism::IsmHandle)>), VmmError> {
    let ram_end = memory::ram_end(config.memory.size);
    let mut pci = PciManager::new(
        vm.fd().clone(),
        mem.clone(),
        buses.clone(),
        layout::mmio64_start(ram_end),
    )
    .map_err(VmmError::Pci)?
    .with_lifecycle(lifecycle);
    if let Some(rng) = &config.rng {
        let id = rng.id.clone().unwrap_or_else(|| "_rng0".to_owned());
        let dev = VirtioRng::new(&rng.src).map_err(VmmError::Rng)?;
        let info = pci
            .add_virtio_device(&id, Arc::new(Mutex::new(dev)))
            .map_err(VmmError::Pci)?;
        log::info!(
            "virtio-rng {} at {} (source {})",
            info.id,
            info.bdf,
            rng.src.display()
        );
    }
    let mut ism_handles = Vec::new();
    if !config.ism.is_empty() {
        let kvm_slots = Arc::new(KvmSlotBackend::new(
            vm.kvm(),
            vm.fd().clone(),
            memory_slots.clone(),
        ));
        let ioevents = Arc::new(KvmInterruptOps::new(vm.fd().clone()));
        ism_handles = add_ism_devices(&mut pci, &config.ism, kvm_slots, ioevents, buses)
            .map_err(VmmError::Ism)?;
    }
    Ok((pci, ism_handles))
}

#[allow(clippy::too_many_arguments)]
fn start_vcpus(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    entry: &BootEntry,
    config: &VmConfig,
    buses: &Arc<IoBuses>,
    exit: &ExitNotifier,
    reset: &ResetRequested,
    pvm_policy: bool,
) -> Result<RunningVm, VmmError> {
    register_signal_handler(kick_signal(), handle_kick).map_err(VmmError::SignalHandler)?;
    let supported = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmmError::SupportedCpuid)?;
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(ExitCounters::default());
    let pause = Arc::new(PauseState::default());
    let shared = VcpuShared {
        pause: pause.clone(),
        buses: buses.clone(),
        exit: exit.clone(),
        reset: reset.clone(),
        stop: stop.clone(),
        counters: counters.clone(),
        pvm_policy,
    };
    let vcpus_count = config.cpus.boot_vcpus;
    let mut vcpus = Vec::with_capacity(usize::from(vcpus_count));
    for id in 0..vcpus_count {
        let vcpu = Vcpu::new(vm.fd(), id, shared.clone()).map_err(VmmError::Vcpu)?;
        let boot = (id == 0).then_some((mem, entry));
        vcpu.configure(&supported, vcpus_count, boot)
            .map_err(VmmError::Vcpu)?;
        vcpus.push(vcpu);
    }
    let mut vcpu_threads = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let name = format!("vcpu{}", vcpu.id());
        let handle = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::Thread::Vcpu);
                vcpu.run()
            })
            .map_err(|e| VmmError::SpawnThread(name, e))?;
        vcpu_threads.push(handle);
    }
    Ok(RunningVm {
        vcpu_threads,
        stop,
        pause,
        counters,
        _raw_terminal: None,
    })
}

/// `vm.pause`/`vm.resume` over the vCPU threads: the kick signal plus immediate_exit gets
/// each one out of KVM_RUN, and it parks until resumed. Then the virtio devices: their
/// workers park too (the ism devices are paused again by the ism API's `pause_all`, which
/// changes nothing), so nothing is written into the paused guest's memory.
struct VcpuPauser {
    pause: Arc<PauseState>,
    threads: Vec<libc::pthread_t>,
    devices: DevicePauser,
}

impl control::VcpuControl for VcpuPauser {
    fn pause(&self) -> Result<(), PauseError> {
        self.pause.pause(self.threads.len(), PAUSE_TIMEOUT, || {
            for thread in &self.threads {
                // SAFETY: every id belongs to a vCPU thread whose JoinHandle is held (not
                // joined) until teardown, which runs after the API loop; signalling a
                // thread that has ended but not been joined is allowed (ESRCH at worst).
                unsafe { libc::pthread_kill(*thread, kick_signal()) };
            }
        })?;
        if let Err(e) = self.devices.pause_all() {
            self.pause.resume();
            return Err(PauseError::Device(e));
        }
        Ok(())
    }

    fn resume(&self) {
        self.devices.resume_all();
        self.pause.resume();
    }
}

/// Stop every vCPU: set the flag, kick each thread out of KVM_RUN until it has left.
fn teardown(running: RunningVm) {
    running.stop.store(true, Ordering::Release);
    // Parked (paused) vCPUs wake up, see the stop flag and leave.
    running.pause.wake_all();
    let deadline = Instant::now() + Duration::from_secs(2);
    for handle in running.vcpu_threads {
        // The vCPU that reported the exit is usually returning already: look again soon
        // (a fixed 5 ms sleep here was 5 ms of every run), backing off to 5 ms.
        let mut pause = Duration::from_micros(50);
        while !handle.is_finished() && Instant::now() < deadline {
            let _ = handle.kill(kick_signal());
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
        if handle.is_finished() {
            let _ = handle.join();
        } else {
            log::warn!("A vCPU thread did not stop in time; exiting anyway");
        }
    }
    let c = &running.counters;
    log::info!(
        "Unhandled exits: pio reads {}, pio writes {}, mmio reads {}, mmio writes {}; PVM completed instructions {}",
        c.unhandled_pio_reads.load(Ordering::Relaxed),
        c.unhandled_pio_writes.load(Ordering::Relaxed),
        c.unhandled_mmio_reads.load(Ordering::Relaxed),
        c.unhandled_mmio_writes.load(Ordering::Relaxed),
        c.pvm_completed_insns.load(Ordering::Relaxed),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PvmMode, VmParams};
    use crate::test_guest::*;

    fn config_for(kernel: &std::path::Path, serial: &std::path::Path) -> VmConfig {
        VmConfig::parse(VmParams {
            kernel: Some(kernel.to_str().unwrap().to_owned()),
            memory: Some("size=32M".into()),
            serial: Some(format!("file={}", serial.display())),
            ..Default::default()
        })
        .unwrap()
    }

    fn boot(code: Vec<u8>) -> (Result<ExitEvent, VmmError>, String) {
        boot_with(code, PvmMode::Auto)
    }

    fn boot_with(code: Vec<u8>, pvm: PvmMode) -> (Result<ExitEvent, VmmError>, String) {
        boot_config(code, |c| c.platform.pvm = pvm)
    }

    fn boot_config(
        code: Vec<u8>,
        edit: impl FnOnce(&mut VmConfig),
    ) -> (Result<ExitEvent, VmmError>, String) {
        let kernel = write_temp(&pvh_elf(&code));
        let serial = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let mut config = config_for(kernel.as_path(), serial.as_path());
        edit(&mut config);
        let result = run(&config);
        let output = std::fs::read_to_string(serial.as_path()).unwrap();
        (result, output)
    }

    #[test]
    fn test_pvh_guest_prints_on_serial_and_powers_off_with_acpi_s5() {
        if !kvm_available() {
            return;
        }
        let mut code = print_code(b"OK\n");
        code.extend(out_code(layout::ACPI_SLEEP_PORT, (5 << 2) | (1 << 5)));
        code.extend(halt_code());
        let (result, output) = boot(code);
        assert_eq!(result.unwrap(), ExitEvent::Shutdown("ACPI S5"));
        assert_eq!(output, "OK\n");
    }

    #[test]
    fn test_guest_reset_requests_end_with_reboot() {
        if !kvm_available() {
            return;
        }
        let mut code = out_code(layout::I8042_PORT, 0xfe);
        code.extend(halt_code());
        let (result, _) = boot(code);
        assert_eq!(result.unwrap(), ExitEvent::Reboot("i8042 reset"));
        let mut code = out_code(layout::ACPI_SLEEP_PORT, layout::ACPI_RESET_VALUE);
        code.extend(halt_code());
        let (result, _) = boot(code);
        assert_eq!(result.unwrap(), ExitEvent::Reboot("ACPI reset register"));
    }

    #[test]
    fn test_int3_reaches_the_guests_breakpoint_handler() {
        if !kvm_available() {
            return;
        }
        // On PVM the emulator may give up on int3; the policy then injects #BP itself.
        let (result, output) = boot(int3_code());
        assert_eq!(result.unwrap(), ExitEvent::Shutdown("ACPI S5"));
        assert_eq!(output, "BP\n");
    }

    #[test]
    fn test_without_pvm_policy_an_emulation_failure_reports_rip_and_bytes() {
        if !kvm_available() {
            return;
        }
        if !pvm::policy_enabled(PvmMode::Auto) {
            println!("SKIPPED: not a PVM host, int3 runs natively");
            return;
        }
        let (result, _) = boot_with(int3_code(), PvmMode::Off);
        match result.unwrap() {
            ExitEvent::Error(msg) => {
                assert!(msg.contains("internal error"), "{msg}");
                assert!(msg.contains("instruction bytes [cc "), "{msg}");
                assert!(msg.contains("RIP 0x10000c"), "{msg}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn test_guest_sees_virtio_rng_in_pci_config_space_only_with_rng() {
        if !kvm_available() {
            return;
        }
        // Red Hat vendor id, modern virtio-rng device id (0x1040 + 4), slot 1 after the host
        // bridge.
        let rng_id = 0x1044_1af4;
        let with_rng = |c: &mut VmConfig| {
            c.rng = Some(crate::config::RngConfig {
                src: "/dev/urandom".into(),
                id: None,
            })
        };
        let (result, output) = boot_config(pci_probe_code(1, rng_id), with_rng);
        assert_eq!(result.unwrap(), ExitEvent::Shutdown("ACPI S5"));
        assert_eq!(output, "MATCH\n");
        let (result, output) = boot_config(pci_probe_code(1, rng_id), |_| {});
        assert_eq!(result.unwrap(), ExitEvent::Shutdown("ACPI S5"));
        assert_eq!(output, "NO\n");
        // An empty slot reads as all-ones.
        let (_, output) = boot_config(pci_probe_code(9, 0xffff_ffff), |_| {});
        assert_eq!(output, "MATCH\n");
    }

    #[test]
    fn test_triple_fault_is_reported_as_an_error_with_rip() {
        if !kvm_available() {
            return;
        }
        // ud2 with an empty IDT: #UD -> #GP -> #DF -> triple fault.
        let (result, _) = boot(vec![0x0f, 0x0b]);
        match result.unwrap() {
            ExitEvent::Error(msg) => assert!(msg.contains("RIP"), "{msg}"),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn test_missing_or_corrupt_kernel_is_a_clear_error() {
        if !kvm_available() {
            return;
        }
        let serial = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let missing = std::path::Path::new("/nonexistent/vmlinux");
        let err = run(&config_for(missing, serial.as_path())).unwrap_err();
        assert!(
            matches!(err, VmmError::Boot(BootError::OpenKernel(..))),
            "{err:?}"
        );

        let garbage = write_temp(&[0x5a; 4096]);
        let err = run(&config_for(garbage.as_path(), serial.as_path())).unwrap_err();
        assert!(
            matches!(err, VmmError::Boot(BootError::LoadKernel(..))),
            "{err:?}"
        );

        // An ELF without the PVH note.
        let mut elf = pvh_elf(&halt_code());
        elf[0x200 + 8] = 0x99;
        let no_note = write_temp(&elf);
        let err = run(&config_for(no_note.as_path(), serial.as_path())).unwrap_err();
        assert!(
            matches!(err, VmmError::Boot(BootError::NoPvhEntry(..))),
            "{err:?}"
        );
    }
}
