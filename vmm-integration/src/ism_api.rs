// SPDX-License-Identifier: Apache-2.0
//! The REST API's view of the `--ism` devices (`virtio_ism_api::HandleControl` each), and
//! [`EventForwarder`], which reports what the guest does to regions on the event monitor.

use std::sync::Arc;

use virtio_ism::{IsmEvent, IsmHandle, IsmObserver};
use virtio_ism_api::{HandleControl, IsmEntry};

use crate::config::IsmDeviceConfig;

/// Reports a device's region changes on the event monitor (source "ism"), with the device's
/// id. Runs on the device's worker thread; reporting only queues the line.
pub struct EventForwarder {
    id: String,
}

impl IsmObserver for EventForwarder {
    fn observe(&self, event: &IsmEvent) {
        let (name, properties) = event.monitor_event();
        let mut props = std::collections::BTreeMap::new();
        props.insert("id".into(), self.id.clone().into());
        for (key, value) in properties {
            props.insert(key.into(), value.into());
        }
        crate::event_monitor::report("ism", name, Some(props));
    }
}

/// API entries for the handles `add_ism_devices` returned, with their configs' pools.
pub fn ism_entries(
    handles: Vec<(String, IsmHandle)>,
    configs: &[IsmDeviceConfig],
) -> Vec<IsmEntry> {
    handles
        .into_iter()
        .enumerate()
        .map(|(i, (id, handle))| {
            let broker = configs.get(i).and_then(|c| c.pool.clone());
            handle.set_observer(Some(Arc::new(EventForwarder { id: id.clone() })));
            IsmEntry {
                id,
                control: Arc::new(HandleControl { handle, broker }),
            }
        })
        .collect()
}
