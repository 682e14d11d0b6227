//! The audit log on PostgreSQL: appended inside the caller's transaction under a
//! transaction-scoped advisory lock, so appends from several collector replicas are
//! serialized and the chain has no forks (the lock is released at commit or rollback).

use tokio_postgres::Transaction;

use super::super::DEFAULT_SEARCH_LIMIT;
use super::super::apply::{to_i64, to_u64};
use super::super::audit::{AuditEntry, AuditRecord, AuditStore, GENESIS_HASH, chain_hash};
use super::{Db, PgStore, get};
use crate::storage::{StorageError, StoreFuture};

/// Key of the advisory lock audit appends hold ("dwaudt" in ASCII).
const AUDIT_LOCK: i64 = 0x0000_6477_6175_6474;

/// Appends `e` to the chain inside `tx` (the caller's transaction, so the record commits or
/// rolls back with the change it describes). Returns the new record's seq.
pub(crate) async fn append_tx(tx: &Transaction<'_>, e: &AuditEntry) -> Result<u64, StorageError> {
    let detail = e.detail_text()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&AUDIT_LOCK])
        .await
        .db()?;
    let last = tx
        .query_opt(
            "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
            &[],
        )
        .await
        .db()?;
    let (seq, prev) = match last {
        Some(row) => (to_u64(get::<i64>(&row, 0)?) + 1, get::<Vec<u8>>(&row, 1)?),
        None => (1, GENESIS_HASH.to_vec()),
    };
    let hash = chain_hash(&prev, seq, e.at_ms, &e.actor, &e.action, &e.target, &detail);
    tx.execute(
        "INSERT INTO audit_log (seq, at_ms, actor, action, target, detail, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &to_i64(seq),
            &e.at_ms,
            &e.actor,
            &e.action,
            &e.target,
            &detail,
            &prev,
            &hash.as_slice(),
        ],
    )
    .await
    .db()?;
    Ok(seq)
}

/// The columns [`record_from_row`] reads, in its order.
pub(crate) const RECORD_COLUMNS: &str =
    "seq, at_ms, actor, action, target, detail, prev_hash, hash";

/// One stored record, exactly as stored (see [`AuditRecord`]).
pub(crate) fn record_from_row(r: &tokio_postgres::Row) -> Result<AuditRecord, StorageError> {
    Ok(AuditRecord {
        seq: to_u64(get(r, 0)?),
        at_ms: get(r, 1)?,
        actor: get(r, 2)?,
        action: get(r, 3)?,
        target: get(r, 4)?,
        detail: get(r, 5)?,
        prev_hash: get(r, 6)?,
        hash: get(r, 7)?,
    })
}

impl AuditStore for PgStore {
    fn append_audit(&self, entry: AuditEntry) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            let seq = append_tx(&tx, &entry).await?;
            tx.commit().await.db()?;
            Ok(seq)
        })
    }

    fn audit_records(&self, after_seq: u64, limit: u32) -> StoreFuture<'_, Vec<AuditRecord>> {
        Box::pin(async move {
            let limit = i64::from(if limit == 0 {
                DEFAULT_SEARCH_LIMIT
            } else {
                limit
            });
            let c = self.reader().await?;
            c.query(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2"
                ),
                &[&to_i64(after_seq), &limit],
            )
            .await
            .db()?
            .iter()
            .map(record_from_row)
            .collect()
        })
    }
}
