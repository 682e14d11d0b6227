//! `LifecycleStore` and `RegistryStore` on SQLite: writes on the writer thread in one
//! `BEGIN IMMEDIATE` transaction per call, a batch of transitions included (so the
//! compare-and-set of a transition and the version check of a push see no concurrent writer),
//! reads on the reader thread.

use driftwatch_proto::v1::DriftItem;
use prost::Message;
use rusqlite::{OptionalExtension, Transaction, params};

use super::super::DEFAULT_SEARCH_LIMIT;
use super::super::audit::AuditEntry;
use super::super::lifecycle::{
    AckRequest, Acknowledgement, HostLifecycle, LifecycleStore, OpenForAck, TransitionRecord,
    check_transition, match_acks, parse_state,
};
use super::super::registry::{RegisteredBaseline, RegistryStore, check_newer, sort_newest_first};
use super::super::{StorageError, StoreFuture};
use super::{Db, SqliteStore, audit, blob32, host_pk};
use crate::lifecycle::Lifecycle;

/// The host's current state (`enrolled` without a row).
fn current_state(tx: &Transaction<'_>, pk: i64) -> Result<Lifecycle, StorageError> {
    let s: Option<String> = tx
        .prepare_cached("SELECT state FROM host_lifecycle WHERE host_pk = ?1")
        .db()?
        .query_row([pk], |r| r.get(0))
        .optional()
        .db()?;
    s.map_or(Ok(Lifecycle::Enrolled), |s| {
        parse_state("host_lifecycle", &s)
    })
}

/// One compare-and-set transition with its audit record, inside the caller's transaction.
fn record_one(
    tx: &Transaction<'_>,
    t: &TransitionRecord,
    audit: &AuditEntry,
) -> Result<bool, StorageError> {
    let pk = host_pk(tx, &t.host_id)?;
    if current_state(tx, pk)? != t.from {
        return Ok(false);
    }
    tx.prepare_cached(
        "INSERT INTO host_lifecycle (host_pk, state, since_ms) VALUES (?1, ?2, ?3) \
         ON CONFLICT (host_pk) DO UPDATE SET state = excluded.state, \
         since_ms = excluded.since_ms",
    )
    .db()?
    .execute(params![pk, t.to.name(), t.at_ms])
    .db()?;
    tx.prepare_cached(
        "INSERT INTO host_transitions (host_pk, from_state, to_state, at_ms, cause, actor) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .db()?
    .execute(params![
        pk,
        t.from.name(),
        t.to.name(),
        t.at_ms,
        t.cause,
        t.actor
    ])
    .db()?;
    audit::append_tx(tx, audit)?;
    Ok(true)
}

impl LifecycleStore for SqliteStore {
    fn lifecycle_states(&self) -> StoreFuture<'_, Vec<HostLifecycle>> {
        self.read(|tx| {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT h.host_id, l.state, coalesce(l.since_ms, h.enrolled_ms), \
                     (SELECT value FROM host_labels WHERE host_pk = h.pk AND key = 'role'), \
                     h.image_id, h.enrolled_ms \
                     FROM hosts h LEFT JOIN host_lifecycle l ON l.host_pk = h.pk \
                     ORDER BY h.host_id",
                )
                .db()?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, i64>(5)?,
                    ))
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            rows.into_iter()
                .map(|(host_id, state, since_ms, role, image_id, enrolled_ms)| {
                    Ok(HostLifecycle {
                        host_id,
                        state: state.map_or(Ok(Lifecycle::Enrolled), |s| {
                            parse_state("host_lifecycle", &s)
                        })?,
                        since_ms,
                        role,
                        image_id,
                        enrolled_ms,
                    })
                })
                .collect()
        })
    }

    fn record_transitions(
        &self,
        moves: Vec<(TransitionRecord, AuditEntry)>,
    ) -> StoreFuture<'_, Vec<bool>> {
        self.write(move |tx| {
            for (t, _) in &moves {
                check_transition(t)?;
            }
            let mut recorded = Vec::with_capacity(moves.len());
            for (t, audit) in &moves {
                recorded.push(record_one(tx, t, audit)?);
            }
            Ok(recorded)
        })
    }

    fn transitions(&self, host_id: &str, limit: u32) -> StoreFuture<'_, Vec<TransitionRecord>> {
        let host_id = host_id.to_owned();
        let limit = if limit == 0 {
            DEFAULT_SEARCH_LIMIT
        } else {
            limit
        };
        self.read(move |tx| {
            let pk = host_pk(tx, &host_id)?;
            let mut stmt = tx
                .prepare_cached(
                    "SELECT from_state, to_state, at_ms, cause, actor FROM host_transitions \
                     WHERE host_pk = ?1 ORDER BY id DESC LIMIT ?2",
                )
                .db()?;
            let rows = stmt
                .query_map(params![pk, limit], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            rows.into_iter()
                .map(|(from, to, at_ms, cause, actor)| {
                    Ok(TransitionRecord {
                        host_id: host_id.clone(),
                        from: parse_state("host_transitions", &from)?,
                        to: parse_state("host_transitions", &to)?,
                        at_ms,
                        cause,
                        actor,
                    })
                })
                .collect()
        })
    }

    fn acknowledge(
        &self,
        req: AckRequest,
        audit: AuditEntry,
    ) -> StoreFuture<'_, Vec<Acknowledgement>> {
        self.write(move |tx| {
            let pk = host_pk(tx, &req.host_id)?;
            let mut stmt = tx
                .prepare_cached(
                    "SELECT key, item_hash, item FROM violations \
                     WHERE host_pk = ?1 AND resolved_ms IS NULL ORDER BY key",
                )
                .db()?;
            let rows = stmt
                .query_map([pk], |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            let open = rows
                .into_iter()
                .map(|(key, hash, item)| {
                    Ok(OpenForAck {
                        key,
                        item_hash: blob32("violations", hash)?,
                        item: DriftItem::decode(item.as_slice()).map_err(|e| {
                            StorageError::Corrupt {
                                table: "violations",
                                detail: e.to_string(),
                            }
                        })?,
                    })
                })
                .collect::<Result<Vec<_>, StorageError>>()?;
            let acks = match_acks(&req, &open)?;
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO violation_acks (host_pk, key, item_hash, path, package, reason, \
                     actor, at_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )
                .db()?;
            for a in &acks {
                insert
                    .execute(params![
                        pk,
                        a.key,
                        a.item_hash,
                        a.path,
                        a.package,
                        a.reason,
                        a.actor,
                        a.at_ms,
                        a.expires_ms
                    ])
                    .db()?;
            }
            audit::append_tx(tx, &audit)?;
            Ok(acks)
        })
    }

    fn acknowledgements(
        &self,
        host_id: Option<&str>,
        now_ms: i64,
    ) -> StoreFuture<'_, Vec<Acknowledgement>> {
        let host_id = host_id.map(str::to_owned);
        self.read(move |tx| {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT h.host_id, a.key, a.item_hash, a.path, a.package, a.reason, a.actor, \
                     a.at_ms, a.expires_ms FROM violation_acks a JOIN hosts h ON h.pk = a.host_pk \
                     WHERE a.expires_ms > ?1 AND (?2 IS NULL OR h.host_id = ?2) ORDER BY a.id",
                )
                .db()?;
            let rows = stmt
                .query_map(params![now_ms, host_id], |r| {
                    Ok((
                        Acknowledgement {
                            host_id: r.get(0)?,
                            key: r.get(1)?,
                            item_hash: [0; 32],
                            path: r.get(3)?,
                            package: r.get(4)?,
                            reason: r.get(5)?,
                            actor: r.get(6)?,
                            at_ms: r.get(7)?,
                            expires_ms: r.get(8)?,
                        },
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            rows.into_iter()
                .map(|(mut a, hash)| {
                    a.item_hash = blob32("violation_acks", hash)?;
                    Ok(a)
                })
                .collect()
        })
    }
}

impl RegistryStore for SqliteStore {
    fn register_baseline(&self, b: RegisteredBaseline, audit: AuditEntry) -> StoreFuture<'_, ()> {
        self.write(move |tx| {
            let versions = tx
                .prepare_cached("SELECT image_version FROM image_baselines WHERE image_id = ?1")
                .db()?
                .query_map([&b.image_id], |r| r.get::<_, String>(0))
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            check_newer(&b, &versions)?;
            tx.prepare_cached(
                "INSERT INTO image_baselines (image_id, image_version, merkle_root, signer, \
                 created_unix, expires_unix, entry_count, pushed_ms, actor) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )
            .db()?
            .execute(params![
                b.image_id,
                b.image_version,
                b.merkle_root,
                b.signer,
                b.created_unix,
                b.expires_unix,
                i64::try_from(b.entry_count).unwrap_or(i64::MAX),
                b.pushed_ms,
                b.actor
            ])
            .db()?;
            audit::append_tx(tx, &audit)?;
            Ok(())
        })
    }

    fn registered_baselines(&self) -> StoreFuture<'_, Vec<RegisteredBaseline>> {
        self.read(|tx| {
            let mut stmt = tx
                .prepare_cached(
                    "SELECT image_id, image_version, merkle_root, signer, created_unix, \
                     expires_unix, entry_count, pushed_ms, actor FROM image_baselines",
                )
                .db()?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        RegisteredBaseline {
                            image_id: r.get(0)?,
                            image_version: r.get(1)?,
                            merkle_root: [0; 32],
                            signer: r.get(3)?,
                            created_unix: r.get(4)?,
                            expires_unix: r.get(5)?,
                            entry_count: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                            pushed_ms: r.get(7)?,
                            actor: r.get(8)?,
                        },
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .db()?
                .collect::<Result<Vec<_>, _>>()
                .db()?;
            let mut out = rows
                .into_iter()
                .map(|(mut b, root)| {
                    b.merkle_root = blob32("image_baselines", root)?;
                    Ok(b)
                })
                .collect::<Result<Vec<_>, StorageError>>()?;
            sort_newest_first(&mut out);
            Ok(out)
        })
    }
}
