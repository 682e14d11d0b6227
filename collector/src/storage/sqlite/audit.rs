//! The audit log on SQLite: appended inside the writer's transactions (one writer thread and
//! `BEGIN IMMEDIATE`, so appends are serialized and the chain has no forks).

use rusqlite::{OptionalExtension, Transaction, params};

use super::super::DEFAULT_SEARCH_LIMIT;
use super::super::apply::{to_i64, to_u64};
use super::super::audit::{AuditEntry, AuditRecord, AuditStore, GENESIS_HASH, chain_hash};
use super::{Db, SqliteStore};
use crate::storage::{StorageError, StoreFuture};

/// Appends `e` to the chain inside `tx` (the caller's transaction, so the record commits or
/// rolls back with the change it describes). Returns the new record's seq.
pub(crate) fn append_tx(tx: &Transaction<'_>, e: &AuditEntry) -> Result<u64, StorageError> {
    let detail = e.detail_text()?;
    let last: Option<(i64, Vec<u8>)> = tx
        .prepare_cached("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
        .db()?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .db()?;
    let (seq, prev) = match last {
        Some((seq, hash)) => (to_u64(seq) + 1, hash),
        None => (1, GENESIS_HASH.to_vec()),
    };
    let hash = chain_hash(&prev, seq, e.at_ms, &e.actor, &e.action, &e.target, &detail);
    tx.prepare_cached(
        "INSERT INTO audit_log (seq, at_ms, actor, action, target, detail, prev_hash, hash) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )
    .db()?
    .execute(params![
        to_i64(seq),
        e.at_ms,
        e.actor,
        e.action,
        e.target,
        detail,
        prev,
        hash.as_slice()
    ])
    .db()?;
    Ok(seq)
}

/// The columns [`record_from_row`] reads, in its order.
pub(crate) const RECORD_COLUMNS: &str =
    "seq, at_ms, actor, action, target, detail, prev_hash, hash";

/// One stored record, exactly as stored (see [`AuditRecord`]).
pub(crate) fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        seq: to_u64(r.get(0)?),
        at_ms: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        target: r.get(4)?,
        detail: r.get(5)?,
        prev_hash: r.get(6)?,
        hash: r.get(7)?,
    })
}

impl AuditStore for SqliteStore {
    fn append_audit(&self, entry: AuditEntry) -> StoreFuture<'_, u64> {
        self.write(move |tx| append_tx(tx, &entry))
    }

    fn audit_records(&self, after_seq: u64, limit: u32) -> StoreFuture<'_, Vec<AuditRecord>> {
        self.read(move |tx| {
            let limit = if limit == 0 {
                DEFAULT_SEARCH_LIMIT
            } else {
                limit
            };
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {RECORD_COLUMNS} FROM audit_log WHERE seq > ?1 ORDER BY seq LIMIT ?2"
                ))
                .db()?;
            stmt.query_map(params![to_i64(after_seq), limit], record_from_row)
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()
        })
    }
}
