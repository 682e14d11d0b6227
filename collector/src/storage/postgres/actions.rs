//! `ActionStore` on PostgreSQL. Writes take the writer connection, one transaction each with
//! its audit record. The dispatch lock is a session-level advisory lock
//! (`pg_try_advisory_lock`) on a connection of its own, taken for one dispatch round and
//! released after it: of several collector replicas only one dispatches at a time, and a
//! replica that dies mid-round loses its connection and with it the lock.

use tokio_postgres::{Client, Row, Transaction};

use super::super::actions::{
    ActionFilter, ActionState, ActionStore, AttemptRecord, DispatchLock, RebuildAction,
    effective_limit, open_state_names, reasons_from_json, reasons_to_json, state_from_name,
};
use super::super::audit::AuditEntry;
use super::super::{StorageError, StoreFuture};
use super::{Db, PgStore, connect_client, get};

/// Key of the dispatchers' advisory lock ("dwaction" in ASCII).
const DISPATCH_LOCK: i64 = 0x6477_6163_7469_6f6e;

const COLUMNS: &str = "id, idempotency_key, host_id, image_id, role, flagged_ms, reasons, state, \
     dry_run, created_ms, updated_ms, triggered_ms, finished_ms, attempts, next_attempt_ms, \
     last_error, decided_by, decision_reason, note, payload";

fn from_row(r: &Row) -> Result<RebuildAction, StorageError> {
    Ok(RebuildAction {
        id: get(r, 0)?,
        idempotency_key: get(r, 1)?,
        host_id: get(r, 2)?,
        image_id: get(r, 3)?,
        role: get(r, 4)?,
        flagged_ms: get(r, 5)?,
        reasons: reasons_from_json(&get::<String>(r, 6)?)?,
        state: state_from_name(&get::<String>(r, 7)?)?,
        dry_run: get(r, 8)?,
        created_ms: get(r, 9)?,
        updated_ms: get(r, 10)?,
        triggered_ms: get(r, 11)?,
        finished_ms: get(r, 12)?,
        attempts: u32::try_from(get::<i64>(r, 13)?).unwrap_or(u32::MAX),
        next_attempt_ms: get(r, 14)?,
        last_error: get(r, 15)?,
        decided_by: get(r, 16)?,
        decision_reason: get(r, 17)?,
        note: get(r, 18)?,
        payload: get(r, 19)?,
    })
}

async fn insert_attempt(tx: &Transaction<'_>, a: &AttemptRecord) -> Result<(), StorageError> {
    tx.execute(
        "INSERT INTO rebuild_attempts (action_id, attempt, at_ms, duration_ms, delivered, \
         status, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        &[
            &a.action_id,
            &i64::from(a.attempt),
            &a.at_ms,
            &a.duration_ms,
            &a.delivered,
            &a.status,
            &a.detail,
        ],
    )
    .await
    .db()?;
    Ok(())
}

/// The advisory lock on its own connection (opened on first use, reopened when lost).
struct AdvisoryLock {
    url: String,
    client: Option<Client>,
}

impl std::fmt::Debug for AdvisoryLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdvisoryLock")
            .field("connected", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

impl DispatchLock for AdvisoryLock {
    fn try_acquire(&mut self) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            if self.client.as_ref().is_none_or(Client::is_closed) {
                self.client = Some(connect_client(&self.url).await?);
            }
            let Some(c) = self.client.as_ref() else {
                return Ok(false);
            };
            let row = c
                .query_one("SELECT pg_try_advisory_lock($1)", &[&DISPATCH_LOCK])
                .await
                .db()?;
            get(&row, 0)
        })
    }

    fn release(&mut self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            if let Some(c) = self.client.as_ref()
                && let Err(e) = c
                    .execute("SELECT pg_advisory_unlock($1)", &[&DISPATCH_LOCK])
                    .await
                    .db()
            {
                // Closing the session releases the lock for certain.
                self.client = None;
                return Err(e);
            }
            Ok(())
        })
    }
}

impl ActionStore for PgStore {
    fn create_action(&self, a: RebuildAction, audit: AuditEntry) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            let n = tx
                .execute(
                    &format!(
                        "INSERT INTO rebuild_actions ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, \
                         $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
                         ON CONFLICT (idempotency_key) DO NOTHING"
                    ),
                    &[
                        &a.id,
                        &a.idempotency_key,
                        &a.host_id,
                        &a.image_id,
                        &a.role,
                        &a.flagged_ms,
                        &reasons_to_json(&a.reasons),
                        &a.state.name(),
                        &a.dry_run,
                        &a.created_ms,
                        &a.updated_ms,
                        &a.triggered_ms,
                        &a.finished_ms,
                        &i64::from(a.attempts),
                        &a.next_attempt_ms,
                        &a.last_error,
                        &a.decided_by,
                        &a.decision_reason,
                        &a.note,
                        &a.payload,
                    ],
                )
                .await
                .db()?;
            if n == 0 {
                return Ok(false);
            }
            super::audit::append_tx(&tx, &audit).await?;
            tx.commit().await.db()?;
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
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            let n = tx
                .execute(
                    "UPDATE rebuild_actions SET state = $3, updated_ms = $4, triggered_ms = $5, \
                     finished_ms = $6, attempts = $7, next_attempt_ms = $8, last_error = $9, \
                     decided_by = $10, decision_reason = $11, note = $12, payload = $13, \
                     reasons = $14 \
                     WHERE id = $1 AND state = $2",
                    &[
                        &a.id,
                        &expected.name(),
                        &a.state.name(),
                        &a.updated_ms,
                        &a.triggered_ms,
                        &a.finished_ms,
                        &i64::from(a.attempts),
                        &a.next_attempt_ms,
                        &a.last_error,
                        &a.decided_by,
                        &a.decision_reason,
                        &a.note,
                        &a.payload,
                        &reasons_to_json(&a.reasons),
                    ],
                )
                .await
                .db()?;
            if n == 0 {
                return Ok(false);
            }
            if let Some(at) = &attempt {
                insert_attempt(&tx, at).await?;
            }
            super::audit::append_tx(&tx, &audit).await?;
            tx.commit().await.db()?;
            Ok(true)
        })
    }

    fn action(&self, id: &str) -> StoreFuture<'_, Option<RebuildAction>> {
        let id = id.to_owned();
        Box::pin(async move {
            let c = self.reader().await?;
            c.query_opt(
                &format!("SELECT {COLUMNS} FROM rebuild_actions WHERE id = $1"),
                &[&id],
            )
            .await
            .db()?
            .as_ref()
            .map(from_row)
            .transpose()
        })
    }

    fn list_actions(&self, f: ActionFilter) -> StoreFuture<'_, Vec<RebuildAction>> {
        Box::pin(async move {
            let state = f.state.map(ActionState::name);
            let c = self.reader().await?;
            c.query(
                &format!(
                    "SELECT {COLUMNS} FROM rebuild_actions \
                     WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR host_id = $2) \
                     ORDER BY created_ms DESC, id LIMIT $3"
                ),
                &[&state, &f.host_id, &effective_limit(f.limit)],
            )
            .await
            .db()?
            .iter()
            .map(from_row)
            .collect()
        })
    }

    fn action_attempts(&self, id: &str) -> StoreFuture<'_, Vec<AttemptRecord>> {
        let id = id.to_owned();
        Box::pin(async move {
            let c = self.reader().await?;
            c.query(
                "SELECT action_id, attempt, at_ms, duration_ms, delivered, status, detail \
                 FROM rebuild_attempts WHERE action_id = $1 ORDER BY attempt",
                &[&id],
            )
            .await
            .db()?
            .iter()
            .map(|r| {
                Ok(AttemptRecord {
                    action_id: get(r, 0)?,
                    attempt: u32::try_from(get::<i64>(r, 1)?).unwrap_or(u32::MAX),
                    at_ms: get(r, 2)?,
                    duration_ms: get(r, 3)?,
                    delivered: get(r, 4)?,
                    status: get(r, 5)?,
                    detail: get(r, 6)?,
                })
            })
            .collect()
        })
    }

    fn dispatch_view(
        &self,
        keys: Vec<String>,
        triggered_since_ms: i64,
    ) -> StoreFuture<'_, Vec<RebuildAction>> {
        Box::pin(async move {
            let open: Vec<&str> = open_state_names();
            let c = self.reader().await?;
            c.query(
                &format!(
                    "SELECT {COLUMNS} FROM rebuild_actions \
                     WHERE state = ANY($1::text[]) OR idempotency_key = ANY($2::text[]) \
                        OR triggered_ms >= $3 \
                     ORDER BY created_ms, id"
                ),
                &[&open, &keys, &triggered_since_ms],
            )
            .await
            .db()?
            .iter()
            .map(from_row)
            .collect()
        })
    }

    fn dispatch_lock(&self) -> StoreFuture<'_, Box<dyn DispatchLock>> {
        Box::pin(async move {
            Ok(Box::new(AdvisoryLock {
                url: self.url.clone(),
                client: None,
            }) as Box<dyn DispatchLock>)
        })
    }
}
