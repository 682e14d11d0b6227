//! The OpenAPI description (`collector/openapi.json`, served at `/api/v1/openapi.json`) kept
//! true: it is what the server serves; its operations are exactly the router's routes with the
//! roles the router enforces; its `$ref`s resolve and every component is used; and every answer
//! of the real router over a fleet with real data — hosts clean, drifted, flagged, awaiting a
//! rebuild, revoked; violations; a pushed baseline; transitions; acknowledgements; audit
//! records; rebuild actions with attempts; tokens — validates against the schema the document
//! declares for its status, every documented non-5xx status is produced, and every documented
//! field is sent at least once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet_fixture;
#[path = "common/json_schema.rs"]
mod json_schema;
#[path = "common/routes.rs"]
mod routes;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use driftwatch_collector::flagging::{FlaggingPolicy, RawFlagging};
use driftwatch_collector::http::{self, ApiConfig};
use driftwatch_collector::lifecycle::Lifecycle;
use driftwatch_collector::reconcile::{self, Policy};
use driftwatch_collector::storage::actions::{
    ActionState, AttemptRecord, RebuildAction, action_id, idempotency_key,
};
use driftwatch_collector::storage::{ApiToken, AuditEntry, Role, TransitionRecord};
use driftwatch_proto::v1::{
    DriftItem, PackageDrift, PackageDriftKind, Severity, ViolationKind, drift_item::Item,
};
use fleet_fixture::{
    Agent, DAY, Fleet, HOUR, MINUTE, api_token, apply, enroll, file, fleet, heartbeat, hello,
    keypair, raw_key, signed_header, signed_header_expiring,
};
use json_schema::{Validator, properties_of, refs, resolve};
use serde_json::{Value, json};
use tower::ServiceExt;

const SPEC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");

fn spec() -> Value {
    let text = std::fs::read_to_string(SPEC_PATH).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{SPEC_PATH} is not JSON: {e}"))
}

fn role_name(r: Option<Role>) -> &'static str {
    r.map_or("public", |r| r.name())
}

/// `(METHOD, path)` → operation of the document.
fn operations(doc: &Value) -> BTreeMap<(String, String), &Value> {
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            out.insert((method.to_uppercase(), path.clone()), op);
        }
    }
    out
}

/// An answer of the router.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    www_authenticate: Option<String>,
    body: Vec<u8>,
}

async fn call(
    router: &Router,
    method: &str,
    target: &str,
    token: Option<Role>,
    body: Option<&str>,
) -> Answer {
    let mut req = axum::http::Request::builder().method(method).uri(target);
    if let Some(r) = token {
        req = req.header("authorization", format!("Bearer {}", api_token(r)));
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Body::from(body.unwrap_or("").to_string()))
        .unwrap();
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        router.clone().oneshot(req),
    )
    .await
    .expect("answer within 30 s")
    .unwrap();
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let content_type = header("content-type").unwrap_or_default();
    let www_authenticate = header("www-authenticate");
    let status = resp.status().as_u16();
    let body = axum::body::to_bytes(resp.into_body(), 64 << 20)
        .await
        .unwrap()
        .to_vec();
    Answer {
        status,
        content_type,
        www_authenticate,
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_is_the_file() {
    let file = std::fs::read(SPEC_PATH).unwrap();
    assert_eq!(http::OPENAPI.as_bytes(), file.as_slice());
    let doc = spec();
    let version = doc["openapi"].as_str().unwrap();
    assert!(version.starts_with("3.1."), "openapi {version}");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(doc["info"]["title"].is_string());

    let Fleet { store, .. } = fleet().await;
    let router = http::router(store, ApiConfig::default());
    let a = call(
        &router,
        "GET",
        "/api/v1/openapi.json",
        Some(Role::Auditor),
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.content_type, "application/json");
    assert_eq!(a.body, file, "the served document differs from {SPEC_PATH}");
    let served: Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(served, doc);
    // Like every route but /healthz, behind a token.
    let a = call(&router, "GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(a.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documented_operations_are_the_routes_with_their_roles() {
    let doc = spec();
    let ops = operations(&doc);
    let documented: BTreeSet<(String, String, String)> = ops
        .iter()
        .map(|((m, p), op)| {
            let role = op["x-driftwatch-role"]
                .as_str()
                .unwrap_or_else(|| panic!("{m} {p}: no x-driftwatch-role"));
            (m.clone(), p.clone(), role.to_string())
        })
        .collect();
    let routed: BTreeSet<(String, String, String)> = routes::ROUTES
        .iter()
        .map(|r| (r.0.to_string(), r.1.to_string(), role_name(r.3).to_string()))
        .collect();
    assert_eq!(
        documented, routed,
        "the document's operations and roles differ from the ROUTES table (which \
         http_access.rs checks against the router)"
    );
    // And straight from the router: the paths it serves.
    let Fleet { store, .. } = fleet().await;
    let served = routes::router_paths(store);
    let doc_paths: BTreeSet<String> = doc["paths"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(doc_paths, served, "documented paths vs the router's");
    for ((m, p), op) in &ops {
        let role = op["x-driftwatch-role"].as_str().unwrap();
        let what = format!("{m} {p}");
        let description = op["description"].as_str().unwrap_or("");
        let responses = op["responses"].as_object().unwrap();
        if role == "public" {
            assert_eq!(op["security"], json!([]), "{what}");
            assert!(description.starts_with("Public"), "{what}: {description}");
            assert!(!responses.contains_key("401"), "{what}");
        } else {
            assert!(op.get("security").is_none(), "{what}: overrides security");
            assert!(
                description.starts_with(&format!("Role: {role}")),
                "{what}: {description}"
            );
            assert!(responses.contains_key("401"), "{what}: no 401");
        }
        // Every token has at least the auditor role: only higher roles can be refused.
        assert_eq!(
            responses.contains_key("403"),
            role == "operator" || role == "admin",
            "{what}: 403"
        );
        assert!(op["operationId"].is_string(), "{what}");
    }
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
}

#[test]
fn refs_resolve_and_every_component_is_used() {
    let doc = spec();
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 50, "{}", all.len());
    for r in &all {
        assert!(resolve(&doc, r).is_some(), "dangling $ref {r}");
        assert!(r.starts_with("#/components/"), "non-local $ref {r}");
    }
    let used: BTreeSet<&str> = all.iter().map(String::as_str).collect();
    for kind in ["schemas", "responses", "parameters"] {
        for name in doc["components"][kind].as_object().unwrap().keys() {
            let r = format!("#/components/{kind}/{name}");
            assert!(used.contains(r.as_str()), "{r} is never referenced");
        }
    }
    // Every object schema is closed, so a field added in code fails the response test.
    let mut open = Vec::new();
    closed_objects(&doc["components"]["schemas"], "", &mut open);
    assert_eq!(
        open,
        ["/OpenApiDocument"],
        "objects without additionalProperties"
    );
}

/// Object schemas with properties but no `additionalProperties`.
fn closed_objects(v: &Value, at: &str, open: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if m.get("type") == Some(&json!("object")) && !m.contains_key("additionalProperties") {
                open.push(at.to_string());
            }
            for (k, v) in m {
                closed_objects(v, &format!("{at}/{k}"), open);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                closed_objects(v, &format!("{at}/{i}"), open);
            }
        }
        _ => {}
    }
}

fn policy() -> Policy {
    let raw: RawFlagging = toml::from_str(
        "severity_at_least = \"high\"\npackage_drift = true\nregistered_root = true\n\
         drift_older_than = \"1h\"\nmin_agent_version = \"0.2\"",
    )
    .unwrap();
    Policy {
        flagging: FlaggingPolicy::from_raw(raw).unwrap(),
        ..Policy::default()
    }
}

fn audit(now: i64, action: &str, target: &str) -> AuditEntry {
    AuditEntry::new(now, "collector", action, target, json!({}))
}

fn action(host: &str, flagged_ms: i64, state: ActionState, now: i64) -> RebuildAction {
    let key = idempotency_key(host, flagged_ms);
    RebuildAction {
        id: action_id(&key),
        idempotency_key: key,
        host_id: host.into(),
        image_id: "web".into(),
        role: Some("web".into()),
        flagged_ms,
        reasons: vec!["severity: 1 open item at or above high".into()],
        state,
        dry_run: false,
        created_ms: now,
        updated_ms: now,
        triggered_ms: None,
        finished_ms: None,
        attempts: 0,
        next_attempt_ms: None,
        last_error: None,
        decided_by: None,
        decision_reason: None,
        note: None,
        payload: None,
    }
}

/// What [`rich_fleet`] made that the requests need.
struct Made {
    router: Router,
    _fleet: Fleet,
    delivered: String,
    to_approve: String,
    to_reject: String,
    pipeline: ring::signature::Ed25519KeyPair,
}

/// The `fleet_fixture` fleet, plus: three hosts of image `edge` sharing a drifted path (a
/// likely image defect) with an item without severity, an unverifiable file and a package
/// upgrade; lifecycle transitions from a reconciler round; `web-1` awaiting its rebuild with
/// `web-2` enrolled as its successor; rebuild actions (one delivered after a failed attempt,
/// two awaiting approval); a token with a recorded last use.
async fn rich_fleet() -> Made {
    let f = fleet().await;
    let s = f.store.as_ref();
    let now = f.now;
    for (n, host) in ["edge-1", "edge-2", "edge-3"].iter().enumerate() {
        enroll(s, host, &[("role", "edge")], now - 5 * DAY).await;
        hello(s, host, "edge", "1", now - 3 * HOUR).await;
        let mut items = vec![file(
            b"/etc/motd",
            ViolationKind::Modified,
            Severity::Low,
            &[("content", "blake3:aa", "blake3:bb")],
        )];
        match n {
            0 => items.push(file(
                b"/etc/issue",
                ViolationKind::Added,
                Severity::Unspecified,
                &[],
            )),
            1 => {
                let mut i = file(
                    b"/var/lib/locked",
                    ViolationKind::Unverifiable,
                    Severity::Medium,
                    &[],
                );
                if let Some(Item::File(v)) = &mut i.item {
                    v.reason = "permission denied".into();
                }
                items.push(i);
            }
            _ => items.push(DriftItem {
                key: driftwatch_proto::set::package_key("openssl", "amd64"),
                item: Some(Item::Package(PackageDrift {
                    name: "openssl".into(),
                    arch: "amd64".into(),
                    kind: PackageDriftKind::Changed as i32,
                    severity: Severity::High as i32,
                    version_before: "3.0.1".into(),
                    state_before: "installed".into(),
                    version_after: "3.0.2".into(),
                    state_after: "installed".into(),
                })),
            }),
        }
        let r = Agent::default().report(true, items, vec![]);
        apply(s, host, r, now - 2 * HOUR).await;
        heartbeat(s, host, now - 2_000).await;
    }
    let p = policy();
    let moved = reconcile::reconcile_once(s, &p, now).await.unwrap();
    assert!(moved >= 3, "{moved} transitions");
    // web-1 awaits its rebuild; web-2 (same role label and image) enrolls as its successor.
    assert!(
        s.record_transition(
            TransitionRecord {
                host_id: "web-1".into(),
                from: Lifecycle::Flagged,
                to: Lifecycle::RebuildRequested,
                at_ms: now + 1,
                cause: "rebuild rb_… triggered".into(),
                actor: "collector".into(),
            },
            audit(now + 1, "host.rebuild_requested", "web-1"),
        )
        .await
        .unwrap()
    );
    enroll(s, "web-2", &[("role", "web")], now + 2).await;
    hello(s, "web-2", "web", "2026.11.1", now + 3).await;
    // Rebuild actions: delivered on the second attempt, and two awaiting approval.
    let a = action("web-1", now - HOUR, ActionState::Pending, now - HOUR);
    assert!(
        s.create_action(a.clone(), audit(now, "rebuild.created", "host:web-1"))
            .await
            .unwrap()
    );
    let mut t = a.clone();
    t.state = ActionState::Triggered;
    t.triggered_ms = Some(now - 50 * MINUTE);
    t.attempts = 1;
    t.next_attempt_ms = Some(now - 49 * MINUTE);
    t.last_error = Some("HTTP 500: receiver down".into());
    let attempt = |n: u32, delivered: bool, status: i32, detail: &str| AttemptRecord {
        action_id: a.id.clone(),
        attempt: n,
        at_ms: now - 50 * MINUTE + i64::from(n) * MINUTE,
        duration_ms: 12,
        delivered,
        status: Some(status),
        detail: detail.into(),
    };
    assert!(
        s.update_action(
            ActionState::Pending,
            t.clone(),
            Some(attempt(1, false, 500, "HTTP 500: receiver down")),
            audit(now, "rebuild.attempt_failed", "host:web-1"),
        )
        .await
        .unwrap()
    );
    let mut d = t.clone();
    d.state = ActionState::Delivered;
    d.attempts = 2;
    d.next_attempt_ms = None;
    assert!(
        s.update_action(
            ActionState::Triggered,
            d,
            Some(attempt(2, true, 202, "HTTP 202: queued")),
            audit(now, "rebuild.delivered", "host:web-1"),
        )
        .await
        .unwrap()
    );
    // Triggered, its first attempt failed, the next one due.
    let mut retry = action("edge-1", now - HOUR, ActionState::Triggered, now);
    retry.triggered_ms = Some(now - 10 * MINUTE);
    retry.attempts = 1;
    retry.next_attempt_ms = Some(now + MINUTE);
    retry.last_error = Some("connection refused".into());
    assert!(
        s.create_action(retry, audit(now, "rebuild.created", "host:edge-1"))
            .await
            .unwrap()
    );
    let mut ids = Vec::new();
    for host in ["old-1", "inc-1"] {
        let b = action(host, now - 2 * HOUR, ActionState::PendingApproval, now);
        ids.push(b.id.clone());
        assert!(
            s.create_action(b, audit(now, "rebuild.created", host))
                .await
                .unwrap()
        );
    }
    s.touch_api_token("000000a1", now - MINUTE).await.unwrap();
    // A token for the revocation requests.
    s.create_api_token(
        ApiToken {
            id: "0000d001".into(),
            name: "to revoke".into(),
            role: Role::Auditor,
            secret_sha256: [0xd1; 32],
            created_ms: now - DAY,
            expires_ms: Some(now + DAY),
            revoked_ms: None,
            last_used_ms: None,
            created_by: "local:test".into(),
        },
        audit(now, "api_token.created", "0000d001"),
    )
    .await
    .unwrap();
    let pipeline = keypair();
    let router = http::router_with(
        f.store.clone(),
        ApiConfig::default(),
        Arc::new(p),
        Arc::new(vec![raw_key(&pipeline)]),
    );
    Made {
        router,
        _fleet: f,
        delivered: a.id,
        to_approve: ids[0].clone(),
        to_reject: ids[1].clone(),
        pipeline,
    }
}

/// The operation of the document `method target` is answered by.
fn operation_of<'d>(doc: &'d Value, method: &str, target: &str) -> (String, &'d Value) {
    let path = target.split('?').next().unwrap();
    let segs: Vec<&str> = path.split('/').collect();
    let mut found = Vec::new();
    for (template, item) in doc["paths"].as_object().unwrap() {
        let t: Vec<&str> = template.split('/').collect();
        let fits = t.len() == segs.len()
            && t.iter()
                .zip(&segs)
                .all(|(t, s)| t == s || (t.starts_with('{') && !s.is_empty()));
        if let (true, Some(op)) = (fits, item.get(method.to_lowercase())) {
            found.push((template.clone(), op));
        }
    }
    assert_eq!(found.len(), 1, "{method} {target}: operations {found:?}");
    found.pop().unwrap()
}

/// Checks one answer against the document; the `(schema, property)`s it saw go to `seen`.
fn check_answer(
    doc: &Value,
    method: &str,
    target: &str,
    a: &Answer,
    seen: &mut BTreeSet<(String, String)>,
) -> (String, u16) {
    let (template, op) = operation_of(doc, method, target);
    let what = format!("{method} {target} → {}", a.status);
    let mut response = op["responses"]
        .get(a.status.to_string())
        .unwrap_or_else(|| {
            panic!(
                "{what}: status not documented; body {}",
                String::from_utf8_lossy(&a.body)
            )
        });
    if let Some(r) = response.get("$ref") {
        response = resolve(doc, r.as_str().unwrap()).unwrap();
    }
    let content = response["content"].as_object().unwrap();
    let media = a.content_type.split(';').next().unwrap().trim();
    let Some(media_type) = content.get(media) else {
        panic!("{what}: content type {:?} not documented", a.content_type);
    };
    if let Some(headers) = response.get("headers").and_then(Value::as_object) {
        for h in headers.keys() {
            assert_eq!(h, "WWW-Authenticate", "{what}: only this header is checked");
            assert!(a.www_authenticate.is_some(), "{what}: no {h}");
        }
    }
    let schema = &media_type["schema"];
    let instance = if media == "application/json" {
        serde_json::from_slice(&a.body).unwrap_or_else(|e| panic!("{what}: not JSON: {e}"))
    } else {
        Value::String(String::from_utf8(a.body.clone()).unwrap())
    };
    let mut v = Validator::new(doc);
    if let Err(e) = v.validate(schema, "(response)", &instance, "$") {
        panic!("{what}: the body does not match the document: {e}\nbody: {instance}");
    }
    if a.status >= 400 && instance.get("error").is_some() {
        assert_eq!(instance["error"]["status"], a.status, "{what}");
    }
    seen.extend(v.seen);
    (format!("{method} {template}"), a.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_matches_the_documented_schema() {
    let doc = spec();
    let m = rich_fleet().await;
    let r = &m.router;
    let (auditor, operator, admin) = (Some(Role::Auditor), Some(Role::Operator), Some(Role::Admin));
    let ack_old =
        r#"{"paths":[{"text":"/etc/ssh/sshd_config"}],"reason":"CHG-7","expires_in":"1d"}"#;
    let ack_edge = json!({"packages": ["openssl"], "reason": "CHG-8",
        "expires_at": driftwatch_collector::api::rfc3339_ms(fleet_fixture::now_ms() + 2 * DAY)})
    .to_string();
    let push_web = json!({"signed_header": signed_header_expiring(
        &m.pipeline, "web", "2026.11.1", 0xab, Some(4_102_444_800))})
    .to_string();
    let push_edge =
        json!({"signed_header": signed_header(&m.pipeline, "edge", "1", 0xab)}).to_string();
    let untrusted =
        json!({"signed_header": signed_header(&keypair(), "web", "2027.1", 0xab)}).to_string();
    let (delivered, approve, reject) = (&m.delivered, &m.to_approve, &m.to_reject);
    let hosts = [
        "web-1", "web-2", "db-1", "old-1", "inc-1", "gone-1", "new-1", "edge-1", "edge-2", "edge-3",
    ];

    // (method, target, token, body, the status the fixture must produce), in order: later
    // requests see what earlier ones changed.
    let mut cases: Vec<Case> = vec![
        ("GET", "/healthz".into(), None, None, 200),
        ("GET", "/api/v1/openapi.json".into(), auditor, None, 200),
        ("GET", "/api/v1/hosts".into(), auditor, None, 200),
        (
            "GET",
            "/api/v1/hosts?state=drifted".into(),
            auditor,
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/hosts?state=dirty".into(),
            auditor,
            None,
            400,
        ),
        ("GET", "/api/v1/hosts/nope".into(), auditor, None, 404),
        ("GET", "/api/v1/hosts/%FF".into(), auditor, None, 400),
        (
            "GET",
            "/api/v1/hosts/nope/violations".into(),
            auditor,
            None,
            404,
        ),
        (
            "GET",
            "/api/v1/violations?include_resolved=true&limit=10000".into(),
            auditor,
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/violations?kind=changed".into(),
            auditor,
            None,
            400,
        ),
        (
            "GET",
            "/api/v1/security-events?since=30d".into(),
            auditor,
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/export?format=jsonl&since=30d".into(),
            auditor,
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/export?format=csv".into(),
            auditor,
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/export?format=cef".into(),
            auditor,
            None,
            200,
        ),
        ("GET", "/api/v1/export".into(), auditor, None, 400),
        (
            "POST",
            "/api/v1/tokens".into(),
            admin,
            Some(r#"{"name":"ci","role":"operator","ttl":"30d"}"#.into()),
            201,
        ),
        (
            "POST",
            "/api/v1/tokens".into(),
            admin,
            Some("not json".into()),
            422,
        ),
        ("DELETE", "/api/v1/tokens/0000d001".into(), admin, None, 200),
        ("DELETE", "/api/v1/tokens/0000d001".into(), admin, None, 409),
        ("DELETE", "/api/v1/tokens/12345678".into(), admin, None, 404),
        ("DELETE", "/api/v1/tokens/%FF".into(), admin, None, 422),
        ("GET", "/api/v1/tokens".into(), admin, None, 200),
        (
            "POST",
            "/api/v1/enrollment-tokens".into(),
            admin,
            Some(r#"{"ttl":"10m","uses":2,"host_pattern":"web-*"}"#.into()),
            201,
        ),
        (
            "POST",
            "/api/v1/enrollment-tokens".into(),
            admin,
            Some(r#"{"uses":0}"#.into()),
            422,
        ),
        ("GET", "/api/v1/enrollment-tokens".into(), admin, None, 200),
        (
            "GET",
            "/api/v1/hosts/web-1/transitions".into(),
            auditor,
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/hosts/nope/transitions".into(),
            auditor,
            None,
            404,
        ),
        (
            "GET",
            "/api/v1/hosts/nope/explain".into(),
            auditor,
            None,
            404,
        ),
        // Baselines: web's root is what its hosts run; edge's too.
        (
            "POST",
            "/api/v1/baselines".into(),
            admin,
            Some(push_web.clone()),
            200,
        ),
        (
            "POST",
            "/api/v1/baselines".into(),
            admin,
            Some(push_web),
            409,
        ),
        (
            "POST",
            "/api/v1/baselines".into(),
            admin,
            Some(push_edge),
            200,
        ),
        (
            "POST",
            "/api/v1/baselines".into(),
            admin,
            Some(untrusted),
            422,
        ),
        (
            "POST",
            "/api/v1/baselines".into(),
            admin,
            Some(r#"{"signed_header":"not base64!"}"#.into()),
            400,
        ),
        ("GET", "/api/v1/images".into(), auditor, None, 200),
        ("GET", "/api/v1/images/web".into(), auditor, None, 200),
        ("GET", "/api/v1/images/edge".into(), auditor, None, 200),
        ("GET", "/api/v1/images/nope".into(), auditor, None, 404),
        ("GET", "/api/v1/rebuilds".into(), auditor, None, 200),
        (
            "GET",
            "/api/v1/rebuilds?state=pending_approval&host=old-1".into(),
            auditor,
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/rebuilds?state=waiting".into(),
            auditor,
            None,
            400,
        ),
        (
            "GET",
            format!("/api/v1/rebuilds/{delivered}"),
            auditor,
            None,
            200,
        ),
        (
            "GET",
            "/api/v1/rebuilds/rb_00000000000000000000".into(),
            auditor,
            None,
            404,
        ),
        (
            "POST",
            format!("/api/v1/rebuilds/{approve}/approve"),
            operator,
            Some(r#"{"reason":"drift confirmed"}"#.into()),
            200,
        ),
        (
            "POST",
            format!("/api/v1/rebuilds/{approve}/approve"),
            operator,
            Some(r#"{"reason":"again"}"#.into()),
            409,
        ),
        (
            "POST",
            format!("/api/v1/rebuilds/{reject}/approve"),
            operator,
            Some("{}".into()),
            400,
        ),
        (
            "POST",
            "/api/v1/rebuilds/rb_00000000000000000000/approve".into(),
            operator,
            Some(r#"{"reason":"x"}"#.into()),
            404,
        ),
        (
            "POST",
            format!("/api/v1/rebuilds/{reject}/reject"),
            admin,
            Some(r#"{"reason":"forensics first"}"#.into()),
            200,
        ),
        (
            "POST",
            format!("/api/v1/rebuilds/{reject}/reject"),
            operator,
            Some(r#"{"reason":"again"}"#.into()),
            409,
        ),
        (
            "POST",
            format!("/api/v1/rebuilds/{reject}/reject"),
            operator,
            Some(r#"{"reason":"a\nb"}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/v1/rebuilds/rb_00000000000000000000/reject".into(),
            operator,
            Some(r#"{"reason":"x"}"#.into()),
            404,
        ),
        (
            "GET",
            format!("/api/v1/rebuilds/{reject}"),
            auditor,
            None,
            200,
        ),
    ];
    // Every host as it is, explained before and after the acknowledgements.
    for h in hosts {
        cases.push(("GET", format!("/api/v1/hosts/{h}"), auditor, None, 200));
        cases.push((
            "GET",
            format!("/api/v1/hosts/{h}/violations?include_resolved=true"),
            auditor,
            None,
            200,
        ));
        cases.push((
            "GET",
            format!("/api/v1/hosts/{h}/explain"),
            auditor,
            None,
            200,
        ));
    }
    cases.extend([
        (
            "POST",
            "/api/v1/hosts/old-1/violations/ack".to_string(),
            operator,
            Some(ack_old.to_string()),
            200,
        ),
        (
            "POST",
            "/api/v1/hosts/edge-3/violations/ack".into(),
            operator,
            Some(ack_edge),
            200,
        ),
        (
            "POST",
            "/api/v1/hosts/edge-3/violations/ack".into(),
            operator,
            Some(r#"{"paths":[{"text":"/etc/passwd"}],"reason":"x","expires_in":"1d"}"#.into()),
            400,
        ),
        (
            "POST",
            "/api/v1/hosts/edge-1/violations/ack".into(),
            operator,
            Some(r#"{"all":true,"reason":"known","expires_in":"1h"}"#.into()),
            200,
        ),
        (
            "POST",
            "/api/v1/hosts/nope/violations/ack".into(),
            operator,
            Some(r#"{"all":true,"reason":"x","expires_in":"1d"}"#.into()),
            404,
        ),
        (
            "POST",
            "/api/v1/hosts/db-1/retire".into(),
            operator,
            Some(r#"{"reason":"decommissioned"}"#.into()),
            200,
        ),
        (
            "POST",
            "/api/v1/hosts/db-1/retire".into(),
            operator,
            Some(r#"{"reason":"again"}"#.into()),
            409,
        ),
        (
            "POST",
            "/api/v1/hosts/inc-1/retire".into(),
            operator,
            Some("{}".into()),
            400,
        ),
        (
            "POST",
            "/api/v1/hosts/nope/retire".into(),
            operator,
            Some(r#"{"reason":"x"}"#.into()),
            404,
        ),
        (
            "GET",
            "/api/v1/audit?limit=10000".into(),
            auditor,
            None,
            200,
        ),
        ("GET", "/api/v1/audit?after=-1".into(), auditor, None, 400),
    ]);
    for h in ["old-1", "edge-3", "db-1"] {
        cases.push((
            "GET",
            format!("/api/v1/hosts/{h}/explain"),
            auditor,
            None,
            200,
        ));
    }
    // Every route without a token (401), with a role below its own (403), and every GET with
    // an unknown parameter (400 where the document says parameters are strict, 2xx else).
    for &(method, path, target, role, body, _) in routes::ROUTES {
        let target = target.replace("{fresh}", "ffffffff");
        let body = body.map(String::from);
        if let Some(needed) = role {
            cases.push((method, target.clone(), None, body.clone(), 401));
            if needed != Role::Auditor {
                cases.push((method, target.clone(), auditor, body.clone(), 403));
            }
        }
        if method == "GET" && path != "/api/v1/export" {
            let target = format!("{}?bogus=1", path_with_examples(path, delivered));
            let strict = operation_of(&doc, method, &target).1["responses"]
                .get("400")
                .is_some();
            cases.push((method, target, admin, None, if strict { 400 } else { 200 }));
        }
    }

    let mut seen = BTreeSet::new();
    let mut covered = BTreeSet::new();
    for (method, target, token, body, want) in &cases {
        let a = call(r, method, target, *token, body.as_deref()).await;
        assert_eq!(
            a.status,
            *want,
            "{method} {target}: {}",
            String::from_utf8_lossy(&a.body)
        );
        covered.insert(check_answer(&doc, method, target, &a, &mut seen));
        // A body the server accepted is one the document describes.
        if let (Some(b), 200..=299) = (body, a.status) {
            let op = operation_of(&doc, method, target).1;
            let schema = &op["requestBody"]["content"]["application/json"]["schema"];
            let instance: Value = serde_json::from_str(b).unwrap();
            let mut v = Validator::new(&doc);
            if let Err(e) = v.validate(schema, "(request)", &instance, "$") {
                panic!("{method} {target}: accepted body {b} is not as documented: {e}");
            }
            seen.extend(v.seen);
        }
    }

    // Every documented status but 5xx (a database that fails, a timeout) was produced.
    let mut never = Vec::new();
    for ((m, p), op) in operations(&doc) {
        for status in op["responses"].as_object().unwrap().keys() {
            let s: u16 = status.parse().unwrap();
            if s < 500 && !covered.contains(&(format!("{m} {p}"), s)) {
                never.push(format!("{m} {p} {s}"));
            }
        }
    }
    assert!(never.is_empty(), "documented but never answered: {never:?}");

    // Every documented field was sent at least once (the document lists no field the server
    // never sends), except those only a failing database brings.
    let mut declared = BTreeSet::new();
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        properties_of(schema, name, &mut declared);
    }
    let only_on_failure: BTreeSet<(String, String)> =
        [("Health".to_string(), "error".to_string())].into();
    let unseen: Vec<_> = declared
        .difference(&seen)
        .filter(|p| !only_on_failure.contains(*p))
        .collect();
    assert!(
        unseen.is_empty(),
        "documented fields never sent: {unseen:?}"
    );
}

/// A request: method, target, token, body, and the status the fixture must produce.
type Case = (&'static str, String, Option<Role>, Option<String>, u16);

/// A route's path with its parameters filled in with values the fixture has.
fn path_with_examples(path: &str, rebuild: &str) -> String {
    path.replace("{host_id}", "web-1")
        .replace("{image_id}", "web")
        .replace("{id}", rebuild)
}
