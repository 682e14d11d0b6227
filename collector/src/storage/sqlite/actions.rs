//! `ActionStore` on SQLite. Writes run on the writer thread in one immediate transaction with
//! their audit record; the dispatch lock is always granted (one collector process owns a
//! SQLite file).

use rusqlite::{OptionalExtension, Transaction, params};

use super::super::actions::{
    ActionFilter, ActionState, ActionStore, AttemptRecord, DispatchLock, RebuildAction,
    effective_limit, open_state_names, reasons_from_json, reasons_to_json, state_from_name,
};
use super::super::audit::AuditEntry;
use super::super::{StorageError, StoreFuture};
use super::{Db, SqliteStore};

const COLUMNS: &str = "id, idempotency_key, host_id, image_id, role, flagged_ms, reasons, state, \
     dry_run, created_ms, updated_ms, triggered_ms, finished_ms, attempts, next_attempt_ms, \
     last_error, decided_by, decision_reason, note, payload";

type Row = (RebuildAction, String, String);

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok((
        RebuildAction {
            id: r.get(0)?,
            idempotency_key: r.get(1)?,
            host_id: r.get(2)?,
            image_id: r.get(3)?,
            role: r.get(4)?,
            flagged_ms: r.get(5)?,
            reasons: Vec::new(),
            state: ActionState::Pending,
            dry_run: r.get(8)?,
            created_ms: r.get(9)?,
            updated_ms: r.get(10)?,
            triggered_ms: r.get(11)?,
            finished_ms: r.get(12)?,
            attempts: u32::try_from(r.get::<_, i64>(13)?).unwrap_or(u32::MAX),
            next_attempt_ms: r.get(14)?,
            last_error: r.get(15)?,
            decided_by: r.get(16)?,
            decision_reason: r.get(17)?,
            note: r.get(18)?,
            payload: r.get(19)?,
        },
        r.get(6)?,
        r.get(7)?,
    ))
}

fn finish((mut a, reasons, state): Row) -> Result<RebuildAction, StorageError> {
    a.reasons = reasons_from_json(&reasons)?;
    a.state = state_from_name(&state)?;
    Ok(a)
}

fn query(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<RebuildAction>, StorageError> {
    let mut stmt = tx.prepare_cached(sql).db()?;
    let rows = stmt
        .query_map(params, from_row)
        .db()?
        .collect::<Result<Vec<_>, _>>()
        .db()?;
    rows.into_iter().map(finish).collect()
}

fn insert_attempt(tx: &Transaction<'_>, a: &AttemptRecord) -> Result<(), StorageError> {
    tx.prepare_cached(
        "INSERT INTO rebuild_attempts (action_id, attempt, at_ms, duration_ms, delivered, \
         status, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .db()?
    .execute(params![
        a.action_id,
        a.attempt,
        a.at_ms,
        a.duration_ms,
        a.delivered,
        a.status,
        a.detail
    ])
    .db()?;
    Ok(())
}

/// SQLite's dispatch lock: always granted (see the module doc).
#[derive(Debug)]
struct ProcessLock;

impl DispatchLock for ProcessLock {
    fn try_acquire(&mut self) -> StoreFuture<'_, bool> {
        Box::pin(async { Ok(true) })
    }
    fn release(&mut self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

impl ActionStore for SqliteStore {
    fn create_action(&self, a: RebuildAction, audit: AuditEntry) -> StoreFuture<'_, bool> {
        self.write(move |tx| {
            let n = tx
                .prepare_cached(&format!(
                    "INSERT INTO rebuild_actions ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, \
                     ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20) \
                     ON CONFLICT (idempotency_key) DO NOTHING"
                ))
                .db()?
                .execute(params![
                    a.id,
                    a.idempotency_key,
                    a.host_id,
                    a.image_id,
                    a.role,
                    a.flagged_ms,
                    reasons_to_json(&a.reasons),
                    a.state.name(),
                    a.dry_run,
                    a.created_ms,
                    a.updated_ms,
                    a.triggered_ms,
                    a.finished_ms,
                    a.attempts,
                    a.next_attempt_ms,
                    a.last_error,
                    a.decided_by,
                    a.decision_reason,
                    a.note,
                    a.payload
                ])
                .db()?;
            if n == 0 {
                return Ok(false);
            }
            super::audit::append_tx(tx, &audit)?;
            Ok(true)
        })
    }

    fn update_action(
        &self,
        expected: ActionState,
        a: RebuildAction,
        attempt: Option<AttemptRecord>,
        audit: AuditEntry,
    ) -> StoreFuture<'_, bool> {
        self.write(move |tx| {
            let n = tx
                .prepare_cached(
                    "UPDATE rebuild_actions SET state = ?3, updated_ms = ?4, triggered_ms = ?5, \
                     finished_ms = ?6, attempts = ?7, next_attempt_ms = ?8, last_error = ?9, \
                     decided_by = ?10, decision_reason = ?11, note = ?12, payload = ?13, \
                     reasons = ?14 \
                     WHERE id = ?1 AND state = ?2",
                )
                .db()?
                .execute(params![
                    a.id,
                    expected.name(),
                    a.state.name(),
                    a.updated_ms,
                    a.triggered_ms,
                    a.finished_ms,
                    a.attempts,
                    a.next_attempt_ms,
                    a.last_error,
                    a.decided_by,
                    a.decision_reason,
                    a.note,
                    a.payload,
                    reasons_to_json(&a.reasons)
                ])
                .db()?;
            if n == 0 {
                return Ok(false);
            }
            if let Some(at) = &attempt {
                insert_attempt(tx, at)?;
            }
            super::audit::append_tx(tx, &audit)?;
            Ok(true)
        })
    }

    fn action(&self, id: &str) -> StoreFuture<'_, Option<RebuildAction>> {
        let id = id.to_owned();
        self.read(move |tx| {
            tx.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM rebuild_actions WHERE id = ?1"
            ))
            .db()?
            .query_row([&id], from_row)
            .optional()
            .db()?
            .map(finish)
            .transpose()
        })
    }

    fn list_actions(&self, f: ActionFilter) -> StoreFuture<'_, Vec<RebuildAction>> {
        self.read(move |tx| {
            let state = f.state.map(ActionState::name);
            query(
                tx,
                &format!(
                    "SELECT {COLUMNS} FROM rebuild_actions \
                     WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR host_id = ?2) \
                     ORDER BY created_ms DESC, id LIMIT ?3"
                ),
                &[&state, &f.host_id, &effective_limit(f.limit)],
            )
        })
    }

    fn action_attempts(&self, id: &str) -> StoreFuture<'_, Vec<AttemptRecord>> {
        let id = id.to_owned();
        self.read(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT action_id, attempt, at_ms, duration_ms, delivered, status, detail \
                     FROM rebuild_attempts WHERE action_id = ?1 ORDER BY attempt",
                )
                .db()?;
            let rows = stmt
                .query_map([&id], |r| {
                    Ok(AttemptRecord {
                        action_id: r.get(0)?,
                        attempt: r.get(1)?,
                        at_ms: r.get(2)?,
                        duration_ms: r.get(3)?,
                        delivered: r.get(4)?,
                        status: r.get(5)?,
                        detail: r.get(6)?,
                    })
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            Ok(rows)
        })
    }

    fn dispatch_view(
        &self,
        keys: Vec<String>,
        triggered_since_ms: i64,
    ) -> StoreFuture<'_, Vec<RebuildAction>> {
        self.read(move |tx| {
            let keys = serde_json::to_string(&keys)
                .map_err(|e| StorageError::InvalidArgument(e.to_string()))?;
            let open = serde_json::to_string(&open_state_names())
                .map_err(|e| StorageError::InvalidArgument(e.to_string()))?;
            query(
                tx,
                &format!(
                    "SELECT {COLUMNS} FROM rebuild_actions \
                     WHERE state IN (SELECT value FROM json_each(?3)) \
                        OR idempotency_key IN (SELECT value FROM json_each(?1)) \
                        OR triggered_ms >= ?2 \
                     ORDER BY created_ms, id"
                ),
                &[&keys, &triggered_since_ms, &open],
            )
        })
    }

    fn dispatch_lock(&self) -> StoreFuture<'_, Box<dyn DispatchLock>> {
        Box::pin(async { Ok(Box::new(ProcessLock) as Box<dyn DispatchLock>) })
    }
}
