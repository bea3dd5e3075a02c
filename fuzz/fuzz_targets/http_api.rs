// SPDX-License-Identifier: Apache-2.0
//! ism-vmm's REST request path: arbitrary bytes as an HTTP request line plus body, through
//! the VMM's own router and body parsing (`ism_vmm::rest`). Checks that
//! nothing panics, that every refusal is a 4xx, and that an accepted body round-trips.

#![no_main]

use libfuzzer_sys::fuzz_target;

use ism_vmm::rest::{self as router, API_PREFIX, ApiAction, ROUTES};

fuzz_target!(|data: &[u8]| {
    // "<method> <url>\n<body>": the first line picks the route, the rest is the body.
    let (head, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let (method, url) = head.split_once(' ').unwrap_or((&head, ""));
    match router::route(method, url, body) {
        Ok(action) => {
            let route = url
                .strip_prefix(API_PREFIX)
                .and_then(|n| ROUTES.iter().find(|r| r.name == n))
                .expect("an accepted request names a route");
            assert_eq!(route.method.as_str(), method);
            match action {
                ApiAction::IsmAddRegion(req) => {
                    // Only a request whose fields go together (token xor size, ...) is routed.
                    assert!(req.kind().is_ok(), "{req:?}");
                    let json = serde_json::to_vec(&req).unwrap();
                    let again = router::route(method, url, &json).unwrap();
                    assert_eq!(again, ApiAction::IsmAddRegion(req));
                }
                ApiAction::IsmRemoveRegion(req) => {
                    let json = serde_json::to_vec(&req).unwrap();
                    let again = router::route(method, url, &json).unwrap();
                    assert_eq!(again, ApiAction::IsmRemoveRegion(req));
                }
                _ => assert!(!route.body),
            }
        }
        Err(e) => {
            let status = e.status_code();
            assert!((400..500).contains(&status), "{status} for {e}");
            assert!(!e.to_string().is_empty());
        }
    }
});
