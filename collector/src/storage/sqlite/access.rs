//! API tokens on SQLite.

use rusqlite::{OptionalExtension, Row, Transaction, params};

use super::super::access::{
    AccessStore, ApiToken, LAST_USED_GRANULARITY_MS, RevokeOutcome, Role, check_token_name,
};
use super::super::audit::AuditEntry;
use super::{Db, SqliteStore};
use crate::storage::{StorageError, StoreFuture};

const COLUMNS: &str =
    "id, name, role, secret_sha256, created_ms, expires_ms, revoked_ms, last_used_ms, created_by";

type RawRow = (
    String,
    String,
    String,
    Vec<u8>,
    i64,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    String,
);

fn raw(r: &Row<'_>) -> rusqlite::Result<RawRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
    ))
}

fn finish(r: RawRow) -> Result<ApiToken, StorageError> {
    let (id, name, role, hash, created_ms, expires_ms, revoked_ms, last_used_ms, created_by) = r;
    let corrupt = |detail: String| StorageError::Corrupt {
        table: "api_tokens",
        detail,
    };
    Ok(ApiToken {
        role: role.parse::<Role>().map_err(|e| corrupt(e.to_string()))?,
        secret_sha256: <[u8; 32]>::try_from(hash)
            .map_err(|h| corrupt(format!("hash of {} bytes", h.len())))?,
        id,
        name,
        created_ms,
        expires_ms,
        revoked_ms,
        last_used_ms,
        created_by,
    })
}

fn by_id(tx: &Transaction<'_>, id: &str) -> Result<Option<ApiToken>, StorageError> {
    tx.prepare_cached(&format!("SELECT {COLUMNS} FROM api_tokens WHERE id = ?1"))
        .db()?
        .query_row([id], raw)
        .optional()
        .db()?
        .map(finish)
        .transpose()
}

impl AccessStore for SqliteStore {
    fn create_api_token(&self, token: ApiToken, audit: AuditEntry) -> StoreFuture<'_, ()> {
        self.write(move |tx| {
            check_token_name(&token.name)?;
            let taken: Option<String> = tx
                .prepare_cached("SELECT id FROM api_tokens WHERE id = ?1 OR secret_sha256 = ?2")
                .db()?
                .query_row(params![token.id, token.secret_sha256], |r| r.get(0))
                .optional()
                .db()?;
            if let Some(id) = taken {
                return Err(StorageError::InvalidArgument(format!(
                    "an API token with id {id} exists already"
                )));
            }
            tx.prepare_cached(&format!(
                "INSERT INTO api_tokens ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ))
            .db()?
            .execute(params![
                token.id,
                token.name,
                token.role.name(),
                token.secret_sha256,
                token.created_ms,
                token.expires_ms,
                token.revoked_ms,
                token.last_used_ms,
                token.created_by
            ])
            .db()?;
            super::audit::append_tx(tx, &audit)?;
            Ok(())
        })
    }

    fn list_api_tokens(&self) -> StoreFuture<'_, Vec<ApiToken>> {
        self.read(|tx| {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM api_tokens ORDER BY created_ms, id"
                ))
                .db()?;
            let rows = stmt
                .query_map([], raw)
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            rows.into_iter().map(finish).collect()
        })
    }

    fn api_token_by_hash(&self, secret_sha256: [u8; 32]) -> StoreFuture<'_, Option<ApiToken>> {
        self.read(move |tx| {
            tx.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM api_tokens WHERE secret_sha256 = ?1"
            ))
            .db()?
            .query_row([secret_sha256.as_slice()], raw)
            .optional()
            .db()?
            .map(finish)
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
        self.write(move |tx| {
            let Some(token) = by_id(tx, &id)? else {
                return Ok(RevokeOutcome::NotFound);
            };
            if let Some(at) = token.revoked_ms {
                return Ok(RevokeOutcome::AlreadyRevoked(at));
            }
            tx.prepare_cached("UPDATE api_tokens SET revoked_ms = ?2 WHERE id = ?1")
                .db()?
                .execute(params![id, now_ms])
                .db()?;
            super::audit::append_tx(tx, &audit)?;
            Ok(RevokeOutcome::Revoked)
        })
    }

    fn touch_api_token(&self, id: &str, now_ms: i64) -> StoreFuture<'_, ()> {
        let id = id.to_owned();
        self.write(move |tx| {
            tx.prepare_cached(
                "UPDATE api_tokens SET last_used_ms = ?2 WHERE id = ?1 \
                 AND (last_used_ms IS NULL OR last_used_ms <= ?3)",
            )
            .db()?
            .execute(params![
                id,
                now_ms,
                now_ms.saturating_sub(LAST_USED_GRANULARITY_MS)
            ])
            .db()?;
            Ok(())
        })
    }
}
