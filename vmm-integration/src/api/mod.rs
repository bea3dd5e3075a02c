// SPDX-License-Identifier: Apache-2.0
//! The REST API: an HTTP/1.1 server on a unix socket (`http.rs`) turns requests into
//! [`ApiAction`]s (`router.rs`) and hands them to the VMM's main thread, which owns the VM and
//! answers through a [`RequestHandler`]. Nothing here touches a device directly.

pub mod http;
pub mod router;
pub mod types;

use std::sync::mpsc::{Receiver, Sender, channel};

pub use types::ApiAction;
use types::{IsmAddRegionRequest, IsmRemoveRegionRequest};

/// Why the VMM refused or failed a request. The HTTP status follows cloud-hypervisor's
/// `api_error_status_code`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Ism(#[from] virtio_ism_api::IsmApiError),
    #[error("The VM is already paused")]
    AlreadyPaused,
    #[error("The VM is not paused")]
    NotPaused,
    #[error("This VMM has no vCPUs to pause")]
    NoVcpus,
    #[error("Failed to pause the vCPUs")]
    PauseVcpus(#[source] crate::vstate::pause::PauseError),
    #[error("Failed to serialise the response")]
    Serialise(#[source] serde_json::Error),
    #[error("The VMM is shutting down")]
    VmmGone,
}

impl ApiError {
    pub fn status_code(&self) -> u16 {
        match self {
            ApiError::Ism(e) => e.status_code(),
            ApiError::AlreadyPaused | ApiError::NotPaused => 409,
            ApiError::NoVcpus
            | ApiError::PauseVcpus(_)
            | ApiError::Serialise(_)
            | ApiError::VmmGone => 500,
        }
    }

    /// The error and its sources, outermost first: the body of an error response.
    pub fn chain(&self) -> Vec<String> {
        virtio_ism_api::error_chain(self)
    }
}

/// A successful answer: a JSON body (200) or nothing (204).
pub type ApiResult = Result<Option<serde_json::Value>, ApiError>;

/// What the VMM's main thread implements to serve the API; one method per action.
pub trait RequestHandler {
    fn vmm_ping(&mut self) -> ApiResult;
    fn vm_info(&mut self) -> ApiResult;
    fn vm_counters(&mut self) -> ApiResult;
    fn vm_shutdown(&mut self) -> ApiResult;
    fn vm_reboot(&mut self) -> ApiResult;
    fn vm_pause(&mut self) -> ApiResult;
    fn vm_resume(&mut self) -> ApiResult;
    fn ism_add_region(&mut self, req: IsmAddRegionRequest) -> ApiResult;
    fn ism_remove_region(&mut self, req: IsmRemoveRegionRequest) -> ApiResult;
    fn ism_regions(&mut self) -> ApiResult;
    fn ism_pool_status(&mut self) -> ApiResult;
}

/// Run `action` against `handler`.
pub fn dispatch(handler: &mut dyn RequestHandler, action: ApiAction) -> ApiResult {
    match action {
        ApiAction::VmmPing => handler.vmm_ping(),
        ApiAction::VmInfo => handler.vm_info(),
        ApiAction::VmCounters => handler.vm_counters(),
        ApiAction::VmShutdown => handler.vm_shutdown(),
        ApiAction::VmReboot => handler.vm_reboot(),
        ApiAction::VmPause => handler.vm_pause(),
        ApiAction::VmResume => handler.vm_resume(),
        ApiAction::IsmAddRegion(r) => handler.ism_add_region(r),
        ApiAction::IsmRemoveRegion(r) => handler.ism_remove_region(r),
        ApiAction::IsmRegions => handler.ism_regions(),
        ApiAction::IsmPoolStatus => handler.ism_pool_status(),
    }
}

/// One request on its way to the main thread, with the channel for its answer.
pub struct ApiRequest {
    pub action: ApiAction,
    pub reply: Sender<ApiResult>,
}

impl ApiRequest {
    /// Answer it on the calling thread.
    pub fn serve(self, handler: &mut dyn RequestHandler) {
        // The HTTP thread may have given up on the answer; nothing to do then.
        let _ = self.reply.send(dispatch(handler, self.action));
    }
}

/// The HTTP thread's way to the main thread. The main thread receives requests and exit
/// events on one channel, so it sleeps on a single `recv` (there is no epoll loop in this VMM
/// for an eventfd to join).
#[derive(Clone)]
pub struct ApiSender {
    send: std::sync::Arc<dyn Fn(ApiRequest) -> bool + Send + Sync>,
}

impl ApiSender {
    /// `send` forwards a request to the main thread; it returns false once that is gone.
    pub fn new(send: impl Fn(ApiRequest) -> bool + Send + Sync + 'static) -> Self {
        Self {
            send: std::sync::Arc::new(send),
        }
    }

    /// Send `action` and wait for the answer.
    pub fn call(&self, action: ApiAction) -> ApiResult {
        let (reply, answer): (Sender<ApiResult>, Receiver<ApiResult>) = channel();
        if !(self.send)(ApiRequest { action, reply }) {
            return Err(ApiError::VmmGone);
        }
        answer.recv().unwrap_or(Err(ApiError::VmmGone))
    }
}
