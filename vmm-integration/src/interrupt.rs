// SPDX-License-Identifier: Apache-2.0
//! Interrupt plumbing between PCI devices and KVM: the GSI routing table (MSI routes plus the
//! default PIC/IOAPIC routes), irqfds and ioeventfds.
//!
//! KVM sits behind two small traits, [`MsiRouting`] and [`IoEventRegistrar`], so the PCI and
//! virtio-pci logic can be tested with a fake that records what would have been registered.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KvmIrqRouting, kvm_irq_routing_entry,
};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_allocator::IdAllocator;
use vmm_sys_util::eventfd::EventFd;

/// GSIs wired to the IOAPIC pins (0..24); 0..16 are also wired to the two PICs.
const IOAPIC_PINS: u32 = 24;
const PIC_PINS: u32 = 16;
/// KVM's limit on the number of routing entries (KVM_MAX_IRQ_ROUTES).
const MAX_ROUTES: usize = 4096;

/// One MSI message as programmed in an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
}

/// Why an interrupt resource could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("No free GSI left for MSI routes")]
    GsiExhausted,
    #[error("Failed to create the GSI allocator")]
    GsiAllocator(#[source] vm_allocator::Error),
    #[error("Too many interrupt routes: {0}")]
    TooManyRoutes(usize),
    #[error("Failed to set the GSI routing table")]
    SetRouting(#[source] io::Error),
}

/// Programs the VM's interrupt routing and irqfds.
pub trait MsiRouting: Send + Sync {
    /// Replace the VM's whole GSI routing table with `msi_routes` plus the default
    /// PIC/IOAPIC routes, which must stay or legacy interrupts (the serial port) stop working.
    fn set_msi_routes(&self, msi_routes: &[(u32, MsiMessage)]) -> io::Result<()>;
    /// Make writes to `fd` raise `gsi` in the guest without going through the VMM.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
}

/// Registers eventfds signalled by KVM when the guest writes an MMIO address (the trait the
/// virtio-ism BAR needs too).
pub use virtio_ism_window::IoEventRegistrar;

/// [`MsiRouting`] and [`IoEventRegistrar`] on a KVM VM.
pub struct KvmInterruptOps {
    vm: Arc<VmFd>,
}

impl KvmInterruptOps {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    entry.u.irqchip.irqchip = chip;
    entry.u.irqchip.pin = pin;
    entry
}

/// The routes KVM installs by default with an in-kernel irqchip (arch/x86/kvm/irq_comm.c):
/// GSI 0..16 to both PICs and the IOAPIC, 16..24 to the IOAPIC only.
fn default_irqchip_entries() -> Vec<kvm_irq_routing_entry> {
    let mut entries = Vec::new();
    for gsi in 0..IOAPIC_PINS {
        if gsi < PIC_PINS {
            let (chip, pin) = if gsi < 8 {
                (KVM_IRQCHIP_PIC_MASTER, gsi)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, gsi - 8)
            };
            entries.push(irqchip_entry(gsi, chip, pin));
        }
        entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    entries
}

fn msi_entry(gsi: u32, msg: &MsiMessage) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    entry.u.msi.address_lo = msg.addr_lo;
    entry.u.msi.address_hi = msg.addr_hi;
    entry.u.msi.data = msg.data;
    entry
}

impl MsiRouting for KvmInterruptOps {
    fn set_msi_routes(&self, msi_routes: &[(u32, MsiMessage)]) -> io::Result<()> {
        let mut entries = default_irqchip_entries();
        entries.extend(msi_routes.iter().map(|(gsi, msg)| msi_entry(*gsi, msg)));
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
        self.vm.set_gsi_routing(&routing).map_err(io::Error::from)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.register_irqfd(fd, gsi).map_err(io::Error::from)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.unregister_irqfd(fd, gsi).map_err(io::Error::from)
    }
}

impl IoEventRegistrar for KvmInterruptOps {
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(io::Error::from)
    }
}

struct RouteTable {
    gsis: IdAllocator,
    msi: BTreeMap<u32, MsiMessage>,
}

/// The VM-wide GSI routing table: hands out GSIs for MSI vectors and rewrites the whole KVM
/// table whenever one MSI route changes (KVM_SET_GSI_ROUTING has no per-entry update).
pub struct GsiRouter {
    ops: Arc<dyn MsiRouting>,
    table: Mutex<RouteTable>,
}

impl GsiRouter {
    /// GSIs from `first_gsi` up to KVM's route limit are handed out for MSI.
    pub fn new(ops: Arc<dyn MsiRouting>, first_gsi: u32) -> Result<Self, InterruptError> {
        let last = (MAX_ROUTES as u32).saturating_sub(1);
        let gsis = IdAllocator::new(first_gsi, last).map_err(InterruptError::GsiAllocator)?;
        Ok(Self {
            ops,
            table: Mutex::new(RouteTable {
                gsis,
                msi: BTreeMap::new(),
            }),
        })
    }

    pub fn ops(&self) -> &Arc<dyn MsiRouting> {
        &self.ops
    }

    pub fn allocate_gsi(&self) -> Result<u32, InterruptError> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .gsis
            .allocate_id()
            .map_err(|_| InterruptError::GsiExhausted)
    }

    /// Route `gsi` to `msg` and push the whole table to KVM.
    pub fn set_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), InterruptError> {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.msi.get(&gsi) == Some(&msg) {
            return Ok(());
        }
        let previous = table.msi.insert(gsi, msg);
        let routes: Vec<(u32, MsiMessage)> = table.msi.iter().map(|(g, m)| (*g, *m)).collect();
        let total = routes.len() + default_irqchip_entries().len();
        let result = if total > MAX_ROUTES {
            Err(InterruptError::TooManyRoutes(total))
        } else {
            self.ops
                .set_msi_routes(&routes)
                .map_err(InterruptError::SetRouting)
        };
        if result.is_err() {
            // Keep our copy equal to what KVM has.
            match previous {
                Some(old) => table.msi.insert(gsi, old),
                None => table.msi.remove(&gsi),
            };
        }
        result
    }
}

#[cfg(any(test, feature = "test-utils"))]
pub mod fake {
    //! A recording stand-in for KVM.
    use super::*;
    use std::collections::HashMap;
    use std::os::fd::AsRawFd;

    #[derive(Default)]
    pub struct FakeState {
        pub routes: Vec<(u32, MsiMessage)>,
        pub route_commits: usize,
        /// gsi -> raw fd of the registered irqfd.
        pub irqfds: HashMap<u32, i32>,
        /// addr -> raw fd of the registered ioeventfd.
        pub ioevents: HashMap<u64, i32>,
    }

    #[derive(Default)]
    pub struct FakeKvm {
        pub state: Mutex<FakeState>,
    }

    impl FakeKvm {
        /// What the fake holds now (the transport's own tests look at it).
        #[cfg_attr(not(test), allow(dead_code))]
        pub fn snapshot<R>(&self, f: impl FnOnce(&FakeState) -> R) -> R {
            f(&self.state.lock().unwrap())
        }
    }

    impl MsiRouting for FakeKvm {
        fn set_msi_routes(&self, msi_routes: &[(u32, MsiMessage)]) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            s.routes = msi_routes.to_vec();
            s.route_commits += 1;
            Ok(())
        }
        fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            if s.irqfds.insert(gsi, fd.as_raw_fd()).is_some() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            Ok(())
        }
        fn unregister_irqfd(&self, _fd: &EventFd, gsi: u32) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            s.irqfds
                .remove(&gsi)
                .map(|_| ())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }
    }

    impl IoEventRegistrar for FakeKvm {
        fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            if s.ioevents.insert(addr, fd.as_raw_fd()).is_some() {
                return Err(io::Error::from_raw_os_error(libc::EEXIST));
            }
            Ok(())
        }
        fn unregister_ioevent(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
            let mut s = self.state.lock().unwrap();
            s.ioevents
                .remove(&addr)
                .map(|_| ())
                .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_default_routes_keep_pic_and_ioapic() {
        let entries = default_irqchip_entries();
        // 16 PIC + 24 IOAPIC entries.
        assert_eq!(entries.len(), 40);
        let com1: Vec<_> = entries.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(com1.len(), 2);
        // SAFETY: irqchip entries were built with the irqchip member of the union.
        let chips: Vec<u32> = com1
            .iter()
            .map(|e| unsafe { e.u.irqchip.irqchip })
            .collect();
        assert!(chips.contains(&KVM_IRQCHIP_IOAPIC));
        assert!(chips.contains(&KVM_IRQCHIP_PIC_MASTER));
    }

    #[test]
    fn test_router_allocates_from_start_and_pushes_whole_table() {
        let fake = Arc::new(fake::FakeKvm::default());
        let router = GsiRouter::new(fake.clone(), 24).unwrap();
        let a = router.allocate_gsi().unwrap();
        let b = router.allocate_gsi().unwrap();
        assert_eq!((a, b), (24, 25));
        let m1 = MsiMessage {
            addr_lo: 0xfee0_0000,
            addr_hi: 0,
            data: 0x41,
        };
        router.set_route(a, m1).unwrap();
        router.set_route(b, m1).unwrap();
        // Unchanged route: no new commit.
        router.set_route(a, m1).unwrap();
        fake.snapshot(|s| {
            assert_eq!(s.route_commits, 2);
            assert_eq!(s.routes, vec![(24, m1), (25, m1)]);
        });
    }

    #[test]
    fn test_kvm_routing_irqfd_and_ioeventfd() {
        if !crate::test_guest::kvm_available_for("KVM interrupt routing not tested") {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = Arc::new(kvm.create_vm().unwrap());
        vm.create_irq_chip().unwrap();
        let ops = Arc::new(KvmInterruptOps::new(vm));
        let router = GsiRouter::new(ops.clone(), crate::layout::MSI_GSI_START).unwrap();
        let gsi = router.allocate_gsi().unwrap();
        router
            .set_route(
                gsi,
                MsiMessage {
                    addr_lo: 0xfee0_0000,
                    addr_hi: 0,
                    data: 0x30,
                },
            )
            .unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        ops.register_irqfd(&irq, gsi).unwrap();
        // The legacy serial GSI still works next to the MSI routes.
        let serial = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        ops.register_irqfd(&serial, crate::layout::COM1_IRQ)
            .unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let addr = crate::layout::MMIO32_START + 0x3000;
        ops.register_ioevent(&notify, addr).unwrap();
        ops.unregister_ioevent(&notify, addr).unwrap();
        ops.unregister_irqfd(&irq, gsi).unwrap();
        ops.unregister_irqfd(&serial, crate::layout::COM1_IRQ)
            .unwrap();
    }
}
