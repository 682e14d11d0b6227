//! `GET /api/v1/audit` (auditor): the audit log's records in seq order, exactly as stored,
//! page by page, so that a client verifies the chain itself (`driftwatch audit verify`) and
//! need not trust the collector's word for it.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};

use super::params::AuditFilter;
use super::{ApiError, AppState, Pairs, now_ms, pairs};
use crate::api::{self, SCHEMA, hex, rfc3339_ms};

/// Routes for the `auditor` role.
pub(crate) fn auditor_routes() -> Router<AppState> {
    Router::new().route("/api/v1/audit", get(audit_records))
}

async fn audit_records(
    State(st): State<AppState>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<api::AuditList>, ApiError> {
    let f = AuditFilter::parse(&pairs(q)?, st.config.limits)?;
    let mut records = st
        .store
        .audit_records(f.after, f.limit.saturating_add(1))
        .await?;
    let truncated = records.len() > f.limit as usize;
    records.truncate(f.limit as usize);
    Ok(Json(api::AuditList {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now_ms()),
        limit: f.limit,
        truncated,
        records: records
            .into_iter()
            .map(|r| api::AuditRecord {
                seq: r.seq,
                at: rfc3339_ms(r.at_ms),
                at_ms: r.at_ms,
                actor: r.actor,
                action: r.action,
                target: r.target,
                detail: r.detail,
                prev_hash: hex(&r.prev_hash),
                hash: hex(&r.hash),
            })
            .collect(),
    }))
}
