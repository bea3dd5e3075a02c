// SPDX-License-Identifier: Apache-2.0
//! MSI-X: the vector table and pending-bit array a function exposes in a BAR, backed by one
//! GSI and one KVM irqfd per vector.
//!
//! A vector is "live" when MSI-X is enabled, the function is not masked and the entry is not
//! masked. Its irqfd is registered with KVM only while it is live, so while it is live a
//! signal on the irqfd (also from outside the VMM, see [`MsixState::irqfd`]) reaches the guest
//! with no VMM thread on the path. Triggers that go through [`MsixState::trigger`] while masked
//! set the pending bit instead and are sent on unmask.
//!
//! A signal written straight to a masked vector's irqfd waits in the eventfd counter, where the
//! guest cannot see it. The pending bit only matters when the guest reads the PBA, so a PBA read
//! first drains the counters of the masked vectors it covers into their pending bits (lazy, no
//! thread). On unmask a pending vector gets one write to its irqfd *before* the irqfd is
//! registered: KVM injects once for whatever the counter holds at registration (a latched bit
//! plus any signal that arrived since the PBA read coalesce into one message), and a signal
//! after registration is an ordinary live interrupt. So no kick is lost and a latched one is
//! sent exactly once.

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::{GsiRouter, InterruptError, MsiMessage};

/// Bytes per table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// The PCI limit on vectors per function.
pub const MAX_MSIX_VECTORS: u16 = 2048;
const ENTRY_CTRL_MASKED: u32 = 1;
/// Message control bits in the MSI-X capability.
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
pub const MSIX_CTRL_FUNCTION_MASK: u16 = 1 << 14;

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("MSI-X vector count {0} is not in 1..=2048")]
    VectorCount(u16),
    #[error("Failed to allocate a GSI for an MSI-X vector")]
    AllocateGsi(#[source] InterruptError),
    #[error("Failed to create an irqfd")]
    CreateIrqfd(#[source] io::Error),
}

struct MsixVector {
    msg: MsiMessage,
    ctrl: u32,
    gsi: u32,
    irqfd: EventFd,
    irqfd_registered: bool,
}

pub struct MsixState {
    vectors: Vec<MsixVector>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    router: Arc<GsiRouter>,
}

impl MsixState {
    pub fn new(count: u16, router: Arc<GsiRouter>) -> Result<Self, MsixError> {
        if count == 0 || count > MAX_MSIX_VECTORS {
            return Err(MsixError::VectorCount(count));
        }
        let mut vectors = Vec::with_capacity(count.into());
        for _ in 0..count {
            vectors.push(MsixVector {
                msg: MsiMessage::default(),
                // Entries come out of reset masked (PCI spec 6.8.2.9).
                ctrl: ENTRY_CTRL_MASKED,
                gsi: router.allocate_gsi().map_err(MsixError::AllocateGsi)?,
                irqfd: EventFd::new(libc::EFD_NONBLOCK).map_err(MsixError::CreateIrqfd)?,
                irqfd_registered: false,
            });
        }
        Ok(Self {
            vectors,
            pba: vec![0; usize::from(count).div_ceil(64)],
            enabled: false,
            function_masked: false,
            router,
        })
    }

    /// Table size in bytes.
    pub fn table_len(&self) -> u64 {
        self.vectors.len() as u64 * MSIX_ENTRY_SIZE
    }

    pub fn pba_len(&self) -> u64 {
        self.pba.len() as u64 * 8
    }

    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pba
            .get(v / 64)
            .is_some_and(|word| word & (1 << (v % 64)) != 0)
    }

    fn set_pending(&mut self, v: usize, pending: bool) {
        if let Some(word) = self.pba.get_mut(v / 64) {
            if pending {
                *word |= 1 << (v % 64);
            } else {
                *word &= !(1 << (v % 64));
            }
        }
    }

    fn live(&self, v: usize) -> bool {
        self.enabled
            && !self.function_masked
            && self
                .vectors
                .get(v)
                .is_some_and(|e| e.ctrl & ENTRY_CTRL_MASKED == 0)
    }

    /// Bring vector `v`'s KVM wiring in line with its mask state; deliver a pending message
    /// once it is live.
    fn refresh(&mut self, v: usize) {
        let live = self.live(v);
        let Some(entry) = self.vectors.get_mut(v) else {
            return;
        };
        if live && !entry.irqfd_registered {
            if let Err(e) = self.router.set_route(entry.gsi, entry.msg) {
                log::warn!("MSI-X vector {v}: failed to route GSI {}: {e}", entry.gsi);
                return;
            }
            // Queue the pending message in the counter before registering: KVM injects once
            // for a readable irqfd at registration, folding in any signal that is already
            // there. If registration fails the signal stays in the counter, and the next PBA
            // read latches it again.
            if self.is_pending(v as u16) {
                self.set_pending(v, false);
                if let Err(e) = self.vectors[v].irqfd.write(1) {
                    log::warn!("MSI-X vector {v}: failed to send pending message: {e}");
                }
            }
            let entry = &mut self.vectors[v];
            if let Err(e) = self.router.ops().register_irqfd(&entry.irqfd, entry.gsi) {
                log::warn!("MSI-X vector {v}: failed to register irqfd: {e}");
                return;
            }
            entry.irqfd_registered = true;
        } else if !live && entry.irqfd_registered {
            if let Err(e) = self.router.ops().unregister_irqfd(&entry.irqfd, entry.gsi) {
                log::warn!("MSI-X vector {v}: failed to unregister irqfd: {e}");
            }
            entry.irqfd_registered = false;
        }
    }

    fn refresh_all(&mut self) {
        for v in 0..self.vectors.len() {
            self.refresh(v);
        }
    }

    /// The guest wrote the capability's message control register.
    pub fn set_control(&mut self, ctrl: u16) {
        let enabled = ctrl & MSIX_CTRL_ENABLE != 0;
        let masked = ctrl & MSIX_CTRL_FUNCTION_MASK != 0;
        if enabled != self.enabled || masked != self.function_masked {
            self.enabled = enabled;
            self.function_masked = masked;
            self.refresh_all();
        }
    }

    /// Table read at byte `offset` of the table; 4 or 8-byte aligned accesses only.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len) {
            return;
        }
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let Some(field_off) = offset.checked_add(i as u64 * 4) else {
                return;
            };
            if let Some(v) = self.read_field(field_off) {
                chunk.copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    fn read_field(&self, offset: u64) -> Option<u32> {
        let entry = self
            .vectors
            .get(usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?)?;
        Some(match offset % MSIX_ENTRY_SIZE {
            0 => entry.msg.addr_lo,
            4 => entry.msg.addr_hi,
            8 => entry.msg.data,
            _ => entry.ctrl,
        })
    }

    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len) {
            return;
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            let Some(field_off) = offset.checked_add(i as u64 * 4) else {
                return;
            };
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            self.write_field(field_off, value);
        }
    }

    fn write_field(&mut self, offset: u64, value: u32) {
        let Ok(v) = usize::try_from(offset / MSIX_ENTRY_SIZE) else {
            return;
        };
        let live = self.live(v);
        let Some(entry) = self.vectors.get_mut(v) else {
            return;
        };
        match offset % MSIX_ENTRY_SIZE {
            0 => entry.msg.addr_lo = value,
            4 => entry.msg.addr_hi = value,
            8 => entry.msg.data = value,
            _ => {
                entry.ctrl = (entry.ctrl & !ENTRY_CTRL_MASKED) | (value & ENTRY_CTRL_MASKED);
                self.refresh(v);
                return;
            }
        }
        // Changing a live entry's message is allowed; software normally masks first.
        if live && let Err(e) = self.router.set_route(entry.gsi, entry.msg) {
            log::warn!("MSI-X vector {v}: failed to update route: {e}");
        }
    }

    /// Pending-bit array read; read-only to the guest. Signals waiting on the irqfds of the
    /// masked vectors this word covers become pending bits first.
    pub fn read_pba(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let len = data.len() as u64;
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len) {
            return;
        }
        let Some(index) = usize::try_from(offset / 8)
            .ok()
            .filter(|&i| i < self.pba.len())
        else {
            return;
        };
        self.latch_masked_signals(index * 64..(index + 1) * 64);
        let word = &self.pba[index];
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// Move signals waiting in the counters of the unregistered irqfds among `range` into
    /// their pending bits. With MSI-X disabled nothing can be pending, so the counters are
    /// left alone and KVM delivers them once the vector goes live.
    fn latch_masked_signals(&mut self, range: std::ops::Range<usize>) {
        if !self.enabled {
            return;
        }
        for v in range {
            let Some(entry) = self.vectors.get(v) else {
                return;
            };
            if entry.irqfd_registered {
                // KVM owns the counter; reading it would steal a live interrupt.
                continue;
            }
            match entry.irqfd.read() {
                Ok(_) => self.set_pending(v, true),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => log::warn!("MSI-X vector {v}: failed to read masked irqfd: {e}"),
            }
        }
    }

    /// Send vector `vector`'s message, or latch it as pending while masked. Out-of-range
    /// vectors and a disabled MSI-X capability drop the interrupt (there is no INTx).
    pub fn trigger(&mut self, vector: u16) -> io::Result<()> {
        let v = usize::from(vector);
        if v >= self.vectors.len() || !self.enabled {
            return Ok(());
        }
        if self.live(v) && self.vectors[v].irqfd_registered {
            self.vectors[v].irqfd.write(1)
        } else {
            self.set_pending(v, true);
            Ok(())
        }
    }

    /// A clone of vector `vector`'s irqfd: writing it raises the vector from any thread or
    /// process with no VMM involvement.
    pub fn irqfd(&self, vector: u16) -> Option<EventFd> {
        self.vectors
            .get(usize::from(vector))?
            .irqfd
            .try_clone()
            .ok()
    }

    /// Drop all pending messages (virtio device reset: nothing is outstanding any more),
    /// including signals waiting on masked vectors' irqfds.
    pub fn clear_pending(&mut self) {
        self.pba.fill(0);
        for e in &self.vectors {
            if !e.irqfd_registered {
                // A read error only means the counter was already empty.
                let _ = e.irqfd.read();
            }
        }
    }

    #[cfg(test)]
    pub fn gsi(&self, vector: u16) -> u32 {
        self.vectors[usize::from(vector)].gsi
    }
}

impl Drop for MsixState {
    fn drop(&mut self) {
        for e in &self.vectors {
            if e.irqfd_registered {
                let _ = self.router.ops().unregister_irqfd(&e.irqfd, e.gsi);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::fake::FakeKvm;

    fn setup(count: u16) -> (Arc<FakeKvm>, MsixState) {
        let fake = Arc::new(FakeKvm::default());
        let router = Arc::new(GsiRouter::new(fake.clone(), 24).unwrap());
        (fake, MsixState::new(count, router).unwrap())
    }

    fn program(msix: &mut MsixState, v: u64, data: u32) {
        msix.write_table(v * 16, &0xfee0_0000u32.to_le_bytes());
        msix.write_table(v * 16 + 4, &0u32.to_le_bytes());
        msix.write_table(v * 16 + 8, &data.to_le_bytes());
    }

    #[test]
    fn test_table_write_read_and_unmask_routes() {
        let (fake, mut msix) = setup(3);
        program(&mut msix, 1, 0x4041);
        let mut out = [0u8; 8];
        msix.read_table(16, &mut out);
        assert_eq!(out, [0, 0, 0xe0, 0xfe, 0, 0, 0, 0]);
        let mut ctrl = [0u8; 4];
        msix.read_table(16 + 12, &mut ctrl);
        assert_eq!(u32::from_le_bytes(ctrl), 1, "entries start masked");
        msix.set_control(MSIX_CTRL_ENABLE);
        fake.snapshot(|s| assert!(s.irqfds.is_empty()));
        msix.write_table(16 + 12, &0u32.to_le_bytes());
        let gsi = msix.gsi(1);
        fake.snapshot(|s| {
            assert!(s.irqfds.contains_key(&gsi));
            assert_eq!(s.routes.len(), 1);
            assert_eq!(s.routes[0].0, gsi);
            assert_eq!(s.routes[0].1.data, 0x4041);
        });
        // Reprogramming a live vector updates the route.
        msix.write_table(16 + 8, &0x4042u32.to_le_bytes());
        fake.snapshot(|s| assert_eq!(s.routes[0].1.data, 0x4042));
        // Out-of-range and odd-sized accesses are ignored without panicking.
        msix.write_table(u64::MAX - 3, &[1, 2, 3, 4]);
        msix.write_table(3 * 16, &[1, 2, 3, 4]);
        msix.write_table(2, &[1, 2]);
        msix.read_table(u64::MAX - 7, &mut out);
        assert_eq!(out, [0; 8]);
    }

    #[test]
    fn test_masked_trigger_sets_pending_and_unmask_delivers() {
        let (fake, mut msix) = setup(70);
        program(&mut msix, 65, 0x30);
        msix.set_control(MSIX_CTRL_ENABLE);
        msix.trigger(65).unwrap();
        assert!(msix.is_pending(65));
        let mut pba = [0u8; 8];
        msix.read_pba(8, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 1 << 1);
        let irqfd = msix.irqfd(65).unwrap();
        assert!(irqfd.read().is_err(), "nothing sent while masked");
        msix.write_table(65 * 16 + 12, &0u32.to_le_bytes());
        assert!(!msix.is_pending(65));
        assert_eq!(irqfd.read().unwrap(), 1);
        // Live: trigger goes straight to the irqfd.
        msix.trigger(65).unwrap();
        assert_eq!(irqfd.read().unwrap(), 1);
        // Function mask unregisters the irqfd and latches again.
        msix.set_control(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
        fake.snapshot(|s| assert!(s.irqfds.is_empty()));
        msix.trigger(65).unwrap();
        assert!(msix.is_pending(65));
        msix.set_control(MSIX_CTRL_ENABLE);
        assert_eq!(irqfd.read().unwrap(), 1);
        // Disabled MSI-X and bogus vectors drop the interrupt.
        msix.set_control(0);
        msix.trigger(65).unwrap();
        msix.trigger(u16::MAX).unwrap();
        assert!(!msix.is_pending(65));
        assert!(msix.irqfd(70).is_none());
    }

    fn read_pba_word(msix: &mut MsixState, word: u64) -> u64 {
        let mut pba = [0u8; 8];
        msix.read_pba(word * 8, &mut pba);
        u64::from_le_bytes(pba)
    }

    #[test]
    fn test_signal_on_masked_irqfd_sets_pending_and_unmask_delivers_once() {
        let (fake, mut msix) = setup(70);
        program(&mut msix, 66, 0x31);
        msix.set_control(MSIX_CTRL_ENABLE);
        // A peer holds a clone of the irqfd and writes it directly, bypassing trigger().
        let notifier = msix.irqfd(66).unwrap();
        let observer = msix.irqfd(66).unwrap();
        notifier.write(1).unwrap();
        assert_eq!(read_pba_word(&mut msix, 1), 1 << 2);
        // Reading the other PBA word leaves this vector's counter alone.
        assert_eq!(read_pba_word(&mut msix, 0), 0);
        assert_eq!(read_pba_word(&mut msix, 1), 1 << 2, "the bit stays set");
        let gsi = msix.gsi(66);
        msix.write_table(66 * 16 + 12, &0u32.to_le_bytes());
        fake.snapshot(|s| assert!(s.irqfds.contains_key(&gsi)));
        assert_eq!(read_pba_word(&mut msix, 1), 0, "unmask clears the bit");
        assert_eq!(observer.read().unwrap(), 1, "unmask sends the message once");
        assert!(observer.read().is_err(), "and only once");

        // Function mask: a signal after the PBA read and before unmask is folded into the
        // same single message, not lost and not doubled.
        msix.set_control(MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK);
        fake.snapshot(|s| assert!(s.irqfds.is_empty()));
        notifier.write(1).unwrap();
        assert_eq!(read_pba_word(&mut msix, 1), 1 << 2);
        notifier.write(1).unwrap();
        msix.set_control(MSIX_CTRL_ENABLE);
        assert_eq!(read_pba_word(&mut msix, 1), 0);
        assert_eq!(
            observer.read().unwrap(),
            2,
            "one wakeup carries both signals"
        );
        assert!(observer.read().is_err());

        // While live, a PBA read must not touch the counter KVM owns.
        notifier.write(1).unwrap();
        assert_eq!(read_pba_word(&mut msix, 1), 0);
        assert_eq!(observer.read().unwrap(), 1);

        // Reset drops a signal waiting on a masked vector.
        msix.write_table(66 * 16 + 12, &1u32.to_le_bytes());
        notifier.write(1).unwrap();
        msix.clear_pending();
        assert_eq!(read_pba_word(&mut msix, 1), 0);
        msix.write_table(66 * 16 + 12, &0u32.to_le_bytes());
        assert!(observer.read().is_err(), "nothing left to send after reset");
    }

    #[test]
    fn test_vector_count_bounds() {
        let fake = Arc::new(FakeKvm::default());
        let router = Arc::new(GsiRouter::new(fake, 24).unwrap());
        assert!(MsixState::new(0, router.clone()).is_err());
        assert!(MsixState::new(2049, router).is_err());
    }
}
