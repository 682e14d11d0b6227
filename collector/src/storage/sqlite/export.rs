//! `ExportStore` for SQLite: time-ordered pages over the indexes of migration 0004.

use driftwatch_proto::v1::DriftItem;
use prost::Message;
use rusqlite::{OptionalExtension, params};

use super::audit::{RECORD_COLUMNS, record_from_row};
use super::{Db, SqliteStore};
use crate::storage::export::{
    ExportCursor, ExportSecurityEvent, ExportStore, ExportViolation, RowPosition, ViolationEdge,
    page_limit,
};
use crate::storage::{AuditRecord, SecurityEvent, StorageError, StoreFuture, ViolationRecord};

fn violations_sql(edge: ViolationEdge) -> &'static str {
    // Written out per edge (not formatted) so both are cached prepared statements. The
    // position test is split so SQLite can range-scan the time index.
    match edge {
        ViolationEdge::Opened => {
            "SELECT v.id, h.host_id, v.key, v.item, v.first_seen_ms, v.last_seen_ms, \
             v.resolved_ms FROM violations v JOIN hosts h ON h.pk = v.host_pk \
             WHERE v.first_seen_ms >= ?1 AND (v.first_seen_ms > ?1 OR v.id > ?2) \
             AND v.first_seen_ms <= ?3 ORDER BY v.first_seen_ms, v.id LIMIT ?4"
        }
        ViolationEdge::Resolved => {
            "SELECT v.id, h.host_id, v.key, v.item, v.first_seen_ms, v.last_seen_ms, \
             v.resolved_ms FROM violations v JOIN hosts h ON h.pk = v.host_pk \
             WHERE v.resolved_ms IS NOT NULL AND v.resolved_ms >= ?1 \
             AND (v.resolved_ms > ?1 OR v.id > ?2) \
             AND v.resolved_ms <= ?3 ORDER BY v.resolved_ms, v.id LIMIT ?4"
        }
    }
}

impl ExportStore for SqliteStore {
    fn export_violations(
        &self,
        edge: ViolationEdge,
        after: RowPosition,
        until_ms: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<ExportViolation>> {
        self.read(move |tx| {
            let mut stmt = tx.prepare_cached(violations_sql(edge)).db()?;
            let mut rows = stmt
                .query(params![after.at_ms, after.row, until_ms, page_limit(limit)])
                .db()?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().db()? {
                let encoded: Vec<u8> = r.get(3).db()?;
                let item =
                    DriftItem::decode(encoded.as_slice()).map_err(|e| StorageError::Corrupt {
                        table: "violations",
                        detail: format!("item: {e}"),
                    })?;
                out.push(ExportViolation {
                    row: r.get(0).db()?,
                    record: ViolationRecord {
                        host_id: r.get(1).db()?,
                        key: r.get(2).db()?,
                        item,
                        first_seen_ms: r.get(4).db()?,
                        last_seen_ms: r.get(5).db()?,
                        resolved_ms: r.get(6).db()?,
                    },
                });
            }
            Ok(out)
        })
    }

    fn export_security_events(
        &self,
        after: RowPosition,
        until_ms: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<ExportSecurityEvent>> {
        self.read(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT id, at_ms, kind, peer_host_id, detail FROM security_events \
                     WHERE at_ms >= ?1 AND (at_ms > ?1 OR id > ?2) AND at_ms <= ?3 \
                     ORDER BY at_ms, id LIMIT ?4",
                )
                .db()?;
            stmt.query_map(
                params![after.at_ms, after.row, until_ms, page_limit(limit)],
                |r| {
                    Ok(ExportSecurityEvent {
                        row: r.get(0)?,
                        event: SecurityEvent {
                            at_ms: r.get(1)?,
                            kind: r.get(2)?,
                            peer_host_id: r.get(3)?,
                            detail: r.get(4)?,
                        },
                    })
                },
            )
            .db()?
            .collect::<Result<Vec<_>, _>>()
            .db()
        })
    }

    fn export_audit(
        &self,
        after: RowPosition,
        until_ms: i64,
        limit: u32,
    ) -> StoreFuture<'_, Vec<AuditRecord>> {
        self.read(move |tx| {
            let mut stmt = tx
                .prepare_cached(&format!(
                    "SELECT {RECORD_COLUMNS} FROM audit_log \
                     WHERE at_ms >= ?1 AND (at_ms > ?1 OR seq > ?2) \
                     AND at_ms <= ?3 ORDER BY at_ms, seq LIMIT ?4"
                ))
                .db()?;
            stmt.query_map(
                params![after.at_ms, after.row, until_ms, page_limit(limit)],
                record_from_row,
            )
            .db()?
            .collect::<Result<Vec<_>, _>>()
            .db()
        })
    }

    fn export_cursor(&self, name: &str) -> StoreFuture<'_, Option<ExportCursor>> {
        let name = name.to_owned();
        self.read(move |tx| {
            tx.prepare_cached("SELECT position, saved_ms FROM export_cursors WHERE name = ?1")
                .db()?
                .query_row([name], |r| {
                    Ok(ExportCursor {
                        position: r.get(0)?,
                        saved_ms: r.get(1)?,
                    })
                })
                .optional()
                .db()
        })
    }

    fn save_export_cursor(&self, name: &str, cursor: ExportCursor) -> StoreFuture<'_, ()> {
        let name = name.to_owned();
        self.write(move |tx| {
            tx.prepare_cached(
                "INSERT INTO export_cursors (name, position, saved_ms) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET position = excluded.position, \
                 saved_ms = excluded.saved_ms",
            )
            .db()?
            .execute(params![name, cursor.position, cursor.saved_ms])
            .db()?;
            Ok(())
        })
    }
}
