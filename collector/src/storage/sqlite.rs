//! The SQLite backend: one database file in WAL mode with `synchronous=FULL`, so a commit is on
//! disk before the call returns.
//!
//! SQLite calls block, so they never run on an async worker. Two dedicated threads each own one
//! connection: the **writer** runs every write transaction and the **reader** every read.
//! SQLite admits one writer at a time anyway, so one writer thread serializes writes without
//! busy-waiting on the file lock, keeps its prepared statements and the apply cache (below)
//! warm, and lets `apply_reports` batches from many streams queue up for group commit. WAL lets
//! the reader see the last committed snapshot without blocking or being blocked by the writer.
//! Callers get a future that resolves when their job's transaction has committed.
//!
//! A third thread, the **checkpointer**, copies the WAL back into the database file
//! (`wal_checkpoint(PASSIVE)`, a few times a second) on a connection of its own. SQLite's
//! automatic checkpoint would run it inside whichever commit crosses the WAL threshold, and
//! that commit, with every report batched into it, would wait for the copy and its fsync
//! (300–440 ms on the benchmark machine); a passive checkpoint on another connection never
//! blocks the writer. The writer keeps a much higher automatic threshold as a backstop, so
//! the WAL stays bounded if the checkpointer falls behind.
//!
//! The writer keeps each host's open violation set (key → item hash) from the last batch in
//! memory, tagged with the host row's `apply_version`; a batch reuses it only when the stored
//! version is unchanged, so another process writing the same file can never make it stale.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use driftwatch_proto::set::SetDigest;
use driftwatch_proto::v1::{DriftItem, ScanStatus};
use prost::Message;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};

mod export;

use super::apply::{self, HostState, OpenEntry, RowRef, to_i64, to_u64};
use super::glob::{self, PathGlob};
use super::{
    ApplyOutcome, AuditEntry, DEFAULT_SEARCH_LIMIT, EnrollmentToken, HeartbeatRecord, HelloInfo,
    HostSummary, IssuedCertificate, ReportToApply, SecurityEvent, Storage, StorageError,
    StoreFuture, StreamPosition, TokenError, ViolationQuery, ViolationRecord,
};

mod access;
mod actions;
pub(crate) mod audit;
mod lifecycle;

/// Migrations in order; migration `i` (0-based) brings the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/sqlite/0001_initial.sql"),
    include_str!("migrations/sqlite/0002_audit.sql"),
    include_str!("migrations/sqlite/0003_access.sql"),
    include_str!("migrations/sqlite/0004_exports.sql"),
    include_str!("migrations/sqlite/0005_lifecycle.sql"),
    include_str!("migrations/sqlite/0006_rebuild_actions.sql"),
    include_str!("migrations/sqlite/0007_hot_violation_updates.sql"),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// How long a statement waits for another process's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// The writer's own automatic checkpoint threshold (pages; 64 MiB of 4 KiB pages): only
/// reached when the checkpointer cannot keep up.
const WRITER_AUTOCHECKPOINT_PAGES: i64 = 16_384;
/// A WAL file larger than this is truncated to it when SQLite restarts the log.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 << 20;

/// The writer's open-set cache holds at most this many items over all hosts; past it, it is
/// emptied (it is only a shortcut, never the truth).
const OPEN_SET_CACHE_ITEMS: usize = 2_000_000;

/// A collector store in one SQLite file.
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    writer: Worker,
    reader: Worker,
    checkpointer: Checkpointer,
}

type Job = Box<dyn FnOnce(&mut WorkerState) + Send>;

/// What a worker thread owns.
struct WorkerState {
    conn: Connection,
    /// Host pk → (apply_version, open set). Writer only.
    open_sets: HashMap<i64, (i64, BTreeMap<Vec<u8>, OpenEntry>)>,
    cached_items: usize,
}

/// A thread of the store, fed over a channel whose only sender this is. Dropping it closes the
/// channel and joins the thread: the thread ends after the messages already queued, and
/// "store dropped" means "connection closed" (a reopen sees a quiet file).
struct OwnedThread<T> {
    tx: Option<mpsc::Sender<T>>,
    thread: Option<JoinHandle<()>>,
}

impl<T> std::fmt::Debug for OwnedThread<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnedThread")
            .field("running", &self.thread.is_some())
            .finish_non_exhaustive()
    }
}

impl<T: Send + 'static> OwnedThread<T> {
    /// Starts `body` on a thread named `name`; it gets the receiving end.
    fn spawn(
        name: &str,
        body: impl FnOnce(mpsc::Receiver<T>) + Send + 'static,
    ) -> Result<Self, StorageError> {
        let (tx, rx) = mpsc::channel::<T>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || body(rx))
            .map_err(|e| StorageError::Backend(format!("starting the {name} thread: {e}")))?;
        Ok(OwnedThread {
            tx: Some(tx),
            thread: Some(thread),
        })
    }
}

impl<T> Drop for OwnedThread<T> {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection on its own thread, fed jobs over a channel.
#[derive(Debug)]
struct Worker {
    jobs: OwnedThread<Job>,
}

impl Worker {
    fn start(name: &str, conn: Connection) -> Result<Self, StorageError> {
        let jobs = OwnedThread::spawn(name, move |rx: mpsc::Receiver<Job>| {
            let mut state = WorkerState {
                conn,
                open_sets: HashMap::new(),
                cached_items: 0,
            };
            // Ends when the store (the only sender) is dropped.
            while let Ok(job) = rx.recv() {
                job(&mut state);
            }
        })?;
        Ok(Worker { jobs })
    }

    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut WorkerState) -> Result<T, StorageError> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |state| {
            // The caller may have gone away (its future dropped): nothing to tell then.
            let _ = tx.send(f(state));
        });
        let sent = self.jobs.tx.as_ref().map(|j| j.send(job).is_ok()) == Some(true);
        Box::pin(async move {
            if !sent {
                return Err(StorageError::Backend(
                    "the SQLite thread has stopped".into(),
                ));
            }
            rx.await
                .map_err(|_| StorageError::Backend("the SQLite thread has stopped".into()))?
        })
    }
}

/// What the checkpointer has done (read by tests).
#[derive(Debug, Default)]
pub struct CheckpointStats {
    /// Passive checkpoints run.
    pub runs: AtomicU64,
    /// Runs that left the whole WAL copied into the database file.
    pub caught_up: AtomicU64,
    /// Checkpoints that failed (logged).
    pub failures: AtomicU64,
}

/// The checkpointer thread (module doc). Stops, and is joined, when dropped.
#[derive(Debug)]
struct Checkpointer {
    _thread: OwnedThread<()>,
    stats: Arc<CheckpointStats>,
}

impl Checkpointer {
    fn start(conn: Connection) -> Result<Self, StorageError> {
        let stats = Arc::new(CheckpointStats::default());
        let st = Arc::clone(&stats);
        let thread = OwnedThread::spawn("sqlite-checkpoint", move |stopped: mpsc::Receiver<()>| {
            let mut last_error = String::new();
            // Ends when the store drops the sender.
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(CHECKPOINT_EVERY)
            {
                // (busy, frames in the WAL, of them copied back); -1, -1 when not in WAL.
                let r = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                });
                st.runs.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok((log, done)) => {
                        if log == done {
                            st.caught_up.fetch_add(1, Ordering::Relaxed);
                        }
                        last_error.clear();
                    }
                    Err(e) => {
                        st.failures.fetch_add(1, Ordering::Relaxed);
                        // Once per distinct error, not five times a second.
                        let e = e.to_string();
                        if e != last_error {
                            tracing::warn!(error = %e, "sqlite: WAL checkpoint failed; the writer's own checkpoint is the backstop");
                            last_error = e;
                        }
                    }
                }
            }
        })?;
        Ok(Checkpointer {
            _thread: thread,
            stats,
        })
    }
}

trait Db<T> {
    fn db(self) -> Result<T, StorageError>;
}

impl<T> Db<T> for Result<T, rusqlite::Error> {
    fn db(self) -> Result<T, StorageError> {
        self.map_err(|e| StorageError::Backend(format!("sqlite: {e}")))
    }
}

fn connect(path: &Path) -> Result<Connection, StorageError> {
    let conn = Connection::open(path).db()?;
    conn.busy_timeout(BUSY_TIMEOUT).db()?;
    // Switching a new file to WAL upgrades a shared lock, and SQLite answers BUSY without
    // calling the busy handler when another connection is doing the same (two replicas
    // starting together): wait for it here, as long as any other lock.
    let started = std::time::Instant::now();
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && started.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            r => break r.db()?,
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StorageError::Backend(format!(
            "sqlite: {} refuses WAL mode (journal_mode is {mode})",
            path.display()
        )));
    }
    // FULL: the WAL is synced at every commit, so a committed report survives power loss.
    conn.pragma_update(None, "synchronous", "FULL").db()?;
    conn.pragma_update(None, "foreign_keys", "ON").db()?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// Brings the schema to [`SCHEMA_VERSION`] in one immediate transaction (another process
/// migrating at the same time waits for the lock, then sees the new version).
fn migrate(conn: &mut Connection) -> Result<(), StorageError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .db()?;
    tx.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        .db()?;
    let found: Option<i64> = tx
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .optional()
        .db()?;
    let found = match found {
        Some(v) => v,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", [])
                .db()?;
            0
        }
    };
    if found > SCHEMA_VERSION {
        return Err(StorageError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        tx.execute_batch(sql).db()?;
        tracing::info!(version = i + 1, "sqlite schema migrated");
    }
    tx.execute("UPDATE schema_version SET version = ?1", [SCHEMA_VERSION])
        .db()?;
    tx.commit().db()
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates its schema. Blocking: call it
    /// at startup or from `spawn_blocking`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StorageError> {
        let path = path.as_ref().to_path_buf();
        let mut writer = connect(&path).map_err(|e| e.context("opening the writer connection"))?;
        migrate(&mut writer).map_err(|e| e.context("migrating the schema"))?;
        writer
            .pragma_update(None, "wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES)
            .db()
            .map_err(|e| e.context("setting wal_autocheckpoint"))?;
        writer
            .pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)
            .db()
            .map_err(|e| e.context("setting journal_size_limit"))?;
        let reader = connect(&path).map_err(|e| e.context("opening the reader connection"))?;
        let checkpointer =
            connect(&path).map_err(|e| e.context("opening the checkpoint connection"))?;
        Ok(SqliteStore {
            writer: Worker::start("sqlite-writer", writer)?,
            reader: Worker::start("sqlite-reader", reader)?,
            checkpointer: Checkpointer::start(checkpointer)?,
            path,
        })
    }

    /// What the WAL checkpointer has done so far.
    pub fn checkpoint_stats(&self) -> &CheckpointStats {
        &self.checkpointer.stats
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StorageError> + Send + 'static,
    ) -> StoreFuture<'_, T> {
        self.writer.run(move |state| {
            let tx = state
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .db()?;
            let out = f(&tx)?;
            tx.commit().db()?;
            Ok(out)
        })
    }

    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StorageError> + Send + 'static,
    ) -> StoreFuture<'_, T> {
        self.reader.run(move |state| {
            // A read transaction: every SELECT of the call sees one snapshot.
            let tx = state.conn.transaction().db()?;
            let out = f(&tx)?;
            tx.commit().db()?;
            Ok(out)
        })
    }
}

fn empty_digest() -> [u8; 32] {
    SetDigest::new().finish()
}

fn host_pk(tx: &Transaction<'_>, host_id: &str) -> Result<i64, StorageError> {
    tx.prepare_cached("SELECT pk FROM hosts WHERE host_id = ?1")
        .db()?
        .query_row([host_id], |r| r.get(0))
        .optional()
        .db()?
        .ok_or_else(|| StorageError::UnknownHost(host_id.to_owned()))
}

fn blob32(table: &'static str, v: Vec<u8>) -> Result<[u8; 32], StorageError> {
    <[u8; 32]>::try_from(v).map_err(|v| StorageError::Corrupt {
        table,
        detail: format!("expected 32 bytes, found {}", v.len()),
    })
}

fn count(table: &'static str, v: i64) -> Result<u32, StorageError> {
    u32::try_from(v).map_err(|_| StorageError::Corrupt {
        table,
        detail: format!("count {v} out of range"),
    })
}

fn token_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(EnrollmentToken, Vec<u8>, i64)> {
    Ok((
        EnrollmentToken {
            id: r.get(0)?,
            secret_sha256: [0; 32],
            created_ms: r.get(2)?,
            expires_ms: r.get(3)?,
            uses_left: 0,
            host_pattern: r.get(5)?,
        },
        r.get(1)?,
        r.get(4)?,
    ))
}

fn finish_token(
    (mut t, secret, uses): (EnrollmentToken, Vec<u8>, i64),
) -> Result<EnrollmentToken, StorageError> {
    t.secret_sha256 = blob32("enrollment_tokens", secret)?;
    t.uses_left = count("enrollment_tokens", uses)?;
    Ok(t)
}

const TOKEN_COLUMNS: &str = "id, secret_sha256, created_ms, expires_ms, uses_left, host_pattern";

const HOST_COLUMNS: &str = "h.pk, h.host_id, h.enrolled_ms, h.agent_version, h.image_id, \
     h.image_version, h.baseline_root, h.boot_id, h.hello_epoch, h.last_seen_ms, h.last_scan_ms, \
     h.last_scan_status, h.last_report_ms, h.incomplete, h.incomplete_reason, h.lost_reports, \
     h.epoch, h.last_seq, h.set_digest, h.open_sev0, h.open_sev1, h.open_sev2, h.open_sev3, \
     h.open_sev4, h.open_sev5, h.open_packages, \
     (EXISTS (SELECT 1 FROM certificates c WHERE c.host_pk = h.pk) AND NOT EXISTS \
      (SELECT 1 FROM certificates c WHERE c.host_pk = h.pk AND c.revoked_ms IS NULL))";

/// A host row (columns [`HOST_COLUMNS`]) without its labels, and its pk.
fn host_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, HostSummary, Vec<u8>)> {
    let mut open_by_severity = [0u64; 6];
    for (i, slot) in open_by_severity.iter_mut().enumerate() {
        *slot = to_u64(r.get(19 + i)?);
    }
    let summary = HostSummary {
        host_id: r.get(1)?,
        labels: Vec::new(),
        enrolled_ms: r.get(2)?,
        hello: HelloInfo {
            agent_version: r.get(3)?,
            image_id: r.get(4)?,
            image_version: r.get(5)?,
            baseline_root: r.get(6)?,
            boot_id: r.get(7)?,
            epoch: to_u64(r.get(8)?),
        },
        last_seen_ms: r.get(9)?,
        last_scan_ms: r.get(10)?,
        last_scan_status: ScanStatus::try_from(r.get::<_, i32>(11)?)
            .unwrap_or(ScanStatus::Unspecified),
        last_report_ms: r.get(12)?,
        incomplete: r.get(13)?,
        incomplete_reason: r.get(14)?,
        lost_reports: to_u64(r.get(15)?),
        position: StreamPosition {
            epoch: to_u64(r.get(16)?),
            last_seq: to_u64(r.get(17)?),
            set_digest: [0; 32],
        },
        open_by_severity,
        open_packages: to_u64(r.get(25)?),
        revoked: r.get(26)?,
    };
    Ok((r.get(0)?, summary, r.get(18)?))
}

fn load_hosts(
    tx: &Transaction<'_>,
    host_id: Option<&str>,
) -> Result<Vec<HostSummary>, StorageError> {
    let (sql, labels_sql) = match host_id {
        Some(_) => (
            format!("SELECT {HOST_COLUMNS} FROM hosts h WHERE h.host_id = ?1"),
            "SELECT l.host_pk, l.key, l.value FROM host_labels l JOIN hosts h ON h.pk = l.host_pk \
             WHERE h.host_id = ?1 ORDER BY l.host_pk, l.key",
        ),
        None => (
            format!("SELECT {HOST_COLUMNS} FROM hosts h ORDER BY h.host_id"),
            "SELECT host_pk, key, value FROM host_labels ORDER BY host_pk, key",
        ),
    };
    let params: Vec<&dyn rusqlite::ToSql> = match &host_id {
        Some(h) => vec![h],
        None => vec![],
    };
    let mut stmt = tx.prepare_cached(&sql).db()?;
    let rows = stmt
        .query_map(params.as_slice(), host_from_row)
        .db()?
        .collect::<Result<Vec<_>, _>>()
        .db()?;
    let mut labels: HashMap<i64, Vec<(String, String)>> = HashMap::new();
    let mut stmt = tx.prepare_cached(labels_sql).db()?;
    let mut q = stmt.query(params.as_slice()).db()?;
    while let Some(r) = q.next().db()? {
        labels
            .entry(r.get(0).db()?)
            .or_default()
            .push((r.get(1).db()?, r.get(2).db()?));
    }
    rows.into_iter()
        .map(|(pk, mut h, digest)| {
            h.position.set_digest = blob32("hosts", digest)?;
            h.labels = labels.remove(&pk).unwrap_or_default();
            Ok(h)
        })
        .collect()
}

/// Loads the batch's hosts with their open sets (from the cache when still valid); also returns
/// how many open sets were read from the database.
fn load_apply_state(
    state: &mut WorkerState,
    batch: &[ReportToApply],
) -> Result<(HashMap<String, HostState>, usize), StorageError> {
    let mut hosts: HashMap<String, HostState> = HashMap::new();
    let mut reloaded = 0;
    for r in batch {
        if hosts.contains_key(&r.host_id) {
            continue;
        }
        let row = state
            .conn
            .prepare_cached(
                "SELECT pk, apply_version, epoch, last_seq, incomplete, incomplete_reason, \
                 lost_reports, last_scan_ms, last_scan_status FROM hosts WHERE host_id = ?1",
            )
            .db()?
            .query_row([&r.host_id], |r| {
                Ok(HostState {
                    pk: r.get(0)?,
                    apply_version: r.get(1)?,
                    epoch: to_u64(r.get(2)?),
                    last_seq: to_u64(r.get(3)?),
                    incomplete: r.get(4)?,
                    incomplete_reason: r.get(5)?,
                    lost_reports: to_u64(r.get(6)?),
                    last_scan_ms: r.get(7)?,
                    last_scan_status: r.get(8)?,
                    open: BTreeMap::new(),
                })
            })
            .optional()
            .db()?;
        let Some(mut host) = row else {
            return Err(StorageError::UnknownHost(r.host_id.clone()));
        };
        match state.open_sets.remove(&host.pk) {
            Some((version, open)) if version == host.apply_version => {
                state.cached_items -= open.len();
                host.open = open;
            }
            stale => {
                if let Some((_, open)) = stale {
                    state.cached_items -= open.len();
                }
                reloaded += 1;
                let mut stmt = state
                    .conn
                    .prepare_cached(
                        "SELECT id, key, item_hash, severity, is_package FROM violations \
                         WHERE host_pk = ?1 AND resolved_ms IS NULL",
                    )
                    .db()?;
                let mut q = stmt.query([host.pk]).db()?;
                while let Some(r) = q.next().db()? {
                    let hash = blob32("violations", r.get(2).db()?)?;
                    host.open.insert(
                        r.get(1).db()?,
                        OpenEntry {
                            row: RowRef::Stored(r.get(0).db()?),
                            hash,
                            severity: r.get(3).db()?,
                            is_package: r.get(4).db()?,
                        },
                    );
                }
            }
        }
        hosts.insert(r.host_id.clone(), host);
    }
    Ok((hosts, reloaded))
}

fn apply_batch(
    state: &mut WorkerState,
    batch: Vec<ReportToApply>,
) -> Result<Vec<ApplyOutcome>, StorageError> {
    // Cache entries of the batch's hosts are taken out while the transaction runs: if it
    // fails they are simply gone, and the next batch reloads from the database.
    let mut timer = apply::ApplyTimer::start();
    let reports = batch.len();
    let tx_begin = state.conn.execute_batch("BEGIN IMMEDIATE").db();
    tx_begin?;
    let result = (|| {
        let (mut hosts, reloaded) = load_apply_state(state, &batch)?;
        timer.loaded();
        let plan = apply::plan(&mut hosts, batch)?;
        timer.planned();
        let conn = &state.conn;
        {
            let mut content = conn
                .prepare_cached(
                    "UPDATE violations SET item = ?2, item_hash = ?3, path = ?4, kind = ?5, \
                     severity = ?6, is_package = ?7, packages = ?8, \
                     last_seen_ms = coalesce(?9, last_seen_ms), resolved_ms = ?10 WHERE id = ?1",
                )
                .db()?;
            let mut touch = conn
                .prepare_cached(
                    "UPDATE violations SET last_seen_ms = coalesce(?2, last_seen_ms), \
                     resolved_ms = coalesce(?3, resolved_ms) WHERE id = ?1",
                )
                .db()?;
            // The common cases name only the columns they change: SQLite rewrites an index
            // entry when the UPDATE names one of its columns, even with the same value, and
            // these are most of the index work of a batch (an updated item keeps its path and
            // stays open; a resolved one keeps its last-seen time).
            let mut content_seen = conn
                .prepare_cached(
                    "UPDATE violations SET item = ?2, item_hash = ?3, kind = ?4, severity = ?5, \
                     packages = ?6, last_seen_ms = ?7 WHERE id = ?1",
                )
                .db()?;
            let mut seen = conn
                .prepare_cached("UPDATE violations SET last_seen_ms = ?2 WHERE id = ?1")
                .db()?;
            let mut resolve = conn
                .prepare_cached("UPDATE violations SET resolved_ms = ?2 WHERE id = ?1")
                .db()?;
            for (id, u) in &plan.updates {
                match (&u.columns, u.last_seen_ms, u.resolved_ms) {
                    (Some(c), Some(at), None) if c.identity_from_key => content_seen
                        .execute(params![
                            id, c.encoded, c.hash, c.kind, c.severity, c.packages, at
                        ])
                        .db()?,
                    (None, Some(at), None) => seen.execute(params![id, at]).db()?,
                    (None, None, Some(at)) => resolve.execute(params![id, at]).db()?,
                    (Some(c), _, _) => content
                        .execute(params![
                            id,
                            c.encoded,
                            c.hash,
                            c.path,
                            c.kind,
                            c.severity,
                            c.is_package,
                            c.packages,
                            u.last_seen_ms,
                            u.resolved_ms
                        ])
                        .db()?,
                    (None, _, _) => touch
                        .execute(params![id, u.last_seen_ms, u.resolved_ms])
                        .db()?,
                };
            }
        }
        let mut new_ids = Vec::with_capacity(plan.inserts.len());
        {
            let mut insert = conn
                .prepare_cached(
                    "INSERT INTO violations (host_pk, key, item, item_hash, path, kind, severity, \
                     is_package, packages, first_seen_ms, last_seen_ms, resolved_ms) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )
                .db()?;
            for n in &plan.inserts {
                let c = &n.columns;
                insert
                    .execute(params![
                        n.host_pk,
                        n.key,
                        c.encoded,
                        c.hash,
                        c.path,
                        c.kind,
                        c.severity,
                        c.is_package,
                        c.packages,
                        n.first_seen_ms,
                        n.last_seen_ms,
                        n.resolved_ms
                    ])
                    .db()?;
                new_ids.push(conn.last_insert_rowid());
            }
        }
        {
            let mut update = conn
                .prepare_cached(
                    "UPDATE hosts SET apply_version = ?2, epoch = ?3, last_seq = ?4, \
                     set_digest = ?5, incomplete = ?6, incomplete_reason = ?7, \
                     lost_reports = ?8, last_report_ms = ?9, last_scan_ms = ?10, \
                     last_scan_status = ?11, open_sev0 = ?12, open_sev1 = ?13, open_sev2 = ?14, \
                     open_sev3 = ?15, open_sev4 = ?16, open_sev5 = ?17, open_packages = ?18 \
                     WHERE pk = ?1",
                )
                .db()?;
            for h in &plan.hosts {
                let s = &h.open_by_severity;
                update
                    .execute(params![
                        h.pk,
                        h.apply_version,
                        to_i64(h.epoch),
                        to_i64(h.last_seq),
                        h.set_digest,
                        h.incomplete,
                        h.incomplete_reason,
                        to_i64(h.lost_reports),
                        h.last_report_ms,
                        h.last_scan_ms,
                        h.last_scan_status,
                        s[0],
                        s[1],
                        s[2],
                        s[3],
                        s[4],
                        s[5],
                        h.open_packages
                    ])
                    .db()?;
            }
        }
        timer.written();
        Ok((hosts, plan, new_ids, reloaded))
    })();
    match result {
        Ok((hosts, plan, new_ids, reloaded)) => {
            state.conn.execute_batch("COMMIT").db()?;
            timer.committed("sqlite", &plan, reports, reloaded);
            let outcomes = plan.outcomes;
            for (_, mut host) in hosts {
                apply::settle_new_rows(&mut host.open, &new_ids);
                state.cached_items += host.open.len();
                state
                    .open_sets
                    .insert(host.pk, (host.apply_version, host.open));
            }
            if state.cached_items > OPEN_SET_CACHE_ITEMS {
                state.open_sets.clear();
                state.cached_items = 0;
            }
            Ok(outcomes)
        }
        Err(e) => {
            let _ = state.conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

fn search(tx: &Transaction<'_>, q: ViolationQuery) -> Result<Vec<ViolationRecord>, StorageError> {
    let glob = q.path_glob.as_deref().map(PathGlob::new).transpose()?;
    let limit = if q.limit == 0 {
        DEFAULT_SEARCH_LIMIT
    } else {
        q.limit
    } as usize;
    let mut sql = String::from(
        "SELECT h.host_id, v.key, v.item, v.first_seen_ms, v.last_seen_ms, v.resolved_ms, v.path \
         FROM violations v JOIN hosts h ON h.pk = v.host_pk WHERE 1 = 1",
    );
    let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    let mut arg = |sql: &mut String, clause: &str, v: Box<dyn rusqlite::ToSql>| {
        args.push(v);
        sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
    };
    if let Some(h) = q.host_id {
        arg(&mut sql, " AND h.host_id = ?", Box::new(h));
    }
    if let Some(g) = &glob {
        sql.push_str(" AND v.path IS NOT NULL");
        arg(&mut sql, " AND v.path >= ?", Box::new(g.prefix.clone()));
        if let Some(end) = g.prefix_end() {
            arg(&mut sql, " AND v.path < ?", Box::new(end));
        }
    }
    if let Some(k) = q.kind {
        arg(&mut sql, " AND v.kind = ?", Box::new(k));
    }
    if let Some(p) = q.package {
        let sep = apply::PACKAGE_SEPARATOR;
        arg(
            &mut sql,
            " AND (instr(v.packages, ?) > 0",
            Box::new(format!("{sep}{p}:")),
        );
        arg(
            &mut sql,
            " OR instr(v.packages, ?) > 0)",
            Box::new(format!("{sep}{p}{sep}")),
        );
    }
    if let Some(i) = q.image_id {
        arg(&mut sql, " AND h.image_id = ?", Box::new(i));
    }
    if let Some(s) = q.since_ms {
        arg(&mut sql, " AND v.last_seen_ms >= ?", Box::new(s));
    }
    if let Some(u) = q.until_ms {
        arg(&mut sql, " AND v.first_seen_ms <= ?", Box::new(u));
    }
    if !q.include_resolved {
        sql.push_str(" AND v.resolved_ms IS NULL");
    }
    sql.push_str(" ORDER BY v.last_seen_ms DESC, v.id DESC");
    if glob.is_none() {
        // Without a glob every row the SQL returns is a result; with one, rows are filtered
        // here and the scan stops at `limit` matches.
        arg(&mut sql, " LIMIT ?", Box::new(limit as i64));
    }
    let mut stmt = tx.prepare(&sql).db()?;
    let params: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| a.as_ref()).collect();
    let mut rows = stmt.query(params.as_slice()).db()?;
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(r) = rows.next().db()? else { break };
        if let Some(g) = &glob {
            let path: Vec<u8> = r.get(6).db()?;
            if !g.is_match(&path) {
                continue;
            }
        }
        let encoded: Vec<u8> = r.get(2).db()?;
        let item = DriftItem::decode(encoded.as_slice()).map_err(|e| StorageError::Corrupt {
            table: "violations",
            detail: format!("item: {e}"),
        })?;
        out.push(ViolationRecord {
            host_id: r.get(0).db()?,
            key: r.get(1).db()?,
            item,
            first_seen_ms: r.get(3).db()?,
            last_seen_ms: r.get(4).db()?,
            resolved_ms: r.get(5).db()?,
        });
    }
    Ok(out)
}

impl Storage for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn create_enrollment_token(
        &self,
        token: EnrollmentToken,
        audit: AuditEntry,
    ) -> StoreFuture<'_, ()> {
        self.write(move |tx| {
            if let Some(p) = &token.host_pattern {
                glob::check_host_pattern(p)?;
            }
            tx.prepare_cached(&format!(
                "INSERT INTO enrollment_tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))
            .db()?
            .execute(params![
                token.id,
                token.secret_sha256,
                token.created_ms,
                token.expires_ms,
                token.uses_left,
                token.host_pattern
            ])
            .db()?;
            audit::append_tx(tx, &audit)?;
            Ok(())
        })
    }

    fn list_enrollment_tokens(&self) -> StoreFuture<'_, Vec<EnrollmentToken>> {
        self.read(|tx| {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM enrollment_tokens ORDER BY created_ms, id"
                ))
                .db()?;
            let rows = stmt
                .query_map([], token_from_row)
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            rows.into_iter().map(finish_token).collect()
        })
    }

    fn consume_enrollment_token(
        &self,
        secret_sha256: [u8; 32],
        host_id: &str,
        now_ms: i64,
    ) -> StoreFuture<'_, EnrollmentToken> {
        let host_id = host_id.to_owned();
        self.write(move |tx| {
            let row = tx
                .prepare_cached(&format!(
                    "SELECT {TOKEN_COLUMNS} FROM enrollment_tokens WHERE secret_sha256 = ?1"
                ))
                .db()?
                .query_row([secret_sha256.as_slice()], token_from_row)
                .optional()
                .db()?;
            let mut token = finish_token(row.ok_or(TokenError::Unknown)?)?;
            super::check_token(&token, &host_id, now_ms)?;
            tx.prepare_cached(
                "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE id = ?1",
            )
            .db()?
            .execute([&token.id])
            .db()?;
            token.uses_left -= 1;
            Ok(token)
        })
    }

    fn enroll_host(
        &self,
        labels: Vec<(String, String)>,
        certificate: IssuedCertificate,
        audit: AuditEntry,
    ) -> StoreFuture<'_, ()> {
        self.write(move |tx| {
            tx.prepare_cached(
                "INSERT INTO hosts (host_id, enrolled_ms, set_digest) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (host_id) DO NOTHING",
            )
            .db()?
            .execute(params![
                certificate.host_id,
                certificate.issued_ms,
                empty_digest()
            ])
            .db()?;
            let pk = host_pk(tx, &certificate.host_id)?;
            tx.prepare_cached("DELETE FROM host_labels WHERE host_pk = ?1")
                .db()?
                .execute([pk])
                .db()?;
            let mut insert = tx
                .prepare_cached("INSERT INTO host_labels (host_pk, key, value) VALUES (?1, ?2, ?3)")
                .db()?;
            for (k, v) in &labels {
                insert.execute(params![pk, k, v]).db()?;
            }
            insert_certificate(tx, pk, &certificate)?;
            audit::append_tx(tx, &audit)?;
            Ok(())
        })
    }

    fn record_certificate(&self, certificate: IssuedCertificate) -> StoreFuture<'_, ()> {
        self.write(move |tx| {
            let pk = host_pk(tx, &certificate.host_id)?;
            insert_certificate(tx, pk, &certificate)
        })
    }

    fn revoke_host(&self, host_id: &str, now_ms: i64, audit: AuditEntry) -> StoreFuture<'_, u64> {
        let host_id = host_id.to_owned();
        self.write(move |tx| {
            let pk = host_pk(tx, &host_id)?;
            let n = tx
                .prepare_cached(
                    "UPDATE certificates SET revoked_ms = ?2 WHERE host_pk = ?1 AND revoked_ms IS NULL",
                )
                .db()?
                .execute(params![pk, now_ms])
                .db()?;
            audit::append_tx(tx, &audit)?;
            Ok(n as u64)
        })
    }

    fn revoked_serials(&self, now_ms: i64) -> StoreFuture<'_, Vec<Vec<u8>>> {
        self.read(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT serial FROM certificates WHERE revoked_ms IS NOT NULL \
                     AND not_after_ms > ?1 ORDER BY serial",
                )
                .db()?;
            stmt.query_map([now_ms], |r| r.get(0))
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()
        })
    }

    fn hello(
        &self,
        host_id: &str,
        hello: HelloInfo,
        now_ms: i64,
    ) -> StoreFuture<'_, StreamPosition> {
        let host_id = host_id.to_owned();
        self.write(move |tx| {
            let row = tx
                .prepare_cached(
                    "UPDATE hosts SET agent_version = ?2, image_id = ?3, image_version = ?4, \
                     baseline_root = ?5, boot_id = ?6, hello_epoch = ?7, \
                     last_seen_ms = max(coalesce(last_seen_ms, ?8), ?8) \
                     WHERE host_id = ?1 RETURNING epoch, last_seq, set_digest",
                )
                .db()?
                .query_row(
                    params![
                        host_id,
                        hello.agent_version,
                        hello.image_id,
                        hello.image_version,
                        hello.baseline_root,
                        hello.boot_id,
                        to_i64(hello.epoch),
                        now_ms
                    ],
                    |r| {
                        Ok((
                            to_u64(r.get(0)?),
                            to_u64(r.get(1)?),
                            r.get::<_, Vec<u8>>(2)?,
                        ))
                    },
                )
                .optional()
                .db()?;
            let (epoch, last_seq, digest) =
                row.ok_or_else(|| StorageError::UnknownHost(host_id.clone()))?;
            Ok(StreamPosition {
                epoch: hello.epoch,
                last_seq: if epoch == hello.epoch { last_seq } else { 0 },
                set_digest: blob32("hosts", digest)?,
            })
        })
    }

    fn apply_reports(&self, batch: Vec<ReportToApply>) -> StoreFuture<'_, Vec<ApplyOutcome>> {
        if batch.is_empty() {
            return Box::pin(async { Ok(Vec::new()) });
        }
        self.writer.run(move |state| apply_batch(state, batch))
    }

    fn record_heartbeats(&self, batch: Vec<HeartbeatRecord>) -> StoreFuture<'_, ()> {
        self.write(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE hosts SET last_seen_ms = max(coalesce(last_seen_ms, ?2), ?2), \
                     last_scan_ms = CASE WHEN ?3 > 0 THEN max(coalesce(last_scan_ms, ?3), ?3) \
                                    ELSE last_scan_ms END, \
                     last_scan_status = CASE WHEN ?4 <> 0 THEN ?4 ELSE last_scan_status END \
                     WHERE host_id = ?1",
                )
                .db()?;
            // Unknown hosts are skipped: a heartbeat is no reason to fail the others.
            for h in &batch {
                stmt.execute(params![
                    h.host_id,
                    h.received_ms,
                    h.last_scan_ms,
                    h.last_scan_status as i32
                ])
                .db()?;
            }
            Ok(())
        })
    }

    fn record_security_event(
        &self,
        event: SecurityEvent,
        audit: AuditEntry,
    ) -> StoreFuture<'_, ()> {
        self.write(move |tx| {
            tx.prepare_cached(
                "INSERT INTO security_events (at_ms, kind, peer_host_id, detail) \
                 VALUES (?1, ?2, ?3, ?4)",
            )
            .db()?
            .execute(params![
                event.at_ms,
                event.kind,
                event.peer_host_id,
                event.detail
            ])
            .db()?;
            audit::append_tx(tx, &audit)?;
            Ok(())
        })
    }

    fn list_hosts(&self) -> StoreFuture<'_, Vec<HostSummary>> {
        self.read(|tx| load_hosts(tx, None))
    }

    fn host(&self, host_id: &str) -> StoreFuture<'_, Option<HostSummary>> {
        let host_id = host_id.to_owned();
        self.read(move |tx| Ok(load_hosts(tx, Some(&host_id))?.pop()))
    }

    fn search_violations(&self, query: ViolationQuery) -> StoreFuture<'_, Vec<ViolationRecord>> {
        self.read(move |tx| search(tx, query))
    }

    fn security_events(&self, since_ms: i64, limit: u32) -> StoreFuture<'_, Vec<SecurityEvent>> {
        self.read(move |tx| {
            let limit = if limit == 0 {
                DEFAULT_SEARCH_LIMIT
            } else {
                limit
            };
            let mut stmt = tx
                .prepare_cached(
                    "SELECT at_ms, kind, peer_host_id, detail FROM security_events \
                     WHERE at_ms >= ?1 ORDER BY at_ms, id LIMIT ?2",
                )
                .db()?;
            stmt.query_map(params![since_ms, limit], |r| {
                Ok(SecurityEvent {
                    at_ms: r.get(0)?,
                    kind: r.get(1)?,
                    peer_host_id: r.get(2)?,
                    detail: r.get(3)?,
                })
            })
            .db()?
            .collect::<Result<Vec<_>, _>>()
            .db()
        })
    }
}

fn insert_certificate(
    tx: &Transaction<'_>,
    pk: i64,
    c: &IssuedCertificate,
) -> Result<(), StorageError> {
    tx.prepare_cached(
        "INSERT INTO certificates (serial, host_pk, not_before_ms, not_after_ms, issued_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .db()?
    .execute(params![
        c.serial,
        pk,
        c.not_before_ms,
        c.not_after_ms,
        c.issued_ms
    ])
    .db()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// The WAL is copied back by the checkpointer thread, not by a commit of the writer (whose
    /// own threshold, 16,384 pages, these writes never reach), and so it is reused from its
    /// beginning instead of growing.
    #[test]
    fn the_checkpointer_keeps_the_wal_bounded_without_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("collector.db");
        let store = SqliteStore::open(&db).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(store.write(|tx| tx.execute_batch("CREATE TABLE scratch (b BLOB)").db()))
            .unwrap();
        // About 2,000 WAL frames (4 KiB pages) per round.
        let fill = || {
            rt.block_on(store.write(|tx| {
                for _ in 0..2_000 {
                    tx.execute("INSERT INTO scratch (b) VALUES (zeroblob(3000))", [])
                        .db()?;
                }
                Ok(())
            }))
            .unwrap()
        };
        // Two runs that left the WAL copied, both after the commit: the second began after it.
        let wait_caught_up = || {
            let stats = store.checkpoint_stats();
            let from = stats.caught_up.load(Ordering::Relaxed);
            let started = Instant::now();
            while stats.caught_up.load(Ordering::Relaxed) < from + 2 {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "the checkpointer has not copied the WAL back in 20 s ({} runs)",
                    stats.runs.load(Ordering::Relaxed)
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        let wal = || {
            std::fs::metadata(dir.path().join("collector.db-wal"))
                .unwrap()
                .len()
        };

        fill();
        wait_caught_up();
        let after_one = wal();
        assert!(after_one > 6 << 20, "one round wrote {after_one} WAL bytes");
        for _ in 2..=4 {
            fill();
            wait_caught_up();
        }
        let after_four = wal();
        assert!(
            after_four < after_one * 3 / 2,
            "the WAL grew from {after_one} to {after_four} bytes over four rounds"
        );
        assert_eq!(store.checkpoint_stats().failures.load(Ordering::Relaxed), 0);
    }
}
