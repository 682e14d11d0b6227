//! Endpoints of the host lifecycle, the flagging policy and the image registry, grouped by the
//! role they need: [`auditor_routes`] (reads: transitions, `explain`, images),
//! [`operator_routes`] (acknowledge violations, retire a host) and [`admin_routes`] (push a
//! baseline).
//!
//! What this module must never do: write without an audit record in the same transaction
//! (every write goes through a storage method that takes an `AuditEntry`), or record a
//! baseline whose signature it did not verify against the collector's trusted keys.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;

use super::auth::{AuthError, Caller};
use super::params::{self, ParamError};
use super::{ApiError, AppState, Pairs, host_id, now_ms, pairs};
use crate::api::lifecycle as lapi;
use crate::api::{RawBytes, SCHEMA, hex, rfc3339_ms};
use crate::flagging::{Exclusion, Reason};
use crate::lifecycle::{self, Event, Lifecycle};
use crate::reconcile::{self, Verdict};
use crate::registry;
use crate::storage::{AckRequest, AuditEntry, RegisteredBaseline, StorageError, TransitionRecord};

/// Longest an acknowledgement may last.
const MAX_ACK: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// Reads: `GET /api/v1/hosts/{id}/transitions`, `GET /api/v1/hosts/{id}/explain`,
/// `GET /api/v1/images`, `GET /api/v1/images/{id}`. Role: auditor.
pub(crate) fn auditor_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/hosts/{host_id}/transitions", get(transitions))
        .route("/api/v1/hosts/{host_id}/explain", get(explain))
        .route("/api/v1/images", get(images))
        .route("/api/v1/images/{image_id}", get(image))
}

/// `POST /api/v1/hosts/{id}/violations/ack`, `POST /api/v1/hosts/{id}/retire`. Role: operator.
pub(crate) fn operator_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/hosts/{host_id}/violations/ack", post(acknowledge))
        .route("/api/v1/hosts/{host_id}/retire", post(retire))
}

/// `POST /api/v1/baselines`. Role: admin.
pub(crate) fn admin_routes() -> Router<AppState> {
    Router::new().route("/api/v1/baselines", post(push_baseline))
}

/// Who is calling, as the audit log names them (`token:<id>`): from the [`Caller`] the
/// authentication layer put into the request. A request without one never reaches a handler
/// of these routes; if it did, it is refused as unauthenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Actor(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .map(|c| Actor(c.actor()))
            .ok_or(ApiError::Unauthenticated(AuthError::Missing))
    }
}

/// A JSON request body; a malformed one is a 400 like any bad parameter.
pub(super) fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t).map_err(|e| {
        ApiError::BadParameter(ParamError {
            parameter: "(body)".into(),
            message: e.body_text(),
        })
    })
}

fn reason_text(r: &str) -> Result<String, ApiError> {
    Ok(params::reason(r)?)
}

fn transition(t: &TransitionRecord) -> lapi::Transition {
    lapi::Transition {
        from: t.from.name().into(),
        to: t.to.name().into(),
        at: rfc3339_ms(t.at_ms),
        cause: t.cause.clone(),
        actor: t.actor.clone(),
    }
}

async fn current_state(st: &AppState, id: &str) -> Result<(Lifecycle, i64), ApiError> {
    st.store
        .lifecycle_states()
        .await?
        .into_iter()
        .find(|s| s.host_id == id)
        .map(|s| (s.state, s.since_ms))
        .ok_or_else(|| ApiError::UnknownHost(id.to_string()))
}

async fn transitions(
    State(st): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<lapi::TransitionList>, ApiError> {
    let id = host_id(id)?;
    let limit = params::parse_limit_only(&pairs(q)?, st.config.limits)?;
    let (state, since) = current_state(&st, &id).await?;
    let list = st.store.transitions(&id, limit).await?;
    Ok(Json(lapi::TransitionList {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now_ms()),
        host_id: id,
        lifecycle: state.name().into(),
        since: rfc3339_ms(since),
        limit,
        transitions: list.iter().map(transition).collect(),
    }))
}

fn reason(r: &Reason) -> lapi::FlagReason {
    lapi::FlagReason {
        code: r.code.into(),
        text: r.text.clone(),
        evidence: lapi::Evidence {
            paths: r.evidence.paths.iter().cloned().map(RawBytes).collect(),
            packages: r.evidence.packages.clone(),
            items: r.evidence.items,
            age_seconds: r
                .evidence
                .age_ms
                .map(|ms| u64::try_from(ms / 1000).unwrap_or(0)),
            observed: r.evidence.observed.clone(),
            expected: r.evidence.expected.clone(),
        },
    }
}

fn summary(v: &Verdict) -> String {
    let counted = v.items.iter().filter(|i| i.excluded.is_none()).count();
    let left_out = v.items.len() - counted;
    let drift = format!(
        "{} open item(s), {left_out} not counted (acknowledged or an image defect)",
        v.items.len()
    );
    match (v.state, v.reasons.is_empty()) {
        (Lifecycle::Replaced | Lifecycle::Retired, _) => {
            format!("{} — no longer assessed", v.state)
        }
        (Lifecycle::RebuildRequested, _) => match &v.successor {
            Some(s) => format!("awaiting its rebuild; {s} is its successor"),
            None => "awaiting its rebuild; no successor has enrolled yet".into(),
        },
        (_, false) => format!(
            "flagged for {} reason(s): {}; {drift}",
            v.reasons.len(),
            v.reasons
                .iter()
                .map(|r| r.code)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        (_, true) => format!("not flagged: no rule of the flagging policy applies; {drift}"),
    }
}

async fn explain(
    State(st): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<lapi::Explanation>, ApiError> {
    let id = host_id(id)?;
    params::parse_none(&pairs(q)?)?;
    let now = now_ms();
    let host = st
        .store
        .host(&id)
        .await?
        .ok_or_else(|| ApiError::UnknownHost(id.clone()))?;
    // The host's image in full (its likely defects need the other hosts' drift).
    let snap = reconcile::gather(&*st.store, now, Some(&host.hello.image_id)).await?;
    let v = reconcile::assess(&snap, &st.policy)
        .into_iter()
        .find(|v| v.host_id == id)
        .ok_or_else(|| ApiError::UnknownHost(id.clone()))?;
    let not_counted = v
        .items
        .iter()
        .filter_map(|i| {
            let ex = i.excluded.as_ref()?;
            let (why, by, reason, until) = match ex {
                Exclusion::Acknowledged {
                    by,
                    reason,
                    until_ms,
                } => (
                    "acknowledged",
                    Some(by.clone()),
                    Some(reason.clone()),
                    Some(rfc3339_ms(*until_ms)),
                ),
                Exclusion::ImageDefect => ("image_defect", None, None, None),
            };
            Some(lapi::NotCounted {
                path: i.path.clone().map(RawBytes),
                package: i.package.clone(),
                kind: i.kind.into(),
                why: why.into(),
                acknowledged_by: by,
                reason,
                until,
            })
        })
        .collect();
    Ok(Json(lapi::Explanation {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now),
        host_id: id,
        lifecycle: v.state.name().into(),
        since: rfc3339_ms(v.since_ms),
        flagged: !v.reasons.is_empty(),
        verdict: v.assessment.map(|a| a.state().name().to_string()),
        summary: summary(&v),
        reasons: v.reasons.iter().map(reason).collect(),
        not_counted,
        open_items: v.items.len() as u64,
        silent_for_seconds: u64::try_from(v.silent_for_ms / 1000).unwrap_or(0),
        successor: v.successor.clone(),
    }))
}

async fn acknowledge(
    State(st): State<AppState>,
    actor: Actor,
    id: Result<Path<String>, PathRejection>,
    b: Result<Json<lapi::AckRequest>, JsonRejection>,
) -> Result<Json<lapi::AckResult>, ApiError> {
    let id = host_id(id)?;
    let b = body(b)?;
    let reason = reason_text(&b.reason)?;
    let now = now_ms();
    let expires_ms = match (&b.expires_in, &b.expires_at) {
        (Some(d), None) => {
            let d = humantime::parse_duration(d).map_err(|e| ParamError {
                parameter: "expires_in".into(),
                message: format!("{d:?}: {e} (e.g. \"7d\")"),
            })?;
            if d.is_zero() || d > MAX_ACK {
                return Err(ParamError {
                    parameter: "expires_in".into(),
                    message: "must be more than 0 s and at most 365 days".into(),
                }
                .into());
            }
            now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        }
        (None, Some(t)) => {
            let at = params::parse_time(t, now).map_err(|m| ParamError {
                parameter: "expires_at".into(),
                message: m,
            })?;
            let max = now.saturating_add(MAX_ACK.as_millis() as i64);
            if at <= now || at > max {
                return Err(ParamError {
                    parameter: "expires_at".into(),
                    message: "must be in the future and at most 365 days away".into(),
                }
                .into());
            }
            at
        }
        _ => {
            return Err(ParamError {
                parameter: "expires_in".into(),
                message: "give exactly one of expires_in (\"7d\") and expires_at (RFC 3339)".into(),
            }
            .into());
        }
    };
    let req = AckRequest {
        host_id: id.clone(),
        paths: b.paths.into_iter().map(|p| p.0).collect(),
        packages: b.packages,
        all: b.all,
        reason: reason.clone(),
        actor: actor.0.clone(),
        at_ms: now,
        expires_ms,
    };
    let audit = AuditEntry::new(
        now,
        &actor.0,
        "violation.acknowledged",
        &id,
        serde_json::json!({
            "paths": req.paths.iter().map(|p| RawBytes(p.clone())).collect::<Vec<_>>(),
            "packages": req.packages,
            "all": req.all,
            "reason": reason,
            "expires_at": rfc3339_ms(expires_ms),
        }),
    );
    let acks = st.store.acknowledge(req, audit).await?;
    Ok(Json(lapi::AckResult {
        schema: SCHEMA.into(),
        host_id: id,
        expires_at: rfc3339_ms(expires_ms),
        acknowledged: acks
            .into_iter()
            .map(|a| lapi::AckedItem {
                path: a.path.map(RawBytes),
                package: a.package,
            })
            .collect(),
    }))
}

async fn retire(
    State(st): State<AppState>,
    actor: Actor,
    id: Result<Path<String>, PathRejection>,
    b: Result<Json<lapi::RetireRequest>, JsonRejection>,
) -> Result<Json<lapi::RetireResult>, ApiError> {
    let id = host_id(id)?;
    let reason = reason_text(&body(b)?.reason)?;
    // Compare-and-set: a reconciler round may move the host between the read and the write;
    // then the move is retried from the new state (a few times at most).
    for _ in 0..5 {
        let (from, _) = current_state(&st, &id).await?;
        lifecycle::next(from, Event::Retired)
            .map_err(|_| StorageError::Conflict(format!("host {id:?} is already {from}")))?;
        let now = now_ms();
        let t = TransitionRecord {
            host_id: id.clone(),
            from,
            to: Lifecycle::Retired,
            at_ms: now,
            cause: format!("retired by an operator: {reason}"),
            actor: actor.0.clone(),
        };
        let audit = AuditEntry::new(
            now,
            &actor.0,
            "host.retired",
            &id,
            serde_json::json!({"from": from.name(), "to": "retired", "reason": reason}),
        );
        if st.store.record_transition(t.clone(), audit).await? {
            return Ok(Json(lapi::RetireResult {
                schema: SCHEMA.into(),
                host_id: id,
                transition: transition(&t),
            }));
        }
    }
    Err(StorageError::Conflict(format!("host {id:?} kept changing state; try again")).into())
}

pub(crate) fn baseline(b: &RegisteredBaseline) -> lapi::Baseline {
    lapi::Baseline {
        image_id: b.image_id.clone(),
        version: b.image_version.clone(),
        root: hex(&b.merkle_root),
        signer: b.signer.clone(),
        created_at: rfc3339_ms(b.created_unix.saturating_mul(1000)),
        expires_at: b.expires_unix.map(|s| rfc3339_ms(s.saturating_mul(1000))),
        entries: b.entry_count,
        pushed_at: rfc3339_ms(b.pushed_ms),
        pushed_by: b.actor.clone(),
    }
}

async fn push_baseline(
    State(st): State<AppState>,
    actor: Actor,
    b: Result<Json<lapi::BaselinePush>, JsonRejection>,
) -> Result<Json<lapi::BaselinePushed>, ApiError> {
    let b = body(b)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b.signed_header.trim())
        .map_err(|e| ParamError {
            parameter: "signed_header".into(),
            message: format!("not base64: {e}"),
        })?;
    let now = now_ms();
    let verified = registry::verify_push(&bytes, &st.trusted_keys, now / 1000)?;
    let record = RegisteredBaseline {
        image_id: verified.image_id,
        image_version: verified.image_version,
        merkle_root: verified.merkle_root,
        signer: verified.signer,
        created_unix: verified.created_unix,
        expires_unix: verified.expires_unix,
        entry_count: verified.entry_count,
        pushed_ms: now,
        actor: actor.0.clone(),
    };
    let audit = AuditEntry::new(
        now,
        &actor.0,
        "baseline.pushed",
        &record.image_id,
        serde_json::json!({
            "image_id": record.image_id,
            "version": record.image_version,
            "root": hex(&record.merkle_root),
            "signer": record.signer,
        }),
    );
    st.store.register_baseline(record.clone(), audit).await?;
    Ok(Json(lapi::BaselinePushed {
        schema: SCHEMA.into(),
        baseline: baseline(&record),
    }))
}

/// Every image id a live host reports or the registry knows.
async fn images(
    State(st): State<AppState>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<lapi::ImageList>, ApiError> {
    params::parse_none(&pairs(q)?)?;
    let now = now_ms();
    let snap = reconcile::gather(&*st.store, now, None).await?;
    let mut ids: std::collections::BTreeSet<String> = snap.registered.keys().cloned().collect();
    ids.extend(
        snap.hosts
            .iter()
            .filter(|h| !h.hello.image_id.is_empty())
            .map(|h| h.hello.image_id.clone()),
    );
    let images = ids
        .into_iter()
        .map(|id| {
            let a = reconcile::analyse(&snap, &st.policy, &id);
            lapi::ImageSummary {
                registered: snap.registered.get(&id).map(baseline),
                hosts: (a.consensus.len() + a.outliers.len()) as u64,
                consensus: a.consensus.len() as u64,
                outliers: a.outliers.len() as u64,
                likely_defects: a.defects.len() as u64,
                image_id: id,
            }
        })
        .collect();
    Ok(Json(lapi::ImageList {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now),
        image_defect_ratio: st.policy.image_defect_ratio,
        images,
    }))
}

async fn image(
    State(st): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<lapi::ImageDetail>, ApiError> {
    let id = id.map(|Path(i)| i).map_err(|e| ParamError {
        parameter: "image_id".into(),
        message: e.body_text(),
    })?;
    params::parse_none(&pairs(q)?)?;
    let now = now_ms();
    let snap = reconcile::gather(&*st.store, now, Some(&id)).await?;
    let on_image = snap.hosts.iter().any(|h| h.hello.image_id == id);
    if !on_image && !snap.registered.contains_key(&id) {
        return Err(ApiError::UnknownImage(id));
    }
    let versions: Vec<lapi::Baseline> = st
        .store
        .registered_baselines()
        .await?
        .iter()
        .filter(|b| b.image_id == id)
        .map(baseline)
        .collect();
    let a = reconcile::analyse(&snap, &st.policy, &id);
    let outliers = a
        .outliers
        .iter()
        .map(|o| {
            let h = snap.hosts.iter().find(|h| h.host_id == o.host_id);
            lapi::OutlierHost {
                host_id: o.host_id.clone(),
                baseline_root: h
                    .filter(|h| !h.hello.baseline_root.is_empty())
                    .map(|h| hex(&h.hello.baseline_root)),
                other_root: o.other_root,
                drift: o.drift,
                lifecycle: snap
                    .states
                    .get(&o.host_id)
                    .map_or("enrolled", |s| s.state.name())
                    .into(),
            }
        })
        .collect();
    Ok(Json(lapi::ImageDetail {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now),
        image_defect_ratio: st.policy.image_defect_ratio,
        registered: snap.registered.get(&id).map(baseline),
        versions,
        hosts: (a.consensus.len() + a.outliers.len()) as u64,
        consensus: a.consensus,
        outliers,
        likely_defects: a
            .defects
            .into_iter()
            .map(|d| lapi::LikelyDefect {
                path: RawBytes(d.path),
                hosts: d.hosts as u64,
            })
            .collect(),
        image_id: id,
    }))
}
