//! `ExportStore` for PostgreSQL: time-ordered pages over the indexes of migration 0004, on the
//! reader connection (one repeatable-read snapshot per page).

use driftwatch_proto::v1::DriftItem;
use prost::Message;

use super::audit::{RECORD_COLUMNS, record_from_row};
use super::{Db, PgStore, get};
use crate::storage::export::{
    ExportCursor, ExportSecurityEvent, ExportStore, ExportViolation, RowPosition, ViolationEdge,
    page_limit,
};
use crate::storage::{AuditRecord, SecurityEvent, StorageError, StoreFuture, ViolationRecord};

fn violations_sql(edge: ViolationEdge) -> &'static str {
    match edge {
        ViolationEdge::Opened => {
            "SELECT v.id, h.host_id, v.key, v.item, v.first_seen_ms, v.last_seen_ms, \
             v.resolved_ms FROM violations v JOIN hosts h ON h.pk = v.host_pk \
             WHERE (v.first_seen_ms, v.id) > ($1, $2) AND v.first_seen_ms <= $3 \
             ORDER BY v.first_seen_ms, v.id LIMIT $4"
        }
        ViolationEdge::Resolved => {
            "SELECT v.id, h.host_id, v.key, v.item, v.first_seen_ms, v.last_seen_ms, \
             v.resolved_ms FROM violations v JOIN hosts h ON h.pk = v.host_pk \
             WHERE v.resolved_ms IS NOT NULL AND (v.resolved_ms, v.id) > ($1, $2) \
             AND v.resolved_ms <= $3 ORDER BY v.resolved_ms, v.id LIMIT $4"
        }
    }
}

impl ExportStore for PgStore {
    fn export_violations(
        &self,
        edge: ViolationEdge,
        after: RowPosition,
        until_ms: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<ExportViolation>> {
        Box::pin(async move {
            let c = self.reader().await?;
            let rows = c
                .query(
                    violations_sql(edge),
                    &[&after.at_ms, &after.row, &until_ms, &page_limit(limit)],
                )
                .await
                .db()?;
            rows.iter()
                .map(|r| {
                    let encoded: Vec<u8> = get(r, 3)?;
                    let item = DriftItem::decode(encoded.as_slice()).map_err(|e| {
                        StorageError::Corrupt {
                            table: "violations",
                            detail: format!("item: {e}"),
                        }
                    })?;
                    Ok(ExportViolation {
                        row: get(r, 0)?,
                        record: ViolationRecord {
                            host_id: get(r, 1)?,
                            key: get(r, 2)?,
                            item,
                            first_seen_ms: get(r, 4)?,
                            last_seen_ms: get(r, 5)?,
                            resolved_ms: get(r, 6)?,
                        },
                    })
                })
                .collect()
        })
    }

    fn export_security_events(
        &self,
        after: RowPosition,
        until_ms: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<ExportSecurityEvent>> {
        Box::pin(async move {
            let c = self.reader().await?;
            c.query(
                "SELECT id, at_ms, kind, peer_host_id, detail FROM security_events \
                 WHERE (at_ms, id) > ($1, $2) AND at_ms <= $3 ORDER BY at_ms, id LIMIT $4",
                &[&after.at_ms, &after.row, &until_ms, &page_limit(limit)],
            )
            .await
            .db()?
            .iter()
            .map(|r| {
                Ok(ExportSecurityEvent {
                    row: get(r, 0)?,
                    event: SecurityEvent {
                        at_ms: get(r, 1)?,
                        kind: get(r, 2)?,
                        peer_host_id: get(r, 3)?,
                        detail: get(r, 4)?,
                    },
                })
            })
            .collect()
        })
    }

    fn export_audit(
        &self,
        after: RowPosition,
        until_ms: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<AuditRecord>> {
        Box::pin(async move {
            let c = self.reader().await?;
            c.query(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM audit_log \
                     WHERE (at_ms, seq) > ($1, $2) AND at_ms <= $3 \
                     ORDER BY at_ms, seq LIMIT $4"
                ),
                &[&after.at_ms, &after.row, &until_ms, &page_limit(limit)],
            )
            .await
            .db()?
            .iter()
            .map(record_from_row)
            .collect()
        })
    }

    fn export_cursor(&self, name: &str) -> StoreFuture<'_, Option<ExportCursor>> {
        let name = name.to_owned();
        Box::pin(async move {
            let c = self.reader().await?;
            match c
                .query_opt(
                    "SELECT position, saved_ms FROM export_cursors WHERE name = $1",
                    &[&name],
                )
                .await
                .db()?
            {
                None => Ok(None),
                Some(r) => Ok(Some(ExportCursor {
                    position: get(&r, 0)?,
                    saved_ms: get(&r, 1)?,
                })),
            }
        })
    }

    fn save_export_cursor(&self, name: &str, cursor: ExportCursor) -> StoreFuture<'_, ()> {
        let name = name.to_owned();
        Box::pin(async move {
            let w = self.writer().await?;
            w.client
                .execute(
                    "INSERT INTO export_cursors (name, position, saved_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (name) DO UPDATE SET position = EXCLUDED.position, \
                     saved_ms = EXCLUDED.saved_ms",
                    &[&name, &cursor.position, &cursor.saved_ms],
                )
                .await
                .db()?;
            Ok(())
        })
    }
}
