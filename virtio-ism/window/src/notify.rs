// SPDX-License-Identifier: Apache-2.0
//! [`NotifyWiring`] on ioeventfds: a notify slot of the virtio-ism window becomes a KVM
//! ioeventfd at `bar_base + offset`, so a guest doorbell write signals the eventfd (a peer
//! VM's irqfd, or the device's own one-hop eventfd) inside the host kernel. Unwired slots trap
//! to [`crate::IsmBar::write`], which hands the write to `IsmHandle::handle_notify`.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd};
use std::sync::{Arc, Mutex};

use log::{debug, warn};
use virtio_ism::{NotifyWiring, WireOutcome};
use vmm_sys_util::eventfd::EventFd;

/// Registers eventfds the hypervisor signals when the guest writes an MMIO address.
pub trait IoEventRegistrar: Send + Sync {
    /// Signal `fd` on any write of any length to `addr`.
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64) -> io::Result<()>;
}

#[derive(Default)]
struct State {
    /// Guest-physical base of the window; `None` until the BAR is placed.
    base: Option<u64>,
    /// By window offset: the address registered and our duplicate of the eventfd.
    wired: BTreeMap<u64, (u64, EventFd)>,
}

/// [`NotifyWiring`] through an [`IoEventRegistrar`] (see the module doc).
pub struct IoEventWiring {
    ioevents: Arc<dyn IoEventRegistrar>,
    state: Mutex<State>,
}

impl IoEventWiring {
    pub fn new(ioevents: Arc<dyn IoEventRegistrar>) -> Self {
        Self {
            ioevents,
            state: Mutex::new(State::default()),
        }
    }

    /// The window is now at `base`. Registrations already made stay where they are until
    /// the device unwires them (`IsmHandle::rewire_all`).
    pub fn set_base(&self, base: u64) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).base = Some(base);
    }

    /// Slots wired now, as (window offset, guest address).
    pub fn wired(&self) -> Vec<(u64, u64)> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.wired.iter().map(|(o, (a, _))| (*o, *a)).collect()
    }
}

/// KVM refuses more ioeventfds on a bus than it has room for with ENOSPC; that is a limit,
/// not a failure: the device falls back to the trap route.
fn is_resource_limit(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::ENOMEM | libc::E2BIG)
    )
}

impl NotifyWiring for IoEventWiring {
    fn wire(
        &self,
        window_offset: u64,
        _len: u64,
        eventfd: BorrowedFd<'_>,
    ) -> io::Result<WireOutcome> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.wired.contains_key(&window_offset) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "Notify slot is already wired",
            ));
        }
        let Some(base) = state.base else {
            // No BAR yet: nothing to register against; writes trap once it exists.
            return Ok(WireOutcome::NoResources);
        };
        let addr = base + window_offset;
        let owned = eventfd.try_clone_to_owned()?;
        // SAFETY: `owned` is a fresh duplicate we own; EventFd takes it over and closes it.
        let evt = unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) };
        match self.ioevents.register_ioevent(&evt, addr) {
            Ok(()) => {
                debug!("ism notify: slot {window_offset:#x} wired at {addr:#x}");
                state.wired.insert(window_offset, (addr, evt));
                Ok(WireOutcome::Wired)
            }
            Err(e) if is_resource_limit(&e) => {
                warn!("ism notify: KVM has no room for an ioeventfd at {addr:#x} ({e}); trapping");
                Ok(WireOutcome::NoResources)
            }
            Err(e) => Err(e),
        }
    }

    fn unwire(&self, window_offset: u64, _len: u64) -> io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (addr, evt) = state
            .wired
            .remove(&window_offset)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "Notify slot is not wired"))?;
        self.ioevents.unregister_ioevent(&evt, addr)
    }
}

impl Drop for IoEventWiring {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, (addr, evt)) in std::mem::take(&mut state.wired) {
            let _ = self.ioevents.unregister_ioevent(&evt, addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Records registrations like KVM, refusing past `capacity` with ENOSPC.
    struct FakeIoEvents {
        capacity: usize,
        registered: Mutex<Vec<u64>>,
    }

    impl IoEventRegistrar for FakeIoEvents {
        fn register_ioevent(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
            let mut r = self.registered.lock().unwrap();
            if r.len() >= self.capacity {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            assert!(!r.contains(&addr), "{addr:#x} registered twice");
            r.push(addr);
            Ok(())
        }
        fn unregister_ioevent(&self, _fd: &EventFd, addr: u64) -> io::Result<()> {
            let mut r = self.registered.lock().unwrap();
            let pos = r.iter().position(|a| *a == addr).expect("not registered");
            r.remove(pos);
            Ok(())
        }
    }

    #[test]
    fn test_wire_registers_at_bar_address_and_follows_moves() {
        let fake = Arc::new(FakeIoEvents {
            capacity: 2,
            registered: Mutex::new(Vec::new()),
        });
        let wiring = IoEventWiring::new(fake.clone());
        let evt = EventFd::new(0).unwrap();
        // SAFETY: `evt` stays open for the whole test.
        let evt = unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) };
        // Before the BAR exists nothing can be registered.
        assert_eq!(
            wiring.wire(0x100, 4, evt).unwrap(),
            WireOutcome::NoResources
        );
        wiring.set_base(0x1_0000_0000);
        assert_eq!(wiring.wire(0x100, 4, evt).unwrap(), WireOutcome::Wired);
        assert!(wiring.wire(0x100, 4, evt).is_err());
        assert_eq!(wiring.wire(0x104, 4, evt).unwrap(), WireOutcome::Wired);
        // KVM full: the device is told to fall back, nothing is recorded.
        assert_eq!(
            wiring.wire(0x108, 4, evt).unwrap(),
            WireOutcome::NoResources
        );
        assert_eq!(
            *fake.registered.lock().unwrap(),
            vec![0x1_0000_0100, 0x1_0000_0104]
        );
        // A move: unwire removes the old address, wire adds the new one.
        wiring.set_base(0x2_0000_0000);
        wiring.unwire(0x100, 4).unwrap();
        wiring.wire(0x100, 4, evt).unwrap();
        assert_eq!(
            wiring.wired(),
            vec![(0x100, 0x2_0000_0100), (0x104, 0x1_0000_0104)]
        );
        assert!(wiring.unwire(0x108, 4).is_err());
        drop(wiring);
        assert!(fake.registered.lock().unwrap().is_empty());
    }
}
