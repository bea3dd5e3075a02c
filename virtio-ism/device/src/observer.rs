// SPDX-License-Identifier: Apache-2.0
//! What the device tells its embedder about regions: after each control command that
//! succeeded (the guest allocated, attached, detached or granted a region) and for what the
//! pool reported (a region revoked, a peer attached or gone). The VMM turns these into
//! event-monitor lines; the device knows nothing of that.

use std::sync::{Arc, RwLock};

use virtio_ism_pool_api::{DevId, Perms, PoolEvent, Token};

/// One thing that happened to a region this device holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsmEvent {
    /// The guest allocated a region (ALLOC_REGION); `size` is what the pool allocated.
    RegionAllocated { token: Token, size: u64 },
    /// The guest attached an existing region (ATTACH_REGION).
    RegionAttached {
        token: Token,
        size: u64,
        writable: bool,
    },
    /// The guest detached a region (DETACH_REGION).
    RegionDetached { token: Token },
    /// The guest set a grant (GRANT_SET_DEFAULT: `peer` None; GRANT_SET_FOR_DEVICE).
    RegionGranted {
        token: Token,
        peer: Option<DevId>,
        perms: Perms,
    },
    /// The pool took the region away from this device (operator removal).
    RegionRevoked { token: Token },
    /// Another device attached a region this device holds.
    PeerAttached { token: Token, peer: DevId },
    /// Another device detached a region this device holds, or its VMM went away (the pool
    /// reports both alike).
    PeerGone { token: Token, peer: DevId },
}

impl IsmEvent {
    /// The event a pool report means, if any (doorbell and grant refreshes are internal).
    pub fn from_pool(event: &PoolEvent) -> Option<Self> {
        match *event {
            PoolEvent::Revoked { token } => Some(IsmEvent::RegionRevoked { token }),
            PoolEvent::PeerAttached { token, peer } => Some(IsmEvent::PeerAttached { token, peer }),
            PoolEvent::PeerDetached { token, peer } => Some(IsmEvent::PeerGone { token, peer }),
            PoolEvent::Updated { .. } | PoolEvent::DoorbellsChanged { .. } => None,
        }
    }

    /// The event as an event monitor reports it (source "ism"): its name and its properties,
    /// numbers in decimal as the API's JSON prints them, permissions as letters
    /// ([`perms_text`]), and who caused it ("origin": the guest, or the pool). Every VMM
    /// reports ism events with exactly these.
    pub fn monitor_event(&self) -> (&'static str, Vec<(&'static str, String)>) {
        let token = |t: Token| ("token", t.0.to_string());
        let guest = ("origin", "guest".to_owned());
        match *self {
            IsmEvent::RegionAllocated { token: t, size } => (
                "region-allocated",
                vec![token(t), ("size", size.to_string()), guest],
            ),
            IsmEvent::RegionAttached {
                token: t,
                size,
                writable,
            } => (
                "region-attached",
                vec![
                    token(t),
                    ("size", size.to_string()),
                    ("perm", if writable { "RW" } else { "R" }.to_owned()),
                    guest,
                ],
            ),
            IsmEvent::RegionDetached { token: t } => ("region-detached", vec![token(t), guest]),
            IsmEvent::RegionGranted {
                token: t,
                peer,
                perms,
            } => (
                "region-granted",
                vec![
                    token(t),
                    (
                        "peer",
                        peer.map_or_else(|| "default".to_owned(), |p| p.0.to_string()),
                    ),
                    ("perm", perms_text(perms.0)),
                    guest,
                ],
            ),
            IsmEvent::RegionRevoked { token: t } => (
                "region-revoked",
                vec![token(t), ("origin", "pool".to_owned())],
            ),
            IsmEvent::PeerAttached { token: t, peer } => (
                "peer-attached",
                vec![token(t), ("peer", peer.0.to_string())],
            ),
            IsmEvent::PeerGone { token: t, peer } => {
                ("peer-gone", vec![token(t), ("peer", peer.0.to_string())])
            }
        }
    }
}

/// Permission bits as letters, as `ism-pool status` prints them: R(ead) W(rite) A(ttach)
/// M(anage) C(lear default); "-" for none.
pub fn perms_text(bits: u64) -> String {
    let names = [(1, 'R'), (2, 'W'), (4, 'A'), (8, 'M'), (16, 'C')];
    let text: String = names
        .iter()
        .filter(|(bit, _)| bits & bit != 0)
        .map(|(_, name)| *name)
        .collect();
    if text.is_empty() { "-".into() } else { text }
}

/// Implemented by the embedder; called on the device's worker thread, so it must be quick
/// (queue the event, do not block on I/O).
pub trait IsmObserver: Send + Sync {
    fn observe(&self, event: &IsmEvent);
}

/// The observer a device, its handle and its worker share; set any time, read per event.
#[derive(Default)]
pub(crate) struct ObserverSlot(RwLock<Option<Arc<dyn IsmObserver>>>);

impl ObserverSlot {
    pub(crate) fn set(&self, observer: Option<Arc<dyn IsmObserver>>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = observer;
    }

    pub(crate) fn notify(&self, event: &IsmEvent) {
        let observer = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(observer) = observer {
            observer.observe(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<IsmEvent>>);

    impl IsmObserver for Recorder {
        fn observe(&self, event: &IsmEvent) {
            self.0.lock().unwrap().push(*event);
        }
    }

    #[test]
    fn test_pool_reports_map_to_events_and_reach_the_observer() {
        let (token, peer) = (Token(7), DevId(3));
        let slot = ObserverSlot::default();
        // Without an observer nothing happens.
        slot.notify(&IsmEvent::RegionDetached { token });
        let recorder = Arc::new(Recorder::default());
        slot.set(Some(recorder.clone()));
        for report in [
            PoolEvent::PeerAttached { token, peer },
            PoolEvent::Updated { token },
            PoolEvent::DoorbellsChanged { token },
            PoolEvent::PeerDetached { token, peer },
            PoolEvent::Revoked { token },
        ] {
            if let Some(event) = IsmEvent::from_pool(&report) {
                slot.notify(&event);
            }
        }
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [
                IsmEvent::PeerAttached { token, peer },
                IsmEvent::PeerGone { token, peer },
                IsmEvent::RegionRevoked { token },
            ]
        );
        slot.set(None);
        slot.notify(&IsmEvent::RegionDetached { token });
        assert_eq!(recorder.0.lock().unwrap().len(), 3);
    }
}
