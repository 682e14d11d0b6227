//! The router's routes as the tests know them: every (method, path, role) in [`ROUTES`], and
//! the paths the router really serves ([`router_paths`]). Shared by `http_access.rs` (each
//! route answers 401/403/2xx as its role says) and `openapi.rs` (the OpenAPI description lists
//! exactly these operations with these roles).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use driftwatch_collector::http::{self, ApiConfig};
use driftwatch_collector::storage::{Role, Storage};

/// Every route: method, path as routed, a concrete target, the role it needs (`None`:
/// public), a body, the success status. A route the router has and this table lacks fails
/// `every_route_is_in_the_table`: decide its role here when adding one.
pub type Route = (
    &'static str,
    &'static str,
    &'static str,
    Option<Role>,
    Option<&'static str>,
    u16,
);

pub const ROUTES: &[Route] = &[
    ("GET", "/healthz", "/healthz", None, None, 200),
    (
        "GET",
        "/api/v1/openapi.json",
        "/api/v1/openapi.json",
        Some(Role::Auditor),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/hosts",
        "/api/v1/hosts",
        Some(Role::Auditor),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/hosts/{host_id}",
        "/api/v1/hosts/web-1",
        Some(Role::Auditor),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/hosts/{host_id}/violations",
        "/api/v1/hosts/web-1/violations",
        Some(Role::Auditor),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/violations",
        "/api/v1/violations",
        Some(Role::Auditor),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/security-events",
        "/api/v1/security-events",
        Some(Role::Auditor),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/audit",
        "/api/v1/audit?limit=2",
        Some(Role::Auditor),
        None,
        200,
    ),
    // The export streams JSON Lines/CSV/CEF, not one JSON document: a parameter the role
    // gate lets through is answered with the API's JSON 400 (the 200s: tests/export.rs).
    (
        "GET",
        "/api/v1/export",
        "/api/v1/export?format=none",
        Some(Role::Auditor),
        None,
        400,
    ),
    (
        "GET",
        "/api/v1/tokens",
        "/api/v1/tokens",
        Some(Role::Admin),
        None,
        200,
    ),
    (
        "POST",
        "/api/v1/tokens",
        "/api/v1/tokens",
        Some(Role::Admin),
        Some(r#"{"name":"ci","role":"auditor","ttl":"1h"}"#),
        201,
    ),
    (
        "DELETE",
        "/api/v1/tokens/{id}",
        "/api/v1/tokens/{fresh}",
        Some(Role::Admin),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/enrollment-tokens",
        "/api/v1/enrollment-tokens",
        Some(Role::Admin),
        None,
        200,
    ),
    (
        "POST",
        "/api/v1/enrollment-tokens",
        "/api/v1/enrollment-tokens",
        Some(Role::Admin),
        Some(r#"{"ttl":"10m","uses":2,"host_pattern":"web-*"}"#),
        201,
    ),
    // Lifecycle, flagging and the registry. The mutations are sent where the role gate lets
    // them through but they change nothing (an unknown host, an unsigned baseline), because
    // every role at or above the one needed sends them; their 2xx answers are tested in
    // tests/http_lifecycle.rs and tests/rebuilds.rs.
    (
        "GET",
        "/api/v1/hosts/{host_id}/explain",
        "/api/v1/hosts/web-1/explain",
        Some(Role::Auditor),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/hosts/{host_id}/transitions",
        "/api/v1/hosts/web-1/transitions",
        Some(Role::Auditor),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/images",
        "/api/v1/images",
        Some(Role::Auditor),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/images/{image_id}",
        "/api/v1/images/no-such-image",
        Some(Role::Auditor),
        None,
        404,
    ),
    (
        "POST",
        "/api/v1/hosts/{host_id}/violations/ack",
        "/api/v1/hosts/no-such-host/violations/ack",
        Some(Role::Operator),
        Some(r#"{"all":true,"reason":"checked","expires_in":"1h"}"#),
        404,
    ),
    (
        "POST",
        "/api/v1/hosts/{host_id}/retire",
        "/api/v1/hosts/no-such-host/retire",
        Some(Role::Operator),
        Some(r#"{"reason":"decommissioned"}"#),
        404,
    ),
    (
        "POST",
        "/api/v1/baselines",
        "/api/v1/baselines",
        Some(Role::Admin),
        Some(r#"{"signed_header":"bm90IHNpZ25lZA=="}"#),
        422,
    ),
    (
        "GET",
        "/api/v1/rebuilds",
        "/api/v1/rebuilds",
        Some(Role::Auditor),
        None,
        200,
    ),
    (
        "GET",
        "/api/v1/rebuilds/{id}",
        "/api/v1/rebuilds/rb_00000000000000000000",
        Some(Role::Auditor),
        None,
        404,
    ),
    (
        "POST",
        "/api/v1/rebuilds/{id}/approve",
        "/api/v1/rebuilds/rb_00000000000000000000/approve",
        Some(Role::Operator),
        Some(r#"{"reason":"confirmed"}"#),
        404,
    ),
    (
        "POST",
        "/api/v1/rebuilds/{id}/reject",
        "/api/v1/rebuilds/rb_00000000000000000000/reject",
        Some(Role::Operator),
        Some(r#"{"reason":"forensics first"}"#),
        404,
    ),
];

pub const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// The paths the router serves, read from its `Debug` form (axum has no route listing).
pub fn router_paths(store: Arc<dyn Storage>) -> BTreeSet<String> {
    let dump = format!("{:?}", http::router(store, ApiConfig::default()));
    // Only the path router: the fallback router holds axum's own catch-all routes.
    let dump = &dump[..dump
        .find("fallback_router")
        .expect("Router's Debug form changed")];
    let mut paths = BTreeSet::new();
    let mut rest = dump;
    while let Some(i) = rest.find("\"/") {
        let tail = &rest[i + 1..];
        let end = tail.find('"').unwrap();
        let p = &tail[..end];
        if !p.contains("__private__") {
            paths.insert(p.to_string());
        }
        rest = &tail[end..];
    }
    paths
}
