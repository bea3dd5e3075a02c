// SPDX-License-Identifier: Apache-2.0
//! In-process virtio devices built into the VMM, and pausing them together for `vm.pause`.

pub mod ism;
pub mod virtio_rng;

use std::io;
use std::sync::{Arc, Mutex};

use virtio_device::VirtioDevice;

/// A device refused to pause.
#[derive(Debug, thiserror::Error)]
#[error("Failed to pause device {id}")]
pub struct PauseError {
    pub id: String,
    #[source]
    pub source: io::Error,
}

/// Pauses and resumes a set of virtio devices ([`VirtioDevice::pause`]): their workers write
/// nothing into guest memory in between.
#[derive(Clone, Default)]
pub struct DevicePauser {
    devices: Vec<(String, Arc<Mutex<dyn VirtioDevice>>)>,
}

impl DevicePauser {
    pub fn push(&mut self, id: &str, device: Arc<Mutex<dyn VirtioDevice>>) {
        self.devices.push((id.to_owned(), device));
    }

    /// Pause every device, in order; on a failure the ones paused already are resumed.
    pub fn pause_all(&self) -> Result<(), PauseError> {
        for (n, (id, device)) in self.devices.iter().enumerate() {
            if let Err(source) = lock(device).pause() {
                self.devices[..n]
                    .iter()
                    .for_each(|(_, device)| lock(device).resume());
                return Err(PauseError {
                    id: id.clone(),
                    source,
                });
            }
        }
        Ok(())
    }

    /// Resume every device.
    pub fn resume_all(&self) {
        self.devices
            .iter()
            .for_each(|(_, device)| lock(device).resume());
    }
}

fn lock<'a>(
    device: &'a Mutex<dyn VirtioDevice + 'static>,
) -> std::sync::MutexGuard<'a, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    use virtio_device::{ActivateError, ActivationContext};

    /// Records pauses and resumes into a shared log; refuses to pause when told to.
    struct Recorder {
        name: &'static str,
        refuse: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[]
        }
        fn activate(&mut self, _: ActivationContext) -> Result<(), ActivateError> {
            Ok(())
        }
        fn pause(&mut self) -> io::Result<()> {
            if self.refuse {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "stuck"));
            }
            self.log
                .lock()
                .unwrap()
                .push(format!("pause {}", self.name));
            Ok(())
        }
        fn resume(&mut self) {
            self.log
                .lock()
                .unwrap()
                .push(format!("resume {}", self.name));
        }
    }

    fn pauser(devices: &[(&'static str, bool)]) -> (DevicePauser, Arc<Mutex<Vec<String>>>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut pauser = DevicePauser::default();
        for &(name, refuse) in devices {
            let device = Recorder {
                name,
                refuse,
                log: log.clone(),
            };
            pauser.push(name, Arc::new(Mutex::new(device)));
        }
        (pauser, log)
    }

    #[test]
    fn test_pause_all_and_resume_all_reach_every_device() {
        let (pauser, log) = pauser(&[("rng", false), ("ism", false)]);
        pauser.pause_all().unwrap();
        pauser.resume_all();
        assert_eq!(
            *log.lock().unwrap(),
            ["pause rng", "pause ism", "resume rng", "resume ism"]
        );
    }

    #[test]
    fn test_a_refused_pause_resumes_the_devices_paused_before() {
        let (pauser, log) = pauser(&[("rng", false), ("ism", true), ("late", false)]);
        let err = pauser.pause_all().unwrap_err();
        assert_eq!(err.id, "ism");
        assert_eq!(err.source.kind(), io::ErrorKind::TimedOut);
        assert_eq!(*log.lock().unwrap(), ["pause rng", "resume rng"]);
    }
}
