//! API tokens on PostgreSQL.

use tokio_postgres::Row;

use super::super::access::{
    AccessStore, ApiToken, LAST_USED_GRANULARITY_MS, RevokeOutcome, Role, check_token_name,
};
use super::super::audit::AuditEntry;
use super::{Db, PgStore, blob32, get};
use crate::storage::{StorageError, StoreFuture};

const COLUMNS: &str =
    "id, name, role, secret_sha256, created_ms, expires_ms, revoked_ms, last_used_ms, created_by";

fn from_row(r: &Row) -> Result<ApiToken, StorageError> {
    let role: String = get(r, 2)?;
    Ok(ApiToken {
        id: get(r, 0)?,
        name: get(r, 1)?,
        role: role.parse::<Role>().map_err(|e| StorageError::Corrupt {
            table: "api_tokens",
            detail: e.to_string(),
        })?,
        secret_sha256: blob32("api_tokens", get(r, 3)?)?,
        created_ms: get(r, 4)?,
        expires_ms: get(r, 5)?,
        revoked_ms: get(r, 6)?,
        last_used_ms: get(r, 7)?,
        created_by: get(r, 8)?,
    })
}

impl AccessStore for PgStore {
    fn create_api_token(&self, token: ApiToken, audit: AuditEntry) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            check_token_name(&token.name)?;
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            let inserted = tx
                .execute(
                    &format!(
                        "INSERT INTO api_tokens ({COLUMNS}) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING"
                    ),
                    &[
                        &token.id,
                        &token.name,
                        &token.role.name(),
                        &token.secret_sha256.as_slice(),
                        &token.created_ms,
                        &token.expires_ms,
                        &token.revoked_ms,
                        &token.last_used_ms,
                        &token.created_by,
                    ],
                )
                .await
                .db()?;
            if inserted == 0 {
                return Err(StorageError::InvalidArgument(format!(
                    "an API token with id {} exists already",
                    token.id
                )));
            }
            super::audit::append_tx(&tx, &audit).await?;
            tx.commit().await.db()
        })
    }

    fn list_api_tokens(&self) -> StoreFuture<'_, Vec<ApiToken>> {
        Box::pin(async move {
            let c = self.reader().await?;
            c.query(
                &format!("SELECT {COLUMNS} FROM api_tokens ORDER BY created_ms, id"),
                &[],
            )
            .await
            .db()?
            .iter()
            .map(from_row)
            .collect()
        })
    }

    fn api_token_by_hash(&self, secret_sha256: [u8; 32]) -> StoreFuture<'_, Option<ApiToken>> {
        Box::pin(async move {
            let c = self.reader().await?;
            c.query_opt(
                &format!("SELECT {COLUMNS} FROM api_tokens WHERE secret_sha256 = $1"),
                &[&secret_sha256.as_slice()],
            )
            .await
            .db()?
            .as_ref()
            .map(from_row)
            .transpose()
        })
    }

    fn revoke_api_token(
        &self,
        id: &str,
        now_ms: i64,
        audit: AuditEntry,
    ) -> StoreFuture<'_, RevokeOutcome> {
        let id = id.to_owned();
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            let row = tx
                .query_opt(
                    "SELECT revoked_ms FROM api_tokens WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await
                .db()?;
            let Some(row) = row else {
                return Ok(RevokeOutcome::NotFound);
            };
            if let Some(at) = get::<Option<i64>>(&row, 0)? {
                return Ok(RevokeOutcome::AlreadyRevoked(at));
            }
            tx.execute(
                "UPDATE api_tokens SET revoked_ms = $2 WHERE id = $1",
                &[&id, &now_ms],
            )
            .await
            .db()?;
            super::audit::append_tx(&tx, &audit).await?;
            tx.commit().await.db()?;
            Ok(RevokeOutcome::Revoked)
        })
    }

    fn touch_api_token(&self, id: &str, now_ms: i64) -> StoreFuture<'_, ()> {
        let id = id.to_owned();
        Box::pin(async move {
            // The reader connection: a single autocommit UPDATE needs no transaction, and the
            // writer stays free for report batches.
            let c = self.reader().await?;
            c.execute(
                "UPDATE api_tokens SET last_used_ms = $2 WHERE id = $1 \
                 AND (last_used_ms IS NULL OR last_used_ms <= $3)",
                &[
                    &id,
                    &now_ms,
                    &now_ms.saturating_sub(LAST_USED_GRANULARITY_MS),
                ],
            )
            .await
            .db()?;
            Ok(())
        })
    }
}
