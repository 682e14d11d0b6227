//! Rebuild actions end to end inside one process: a real SQLite store, hosts moved through the
//! lifecycle with `LifecycleStore::record_transition`, the real dispatcher and executor, and a
//! real HTTP receiver on loopback that verifies every Standard Webhooks signature and
//! "rebuilds" (marks the host replaced) after a moment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet_fixture;

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use driftwatch_collector::actions::config::{ActionSettings, RawActions};
use driftwatch_collector::actions::dispatcher::Dispatcher;
use driftwatch_collector::actions::executor::Executor;
use driftwatch_collector::actions::webhook::{DEFAULT_TOLERANCE, Secret, generate_secret};
use driftwatch_collector::http::auth::Role;
use driftwatch_collector::lifecycle::Lifecycle;
use driftwatch_collector::storage::actions::{ActionFilter, ActionState};
use driftwatch_collector::storage::{
    AuditEntry, HelloInfo, IssuedCertificate, SqliteStore, Storage, TransitionRecord,
};
use tower::ServiceExt;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// What the receiver saw.
#[derive(Debug, Default)]
struct Seen {
    /// (webhook-id, host id) of every verified request, in arrival order.
    requests: Vec<(String, String)>,
    /// Hosts being "rebuilt" right now, and the most at once.
    active: HashSet<String>,
    max_active: usize,
    /// Statuses to answer, front first; empty: 202.
    script: Vec<(u16, &'static str)>,
    /// Arrival times (ms) of each request.
    arrivals: Vec<i64>,
    bad_signatures: usize,
}

#[derive(Clone)]
struct Receiver {
    secret: Secret,
    seen: Arc<Mutex<Seen>>,
    /// Set: after `rebuild_after`, mark the host replaced (as its successor enrolling would).
    rebuild: Option<(Arc<dyn Storage>, Duration)>,
}

async fn receive(
    State(r): State<Receiver>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let now_s = now_ms() / 1000;
    let Ok(id) = r.secret.verify(
        h("webhook-id"),
        h("webhook-timestamp"),
        h("webhook-signature"),
        &body,
        now_s,
        DEFAULT_TOLERANCE,
    ) else {
        r.seen.lock().unwrap().bad_signatures += 1;
        return (StatusCode::UNAUTHORIZED, "bad signature".into());
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["type"], "driftwatch.rebuild.requested");
    assert_eq!(v["data"]["action_id"], id);
    let host = v["data"]["host"]["id"].as_str().unwrap().to_string();
    let status = {
        let mut s = r.seen.lock().unwrap();
        s.arrivals.push(now_ms());
        let status = if s.script.is_empty() {
            (202, "queued")
        } else {
            s.script.remove(0)
        };
        if status.0 / 100 == 2 {
            s.requests.push((id.to_string(), host.clone()));
            s.active.insert(host.clone());
            s.max_active = s.max_active.max(s.active.len());
        }
        status
    };
    if status.0 / 100 == 2
        && let Some((store, after)) = r.rebuild.clone()
    {
        let seen = r.seen.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            // Done on the receiver's side before the collector can know: so `active` never
            // under-counts what the collector considers in flight.
            seen.lock().unwrap().active.remove(&host);
            let ok = store
                .record_transition(
                    transition(&host, Lifecycle::RebuildRequested, Lifecycle::Replaced),
                    audit("host.replaced", &host),
                )
                .await
                .unwrap();
            assert!(ok, "{host} was not rebuild_requested");
        });
    }
    (StatusCode::from_u16(status.0).unwrap(), status.1.into())
}

/// Starts the receiver on 127.0.0.1:0; its URL.
async fn start_receiver(r: Receiver) -> String {
    let app = axum::Router::new()
        .route("/hooks/rebuild", axum::routing::post(receive))
        .with_state(r);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/hooks/rebuild")
}

fn transition(host: &str, from: Lifecycle, to: Lifecycle) -> TransitionRecord {
    TransitionRecord {
        host_id: host.into(),
        from,
        to,
        at_ms: now_ms(),
        cause: format!("test: {from} to {to}"),
        actor: "collector".into(),
    }
}

fn audit(action: &str, host: &str) -> AuditEntry {
    AuditEntry::new(
        now_ms(),
        "collector",
        action,
        format!("host:{host}"),
        serde_json::json!({}),
    )
}

struct Fleet {
    _dir: tempfile::TempDir,
    store: Arc<dyn Storage>,
    secret_text: String,
    secret_file: std::path::PathBuf,
}

async fn fleet(hosts: usize) -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.db");
    let store: Arc<dyn Storage> = Arc::new(
        tokio::task::spawn_blocking(move || SqliteStore::open(path))
            .await
            .unwrap()
            .unwrap(),
    );
    fleet_fixture::add_api_tokens(store.as_ref(), now_ms()).await;
    for i in 0..hosts {
        let host = format!("web-{i:02}");
        store
            .enroll_host(
                vec![("role".into(), "web".into())],
                IssuedCertificate {
                    host_id: host.clone(),
                    serial: host.as_bytes().to_vec(),
                    not_before_ms: 0,
                    not_after_ms: i64::MAX / 2,
                    issued_ms: now_ms(),
                },
                audit("host.enrolled", &host),
            )
            .await
            .unwrap();
        store
            .hello(
                &host,
                HelloInfo {
                    image_id: "web".into(),
                    image_version: "2026.11.1".into(),
                    baseline_root: vec![0xab; 32],
                    ..Default::default()
                },
                now_ms(),
            )
            .await
            .unwrap();
    }
    let secret_text = generate_secret().unwrap();
    let secret_file = dir.path().join("webhook.secret");
    std::fs::write(&secret_file, format!("{secret_text}\n")).unwrap();
    Fleet {
        _dir: dir,
        store,
        secret_text,
        secret_file,
    }
}

async fn flag(store: &dyn Storage, host: &str) {
    assert!(
        store
            .record_transition(
                transition(host, Lifecycle::Enrolled, Lifecycle::Flagged),
                audit("host.flagged", host),
            )
            .await
            .unwrap()
    );
}

fn settings(f: &Fleet, url: &str) -> ActionSettings {
    let mut s = ActionSettings::from_raw(RawActions {
        kind: Some("webhook".into()),
        url: Some(url.into()),
        secret_file: Some(f.secret_file.clone()),
        ..Default::default()
    })
    .unwrap();
    s.approval = false;
    s.max_percent_per_image = 100;
    s.cooldown = Duration::from_secs(3600);
    s.timeout = Duration::from_secs(5);
    s.interval = Duration::from_millis(100);
    s.retry.initial_backoff = Duration::from_millis(300);
    s.retry.max_backoff = Duration::from_secs(2);
    s
}

fn receiver(f: &Fleet, rebuild: Option<Duration>) -> (Receiver, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    (
        Receiver {
            secret: Secret::parse(&f.secret_text).unwrap(),
            seen: seen.clone(),
            rebuild: rebuild.map(|d| (f.store.clone(), d)),
        },
        seen,
    )
}

async fn audit_actions(store: &dyn Storage) -> Vec<String> {
    store
        .audit_records(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect()
}

async fn round(d: &Dispatcher, store: &dyn Storage) {
    let mut lock = store.dispatch_lock().await.unwrap();
    let r = d.round(lock.as_mut(), now_ms()).await.unwrap();
    assert!(r.acted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_drifted_hosts_never_more_than_two_in_flight() {
    let f = fleet(10).await;
    let (r, seen) = receiver(&f, Some(Duration::from_millis(400)));
    let url = start_receiver(r).await;
    let mut s = settings(&f, &url);
    s.max_in_flight = std::num::NonZeroU32::new(2).unwrap();
    let d = Dispatcher::new(f.store.clone(), s.clone(), Executor::load(&s).unwrap());
    for i in 0..10 {
        flag(f.store.as_ref(), &format!("web-{i:02}")).await;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(d.run(stop_rx));
    // Watch the stored state meanwhile: never more than 2 in flight.
    let started = Instant::now();
    let mut max_stored = 0;
    loop {
        let actions = f.store.list_actions(ActionFilter::default()).await.unwrap();
        let in_flight = actions.iter().filter(|a| a.state.is_in_flight()).count();
        max_stored = max_stored.max(in_flight);
        assert!(in_flight <= 2, "{in_flight} in flight: {actions:?}");
        let done = actions
            .iter()
            .filter(|a| a.state == ActionState::Completed)
            .count();
        if done == 10 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "stuck: {actions:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_tx.send(true).unwrap();
    task.await.unwrap();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.bad_signatures, 0);
        assert_eq!(seen.requests.len(), 10, "{:?}", seen.requests);
        let hosts: BTreeSet<&str> = seen.requests.iter().map(|(_, h)| h.as_str()).collect();
        assert_eq!(hosts.len(), 10);
        // The limit was reached, and never exceeded, as the receiver saw it.
        assert_eq!(seen.max_active, 2);
    }
    assert_eq!(max_stored, 2);
    // Every host is replaced; the audit log has the story.
    for h in f.store.lifecycle_states().await.unwrap() {
        assert_eq!(h.state, Lifecycle::Replaced, "{}", h.host_id);
    }
    let log = audit_actions(f.store.as_ref()).await;
    for verb in [
        "rebuild.requested",
        "rebuild.triggered",
        "rebuild.succeeded",
        "rebuild.completed",
    ] {
        assert_eq!(
            log.iter().filter(|a| *a == verb).count(),
            10,
            "{verb}: {log:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approval_mode_holds_until_approved_and_reject_records_the_reason() {
    let f = fleet(2).await;
    let (r, seen) = receiver(&f, None);
    let url = start_receiver(r).await;
    let mut s = settings(&f, &url);
    s.approval = true;
    s.max_in_flight = std::num::NonZeroU32::new(5).unwrap();
    let d = Dispatcher::new(f.store.clone(), s.clone(), Executor::load(&s).unwrap());
    flag(f.store.as_ref(), "web-00").await;
    flag(f.store.as_ref(), "web-01").await;
    for _ in 0..3 {
        round(&d, f.store.as_ref()).await;
    }
    let pending = f
        .store
        .list_actions(ActionFilter {
            state: Some(ActionState::PendingApproval),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(pending.len(), 2);
    assert!(
        seen.lock().unwrap().requests.is_empty(),
        "sent before approval"
    );
    let id = |h: &str| pending.iter().find(|a| a.host_id == h).unwrap().id.clone();
    let api = driftwatch_collector::http::router(f.store.clone(), Default::default());
    let post = |path: String, body: &'static str| {
        axum::http::Request::post(path)
            .header("content-type", "application/json")
            .header("authorization", bearer())
            .body(axum::body::Body::from(body))
            .unwrap()
    };
    // A reason is required.
    let resp = api
        .clone()
        .oneshot(post(
            format!("/api/v1/rebuilds/{}/approve", id("web-00")),
            r#"{"reason":" "}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = api
        .clone()
        .oneshot(post(
            format!("/api/v1/rebuilds/{}/approve", id("web-00")),
            r#"{"reason":"nc installed by hand: confirmed"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = api
        .clone()
        .oneshot(post(
            format!("/api/v1/rebuilds/{}/reject", id("web-01")),
            r#"{"reason":"forensics first"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Deciding twice is a conflict; an unknown id is 404.
    let resp = api
        .clone()
        .oneshot(post(
            format!("/api/v1/rebuilds/{}/approve", id("web-01")),
            r#"{"reason":"x"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let resp = api
        .clone()
        .oneshot(post(
            "/api/v1/rebuilds/rb_nope/approve".into(),
            r#"{"reason":"x"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    round(&d, f.store.as_ref()).await;
    let requests = seen.lock().unwrap().requests.clone();
    assert_eq!(requests, vec![(id("web-00"), "web-00".to_string())]);
    let rejected = f.store.action(&id("web-01")).await.unwrap().unwrap();
    assert_eq!(rejected.state, ActionState::Rejected);
    assert_eq!(rejected.decision_reason.as_deref(), Some("forensics first"));
    assert!(rejected.decided_by.is_some());
    // The listing shows both, as the API documents them.
    let resp = api
        .clone()
        .oneshot(
            axum::http::Request::get("/api/v1/rebuilds?host=web-01")
                .header("authorization", bearer())
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let list: driftwatch_collector::api::RebuildList = serde_json::from_slice(&body).unwrap();
    assert_eq!(list.rebuilds.len(), 1);
    assert_eq!(list.rebuilds[0].state, "rejected");
    assert_eq!(
        list.rebuilds[0].decision_reason.as_deref(),
        Some("forensics first")
    );
    let log = audit_actions(f.store.as_ref()).await;
    assert!(log.contains(&"rebuild.approved".to_string()), "{log:?}");
    assert!(log.contains(&"rebuild.rejected".to_string()), "{log:?}");
    // A rejected flagging is not retried, however many rounds pass.
    round(&d, f.store.as_ref()).await;
    assert_eq!(seen.lock().unwrap().requests.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cooldown_holds_a_host_flagged_again() {
    let f = fleet(1).await;
    let (r, seen) = receiver(&f, None);
    let url = start_receiver(r).await;
    let s = settings(&f, &url);
    let d = Dispatcher::new(f.store.clone(), s.clone(), Executor::load(&s).unwrap());
    let store = f.store.as_ref();
    flag(store, "web-00").await;
    round(&d, store).await;
    round(&d, store).await;
    assert_eq!(seen.lock().unwrap().requests.len(), 1);
    // The rebuild did not help: the host is flagged again (a new flagging, a new action).
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(
        store
            .record_transition(
                transition("web-00", Lifecycle::RebuildRequested, Lifecycle::Flagged),
                audit("host.flagged", "web-00"),
            )
            .await
            .unwrap()
    );
    for _ in 0..3 {
        round(&d, store).await;
    }
    assert_eq!(seen.lock().unwrap().requests.len(), 1, "cool-down ignored");
    let actions = store.list_actions(ActionFilter::default()).await.unwrap();
    assert_eq!(actions[0].state, ActionState::Pending);
    assert_eq!(actions[1].state, ActionState::Completed);
    // An hour later (the configured cool-down) it goes.
    let mut lock = store.dispatch_lock().await.unwrap();
    d.round(lock.as_mut(), now_ms() + 3_600_001).await.unwrap();
    assert_eq!(seen.lock().unwrap().requests.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_receiver_is_retried_with_backoff_and_every_attempt_recorded() {
    let f = fleet(2).await;
    let (r, seen) = receiver(&f, None);
    seen.lock().unwrap().script = vec![(500, "database \u{1b}[2J down"), (503, "still down")];
    let url = start_receiver(r).await;
    let mut s = settings(&f, &url);
    s.retry.max_attempts = std::num::NonZeroU32::new(5).unwrap();
    let d = Dispatcher::new(f.store.clone(), s.clone(), Executor::load(&s).unwrap());
    let store = f.store.as_ref();
    flag(store, "web-00").await;
    let started = Instant::now();
    loop {
        round(&d, store).await;
        let a = store.list_actions(ActionFilter::default()).await.unwrap();
        if a.first().is_some_and(|a| a.state == ActionState::Delivered) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{a:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = store
        .list_actions(ActionFilter::default())
        .await
        .unwrap()
        .remove(0);
    let attempts = store.action_attempts(&a.id).await.unwrap();
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert_eq!(attempts[0].status, Some(500));
    assert_eq!(attempts[0].detail, "HTTP 500: database \\x1b[2J down");
    assert_eq!(attempts[1].status, Some(503));
    assert!(attempts[2].delivered);
    assert_eq!(attempts[2].status, Some(202));
    // Exponential backoff (±20 %): ≥ 240 ms, then ≥ 480 ms.
    let arrivals = seen.lock().unwrap().arrivals.clone();
    assert_eq!(arrivals.len(), 3);
    assert!(arrivals[1] - arrivals[0] >= 240, "{arrivals:?}");
    assert!(arrivals[2] - arrivals[1] >= 480, "{arrivals:?}");
    // Every field the rebuild endpoints answer with is in docs/api.md.
    let api = driftwatch_collector::http::router(f.store.clone(), Default::default());
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).unwrap();
    let mut missing = Vec::new();
    for target in [
        "/api/v1/rebuilds".to_string(),
        format!("/api/v1/rebuilds/{}", a.id),
    ] {
        let resp = api
            .clone()
            .oneshot(
                axum::http::Request::get(target.as_str())
                    .header("authorization", bearer())
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{target}");
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let mut fields = BTreeSet::new();
        field_paths(&v, "", &mut fields);
        for f in fields {
            // The detail's `rebuild` object is documented as `rebuilds[]`.
            let documented = f
                .strip_prefix("rebuild.")
                .map_or_else(|| f.clone(), |rest| format!("rebuilds[].{rest}"));
            if !doc.contains(&format!("`{documented}`")) {
                missing.push(format!("{target}: {f}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fields missing from docs/api.md: {missing:?}"
    );
    let log = audit_actions(store).await;
    assert_eq!(
        log.iter()
            .filter(|a| *a == "rebuild.attempt_failed")
            .count(),
        2
    );
    assert_eq!(log.iter().filter(|a| *a == "rebuild.succeeded").count(), 1);

    // A receiver that never accepts: after max_attempts the action fails and the host is
    // flagged again.
    seen.lock().unwrap().script = vec![(500, "no"); 2];
    let mut s2 = s.clone();
    s2.retry.max_attempts = std::num::NonZeroU32::new(2).unwrap();
    s2.retry.initial_backoff = Duration::from_millis(50);
    // web-00 is still in flight (nobody replaced it): room for one more.
    s2.max_in_flight = std::num::NonZeroU32::new(2).unwrap();
    let d2 = Dispatcher::new(f.store.clone(), s2.clone(), Executor::load(&s2).unwrap());
    flag(store, "web-01").await;
    let started = Instant::now();
    loop {
        round(&d2, store).await;
        let failed = store
            .list_actions(ActionFilter {
                state: Some(ActionState::Failed),
                ..Default::default()
            })
            .await
            .unwrap();
        if !failed.is_empty() {
            assert_eq!(failed[0].attempts, 2);
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let states = store.lifecycle_states().await.unwrap();
    let web01 = states.iter().find(|h| h.host_id == "web-01").unwrap();
    assert_eq!(web01.state, Lifecycle::Flagged);
    assert!(
        audit_actions(store)
            .await
            .contains(&"rebuild.failed".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_sends_nothing_and_says_so() {
    let f = fleet(3).await;
    let (r, seen) = receiver(&f, None);
    let url = start_receiver(r).await;
    let mut s = settings(&f, &url);
    s.dry_run = true;
    s.max_in_flight = std::num::NonZeroU32::new(10).unwrap();
    let d = Dispatcher::new(f.store.clone(), s.clone(), Executor::load(&s).unwrap());
    let store = f.store.as_ref();
    for i in 0..3 {
        flag(store, &format!("web-{i:02}")).await;
    }
    for _ in 0..3 {
        round(&d, store).await;
    }
    assert!(seen.lock().unwrap().requests.is_empty());
    assert_eq!(seen.lock().unwrap().arrivals.len(), 0);
    let actions = store.list_actions(ActionFilter::default()).await.unwrap();
    assert_eq!(actions.len(), 3);
    for a in &actions {
        assert_eq!(a.state, ActionState::DryRun);
        assert!(a.dry_run);
        assert!(a.payload.is_some(), "the body it would have sent is kept");
    }
    for h in store.lifecycle_states().await.unwrap() {
        assert_eq!(h.state, Lifecycle::Flagged, "dry run moved {}", h.host_id);
    }
    let records = store.audit_records(0, 1000).await.unwrap();
    let triggered: Vec<_> = records
        .iter()
        .filter(|r| r.action == "rebuild.triggered")
        .collect();
    assert_eq!(triggered.len(), 3);
    for r in triggered {
        let d: serde_json::Value = serde_json::from_str(&r.detail).unwrap();
        assert_eq!(d["sent"], false);
        assert_eq!(d["dry_run"], true);
    }
}

/// Dotted paths of every field of a JSON value (`a.b`, `list[].c`).
fn field_paths(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                field_paths(v, &p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for v in a {
                field_paths(v, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

/// The `driftwatch` CLI against a served API: tables escape what hosts control, approve works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_escaped_and_approves() {
    let f = fleet(1).await;
    let (r, seen) = receiver(&f, None);
    let url = start_receiver(r).await;
    let mut s = settings(&f, &url);
    s.approval = true;
    let d = Dispatcher::new(f.store.clone(), s.clone(), Executor::load(&s).unwrap());
    let store = f.store.as_ref();
    let mut t = transition("web-00", Lifecycle::Enrolled, Lifecycle::Flagged);
    t.cause = "unexplained change of /etc/\u{1b}[31mx\n|=<b>".into();
    assert!(
        store
            .record_transition(t, audit("host.flagged", "web-00"))
            .await
            .unwrap()
    );
    round(&d, store).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let api = tokio::spawn(driftwatch_collector::http::serve(
        listener,
        f.store.clone(),
        Default::default(),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let api_url = format!("http://{addr}");
    let cli = move |args: Vec<String>| {
        let api_url = api_url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_driftwatch"))
                    .arg("--api")
                    .arg(&api_url)
                    .env("DRIFTWATCH_TOKEN", fleet_fixture::api_token(Role::Operator))
                    .args(&args)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = cli(vec!["rebuilds".into()]).await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("pending_approval"), "{text}");
    assert!(text.contains("/etc/\\x1b[31mx\\n|=<b>"), "{text}");
    assert!(!text.contains('\u{1b}'), "raw ESC in the table: {text}");
    let id = store.list_actions(ActionFilter::default()).await.unwrap()[0]
        .id
        .clone();
    let out = cli(vec![
        "rebuilds".into(),
        "approve".into(),
        id.clone(),
        "--reason".into(),
        "confirmed by hand".into(),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("pending"), "{text}");
    let out = cli(vec![
        "rebuilds".into(),
        "reject".into(),
        id.clone(),
        "--reason".into(),
        "late".into(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not pending_approval"));
    round(&d, store).await;
    assert_eq!(seen.lock().unwrap().requests.len(), 1);
    let out = cli(vec![
        "--format".into(),
        "json".into(),
        "rebuilds".into(),
        "show".into(),
        id.clone(),
    ])
    .await;
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rebuild"]["state"], "delivered");
    assert_eq!(v["attempts"][0]["delivered"], true);
    let _ = stop_tx.send(());
    api.await.unwrap().unwrap();
}

/// The fixture's operator token (operators may also read), as an `Authorization` value.
fn bearer() -> String {
    format!("Bearer {}", fleet_fixture::api_token(Role::Operator))
}
