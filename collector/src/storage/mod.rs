//! The collector's durable state behind one trait, [`Storage`], with two backends: SQLite
//! (embedded, the default: one file, WAL, synchronous commits) and PostgreSQL (larger fleets,
//! several collector replicas).
//!
//! What this module owns: the schema and its migrations, and every read and write of fleet
//! state. What it must never do: decide policy (who may enroll, what is a snowflake) or talk to
//! the network — callers pass values in and get values out, and every method is one
//! transaction.
//!
//! Both backends pass the same conformance suite (`collector/tests/storage.rs`), PostgreSQL
//! against a real server the tests start themselves.
//!
//! Time is passed in by the caller (`now_ms`, Unix milliseconds) so that behaviour is testable
//! without a clock.

use std::future::Future;
use std::pin::Pin;

use driftwatch_proto::v1::{DriftItem, Report, ScanStatus};

pub mod access;
pub mod actions;
mod apply;
pub mod audit;
pub mod export;
mod glob;
pub mod lifecycle;
pub mod postgres;
pub mod registry;
pub mod sqlite;

pub use access::{AccessStore, ApiToken, RevokeOutcome, Role};
pub use actions::ActionStore;
pub use audit::{AuditEntry, AuditRecord, AuditStore};
pub use export::ExportStore;
pub(crate) use glob::check_host_pattern;
pub use lifecycle::{AckRequest, Acknowledgement, HostLifecycle, LifecycleStore, TransitionRecord};
pub use postgres::PgStore;
pub use registry::{RegisteredBaseline, RegistryStore};
pub use sqlite::SqliteStore;

/// A boxed future, so `dyn Storage` works (`Arc<dyn Storage>` is shared by every task).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StorageError>> + Send + 'a>>;

/// Why a storage call failed. Callers match on it (enrollment refuses a token, the ingest maps
/// to a gRPC status), so it is an enum, not a string.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database could not be reached or refused the statement.
    #[error("database error: {0}")]
    Backend(String),
    /// The schema in the database is newer than this binary knows.
    #[error("database schema version {found} is newer than this collector supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    /// Stored bytes did not decode (a row written by a bug or by hand).
    #[error("corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error("no such host {0:?}")]
    UnknownHost(String),
    /// A caller-supplied value the storage cannot use (a glob that does not compile).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The change conflicts with stored state (a baseline version not newer than the
    /// registered one).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl StorageError {
    /// A backend error with the step that failed in front ("opening the reader connection:
    /// sqlite: database is locked"); other errors unchanged.
    pub(crate) fn context(self, step: &str) -> Self {
        match self {
            StorageError::Backend(m) => StorageError::Backend(format!("{step}: {m}")),
            other => other,
        }
    }
}

/// Why an enrollment token was not accepted. Returned inside [`StorageError::Token`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("unknown enrollment token")]
    Unknown,
    #[error("enrollment token expired")]
    Expired,
    #[error("enrollment token already used up")]
    Exhausted,
    #[error("host id {host_id:?} does not match the token's host pattern {pattern:?}")]
    HostPatternMismatch { host_id: String, pattern: String },
}

/// An enrollment token as stored. The secret itself is never stored: only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollmentToken {
    /// Public, printable id (shown in listings and audit records).
    pub id: String,
    pub secret_sha256: [u8; 32],
    pub created_ms: i64,
    pub expires_ms: i64,
    /// How many enrollments it still allows.
    pub uses_left: u32,
    /// A glob the requested host id must match; `None` = any.
    pub host_pattern: Option<String>,
}

/// A client certificate the CA issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub host_id: String,
    /// Serial number, big-endian bytes as in the certificate.
    pub serial: Vec<u8>,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub issued_ms: i64,
}

/// What an agent said about itself at the start of a stream (everything but the identity,
/// which comes from the certificate).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HelloInfo {
    pub agent_version: String,
    pub image_id: String,
    pub image_version: String,
    pub baseline_root: Vec<u8>,
    pub boot_id: String,
    pub epoch: u64,
}

/// Where the durable state of one host's report stream stands (the collector's `Welcome`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    pub epoch: u64,
    /// Highest committed seq of `epoch`; 0 when none.
    pub last_seq: u64,
    /// Set digest of the host's current violation set as stored.
    pub set_digest: [u8; 32],
}

/// One report to apply, already checked by the ingest (identity from the certificate, every
/// item's key matching its content, sizes within limits).
#[derive(Debug, Clone)]
pub struct ReportToApply {
    pub host_id: String,
    pub report: Report,
    pub received_ms: i64,
}

/// What applying one report did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// Committed. `digest_matches` is false when the stored set's digest after applying differs
    /// from the report's `set_digest`: the ingest then asks the agent for a resync.
    /// `from_empty`: the host had no open item right before this report (as stored, under the
    /// batch's lock of the host row), so its open set after it is made of this report alone.
    Applied {
        digest_matches: bool,
        from_empty: bool,
    },
    /// (host, epoch, seq) was committed before: nothing changed (at-least-once delivery).
    Duplicate,
}

/// A heartbeat, batched by the ingest and written periodically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeartbeatRecord {
    pub host_id: String,
    pub received_ms: i64,
    pub last_scan_ms: i64,
    pub last_scan_status: ScanStatus,
}

/// A host as the fleet overview shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSummary {
    pub host_id: String,
    pub labels: Vec<(String, String)>,
    pub enrolled_ms: i64,
    pub hello: HelloInfo,
    pub last_seen_ms: Option<i64>,
    pub last_scan_ms: Option<i64>,
    /// Status of the last scan, from the newest heartbeat or report.
    pub last_scan_status: ScanStatus,
    pub last_report_ms: Option<i64>,
    /// True while the host's last report said its state is incomplete (lost reports, a failed
    /// scan), until a complete report arrives.
    pub incomplete: bool,
    pub incomplete_reason: String,
    /// Reports the agent said it lost, summed over the host's life.
    pub lost_reports: u64,
    pub position: StreamPosition,
    /// Current (unresolved) violations by severity, index = `Severity` as i32 (0..=5).
    pub open_by_severity: [u64; 6],
    /// Current package drift items (also counted in `open_by_severity`).
    pub open_packages: u64,
    /// Whether every certificate of the host is revoked.
    pub revoked: bool,
}

/// One occurrence of a violation on a host: from the report that first carried its key until
/// the report that resolved it. A key that comes back after being resolved starts a new
/// occurrence.
#[derive(Debug, Clone, PartialEq)]
pub struct ViolationRecord {
    pub host_id: String,
    pub key: Vec<u8>,
    /// The latest content of the item (before/after values, severity, owners).
    pub item: DriftItem,
    pub first_seen_ms: i64,
    /// Received time of the last report that added or updated the item (or of the full
    /// report that confirmed it).
    pub last_seen_ms: i64,
    pub resolved_ms: Option<i64>,
}

/// A fleet-wide violation search. Every field narrows; `None` = any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViolationQuery {
    pub host_id: Option<String>,
    /// Glob over the raw path (globset syntax, `literal_separator`), file violations only.
    pub path_glob: Option<String>,
    /// `ViolationKind` as i32 for files; for package items "kind" is the `PackageDriftKind`
    /// mapped to added/removed/modified.
    pub kind: Option<i32>,
    /// Owning package name (file items) or the drifted package's name.
    pub package: Option<String>,
    pub image_id: Option<String>,
    /// Occurrences seen at or after / at or before this time.
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// false: only open occurrences.
    pub include_resolved: bool,
    /// At most this many records; 0 = [`DEFAULT_SEARCH_LIMIT`]. Newest `last_seen_ms` first.
    pub limit: u32,
}

/// The number of records a search returns when its `limit` is 0.
pub const DEFAULT_SEARCH_LIMIT: u32 = 1000;

/// A security-relevant event the collector refused or noticed (impersonation attempts, bad
/// tokens). Kept until the audit log (issue 5) takes over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecurityEvent {
    pub at_ms: i64,
    /// e.g. "impersonation", "token-refused", "revoked-certificate".
    pub kind: String,
    /// Host id from the peer certificate, when there was one.
    pub peer_host_id: Option<String>,
    pub detail: String,
}

/// A host's open counts as stored (`HostSummary::open_by_severity`, `open_packages`), of its
/// open items' (severity, is package): per severity, an unknown one counted as 0, and how many
/// are packages. The reconciler compares counts it derives with the stored ones, so both come
/// from here.
pub fn open_counts(items: impl IntoIterator<Item = (i32, bool)>) -> ([u64; 6], u64) {
    let mut by_severity = [0u64; 6];
    let mut packages = 0;
    for (severity, is_package) in items {
        let slot = usize::try_from(severity)
            .ok()
            .filter(|s| *s < by_severity.len())
            .unwrap_or(0);
        by_severity[slot] += 1;
        packages += u64::from(is_package);
    }
    (by_severity, packages)
}

/// The write lane of a host among `lanes` ([`Storage::write_lanes`]): a stable hash of its id
/// (FNV-1a), so every report of a host goes through one lane, in order.
pub fn lane_of(host_id: &str, lanes: usize) -> usize {
    if lanes <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host_id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    usize::try_from(h % lanes as u64).unwrap_or(0)
}

/// The collector's durable state. Every method is one transaction: it commits before it
/// returns `Ok`, and a failure changes nothing.
pub trait Storage:
    AuditStore
    + AccessStore
    + ExportStore
    + LifecycleStore
    + RegistryStore
    + ActionStore
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    /// Which backend, for logs and `/health` ("sqlite" | "postgres").
    fn backend(&self) -> &'static str;

    // --- enrollment -----------------------------------------------------------------------

    /// Stores a new token and appends `audit` (`token.created`) in the same transaction.
    fn create_enrollment_token(
        &self,
        token: EnrollmentToken,
        audit: AuditEntry,
    ) -> StoreFuture<'_, ()>;
    fn list_enrollment_tokens(&self) -> StoreFuture<'_, Vec<EnrollmentToken>>;
    /// Atomically checks the token (exists, unexpired at `now_ms`, uses left, `host_id`
    /// matching its host pattern — a glob over the host id) and takes one use. Two concurrent
    /// enrollments with a single-use token: exactly one succeeds.
    fn consume_enrollment_token(
        &self,
        secret_sha256: [u8; 32],
        host_id: &str,
        now_ms: i64,
    ) -> StoreFuture<'_, EnrollmentToken>;
    /// Creates the host (or updates its labels if it exists), records its certificate and
    /// appends `audit` (`host.enrolled`) in the same transaction.
    fn enroll_host(
        &self,
        labels: Vec<(String, String)>,
        certificate: IssuedCertificate,
        audit: AuditEntry,
    ) -> StoreFuture<'_, ()>;
    /// Records a renewed certificate of an existing host.
    fn record_certificate(&self, certificate: IssuedCertificate) -> StoreFuture<'_, ()>;
    /// Revokes every certificate of a host and appends `audit` (`host.revoked`) in the same
    /// transaction; returns how many were revoked.
    fn revoke_host(&self, host_id: &str, now_ms: i64, audit: AuditEntry) -> StoreFuture<'_, u64>;
    /// Serials of every revoked certificate that has not expired at `now_ms` (the ingest
    /// caches this set and refreshes it at least every 30 s).
    fn revoked_serials(&self, now_ms: i64) -> StoreFuture<'_, Vec<Vec<u8>>>;

    // --- ingest ---------------------------------------------------------------------------

    /// Stores the hello fields and returns the host's stream position. When `hello.epoch`
    /// differs from the stored epoch the position returned has `last_seq` 0 (a new sequence
    /// space) but the stored set is kept until a report replaces it.
    fn hello(
        &self,
        host_id: &str,
        hello: HelloInfo,
        now_ms: i64,
    ) -> StoreFuture<'_, StreamPosition>;
    /// Applies reports in order, all in one transaction (group commit), deduplicated by
    /// (host, epoch, seq): a report whose seq is not above the host's last committed seq of
    /// the same epoch is a `Duplicate`. A report of a new epoch starts that epoch. Maintains
    /// occurrences (first/last seen, resolved), the stored digest, the incomplete flag and
    /// lost-report count.
    ///
    /// Batches may run at once when their hosts are in different write lanes
    /// ([`Storage::write_lanes`], [`lane_of`]); a batch whose hosts are all in one lane runs on
    /// that lane's connection.
    fn apply_reports(&self, batch: Vec<ReportToApply>) -> StoreFuture<'_, Vec<ApplyOutcome>>;
    /// How many `apply_reports` batches the backend can commit at once, each for the hosts of
    /// its lane (1: one at a time).
    fn write_lanes(&self) -> usize {
        1
    }
    /// Writes a batch of heartbeats (last seen, last scan). Like `apply_reports`, a batch whose
    /// hosts are all in one write lane runs on that lane's connection.
    fn record_heartbeats(&self, batch: Vec<HeartbeatRecord>) -> StoreFuture<'_, ()>;
    /// Records a refusal and appends `audit` (`security.*`) in the same transaction.
    fn record_security_event(&self, event: SecurityEvent, audit: AuditEntry)
    -> StoreFuture<'_, ()>;

    // --- reads ----------------------------------------------------------------------------

    fn list_hosts(&self) -> StoreFuture<'_, Vec<HostSummary>>;
    fn host(&self, host_id: &str) -> StoreFuture<'_, Option<HostSummary>>;
    fn search_violations(&self, query: ViolationQuery) -> StoreFuture<'_, Vec<ViolationRecord>>;
    fn security_events(&self, since_ms: i64, limit: u32) -> StoreFuture<'_, Vec<SecurityEvent>>;
}

/// The checks of `consume_enrollment_token`, in the order a person would want them reported.
pub(crate) fn check_token(
    token: &EnrollmentToken,
    host_id: &str,
    now_ms: i64,
) -> Result<(), StorageError> {
    if token.expires_ms <= now_ms {
        return Err(TokenError::Expired.into());
    }
    if token.uses_left == 0 {
        return Err(TokenError::Exhausted.into());
    }
    if let Some(pattern) = &token.host_pattern
        && !glob::host_pattern_matches(pattern, host_id)?
    {
        return Err(TokenError::HostPatternMismatch {
            host_id: host_id.to_owned(),
            pattern: pattern.clone(),
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::lane_of;

    #[test]
    fn lanes_are_stable_and_spread_hosts() {
        // A pure function of the id (FNV-1a), pinned: stable across processes and releases.
        assert_eq!(lane_of("web-1", 1), 0);
        assert_eq!(lane_of("web-1", 2), 1);
        assert_eq!(
            [lane_of("web-1", 4), lane_of("web-2", 4), lane_of("db-7", 4)],
            [3, 2, 3]
        );
        assert_eq!(lane_of("", 2), (0xcbf2_9ce4_8422_2325u64 % 2) as usize);
        for (lanes, lo, hi) in [(2, 4_500, 5_500), (4, 2_000, 3_000)] {
            let mut counts = vec![0usize; lanes];
            for i in 0..10_000 {
                counts[lane_of(&format!("host-{i:05}.example.org"), lanes)] += 1;
            }
            assert!(counts.iter().all(|c| (lo..=hi).contains(c)), "{counts:?}");
        }
    }
}
