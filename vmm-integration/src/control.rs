// SPDX-License-Identifier: Apache-2.0
//! The main thread's loop once the VM runs: wait for the exit event while serving REST API
//! requests, and the [`RequestHandler`] that answers them from the VMM's state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, channel};

use serde_json::json;

use crate::api::http::{ApiListener, ApiServer, HttpError};
use crate::api::types::{
    DeviceInfo, IsmAddRegionRequest, IsmRemoveRegionRequest, VmCounters, VmInfoResponse,
    VmmPingResponse,
};
use crate::api::{ApiError, ApiRequest, ApiResult, ApiSender, RequestHandler};
use crate::config::{SerialMode, VmConfig};
use crate::exit::ExitEvent;
use crate::pci::PciManager;
use crate::vstate::pause::PauseError;
use crate::vstate::vcpu::ExitCounters;
use virtio_ism_api::{IsmDevices, IsmEntry};

/// Pausing and resuming the vCPUs. Implemented by the VMM over its vCPU threads.
pub trait VcpuControl {
    /// Get every vCPU out of KVM_RUN and keep it parked; returns once all are.
    fn pause(&self) -> Result<(), PauseError>;
    /// Let the parked vCPUs run again.
    fn resume(&self);
}

/// Names of what this VMM build can do, for `vmm.ping`.
const FEATURES: &[&str] = &["virtio-rng", "virtio-ism", "event-monitor", "pause"];

/// The VMM's side of the API: read-only views of the running VM plus the exit it may ask
/// for.
pub struct VmmApi<'a> {
    pub config: &'a VmConfig,
    pub pci: &'a dyn DeviceView,
    pub exit_counters: Arc<ExitCounters>,
    pub ism: IsmDevices,
    /// The vCPUs, for vm.pause / vm.resume (None: pausing is not available).
    pub vcpus: Option<&'a dyn VcpuControl>,
    pub paused: bool,
    /// Set by vm.shutdown / vm.reboot; the loop ends with it.
    pub requested_exit: Option<ExitEvent>,
}

/// The devices of the VM, as `vm.info` and `vm.counters` list them.
pub trait DeviceView {
    /// (id, bdf) of every PCI device.
    fn devices(&self) -> Vec<(String, String)>;
    fn counters(&self) -> Vec<(String, virtio_device::Counters)>;
}

impl DeviceView for PciManager {
    fn devices(&self) -> Vec<(String, String)> {
        self.device_infos()
            .iter()
            .map(|i| (i.id.clone(), i.bdf.clone()))
            .collect()
    }
    fn counters(&self) -> Vec<(String, virtio_device::Counters)> {
        PciManager::counters(self)
    }
}

impl<'a> VmmApi<'a> {
    pub fn new(
        config: &'a VmConfig,
        pci: &'a dyn DeviceView,
        exit_counters: Arc<ExitCounters>,
        ism: Vec<IsmEntry>,
    ) -> Self {
        Self {
            config,
            pci,
            exit_counters,
            ism: IsmDevices(ism),
            vcpus: None,
            paused: false,
            requested_exit: None,
        }
    }

    /// Serve vm.pause / vm.resume with `vcpus`.
    pub fn with_vcpus(mut self, vcpus: &'a dyn VcpuControl) -> Self {
        self.vcpus = Some(vcpus);
        self
    }
}

fn config_json(c: &VmConfig) -> serde_json::Value {
    let serial = match &c.serial.mode {
        SerialMode::Off => "off".to_owned(),
        SerialMode::Null => "null".to_owned(),
        SerialMode::Tty => "tty".to_owned(),
        SerialMode::File(p) => format!("file={}", p.display()),
    };
    json!({
        "cpus": {"boot_vcpus": c.cpus.boot_vcpus, "max_vcpus": c.cpus.max_vcpus},
        "memory": {"size": c.memory.size, "shared": c.memory.shared, "hugepages": c.memory.hugepages},
        "payload": {
            "kernel": c.payload.kernel.display().to_string(),
            "initramfs": c.payload.initramfs.as_ref().map(|p| p.display().to_string()),
            "cmdline": c.payload.cmdline,
        },
        "serial": serial,
        "rng": c.rng.as_ref().map(|r| json!({"src": r.src.display().to_string(), "id": r.id})),
        "platform": {"pvm": format!("{:?}", c.platform.pvm).to_lowercase()},
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> ApiResult {
    serde_json::to_value(value)
        .map(Some)
        .map_err(ApiError::Serialise)
}

impl RequestHandler for VmmApi<'_> {
    fn vmm_ping(&mut self) -> ApiResult {
        to_json(&VmmPingResponse {
            build_version: env!("CARGO_PKG_VERSION").to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: i64::from(std::process::id()),
            features: FEATURES.iter().map(|f| (*f).to_owned()).collect(),
        })
    }

    fn vm_info(&mut self) -> ApiResult {
        let devices = self
            .pci
            .devices()
            .into_iter()
            .map(|(id, bdf)| DeviceInfo {
                ism_regions: self.ism.regions_of(&id),
                id,
                bdf,
            })
            .collect();
        to_json(&VmInfoResponse {
            config: config_json(self.config),
            state: if self.paused { "Paused" } else { "Running" }.to_owned(),
            memory_actual_size: self.config.memory.size,
            devices,
        })
    }

    fn vm_counters(&mut self) -> ApiResult {
        let mut out = VmCounters::new();
        for (id, counters) in self.pci.counters() {
            let entry: BTreeMap<String, u64> = counters
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.0))
                .collect();
            out.insert(id, entry);
        }
        let c = &self.exit_counters;
        let vcpus = [
            ("unhandled_pio_reads", &c.unhandled_pio_reads),
            ("unhandled_pio_writes", &c.unhandled_pio_writes),
            ("unhandled_mmio_reads", &c.unhandled_mmio_reads),
            ("unhandled_mmio_writes", &c.unhandled_mmio_writes),
            ("pvm_completed_insns", &c.pvm_completed_insns),
        ];
        out.insert(
            "__vcpus".to_owned(),
            vcpus
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.load(Ordering::Relaxed)))
                .collect(),
        );
        to_json(&out)
    }

    fn vm_shutdown(&mut self) -> ApiResult {
        self.requested_exit = Some(ExitEvent::Shutdown("API vm.shutdown"));
        Ok(None)
    }

    fn vm_reboot(&mut self) -> ApiResult {
        // As with a guest-requested reset, this VMM ends with the reboot status.
        self.requested_exit = Some(ExitEvent::Reboot("API vm.reboot"));
        Ok(None)
    }

    fn vm_pause(&mut self) -> ApiResult {
        if self.paused {
            return Err(ApiError::AlreadyPaused);
        }
        let vcpus = self.vcpus.ok_or(ApiError::NoVcpus)?;
        crate::event!("vm", "pausing");
        vcpus.pause().map_err(ApiError::PauseVcpus)?;
        // Then the device workers: nothing more is written into the guest's memory.
        if let Err(e) = self.ism.pause_all() {
            vcpus.resume();
            return Err(e.into());
        }
        self.paused = true;
        crate::event!("vm", "paused");
        Ok(None)
    }

    fn vm_resume(&mut self) -> ApiResult {
        let Some(vcpus) = self.vcpus.filter(|_| self.paused) else {
            return Err(ApiError::NotPaused);
        };
        crate::event!("vm", "resuming");
        self.ism.resume_all();
        vcpus.resume();
        self.paused = false;
        crate::event!("vm", "resumed");
        Ok(None)
    }

    fn ism_add_region(&mut self, req: IsmAddRegionRequest) -> ApiResult {
        to_json(&self.ism.add_region(req, &report_ism_event)?)
    }

    fn ism_remove_region(&mut self, req: IsmRemoveRegionRequest) -> ApiResult {
        self.ism.remove_region(req, &report_ism_event)?;
        Ok(None)
    }

    fn ism_regions(&mut self) -> ApiResult {
        to_json(&self.ism.regions())
    }

    fn ism_pool_status(&mut self) -> ApiResult {
        Ok(Some(self.ism.pool_status()?))
    }
}

/// What the API did to a region, on the event monitor.
fn report_ism_event(event: &'static str, properties: Vec<(&'static str, String)>) {
    let props = properties
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
    crate::event_monitor::report("ism", event, Some(props));
}

/// What wakes the main thread.
enum Control {
    Exit(ExitEvent),
    Api(ApiRequest),
}

/// Wait for the VM to stop. With `api_socket`, serve the REST API meanwhile: requests and
/// exit events arrive on one channel (a forwarding thread moves exit events onto it), and
/// each request is answered here, on the thread that owns the VM.
pub fn wait_for_exit(
    exit_rx: Receiver<ExitEvent>,
    api_socket: Option<ApiListener>,
    handler: &mut VmmApi<'_>,
) -> Result<ExitEvent, HttpError> {
    let Some(listener) = api_socket else {
        crate::seccomp::apply_or_exit(crate::seccomp::Thread::Main);
        // Every sender lives in a vCPU or device, so recv only fails if all of them are
        // gone, which means every vCPU thread ended without reporting.
        return Ok(exit_rx
            .recv()
            .unwrap_or_else(|_| ExitEvent::Error("All vCPUs stopped without a reason".into())));
    };
    let (tx, rx) = channel::<Control>();
    let exit_tx = tx.clone();
    std::thread::Builder::new()
        .name("exit-forward".into())
        .spawn(move || {
            crate::seccomp::apply_or_exit(crate::seccomp::Thread::ExitForward);
            while let Ok(e) = exit_rx.recv() {
                if exit_tx.send(Control::Exit(e)).is_err() {
                    break;
                }
            }
        })
        .map_err(HttpError::Spawn)?;
    let api_tx = std::sync::Mutex::new(tx);
    let sender = ApiSender::new(move |req| {
        api_tx
            .lock()
            .map(|tx| tx.send(Control::Api(req)).is_ok())
            .unwrap_or(false)
    });
    let server = ApiServer::start(listener, sender)?;
    // Every thread of the main thread's is running; from here it only serves and tears down.
    crate::seccomp::apply_or_exit(crate::seccomp::Thread::Main);
    let event = loop {
        match rx.recv() {
            Ok(Control::Exit(e)) => break e,
            Ok(Control::Api(req)) => {
                req.serve(handler);
                if let Some(e) = handler.requested_exit.take() {
                    break e;
                }
            }
            Err(_) => break ExitEvent::Error("All vCPUs stopped without a reason".into()),
        }
    };
    // Requests still queued fail (their reply channel drops) before the server thread is
    // joined, so it never waits on an answer that cannot come.
    drop(rx);
    drop(server);
    Ok(event)
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Mutex;
    use std::sync::mpsc::Sender;

    use super::*;
    use crate::api::http::simple_request;
    use crate::api::types::{GrantPerm, IsmGrant, IsmRegionInfo, RegionAccess, RegionArea};
    use crate::config::VmParams;
    use crate::config::api::Endpoint;
    use virtio_ism_api::{ControlError, IsmControl, PoolRefusal};

    /// A pool with regions 1 and 2; the device starts holding none. With `pool_down`, its
    /// broker is gone: the pool's status cannot be had.
    #[derive(Default)]
    struct FakeIsm {
        held: Mutex<Vec<u64>>,
        pool_down: bool,
    }

    impl IsmControl for FakeIsm {
        fn add_region(&self, token: u64, _: RegionAccess) -> Result<Vec<RegionArea>, ControlError> {
            if token != 1 && token != 2 {
                return Err(ControlError::Pool {
                    reason: PoolRefusal::Invalid,
                    source: format!("no region {token} in the pool").into(),
                });
            }
            self.held.lock().unwrap().push(token);
            Ok(vec![RegionArea {
                offset: token << 20,
                size: 1 << 20,
            }])
        }
        fn remove_region(&self, token: u64) -> bool {
            let mut held = self.held.lock().unwrap();
            let before = held.len();
            held.retain(|t| *t != token);
            held.len() != before
        }
        fn regions(&self) -> Vec<u64> {
            self.held.lock().unwrap().clone()
        }
        fn create_region(
            &self,
            size: u64,
            _: &[IsmGrant],
            _: GrantPerm,
        ) -> Result<(u64, Vec<RegionArea>), ControlError> {
            if size > 4 << 20 {
                return Err(ControlError::Pool {
                    reason: PoolRefusal::Capacity,
                    source: "pool exhausted".into(),
                });
            }
            let token = 100 + self.held.lock().unwrap().len() as u64;
            self.held.lock().unwrap().push(token);
            Ok((token, vec![RegionArea { offset: 0, size }]))
        }
        fn devid(&self) -> u64 {
            1
        }
        fn pool_status(&self) -> Result<serde_json::Value, ControlError> {
            if self.pool_down {
                let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
                return Err(ControlError::PoolUnavailable(Box::new(
                    ism_pool::PoolError::Connection(refused),
                )));
            }
            Ok(json!({
                "size": 4 << 20,
                "used": self.held.lock().unwrap().len() << 20,
                "sessions": [{"devid": 1}, {"devid": 2}],
            }))
        }
        fn pause(&self) -> Result<(), ControlError> {
            Ok(())
        }
        fn resume(&self) {}
    }

    /// Counts pauses and resumes.
    #[derive(Default)]
    struct FakeVcpus {
        calls: Mutex<Vec<&'static str>>,
    }

    impl VcpuControl for FakeVcpus {
        fn pause(&self) -> Result<(), PauseError> {
            self.calls.lock().unwrap().push("pause");
            Ok(())
        }
        fn resume(&self) {
            self.calls.lock().unwrap().push("resume");
        }
    }

    struct FakeDevices;

    impl DeviceView for FakeDevices {
        fn devices(&self) -> Vec<(String, String)> {
            vec![
                ("_rng0".into(), "0000:00:01.0".into()),
                ("ism0".into(), "0000:00:02.0".into()),
            ]
        }
        fn counters(&self) -> Vec<(String, virtio_device::Counters)> {
            let mut c = virtio_device::Counters::new();
            c.insert("requests", std::num::Wrapping(3));
            vec![("_rng0".into(), c)]
        }
    }

    fn wait_for_socket(path: &Path) {
        for _ in 0..500 {
            if path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("API socket {} never appeared", path.display());
    }

    /// Serve the API on a fresh socket with the fakes, run `client`, return how the loop
    /// ended and the fake device.
    fn with_api(client: impl FnOnce(&Path, &Sender<ExitEvent>)) -> (ExitEvent, Arc<FakeIsm>) {
        with_api_vcpus(&FakeVcpus::default(), client)
    }

    fn with_api_vcpus(
        vcpus: &FakeVcpus,
        client: impl FnOnce(&Path, &Sender<ExitEvent>),
    ) -> (ExitEvent, Arc<FakeIsm>) {
        with_api_on(FakeIsm::default(), vcpus, client)
    }

    fn with_api_on(
        ism: FakeIsm,
        vcpus: &FakeVcpus,
        client: impl FnOnce(&Path, &Sender<ExitEvent>),
    ) -> (ExitEvent, Arc<FakeIsm>) {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ism-api").unwrap();
        let socket = dir.as_path().join("api.sock");
        let config = VmConfig::parse(VmParams {
            kernel: Some("/k".into()),
            ..Default::default()
        })
        .unwrap();
        let ism = Arc::new(ism);
        let (exit_tx, exit_rx) = channel();
        let endpoint = Endpoint::Path(socket.clone());
        let event = std::thread::scope(|s| {
            let vmm = s.spawn(|| {
                let entry = IsmEntry {
                    id: "ism0".into(),
                    control: ism.clone(),
                };
                let mut api = VmmApi::new(
                    &config,
                    &FakeDevices,
                    Arc::new(ExitCounters::default()),
                    vec![entry],
                )
                .with_vcpus(vcpus);
                let listener = ApiListener::bind(&endpoint).unwrap();
                wait_for_exit(exit_rx, Some(listener), &mut api).unwrap()
            });
            wait_for_socket(&socket);
            client(&socket, &exit_tx);
            vmm.join().unwrap()
        });
        assert!(!socket.exists(), "the socket is removed at exit");
        (event, ism)
    }

    fn json_of(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
    }

    #[test]
    fn test_queries_and_shutdown_over_the_socket() {
        let (event, _) = with_api(|sock, _| {
            let (status, body) = simple_request(sock, "GET", "vmm.ping", None).unwrap();
            assert_eq!(status, 200);
            let ping: VmmPingResponse = serde_json::from_slice(&body).unwrap();
            assert_eq!(ping.pid, i64::from(std::process::id()));

            let (status, body) = simple_request(sock, "GET", "vm.info", None).unwrap();
            assert_eq!(status, 200);
            let info: VmInfoResponse = serde_json::from_slice(&body).unwrap();
            assert_eq!(info.state, "Running");
            assert_eq!(info.config["payload"]["kernel"], "/k");
            assert_eq!(info.devices[1].bdf, "0000:00:02.0");
            assert_eq!(info.devices[1].ism_regions, Some(vec![]));
            assert_eq!(info.devices[0].ism_regions, None);

            let (status, body) = simple_request(sock, "GET", "vm.counters", None).unwrap();
            assert_eq!(status, 200);
            let counters: VmCounters = serde_json::from_slice(&body).unwrap();
            assert_eq!(counters["_rng0"]["requests"], 3);
            assert!(counters.contains_key("__vcpus"));

            let (status, body) = simple_request(sock, "PUT", "vm.shutdown", None).unwrap();
            assert_eq!((status, body.len()), (204, 0));
        });
        assert_eq!(event, ExitEvent::Shutdown("API vm.shutdown"));
    }

    #[test]
    fn test_region_hotplug_routes() {
        let (event, ism) = with_api(|sock, _| {
            let add = |body: &str| {
                simple_request(sock, "PUT", "vm.ism-add-region", Some(body.as_bytes())).unwrap()
            };
            let (status, body) = add(r#"{"id":"ism0","token":2}"#);
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            let info: IsmRegionInfo = serde_json::from_slice(&body).unwrap();
            assert_eq!(info.areas[0].offset, 2 << 20);
            // Twice: conflict. Unknown device: 404. Pool refuses: 400.
            assert_eq!(add(r#"{"id":"ism0","token":2}"#).0, 409);
            let (status, body) = add(r#"{"id":"ism9","token":1}"#);
            assert_eq!(status, 404);
            assert_eq!(json_of(&body)[0], "No ism device with id \"ism9\"");
            assert_eq!(add(r#"{"id":"ism0","token":7}"#).0, 400);

            let (status, body) = simple_request(sock, "GET", "vm.ism-regions", None).unwrap();
            assert_eq!(status, 200);
            assert_eq!(json_of(&body), json!({"ism0": [2]}));
            let (status, body) = simple_request(sock, "GET", "vm.ism-pool-status", None).unwrap();
            assert_eq!(status, 200);
            assert_eq!(json_of(&body)["ism0"]["used"], 1 << 20);

            let remove = |body: &str| {
                simple_request(sock, "PUT", "vm.ism-remove-region", Some(body.as_bytes()))
                    .unwrap()
                    .0
            };
            assert_eq!(remove(r#"{"id":"ism0","token":2}"#), 204);
            assert_eq!(remove(r#"{"id":"ism0","token":2}"#), 404);
            simple_request(sock, "PUT", "vm.reboot", None).unwrap();
        });
        assert_eq!(event, ExitEvent::Reboot("API vm.reboot"));
        assert!(ism.regions().is_empty());
    }

    #[test]
    fn test_a_pool_that_is_down_is_503_with_its_cause() {
        let ism = FakeIsm {
            pool_down: true,
            ..Default::default()
        };
        let (event, _) = with_api_on(ism, &FakeVcpus::default(), |sock, _| {
            let (status, body) = simple_request(sock, "GET", "vm.ism-pool-status", None).unwrap();
            assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
            let chain = json_of(&body);
            assert_eq!(chain[0], "Pool status of \"ism0\" is unavailable");
            assert_eq!(chain[1], "The region pool is unavailable");
            assert_eq!(chain[2], "Pool broker connection failed");
            assert_eq!(chain.as_array().map(Vec::len), Some(4), "{chain}");
            // A create with grants asks the pool for its devices first: 503 as well.
            let body = br#"{"id":"ism0","size":8192,"grants":[{"peer":2,"perm":"ro"}]}"#;
            let (status, _) = simple_request(sock, "PUT", "vm.ism-add-region", Some(body)).unwrap();
            assert_eq!(status, 503);
            simple_request(sock, "PUT", "vm.shutdown", None).unwrap();
        });
        assert_eq!(event, ExitEvent::Shutdown("API vm.shutdown"));
    }

    #[test]
    fn test_pause_resume_states_and_conflicts() {
        let vcpus = FakeVcpus::default();
        let (event, _) = with_api_vcpus(&vcpus, |sock, _| {
            let put = |endpoint| simple_request(sock, "PUT", endpoint, None).unwrap();
            let state = || {
                let (_, body) = simple_request(sock, "GET", "vm.info", None).unwrap();
                json_of(&body)["state"].clone()
            };
            let (status, body) = put("vm.resume");
            assert_eq!(status, 409);
            assert_eq!(json_of(&body)[0], "The VM is not paused");
            assert_eq!(put("vm.pause").0, 204);
            assert_eq!(state(), "Paused");
            let (status, body) = put("vm.pause");
            assert_eq!(status, 409);
            assert_eq!(json_of(&body)[0], "The VM is already paused");
            assert_eq!(put("vm.resume").0, 204);
            assert_eq!(state(), "Running");
            assert_eq!(put("vm.pause").0, 204);
            // Shutdown while paused.
            assert_eq!(put("vm.shutdown").0, 204);
        });
        assert_eq!(event, ExitEvent::Shutdown("API vm.shutdown"));
        assert_eq!(*vcpus.calls.lock().unwrap(), ["pause", "resume", "pause"]);
    }

    #[test]
    fn test_region_create_checks_peers_before_allocating() {
        let (_, ism) = with_api(|sock, exit| {
            let add = |body: &str| {
                let (status, reply) =
                    simple_request(sock, "PUT", "vm.ism-add-region", Some(body.as_bytes()))
                        .unwrap();
                (status, json_of(&reply))
            };
            let (status, reply) =
                add(r#"{"id":"ism0","size":8192,"grants":[{"peer":9,"perm":"ro"}]}"#);
            assert_eq!(status, 400, "{reply}");
            assert_eq!(
                reply[0],
                "Device \"ism0\": peer 9 is not a device of its pool"
            );
            let (status, reply) =
                add(r#"{"id":"ism0","size":8192,"grants":[{"peer":1,"perm":"ro"}]}"#);
            assert_eq!(status, 400, "{reply}");
            assert!(reply[0].as_str().unwrap().contains("the device itself"));
            let (status, _) = add(r#"{"id":"ism0","size":4096,"token":3}"#);
            assert_eq!(status, 400);
            // The pool is out of room: 409, the pool's words last in the chain.
            let (status, reply) = add(r#"{"id":"ism0","size":16777216}"#);
            assert_eq!(status, 409, "{reply}");
            assert_eq!(
                reply,
                json!([
                    "Device \"ism0\" could not create a region of 16777216 bytes",
                    "The pool refused the request: out of room",
                    "pool exhausted"
                ])
            );
            let (status, reply) = add(
                r#"{"id":"ism0","size":8192,"grants":[{"peer":2,"perm":"rw"}],"default_perm":"ro"}"#,
            );
            assert_eq!(status, 200, "{reply}");
            assert_eq!(reply["token"], 100);
            assert_eq!(reply["areas"][0]["size"], 8192);
            exit.send(ExitEvent::Shutdown("ACPI S5")).unwrap();
        });
        assert_eq!(ism.regions(), [100]);
    }

    #[test]
    fn test_bad_requests_change_nothing() {
        let (event, ism) = with_api(|sock, exit| {
            let cases: &[(&str, &str, &[u8], u16)] = &[
                ("PUT", "vm.ism-add-region", b"{\"id\":\"ism0\",", 400),
                (
                    "PUT",
                    "vm.ism-add-region",
                    br#"{"id":"ism0","token":1,"x":0}"#,
                    400,
                ),
                (
                    "PUT",
                    "vm.ism-add-region",
                    br#"{"id":"ism0","token":"1"}"#,
                    400,
                ),
                ("PUT", "vm.ism-add-region", b"", 400),
                ("PUT", "vm.shutdown", b"{}", 400),
                ("GET", "vm.shutdown", b"", 405),
                ("DELETE", "vm.info", b"", 405),
                ("GET", "vm.bogus", b"", 404),
            ];
            for (method, endpoint, body, want) in cases {
                let (status, reply) = simple_request(sock, method, endpoint, Some(body)).unwrap();
                assert_eq!(status, *want, "{method} {endpoint}");
                let errors = json_of(&reply);
                assert!(
                    errors.as_array().is_some_and(|a| !a.is_empty()),
                    "{reply:?}"
                );
            }
            // An oversize body is refused from its Content-Length.
            let big = vec![b' '; crate::api::router::MAX_BODY_SIZE + 1];
            let (status, _) = simple_request(sock, "PUT", "vm.ism-add-region", Some(&big))
                .unwrap_or((413, vec![]));
            assert_eq!(status, 413);
            // Still serving; then a guest-side exit ends the loop.
            assert_eq!(
                simple_request(sock, "GET", "vmm.ping", None).unwrap().0,
                200
            );
            exit.send(ExitEvent::Shutdown("ACPI S5")).unwrap();
        });
        assert_eq!(event, ExitEvent::Shutdown("ACPI S5"));
        assert!(ism.regions().is_empty());
    }

    #[test]
    fn test_an_inherited_listening_fd_serves_and_a_file_fd_is_refused() {
        use std::os::fd::IntoRawFd;
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ism-api").unwrap();
        let path = dir.as_path().join("api.sock");
        let fd = std::os::unix::net::UnixListener::bind(&path)
            .unwrap()
            .into_raw_fd();
        let listener = ApiListener::bind(&Endpoint::Fd(fd)).unwrap();
        let server = ApiServer::start(listener, ApiSender::new(|_| false)).unwrap();
        assert_eq!(
            simple_request(&path, "GET", "vmm.ping", None).unwrap().0,
            500
        );
        assert_eq!(
            simple_request(&path, "GET", "vm.nope", None).unwrap().0,
            404
        );
        drop(server);

        let file = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        let err = ApiListener::bind(&Endpoint::Fd(file)).err().unwrap();
        assert!(matches!(err, HttpError::NotAListener(..)), "{err:?}");
    }

    #[test]
    fn test_a_second_server_on_the_same_path_is_refused() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ism-api").unwrap();
        let path = dir.as_path().join("api.sock");
        let endpoint = Endpoint::Path(path.clone());
        let sender = ApiSender::new(|_| false);
        let first =
            ApiServer::start(ApiListener::bind(&endpoint).unwrap(), sender.clone()).unwrap();
        let err = ApiListener::bind(&endpoint).err().unwrap();
        assert!(matches!(err, HttpError::InUse(..)), "{err:?}");
        // With the VMM gone, requests get a 500, not a hang.
        assert_eq!(
            simple_request(&path, "GET", "vmm.ping", None).unwrap().0,
            500
        );
        drop(first);
        assert!(!path.exists());
        // The lock is free again; a stale socket file would be replaced.
        let again = ApiServer::start(ApiListener::bind(&endpoint).unwrap(), sender).unwrap();
        drop(again);
    }
}
