// SPDX-License-Identifier: Apache-2.0
//! Request -> [`ApiAction`], with no I/O: the part of the request path a client controls,
//! kept pure so the fuzz target and the unit tests drive it directly.

use super::types::{API_PREFIX, ApiAction, IsmAddRegionRequest, IsmRemoveRegionRequest, ROUTES};

/// Largest request body accepted (cloud-hypervisor takes 4 MiB; ours are tiny).
pub const MAX_BODY_SIZE: usize = 1 << 20;

/// A request refused before it reaches the VMM: the HTTP status and one message.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("Unknown endpoint {0:?}")]
    NotFound(String),
    #[error("Method {0} is not allowed on {1} (use {2})")]
    MethodNotAllowed(String, String, &'static str),
    #[error("Endpoint {0} takes no body")]
    UnexpectedBody(&'static str),
    #[error("Endpoint {0} needs a JSON body")]
    MissingBody(&'static str),
    #[error("Invalid JSON body for {0}: {1}")]
    InvalidBody(&'static str, String),
    #[error("Invalid request for {0}: {1}")]
    InvalidRequest(&'static str, String),
    #[error("Request body of {0} bytes is over the {MAX_BODY_SIZE} byte limit")]
    BodyTooLarge(usize),
}

impl RouteError {
    pub fn status_code(&self) -> u16 {
        match self {
            RouteError::NotFound(_) => 404,
            RouteError::MethodNotAllowed(..) => 405,
            RouteError::BodyTooLarge(_) => 413,
            RouteError::UnexpectedBody(_)
            | RouteError::MissingBody(_)
            | RouteError::InvalidBody(..)
            | RouteError::InvalidRequest(..) => 400,
        }
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(
    name: &'static str,
    body: &[u8],
) -> Result<T, RouteError> {
    serde_json::from_slice(body).map_err(|e| RouteError::InvalidBody(name, e.to_string()))
}

/// Route `method url` with `body` (empty when the request had none).
pub fn route(method: &str, url: &str, body: &[u8]) -> Result<ApiAction, RouteError> {
    if body.len() > MAX_BODY_SIZE {
        return Err(RouteError::BodyTooLarge(body.len()));
    }
    let endpoint = url
        .strip_prefix(API_PREFIX)
        .and_then(|name| ROUTES.iter().find(|r| r.name == name))
        .ok_or_else(|| RouteError::NotFound(url.chars().take(256).collect()))?;
    if method != endpoint.method.as_str() {
        return Err(RouteError::MethodNotAllowed(
            method.chars().take(32).collect(),
            endpoint.name.to_owned(),
            endpoint.method.as_str(),
        ));
    }
    let has_body = !body.iter().all(u8::is_ascii_whitespace);
    match (endpoint.body, has_body) {
        (false, true) => return Err(RouteError::UnexpectedBody(endpoint.name)),
        (true, false) => return Err(RouteError::MissingBody(endpoint.name)),
        _ => {}
    }
    let name = endpoint.name;
    Ok(match name {
        "vmm.ping" => ApiAction::VmmPing,
        "vm.info" => ApiAction::VmInfo,
        "vm.counters" => ApiAction::VmCounters,
        "vm.shutdown" => ApiAction::VmShutdown,
        "vm.reboot" => ApiAction::VmReboot,
        "vm.pause" => ApiAction::VmPause,
        "vm.resume" => ApiAction::VmResume,
        "vm.ism-add-region" => {
            let req = parse_body::<IsmAddRegionRequest>(name, body)?;
            req.kind()
                .map_err(|e| RouteError::InvalidRequest(name, e))?;
            ApiAction::IsmAddRegion(req)
        }
        "vm.ism-remove-region" => {
            ApiAction::IsmRemoveRegion(parse_body::<IsmRemoveRegionRequest>(name, body)?)
        }
        "vm.ism-regions" => ApiAction::IsmRegions,
        "vm.ism-pool-status" => ApiAction::IsmPoolStatus,
        // ROUTES and this match are kept in step by test_every_route_is_routed.
        _ => return Err(RouteError::NotFound(url.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::{AddRegion, GrantPerm, IsmGrant, RegionAccess};

    #[test]
    fn test_every_route_is_routed() {
        for r in ROUTES {
            let body: &[u8] = match r.name {
                "vm.ism-add-region" => br#"{"id":"ism0","token":1}"#,
                "vm.ism-remove-region" => br#"{"id":"ism0","token":1}"#,
                _ => b"",
            };
            let url = format!("{API_PREFIX}{}", r.name);
            assert!(
                route(r.method.as_str(), &url, body).is_ok(),
                "{} is not routed",
                r.name
            );
        }
    }

    /// (path, method) pairs under `paths:` in the OpenAPI document: a path is a line
    /// `  /name:` and its methods the `    get:`/`    put:` lines below it.
    fn openapi_operations() -> Vec<(String, String)> {
        let doc = include_str!("../../resources/openapi/ism-vmm.yaml");
        let mut ops = Vec::new();
        let mut in_paths = false;
        let mut path = None;
        for line in doc.lines() {
            if !line.starts_with(' ') && !line.is_empty() {
                in_paths = line == "paths:";
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                path = Some(p.to_owned());
            } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))
                && !m.starts_with(' ')
            {
                ops.push((
                    path.clone().expect("a method under a path"),
                    m.to_uppercase(),
                ));
            }
        }
        ops
    }

    #[test]
    fn test_router_and_openapi_document_list_the_same_operations() {
        let mut documented = openapi_operations();
        documented.sort();
        let mut routed: Vec<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.name.to_owned(), r.method.as_str().to_owned()))
            .collect();
        routed.sort();
        assert_eq!(routed, documented);
    }

    #[test]
    fn test_actions_and_bodies() {
        assert_eq!(
            route("GET", "/api/v1/vmm.ping", b""),
            Ok(ApiAction::VmmPing)
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.shutdown", b"  \n"),
            Ok(ApiAction::VmShutdown)
        );
        assert_eq!(
            route(
                "PUT",
                "/api/v1/vm.ism-add-region",
                br#"{"id":"ism0","token":7,"access":"rw"}"#
            ),
            Ok(ApiAction::IsmAddRegion(IsmAddRegionRequest {
                id: "ism0".into(),
                token: Some(7),
                access: Some(RegionAccess::ReadWrite),
                ..Default::default()
            }))
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.pause", b""),
            Ok(ApiAction::VmPause)
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.resume", b""),
            Ok(ApiAction::VmResume)
        );
        let Ok(ApiAction::IsmAddRegion(req)) = route(
            "PUT",
            "/api/v1/vm.ism-add-region",
            br#"{"id":"ism0","size":65536,"grants":[{"peer":2,"perm":"ro"}],"default_perm":"rw"}"#,
        ) else {
            panic!("create request not routed");
        };
        assert_eq!(
            req.kind(),
            Ok(AddRegion::Create {
                size: 65536,
                grants: vec![IsmGrant {
                    peer: 2,
                    perm: GrantPerm::Ro
                }],
                default_perm: GrantPerm::Rw,
            })
        );
    }

    #[test]
    fn test_add_region_field_combinations_and_sizes_are_checked() {
        let add = "/api/v1/vm.ism-add-region";
        for (body, says) in [
            (r#"{"id":"a","token":1,"size":4096}"#, "not both"),
            (r#"{"id":"a"}"#, "give token"),
            (r#"{"id":"a","size":0}"#, "size 0"),
            (r#"{"id":"a","size":4097}"#, "size 4097"),
            (r#"{"id":"a","size":4096,"access":"rw"}"#, "access only"),
            (
                r#"{"id":"a","token":1,"default_perm":"ro"}"#,
                "only go with size",
            ),
            (
                r#"{"id":"a","size":4096,"grants":[{"peer":3,"perm":"ro"},{"peer":3,"perm":"rw"}]}"#,
                "granted twice",
            ),
            (
                r#"{"id":"a","size":4096,"grants":[{"peer":0,"perm":"ro"}]}"#,
                "not a device id",
            ),
            (
                r#"{"id":"a","size":4096,"grants":[{"peer":1,"perm":"all"}]}"#,
                "unknown variant",
            ),
            (
                r#"{"id":"a","size":4096,"grants":[{"peer":1}]}"#,
                "missing field",
            ),
        ] {
            let e = route("PUT", add, body.as_bytes()).unwrap_err();
            assert_eq!(e.status_code(), 400, "{body}");
            assert!(e.to_string().contains(says), "{body}: {e}");
        }
    }

    #[test]
    fn test_bad_requests_get_4xx() {
        let status = |m, u, b: &[u8]| route(m, u, b).unwrap_err().status_code();
        assert_eq!(status("GET", "/api/v1/vm.nope", b""), 404);
        assert_eq!(status("GET", "/api/v2/vmm.ping", b""), 404);
        assert_eq!(status("GET", "/api/v1/vmm.ping?x", b""), 404);
        assert_eq!(status("POST", "/api/v1/vmm.ping", b""), 405);
        assert_eq!(status("GET", "/api/v1/vm.shutdown", b""), 405);
        assert_eq!(status("PUT", "/api/v1/vm.shutdown", b"{}"), 400);
        assert_eq!(status("PUT", "/api/v1/vm.ism-add-region", b""), 400);
        // Malformed, unknown field, wrong type, missing field.
        let add = "/api/v1/vm.ism-add-region";
        assert_eq!(status("PUT", add, b"{\"id\":"), 400);
        assert_eq!(status("PUT", add, br#"{"id":"a","token":1,"x":1}"#), 400);
        assert_eq!(status("PUT", add, br#"{"id":"a","token":"1"}"#), 400);
        assert_eq!(status("PUT", add, br#"{"id":"a","token":-1}"#), 400);
        assert_eq!(status("PUT", add, br#"{"id":"a"}"#), 400);
        assert_eq!(
            status("PUT", add, br#"{"id":"a","token":1,"access":"all"}"#),
            400
        );
        let big = vec![b' '; MAX_BODY_SIZE + 1];
        assert_eq!(status("PUT", add, &big), 413);
    }

    #[test]
    fn test_error_messages_name_the_problem() {
        let e = route(
            "PUT",
            "/api/v1/vm.ism-add-region",
            br#"{"id":"a","token":1,"x":1}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `x`"), "{e}");
        let e = route("DELETE", "/api/v1/vm.info", b"").unwrap_err();
        assert_eq!(
            e.to_string(),
            "Method DELETE is not allowed on vm.info (use GET)"
        );
    }
}
