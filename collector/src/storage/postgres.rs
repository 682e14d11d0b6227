//! The PostgreSQL backend, for larger fleets and several collector replicas over one database.
//!
//! Connections: [`WRITE_LANES`] **lane writers**, one **control writer** and one **reader** per
//! collector, each a single `tokio-postgres` connection behind an async mutex, reconnected on
//! the next call when lost. Group commit makes one write transaction carry the reports of many
//! streams; the ingest partitions hosts between the lanes (`storage::lane_of`) and sends each
//! lane's apply batches and heartbeats to that lane's writer, so two apply transactions run at
//! once on disjoint host rows: while one waits for its commit to reach the disk, the server
//! works on the other. Every other write (enrollment, lifecycle transitions, audit, tokens,
//! actions) goes through the control writer, so none of it occupies a lane's connection. Within
//! a transaction, statements are pipelined (several requests in flight on the one connection)
//! and every per-row write is a single array statement (`UNNEST`), so a report batch costs two
//! round trips whatever its size (`apply_batch`). Reads use their own connection so the fleet
//! view never waits behind an apply batch.
//!
//! Several replicas: report batches, heartbeats and acknowledgements lock the host rows they
//! change (`FOR NO KEY UPDATE`, in primary-key order, so two replicas never deadlock on each
//! other's batches; other tables' foreign-key checks pass), lifecycle transitions serialise on a
//! transaction-scoped advisory lock instead of host rows (`postgres/lifecycle.rs`), the token
//! consumption locks the token row, and migrations run under a transaction-scoped advisory lock.
//!
//! TLS to PostgreSQL is not supported yet (`NoTls`): run the database on the same host or a
//! trusted network; TLS is a later issue.

use std::collections::{BTreeMap, HashMap, VecDeque};

use driftwatch_proto::set::SetDigest;
use driftwatch_proto::v1::{DriftItem, ScanStatus};
use prost::Message;
use tokio::sync::{MappedMutexGuard, Mutex, MutexGuard};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row, Statement, Transaction};

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
    include_str!("migrations/postgres/0001_initial.sql"),
    include_str!("migrations/postgres/0002_audit.sql"),
    include_str!("migrations/postgres/0003_access.sql"),
    include_str!("migrations/postgres/0004_exports.sql"),
    include_str!("migrations/postgres/0005_lifecycle.sql"),
    include_str!("migrations/postgres/0006_rebuild_actions.sql"),
    include_str!("migrations/postgres/0007_hot_violation_updates.sql"),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Key of the advisory lock migrations hold ("dwatch" in ASCII).
const MIGRATION_LOCK: i64 = 0x0000_6477_6174_6368;

/// The writer's open-set cache holds at most this many items over all hosts.
const OPEN_SET_CACHE_ITEMS: usize = 2_000_000;

/// Lane writer connections, each applying the reports and heartbeats of its lane of hosts
/// (module doc).
pub const WRITE_LANES: usize = 2;

/// A collector store in a PostgreSQL database.
#[derive(Debug)]
pub struct PgStore {
    url: String,
    /// The control writer (every write but apply batches and heartbeats), then one per lane.
    writers: Vec<Mutex<Option<Writer>>>,
    reader: Mutex<Option<Client>>,
}

/// The write connection with its prepared statements and the open-set cache (valid for a
/// host only while its stored `apply_version` is the cached one).
struct Writer {
    client: Client,
    st: WriterStatements,
    open_sets: HashMap<i64, (i64, BTreeMap<Vec<u8>, OpenEntry>)>,
    cached_items: usize,
    /// Violation ids taken from `violations_id_seq` and not used yet.
    ids: VecDeque<i64>,
}

impl Writer {
    async fn new(client: Client) -> Result<Self, StorageError> {
        let st = WriterStatements::prepare(&client).await?;
        Ok(Writer {
            client,
            st,
            open_sets: HashMap::new(),
            cached_items: 0,
            ids: VecDeque::new(),
        })
    }
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("cached_hosts", &self.open_sets.len())
            .field("cached_items", &self.cached_items)
            .finish_non_exhaustive()
    }
}

struct WriterStatements {
    lock_hosts: Statement,
    open_sets: Statement,
    new_ids: Statement,
    update_content: Statement,
    update_touch: Statement,
    insert: Statement,
    update_hosts: Statement,
}

impl WriterStatements {
    async fn prepare(c: &Client) -> Result<Self, StorageError> {
        Ok(WriterStatements {
            lock_hosts: c
                .prepare(
                    "SELECT pk, host_id, apply_version, epoch, last_seq, incomplete, \
                     incomplete_reason, lost_reports, last_scan_ms, last_scan_status \
                     FROM hosts WHERE host_id = ANY($1::text[]) ORDER BY pk FOR NO KEY UPDATE",
                )
                .await
                .db()?,
            open_sets: c
                .prepare(
                    "SELECT host_pk, id, key, item_hash, severity, is_package FROM violations \
                     WHERE host_pk = ANY($1::int8[]) AND resolved_ms IS NULL",
                )
                .await
                .db()?,
            new_ids: c
                .prepare("SELECT nextval('violations_id_seq') FROM generate_series(1, $1::int8)")
                .await
                .db()?,
            update_content: c
                .prepare(
                    "UPDATE violations v SET item = u.item, item_hash = u.item_hash, \
                     path = u.path, kind = u.kind, severity = u.severity, \
                     is_package = u.is_package, packages = u.packages, \
                     last_seen_ms = coalesce(u.last_seen_ms, v.last_seen_ms), \
                     resolved_ms = u.resolved_ms \
                     FROM unnest($1::int8[], $2::bytea[], $3::bytea[], $4::bytea[], $5::int4[], \
                                 $6::int4[], $7::bool[], $8::text[], $9::int8[], $10::int8[]) \
                       AS u(id, item, item_hash, path, kind, severity, is_package, packages, \
                            last_seen_ms, resolved_ms) \
                     WHERE v.id = u.id",
                )
                .await
                .db()?,
            update_touch: c
                .prepare(
                    "UPDATE violations v SET \
                     last_seen_ms = coalesce(u.last_seen_ms, v.last_seen_ms), \
                     resolved_ms = coalesce(u.resolved_ms, v.resolved_ms) \
                     FROM unnest($1::int8[], $2::int8[], $3::int8[]) \
                       AS u(id, last_seen_ms, resolved_ms) \
                     WHERE v.id = u.id",
                )
                .await
                .db()?,
            insert: c
                .prepare(
                    "INSERT INTO violations (id, host_pk, key, item, item_hash, path, kind, \
                     severity, is_package, packages, first_seen_ms, last_seen_ms, resolved_ms) \
                     SELECT * FROM unnest($1::int8[], $2::int8[], $3::bytea[], $4::bytea[], \
                                          $5::bytea[], $6::bytea[], $7::int4[], $8::int4[], \
                                          $9::bool[], $10::text[], $11::int8[], $12::int8[], \
                                          $13::int8[])",
                )
                .await
                .db()?,
            update_hosts: c
                .prepare(
                    "UPDATE hosts h SET apply_version = u.apply_version, epoch = u.epoch, \
                     last_seq = u.last_seq, set_digest = u.set_digest, \
                     incomplete = u.incomplete, incomplete_reason = u.incomplete_reason, \
                     lost_reports = u.lost_reports, last_report_ms = u.last_report_ms, \
                     last_scan_ms = u.last_scan_ms, last_scan_status = u.last_scan_status, \
                     open_sev0 = u.s0, open_sev1 = u.s1, open_sev2 = u.s2, open_sev3 = u.s3, \
                     open_sev4 = u.s4, open_sev5 = u.s5, open_packages = u.open_packages \
                     FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[], $5::bytea[], \
                                 $6::bool[], $7::text[], $8::int8[], $9::int8[], $10::int8[], \
                                 $11::int4[], $12::int8[], $13::int8[], $14::int8[], \
                                 $15::int8[], $16::int8[], $17::int8[], $18::int8[]) \
                       AS u(pk, apply_version, epoch, last_seq, set_digest, incomplete, \
                            incomplete_reason, lost_reports, last_report_ms, last_scan_ms, \
                            last_scan_status, s0, s1, s2, s3, s4, s5, open_packages) \
                     WHERE h.pk = u.pk",
                )
                .await
                .db()?,
        })
    }
}

trait Db<T> {
    fn db(self) -> Result<T, StorageError>;
}

impl<T> Db<T> for Result<T, tokio_postgres::Error> {
    fn db(self) -> Result<T, StorageError> {
        self.map_err(|e| {
            StorageError::Backend(match e.as_db_error() {
                Some(db) => format!("postgres: {}: {}", db.code().code(), db.message()),
                None => format!("postgres: {e}"),
            })
        })
    }
}

type Params<'a> = Vec<&'a (dyn ToSql + Sync)>;

/// How much a session writes before it asks the kernel to write it back: PostgreSQL's
/// `backend_flush_after`, 256 kB (its own default for the checkpointer on Linux).
///
/// A session evicts the pages it dirtied (rows written, hint bits set by a read, a vacuum's
/// work) from shared buffers into the kernel's page cache, and by default nothing asks the
/// kernel to write them before the next checkpoint's sync phase fsyncs every file: at issue
/// 4's paced load that phase took 0.2–1 s every 9–13 s, and the commits behind it waited.
/// Only where nobody chose a value (`pg_settings.source` is `default`): a value from
/// `postgresql.conf`, the database, the role or the URL (`options=-c backend_flush_after=...`,
/// 0 to turn it off) is kept. Each of the collector's sessions sets it for itself, and
/// [`PgStore::connect`] sets it on the database, which reaches the autovacuum workers that
/// clean the collector's tables (docs/benchmarks.md, perf13: the sessions alone hardly moved
/// the ack tail; with autovacuum included, the p99 at one paced rate fell from 226–265 ms to
/// 59–78 ms).
pub(crate) const BACKEND_FLUSH_AFTER: &str = "256kB";

/// Connects a session; `true` when nobody chose its `backend_flush_after`, which it then sets
/// to [`BACKEND_FLUSH_AFTER`].
async fn open_session(url: &str) -> Result<(Client, bool), StorageError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.db()?;
    // The connection future does the socket I/O for the client; it ends when the client is
    // dropped or the server goes away (the next call then reconnects).
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "postgres connection closed");
        }
    });
    let unchosen = client
        .query(
            "SELECT set_config('backend_flush_after', $1, false) FROM pg_settings \
             WHERE name = 'backend_flush_after' AND source = 'default'",
            &[&BACKEND_FLUSH_AFTER],
        )
        .await
        .db()?;
    Ok((client, !unchosen.is_empty()))
}

async fn connect_client(url: &str) -> Result<Client, StorageError> {
    Ok(open_session(url).await?.0)
}

/// `ALTER DATABASE <this one> SET backend_flush_after`, so that every session in the
/// collector's database, autovacuum workers included, writes back early. A tuning, not a
/// requirement: without the privilege (only the database's owner may) or on any other error
/// the collector says so and goes on.
async fn write_back_early_in_database(client: &Client) {
    let result = async {
        let sql: String = client
            .query_one(
                "SELECT format('ALTER DATABASE %I SET backend_flush_after = %L', \
                 current_database(), $1::text)",
                &[&BACKEND_FLUSH_AFTER],
            )
            .await?
            .try_get(0)?;
        client.batch_execute(&sql).await
    }
    .await;
    match result {
        Ok(()) => tracing::info!(
            backend_flush_after = BACKEND_FLUSH_AFTER,
            "postgres database set to write back early (autovacuum included)"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            backend_flush_after = BACKEND_FLUSH_AFTER,
            "could not set backend_flush_after on the database (its owner may: ALTER DATABASE \
             ... SET backend_flush_after = <this value>); autovacuum's writes will wait for the \
             checkpoints' sync, which lengthens the commits' stalls"
        ),
    }
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction under an advisory lock, so
/// replicas starting together migrate once.
async fn migrate(client: &mut Client) -> Result<(), StorageError> {
    let tx = client.transaction().await.db()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .db()?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version bigint NOT NULL)")
        .await
        .db()?;
    let found: i64 = match tx
        .query_opt("SELECT version FROM schema_version", &[])
        .await
        .db()?
    {
        Some(row) => row.try_get(0).db()?,
        None => {
            tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])
                .await
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
        tx.batch_execute(sql).await.db()?;
        tracing::info!(version = i + 1, "postgres schema migrated");
    }
    tx.execute("UPDATE schema_version SET version = $1", &[&SCHEMA_VERSION])
        .await
        .db()?;
    tx.commit().await.db()
}

impl PgStore {
    /// Connects to `url` (a libpq-style connection string or `postgresql://` URL), migrates the
    /// schema, sets [`BACKEND_FLUSH_AFTER`] on the database where nobody chose a value, and
    /// opens the writer and reader connections.
    pub async fn connect(url: &str) -> Result<Self, StorageError> {
        let (mut client, unchosen) = open_session(url).await?;
        migrate(&mut client).await?;
        if unchosen {
            write_back_early_in_database(&client).await;
        }
        let mut writers = vec![Mutex::new(Some(Writer::new(client).await?))];
        for _ in 0..WRITE_LANES {
            let client = connect_client(url).await?;
            writers.push(Mutex::new(Some(Writer::new(client).await?)));
        }
        let reader = connect_client(url).await?;
        Ok(PgStore {
            url: url.to_owned(),
            writers,
            reader: Mutex::new(Some(reader)),
        })
    }

    /// The control writer (every write but apply batches and heartbeats).
    async fn writer(&self) -> Result<MappedMutexGuard<'_, Writer>, StorageError> {
        self.writer_at(0).await
    }

    /// The writer of the lane of `host_id`.
    async fn lane_writer(
        &self,
        host_id: &str,
    ) -> Result<MappedMutexGuard<'_, Writer>, StorageError> {
        self.writer_at(1 + super::lane_of(host_id, WRITE_LANES))
            .await
    }

    /// Writer connection `i` (0: control, 1..: lanes), reconnected first if it was lost.
    async fn writer_at(&self, i: usize) -> Result<MappedMutexGuard<'_, Writer>, StorageError> {
        let mut guard = self.writers[i].lock().await;
        if guard.as_ref().is_none_or(|w| w.client.is_closed()) {
            *guard = None;
            let client = connect_client(&self.url).await?;
            *guard = Some(Writer::new(client).await?);
        }
        MutexGuard::try_map(guard, Option::as_mut)
            .map_err(|_| StorageError::Backend("postgres: no writer connection".into()))
    }

    /// The reader connection, reconnected first if it was lost.
    async fn reader(&self) -> Result<MappedMutexGuard<'_, Client>, StorageError> {
        let mut guard = self.reader.lock().await;
        if guard.as_ref().is_none_or(Client::is_closed) {
            *guard = None;
            *guard = Some(connect_client(&self.url).await?);
        }
        MutexGuard::try_map(guard, Option::as_mut)
            .map_err(|_| StorageError::Backend("postgres: no reader connection".into()))
    }

    /// A read-only transaction on one snapshot.
    async fn read_tx(client: &mut Client) -> Result<Transaction<'_>, StorageError> {
        client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .db()
    }
}

fn get<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a Row,
    idx: usize,
) -> Result<T, StorageError> {
    row.try_get(idx).db()
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

const TOKEN_COLUMNS: &str = "id, secret_sha256, created_ms, expires_ms, uses_left, host_pattern";

fn token_from_row(r: &Row) -> Result<EnrollmentToken, StorageError> {
    Ok(EnrollmentToken {
        id: get(r, 0)?,
        secret_sha256: blob32("enrollment_tokens", get(r, 1)?)?,
        created_ms: get(r, 2)?,
        expires_ms: get(r, 3)?,
        uses_left: count("enrollment_tokens", get(r, 4)?)?,
        host_pattern: get(r, 5)?,
    })
}

async fn host_pk(tx: &Transaction<'_>, host_id: &str) -> Result<i64, StorageError> {
    match tx
        .query_opt("SELECT pk FROM hosts WHERE host_id = $1", &[&host_id])
        .await
        .db()?
    {
        Some(r) => get(&r, 0),
        None => Err(StorageError::UnknownHost(host_id.to_owned())),
    }
}

const HOST_COLUMNS: &str = "h.pk, h.host_id, h.enrolled_ms, h.agent_version, h.image_id, \
     h.image_version, h.baseline_root, h.boot_id, h.hello_epoch, h.last_seen_ms, h.last_scan_ms, \
     h.last_scan_status, h.last_report_ms, h.incomplete, h.incomplete_reason, h.lost_reports, \
     h.epoch, h.last_seq, h.set_digest, h.open_sev0, h.open_sev1, h.open_sev2, h.open_sev3, \
     h.open_sev4, h.open_sev5, h.open_packages, \
     (EXISTS (SELECT 1 FROM certificates c WHERE c.host_pk = h.pk) AND NOT EXISTS \
      (SELECT 1 FROM certificates c WHERE c.host_pk = h.pk AND c.revoked_ms IS NULL))";

fn host_from_row(r: &Row) -> Result<(i64, HostSummary), StorageError> {
    let mut open_by_severity = [0u64; 6];
    for (i, slot) in open_by_severity.iter_mut().enumerate() {
        *slot = to_u64(get(r, 19 + i)?);
    }
    let summary = HostSummary {
        host_id: get(r, 1)?,
        labels: Vec::new(),
        enrolled_ms: get(r, 2)?,
        hello: HelloInfo {
            agent_version: get(r, 3)?,
            image_id: get(r, 4)?,
            image_version: get(r, 5)?,
            baseline_root: get(r, 6)?,
            boot_id: get(r, 7)?,
            epoch: to_u64(get(r, 8)?),
        },
        last_seen_ms: get(r, 9)?,
        last_scan_ms: get(r, 10)?,
        last_scan_status: ScanStatus::try_from(get::<i32>(r, 11)?)
            .unwrap_or(ScanStatus::Unspecified),
        last_report_ms: get(r, 12)?,
        incomplete: get(r, 13)?,
        incomplete_reason: get(r, 14)?,
        lost_reports: to_u64(get(r, 15)?),
        position: StreamPosition {
            epoch: to_u64(get(r, 16)?),
            last_seq: to_u64(get(r, 17)?),
            set_digest: blob32("hosts", get(r, 18)?)?,
        },
        open_by_severity,
        open_packages: to_u64(get(r, 25)?),
        revoked: get(r, 26)?,
    };
    Ok((get(r, 0)?, summary))
}

async fn load_hosts(
    tx: &Transaction<'_>,
    host_id: Option<&str>,
) -> Result<Vec<HostSummary>, StorageError> {
    let (hosts_sql, labels_sql) = match host_id {
        Some(_) => (
            format!("SELECT {HOST_COLUMNS} FROM hosts h WHERE h.host_id = $1"),
            "SELECT l.host_pk, l.key, l.value FROM host_labels l \
             JOIN hosts h ON h.pk = l.host_pk WHERE h.host_id = $1 ORDER BY l.key",
        ),
        None => (
            format!("SELECT {HOST_COLUMNS} FROM hosts h ORDER BY h.host_id"),
            "SELECT host_pk, key, value FROM host_labels ORDER BY host_pk, key",
        ),
    };
    let params: Params<'_> = match &host_id {
        Some(h) => vec![h],
        None => vec![],
    };
    // Pipelined: both queries in flight at once.
    let (rows, labels) = futures_util::future::try_join(
        tx.query(hosts_sql.as_str(), &params),
        tx.query(labels_sql, &params),
    )
    .await
    .db()?;
    let mut by_host: HashMap<i64, Vec<(String, String)>> = HashMap::new();
    for r in &labels {
        by_host
            .entry(get(r, 0)?)
            .or_default()
            .push((get(r, 1)?, get(r, 2)?));
    }
    rows.iter()
        .map(|r| {
            let (pk, mut h) = host_from_row(r)?;
            h.labels = by_host.remove(&pk).unwrap_or_default();
            Ok(h)
        })
        .collect()
}

async fn apply_batch(
    w: &mut Writer,
    batch: Vec<ReportToApply>,
) -> Result<Vec<ApplyOutcome>, StorageError> {
    let Writer {
        client,
        st,
        open_sets,
        cached_items,
        ids,
    } = w;
    let mut timer = apply::ApplyTimer::start();
    let reports = batch.len();
    let mut host_ids: Vec<&str> = batch.iter().map(|r| r.host_id.as_str()).collect();
    host_ids.sort_unstable();
    host_ids.dedup();
    // Two round trips in all (statements pipelined on the one connection): BEGIN, more ids
    // when few are left, and the host rows' locks; then, once planned, the writes and the
    // COMMIT. A paced load commits batches of one or two reports, and every extra exchange
    // with the server is a wait for two busy processes to be scheduled.
    let refill = ids.len() < ID_POOL_LOW;
    let rollback = Rollback::armed(client);
    let (_, fetched, rows) = futures_util::future::try_join3(
        client.batch_execute("BEGIN"),
        async {
            if refill {
                client
                    .query(&st.new_ids, &[&ID_POOL_REFILL])
                    .await
                    .map(Some)
            } else {
                Ok(None)
            }
        },
        client.query(&st.lock_hosts, &[&host_ids]),
    )
    .await
    .db()?;
    for r in fetched.iter().flatten() {
        ids.push_back(get(r, 0)?);
    }
    let mut hosts: HashMap<String, HostState> = HashMap::with_capacity(rows.len());
    let mut to_load: Vec<i64> = Vec::new();
    let mut pk_to_host: HashMap<i64, String> = HashMap::new();
    for r in &rows {
        let mut host = HostState {
            pk: get(r, 0)?,
            apply_version: get(r, 2)?,
            epoch: to_u64(get(r, 3)?),
            last_seq: to_u64(get(r, 4)?),
            incomplete: get(r, 5)?,
            incomplete_reason: get(r, 6)?,
            lost_reports: to_u64(get(r, 7)?),
            last_scan_ms: get(r, 8)?,
            last_scan_status: get(r, 9)?,
            open: BTreeMap::new(),
        };
        // Cache entries are taken out while the transaction runs: on failure they are gone
        // and the next batch reloads them.
        match open_sets.remove(&host.pk) {
            Some((version, open)) if version == host.apply_version => {
                *cached_items -= open.len();
                host.open = open;
            }
            stale => {
                if let Some((_, open)) = stale {
                    *cached_items -= open.len();
                }
                to_load.push(host.pk);
            }
        }
        let id: String = get(r, 1)?;
        pk_to_host.insert(host.pk, id.clone());
        hosts.insert(id, host);
    }
    if !to_load.is_empty() {
        for r in client.query(&st.open_sets, &[&to_load]).await.db()? {
            let pk: i64 = get(&r, 0)?;
            let Some(host) = pk_to_host.get(&pk).and_then(|id| hosts.get_mut(id)) else {
                continue;
            };
            host.open.insert(
                get(&r, 2)?,
                OpenEntry {
                    row: RowRef::Stored(get(&r, 1)?),
                    hash: blob32("violations", get(&r, 3)?)?,
                    severity: get(&r, 4)?,
                    is_package: get(&r, 5)?,
                },
            );
        }
    }
    timer.loaded();
    let plan = apply::plan(&mut hosts, batch)?;
    timer.planned();

    // Ids come from the sequence alone, so they are unique; ids drawn and never used (a
    // failed batch, a restart) are gaps.
    if plan.inserts.len() > ids.len() {
        let n = (plan.inserts.len() - ids.len()) as i64 + ID_POOL_REFILL;
        for r in client.query(&st.new_ids, &[&n]).await.db()? {
            ids.push_back(get(&r, 0)?);
        }
    }
    let new_ids: Vec<i64> = ids.drain(..plan.inserts.len()).collect();

    // Column arrays for the UNNEST statements.
    let mut content = ContentColumns::default();
    let mut touch_ids = Vec::new();
    let mut touch_seen = Vec::new();
    let mut touch_resolved = Vec::new();
    for (id, u) in &plan.updates {
        match &u.columns {
            Some(c) => {
                content.push(*id, c);
                content.last_seen.push(u.last_seen_ms);
                content.resolved.push(u.resolved_ms);
            }
            None => {
                touch_ids.push(*id);
                touch_seen.push(u.last_seen_ms);
                touch_resolved.push(u.resolved_ms);
            }
        }
    }
    let mut ins = ContentColumns::default();
    let mut ins_host = Vec::with_capacity(plan.inserts.len());
    let mut ins_key = Vec::with_capacity(plan.inserts.len());
    let mut ins_first = Vec::with_capacity(plan.inserts.len());
    let mut ins_last = Vec::with_capacity(plan.inserts.len());
    for (n, id) in plan.inserts.iter().zip(&new_ids) {
        ins.push(*id, &n.columns);
        ins.resolved.push(n.resolved_ms);
        ins_host.push(n.host_pk);
        ins_key.push(n.key.as_slice());
        ins_first.push(n.first_seen_ms);
        ins_last.push(n.last_seen_ms);
    }
    let hc = HostColumns::new(&plan.hosts);

    // Pipelined: sent in this order on the one connection, executed in this order (the
    // updates may resolve an occurrence whose key an insert opens again), then the COMMIT. If
    // a statement fails, the server has aborted the transaction, so the COMMIT sent behind it
    // rolls back.
    let content_params: Params<'_> = vec![
        &content.id,
        &content.item,
        &content.hash,
        &content.path,
        &content.kind,
        &content.severity,
        &content.is_package,
        &content.packages,
        &content.last_seen,
        &content.resolved,
    ];
    let touch_params: Params<'_> = vec![&touch_ids, &touch_seen, &touch_resolved];
    let insert_params: Params<'_> = vec![
        &ins.id,
        &ins_host,
        &ins_key,
        &ins.item,
        &ins.hash,
        &ins.path,
        &ins.kind,
        &ins.severity,
        &ins.is_package,
        &ins.packages,
        &ins_first,
        &ins_last,
        &ins.resolved,
    ];
    let host_params = hc.params();
    futures_util::future::try_join5(
        async {
            if content.id.is_empty() {
                Ok(0)
            } else {
                client.execute(&st.update_content, &content_params).await
            }
        },
        async {
            if touch_ids.is_empty() {
                Ok(0)
            } else {
                client.execute(&st.update_touch, &touch_params).await
            }
        },
        async {
            if ins.id.is_empty() {
                Ok(0)
            } else {
                client.execute(&st.insert, &insert_params).await
            }
        },
        async {
            if hc.pk.is_empty() {
                Ok(0)
            } else {
                client.execute(&st.update_hosts, &host_params).await
            }
        },
        async { client.batch_execute("COMMIT").await.map(|()| 0) },
    )
    .await
    .db()?;
    rollback.disarm();
    timer.written();
    timer.committed("postgres", &plan, reports, to_load.len());

    for (_, mut host) in hosts {
        apply::settle_new_rows(&mut host.open, &new_ids);
        *cached_items += host.open.len();
        open_sets.insert(host.pk, (host.apply_version, host.open));
    }
    if *cached_items > OPEN_SET_CACHE_ITEMS {
        open_sets.clear();
        *cached_items = 0;
    }
    Ok(plan.outcomes)
}

/// Ids drawn from `violations_id_seq` at a time, and the stock below which the next batch
/// draws more (in its first round trip, so a batch of a few hundred new rows rarely waits for
/// ids).
const ID_POOL_REFILL: i64 = 4096;
const ID_POOL_LOW: usize = 2048;

/// Rolls back the writer's open transaction unless disarmed after its COMMIT: on an error, or
/// when the batch's future is dropped half-way, as `tokio_postgres::Transaction` does.
struct Rollback<'a> {
    client: Option<&'a Client>,
}

impl<'a> Rollback<'a> {
    fn armed(client: &'a Client) -> Self {
        Rollback {
            client: Some(client),
        }
    }

    fn disarm(mut self) {
        self.client = None;
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client {
            // The first poll queues the statement on the connection; its reply is not awaited
            // (the next batch's statements queue behind it). After a COMMIT that failed the
            // server may answer with a warning that no transaction is in progress.
            let _ = futures_util::FutureExt::now_or_never(client.batch_execute("ROLLBACK"));
        }
    }
}

/// Item columns as arrays.
#[derive(Default)]
struct ContentColumns<'a> {
    id: Vec<i64>,
    item: Vec<&'a [u8]>,
    hash: Vec<&'a [u8]>,
    path: Vec<Option<&'a [u8]>>,
    kind: Vec<i32>,
    severity: Vec<i32>,
    is_package: Vec<bool>,
    packages: Vec<&'a str>,
    last_seen: Vec<Option<i64>>,
    resolved: Vec<Option<i64>>,
}

impl<'a> ContentColumns<'a> {
    fn push(&mut self, id: i64, c: &'a apply::ItemColumns) {
        self.id.push(id);
        self.item.push(&c.encoded);
        self.hash.push(&c.hash);
        self.path.push(c.path.as_deref());
        self.kind.push(c.kind);
        self.severity.push(c.severity);
        self.is_package.push(c.is_package);
        self.packages.push(&c.packages);
    }
}

struct HostColumns<'a> {
    pk: Vec<i64>,
    apply_version: Vec<i64>,
    epoch: Vec<i64>,
    last_seq: Vec<i64>,
    digest: Vec<&'a [u8]>,
    incomplete: Vec<bool>,
    reason: Vec<&'a str>,
    lost: Vec<i64>,
    last_report: Vec<i64>,
    last_scan: Vec<Option<i64>>,
    scan_status: Vec<i32>,
    sev: [Vec<i64>; 6],
    packages: Vec<i64>,
}

impl<'a> HostColumns<'a> {
    fn new(hosts: &'a [apply::HostUpdate]) -> Self {
        let mut c = HostColumns {
            pk: Vec::new(),
            apply_version: Vec::new(),
            epoch: Vec::new(),
            last_seq: Vec::new(),
            digest: Vec::new(),
            incomplete: Vec::new(),
            reason: Vec::new(),
            lost: Vec::new(),
            last_report: Vec::new(),
            last_scan: Vec::new(),
            scan_status: Vec::new(),
            sev: Default::default(),
            packages: Vec::new(),
        };
        for h in hosts {
            c.pk.push(h.pk);
            c.apply_version.push(h.apply_version);
            c.epoch.push(to_i64(h.epoch));
            c.last_seq.push(to_i64(h.last_seq));
            c.digest.push(&h.set_digest);
            c.incomplete.push(h.incomplete);
            c.reason.push(&h.incomplete_reason);
            c.lost.push(to_i64(h.lost_reports));
            c.last_report.push(h.last_report_ms);
            c.last_scan.push(h.last_scan_ms);
            c.scan_status.push(h.last_scan_status);
            for (i, s) in c.sev.iter_mut().enumerate() {
                s.push(h.open_by_severity[i]);
            }
            c.packages.push(h.open_packages);
        }
        c
    }

    fn params(&self) -> Params<'_> {
        vec![
            &self.pk,
            &self.apply_version,
            &self.epoch,
            &self.last_seq,
            &self.digest,
            &self.incomplete,
            &self.reason,
            &self.lost,
            &self.last_report,
            &self.last_scan,
            &self.scan_status,
            &self.sev[0],
            &self.sev[1],
            &self.sev[2],
            &self.sev[3],
            &self.sev[4],
            &self.sev[5],
            &self.packages,
        ]
    }
}

async fn search(
    tx: &Transaction<'_>,
    q: ViolationQuery,
) -> Result<Vec<ViolationRecord>, StorageError> {
    let glob = q.path_glob.as_deref().map(PathGlob::new).transpose()?;
    let limit = if q.limit == 0 {
        DEFAULT_SEARCH_LIMIT
    } else {
        q.limit
    } as usize;
    let mut sql = String::from(
        "SELECT h.host_id, v.key, v.item, v.first_seen_ms, v.last_seen_ms, v.resolved_ms, v.path \
         FROM violations v JOIN hosts h ON h.pk = v.host_pk WHERE true",
    );
    let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut arg = |sql: &mut String, clause: &str, v: Box<dyn ToSql + Sync + Send>| {
        args.push(v);
        sql.push_str(&clause.replace('?', &format!("${}", args.len())));
    };
    if let Some(h) = q.host_id {
        arg(&mut sql, " AND h.host_id = ?", Box::new(h));
    }
    if let Some(g) = &glob {
        arg(&mut sql, " AND v.path >= ?", Box::new(g.prefix.clone()));
        if let Some(end) = g.prefix_end() {
            arg(&mut sql, " AND v.path < ?", Box::new(end));
        }
        sql.push_str(" AND v.path IS NOT NULL");
    }
    if let Some(k) = q.kind {
        arg(&mut sql, " AND v.kind = ?", Box::new(k));
    }
    if let Some(p) = q.package {
        let sep = apply::PACKAGE_SEPARATOR;
        arg(
            &mut sql,
            " AND (strpos(v.packages, ?) > 0",
            Box::new(format!("{sep}{p}:")),
        );
        arg(
            &mut sql,
            " OR strpos(v.packages, ?) > 0)",
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
        arg(&mut sql, " LIMIT ?", Box::new(limit as i64));
    }
    let params: Vec<&(dyn ToSql + Sync)> = args
        .iter()
        .map(|a| a.as_ref() as &(dyn ToSql + Sync))
        .collect();
    // Streamed, so a glob search stops reading at `limit` matches.
    let stream = tx.query_raw(sql.as_str(), params).await.db()?;
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(r) = futures_util::TryStreamExt::try_next(&mut stream)
            .await
            .db()?
        else {
            break;
        };
        if let Some(g) = &glob {
            let path: Vec<u8> = get(&r, 6)?;
            if !g.is_match(&path) {
                continue;
            }
        }
        let encoded: Vec<u8> = get(&r, 2)?;
        let item = DriftItem::decode(encoded.as_slice()).map_err(|e| StorageError::Corrupt {
            table: "violations",
            detail: format!("item: {e}"),
        })?;
        out.push(ViolationRecord {
            host_id: get(&r, 0)?,
            key: get(&r, 1)?,
            item,
            first_seen_ms: get(&r, 3)?,
            last_seen_ms: get(&r, 4)?,
            resolved_ms: get(&r, 5)?,
        });
    }
    Ok(out)
}

async fn insert_certificate(
    tx: &Transaction<'_>,
    pk: i64,
    c: &IssuedCertificate,
) -> Result<(), StorageError> {
    tx.execute(
        "INSERT INTO certificates (serial, host_pk, not_before_ms, not_after_ms, issued_ms) \
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &c.serial,
            &pk,
            &c.not_before_ms,
            &c.not_after_ms,
            &c.issued_ms,
        ],
    )
    .await
    .db()?;
    Ok(())
}

impl Storage for PgStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    fn create_enrollment_token(
        &self,
        token: EnrollmentToken,
        audit: AuditEntry,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            if let Some(p) = &token.host_pattern {
                glob::check_host_pattern(p)?;
            }
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            tx.execute(
                &format!(
                    "INSERT INTO enrollment_tokens ({TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6)"
                ),
                &[
                    &token.id,
                    &token.secret_sha256.as_slice(),
                    &token.created_ms,
                    &token.expires_ms,
                    &i64::from(token.uses_left),
                    &token.host_pattern,
                ],
            )
            .await
            .db()?;
            audit::append_tx(&tx, &audit).await?;
            tx.commit().await.db()
        })
    }

    fn list_enrollment_tokens(&self) -> StoreFuture<'_, Vec<EnrollmentToken>> {
        Box::pin(async move {
            let c = self.reader().await?;
            let rows = c
                .query(
                    &format!(
                        "SELECT {TOKEN_COLUMNS} FROM enrollment_tokens ORDER BY created_ms, id"
                    ),
                    &[],
                )
                .await
                .db()?;
            rows.iter().map(token_from_row).collect()
        })
    }

    fn consume_enrollment_token(
        &self,
        secret_sha256: [u8; 32],
        host_id: &str,
        now_ms: i64,
    ) -> StoreFuture<'_, EnrollmentToken> {
        let host_id = host_id.to_owned();
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            // FOR UPDATE: a concurrent consumer (another replica) waits here, then sees the
            // decremented count.
            let row = tx
                .query_opt(
                    &format!(
                        "SELECT {TOKEN_COLUMNS} FROM enrollment_tokens \
                         WHERE secret_sha256 = $1 FOR UPDATE"
                    ),
                    &[&secret_sha256.as_slice()],
                )
                .await
                .db()?;
            let mut token = token_from_row(&row.ok_or(TokenError::Unknown)?)?;
            super::check_token(&token, &host_id, now_ms)?;
            tx.execute(
                "UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE id = $1",
                &[&token.id],
            )
            .await
            .db()?;
            tx.commit().await.db()?;
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
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            let empty = SetDigest::new().finish();
            tx.execute(
                "INSERT INTO hosts (host_id, enrolled_ms, set_digest) VALUES ($1, $2, $3) \
                 ON CONFLICT (host_id) DO NOTHING",
                &[
                    &certificate.host_id,
                    &certificate.issued_ms,
                    &empty.as_slice(),
                ],
            )
            .await
            .db()?;
            let pk = host_pk(&tx, &certificate.host_id).await?;
            let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
            let values: Vec<&str> = labels.iter().map(|(_, v)| v.as_str()).collect();
            tx.execute("DELETE FROM host_labels WHERE host_pk = $1", &[&pk])
                .await
                .db()?;
            tx.execute(
                "INSERT INTO host_labels (host_pk, key, value) \
                 SELECT $1, k, v FROM unnest($2::text[], $3::text[]) AS l(k, v)",
                &[&pk, &keys, &values],
            )
            .await
            .db()?;
            insert_certificate(&tx, pk, &certificate).await?;
            audit::append_tx(&tx, &audit).await?;
            tx.commit().await.db()
        })
    }

    fn record_certificate(&self, certificate: IssuedCertificate) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            let pk = host_pk(&tx, &certificate.host_id).await?;
            insert_certificate(&tx, pk, &certificate).await?;
            tx.commit().await.db()
        })
    }

    fn revoke_host(&self, host_id: &str, now_ms: i64, audit: AuditEntry) -> StoreFuture<'_, u64> {
        let host_id = host_id.to_owned();
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            let pk = host_pk(&tx, &host_id).await?;
            let n = tx
                .execute(
                    "UPDATE certificates SET revoked_ms = $2 \
                     WHERE host_pk = $1 AND revoked_ms IS NULL",
                    &[&pk, &now_ms],
                )
                .await
                .db()?;
            audit::append_tx(&tx, &audit).await?;
            tx.commit().await.db()?;
            Ok(n)
        })
    }

    fn revoked_serials(&self, now_ms: i64) -> StoreFuture<'_, Vec<Vec<u8>>> {
        Box::pin(async move {
            let c = self.reader().await?;
            c.query(
                "SELECT serial FROM certificates WHERE revoked_ms IS NOT NULL \
                 AND not_after_ms > $1 ORDER BY serial",
                &[&now_ms],
            )
            .await
            .db()?
            .iter()
            .map(|r| get(r, 0))
            .collect()
        })
    }

    fn hello(
        &self,
        host_id: &str,
        hello: HelloInfo,
        now_ms: i64,
    ) -> StoreFuture<'_, StreamPosition> {
        let host_id = host_id.to_owned();
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            let row = tx
                .query_opt(
                    "UPDATE hosts SET agent_version = $2, image_id = $3, image_version = $4, \
                     baseline_root = $5, boot_id = $6, hello_epoch = $7, \
                     last_seen_ms = greatest(last_seen_ms, $8) \
                     WHERE host_id = $1 RETURNING epoch, last_seq, set_digest",
                    &[
                        &host_id,
                        &hello.agent_version,
                        &hello.image_id,
                        &hello.image_version,
                        &hello.baseline_root,
                        &hello.boot_id,
                        &to_i64(hello.epoch),
                        &now_ms,
                    ],
                )
                .await
                .db()?
                .ok_or_else(|| StorageError::UnknownHost(host_id.clone()))?;
            let epoch = to_u64(get(&row, 0)?);
            let last_seq = to_u64(get(&row, 1)?);
            let set_digest = blob32("hosts", get(&row, 2)?)?;
            tx.commit().await.db()?;
            Ok(StreamPosition {
                epoch: hello.epoch,
                last_seq: if epoch == hello.epoch { last_seq } else { 0 },
                set_digest,
            })
        })
    }

    fn apply_reports(&self, batch: Vec<ReportToApply>) -> StoreFuture<'_, Vec<ApplyOutcome>> {
        Box::pin(async move {
            if batch.is_empty() {
                return Ok(Vec::new());
            }
            let mut w = self.lane_writer(&batch[0].host_id).await?;
            apply_batch(&mut w, batch).await
        })
    }

    fn write_lanes(&self) -> usize {
        WRITE_LANES
    }

    fn record_heartbeats(&self, batch: Vec<HeartbeatRecord>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            if batch.is_empty() {
                return Ok(());
            }
            // One row per host (an UPDATE … FROM applies only one source row per target row):
            // newest seen and scan times, the last non-unspecified status in batch order.
            let mut merged: BTreeMap<&str, (i64, i64, i32)> = BTreeMap::new();
            for h in &batch {
                let e = merged.entry(&h.host_id).or_insert((i64::MIN, 0, 0));
                e.0 = e.0.max(h.received_ms);
                e.1 = e.1.max(h.last_scan_ms);
                if h.last_scan_status != ScanStatus::Unspecified {
                    e.2 = h.last_scan_status as i32;
                }
            }
            let ids: Vec<&str> = merged.keys().copied().collect();
            let seen: Vec<i64> = merged.values().map(|v| v.0).collect();
            let scan: Vec<i64> = merged.values().map(|v| v.1).collect();
            let status: Vec<i32> = merged.values().map(|v| v.2).collect();
            let mut w = self.lane_writer(&batch[0].host_id).await?;
            let tx = w.client.transaction().await.db()?;
            // Lock in pk order first, as apply does, so replicas never deadlock.
            tx.execute(
                "SELECT 1 FROM hosts WHERE host_id = ANY($1::text[]) ORDER BY pk \
                 FOR NO KEY UPDATE",
                &[&ids],
            )
            .await
            .db()?;
            // Unknown hosts are skipped: a heartbeat is no reason to fail the others.
            tx.execute(
                "UPDATE hosts h SET last_seen_ms = greatest(h.last_seen_ms, u.seen), \
                 last_scan_ms = CASE WHEN u.scan > 0 THEN greatest(h.last_scan_ms, u.scan) \
                                ELSE h.last_scan_ms END, \
                 last_scan_status = CASE WHEN u.status <> 0 THEN u.status \
                                    ELSE h.last_scan_status END \
                 FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int4[]) \
                   AS u(host_id, seen, scan, status) \
                 WHERE h.host_id = u.host_id",
                &[&ids, &seen, &scan, &status],
            )
            .await
            .db()?;
            tx.commit().await.db()
        })
    }

    fn record_security_event(
        &self,
        event: SecurityEvent,
        audit: AuditEntry,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            tx.execute(
                "INSERT INTO security_events (at_ms, kind, peer_host_id, detail) \
                 VALUES ($1, $2, $3, $4)",
                &[
                    &event.at_ms,
                    &event.kind,
                    &event.peer_host_id,
                    &event.detail,
                ],
            )
            .await
            .db()?;
            audit::append_tx(&tx, &audit).await?;
            tx.commit().await.db()
        })
    }

    fn list_hosts(&self) -> StoreFuture<'_, Vec<HostSummary>> {
        Box::pin(async move {
            let mut c = self.reader().await?;
            let tx = Self::read_tx(&mut c).await?;
            let hosts = load_hosts(&tx, None).await?;
            tx.commit().await.db()?;
            Ok(hosts)
        })
    }

    fn host(&self, host_id: &str) -> StoreFuture<'_, Option<HostSummary>> {
        let host_id = host_id.to_owned();
        Box::pin(async move {
            let mut c = self.reader().await?;
            let tx = Self::read_tx(&mut c).await?;
            let mut hosts = load_hosts(&tx, Some(&host_id)).await?;
            tx.commit().await.db()?;
            Ok(hosts.pop())
        })
    }

    fn search_violations(&self, query: ViolationQuery) -> StoreFuture<'_, Vec<ViolationRecord>> {
        Box::pin(async move {
            let mut c = self.reader().await?;
            let tx = Self::read_tx(&mut c).await?;
            let out = search(&tx, query).await?;
            tx.commit().await.db()?;
            Ok(out)
        })
    }

    fn security_events(&self, since_ms: i64, limit: u32) -> StoreFuture<'_, Vec<SecurityEvent>> {
        Box::pin(async move {
            let limit = i64::from(if limit == 0 {
                DEFAULT_SEARCH_LIMIT
            } else {
                limit
            });
            let c = self.reader().await?;
            c.query(
                "SELECT at_ms, kind, peer_host_id, detail FROM security_events \
                 WHERE at_ms >= $1 ORDER BY at_ms, id LIMIT $2",
                &[&since_ms, &limit],
            )
            .await
            .db()?
            .iter()
            .map(|r| {
                Ok(SecurityEvent {
                    at_ms: get(r, 0)?,
                    kind: get(r, 1)?,
                    peer_host_id: get(r, 2)?,
                    detail: get(r, 3)?,
                })
            })
            .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn show_flush_after(client: &Client) -> String {
        client
            .query_one("SHOW backend_flush_after", &[])
            .await
            .unwrap()
            .get(0)
    }

    /// A report writer's value.
    async fn lane_flush_after(store: &PgStore) -> String {
        let writer = store.writers[1].lock().await;
        show_flush_after(&writer.as_ref().unwrap().client).await
    }

    async fn plain_session(url: &str) -> Client {
        let (client, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
        tokio::spawn(conn);
        client
    }

    #[tokio::test]
    async fn sessions_and_the_database_write_back_early_unless_told_otherwise() {
        let Some(server) = driftwatch_tests::postgres::server() else {
            return;
        };
        let url = server.create_database("flush_after");
        let plain = plain_session(&url).await;
        assert_eq!(show_flush_after(&plain).await, "0", "the server's default");
        let ours = connect_client(&url).await.unwrap();
        assert_eq!(show_flush_after(&ours).await, BACKEND_FLUSH_AFTER);
        for (chosen, shown) in [("64kB", "64kB"), ("0", "0")] {
            let url = format!("{url} options='-c backend_flush_after={chosen}'");
            let ours = connect_client(&url).await.unwrap();
            assert_eq!(show_flush_after(&ours).await, shown);
        }

        // The store sets it on its database: any new session there (an autovacuum worker's
        // too) starts with it, and the store's own sessions have it.
        let store = PgStore::connect(&url).await.unwrap();
        assert_eq!(show_flush_after(&plain_session(&url).await).await, "256kB");
        assert_eq!(lane_flush_after(&store).await, BACKEND_FLUSH_AFTER);
        drop(store);
        // A value chosen on the database is kept.
        plain
            .batch_execute(&format!(
                "ALTER DATABASE {} SET backend_flush_after = '128kB'",
                plain
                    .query_one("SELECT quote_ident(current_database())", &[])
                    .await
                    .unwrap()
                    .get::<_, String>(0)
            ))
            .await
            .unwrap();
        let store = PgStore::connect(&url).await.unwrap();
        assert_eq!(show_flush_after(&plain_session(&url).await).await, "128kB");
        assert_eq!(lane_flush_after(&store).await, "128kB");
    }

    #[tokio::test]
    async fn a_user_who_may_not_alter_the_database_still_connects() {
        let Some(server) = driftwatch_tests::postgres::server() else {
            return;
        };
        let url = server.create_database("flush_after_not_owner");
        let admin = plain_session(&url).await;
        admin
            .batch_execute(
                "DO $$ BEGIN CREATE ROLE dw_not_owner LOGIN; \
                 EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
                 GRANT CREATE ON SCHEMA public TO dw_not_owner;",
            )
            .await
            .unwrap();
        let as_user = format!("{url} user=dw_not_owner");
        let store = PgStore::connect(&as_user).await.unwrap();
        assert_eq!(lane_flush_after(&store).await, BACKEND_FLUSH_AFTER);
        // The database stays as it was.
        assert_eq!(show_flush_after(&plain_session(&url).await).await, "0");
    }
}
