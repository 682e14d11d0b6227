//! `LifecycleStore` and `RegistryStore` on PostgreSQL. Transition batches take one
//! transaction-scoped advisory lock ([`LIFECYCLE_LOCK`]) before the compare-and-set, so two
//! replicas' reconcilers (or a reconciler and the dispatcher) cannot both move the same host,
//! and no host row is locked: report batches, which lock their host rows, never wait for a
//! transition batch nor it for them. A push locks the registry table against concurrent pushes
//! (rare) before its version check.

use std::collections::{BTreeMap, HashMap};

use driftwatch_proto::v1::DriftItem;
use prost::Message;

use super::super::DEFAULT_SEARCH_LIMIT;
use super::super::audit::AuditEntry;
use super::super::lifecycle::{
    AckRequest, Acknowledgement, HostLifecycle, LifecycleStore, OpenForAck, TransitionRecord,
    check_transition, match_acks, parse_state,
};
use super::super::registry::{RegisteredBaseline, RegistryStore, check_newer, sort_newest_first};
use super::super::{StorageError, StoreFuture};
use super::{Db, PgStore, audit, blob32, get};
use crate::lifecycle::Lifecycle;

/// Serialises lifecycle writes across connections and replicas ("dwlifecy").
const LIFECYCLE_LOCK: i64 = 0x6477_6c69_6665_6379;

fn state_or_enrolled(table: &'static str, s: Option<String>) -> Result<Lifecycle, StorageError> {
    s.map_or(Ok(Lifecycle::Enrolled), |s| parse_state(table, &s))
}

fn ack_from_row(r: &tokio_postgres::Row) -> Result<Acknowledgement, StorageError> {
    Ok(Acknowledgement {
        host_id: get(r, 0)?,
        key: get(r, 1)?,
        item_hash: blob32("violation_acks", get(r, 2)?)?,
        path: get(r, 3)?,
        package: get(r, 4)?,
        reason: get(r, 5)?,
        actor: get(r, 6)?,
        at_ms: get(r, 7)?,
        expires_ms: get(r, 8)?,
    })
}

impl LifecycleStore for PgStore {
    fn lifecycle_states(&self) -> StoreFuture<'_, Vec<HostLifecycle>> {
        Box::pin(async move {
            let c = self.reader().await?;
            let rows = c
                .query(
                    "SELECT h.host_id, l.state, coalesce(l.since_ms, h.enrolled_ms), \
                     (SELECT value FROM host_labels WHERE host_pk = h.pk AND key = 'role'), \
                     h.image_id, h.enrolled_ms \
                     FROM hosts h LEFT JOIN host_lifecycle l ON l.host_pk = h.pk \
                     ORDER BY h.host_id",
                    &[],
                )
                .await
                .db()?;
            rows.iter()
                .map(|r| {
                    Ok(HostLifecycle {
                        host_id: get(r, 0)?,
                        state: state_or_enrolled("host_lifecycle", get(r, 1)?)?,
                        since_ms: get(r, 2)?,
                        role: get(r, 3)?,
                        image_id: get(r, 4)?,
                        enrolled_ms: get(r, 5)?,
                    })
                })
                .collect()
        })
    }

    fn record_transitions(
        &self,
        moves: Vec<(TransitionRecord, AuditEntry)>,
    ) -> StoreFuture<'_, Vec<bool>> {
        Box::pin(async move {
            for (t, _) in &moves {
                check_transition(t)?;
            }
            if moves.is_empty() {
                return Ok(Vec::new());
            }
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            // Every lifecycle write takes this lock first, so the states read after it are
            // current until the commit. Host rows are deliberately not locked: a batch of ~200
            // moves locking them one by one behind in-flight report batches (which lock theirs)
            // held up every lane for 0.4-1.7 s (issue 4's ack latency). The inserts below only
            // take FOR KEY SHARE on host rows (foreign keys), which report batches' FOR NO KEY
            // UPDATE does not conflict with.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LIFECYCLE_LOCK])
                .await
                .db()?;
            let ids: Vec<&str> = moves.iter().map(|(t, _)| t.host_id.as_str()).collect();
            let rows = tx
                .query(
                    "SELECT h.host_id, h.pk, l.state FROM hosts h \
                     LEFT JOIN host_lifecycle l ON l.host_pk = h.pk \
                     WHERE h.host_id = ANY($1::text[])",
                    &[&ids],
                )
                .await
                .db()?;
            let mut hosts: HashMap<String, (i64, Lifecycle)> = HashMap::with_capacity(rows.len());
            for r in &rows {
                let state = state_or_enrolled("host_lifecycle", get(r, 2)?)?;
                hosts.insert(get(r, 0)?, (get(r, 1)?, state));
            }
            // Compare-and-set in order (a host may move twice in one batch), then write every
            // accepted move in a fixed number of array statements: the host rows stay locked
            // for a few round trips, not a few per move.
            let mut recorded = Vec::with_capacity(moves.len());
            let mut accepted: Vec<(i64, &TransitionRecord, &AuditEntry)> = Vec::new();
            for (t, audit) in &moves {
                let (pk, state) = hosts
                    .get_mut(&t.host_id)
                    .ok_or_else(|| StorageError::UnknownHost(t.host_id.clone()))?;
                let ok = *state == t.from;
                if ok {
                    *state = t.to;
                    accepted.push((*pk, t, audit));
                }
                recorded.push(ok);
            }
            // The newest state of each host (one row per host in an upsert).
            let mut newest: BTreeMap<i64, (&str, i64)> = BTreeMap::new();
            for (pk, t, _) in &accepted {
                newest.insert(*pk, (t.to.name(), t.at_ms));
            }
            let pks: Vec<i64> = newest.keys().copied().collect();
            let states: Vec<&str> = newest.values().map(|v| v.0).collect();
            let since: Vec<i64> = newest.values().map(|v| v.1).collect();
            if !pks.is_empty() {
                tx.execute(
                    "INSERT INTO host_lifecycle (host_pk, state, since_ms) \
                     SELECT * FROM unnest($1::int8[], $2::text[], $3::int8[]) \
                     ON CONFLICT (host_pk) DO UPDATE SET state = excluded.state, \
                     since_ms = excluded.since_ms",
                    &[&pks, &states, &since],
                )
                .await
                .db()?;
                let t_pk: Vec<i64> = accepted.iter().map(|a| a.0).collect();
                let from: Vec<&str> = accepted.iter().map(|a| a.1.from.name()).collect();
                let to: Vec<&str> = accepted.iter().map(|a| a.1.to.name()).collect();
                let at: Vec<i64> = accepted.iter().map(|a| a.1.at_ms).collect();
                let cause: Vec<&str> = accepted.iter().map(|a| a.1.cause.as_str()).collect();
                let actor: Vec<&str> = accepted.iter().map(|a| a.1.actor.as_str()).collect();
                // WITH ORDINALITY … ORDER BY: ids follow the batch's order.
                tx.execute(
                    "INSERT INTO host_transitions (host_pk, from_state, to_state, at_ms, cause, actor) \
                     SELECT p, f, t, a, c, r FROM unnest($1::int8[], $2::text[], $3::text[], \
                       $4::int8[], $5::text[], $6::text[]) WITH ORDINALITY AS u(p, f, t, a, c, r, n) \
                     ORDER BY n",
                    &[&t_pk, &from, &to, &at, &cause, &actor],
                )
                .await
                .db()?;
                let audits: Vec<&AuditEntry> = accepted.iter().map(|a| a.2).collect();
                audit::append_many_tx(&tx, &audits).await?;
            }
            tx.commit().await.db()?;
            Ok(recorded)
        })
    }

    fn transitions(&self, host_id: &str, limit: u32) -> StoreFuture<'_, Vec<TransitionRecord>> {
        let host_id = host_id.to_owned();
        let limit = i64::from(if limit == 0 {
            DEFAULT_SEARCH_LIMIT
        } else {
            limit
        });
        Box::pin(async move {
            let mut c = self.reader().await?;
            let tx = Self::read_tx(&mut c).await?;
            let pk = super::host_pk(&tx, &host_id).await?;
            let rows = tx
                .query(
                    "SELECT from_state, to_state, at_ms, cause, actor FROM host_transitions \
                     WHERE host_pk = $1 ORDER BY id DESC LIMIT $2",
                    &[&pk, &limit],
                )
                .await
                .db()?;
            tx.commit().await.db()?;
            rows.iter()
                .map(|r| {
                    Ok(TransitionRecord {
                        host_id: host_id.clone(),
                        from: parse_state("host_transitions", &get::<String>(r, 0)?)?,
                        to: parse_state("host_transitions", &get::<String>(r, 1)?)?,
                        at_ms: get(r, 2)?,
                        cause: get(r, 3)?,
                        actor: get(r, 4)?,
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
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            // The host row lock orders this with report batches (which lock it too), so the
            // open set read here is the one the acknowledgement applies to.
            let pk: i64 = match tx
                .query_opt(
                    "SELECT pk FROM hosts WHERE host_id = $1 FOR NO KEY UPDATE",
                    &[&req.host_id],
                )
                .await
                .db()?
            {
                Some(r) => get(&r, 0)?,
                None => return Err(StorageError::UnknownHost(req.host_id.clone())),
            };
            let rows = tx
                .query(
                    "SELECT key, item_hash, item FROM violations \
                     WHERE host_pk = $1 AND resolved_ms IS NULL ORDER BY key",
                    &[&pk],
                )
                .await
                .db()?;
            let open = rows
                .iter()
                .map(|r| {
                    Ok(OpenForAck {
                        key: get(r, 0)?,
                        item_hash: blob32("violations", get(r, 1)?)?,
                        item: DriftItem::decode(get::<&[u8]>(r, 2)?).map_err(|e| {
                            StorageError::Corrupt {
                                table: "violations",
                                detail: e.to_string(),
                            }
                        })?,
                    })
                })
                .collect::<Result<Vec<_>, StorageError>>()?;
            let acks = match_acks(&req, &open)?;
            let keys: Vec<&[u8]> = acks.iter().map(|a| a.key.as_slice()).collect();
            let hashes: Vec<&[u8]> = acks.iter().map(|a| a.item_hash.as_slice()).collect();
            let paths: Vec<Option<&[u8]>> = acks.iter().map(|a| a.path.as_deref()).collect();
            let packages: Vec<Option<&str>> = acks.iter().map(|a| a.package.as_deref()).collect();
            tx.execute(
                "INSERT INTO violation_acks (host_pk, key, item_hash, path, package, reason, \
                 actor, at_ms, expires_ms) \
                 SELECT $1, k, h, p, g, $6, $7, $8, $9 \
                 FROM unnest($2::bytea[], $3::bytea[], $4::bytea[], $5::text[]) AS u(k, h, p, g)",
                &[
                    &pk,
                    &keys,
                    &hashes,
                    &paths,
                    &packages,
                    &req.reason,
                    &req.actor,
                    &req.at_ms,
                    &req.expires_ms,
                ],
            )
            .await
            .db()?;
            audit::append_tx(&tx, &audit).await?;
            tx.commit().await.db()?;
            Ok(acks)
        })
    }

    fn acknowledgements(
        &self,
        host_id: Option<&str>,
        now_ms: i64,
    ) -> StoreFuture<'_, Vec<Acknowledgement>> {
        let host_id = host_id.map(str::to_owned);
        Box::pin(async move {
            let c = self.reader().await?;
            let rows = c
                .query(
                    "SELECT h.host_id, a.key, a.item_hash, a.path, a.package, a.reason, a.actor, \
                     a.at_ms, a.expires_ms FROM violation_acks a JOIN hosts h ON h.pk = a.host_pk \
                     WHERE a.expires_ms > $1 AND ($2::text IS NULL OR h.host_id = $2) \
                     ORDER BY a.id",
                    &[&now_ms, &host_id],
                )
                .await
                .db()?;
            rows.iter().map(ack_from_row).collect()
        })
    }
}

impl RegistryStore for PgStore {
    fn register_baseline(&self, b: RegisteredBaseline, audit: AuditEntry) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let mut w = self.writer().await?;
            let tx = w.client.transaction().await.db()?;
            // Pushes are rare: serialising them makes "newer than every registered version"
            // hold across replicas.
            tx.batch_execute("LOCK TABLE image_baselines IN SHARE ROW EXCLUSIVE MODE")
                .await
                .db()?;
            let versions: Vec<String> = tx
                .query(
                    "SELECT image_version FROM image_baselines WHERE image_id = $1",
                    &[&b.image_id],
                )
                .await
                .db()?
                .iter()
                .map(|r| get(r, 0))
                .collect::<Result<_, _>>()?;
            check_newer(&b, &versions)?;
            tx.execute(
                "INSERT INTO image_baselines (image_id, image_version, merkle_root, signer, \
                 created_unix, expires_unix, entry_count, pushed_ms, actor) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &[
                    &b.image_id,
                    &b.image_version,
                    &b.merkle_root.as_slice(),
                    &b.signer,
                    &b.created_unix,
                    &b.expires_unix,
                    &i64::try_from(b.entry_count).unwrap_or(i64::MAX),
                    &b.pushed_ms,
                    &b.actor,
                ],
            )
            .await
            .db()?;
            audit::append_tx(&tx, &audit).await?;
            tx.commit().await.db()
        })
    }

    fn registered_baselines(&self) -> StoreFuture<'_, Vec<RegisteredBaseline>> {
        Box::pin(async move {
            let c = self.reader().await?;
            let rows = c
                .query(
                    "SELECT image_id, image_version, merkle_root, signer, created_unix, \
                     expires_unix, entry_count, pushed_ms, actor FROM image_baselines",
                    &[],
                )
                .await
                .db()?;
            let mut out = rows
                .iter()
                .map(|r| {
                    Ok(RegisteredBaseline {
                        image_id: get(r, 0)?,
                        image_version: get(r, 1)?,
                        merkle_root: blob32("image_baselines", get(r, 2)?)?,
                        signer: get(r, 3)?,
                        created_unix: get(r, 4)?,
                        expires_unix: get(r, 5)?,
                        entry_count: u64::try_from(get::<i64>(r, 6)?).unwrap_or(0),
                        pushed_ms: get(r, 7)?,
                        actor: get(r, 8)?,
                    })
                })
                .collect::<Result<Vec<_>, StorageError>>()?;
            sort_newest_first(&mut out);
            Ok(out)
        })
    }
}
