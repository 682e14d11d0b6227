//! The lifecycle, flagging and image registry endpoints against a real SQLite store (the
//! `fleet_fixture` fleet), served on 127.0.0.1:0 and driven with plain HTTP requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet_fixture;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use driftwatch_collector::flagging::{FlaggingPolicy, RawFlagging};
use driftwatch_collector::http::{self, ApiConfig};
use driftwatch_collector::reconcile::{self, Policy};
use driftwatch_collector::storage::{ReportToApply, Role, Storage, ViolationRecord};
use driftwatch_proto::envelope;
use driftwatch_proto::v1::Report;
use fleet_fixture::{
    Agent, Fleet, apply, fleet, get, keypair, now_ms, raw_key, signed_header, sshd_config,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn policy() -> Policy {
    let raw: RawFlagging = toml::from_str(
        "severity_at_least = \"high\"\npackage_drift = true\nregistered_root = true",
    )
    .unwrap();
    Policy {
        flagging: FlaggingPolicy::from_raw(raw).unwrap(),
        ..Policy::default()
    }
}

async fn serve_with(
    store: Arc<dyn Storage>,
    policy: Policy,
    trusted: Vec<[u8; 32]>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = http::router_with(
        store,
        ApiConfig::default(),
        Arc::new(policy),
        Arc::new(trusted),
    );
    tokio::spawn(http::serve_router(listener, router, async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

/// A plain HTTP/1.1 POST of a JSON body: status and body.
async fn post(addr: SocketAddr, target: &str, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Authorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            fleet_fixture::api_token(Role::Admin),
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("response within 30 s")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}")),
    )
}

fn codes(explain: &Value) -> Vec<&str> {
    explain["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_names_the_reasons_and_acknowledgements_silence_them() {
    let Fleet { store, .. } = fleet().await;
    let (addr, _stop) = serve_with(store.clone(), policy(), vec![]).await;

    let (status, e) = get(addr, "/api/v1/hosts/web-1/explain").await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["flagged"], true);
    assert_eq!(e["verdict"], "flagged");
    // Nothing is registered for image "web": with registered_root on, that is a reason too.
    assert_eq!(
        codes(&e),
        ["severity", "package_drift", "image_unregistered"],
        "{e}"
    );
    assert_eq!(
        e["reasons"][0]["evidence"]["paths"],
        json!([{"text": "/etc/ssh/sshd_config"}])
    );
    assert_eq!(
        e["reasons"][1]["evidence"]["packages"],
        json!(["curl:amd64"])
    );
    assert_eq!(e["reasons"][2]["evidence"]["observed"], "web");
    assert_eq!(e["lifecycle"], "enrolled");

    // An operator acknowledges the two items for a day.
    let (status, a) = post(
        addr,
        "/api/v1/hosts/web-1/violations/ack",
        &json!({
            "paths": [{"text": "/etc/ssh/sshd_config"}],
            "packages": ["curl"],
            "reason": "hardening rollout CHG-7",
            "expires_in": "1d",
        }),
    )
    .await;
    assert_eq!(status, 200, "{a}");
    assert_eq!(a["acknowledged"].as_array().unwrap().len(), 2, "{a}");
    let (_, e) = get(addr, "/api/v1/hosts/web-1/explain").await;
    assert_eq!(codes(&e), ["image_unregistered"], "{e}");
    let not_counted = e["not_counted"].as_array().unwrap();
    assert_eq!(not_counted.len(), 2, "{e}");
    assert!(not_counted.iter().all(|n| n["why"] == "acknowledged"
        && n["reason"] == "hardening rollout CHG-7"
        && n["acknowledged_by"].as_str().unwrap().starts_with("token:")));

    // Refusals: each names what is wrong.
    for (target, body, status, code) in [
        (
            "/api/v1/hosts/web-1/violations/ack",
            json!({"paths": [{"text": "/etc/passwd"}], "reason": "x", "expires_in": "1d"}),
            400,
            "bad_parameter",
        ),
        (
            "/api/v1/hosts/web-1/violations/ack",
            json!({"all": true, "reason": "", "expires_in": "1d"}),
            400,
            "bad_parameter",
        ),
        (
            "/api/v1/hosts/web-1/violations/ack",
            json!({"all": true, "reason": "x"}),
            400,
            "bad_parameter",
        ),
        (
            "/api/v1/hosts/web-1/violations/ack",
            json!({"all": true, "reason": "x", "expires_in": "400d"}),
            400,
            "bad_parameter",
        ),
        (
            "/api/v1/hosts/web-1/violations/ack",
            json!({"all": true, "reason": "x", "expires_in": "1d", "extra": 1}),
            400,
            "bad_parameter",
        ),
        (
            "/api/v1/hosts/nope/violations/ack",
            json!({"all": true, "reason": "x", "expires_in": "1d"}),
            404,
            "not_found",
        ),
    ] {
        let (s, b) = post(addr, target, &body).await;
        assert_eq!(
            (s, b["error"]["code"].as_str().unwrap()),
            (status, code),
            "{body}: {b}"
        );
    }
    let (status, _) = get(addr, "/api/v1/hosts/nope/explain").await;
    assert_eq!(status, 404);
}

/// The reconciler keeps the open rows of earlier rounds (`reconcile::OpenCache`); a host that
/// reports after a round must be read again, whether it was held or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_rounds_reread_hosts_that_reported_since() {
    let Fleet { store, .. } = fleet().await;
    let p = policy();
    let cache = reconcile::OpenCache::default();
    let n = reconcile::reconcile_round(&*store, &p, now_ms(), &cache)
        .await
        .unwrap();
    assert!(n >= 3, "{n} transitions");
    // web-1 and old-1 have open drift.
    assert_eq!(cache.len(), 2);
    assert_eq!(
        reconcile::reconcile_round(&*store, &p, now_ms(), &cache)
            .await
            .unwrap(),
        0
    );
    // db-1 had no open drift (nothing held for it); after a report it is read.
    let mut db = Agent::default();
    let _ = db.report(true, vec![], vec![]); // its first report, already applied
    let r = db.report(false, vec![sshd_config()], vec![]);
    apply(&*store, "db-1", r, now_ms()).await;
    reconcile::reconcile_round(&*store, &p, now_ms(), &cache)
        .await
        .unwrap();
    assert_eq!(cache.len(), 3);
    let snap = reconcile::gather_cached(&*store, now_ms(), None, &cache)
        .await
        .unwrap();
    assert_eq!(snap.open["db-1"].len(), 1);
    // Held now; it reports again: the next snapshot has the new row.
    let r = db.report(
        false,
        vec![fleet_fixture::file(
            b"/etc/motd",
            driftwatch_proto::v1::ViolationKind::Modified,
            driftwatch_proto::v1::Severity::Low,
            &[],
        )],
        vec![],
    );
    apply(&*store, "db-1", r, now_ms()).await;
    let snap = reconcile::gather_cached(&*store, now_ms(), None, &cache)
        .await
        .unwrap();
    assert_eq!(snap.open["db-1"].len(), 2);
    let fresh = reconcile::gather(&*store, now_ms(), None).await.unwrap();
    assert_eq!(snap.open, fresh.open);
}

/// A round through `cache`, then a fresh snapshot of the same store to compare it with.
async fn round_and_fresh(
    store: &dyn Storage,
    cache: &reconcile::OpenCache,
) -> (reconcile::Snapshot, reconcile::Snapshot) {
    let snap = reconcile::gather_cached(store, now_ms(), None, cache)
        .await
        .unwrap();
    let fresh = reconcile::gather(store, now_ms(), None).await.unwrap();
    (snap, fresh)
}

/// What the ingest does with each batch of one report, received at `at`: note whether the
/// reconciler's cache wants the report, apply, then move (or start) the held rows.
async fn ingest_one(
    store: &Arc<dyn Storage>,
    cache: &reconcile::OpenCache,
    host: &str,
    report: Report,
    at: i64,
) {
    let wanted = cache.wants(host, &report);
    let to = ReportToApply {
        host_id: host.into(),
        report: report.clone(),
        received_ms: at,
    };
    let outcome = store.apply_reports(vec![to]).await.unwrap().remove(0);
    if wanted {
        cache.advance(host, report, at, &outcome);
    }
}

/// A snapshot's open rows, each host's sorted by key (a replay keeps them in another order).
fn open_by_key(snap: &reconcile::Snapshot) -> BTreeMap<String, Vec<ViolationRecord>> {
    snap.open
        .iter()
        .map(|(h, rows)| {
            let mut rows = rows.to_vec();
            rows.sort_by(|a, b| a.key.cmp(&b.key));
            (h.clone(), rows)
        })
        .collect()
}

/// The background reconciler's cache spreads a round's reads over half its interval, and the
/// reports the ingest applies move the rows it holds along with the stored ones, so the next
/// round needs no read; a report that does not follow the held position drops the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_cache_spreads_reads_and_follows_applied_reports() {
    use driftwatch_proto::v1::{Severity, ViolationKind};
    let Fleet { store, .. } = fleet().await;
    let interval = Duration::from_secs(2);
    let cache = reconcile::OpenCache::background(interval);
    let started = std::time::Instant::now();
    let snap = reconcile::gather_cached(&*store, now_ms(), None, &cache)
        .await
        .unwrap();
    // web-1 and old-1 have open drift: two reads over 1 s, the first due at 0.5 s.
    let took = started.elapsed();
    assert_eq!((snap.open.len(), cache.reads()), (2, 2));
    assert!(
        took >= interval / 4,
        "two reads spread over 1 s took {took:?}"
    );
    let fresh = reconcile::gather(&*store, now_ms(), None).await.unwrap();
    assert_eq!(snap.open, fresh.open);

    let apply_and_advance =
        |report: Report, at: i64| ingest_one(&store, &cache, "old-1", report, at);
    let sshd = |digest: &str| {
        fleet_fixture::file(
            b"/etc/ssh/sshd_config",
            ViolationKind::Modified,
            Severity::High,
            &[("content", "blake3:aaaa", digest)],
        )
    };
    let motd = |sev| fleet_fixture::file(b"/etc/motd", ViolationKind::Modified, sev, &[]);
    let issue = fleet_fixture::file(b"/etc/issue", ViolationKind::Added, Severity::Low, &[]);
    let mut old = Agent::default();
    let _ = old.report(true, vec![sshd_config()], vec![]); // seq 1, applied by the fixture
    let t = now_ms();
    // New content, a new item, a changed one and a removal, then a full report.
    apply_and_advance(old.report(false, vec![sshd("blake3:cccc")], vec![]), t).await;
    apply_and_advance(
        old.report(false, vec![motd(Severity::Low), issue.clone()], vec![]),
        t + 1,
    )
    .await;
    apply_and_advance(
        old.report(
            false,
            vec![motd(Severity::Critical)],
            vec![issue.key.clone()],
        ),
        t + 2,
    )
    .await;
    apply_and_advance(
        old.report(
            true,
            vec![motd(Severity::Critical), sshd("blake3:dddd")],
            vec![],
        ),
        t + 3,
    )
    .await;
    let (snap, fresh) = round_and_fresh(&*store, &cache).await;
    assert_eq!(
        cache.reads(),
        2,
        "a host the ingest moved along was read again"
    );
    assert_eq!(snap.open["old-1"].len(), 2);
    assert_eq!(open_by_key(&snap), open_by_key(&fresh));

    // A gap (seq 7 after 5): the rows cannot follow it, the next round reads the host.
    let _ = old.report(false, vec![], vec![]);
    apply_and_advance(old.report(false, vec![motd(Severity::Low)], vec![]), t + 4).await;
    let (snap, fresh) = round_and_fresh(&*store, &cache).await;
    assert_eq!(cache.reads(), 3);
    assert_eq!(open_by_key(&snap), open_by_key(&fresh));
}

/// Hosts with no open item (a fleet's new hosts, a clean one) are held from the report that
/// opens their first items, with the rows the storage has: the next round reads neither. A host
/// that had open items, or a report whose digest the storage does not reach, starts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_that_drift_from_clean_are_held_without_a_read() {
    use driftwatch_proto::v1::{Severity, ViolationKind};
    let Fleet { store, .. } = fleet().await;
    let cache = reconcile::OpenCache::default();
    let _ = reconcile::gather_cached(&*store, now_ms(), None, &cache)
        .await
        .unwrap();
    // web-1 and old-1 have open drift; db-1 is clean; new-1 never reported.
    assert_eq!((cache.len(), cache.reads()), (2, 2));
    let t = now_ms();
    let mut new = Agent::default();
    let first = new.report(true, vec![sshd_config()], vec![]);
    ingest_one(&store, &cache, "new-1", first, t).await;
    let mut db = Agent::default();
    let _ = db.report(true, vec![], vec![]); // seq 1, applied by the fixture
    let motd = fleet_fixture::file(b"/etc/motd", ViolationKind::Modified, Severity::Low, &[]);
    ingest_one(
        &store,
        &cache,
        "db-1",
        db.report(false, vec![sshd_config(), motd.clone()], vec![]),
        t + 1,
    )
    .await;
    assert!(cache.holds("new-1") && cache.holds("db-1"));
    let (snap, fresh) = round_and_fresh(&*store, &cache).await;
    assert_eq!(
        cache.reads(),
        2,
        "a host held from its first drift was read"
    );
    assert_eq!((snap.open["new-1"].len(), snap.open["db-1"].len()), (1, 2));
    assert_eq!(open_by_key(&snap), open_by_key(&fresh));

    // Nothing held: old-1 had open drift before its report, so its rows are not started from
    // it, not even from a full report, which names the whole set: sshd_config was first seen
    // three days before it.
    let empty = reconcile::OpenCache::default();
    let mut old = Agent::default();
    let _ = old.report(true, vec![sshd_config()], vec![]); // seq 1, applied by the fixture
    ingest_one(
        &store,
        &empty,
        "old-1",
        old.report(true, vec![sshd_config(), motd], vec![]),
        t + 2,
    )
    .await;
    assert!(!empty.holds("old-1"));
    // A clean host whose report does not come out as the digest it names (the ingest then asks
    // for a resync) is not held either.
    let mut inc = Agent::default();
    let _ = inc.report(true, vec![], vec![]); // seq 1, applied by the fixture
    let mut r = inc.report(false, vec![sshd_config()], vec![]);
    r.set_digest = vec![0; 32];
    ingest_one(&store, &empty, "inc-1", r, t + 3).await;
    assert!(empty.is_empty());
}

/// A round spreads its reads over seconds, and reports keep committing meanwhile: rows read
/// after a commit must be held at the position they were read at, not at the round's older
/// listing — else the ingest's next report does not follow them, the host is dropped, and a
/// busy fleet is read again every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_read_while_reports_commit_are_held_where_they_were_read() {
    use driftwatch_proto::v1::{Severity, ViolationKind};
    let Fleet { store, .. } = fleet().await;
    // Two hosts with open drift: one read at once, the other 1 s later (spread over 2 s).
    let cache = Arc::new(reconcile::OpenCache::background(Duration::from_secs(4)));
    // The fixture applied web-1's seq 1 and 2 and old-1's seq 1.
    let mut web = Agent::default();
    let _ = web.report(true, vec![], vec![]);
    let _ = web.report(true, vec![], vec![]);
    let mut old = Agent::default();
    let _ = old.report(true, vec![sshd_config()], vec![]);
    // The next report of each host, as the ingest applies it: /etc/motd at `sev` (web-1's
    // first one a full report, which resolves what it does not list).
    let mut next = |sev: Severity| {
        let motd = fleet_fixture::file(b"/etc/motd", ViolationKind::Modified, sev, &[]);
        let full = web.report(sev == Severity::Low, vec![motd.clone()], vec![]);
        let upsert = old.report(false, vec![motd], vec![]);
        let (store, cache) = (store.clone(), cache.clone());
        async move {
            ingest_one(&store, &cache, "web-1", full, now_ms()).await;
            ingest_one(&store, &cache, "old-1", upsert, now_ms()).await;
        }
    };

    let round = tokio::spawn({
        let (store, cache) = (store.clone(), cache.clone());
        async move { reconcile::gather_cached(&*store, now_ms(), None, &cache).await }
    });
    // Once the round's first read is held, before its second read (due 1 s after the first).
    for _ in 0..100 {
        if cache.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        cache.len(),
        1,
        "the round's first read is not held after 0.5 s"
    );
    next(Severity::Low).await;
    let snap = round.await.unwrap().unwrap();
    assert_eq!((snap.open.len(), cache.reads()), (2, 2));

    // The next reports follow the held rows of both hosts, whichever was read after the commit.
    next(Severity::High).await;
    let (snap, fresh) = round_and_fresh(&*store, &cache).await;
    assert_eq!(
        cache.reads(),
        2,
        "a host read after a commit during the round was read again"
    );
    assert_eq!(open_by_key(&snap), open_by_key(&fresh));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_records_transitions_the_api_shows() {
    let Fleet { store, .. } = fleet().await;
    let p = policy();
    let n = reconcile::reconcile_once(&*store, &p, now_ms())
        .await
        .unwrap();
    assert!(n >= 3, "{n} transitions");
    // A second round right after changes nothing.
    assert_eq!(
        reconcile::reconcile_once(&*store, &p, now_ms())
            .await
            .unwrap(),
        0
    );
    let (addr, _stop) = serve_with(store.clone(), p, vec![]).await;

    let (_, list) = get(addr, "/api/v1/hosts").await;
    let lifecycle: Vec<(&str, &str)> = list["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["host_id"].as_str().unwrap(),
                h["lifecycle"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        lifecycle,
        [
            // Unregistered image: flagged under registered_root.
            ("db-1", "flagged"),
            ("gone-1", "enrolled"), // revoked: not assessed
            ("inc-1", "flagged"),
            ("new-1", "enrolled"), // never heard from, not silent yet
            ("old-1", "flagged"),  // silent, but flagged for its drift first
            ("web-1", "flagged"),
        ]
    );
    let (status, t) = get(addr, "/api/v1/hosts/web-1/transitions").await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["lifecycle"], "flagged");
    let first = &t["transitions"][0];
    assert_eq!(
        (first["from"].as_str(), first["to"].as_str()),
        (Some("enrolled"), Some("flagged"))
    );
    assert_eq!(first["actor"], "collector");
    assert!(
        first["cause"].as_str().unwrap().starts_with("severity: "),
        "{t}"
    );
    let (status, one) = get(addr, "/api/v1/hosts/web-1").await;
    assert_eq!(status, 200);
    assert_eq!(one["host"]["lifecycle"], "flagged");
    let (status, b) = get(addr, "/api/v1/hosts/web-1/transitions?limit=0").await;
    assert_eq!(
        (status, b["error"]["parameter"].as_str()),
        (400, Some("limit"))
    );
    let audit = store.audit_records(0, 100).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|r| r.action == "host.flagged" && r.target == "web-1")
    );

    // An operator retires db-1: a transition with the reason, then no second time.
    let (status, r) = post(
        addr,
        "/api/v1/hosts/db-1/retire",
        &json!({"reason": "decommissioned (ticket 42)"}),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["transition"]["from"], "flagged");
    assert_eq!(r["transition"]["to"], "retired");
    assert!(
        r["transition"]["cause"]
            .as_str()
            .unwrap()
            .contains("ticket 42")
    );
    let (status, r) = post(
        addr,
        "/api/v1/hosts/db-1/retire",
        &json!({"reason": "again"}),
    )
    .await;
    assert_eq!(
        (status, r["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{r}"
    );
    let (status, _) = post(addr, "/api/v1/hosts/web-1/retire", &json!({})).await;
    assert_eq!(status, 400);
    let (status, _) = post(addr, "/api/v1/hosts/web-1/retire", &json!({"reason": " "})).await;
    assert_eq!(status, 400);
    // Retired hosts are no longer assessed.
    reconcile::reconcile_once(&*store, &policy(), now_ms())
        .await
        .unwrap();
    let (_, t) = get(addr, "/api/v1/hosts/db-1/transitions").await;
    assert_eq!(t["lifecycle"], "retired");
    assert!(
        store
            .audit_records(0, 100)
            .await
            .unwrap()
            .iter()
            .any(|r| r.action == "host.retired" && r.actor.starts_with("token:"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baselines_are_verified_versioned_and_group_hosts_by_image() {
    let Fleet { store, .. } = fleet().await;
    let pipeline = keypair();
    let (addr, _stop) = serve_with(store.clone(), policy(), vec![raw_key(&pipeline)]).await;

    let push = |header: String| async move {
        post(addr, "/api/v1/baselines", &json!({"signed_header": header})).await
    };
    // The fleet's web hosts run root 0xab…: register exactly that.
    let (status, b) = push(signed_header(&pipeline, "web", "2026.11.1", 0xab)).await;
    assert_eq!(status, 200, "{b}");
    assert_eq!(b["baseline"]["root"], "ab".repeat(32));
    assert_eq!(
        b["baseline"]["signer"],
        envelope::key_fingerprint(&raw_key(&pipeline))
    );
    assert!(
        b["baseline"]["pushed_by"]
            .as_str()
            .unwrap()
            .starts_with("token:")
    );
    let (status, b) = push(signed_header(&pipeline, "web", "2026.11.1", 0xcd)).await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{b}"
    );
    let (status, b) = push(signed_header(&keypair(), "web", "2026.12.1", 0xcd)).await;
    assert_eq!(
        (status, b["error"]["code"].as_str()),
        (422, Some("invalid")),
        "{b}"
    );
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not among the trusted keys")
    );
    let (status, _) = push("not base64!".into()).await;
    assert_eq!(status, 400);
    let (status, _) = push(base64::engine::general_purpose::STANDARD.encode(b"junk")).await;
    assert_eq!(status, 422);
    // db's registered root is not what db-1 runs.
    let (status, _) = push(signed_header(&pipeline, "db", "1", 0x01)).await;
    assert_eq!(status, 200);
    assert!(
        store
            .audit_records(0, 100)
            .await
            .unwrap()
            .iter()
            .any(|r| r.action == "baseline.pushed" && r.target == "web")
    );

    let (status, l) = get(addr, "/api/v1/images").await;
    assert_eq!(status, 200, "{l}");
    let images: Vec<(&str, u64, u64)> = l["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["image_id"].as_str().unwrap(),
                i["consensus"].as_u64().unwrap(),
                i["outliers"].as_u64().unwrap(),
            )
        })
        .collect();
    // web: inc-1 on the root without drift; web-1 and old-1 drifted (gone-1 revoked, not live).
    assert_eq!(images, [("db", 0, 1), ("web", 1, 2)]);
    let (status, d) = get(addr, "/api/v1/images/web").await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["registered"]["version"], "2026.11.1");
    assert_eq!(d["consensus"], json!(["inc-1"]));
    let outliers: Vec<(&str, bool, bool)> = d["outliers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["host_id"].as_str().unwrap(),
                o["other_root"].as_bool().unwrap(),
                o["drift"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(outliers, [("old-1", false, true), ("web-1", false, true)]);
    let (_, d) = get(addr, "/api/v1/images/db").await;
    assert_eq!(d["outliers"][0]["other_root"], true, "{d}");
    // db-1 now runs a root that is not the registered one.
    let (_, e) = get(addr, "/api/v1/hosts/db-1/explain").await;
    assert_eq!(codes(&e), ["baseline_root_mismatch"], "{e}");
    assert_eq!(e["reasons"][0]["evidence"]["expected"], "01".repeat(32));
    let (status, _) = get(addr, "/api/v1/images/nope").await;
    assert_eq!(status, 404);

    // Without trusted keys nothing can be pushed.
    let (addr2, _stop2) = serve_with(store.clone(), policy(), vec![]).await;
    let (status, b) = post(
        addr2,
        "/api/v1/baselines",
        &json!({"signed_header": signed_header(&pipeline, "web", "2027.1", 1)}),
    )
    .await;
    assert_eq!(status, 422, "{b}");
}

/// Every field these endpoints answer with is in docs/api.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lifecycle_field_is_documented() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).unwrap();
    let Fleet { store, .. } = fleet().await;
    let pipeline = keypair();
    let (addr, _stop) = serve_with(store.clone(), policy(), vec![raw_key(&pipeline)]).await;
    let mut bodies = Vec::new();
    let (_, b) = post(
        addr,
        "/api/v1/baselines",
        &json!({"signed_header": signed_header(&pipeline, "web", "2026.11.1", 0xab)}),
    )
    .await;
    bodies.push(("baseline push", b));
    let (_, b) = post(
        addr,
        "/api/v1/hosts/web-1/violations/ack",
        &json!({"all": true, "reason": "r", "expires_in": "1h"}),
    )
    .await;
    bodies.push(("ack", b));
    reconcile::reconcile_once(&*store, &policy(), now_ms())
        .await
        .unwrap();
    for target in [
        "/api/v1/hosts/web-1/transitions",
        "/api/v1/hosts/old-1/explain",
        "/api/v1/hosts/web-1/explain",
        "/api/v1/images",
        "/api/v1/images/web",
        "/api/v1/images/db",
    ] {
        bodies.push((target, get(addr, target).await.1));
    }
    let (_, b) = post(addr, "/api/v1/hosts/db-1/retire", &json!({"reason": "r"})).await;
    bodies.push(("retire", b));
    let mut missing = Vec::new();
    for (what, body) in &bodies {
        let mut fields = std::collections::BTreeSet::new();
        field_paths(body, "", &mut fields);
        for f in fields {
            if !doc.contains(&format!("`{f}`")) {
                missing.push(format!("{what}: {f}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "fields missing from docs/api.md: {missing:?}"
    );
}

/// `a.b[].c` paths of every field in a JSON value (raw-bytes objects as one field).
fn field_paths(v: &Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                let raw_bytes = v.as_object().is_some_and(|o| {
                    o.len() == 1 && (o.contains_key("text") || o.contains_key("bytes"))
                });
                out.insert(p.clone());
                if !raw_bytes {
                    field_paths(v, &p, out);
                }
            }
        }
        Value::Array(a) => {
            for v in a {
                let raw_bytes = v.as_object().is_some_and(|o| {
                    o.len() == 1 && (o.contains_key("text") || o.contains_key("bytes"))
                });
                if !raw_bytes {
                    field_paths(v, &format!("{prefix}[]"), out);
                }
            }
        }
        _ => {}
    }
}
