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
    let seqs = append_many_tx(tx, &[e]).await?;
    seqs.first()
        .copied()
        .ok_or_else(|| StorageError::Backend("postgres: audit append wrote nothing".into()))
}

/// Appends `entries`, in order, inside `tx` in a fixed number of round trips whatever their
/// count (one lock, one read of the head, one array insert). Returns their seqs.
pub(crate) async fn append_many_tx(
    tx: &Transaction<'_>,
    entries: &[&AuditEntry],
) -> Result<Vec<u64>, StorageError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let details = entries
        .iter()
        .map(|e| e.detail_text())
        .collect::<Result<Vec<_>, _>>()?;
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
    let (mut seq, mut prev) = match last {
        Some(row) => (to_u64(get::<i64>(&row, 0)?), get::<Vec<u8>>(&row, 1)?),
        None => (0, GENESIS_HASH.to_vec()),
    };
    let n = entries.len();
    let (mut seqs, mut cols) = (Vec::with_capacity(n), AuditColumns::with_capacity(n));
    for (e, detail) in entries.iter().zip(&details) {
        seq += 1;
        let hash = chain_hash(&prev, seq, e.at_ms, &e.actor, &e.action, &e.target, detail);
        seqs.push(seq);
        cols.seq.push(to_i64(seq));
        cols.at_ms.push(e.at_ms);
        cols.actor.push(&e.actor);
        cols.action.push(&e.action);
        cols.target.push(&e.target);
        cols.detail.push(detail);
        cols.prev_hash
            .push(std::mem::replace(&mut prev, hash.to_vec()));
    }
    let hashes: Vec<&[u8]> = cols
        .prev_hash
        .iter()
        .skip(1)
        .map(Vec::as_slice)
        .chain([prev.as_slice()])
        .collect();
    tx.execute(
        "INSERT INTO audit_log (seq, at_ms, actor, action, target, detail, prev_hash, hash) \
         SELECT * FROM unnest($1::int8[], $2::int8[], $3::text[], $4::text[], $5::text[], \
                              $6::text[], $7::bytea[], $8::bytea[])",
        &[
            &cols.seq,
            &cols.at_ms,
            &cols.actor,
            &cols.action,
            &cols.target,
            &cols.detail,
            &cols.prev_hash,
            &hashes,
        ],
    )
    .await
    .db()?;
    Ok(seqs)
}

/// The columns of an array insert into `audit_log`.
struct AuditColumns<'a> {
    seq: Vec<i64>,
    at_ms: Vec<i64>,
    actor: Vec<&'a str>,
    action: Vec<&'a str>,
    target: Vec<&'a str>,
    detail: Vec<&'a str>,
    prev_hash: Vec<Vec<u8>>,
}

impl AuditColumns<'_> {
    fn with_capacity(n: usize) -> Self {
        AuditColumns {
            seq: Vec::with_capacity(n),
            at_ms: Vec::with_capacity(n),
            actor: Vec::with_capacity(n),
            action: Vec::with_capacity(n),
            target: Vec::with_capacity(n),
            detail: Vec::with_capacity(n),
            prev_hash: Vec::with_capacity(n),
        }
    }
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
