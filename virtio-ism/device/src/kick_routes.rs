// SPDX-License-Identifier: Apache-2.0
//! Where a region's doorbell kicks go: wiring its notify slot (trap, zero-hop or one-hop),
//! the epoll set over one-hop eventfds, and ringing peers' doorbells through [`DoorbellRinger`].

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use log::{debug, warn};
use virtio_ism_pool_api::Token;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::config::WindowLayout;
use crate::doorbell::DoorbellRinger;
use crate::metrics::IsmMetrics;
use crate::notify::{NotifyWiring, WireOutcome};
use crate::regions::Region;

/// Where a guest write to a region's notify slot goes (see `notify.rs`).
#[derive(Debug, Default)]
pub enum Route {
    /// An MMIO exit to the VMM, which calls `IsmHandle::handle_notify`.
    #[default]
    Trap,
    /// A KVM ioeventfd on the slot signals the only peer's doorbell directly.
    ZeroHop,
    /// A KVM ioeventfd on the slot signals this eventfd; the worker rings every doorbell.
    OneHop(EventFd),
}

/// How the notify slots of one device are wired, and the one-hop eventfds it watches.
pub struct KickRoutes {
    layout: WindowLayout,
    metrics: Arc<IsmMetrics>,
    /// How notify slots are bound to eventfds in the kernel; without one every kick traps.
    wiring: Option<Arc<dyn NotifyWiring>>,
    /// Watches the one-hop eventfds; epoll data is the region token.
    kick_epoll: Epoll,
    /// Writes peers' doorbells without ever blocking on them.
    ringer: DoorbellRinger,
}

impl KickRoutes {
    pub fn new(
        layout: WindowLayout,
        metrics: Arc<IsmMetrics>,
        kick_epoll: Epoll,
        ringer: DoorbellRinger,
    ) -> Self {
        Self {
            layout,
            metrics,
            wiring: None,
            kick_epoll,
            ringer,
        }
    }

    /// Bind notify slots through `wiring` from now on. The caller unroutes every region
    /// before and reroutes them after.
    pub fn set_wiring(&mut self, wiring: Option<Arc<dyn NotifyWiring>>) {
        self.wiring = wiring;
    }

    /// The epoll instance watching one-hop eventfds (for the worker's loop).
    pub fn kick_epoll_fd(&self) -> RawFd {
        self.kick_epoll.as_raw_fd()
    }

    /// Window offset of the notify slot drivers ring for `region` (its first chunk's).
    fn notify_slot(&self, region: &Region) -> Option<u64> {
        region
            .extents
            .first()
            .map(|e| self.layout.notify_offset + e.first * self.layout.notify_size)
    }

    /// Undo the wiring of `region`'s notify slot: writes trap again.
    pub fn unroute(&self, region: &mut Region) {
        let route = std::mem::take(&mut region.route);
        if matches!(route, Route::Trap) {
            return;
        }
        let token = region.token;
        let slot = self.notify_slot(region);
        if let (Some(wiring), Some(slot)) = (&self.wiring, slot)
            && let Err(e) = wiring.unwire(slot, self.layout.notify_size)
        {
            warn!("virtio-ism: unwiring the notify slot of {token} failed: {e}");
        }
        match route {
            Route::ZeroHop => IsmMetrics::sub(&self.metrics.kick_routes_zero_hop, 1),
            Route::OneHop(evt) => {
                IsmMetrics::sub(&self.metrics.kick_routes_one_hop, 1);
                let _ = self.kick_epoll.ctl(
                    ControlOperation::Delete,
                    evt.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            Route::Trap => {}
        }
    }

    /// Wire `region`'s notify slot for the doorbells it has now: straight to the only peer's
    /// doorbell, else to a one-hop eventfd the worker fans out, else (no peer, or the VMM
    /// out of resources) leave it trapping. A route slower than wanted counts a fallback.
    pub fn reroute(&self, region: &mut Region) {
        self.unroute(region);
        let Some(wiring) = &self.wiring else {
            return;
        };
        let Some(slot) = self.notify_slot(region) else {
            return;
        };
        let token = region.token;
        let len = self.layout.notify_size;
        let route = match region.doorbells.as_slice() {
            [] => return,
            [(_, doorbell)] => match wiring.wire(slot, len, doorbell.as_fd()) {
                Ok(WireOutcome::Wired) => Some(Route::ZeroHop),
                outcome => {
                    log_refusal(token, "zero-hop", outcome);
                    self.one_hop(&**wiring, token, slot)
                }
            },
            _ => self.one_hop(&**wiring, token, slot),
        };
        match route {
            Some(Route::ZeroHop) => IsmMetrics::inc(&self.metrics.kick_routes_zero_hop),
            Some(Route::OneHop(_)) => IsmMetrics::inc(&self.metrics.kick_routes_one_hop),
            _ => {}
        }
        let wanted_zero_hop = region.doorbells.len() == 1;
        if !matches!(route, Some(Route::ZeroHop)) && (wanted_zero_hop || route.is_none()) {
            IsmMetrics::inc(&self.metrics.kick_fallbacks);
        }
        if let Some(route) = route {
            region.route = route;
        }
    }

    /// Wire the slot to a fresh eventfd the worker watches; None if anything refuses.
    fn one_hop(&self, wiring: &dyn NotifyWiring, token: Token, slot: u64) -> Option<Route> {
        let evt = match EventFd::new(EFD_NONBLOCK) {
            Ok(evt) => evt,
            Err(e) => {
                warn!("virtio-ism: no eventfd for the kicks of {token}: {e}");
                return None;
            }
        };
        let fd = evt.as_raw_fd();
        if let Err(e) = self.kick_epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, token.0),
        ) {
            warn!("virtio-ism: watching the kicks of {token} failed: {e}");
            return None;
        }
        match wiring.wire(slot, self.layout.notify_size, borrow_eventfd(&evt)) {
            Ok(WireOutcome::Wired) => Some(Route::OneHop(evt)),
            outcome => {
                log_refusal(token, "one-hop", outcome);
                let _ = self
                    .kick_epoll
                    .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                None
            }
        }
    }

    /// Write every peer doorbell of `region`; returns how many were rung.
    pub fn ring(&self, region: &Region) -> usize {
        let doorbells: Vec<BorrowedFd<'_>> = region
            .doorbells
            .iter()
            .map(|(_, doorbell)| doorbell.as_fd())
            .collect();
        let rung = self.ringer.ring(&doorbells);
        IsmMetrics::add(&self.metrics.doorbell_writes, rung as u64);
        rung
    }

    /// Serve the one-hop eventfds that fired: ring the doorbells of their regions (looked up
    /// in `regions`). Returns how many regions were kicked.
    pub fn serve_one_hop_kicks(&self, regions: &BTreeMap<Token, Region>) -> usize {
        let mut events = [EpollEvent::default(); 16];
        let mut kicked = 0;
        loop {
            let ready = match self.kick_epoll.wait(0, &mut events) {
                Ok(ready) => ready,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("virtio-ism: waiting on kick eventfds failed: {e}");
                    return kicked;
                }
            };
            for event in &events[..ready] {
                let token = Token(event.data());
                let Some(region) = regions.get(&token) else {
                    continue;
                };
                let Route::OneHop(evt) = &region.route else {
                    continue;
                };
                // Nothing to read means another pass already served it.
                if evt.read().is_ok() {
                    IsmMetrics::inc(&self.metrics.kicks_one_hop);
                    self.ring(region);
                    kicked += 1;
                }
            }
            if ready < events.len() {
                return kicked;
            }
        }
    }
}

/// vmm-sys-util's EventFd does not implement AsFd.
pub fn borrow_eventfd(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `evt` and stays open while the borrow (tied to
    // `evt`'s lifetime) lives.
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}

fn log_refusal(token: Token, route: &str, outcome: std::io::Result<WireOutcome>) {
    match outcome {
        Ok(WireOutcome::Wired) => {}
        Ok(WireOutcome::NoResources) => {
            debug!("virtio-ism: no resources for a {route} kick route of {token}")
        }
        Err(e) => warn!("virtio-ism: wiring a {route} kick route of {token} failed: {e}"),
    }
}
