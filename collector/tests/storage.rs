//! The storage conformance suite: every test is written once against `&dyn Storage` and runs
//! for every backend (SQLite in a temp file; PostgreSQL on a real server this test binary
//! starts itself, a fresh database per test — see `driftwatch_tests::postgres`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use driftwatch_collector::lifecycle::Lifecycle;
use driftwatch_collector::storage::actions::{
    self, ActionFilter, ActionState, AttemptRecord, RebuildAction,
};
use driftwatch_collector::storage::audit::{ChainError, ChainVerifier};
use driftwatch_collector::storage::export::{ExportCursor, RowPosition, ViolationEdge};
use driftwatch_collector::storage::{
    AckRequest, ApiToken, ApplyOutcome, AuditEntry, EnrollmentToken, HeartbeatRecord, HelloInfo,
    IssuedCertificate, RegisteredBaseline, ReportToApply, RevokeOutcome, Role, SecurityEvent,
    Storage, StorageError, TokenError, TransitionRecord, ViolationQuery, lane_of,
};
use driftwatch_proto::set::{file_key, item_hash, package_key, set_digest};
use driftwatch_proto::v1::{
    DriftItem, PackageDrift, PackageDriftKind, Report, ScanStatus, Violation, ViolationKind,
    drift_item::Item,
};

// --- fixture -------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

/// One backend's empty database for one test.
struct Fixture {
    kind: Kind,
    _dir: tempfile::TempDir,
    sqlite_path: PathBuf,
    pg_url: String,
}

impl Fixture {
    /// `None` when the backend is unavailable here (PostgreSQL not installed, outside CI).
    fn new(kind: Kind, name: &str) -> Option<Fixture> {
        let dir = tempfile::tempdir().unwrap();
        let sqlite_path = dir.path().join("collector.db");
        let pg_url = match kind {
            Kind::Sqlite => String::new(),
            Kind::Postgres => driftwatch_tests::postgres::server()?.create_database(name),
        };
        Some(Fixture {
            kind,
            _dir: dir,
            sqlite_path,
            pg_url,
        })
    }

    async fn try_open(&self) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(match self.kind {
            Kind::Sqlite => {
                let path = self.sqlite_path.clone();
                let s = tokio::task::spawn_blocking(move || {
                    driftwatch_collector::storage::SqliteStore::open(path)
                })
                .await
                .unwrap()?;
                Arc::new(s)
            }
            Kind::Postgres => {
                Arc::new(driftwatch_collector::storage::PgStore::connect(&self.pg_url).await?)
            }
        })
    }

    async fn open(&self) -> Arc<dyn Storage> {
        self.try_open().await.unwrap()
    }

    /// Writes a schema version directly, as a newer collector would have.
    async fn set_schema_version(&self, v: i64) {
        self.sql(&format!("UPDATE schema_version SET version = {v}"))
            .await;
    }

    /// Runs SQL on the database behind the store's back (a newer collector, an attacker).
    async fn sql(&self, statements: &str) {
        match self.kind {
            Kind::Sqlite => {
                let c = rusqlite::Connection::open(&self.sqlite_path).unwrap();
                c.execute_batch(statements).unwrap();
            }
            Kind::Postgres => {
                let (client, conn) = tokio_postgres::connect(&self.pg_url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let task = tokio::spawn(conn);
                client.batch_execute(statements).await.unwrap();
                drop(client);
                let _ = task.await;
            }
        }
    }
}

async fn run<F, Fut>(kind: Kind, name: &str, test: F)
where
    F: FnOnce(Fixture) -> Fut,
    Fut: Future<Output = ()>,
{
    if let Some(f) = Fixture::new(kind, name) {
        test(f).await;
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Kind::Sqlite, stringify!($name), super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::run(super::Kind::Postgres, stringify!($name), super::$name).await;
                }
            )*
        }
    };
}

conformance!(
    tokens_are_created_listed_and_consumed,
    token_refusals,
    single_use_token_consumed_once_under_concurrency,
    enroll_creates_host_and_updates_labels,
    certificates_revocation_and_revoked_serials,
    hello_returns_the_stream_position,
    delta_reports_add_update_remove,
    full_report_replaces_the_set,
    duplicates_are_detected_by_seq,
    new_epoch_starts_a_new_sequence_space,
    gap_still_applies_and_digest_checks,
    digest_mismatch_is_reported,
    recurrence_is_a_new_occurrence,
    group_commit_across_hosts_and_reports,
    write_lanes_commit_at_once_alongside_other_writes,
    unknown_host_fails_the_batch_and_changes_nothing,
    a_batch_whose_writes_fail_changes_nothing_and_the_next_applies,
    incomplete_flag_reason_and_lost_reports,
    heartbeats_update_last_seen_and_scan,
    host_summaries_count_open_items_by_severity,
    search_by_path_glob,
    search_filters,
    security_events_are_kept,
    export_pages_in_time_order,
    export_cursor_is_saved_and_replaced,
    schema_too_new_is_refused,
    concurrent_first_opens_migrate_once,
    reopen_keeps_everything,
    audit_appends_form_one_verifiable_chain,
    audit_tampering_is_named_at_the_first_bad_record,
    api_tokens_are_created_found_by_hash_and_revoked,
    api_token_last_use_is_written_at_most_once_a_minute,
    changes_are_audited_in_their_own_transaction,
    lifecycle_transitions_are_compare_and_set_with_audit,
    lifecycle_transition_batches_are_one_transaction_each_move_compared,
    lifecycle_moves_race_once_and_never_wait_for_report_batches,
    acknowledgements_cover_the_named_open_items,
    registry_refuses_versions_not_newer,
    actions_are_created_once_per_key_with_audit,
    action_updates_are_compare_and_set_with_attempts,
    action_listing_filters_and_dispatch_view,
    dispatch_lock_excludes_a_second_dispatcher,
);

// --- helpers -------------------------------------------------------------------------------

const MINUTE: i64 = 60_000;
const T0: i64 = 1_800_000_000_000;

fn token(
    id: &str,
    secret: u8,
    uses: u32,
    expires_ms: i64,
    pattern: Option<&str>,
) -> EnrollmentToken {
    EnrollmentToken {
        id: id.into(),
        secret_sha256: [secret; 32],
        created_ms: T0,
        expires_ms,
        uses_left: uses,
        host_pattern: pattern.map(str::to_owned),
    }
}

fn cert(host: &str, serial: u8, not_after_ms: i64) -> IssuedCertificate {
    IssuedCertificate {
        host_id: host.into(),
        serial: vec![0x01, serial],
        not_before_ms: T0,
        not_after_ms,
        issued_ms: T0,
    }
}

async fn enroll(s: &dyn Storage, host: &str) {
    let mut c = cert(host, 0, T0 + 1000 * MINUTE);
    c.serial = host.as_bytes().to_vec();
    s.enroll_host(vec![], c, change_audit()).await.unwrap();
}

fn file(path: &[u8], kind: ViolationKind, severity: i32, packages: &[&str]) -> DriftItem {
    DriftItem {
        key: file_key(path),
        item: Some(Item::File(Violation {
            path: path.to_vec(),
            kind: kind as i32,
            severity,
            packages: packages.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        })),
    }
}

fn package(name: &str, kind: PackageDriftKind, severity: i32) -> DriftItem {
    DriftItem {
        key: package_key(name, "amd64"),
        item: Some(Item::Package(PackageDrift {
            name: name.into(),
            arch: "amd64".into(),
            kind: kind as i32,
            severity,
            ..Default::default()
        })),
    }
}

/// The agent's side: its current set, from which each report's digest is computed
/// independently of the storage.
#[derive(Default, Clone)]
struct Agent {
    epoch: u64,
    seq: u64,
    set: BTreeMap<Vec<u8>, DriftItem>,
}

impl Agent {
    fn new(epoch: u64) -> Agent {
        Agent {
            epoch,
            ..Default::default()
        }
    }

    fn digest(&self) -> Vec<u8> {
        let hashes = self
            .set
            .iter()
            .map(|(k, i)| (k.clone(), item_hash(i)))
            .collect();
        set_digest(&hashes).to_vec()
    }

    fn delta(&mut self, upserts: Vec<DriftItem>, removed: Vec<Vec<u8>>) -> Report {
        for i in &upserts {
            self.set.insert(i.key.clone(), i.clone());
        }
        for k in &removed {
            self.set.remove(k);
        }
        self.seq += 1;
        Report {
            epoch: self.epoch,
            seq: self.seq,
            full: false,
            upserts,
            removed_keys: removed,
            set_digest: self.digest(),
            status: ScanStatus::Complete as i32,
            ..Default::default()
        }
    }

    fn full(&mut self, items: Vec<DriftItem>) -> Report {
        self.set = items.iter().map(|i| (i.key.clone(), i.clone())).collect();
        self.seq += 1;
        Report {
            epoch: self.epoch,
            seq: self.seq,
            full: true,
            upserts: items,
            set_digest: self.digest(),
            status: ScanStatus::Complete as i32,
            ..Default::default()
        }
    }
}

fn to_apply(host: &str, report: Report, at: i64) -> ReportToApply {
    ReportToApply {
        host_id: host.into(),
        report,
        received_ms: at,
    }
}

async fn apply1(s: &dyn Storage, host: &str, report: Report, at: i64) -> ApplyOutcome {
    let mut out = s
        .apply_reports(vec![to_apply(host, report, at)])
        .await
        .unwrap();
    assert_eq!(out.len(), 1);
    out.remove(0)
}

/// Applied to a host with open items.
const APPLIED: ApplyOutcome = ApplyOutcome::Applied {
    digest_matches: true,
    from_empty: false,
};
/// Applied to a host with no open item before it.
const APPLIED_FROM_EMPTY: ApplyOutcome = ApplyOutcome::Applied {
    digest_matches: true,
    from_empty: true,
};

fn query() -> ViolationQuery {
    ViolationQuery {
        limit: 100,
        ..Default::default()
    }
}

fn all_of(host: &str) -> ViolationQuery {
    ViolationQuery {
        host_id: Some(host.into()),
        include_resolved: true,
        ..query()
    }
}

/// Search results as sorted (key, first, last, resolved) tuples.
async fn occurrences(s: &dyn Storage, q: ViolationQuery) -> Vec<(Vec<u8>, i64, i64, Option<i64>)> {
    let mut v: Vec<_> = s
        .search_violations(q)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.key, r.first_seen_ms, r.last_seen_ms, r.resolved_ms))
        .collect();
    v.sort();
    v
}

async fn open_keys(s: &dyn Storage, host: &str) -> Vec<Vec<u8>> {
    let mut v: Vec<_> = s
        .search_violations(ViolationQuery {
            host_id: Some(host.into()),
            ..query()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.key)
        .collect();
    v.sort();
    v
}

fn hello(epoch: u64) -> HelloInfo {
    HelloInfo {
        agent_version: "0.1.0".into(),
        image_id: "web".into(),
        image_version: "42".into(),
        baseline_root: vec![7; 32],
        boot_id: "boot-1".into(),
        epoch,
    }
}

// --- enrollment ----------------------------------------------------------------------------

async fn tokens_are_created_listed_and_consumed(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    s.create_enrollment_token(token("aaaa0001", 1, 2, T0 + MINUTE, None), change_audit())
        .await
        .unwrap();
    s.create_enrollment_token(
        token("aaaa0002", 2, 1, T0 + MINUTE, Some("web-*")),
        change_audit(),
    )
    .await
    .unwrap();
    let list = s.list_enrollment_tokens().await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0], token("aaaa0001", 1, 2, T0 + MINUTE, None));
    assert_eq!(list[1].host_pattern.as_deref(), Some("web-*"));

    let t = s
        .consume_enrollment_token([1; 32], "db-1", T0)
        .await
        .unwrap();
    assert_eq!(t.id, "aaaa0001");
    assert_eq!(t.uses_left, 1);
    let t = s
        .consume_enrollment_token([2; 32], "web-7", T0)
        .await
        .unwrap();
    assert_eq!(t.uses_left, 0);
    let list = s.list_enrollment_tokens().await.unwrap();
    assert_eq!(list[0].uses_left, 1);
    assert_eq!(list[1].uses_left, 0);
    // An invalid host pattern is refused when the token is created.
    let err = s
        .create_enrollment_token(
            token("aaaa0003", 3, 1, T0 + MINUTE, Some("web-[")),
            change_audit(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::InvalidArgument(_)), "{err}");
}

fn token_err(e: StorageError) -> TokenError {
    match e {
        StorageError::Token(t) => t,
        other => panic!("expected a token error, got {other}"),
    }
}

async fn token_refusals(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    s.create_enrollment_token(
        token("bbbb0001", 1, 1, T0 + MINUTE, Some("web-*")),
        change_audit(),
    )
    .await
    .unwrap();
    let e = s
        .consume_enrollment_token([9; 32], "web-1", T0)
        .await
        .unwrap_err();
    assert_eq!(token_err(e), TokenError::Unknown);
    let e = s
        .consume_enrollment_token([1; 32], "db-1", T0)
        .await
        .unwrap_err();
    assert_eq!(
        token_err(e),
        TokenError::HostPatternMismatch {
            host_id: "db-1".into(),
            pattern: "web-*".into()
        }
    );
    // A refusal takes no use.
    assert_eq!(s.list_enrollment_tokens().await.unwrap()[0].uses_left, 1);
    let e = s
        .consume_enrollment_token([1; 32], "web-1", T0 + MINUTE)
        .await
        .unwrap_err();
    assert_eq!(token_err(e), TokenError::Expired);
    s.consume_enrollment_token([1; 32], "web-1", T0 + MINUTE - 1)
        .await
        .unwrap();
    let e = s
        .consume_enrollment_token([1; 32], "web-2", T0)
        .await
        .unwrap_err();
    assert_eq!(token_err(e), TokenError::Exhausted);
}

async fn single_use_token_consumed_once_under_concurrency(f: Fixture) {
    let s = f.open().await;
    for round in 0..10u8 {
        let secret = [round; 32];
        s.create_enrollment_token(
            token(&format!("cccc{round:04}"), round, 1, T0 + MINUTE, None),
            change_audit(),
        )
        .await
        .unwrap();
        let (a, b) = (s.clone(), s.clone());
        let ta = tokio::spawn(async move { a.consume_enrollment_token(secret, "h-a", T0).await });
        let tb = tokio::spawn(async move { b.consume_enrollment_token(secret, "h-b", T0).await });
        let (ra, rb) = (ta.await.unwrap(), tb.await.unwrap());
        let ok = [&ra, &rb].iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "round {round}: {ra:?} / {rb:?}");
        let err = if ra.is_err() { ra } else { rb }.unwrap_err();
        assert_eq!(token_err(err), TokenError::Exhausted);
    }
}

async fn enroll_creates_host_and_updates_labels(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    assert!(s.host("web-1").await.unwrap().is_none());
    s.enroll_host(
        vec![("role".into(), "web".into()), ("zone".into(), "a".into())],
        cert("web-1", 1, T0 + MINUTE),
        change_audit(),
    )
    .await
    .unwrap();
    let h = s.host("web-1").await.unwrap().unwrap();
    assert_eq!(h.host_id, "web-1");
    assert_eq!(h.enrolled_ms, T0);
    assert_eq!(
        h.labels,
        vec![("role".into(), "web".into()), ("zone".into(), "a".into())]
    );
    assert_eq!(h.position.epoch, 0);
    assert_eq!(h.position.last_seq, 0);
    assert_eq!(h.position.set_digest, set_digest(&BTreeMap::new()));
    assert!(!h.revoked);
    assert!(!h.incomplete);
    assert_eq!(h.open_by_severity, [0; 6]);

    // Re-enrolling replaces the labels and adds a certificate; the host stays the same.
    let mut c = cert("web-1", 2, T0 + MINUTE);
    c.issued_ms = T0 + 5;
    s.enroll_host(vec![("role".into(), "api".into())], c, change_audit())
        .await
        .unwrap();
    let h = s.host("web-1").await.unwrap().unwrap();
    assert_eq!(h.labels, vec![("role".into(), "api".into())]);
    assert_eq!(h.enrolled_ms, T0);
    assert_eq!(s.list_hosts().await.unwrap().len(), 1);

    // A renewed certificate needs an existing host.
    s.record_certificate(cert("web-1", 3, T0 + MINUTE))
        .await
        .unwrap();
    let e = s
        .record_certificate(cert("nobody", 4, T0 + MINUTE))
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::UnknownHost(_)), "{e}");
}

async fn certificates_revocation_and_revoked_serials(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    s.enroll_host(vec![], cert("a", 1, T0 + 10 * MINUTE), change_audit())
        .await
        .unwrap();
    s.record_certificate(cert("a", 2, T0 + 20 * MINUTE))
        .await
        .unwrap();
    s.enroll_host(vec![], cert("b", 3, T0 + 20 * MINUTE), change_audit())
        .await
        .unwrap();
    assert!(s.revoked_serials(T0).await.unwrap().is_empty());

    assert_eq!(s.revoke_host("a", T0 + 1, change_audit()).await.unwrap(), 2);
    assert_eq!(
        s.revoke_host("a", T0 + 2, change_audit()).await.unwrap(),
        0,
        "already revoked"
    );
    assert!(matches!(
        s.revoke_host("zz", T0, change_audit()).await.unwrap_err(),
        StorageError::UnknownHost(_)
    ));
    assert_eq!(
        s.revoked_serials(T0).await.unwrap(),
        vec![vec![1, 1], vec![1, 2]]
    );
    // Expired revoked certificates drop out of the list: the TLS layer refuses them anyway.
    assert_eq!(
        s.revoked_serials(T0 + 10 * MINUTE).await.unwrap(),
        vec![vec![1, 2]]
    );
    assert!(
        s.revoked_serials(T0 + 20 * MINUTE)
            .await
            .unwrap()
            .is_empty()
    );

    assert!(s.host("a").await.unwrap().unwrap().revoked);
    assert!(!s.host("b").await.unwrap().unwrap().revoked);
    // A new certificate after revocation (re-enrollment): no longer every certificate revoked.
    s.enroll_host(vec![], cert("a", 9, T0 + 30 * MINUTE), change_audit())
        .await
        .unwrap();
    assert!(!s.host("a").await.unwrap().unwrap().revoked);
}

// --- ingest --------------------------------------------------------------------------------

async fn hello_returns_the_stream_position(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    let e = s.hello("ghost", hello(1), T0).await.unwrap_err();
    assert!(matches!(e, StorageError::UnknownHost(_)), "{e}");
    enroll(s, "h").await;

    let p = s.hello("h", hello(5), T0).await.unwrap();
    assert_eq!((p.epoch, p.last_seq), (5, 0));
    assert_eq!(p.set_digest, set_digest(&BTreeMap::new()));

    let mut agent = Agent::new(5);
    let item = file(b"/etc/passwd", ViolationKind::Modified, 3, &[]);
    for i in 0..3 {
        assert_eq!(
            apply1(s, "h", agent.delta(vec![item.clone()], vec![]), T0).await,
            if i == 0 { APPLIED_FROM_EMPTY } else { APPLIED }
        );
    }
    // Same epoch: the position is kept.
    let p = s.hello("h", hello(5), T0 + 1).await.unwrap();
    assert_eq!((p.epoch, p.last_seq), (5, 3));
    assert_eq!(p.set_digest.to_vec(), agent.digest());
    // A new epoch: a new sequence space, but the stored set (and its digest) stays.
    let p = s.hello("h", hello(6), T0 + 2).await.unwrap();
    assert_eq!((p.epoch, p.last_seq), (6, 0));
    assert_eq!(p.set_digest.to_vec(), agent.digest());

    let h = s.host("h").await.unwrap().unwrap();
    assert_eq!(h.hello, hello(6));
    assert_eq!(h.last_seen_ms, Some(T0 + 2));
}

async fn delta_reports_add_update_remove(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let mut agent = Agent::new(1);
    let a = file(b"/etc/a", ViolationKind::Added, 2, &[]);
    let b = file(b"/etc/b", ViolationKind::Modified, 3, &["coreutils:amd64"]);
    let p = package("openssl", PackageDriftKind::Changed, 4);
    let r = agent.delta(vec![a.clone(), b.clone(), p.clone()], vec![]);
    assert_eq!(apply1(s, "h", r, T0).await, APPLIED_FROM_EMPTY);
    assert_eq!(
        occurrences(s, all_of("h")).await,
        vec![
            (a.key.clone(), T0, T0, None),
            (b.key.clone(), T0, T0, None),
            (p.key.clone(), T0, T0, None),
        ]
    );

    // Update b's content; a, p untouched keep their last_seen.
    let mut b2 = b.clone();
    if let Some(Item::File(v)) = &mut b2.item {
        v.severity = 5;
    }
    let r = agent.delta(vec![b2.clone()], vec![]);
    assert_eq!(apply1(s, "h", r, T0 + MINUTE).await, APPLIED);
    let recs = s.search_violations(all_of("h")).await.unwrap();
    let rb = recs.iter().find(|r| r.key == b.key).unwrap();
    assert_eq!(rb.item, b2);
    assert_eq!((rb.first_seen_ms, rb.last_seen_ms), (T0, T0 + MINUTE));
    let ra = recs.iter().find(|r| r.key == a.key).unwrap();
    assert_eq!(ra.last_seen_ms, T0);
    assert_eq!(ra.item, a);

    // Remove a: resolved, not deleted.
    let r = agent.delta(vec![], vec![a.key.clone()]);
    assert_eq!(apply1(s, "h", r, T0 + 2 * MINUTE).await, APPLIED);
    assert_eq!(open_keys(s, "h").await, vec![b.key.clone(), p.key.clone()]);
    assert_eq!(
        occurrences(s, all_of("h")).await[0],
        (a.key.clone(), T0, T0, Some(T0 + 2 * MINUTE))
    );
    // Removing an unknown key changes nothing.
    let r = agent.delta(vec![], vec![file_key(b"/nope")]);
    assert_eq!(apply1(s, "h", r, T0 + 3 * MINUTE).await, APPLIED);
    let h = s.host("h").await.unwrap().unwrap();
    assert_eq!(h.position.set_digest.to_vec(), agent.digest());
    assert_eq!(h.position.last_seq, 4);
    assert_eq!(h.last_report_ms, Some(T0 + 3 * MINUTE));
}

async fn full_report_replaces_the_set(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let mut agent = Agent::new(1);
    let items: Vec<_> = (0..5)
        .map(|i| {
            file(
                format!("/etc/f{i}").as_bytes(),
                ViolationKind::Modified,
                3,
                &[],
            )
        })
        .collect();
    assert_eq!(
        apply1(s, "h", agent.delta(items.clone(), vec![]), T0).await,
        APPLIED_FROM_EMPTY
    );
    // Full: keeps f1, f3 (f3 changed), adds g; f0, f2, f4 are resolved.
    let mut f3 = items[3].clone();
    if let Some(Item::File(v)) = &mut f3.item {
        v.kind = ViolationKind::Removed as i32;
    }
    let g = file(b"/etc/g", ViolationKind::Added, 1, &[]);
    let r = agent.full(vec![items[1].clone(), f3.clone(), g.clone()]);
    assert_eq!(apply1(s, "h", r, T0 + MINUTE).await, APPLIED);
    let mut expect = vec![items[1].key.clone(), f3.key.clone(), g.key.clone()];
    expect.sort();
    assert_eq!(open_keys(s, "h").await, expect);
    let occ = occurrences(s, all_of("h")).await;
    let by_key: BTreeMap<_, _> = occ.iter().map(|o| (o.0.clone(), o)).collect();
    assert_eq!(by_key[&items[0].key].3, Some(T0 + MINUTE));
    assert_eq!(
        *by_key[&items[1].key],
        (items[1].key.clone(), T0, T0 + MINUTE, None)
    );
    assert_eq!(by_key[&g.key].1, T0 + MINUTE);
    let h = s.host("h").await.unwrap().unwrap();
    assert_eq!(h.position.set_digest.to_vec(), agent.digest());

    // An empty full report: clean.
    assert_eq!(
        apply1(s, "h", agent.full(vec![]), T0 + 2 * MINUTE).await,
        APPLIED
    );
    assert!(open_keys(s, "h").await.is_empty());
    assert_eq!(
        s.host("h").await.unwrap().unwrap().position.set_digest,
        set_digest(&BTreeMap::new())
    );
}

async fn duplicates_are_detected_by_seq(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let mut agent = Agent::new(3);
    let r1 = agent.delta(vec![file(b"/a", ViolationKind::Added, 1, &[])], vec![]);
    let r2 = agent.delta(vec![file(b"/b", ViolationKind::Added, 1, &[])], vec![]);
    assert_eq!(apply1(s, "h", r1.clone(), T0).await, APPLIED_FROM_EMPTY);
    assert_eq!(apply1(s, "h", r2.clone(), T0 + 1).await, APPLIED);
    // Resent after a lost ack, alone and inside a batch with a new one.
    assert_eq!(
        apply1(s, "h", r1.clone(), T0 + 2).await,
        ApplyOutcome::Duplicate
    );
    let r3 = agent.delta(vec![], vec![file_key(b"/a")]);
    let out = s
        .apply_reports(vec![
            to_apply("h", r2.clone(), T0 + 3),
            to_apply("h", r3.clone(), T0 + 3),
            to_apply("h", r3, T0 + 3),
        ])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![ApplyOutcome::Duplicate, APPLIED, ApplyOutcome::Duplicate]
    );
    assert_eq!(open_keys(s, "h").await, vec![file_key(b"/b")]);
    // The duplicate did not touch last_seen.
    let occ = occurrences(s, all_of("h")).await;
    assert_eq!(occ[1], (file_key(b"/b"), T0 + 1, T0 + 1, None));
    let h = s.host("h").await.unwrap().unwrap();
    assert_eq!(h.position.last_seq, 3);
}

async fn new_epoch_starts_a_new_sequence_space(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let mut agent = Agent::new(1);
    for i in 0..5 {
        let r = agent.delta(
            vec![file(
                format!("/x{i}").as_bytes(),
                ViolationKind::Added,
                1,
                &[],
            )],
            vec![],
        );
        let expect = if i == 0 { APPLIED_FROM_EMPTY } else { APPLIED };
        assert_eq!(apply1(s, "h", r, T0).await, expect);
    }
    // The agent lost its spool: new epoch, seq from 1, a full report.
    let mut agent2 = Agent::new(2);
    let r = agent2.full(vec![file(b"/y", ViolationKind::Added, 1, &[])]);
    assert_eq!(r.seq, 1);
    assert_eq!(apply1(s, "h", r.clone(), T0 + 1).await, APPLIED);
    assert_eq!(apply1(s, "h", r, T0 + 2).await, ApplyOutcome::Duplicate);
    let h = s.host("h").await.unwrap().unwrap();
    assert_eq!((h.position.epoch, h.position.last_seq), (2, 1));
    assert_eq!(open_keys(s, "h").await, vec![file_key(b"/y")]);
}

async fn gap_still_applies_and_digest_checks(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let mut agent = Agent::new(1);
    let r1 = agent.delta(vec![file(b"/a", ViolationKind::Added, 1, &[])], vec![]);
    let _lost = agent.delta(vec![file(b"/b", ViolationKind::Added, 1, &[])], vec![]);
    let r3 = agent.delta(vec![file(b"/c", ViolationKind::Added, 1, &[])], vec![]);
    assert_eq!(apply1(s, "h", r1, T0).await, APPLIED_FROM_EMPTY);
    // Seq 3 after 1: applied, but the set lacks /b, so the digest disagrees.
    assert_eq!(
        apply1(s, "h", r3, T0 + 1).await,
        ApplyOutcome::Applied {
            digest_matches: false,
            from_empty: false,
        }
    );
    assert_eq!(s.host("h").await.unwrap().unwrap().position.last_seq, 3);
    // The resync (full report) repairs it.
    let items: Vec<_> = agent.set.values().cloned().collect();
    let r4 = agent.full(items);
    assert_eq!(apply1(s, "h", r4, T0 + 2).await, APPLIED);
    assert_eq!(
        s.host("h")
            .await
            .unwrap()
            .unwrap()
            .position
            .set_digest
            .to_vec(),
        agent.digest()
    );
}

async fn digest_mismatch_is_reported(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let mut agent = Agent::new(1);
    let mut r = agent.delta(vec![file(b"/a", ViolationKind::Added, 1, &[])], vec![]);
    let good = r.set_digest.clone();
    r.set_digest = vec![0; 32];
    assert_eq!(
        apply1(s, "h", r, T0).await,
        ApplyOutcome::Applied {
            digest_matches: false,
            from_empty: true,
        }
    );
    // Stored digest is the one of the stored set, whatever the agent claimed.
    assert_eq!(
        s.host("h")
            .await
            .unwrap()
            .unwrap()
            .position
            .set_digest
            .to_vec(),
        good
    );
    // An item whose content differs from the agent's copy: mismatch too.
    let mut other = agent.clone();
    other.set.clear();
    let item = file(b"/b", ViolationKind::Added, 1, &[]);
    let mut r = agent.delta(vec![item.clone()], vec![]);
    let mut changed = item;
    if let Some(Item::File(v)) = &mut changed.item {
        v.severity = 4;
    }
    r.upserts = vec![changed];
    assert_eq!(
        apply1(s, "h", r, T0 + 1).await,
        ApplyOutcome::Applied {
            digest_matches: false,
            from_empty: false,
        }
    );
    let _ = other;
}

async fn recurrence_is_a_new_occurrence(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let mut agent = Agent::new(1);
    let a = file(b"/etc/shadow", ViolationKind::Modified, 5, &[]);
    assert_eq!(
        apply1(s, "h", agent.delta(vec![a.clone()], vec![]), T0).await,
        APPLIED_FROM_EMPTY
    );
    assert_eq!(
        apply1(s, "h", agent.delta(vec![a.clone()], vec![]), T0 + 1).await,
        APPLIED
    );
    assert_eq!(
        apply1(s, "h", agent.delta(vec![], vec![a.key.clone()]), T0 + 2).await,
        APPLIED
    );
    // Resolved: the host had no open item before the recurrence.
    assert_eq!(
        apply1(s, "h", agent.delta(vec![a.clone()], vec![]), T0 + 3).await,
        APPLIED_FROM_EMPTY
    );
    assert_eq!(
        occurrences(s, all_of("h")).await,
        vec![
            (a.key.clone(), T0, T0 + 1, Some(T0 + 2)),
            (a.key.clone(), T0 + 3, T0 + 3, None),
        ]
    );
    // Within one batch: resolved by a full report, back again in the next report.
    let r1 = agent.full(vec![]);
    let r2 = agent.delta(vec![a.clone()], vec![]);
    let r3 = agent.delta(vec![], vec![a.key.clone()]);
    let out = s
        .apply_reports(vec![
            to_apply("h", r1, T0 + 4),
            to_apply("h", r2, T0 + 5),
            to_apply("h", r3, T0 + 6),
        ])
        .await
        .unwrap();
    assert_eq!(out, vec![APPLIED, APPLIED_FROM_EMPTY, APPLIED]);
    assert_eq!(
        occurrences(s, all_of("h")).await,
        vec![
            (a.key.clone(), T0, T0 + 1, Some(T0 + 2)),
            (a.key.clone(), T0 + 3, T0 + 3, Some(T0 + 4)),
            (a.key.clone(), T0 + 5, T0 + 5, Some(T0 + 6)),
        ]
    );
    assert!(open_keys(s, "h").await.is_empty());
    // And again in a later batch (the open set the backend may have cached is right).
    assert_eq!(
        apply1(s, "h", agent.delta(vec![a.clone()], vec![]), T0 + 7).await,
        APPLIED_FROM_EMPTY
    );
    assert_eq!(open_keys(s, "h").await, vec![a.key.clone()]);
}

async fn group_commit_across_hosts_and_reports(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    let hosts = ["h1", "h2", "h3"];
    for h in hosts {
        enroll(s, h).await;
    }
    let mut agents: Vec<Agent> = (0..3).map(|i| Agent::new(10 + i)).collect();
    let mut batch = Vec::new();
    for round in 0..4 {
        for (i, h) in hosts.iter().enumerate() {
            let item = file(
                format!("/srv/{h}/{round}").as_bytes(),
                ViolationKind::Added,
                (round % 6) as i32,
                &[],
            );
            let removed = if round == 2 {
                vec![file_key(format!("/srv/{h}/0").as_bytes())]
            } else {
                vec![]
            };
            batch.push(to_apply(
                h,
                agents[i].delta(vec![item], removed),
                T0 + round,
            ));
        }
    }
    let out = s.apply_reports(batch).await.unwrap();
    // Each host's first report (round 0) finds it without open items.
    let mut expect = vec![APPLIED_FROM_EMPTY; 3];
    expect.extend([APPLIED; 9]);
    assert_eq!(out, expect);
    for (i, h) in hosts.iter().enumerate() {
        let summary = s.host(h).await.unwrap().unwrap();
        assert_eq!(summary.position.set_digest.to_vec(), agents[i].digest());
        assert_eq!(
            (summary.position.epoch, summary.position.last_seq),
            (10 + i as u64, 4)
        );
        assert_eq!(open_keys(s, h).await.len(), 3);
    }
    assert!(s.apply_reports(vec![]).await.unwrap().is_empty());
}

/// What the ingest does with a backend of several write lanes: one batch per lane in flight at
/// once (hosts partitioned by `lane_of`), with heartbeats and hellos on the other writer; every
/// report lands once, in order, with the digests the agents computed.
async fn write_lanes_commit_at_once_alongside_other_writes(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    let lanes = s.write_lanes();
    assert!(lanes >= 1);
    let hosts: Vec<String> = (0..24).map(|i| format!("lane-host-{i}")).collect();
    for h in &hosts {
        enroll(s, h).await;
    }
    let mut agents: Vec<Agent> = (0..hosts.len()).map(|_| Agent::new(7)).collect();
    for round in 0..5i64 {
        let mut batches: Vec<Vec<ReportToApply>> = vec![Vec::new(); lanes];
        for (i, h) in hosts.iter().enumerate() {
            // /srv/{h}/0 is removed in round 3 and not reported again.
            let items = (0..20)
                .filter(|n| round < 3 || *n != 0)
                .map(|n| {
                    file(
                        format!("/srv/{h}/{n}").as_bytes(),
                        ViolationKind::Modified,
                        (round % 6) as i32,
                        &[],
                    )
                })
                .collect();
            let removed = if round == 3 {
                vec![file_key(format!("/srv/{h}/0").as_bytes())]
            } else {
                vec![]
            };
            batches[lane_of(h, lanes)].push(to_apply(
                h,
                agents[i].delta(items, removed),
                T0 + round,
            ));
        }
        let beats: Vec<HeartbeatRecord> = hosts
            .iter()
            .map(|h| HeartbeatRecord {
                host_id: h.clone(),
                received_ms: T0 + round,
                last_scan_ms: T0 + round,
                last_scan_status: ScanStatus::Complete,
            })
            .collect();
        let applies =
            futures_util::future::join_all(batches.into_iter().map(|b| s.apply_reports(b)));
        let (outs, beat) = tokio::join!(applies, s.record_heartbeats(beats));
        beat.unwrap();
        for out in outs {
            let out = out.unwrap();
            // Round 0 finds every host without open items.
            let expect = if round == 0 {
                APPLIED_FROM_EMPTY
            } else {
                APPLIED
            };
            assert!(out.iter().all(|o| *o == expect), "{out:?}");
        }
    }
    for (i, h) in hosts.iter().enumerate() {
        let summary = s.host(h).await.unwrap().unwrap();
        assert_eq!(
            summary.position.set_digest.to_vec(),
            agents[i].digest(),
            "{h}"
        );
        assert_eq!((summary.position.epoch, summary.position.last_seq), (7, 5));
        assert_eq!(open_keys(s, h).await.len(), 19, "{h}");
    }
}

async fn unknown_host_fails_the_batch_and_changes_nothing(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let mut agent = Agent::new(1);
    let mut ghost = Agent::new(1);
    let e = s
        .apply_reports(vec![
            to_apply(
                "h",
                agent.delta(vec![file(b"/a", ViolationKind::Added, 1, &[])], vec![]),
                T0,
            ),
            to_apply("ghost", ghost.delta(vec![], vec![]), T0),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(e, StorageError::UnknownHost(ref h) if h == "ghost"),
        "{e}"
    );
    // Nothing of the failed batch is stored, and the same report applies afterwards.
    assert!(open_keys(s, "h").await.is_empty());
    assert_eq!(s.host("h").await.unwrap().unwrap().position.last_seq, 0);
    agent.seq = 0;
    let r = agent.delta(vec![file(b"/a", ViolationKind::Added, 1, &[])], vec![]);
    assert_eq!(apply1(s, "h", r, T0 + 1).await, APPLIED_FROM_EMPTY);
    assert_eq!(open_keys(s, "h").await, vec![file_key(b"/a")]);
}

async fn a_batch_whose_writes_fail_changes_nothing_and_the_next_applies(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let mut agent = Agent::new(1);
    let r = agent.delta(vec![file(b"/a", ViolationKind::Added, 1, &[])], vec![]);
    assert_eq!(apply1(s, "h", r, T0).await, APPLIED_FROM_EMPTY);
    // The database refuses one new row: the batch fails after its other writes went out.
    f.sql(match f.kind {
        Kind::Sqlite => {
            "CREATE TRIGGER refuse BEFORE INSERT ON violations WHEN NEW.severity = 5 \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;"
        }
        Kind::Postgres => {
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.severity = 5 THEN RAISE EXCEPTION 'refused by the test'; END IF; \
             RETURN NEW; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT ON violations FOR EACH ROW \
             EXECUTE FUNCTION refuse();"
        }
    })
    .await;
    let second = agent.delta(
        vec![
            file(b"/a", ViolationKind::Modified, 2, &[]),
            file(b"/b", ViolationKind::Added, 5, &[]),
        ],
        vec![],
    );
    let e = s
        .apply_reports(vec![to_apply("h", second.clone(), T0 + 1)])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("refused by the test"), "{e}");
    assert_eq!(open_keys(s, "h").await, vec![file_key(b"/a")]);
    let stored = s.host("h").await.unwrap().unwrap();
    assert_eq!(
        stored.position.last_seq, 1,
        "the failed report was not applied"
    );
    let recs = s.search_violations(all_of("h")).await.unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(
        recs[0].item,
        file(b"/a", ViolationKind::Added, 1, &[]),
        "the failed batch's update of /a was kept"
    );

    // The same connection goes on: the same report applies once the database takes it.
    f.sql(match f.kind {
        Kind::Sqlite => "DROP TRIGGER refuse;",
        Kind::Postgres => "DROP TRIGGER refuse ON violations; DROP FUNCTION refuse();",
    })
    .await;
    assert_eq!(apply1(s, "h", second, T0 + 2).await, APPLIED);
    assert_eq!(
        open_keys(s, "h").await,
        vec![file_key(b"/a"), file_key(b"/b")]
    );
    assert_eq!(s.host("h").await.unwrap().unwrap().position.last_seq, 2);
}

async fn incomplete_flag_reason_and_lost_reports(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let mut agent = Agent::new(1);
    // No report of this host opens an item: each finds it without open items.
    let mut r = agent.delta(vec![], vec![]);
    r.status = ScanStatus::Incomplete as i32;
    r.status_reason = "scan failed: /var unreadable".into();
    r.scan_finished_unix_ms = T0 - 5;
    assert_eq!(apply1(s, "h", r, T0).await, APPLIED_FROM_EMPTY);
    let h = s.host("h").await.unwrap().unwrap();
    assert!(h.incomplete);
    assert_eq!(h.incomplete_reason, "scan failed: /var unreadable");
    assert_eq!(h.lost_reports, 0);
    assert_eq!(h.last_scan_ms, Some(T0 - 5));
    assert_eq!(h.last_scan_status, ScanStatus::Incomplete);

    // Lost reports count up, and mark the state incomplete even without a reason.
    let mut r = agent.delta(vec![], vec![]);
    r.status = ScanStatus::Complete as i32;
    r.lost_reports = 3;
    assert_eq!(apply1(s, "h", r, T0 + 1).await, APPLIED_FROM_EMPTY);
    let mut r = agent.delta(vec![], vec![]);
    r.status = ScanStatus::Incomplete as i32;
    r.lost_reports = 2;
    r.status_reason = "spool overflow".into();
    assert_eq!(apply1(s, "h", r, T0 + 2).await, APPLIED_FROM_EMPTY);
    let h = s.host("h").await.unwrap().unwrap();
    assert!(h.incomplete);
    assert_eq!(h.incomplete_reason, "spool overflow");
    assert_eq!(h.lost_reports, 5);

    // A complete report clears the flag; the lost count stays (it is history).
    let items: Vec<_> = agent.set.values().cloned().collect();
    assert_eq!(
        apply1(s, "h", agent.full(items), T0 + 3).await,
        APPLIED_FROM_EMPTY
    );
    let h = s.host("h").await.unwrap().unwrap();
    assert!(!h.incomplete);
    assert_eq!(h.incomplete_reason, "");
    assert_eq!(h.lost_reports, 5);
    assert_eq!(h.last_scan_status, ScanStatus::Complete);
}

async fn heartbeats_update_last_seen_and_scan(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "a").await;
    enroll(s, "b").await;
    let hb = |host: &str, at: i64, scan: i64, status: ScanStatus| HeartbeatRecord {
        host_id: host.into(),
        received_ms: at,
        last_scan_ms: scan,
        last_scan_status: status,
    };
    s.record_heartbeats(vec![
        hb("a", T0 + 10, T0 + 5, ScanStatus::Complete),
        hb("b", T0 + 20, T0 + 1, ScanStatus::Incomplete),
        hb("ghost", T0, T0, ScanStatus::Complete),
        // Heartbeats of one batch may come in any order: last seen never goes back.
        hb("a", T0 + 8, T0 + 5, ScanStatus::Complete),
    ])
    .await
    .unwrap();
    let a = s.host("a").await.unwrap().unwrap();
    assert_eq!(a.last_seen_ms, Some(T0 + 10));
    assert_eq!(a.last_scan_ms, Some(T0 + 5));
    assert_eq!(a.last_scan_status, ScanStatus::Complete);
    let b = s.host("b").await.unwrap().unwrap();
    assert_eq!(b.last_seen_ms, Some(T0 + 20));
    assert_eq!(b.last_scan_status, ScanStatus::Incomplete);
    assert!(s.host("ghost").await.unwrap().is_none());
    s.record_heartbeats(vec![]).await.unwrap();
}

async fn host_summaries_count_open_items_by_severity(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "b").await;
    enroll(s, "a").await;
    let mut agent = Agent::new(1);
    let items = vec![
        file(b"/1", ViolationKind::Added, 1, &[]),
        file(b"/2", ViolationKind::Added, 5, &[]),
        file(b"/3", ViolationKind::Added, 5, &[]),
        file(b"/4", ViolationKind::Added, 0, &[]),
        package("curl", PackageDriftKind::Installed, 3),
        package("vim", PackageDriftKind::Removed, 5),
    ];
    assert_eq!(
        apply1(s, "a", agent.delta(items, vec![]), T0).await,
        APPLIED_FROM_EMPTY
    );
    let r = agent.delta(
        vec![file(b"/4", ViolationKind::Added, 2, &[])],
        vec![file_key(b"/2"), package_key("vim", "amd64")],
    );
    assert_eq!(apply1(s, "a", r, T0 + 1).await, APPLIED);
    let hosts = s.list_hosts().await.unwrap();
    assert_eq!(
        hosts.iter().map(|h| h.host_id.as_str()).collect::<Vec<_>>(),
        vec!["a", "b"]
    );
    // Counted independently from the agent's set.
    let mut expect = [0u64; 6];
    let mut packages = 0;
    for item in agent.set.values() {
        match &item.item {
            Some(Item::File(v)) => expect[v.severity as usize] += 1,
            Some(Item::Package(p)) => {
                expect[p.severity as usize] += 1;
                packages += 1;
            }
            None => {}
        }
    }
    assert_eq!(expect, [0, 1, 1, 1, 0, 1]);
    assert_eq!(hosts[0].open_by_severity, expect);
    assert_eq!(hosts[0].open_packages, packages);
    assert_eq!(hosts[1].open_by_severity, [0; 6]);
    assert_eq!(s.host("a").await.unwrap().unwrap(), hosts[0]);
}

// --- search --------------------------------------------------------------------------------

async fn search_paths(s: &dyn Storage, glob: &str) -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = s
        .search_violations(ViolationQuery {
            path_glob: Some(glob.into()),
            ..query()
        })
        .await
        .unwrap_or_else(|e| panic!("{glob}: {e}"))
        .into_iter()
        .map(|r| match r.item.item {
            Some(Item::File(v)) => v.path,
            _ => panic!("a path glob returns file items only"),
        })
        .collect();
    v.sort();
    v
}

async fn search_by_path_glob(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h").await;
    let paths: Vec<&[u8]> = vec![
        b"/etc/ssh/sshd_config",
        b"/etc/ssh/ssh_config.d/x.conf",
        b"/etc/passwd",
        b"/etc0",
        b"/usr/bin/\xff\xfe",
        b"/usr/bin/ls",
        b"/weird/a*b",
        b"/weird/a[1]",
        b"/weird/axb",
        b"/\xff/x",
    ];
    let mut items: Vec<_> = paths
        .iter()
        .map(|p| file(p, ViolationKind::Modified, 3, &[]))
        .collect();
    items.push(package("ssh", PackageDriftKind::Changed, 3));
    let mut agent = Agent::new(1);
    assert_eq!(
        apply1(s, "h", agent.delta(items, vec![]), T0).await,
        APPLIED_FROM_EMPTY
    );

    let v = |x: &[&[u8]]| x.iter().map(|p| p.to_vec()).collect::<Vec<_>>();
    assert_eq!(
        search_paths(s, "/etc/ssh/sshd_config").await,
        v(&[b"/etc/ssh/sshd_config"])
    );
    assert_eq!(
        search_paths(s, "/etc/ssh/*").await,
        v(&[b"/etc/ssh/sshd_config"])
    );
    assert_eq!(
        search_paths(s, "/etc/**").await,
        v(&[
            b"/etc/passwd",
            b"/etc/ssh/ssh_config.d/x.conf",
            b"/etc/ssh/sshd_config"
        ])
    );
    // `*` never crosses a `/`.
    assert_eq!(
        search_paths(s, "**/*config*").await,
        v(&[b"/etc/ssh/sshd_config"])
    );
    assert_eq!(
        search_paths(s, "**/*config*/*").await,
        v(&[b"/etc/ssh/ssh_config.d/x.conf"])
    );
    // The prefix range must not leak neighbours ("/etc0" sorts right after "/etc/").
    assert_eq!(search_paths(s, "/etc/*").await, v(&[b"/etc/passwd"]));
    assert_eq!(search_paths(s, "/etc*").await, v(&[b"/etc0"]));
    // Non-UTF-8 bytes.
    assert_eq!(
        search_paths(s, "/usr/bin/*").await,
        v(&[b"/usr/bin/ls", b"/usr/bin/\xff\xfe"])
    );
    assert_eq!(search_paths(s, "/?/x").await, v(&[b"/\xff/x"]));
    // Escaped metacharacters and classes.
    assert_eq!(search_paths(s, "/weird/a\\*b").await, v(&[b"/weird/a*b"]));
    assert_eq!(search_paths(s, "/weird/a[*]b").await, v(&[b"/weird/a*b"]));
    assert_eq!(
        search_paths(s, "/weird/a\\[1\\]").await,
        v(&[b"/weird/a[1]"])
    );
    assert_eq!(
        search_paths(s, "/weird/a?b").await,
        v(&[b"/weird/a*b", b"/weird/axb"])
    );
    assert_eq!(
        search_paths(s, "/weird/{a\\*b,a\\[1\\]}").await,
        v(&[b"/weird/a*b", b"/weird/a[1]"])
    );
    assert_eq!(search_paths(s, "/nothing/**").await, Vec::<Vec<u8>>::new());
    assert_eq!(search_paths(s, "**").await.len(), paths.len());
    // A bad glob is the caller's error.
    let e = s
        .search_violations(ViolationQuery {
            path_glob: Some("/a/[".into()),
            ..query()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, StorageError::InvalidArgument(_)), "{e}");
    // The limit counts matches, not scanned rows.
    let r = s
        .search_violations(ViolationQuery {
            path_glob: Some("/weird/*".into()),
            limit: 2,
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(r.len(), 2);
}

async fn search_filters(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    for h in ["web-1", "db-1"] {
        enroll(s, h).await;
    }
    let mut web_hello = hello(1);
    web_hello.image_id = "web-image".into();
    s.hello("web-1", web_hello, T0).await.unwrap();
    let mut db_hello = hello(1);
    db_hello.image_id = "db-image".into();
    s.hello("db-1", db_hello, T0).await.unwrap();

    let mut web = Agent::new(1);
    let mut db = Agent::new(1);
    let w1 = file(
        b"/etc/nginx.conf",
        ViolationKind::Modified,
        3,
        &["nginx:amd64"],
    );
    let w2 = file(
        b"/usr/bin/curl",
        ViolationKind::Added,
        4,
        &["curl:amd64", "libcurl4:amd64"],
    );
    let w3 = package("nginx", PackageDriftKind::Changed, 3);
    let d1 = file(
        b"/etc/postgresql.conf",
        ViolationKind::Modified,
        3,
        &["postgresql:amd64"],
    );
    let d2 = package("nginx", PackageDriftKind::Installed, 2);
    assert_eq!(
        apply1(
            s,
            "web-1",
            web.delta(vec![w1.clone(), w2.clone(), w3.clone()], vec![]),
            T0
        )
        .await,
        APPLIED_FROM_EMPTY
    );
    assert_eq!(
        apply1(
            s,
            "db-1",
            db.delta(vec![d1.clone(), d2.clone()], vec![]),
            T0 + 10 * MINUTE
        )
        .await,
        APPLIED_FROM_EMPTY
    );
    // Resolve w2 at +20 minutes.
    assert_eq!(
        apply1(
            s,
            "web-1",
            web.delta(vec![], vec![w2.key.clone()]),
            T0 + 20 * MINUTE
        )
        .await,
        APPLIED
    );
    let keys = |q: ViolationQuery| async move {
        let mut v: Vec<(String, Vec<u8>)> = s
            .search_violations(q)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.host_id, r.key))
            .collect();
        v.sort();
        v
    };
    let hk = |h: &str, i: &DriftItem| (h.to_owned(), i.key.clone());

    assert_eq!(keys(query()).await.len(), 4, "open only by default");
    assert_eq!(
        keys(ViolationQuery {
            include_resolved: true,
            ..query()
        })
        .await
        .len(),
        5
    );
    assert_eq!(
        keys(ViolationQuery {
            host_id: Some("db-1".into()),
            ..query()
        })
        .await,
        vec![hk("db-1", &d1), hk("db-1", &d2)]
    );
    assert_eq!(
        keys(ViolationQuery {
            kind: Some(ViolationKind::Modified as i32),
            ..query()
        })
        .await,
        vec![hk("db-1", &d1), hk("web-1", &w1), hk("web-1", &w3)],
        "package CHANGED counts as modified"
    );
    assert_eq!(
        keys(ViolationQuery {
            kind: Some(ViolationKind::Added as i32),
            include_resolved: true,
            ..query()
        })
        .await,
        vec![hk("db-1", &d2), hk("web-1", &w2)],
        "package INSTALLED counts as added"
    );
    // Package: owning package of file items, or the drifted package itself.
    assert_eq!(
        keys(ViolationQuery {
            package: Some("nginx".into()),
            ..query()
        })
        .await,
        vec![hk("db-1", &d2), hk("web-1", &w1), hk("web-1", &w3)]
    );
    assert_eq!(
        keys(ViolationQuery {
            package: Some("libcurl4".into()),
            include_resolved: true,
            ..query()
        })
        .await,
        vec![hk("web-1", &w2)]
    );
    assert!(
        keys(ViolationQuery {
            package: Some("curl".into()),
            ..query()
        })
        .await
        .is_empty(),
        "resolved occurrences are hidden by default"
    );
    assert!(
        keys(ViolationQuery {
            package: Some("ngin".into()),
            ..query()
        })
        .await
        .is_empty(),
        "package names match whole"
    );
    assert_eq!(
        keys(ViolationQuery {
            image_id: Some("db-image".into()),
            ..query()
        })
        .await,
        vec![hk("db-1", &d1), hk("db-1", &d2)]
    );
    // Time window: seen at or after since (last_seen), at or before until (first_seen).
    assert_eq!(
        keys(ViolationQuery {
            since_ms: Some(T0 + 10 * MINUTE),
            include_resolved: true,
            ..query()
        })
        .await,
        vec![hk("db-1", &d1), hk("db-1", &d2)]
    );
    assert_eq!(
        keys(ViolationQuery {
            until_ms: Some(T0 + 5 * MINUTE),
            ..query()
        })
        .await,
        vec![hk("web-1", &w1), hk("web-1", &w3)]
    );
    // Combined, and limited (newest first).
    assert_eq!(
        keys(ViolationQuery {
            host_id: Some("web-1".into()),
            package: Some("nginx".into()),
            kind: Some(ViolationKind::Modified as i32),
            path_glob: Some("/etc/*".into()),
            ..query()
        })
        .await,
        vec![hk("web-1", &w1)]
    );
    let newest = s
        .search_violations(ViolationQuery {
            limit: 2,
            include_resolved: true,
            ..query()
        })
        .await
        .unwrap();
    assert_eq!(newest.len(), 2);
    assert_eq!(newest[0].last_seen_ms, T0 + 10 * MINUTE);
    assert_eq!(newest[0].host_id, "db-1");
}

async fn security_events_are_kept(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    for i in 0..5 {
        s.record_security_event(
            SecurityEvent {
                at_ms: T0 + i,
                kind: "impersonation".into(),
                peer_host_id: (i % 2 == 0).then(|| format!("h{i}")),
                detail: format!("hello claimed x{i}"),
            },
            change_audit(),
        )
        .await
        .unwrap();
    }
    let all = s.security_events(T0, 100).await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].peer_host_id.as_deref(), Some("h0"));
    assert_eq!(all[1].peer_host_id, None);
    let later = s.security_events(T0 + 3, 100).await.unwrap();
    assert_eq!(
        later.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
        vec![T0 + 3, T0 + 4]
    );
    assert_eq!(s.security_events(T0, 2).await.unwrap().len(), 2);
}

// --- exports -------------------------------------------------------------------------------

/// (row-independent) view of an export page: (host, key, edge time).
async fn export_page(
    s: &dyn Storage,
    edge: ViolationEdge,
    after: RowPosition,
    until: i64,
    limit: u32,
) -> Vec<(i64, i64, Vec<u8>)> {
    s.export_violations(edge, after, until, limit)
        .await
        .unwrap()
        .into_iter()
        .map(|v| {
            let t = match edge {
                ViolationEdge::Opened => v.record.first_seen_ms,
                ViolationEdge::Resolved => v.record.resolved_ms.unwrap(),
            };
            (t, v.row, v.record.key)
        })
        .collect()
}

async fn export_pages_in_time_order(f: Fixture) {
    let s = f.open().await;
    let s = s.as_ref();
    enroll(s, "h1").await;
    enroll(s, "h2").await;
    let mut a1 = Agent::new(1);
    let mut a2 = Agent::new(1);
    let x = file(b"/etc/x", ViolationKind::Modified, 3, &[]);
    let y = file(b"/etc/y", ViolationKind::Added, 4, &[]);
    let z = file(b"/etc/z\xff", ViolationKind::Removed, 2, &[]);
    // Three opened at T0 (two hosts in one batch: same millisecond), one at T0 + 5.
    s.apply_reports(vec![
        to_apply("h1", a1.full(vec![x.clone(), y.clone()]), T0),
        to_apply("h2", a2.full(vec![x.clone()]), T0),
    ])
    .await
    .unwrap();
    assert_eq!(
        apply1(s, "h2", a2.delta(vec![z.clone()], vec![]), T0 + 5).await,
        APPLIED
    );
    // h1's y resolved at T0 + 7, h2's x at T0 + 9.
    assert_eq!(
        apply1(s, "h1", a1.delta(vec![], vec![y.key.clone()]), T0 + 7).await,
        APPLIED
    );
    assert_eq!(
        apply1(s, "h2", a2.delta(vec![], vec![x.key.clone()]), T0 + 9).await,
        APPLIED
    );

    let all = export_page(s, ViolationEdge::Opened, RowPosition::START, i64::MAX, 0).await;
    assert_eq!(
        all.iter().map(|(t, _, _)| *t).collect::<Vec<_>>(),
        vec![T0, T0, T0, T0 + 5]
    );
    assert!(all.windows(2).all(|w| (w[0].0, w[0].1) < (w[1].0, w[1].1)));
    // Paging by the last (time, row) visits every row once, in order.
    let mut paged = Vec::new();
    let mut after = RowPosition::START;
    for _ in 0..10 {
        let page = export_page(s, ViolationEdge::Opened, after, i64::MAX, 1).await;
        let Some(last) = page.last() else { break };
        after = RowPosition {
            at_ms: last.0,
            row: last.1,
        };
        paged.extend(page);
    }
    assert_eq!(paged, all);
    // The bound is exclusive; MIN takes the whole millisecond, MAX none of it.
    let (t, row, _) = all[1].clone();
    assert_eq!(
        export_page(
            s,
            ViolationEdge::Opened,
            RowPosition { at_ms: t, row },
            i64::MAX,
            0
        )
        .await,
        all[2..].to_vec()
    );
    assert_eq!(
        export_page(
            s,
            ViolationEdge::Opened,
            RowPosition {
                at_ms: T0,
                row: i64::MIN
            },
            i64::MAX,
            0
        )
        .await
        .len(),
        4
    );
    assert_eq!(
        export_page(
            s,
            ViolationEdge::Opened,
            RowPosition {
                at_ms: T0,
                row: i64::MAX
            },
            i64::MAX,
            0
        )
        .await
        .len(),
        1
    );
    // until is inclusive.
    assert_eq!(
        export_page(s, ViolationEdge::Opened, RowPosition::START, T0, 0)
            .await
            .len(),
        3
    );
    let resolved = export_page(s, ViolationEdge::Resolved, RowPosition::START, i64::MAX, 0).await;
    assert_eq!(
        resolved
            .iter()
            .map(|(t, _, k)| (*t, k.clone()))
            .collect::<Vec<_>>(),
        vec![(T0 + 7, y.key.clone()), (T0 + 9, x.key.clone())]
    );
    // The records carry what the API shows.
    let rec = &s
        .export_violations(ViolationEdge::Resolved, RowPosition::START, i64::MAX, 1)
        .await
        .unwrap()[0];
    assert_eq!(rec.record.host_id, "h1");
    assert_eq!(rec.record.item, y);
    assert_eq!(
        (rec.record.first_seen_ms, rec.record.resolved_ms),
        (T0, Some(T0 + 7))
    );

    for i in 0..3 {
        s.record_security_event(
            SecurityEvent {
                at_ms: T0 + i,
                kind: "impersonation".into(),
                peer_host_id: None,
                detail: format!("e{i}"),
            },
            change_audit(),
        )
        .await
        .unwrap();
    }
    let ev = s
        .export_security_events(
            RowPosition {
                at_ms: T0,
                row: i64::MAX,
            },
            T0 + 1,
            0,
        )
        .await
        .unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].event.detail, "e1");
    let ev2 = s
        .export_security_events(
            RowPosition {
                at_ms: T0,
                row: i64::MIN,
            },
            i64::MAX,
            2,
        )
        .await
        .unwrap();
    assert_eq!(
        ev2.iter()
            .map(|e| e.event.detail.as_str())
            .collect::<Vec<_>>(),
        ["e0", "e1"]
    );

    // Audit records by time (a later seq may carry an earlier time), seq breaking ties.
    let base = T0 + 1_000;
    for (at, target) in [(base + 5, "a"), (base + 2, "b"), (base + 5, "c")] {
        s.append_audit(AuditEntry::new(
            at,
            "collector",
            "host.flagged",
            target,
            serde_json::json!({}),
        ))
        .await
        .unwrap();
    }
    let audit: Vec<_> = s
        .export_audit(
            RowPosition {
                at_ms: base,
                row: i64::MIN,
            },
            i64::MAX,
            0,
        )
        .await
        .unwrap();
    assert_eq!(
        audit
            .iter()
            .map(|a| (a.at_ms, a.target.as_str()))
            .collect::<Vec<_>>(),
        [(base + 2, "b"), (base + 5, "a"), (base + 5, "c")]
    );
    assert!(audit[0].seq > audit[1].seq && audit[1].seq < audit[2].seq);
    let after = s
        .export_audit(
            RowPosition {
                at_ms: base + 5,
                row: i64::try_from(audit[1].seq).unwrap(),
            },
            base + 5,
            0,
        )
        .await
        .unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].target, "c");
    assert_eq!(after[0].hash, audit[2].hash);
}

async fn export_cursor_is_saved_and_replaced(f: Fixture) {
    let s = f.open().await;
    assert_eq!(s.export_cursor("syslog").await.unwrap(), None);
    let c = ExportCursor {
        position: "1:0:5".into(),
        saved_ms: T0,
    };
    s.save_export_cursor("syslog", c.clone()).await.unwrap();
    assert_eq!(s.export_cursor("syslog").await.unwrap(), Some(c));
    let c2 = ExportCursor {
        position: "9:2:1".into(),
        saved_ms: T0 + 1,
    };
    s.save_export_cursor("syslog", c2.clone()).await.unwrap();
    assert_eq!(s.export_cursor("syslog").await.unwrap(), Some(c2.clone()));
    assert_eq!(s.export_cursor("other").await.unwrap(), None);
    drop(s);
    assert_eq!(
        f.open().await.export_cursor("syslog").await.unwrap(),
        Some(c2)
    );
}

// --- lifecycle -----------------------------------------------------------------------------

async fn schema_too_new_is_refused(f: Fixture) {
    drop(f.open().await);
    f.set_schema_version(999).await;
    match f.try_open().await {
        Err(StorageError::SchemaTooNew { found, supported }) => {
            assert_eq!(found, 999);
            assert!(supported >= 1);
        }
        Err(e) => panic!("expected SchemaTooNew, got {e}"),
        Ok(_) => panic!("a newer schema must be refused"),
    }
}

async fn concurrent_first_opens_migrate_once(f: Fixture) {
    // Two replicas starting at once on an empty database.
    let (a, b) = tokio::join!(f.try_open(), f.try_open());
    let (a, b) = (a.unwrap(), b.unwrap());
    enroll(a.as_ref(), "h").await;
    assert_eq!(b.list_hosts().await.unwrap().len(), 1);
}

async fn reopen_keeps_everything(f: Fixture) {
    let mut agent = Agent::new(4);
    {
        let s = f.open().await;
        let s = s.as_ref();
        s.create_enrollment_token(token("dddd0001", 1, 3, T0 + MINUTE, None), change_audit())
            .await
            .unwrap();
        s.enroll_host(
            vec![("k".into(), "v".into())],
            cert("h", 1, T0 + MINUTE),
            change_audit(),
        )
        .await
        .unwrap();
        s.hello("h", hello(4), T0).await.unwrap();
        let r = agent.delta(
            vec![
                file(
                    b"/etc/\xffx",
                    ViolationKind::Modified,
                    4,
                    &["base-files:amd64"],
                ),
                package("curl", PackageDriftKind::Installed, 2),
            ],
            vec![],
        );
        assert_eq!(apply1(s, "h", r, T0).await, APPLIED_FROM_EMPTY);
        s.record_security_event(
            SecurityEvent {
                at_ms: T0,
                kind: "token-refused".into(),
                peer_host_id: None,
                detail: "x".into(),
            },
            change_audit(),
        )
        .await
        .unwrap();
        s.revoke_host("h", T0 + 1, change_audit()).await.unwrap();
    }
    let s = f.open().await;
    let s = s.as_ref();
    assert_eq!(s.list_enrollment_tokens().await.unwrap().len(), 1);
    let h = s.host("h").await.unwrap().unwrap();
    assert_eq!(h.labels, vec![("k".into(), "v".into())]);
    assert_eq!((h.position.epoch, h.position.last_seq), (4, 1));
    assert_eq!(h.position.set_digest.to_vec(), agent.digest());
    assert!(h.revoked);
    assert_eq!(open_keys(s, "h").await.len(), 2);
    assert_eq!(s.security_events(0, 10).await.unwrap().len(), 1);
    assert_eq!(s.revoked_serials(T0).await.unwrap().len(), 1);
    // The stream goes on where it stopped.
    let p = s.hello("h", hello(4), T0 + 2).await.unwrap();
    assert_eq!(p.last_seq, 1);
    let r = agent.delta(vec![], vec![package_key("curl", "amd64")]);
    assert_eq!(apply1(s, "h", r, T0 + 3).await, APPLIED);
}

// --- audit log -----------------------------------------------------------------------------

fn audit_entry(i: u32) -> AuditEntry {
    AuditEntry::new(
        T0 + i64::from(i),
        "token:0123abcd",
        "host.retired",
        format!("web-{i}"),
        serde_json::json!({ "reason": format!("decommissioned <{i}>\n|=") }),
    )
}

/// Reads the whole log in pages of `page` and verifies it.
async fn verify_audit(s: &dyn Storage, page: u32) -> Result<(u64, Vec<u64>), ChainError> {
    let mut v = ChainVerifier::new();
    let mut seqs = Vec::new();
    let mut after = 0;
    for _ in 0..10_000 {
        let records = s.audit_records(after, page).await.unwrap();
        let Some(last) = records.last() else { break };
        after = last.seq;
        for r in &records {
            v.push(r)?;
            seqs.push(r.seq);
        }
    }
    v.finish()?;
    Ok((v.count(), seqs))
}

async fn audit_appends_form_one_verifiable_chain(f: Fixture) {
    let s = f.open().await;
    assert_eq!(verify_audit(s.as_ref(), 3).await.unwrap().0, 0);
    // Concurrent appends must still form one chain, without forks or gaps.
    let appends = (1..=12).map(|i| {
        let s = Arc::clone(&s);
        tokio::spawn(async move { s.append_audit(audit_entry(i)).await.unwrap() })
    });
    let mut seqs = Vec::new();
    for a in appends {
        seqs.push(a.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=12).collect::<Vec<u64>>());
    let (count, read) = verify_audit(s.as_ref(), 5).await.unwrap();
    assert_eq!(count, 12);
    assert_eq!(read, seqs);
    // The stored record is what was appended, detail as compact JSON.
    let first = s.audit_records(0, 1).await.unwrap().remove(0);
    assert_eq!(first.actor, "token:0123abcd");
    assert_eq!(first.action, "host.retired");
    let detail: serde_json::Value = serde_json::from_str(&first.detail).unwrap();
    assert!(
        detail["reason"]
            .as_str()
            .unwrap()
            .starts_with("decommissioned <")
    );
    // An entry over the limits is refused and appends nothing.
    let mut big = audit_entry(99);
    big.target = "x".repeat(5000);
    assert!(matches!(
        s.append_audit(big).await,
        Err(StorageError::InvalidArgument(_))
    ));
    assert_eq!(verify_audit(s.as_ref(), 100).await.unwrap().0, 12);
    // Kept across a reopen; the chain continues.
    drop(s);
    let s = f.open().await;
    assert_eq!(s.append_audit(audit_entry(13)).await.unwrap(), 13);
    assert_eq!(verify_audit(s.as_ref(), 4).await.unwrap().0, 13);
}

async fn audit_tampering_is_named_at_the_first_bad_record(f: Fixture) {
    let f = &f;
    let tampered = move |sql: &'static str| async move {
        let s = f.open().await;
        f.sql("DELETE FROM audit_log").await;
        for i in 1..=5 {
            s.append_audit(audit_entry(i)).await.unwrap();
        }
        verify_audit(s.as_ref(), 2).await.unwrap();
        f.sql(sql).await;
        verify_audit(s.as_ref(), 2).await.unwrap_err()
    };
    // Altered.
    let e =
        tampered("UPDATE audit_log SET detail = '{\"reason\":\"nothing to see\"}' WHERE seq = 3")
            .await;
    assert_eq!(e, ChainError::Hash { seq: 3 });
    let e = tampered("UPDATE audit_log SET actor = 'token:ffffffff' WHERE seq = 1").await;
    assert_eq!(e, ChainError::Hash { seq: 1 });
    // Deleted.
    let e = tampered("DELETE FROM audit_log WHERE seq = 2").await;
    assert_eq!(e.seq(), Some(3));
    // Deleted and renumbered to hide the gap.
    let e = tampered(
        "DELETE FROM audit_log WHERE seq = 2; UPDATE audit_log SET seq = seq - 1 WHERE seq > 2",
    )
    .await;
    assert_eq!(e, ChainError::Link { seq: 2 });
    // Reordered: records 2 and 4 swap places.
    let e = tampered(
        "UPDATE audit_log SET seq = 100 WHERE seq = 2; UPDATE audit_log SET seq = 2 WHERE seq = 4; \
         UPDATE audit_log SET seq = 4 WHERE seq = 100",
    )
    .await;
    assert_eq!(e, ChainError::Link { seq: 2 });
}

// --- access: API tokens, and audit records of every change ----------------------------------

/// An entry for a change whose audit record the test does not look at.
fn change_audit() -> AuditEntry {
    AuditEntry::new(T0, "local:test", "test.change", "", serde_json::json!({}))
}

fn api_token(id: &str, fill: u8, role: Role, expires_ms: Option<i64>) -> ApiToken {
    ApiToken {
        id: id.into(),
        name: format!("name of {id}"),
        role,
        secret_sha256: [fill; 32],
        created_ms: T0,
        expires_ms,
        revoked_ms: None,
        last_used_ms: None,
        created_by: "local:root".into(),
    }
}

async fn audit_actions(s: &dyn Storage) -> Vec<(String, String, String)> {
    s.audit_records(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.actor, r.action, r.target))
        .collect()
}

async fn api_tokens_are_created_found_by_hash_and_revoked(f: Fixture) {
    let s = f.open().await;
    let created = |id: &str| {
        AuditEntry::new(
            T0,
            "local:root",
            "api_token.created",
            id,
            serde_json::json!({}),
        )
    };
    let a = api_token("0000000a", 1, Role::Admin, None);
    let b = api_token("0000000b", 2, Role::Auditor, Some(T0 + MINUTE));
    s.create_api_token(a.clone(), created("0000000a"))
        .await
        .unwrap();
    s.create_api_token(b.clone(), created("0000000b"))
        .await
        .unwrap();
    assert_eq!(
        s.list_api_tokens().await.unwrap(),
        vec![a.clone(), b.clone()]
    );
    assert_eq!(s.api_token_by_hash([1; 32]).await.unwrap(), Some(a.clone()));
    assert_eq!(s.api_token_by_hash([2; 32]).await.unwrap(), Some(b.clone()));
    assert_eq!(s.api_token_by_hash([9; 32]).await.unwrap(), None);
    // A taken id or hash is refused, and neither the row nor its audit record is stored.
    for dup in [
        api_token("0000000a", 7, Role::Auditor, None),
        api_token("0000000c", 1, Role::Auditor, None),
    ] {
        let e = s.create_api_token(dup, created("dup")).await.unwrap_err();
        assert!(matches!(e, StorageError::InvalidArgument(_)), "{e}");
    }
    // So is a name with control characters.
    let mut bad = api_token("0000000d", 4, Role::Auditor, None);
    bad.name = "evil\x1b[2J".into();
    assert!(s.create_api_token(bad, created("bad")).await.is_err());
    assert_eq!(s.list_api_tokens().await.unwrap().len(), 2);
    // Revocation: once, audited once; unknown ids are reported, not audited.
    let revoked = || {
        AuditEntry::new(
            T0 + 5,
            "token:0000000a",
            "api_token.revoked",
            "0000000b",
            serde_json::json!({}),
        )
    };
    assert_eq!(
        s.revoke_api_token("0000000b", T0 + 5, revoked())
            .await
            .unwrap(),
        RevokeOutcome::Revoked
    );
    assert_eq!(
        s.revoke_api_token("0000000b", T0 + 6, revoked())
            .await
            .unwrap(),
        RevokeOutcome::AlreadyRevoked(T0 + 5)
    );
    assert_eq!(
        s.revoke_api_token("ffffffff", T0 + 6, revoked())
            .await
            .unwrap(),
        RevokeOutcome::NotFound
    );
    let b2 = s.api_token_by_hash([2; 32]).await.unwrap().unwrap();
    assert_eq!(b2.revoked_ms, Some(T0 + 5));
    assert!(!b2.active_at(T0 + 6));
    assert_eq!(
        audit_actions(s.as_ref()).await,
        vec![
            (
                "local:root".into(),
                "api_token.created".into(),
                "0000000a".into()
            ),
            (
                "local:root".into(),
                "api_token.created".into(),
                "0000000b".into()
            ),
            (
                "token:0000000a".into(),
                "api_token.revoked".into(),
                "0000000b".into()
            ),
        ]
    );
    // Kept across a reopen.
    drop(s);
    let s = f.open().await;
    assert_eq!(s.list_api_tokens().await.unwrap(), vec![a, b2]);
}

async fn api_token_last_use_is_written_at_most_once_a_minute(f: Fixture) {
    let s = f.open().await;
    s.create_api_token(
        api_token("0000000a", 1, Role::Operator, None),
        change_audit(),
    )
    .await
    .unwrap();
    let last = |s: Arc<dyn Storage>| async move {
        s.api_token_by_hash([1; 32])
            .await
            .unwrap()
            .unwrap()
            .last_used_ms
    };
    assert_eq!(last(s.clone()).await, None);
    s.touch_api_token("0000000a", T0 + 1000).await.unwrap();
    assert_eq!(last(s.clone()).await, Some(T0 + 1000));
    s.touch_api_token("0000000a", T0 + 30_000).await.unwrap();
    assert_eq!(last(s.clone()).await, Some(T0 + 1000));
    s.touch_api_token("0000000a", T0 + 61_000).await.unwrap();
    assert_eq!(last(s.clone()).await, Some(T0 + 61_000));
    // An unknown id changes nothing and is no error; use is not audited.
    s.touch_api_token("ffffffff", T0).await.unwrap();
    assert_eq!(audit_actions(s.as_ref()).await.len(), 1);
}

async fn changes_are_audited_in_their_own_transaction(f: Fixture) {
    let s = f.open().await;
    let e = |actor: &str, action: &str, target: &str| {
        AuditEntry::new(T0, actor, action, target, serde_json::json!({ "k": "v" }))
    };
    s.create_enrollment_token(
        token("aaaa0001", 1, 1, T0 + MINUTE, None),
        e("local:root", "token.created", "aaaa0001"),
    )
    .await
    .unwrap();
    s.enroll_host(
        vec![("role".into(), "web".into())],
        cert("web-1", 1, T0 + MINUTE),
        e("host:web-1", "host.enrolled", "web-1"),
    )
    .await
    .unwrap();
    s.revoke_host("web-1", T0 + 1, e("local:root", "host.revoked", "web-1"))
        .await
        .unwrap();
    s.record_security_event(
        SecurityEvent {
            at_ms: T0 + 2,
            kind: "impersonation".into(),
            peer_host_id: Some("web-1".into()),
            detail: "claimed db-1".into(),
        },
        e("collector", "security.impersonation_refused", "web-1"),
    )
    .await
    .unwrap();
    let want: Vec<(String, String, String)> = [
        ("local:root", "token.created", "aaaa0001"),
        ("host:web-1", "host.enrolled", "web-1"),
        ("local:root", "host.revoked", "web-1"),
        ("collector", "security.impersonation_refused", "web-1"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(audit_actions(s.as_ref()).await, want);
    // A change that fails leaves no record; an invalid record makes the change fail.
    assert!(
        s.revoke_host("nobody", T0, e("local:root", "host.revoked", "nobody"))
            .await
            .is_err()
    );
    let mut too_big = e("local:root", "token.created", "aaaa0002");
    too_big.target = "x".repeat(5000);
    assert!(
        s.create_enrollment_token(token("aaaa0002", 2, 1, T0 + MINUTE, None), too_big)
            .await
            .is_err()
    );
    assert_eq!(s.list_enrollment_tokens().await.unwrap().len(), 1);
    let mut too_big = e("collector", "security.x_refused", "");
    too_big.actor = "y".repeat(5000);
    assert!(
        s.record_security_event(
            SecurityEvent {
                at_ms: T0 + 3,
                kind: "x".into(),
                peer_host_id: None,
                detail: String::new(),
            },
            too_big,
        )
        .await
        .is_err()
    );
    assert_eq!(s.security_events(0, 100).await.unwrap().len(), 1);
    assert_eq!(audit_actions(s.as_ref()).await, want);
    verify_audit(s.as_ref(), 2).await.unwrap();
}

// --- lifecycle, acknowledgements, registry --------------------------------------------------

fn audit(action: &str, target: &str) -> AuditEntry {
    AuditEntry::new(T0, "collector", action, target, serde_json::json!({}))
}

fn transition(host: &str, from: Lifecycle, to: Lifecycle, at: i64) -> TransitionRecord {
    TransitionRecord {
        host_id: host.into(),
        from,
        to,
        at_ms: at,
        cause: format!("{from} to {to}"),
        actor: "collector".into(),
    }
}

async fn action_names(s: &dyn Storage) -> Vec<String> {
    s.audit_records(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.action)
        .collect()
}

async fn lifecycle_transitions_are_compare_and_set_with_audit(f: Fixture) {
    let s = f.open().await;
    let s = &*s;
    s.enroll_host(
        vec![("role".into(), "web".into())],
        cert("web-1", 1, T0 + 1000 * MINUTE),
        change_audit(),
    )
    .await
    .unwrap();
    enroll(s, "db-1").await;
    let enrolled = action_names(s).await.len();
    let states = s.lifecycle_states().await.unwrap();
    assert_eq!(states.len(), 2);
    let web = states.iter().find(|h| h.host_id == "web-1").unwrap();
    assert_eq!(
        (
            web.state,
            web.since_ms,
            web.role.as_deref(),
            web.enrolled_ms
        ),
        (Lifecycle::Enrolled, T0, Some("web"), T0)
    );
    assert_eq!(
        states.iter().find(|h| h.host_id == "db-1").unwrap().role,
        None
    );

    let t = transition("web-1", Lifecycle::Enrolled, Lifecycle::Clean, T0 + MINUTE);
    assert!(
        s.record_transition(t, audit("host.state_changed", "web-1"))
            .await
            .unwrap()
    );
    // Computed from a state the host has left: nothing written, no audit record.
    let stale = transition(
        "web-1",
        Lifecycle::Enrolled,
        Lifecycle::Drifted,
        T0 + 2 * MINUTE,
    );
    assert!(
        !s.record_transition(stale, audit("host.state_changed", "web-1"))
            .await
            .unwrap()
    );
    let t = transition(
        "web-1",
        Lifecycle::Clean,
        Lifecycle::Flagged,
        T0 + 3 * MINUTE,
    );
    assert!(
        s.record_transition(t, audit("host.flagged", "web-1"))
            .await
            .unwrap()
    );
    // A move the state machine refuses is refused whatever the stored state.
    let bad = transition(
        "web-1",
        Lifecycle::Flagged,
        Lifecycle::Replaced,
        T0 + 4 * MINUTE,
    );
    assert!(matches!(
        s.record_transition(bad, audit("host.replaced", "web-1"))
            .await,
        Err(StorageError::InvalidArgument(_))
    ));
    let unknown = transition("nope", Lifecycle::Enrolled, Lifecycle::Clean, T0);
    assert!(matches!(
        s.record_transition(unknown, audit("host.state_changed", "nope"))
            .await,
        Err(StorageError::UnknownHost(_))
    ));

    let web = s
        .lifecycle_states()
        .await
        .unwrap()
        .into_iter()
        .find(|h| h.host_id == "web-1")
        .unwrap();
    assert_eq!(
        (web.state, web.since_ms),
        (Lifecycle::Flagged, T0 + 3 * MINUTE)
    );
    let list = s.transitions("web-1", 0).await.unwrap();
    let moves: Vec<(Lifecycle, Lifecycle, i64)> =
        list.iter().map(|t| (t.from, t.to, t.at_ms)).collect();
    assert_eq!(
        moves,
        [
            (Lifecycle::Clean, Lifecycle::Flagged, T0 + 3 * MINUTE),
            (Lifecycle::Enrolled, Lifecycle::Clean, T0 + MINUTE),
        ]
    );
    assert_eq!(list[0].cause, "clean to flagged");
    assert_eq!(list[0].actor, "collector");
    assert_eq!(s.transitions("web-1", 1).await.unwrap().len(), 1);
    assert!(s.transitions("db-1", 0).await.unwrap().is_empty());
    assert!(matches!(
        s.transitions("nope", 0).await,
        Err(StorageError::UnknownHost(_))
    ));
    // One audit record per recorded transition, in the same chain.
    assert_eq!(
        action_names(s).await[enrolled..],
        ["host.state_changed", "host.flagged"]
    );

    // Two writers racing from the same state: exactly one wins.
    let a = transition(
        "web-1",
        Lifecycle::Flagged,
        Lifecycle::Retired,
        T0 + 5 * MINUTE,
    );
    let b = transition(
        "web-1",
        Lifecycle::Flagged,
        Lifecycle::RebuildRequested,
        T0 + 5 * MINUTE,
    );
    let (ra, rb) = tokio::join!(
        s.record_transition(a, audit("host.retired", "web-1")),
        s.record_transition(b, audit("rebuild.requested", "web-1")),
    );
    assert!(ra.unwrap() ^ rb.unwrap());
    assert_eq!(s.transitions("web-1", 0).await.unwrap().len(), 3);
    drop(f);
}

async fn lifecycle_transition_batches_are_one_transaction_each_move_compared(f: Fixture) {
    let s = f.open().await;
    let s = &*s;
    for h in ["a", "b", "c"] {
        enroll(s, h).await;
    }
    let before = action_names(s).await.len();
    assert!(s.record_transitions(Vec::new()).await.unwrap().is_empty());
    // b is moved by someone else first: its move in the batch is stale and skipped, the
    // others are recorded; a host named twice sees its first move.
    assert!(
        s.record_transition(
            transition("b", Lifecycle::Enrolled, Lifecycle::Clean, T0 + MINUTE),
            audit("host.state_changed", "b"),
        )
        .await
        .unwrap()
    );
    let at = T0 + 2 * MINUTE;
    let done = s
        .record_transitions(vec![
            (
                transition("a", Lifecycle::Enrolled, Lifecycle::Drifted, at),
                audit("host.state_changed", "a"),
            ),
            (
                transition("b", Lifecycle::Enrolled, Lifecycle::Flagged, at),
                audit("host.flagged", "b"),
            ),
            (
                transition("c", Lifecycle::Enrolled, Lifecycle::Flagged, at),
                audit("host.flagged", "c"),
            ),
            (
                transition("a", Lifecycle::Drifted, Lifecycle::Flagged, at + 1),
                audit("host.flagged", "a"),
            ),
            (
                transition("c", Lifecycle::Enrolled, Lifecycle::Clean, at + 1),
                audit("host.state_changed", "c"),
            ),
        ])
        .await
        .unwrap();
    assert_eq!(done, [true, false, true, true, false]);
    let states: Vec<(String, Lifecycle, i64)> = s
        .lifecycle_states()
        .await
        .unwrap()
        .into_iter()
        .map(|h| (h.host_id, h.state, h.since_ms))
        .collect();
    assert_eq!(
        states,
        [
            ("a".to_string(), Lifecycle::Flagged, at + 1),
            ("b".to_string(), Lifecycle::Clean, T0 + MINUTE),
            ("c".to_string(), Lifecycle::Flagged, at),
        ]
    );
    let moves: Vec<(Lifecycle, Lifecycle)> = s
        .transitions("a", 0)
        .await
        .unwrap()
        .iter()
        .map(|t| (t.from, t.to))
        .collect();
    assert_eq!(
        moves,
        [
            (Lifecycle::Drifted, Lifecycle::Flagged),
            (Lifecycle::Enrolled, Lifecycle::Drifted),
        ]
    );
    // One audit record per recorded move, in order, in the one verifiable chain.
    let records = s.audit_records(0, 1000).await.unwrap();
    let tail: Vec<(&str, &str)> = records[before..]
        .iter()
        .map(|r| (r.action.as_str(), r.target.as_str()))
        .collect();
    assert_eq!(
        tail,
        [
            ("host.state_changed", "b"),
            ("host.state_changed", "a"),
            ("host.flagged", "c"),
            ("host.flagged", "a"),
        ]
    );
    let (count, seqs) = verify_audit(s, 2).await.unwrap();
    assert_eq!(count, records.len() as u64);
    assert_eq!(seqs, records.iter().map(|r| r.seq).collect::<Vec<_>>());

    // A refused move or an unknown host anywhere in the batch: nothing of it is written.
    let n = records.len();
    for bad in [
        transition("b", Lifecycle::Clean, Lifecycle::Replaced, at + 2),
        transition("nope", Lifecycle::Enrolled, Lifecycle::Clean, at + 2),
    ] {
        let r = s
            .record_transitions(vec![
                (
                    transition("b", Lifecycle::Clean, Lifecycle::Drifted, at + 2),
                    audit("host.state_changed", "b"),
                ),
                (bad, audit("host.state_changed", "x")),
            ])
            .await;
        assert!(
            matches!(
                r,
                Err(StorageError::InvalidArgument(_) | StorageError::UnknownHost(_))
            ),
            "{r:?}"
        );
    }
    assert_eq!(s.audit_records(0, 1000).await.unwrap().len(), n);
    assert_eq!(s.transitions("b", 0).await.unwrap().len(), 1);
    drop(f);
}

async fn lifecycle_moves_race_once_and_never_wait_for_report_batches(f: Fixture) {
    let s1 = f.open().await;
    let s2 = f.open().await;
    let hosts: Vec<String> = (0..20).map(|i| format!("r{i}")).collect();
    for h in &hosts {
        enroll(&*s1, h).await;
    }
    let before = action_names(&*s1).await.len();
    // Two replicas' reconcilers moving the same hosts at once: each move is recorded once.
    let moves = |s: Arc<dyn Storage>, hosts: Vec<String>| async move {
        let mut won = 0;
        for h in &hosts {
            let t = transition(h, Lifecycle::Enrolled, Lifecycle::Flagged, T0 + MINUTE);
            if s.record_transition(t, audit("host.flagged", h))
                .await
                .unwrap()
            {
                won += 1;
            }
        }
        won
    };
    let (a, b) = tokio::join!(
        tokio::spawn(moves(Arc::clone(&s1), hosts.clone())),
        tokio::spawn(moves(Arc::clone(&s2), hosts.clone())),
    );
    assert_eq!(
        a.unwrap() + b.unwrap(),
        hosts.len(),
        "a move recorded twice or never"
    );
    assert_eq!(action_names(&*s1).await.len(), before + hosts.len());
    for h in &hosts {
        assert_eq!(s1.transitions(h, 10).await.unwrap().len(), 1, "{h}");
    }

    // PostgreSQL: a report batch holds its host rows locked while it commits, a lifecycle
    // move's inserts take a key-share lock on theirs (foreign keys); neither waits for the
    // other (a reconciler batch flagging a few hundred hosts held up every lane for seconds).
    // One SQLite file has one writer at a time: there is nothing to overlap.
    if f.kind == Kind::Postgres {
        let (other, conn) = tokio_postgres::connect(&f.pg_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        let limit = std::time::Duration::from_secs(10);
        // What an in-flight report batch of host r0 holds (the same lock as apply takes).
        other
            .batch_execute("BEGIN; SELECT 1 FROM hosts WHERE host_id = 'r0' FOR NO KEY UPDATE")
            .await
            .unwrap();
        let t = transition(
            "r0",
            Lifecycle::Flagged,
            Lifecycle::Drifted,
            T0 + 2 * MINUTE,
        );
        let moved = tokio::time::timeout(
            limit,
            s1.record_transition(t, audit("host.state_changed", "r0")),
        )
        .await
        .expect("a lifecycle move waited for a report batch's host row lock");
        assert!(moved.unwrap());
        // What an in-flight lifecycle move of r1 holds on its host row.
        other
            .batch_execute(
                "ROLLBACK; BEGIN; SELECT 1 FROM hosts WHERE host_id = 'r1' FOR KEY SHARE",
            )
            .await
            .unwrap();
        let mut agent = Agent::new(1);
        let report = agent.full(vec![file(b"/etc/r1", ViolationKind::Modified, 3, &[])]);
        let out = tokio::time::timeout(limit, s1.apply_reports(vec![to_apply("r1", report, T0)]))
            .await
            .expect("a report batch waited for a lifecycle move's key-share lock");
        assert_eq!(out.unwrap(), vec![APPLIED_FROM_EMPTY]);
        other.batch_execute("ROLLBACK").await.unwrap();
        drop(other);
        let _ = task.await;
    }
}

async fn acknowledgements_cover_the_named_open_items(f: Fixture) {
    let s = f.open().await;
    let s = &*s;
    enroll(s, "h").await;
    let motd = file(b"/etc/motd", ViolationKind::Modified, 3, &[]);
    let odd = file(b"/etc/\xff\n", ViolationKind::Added, 5, &[]);
    let curl = package("curl", PackageDriftKind::Installed, 3);
    let mut agent = Agent::new(1);
    let r = agent.full(vec![motd.clone(), odd.clone(), curl.clone()]);
    assert_eq!(apply1(s, "h", r, T0).await, APPLIED_FROM_EMPTY);

    let req = |paths: Vec<Vec<u8>>, packages: Vec<&str>, all: bool| AckRequest {
        host_id: "h".into(),
        paths,
        packages: packages.into_iter().map(str::to_owned).collect(),
        all,
        reason: "planned change CHG-1".into(),
        actor: "token:op".into(),
        at_ms: T0 + MINUTE,
        expires_ms: T0 + 60 * MINUTE,
    };
    let acks = s
        .acknowledge(
            req(vec![b"/etc/\xff\n".to_vec()], vec!["curl"], false),
            audit("violation.acknowledged", "h"),
        )
        .await
        .unwrap();
    assert_eq!(acks.len(), 2);
    let listed = s.acknowledgements(None, T0 + 2 * MINUTE).await.unwrap();
    assert_eq!(listed, acks);
    let odd_ack = listed.iter().find(|a| a.path.is_some()).unwrap();
    assert_eq!(odd_ack.key, odd.key);
    assert_eq!(odd_ack.item_hash, item_hash(&odd));
    assert_eq!(odd_ack.reason, "planned change CHG-1");
    let pkg_ack = listed.iter().find(|a| a.package.is_some()).unwrap();
    assert_eq!(pkg_ack.package.as_deref(), Some("curl:amd64"));
    assert_eq!(pkg_ack.item_hash, item_hash(&curl));
    assert_eq!(s.acknowledgements(Some("h"), T0).await.unwrap().len(), 2);
    assert!(
        s.acknowledgements(Some("other"), T0)
            .await
            .unwrap()
            .is_empty()
    );
    // Expired at its expiry.
    assert!(
        s.acknowledgements(None, T0 + 60 * MINUTE)
            .await
            .unwrap()
            .is_empty()
    );

    // A path with no open violation: refused, nothing written, no audit record.
    let before = action_names(s).await.len();
    for bad in [
        req(vec![b"/etc/passwd".to_vec()], vec![], false),
        req(vec![b"/etc/motd".to_vec()], vec!["vim"], false),
        req(vec![], vec![], false),
        AckRequest {
            reason: " ".into(),
            ..req(vec![], vec![], true)
        },
        AckRequest {
            expires_ms: T0,
            ..req(vec![], vec![], true)
        },
    ] {
        assert!(matches!(
            s.acknowledge(bad, audit("violation.acknowledged", "h"))
                .await,
            Err(StorageError::InvalidArgument(_))
        ));
    }
    assert_eq!(action_names(s).await.len(), before);
    assert_eq!(s.acknowledgements(None, T0).await.unwrap().len(), 2);
    assert!(matches!(
        s.acknowledge(
            AckRequest {
                host_id: "nope".into(),
                ..req(vec![], vec![], true)
            },
            audit("violation.acknowledged", "nope")
        )
        .await,
        Err(StorageError::UnknownHost(_))
    ));
    // all: every open item.
    let all = s
        .acknowledge(
            req(vec![], vec![], true),
            audit("violation.acknowledged", "h"),
        )
        .await
        .unwrap();
    assert_eq!(all.len(), 3);
    let acked = action_names(s).await;
    assert_eq!(
        acked
            .iter()
            .filter(|a| *a == "violation.acknowledged")
            .count(),
        2,
        "{acked:?}"
    );
    drop(motd);
}

fn registered(image: &str, version: &str, root: u8) -> RegisteredBaseline {
    RegisteredBaseline {
        image_id: image.into(),
        image_version: version.into(),
        merkle_root: [root; 32],
        signer: "ed25519:00112233".into(),
        created_unix: T0 / 1000,
        expires_unix: Some(T0 / 1000 + 86_400),
        entry_count: 42,
        pushed_ms: T0,
        actor: "token:admin".into(),
    }
}

async fn registry_refuses_versions_not_newer(f: Fixture) {
    let s = f.open().await;
    let s = &*s;
    assert!(s.registered_baselines().await.unwrap().is_empty());
    let push = |b| s.register_baseline(b, audit("baseline.pushed", "web"));
    push(registered("web", "2026.11.9", 1)).await.unwrap();
    for stale in ["2026.11.9", "2026.11.1", "2026.9.30", "2026.11"] {
        assert!(
            matches!(
                push(registered("web", stale, 2)).await,
                Err(StorageError::Conflict(_))
            ),
            "{stale}"
        );
    }
    push(registered("web", "2026.11.10", 3)).await.unwrap();
    push(registered("db", "1", 4)).await.unwrap();
    let all = s.registered_baselines().await.unwrap();
    let order: Vec<(&str, &str, u8)> = all
        .iter()
        .map(|b| {
            (
                b.image_id.as_str(),
                b.image_version.as_str(),
                b.merkle_root[0],
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("db", "1", 4),
            ("web", "2026.11.10", 3),
            ("web", "2026.11.9", 1)
        ]
    );
    assert_eq!(all[1], registered("web", "2026.11.10", 3));
    assert_eq!(
        action_names(s).await,
        ["baseline.pushed", "baseline.pushed", "baseline.pushed"]
    );
    // Concurrent pushes of the same new version: one wins.
    let (a, b) = tokio::join!(
        push(registered("web", "2026.12.1", 5)),
        push(registered("web", "2026.12.1", 6)),
    );
    assert!(a.is_ok() ^ b.is_ok(), "{a:?} {b:?}");
}

// --- rebuild actions -----------------------------------------------------------------------

fn new_action(host: &str, flagged_ms: i64, state: ActionState) -> RebuildAction {
    let key = actions::idempotency_key(host, flagged_ms);
    RebuildAction {
        id: actions::action_id(&key),
        idempotency_key: key,
        host_id: host.into(),
        image_id: "web".into(),
        role: Some("web".into()),
        flagged_ms,
        reasons: vec!["severity high or above".into(), "path <x>\n|=".into()],
        state,
        dry_run: false,
        created_ms: flagged_ms + 10,
        updated_ms: flagged_ms + 10,
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

fn action_audit(verb: &str, a: &RebuildAction) -> AuditEntry {
    AuditEntry::new(
        a.updated_ms,
        "collector",
        verb,
        format!("host:{}", a.host_id),
        serde_json::json!({ "action_id": a.id }),
    )
}

async fn actions_are_created_once_per_key_with_audit(f: Fixture) {
    let s = f.open().await;
    let a = new_action("web-1", T0, ActionState::PendingApproval);
    assert!(
        s.create_action(a.clone(), action_audit("rebuild.requested", &a))
            .await
            .unwrap()
    );
    // The same flagging again (another replica, a retried round): nothing new, no audit.
    let mut again = a.clone();
    again.created_ms += 5;
    assert!(
        !s.create_action(again.clone(), action_audit("rebuild.requested", &again))
            .await
            .unwrap()
    );
    assert_eq!(s.action(&a.id).await.unwrap(), Some(a.clone()));
    assert_eq!(action_names(s.as_ref()).await, ["rebuild.requested"]);
    assert_eq!(s.action("rb_none").await.unwrap(), None);
    // A later flagging of the same host is another action.
    let b = new_action("web-1", T0 + 60_000, ActionState::Pending);
    assert!(
        s.create_action(b.clone(), action_audit("rebuild.requested", &b))
            .await
            .unwrap()
    );
    assert_ne!(a.id, b.id);
    // An audit entry the log refuses rolls the action back too.
    let c = new_action("web-2", T0, ActionState::Pending);
    let mut bad = action_audit("rebuild.requested", &c);
    bad.actor = String::new();
    assert!(s.create_action(c.clone(), bad).await.is_err());
    assert_eq!(s.action(&c.id).await.unwrap(), None);
    // Kept across a reopen.
    drop(s);
    let s = f.open().await;
    assert_eq!(s.action(&b.id).await.unwrap(), Some(b));
}

async fn action_updates_are_compare_and_set_with_attempts(f: Fixture) {
    let s = f.open().await;
    let a = new_action("web-1", T0, ActionState::Pending);
    s.create_action(a.clone(), action_audit("rebuild.requested", &a))
        .await
        .unwrap();
    let mut t = a.clone();
    t.state = ActionState::Triggered;
    t.triggered_ms = Some(T0 + 100);
    t.updated_ms = T0 + 100;
    t.next_attempt_ms = Some(T0 + 100);
    t.payload = Some(b"{\"type\":\"driftwatch.rebuild.requested\"}\x00\xff".to_vec());
    assert!(
        s.update_action(
            ActionState::Pending,
            t.clone(),
            None,
            action_audit("rebuild.triggered", &t)
        )
        .await
        .unwrap()
    );
    // A second writer that computed from `pending` loses.
    let mut other = a.clone();
    other.state = ActionState::Cancelled;
    assert!(
        !s.update_action(
            ActionState::Pending,
            other.clone(),
            None,
            action_audit("rebuild.cancelled", &other)
        )
        .await
        .unwrap()
    );
    assert_eq!(s.action(&a.id).await.unwrap(), Some(t.clone()));
    // Failed attempt, then success: each attempt stored with its action change.
    let mut f1 = t.clone();
    f1.attempts = 1;
    f1.last_error = Some("HTTP 500: \\x1b[2J".into());
    f1.next_attempt_ms = Some(T0 + 2_000);
    let at1 = AttemptRecord {
        action_id: a.id.clone(),
        attempt: 1,
        at_ms: T0 + 100,
        duration_ms: 12,
        delivered: false,
        status: Some(500),
        detail: "HTTP 500: \\x1b[2J".into(),
    };
    assert!(
        s.update_action(
            ActionState::Triggered,
            f1.clone(),
            Some(at1.clone()),
            action_audit("rebuild.attempt_failed", &f1)
        )
        .await
        .unwrap()
    );
    let mut ok = f1.clone();
    ok.state = ActionState::Delivered;
    ok.attempts = 2;
    ok.next_attempt_ms = None;
    let at2 = AttemptRecord {
        attempt: 2,
        at_ms: T0 + 2_000,
        delivered: true,
        status: Some(202),
        detail: "HTTP 202".into(),
        ..at1.clone()
    };
    assert!(
        s.update_action(
            ActionState::Triggered,
            ok.clone(),
            Some(at2.clone()),
            action_audit("rebuild.succeeded", &ok)
        )
        .await
        .unwrap()
    );
    assert_eq!(s.action_attempts(&a.id).await.unwrap(), vec![at1, at2]);
    assert_eq!(s.action(&a.id).await.unwrap(), Some(ok.clone()));
    // An update whose audit record is refused changes nothing (and stores no attempt).
    let mut done = ok.clone();
    done.state = ActionState::Completed;
    let mut bad = action_audit("rebuild.completed", &done);
    bad.action = String::new();
    let at3 = AttemptRecord {
        attempt: 3,
        ..ok_attempt(&a.id)
    };
    assert!(
        s.update_action(ActionState::Delivered, done, Some(at3), bad)
            .await
            .is_err()
    );
    assert_eq!(s.action(&a.id).await.unwrap(), Some(ok));
    assert_eq!(s.action_attempts(&a.id).await.unwrap().len(), 2);
    assert_eq!(
        action_names(s.as_ref()).await,
        [
            "rebuild.requested",
            "rebuild.triggered",
            "rebuild.attempt_failed",
            "rebuild.succeeded"
        ]
    );
    // Unknown id: false.
    let mut ghost = new_action("web-9", T0, ActionState::Pending);
    ghost.id = "rb_ghost".into();
    assert!(
        !s.update_action(
            ActionState::Pending,
            ghost.clone(),
            None,
            action_audit("rebuild.cancelled", &ghost)
        )
        .await
        .unwrap()
    );
}

fn ok_attempt(id: &str) -> AttemptRecord {
    AttemptRecord {
        action_id: id.into(),
        attempt: 1,
        at_ms: T0,
        duration_ms: 1,
        delivered: true,
        status: Some(0),
        detail: "exit status 0".into(),
    }
}

async fn action_listing_filters_and_dispatch_view(f: Fixture) {
    let s = f.open().await;
    let mut made = Vec::new();
    for (i, (host, state, triggered)) in [
        ("web-1", ActionState::PendingApproval, None),
        ("web-2", ActionState::Pending, None),
        ("web-3", ActionState::Triggered, Some(T0 + 50)),
        ("web-4", ActionState::Completed, Some(T0 + 10)),
        ("web-5", ActionState::Rejected, None),
        ("web-1", ActionState::Cancelled, None),
    ]
    .into_iter()
    .enumerate()
    {
        let mut a = new_action(host, T0 + i as i64, state);
        a.created_ms = T0 + 1000 * i as i64;
        a.triggered_ms = triggered;
        s.create_action(a.clone(), action_audit("rebuild.requested", &a))
            .await
            .unwrap();
        made.push(a);
    }
    let ids = |v: Vec<RebuildAction>| v.into_iter().map(|a| a.id).collect::<Vec<_>>();
    // Newest first.
    let all = s.list_actions(ActionFilter::default()).await.unwrap();
    assert_eq!(
        ids(all),
        made.iter().rev().map(|a| a.id.clone()).collect::<Vec<_>>()
    );
    let web1 = s
        .list_actions(ActionFilter {
            host_id: Some("web-1".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(web1), [made[5].id.clone(), made[0].id.clone()]);
    let pending = s
        .list_actions(ActionFilter {
            state: Some(ActionState::PendingApproval),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(ids(pending), [made[0].id.clone()]);
    let two = s
        .list_actions(ActionFilter {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(two.len(), 2);
    // The dispatcher's view: open ones, the given keys, and triggers since the window start.
    let mut view = ids(s
        .dispatch_view(
            vec![made[4].idempotency_key.clone(), "web-x:1".into()],
            T0 + 10,
        )
        .await
        .unwrap());
    view.sort();
    let mut want = vec![
        made[0].id.clone(),
        made[1].id.clone(),
        made[2].id.clone(),
        made[3].id.clone(),
        made[4].id.clone(),
    ];
    want.sort();
    assert_eq!(view, want);
    let view = ids(s.dispatch_view(vec![], T0 + 11).await.unwrap());
    assert_eq!(view.len(), 3, "{view:?}");
}

async fn dispatch_lock_excludes_a_second_dispatcher(f: Fixture) {
    let s1 = f.open().await;
    let s2 = f.open().await;
    let mut l1 = s1.dispatch_lock().await.unwrap();
    let mut l2 = s2.dispatch_lock().await.unwrap();
    assert!(l1.try_acquire().await.unwrap());
    match f.kind {
        // One process owns a SQLite file: nothing to exclude.
        Kind::Sqlite => assert!(l2.try_acquire().await.unwrap()),
        Kind::Postgres => {
            assert!(!l2.try_acquire().await.unwrap(), "two dispatchers at once");
            l1.release().await.unwrap();
            assert!(l2.try_acquire().await.unwrap());
            assert!(!l1.try_acquire().await.unwrap());
            // A dispatcher that dies (its connection closes) frees the lock.
            drop(l2);
            let mut freed = false;
            for _ in 0..50 {
                if l1.try_acquire().await.unwrap() {
                    freed = true;
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            assert!(freed, "the lock outlived its session");
        }
    }
    l1.release().await.unwrap();
}
