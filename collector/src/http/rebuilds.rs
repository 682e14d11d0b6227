//! Rebuild actions over the API: `GET /api/v1/rebuilds` and `GET /api/v1/rebuilds/{id}`
//! (auditor), `POST /api/v1/rebuilds/{id}/approve` and `/reject` with a required reason
//! (operator). An approval or rejection is a compare-and-set on the action's state with its
//! audit record in the same transaction: two operators deciding at once get one success and
//! one 409.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::lifecycle::Actor;
use super::params::{self, ParamError, RebuildFilter};
use super::{ApiError, AppState, Pairs, now_ms, pairs};
use crate::api::{self, SCHEMA, rfc3339_ms};
use crate::storage::actions::{ActionFilter, ActionState, AttemptRecord, RebuildAction};
use crate::storage::{AuditEntry, StorageError};

/// Routes for the `auditor` role.
pub(crate) fn auditor_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/rebuilds", get(list))
        .route("/api/v1/rebuilds/{id}", get(one))
}

/// Routes for the `operator` role.
pub(crate) fn operator_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/rebuilds/{id}/approve", post(approve))
        .route("/api/v1/rebuilds/{id}/reject", post(reject))
}

pub(crate) fn rebuild(a: &RebuildAction) -> api::Rebuild {
    api::Rebuild {
        id: a.id.clone(),
        idempotency_key: a.idempotency_key.clone(),
        host_id: a.host_id.clone(),
        image_id: a.image_id.clone(),
        role: a.role.clone(),
        state: a.state.name().into(),
        dry_run: a.dry_run,
        reasons: a.reasons.clone(),
        flagged_at: rfc3339_ms(a.flagged_ms),
        created_at: rfc3339_ms(a.created_ms),
        updated_at: rfc3339_ms(a.updated_ms),
        triggered_at: a.triggered_ms.map(rfc3339_ms),
        finished_at: a.finished_ms.map(rfc3339_ms),
        attempts: a.attempts,
        next_attempt_at: a.next_attempt_ms.map(rfc3339_ms),
        last_error: a.last_error.clone(),
        decided_by: a.decided_by.clone(),
        decision_reason: a.decision_reason.clone(),
        note: a.note.clone(),
    }
}

fn attempt(r: &AttemptRecord) -> api::RebuildAttempt {
    api::RebuildAttempt {
        attempt: r.attempt,
        at: rfc3339_ms(r.at_ms),
        duration_ms: r.duration_ms,
        delivered: r.delivered,
        status: r.status,
        detail: r.detail.clone(),
    }
}

fn action_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(h)| h).map_err(|e| {
        ApiError::BadParameter(ParamError {
            parameter: "id".into(),
            message: e.body_text(),
        })
    })
}

async fn list(
    State(st): State<AppState>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<api::RebuildList>, ApiError> {
    let f = RebuildFilter::parse(&pairs(q)?, st.config.limits)?;
    let mut rows = st
        .store
        .list_actions(ActionFilter {
            state: f.state,
            host_id: f.host_id,
            limit: f.limit.saturating_add(1),
        })
        .await?;
    let truncated = rows.len() > f.limit as usize;
    rows.truncate(f.limit as usize);
    Ok(Json(api::RebuildList {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now_ms()),
        limit: f.limit,
        truncated,
        rebuilds: rows.iter().map(rebuild).collect(),
    }))
}

async fn detail(st: &AppState, id: String) -> Result<Json<api::RebuildDetail>, ApiError> {
    let a = st
        .store
        .action(&id)
        .await?
        .ok_or_else(|| ApiError::UnknownRebuild(id.clone()))?;
    let attempts = st.store.action_attempts(&id).await?;
    Ok(Json(api::RebuildDetail {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now_ms()),
        rebuild: rebuild(&a),
        attempts: attempts.iter().map(attempt).collect(),
    }))
}

async fn one(
    State(st): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<api::RebuildDetail>, ApiError> {
    let id = action_id(id)?;
    params::parse_none(&pairs(q)?)?;
    detail(&st, id).await
}

async fn approve(
    State(st): State<AppState>,
    caller: Actor,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<api::RebuildDecision>, JsonRejection>,
) -> Result<Json<api::RebuildDetail>, ApiError> {
    decide(st, caller, id, body, true).await
}

async fn reject(
    State(st): State<AppState>,
    caller: Actor,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<api::RebuildDecision>, JsonRejection>,
) -> Result<Json<api::RebuildDetail>, ApiError> {
    decide(st, caller, id, body, false).await
}

/// The reason of a decision ([`params::reason`]).
fn check_reason(reason: &str) -> Result<String, ApiError> {
    Ok(params::reason(reason)?)
}

async fn decide(
    st: AppState,
    caller: Actor,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<api::RebuildDecision>, JsonRejection>,
    approve: bool,
) -> Result<Json<api::RebuildDetail>, ApiError> {
    let id = action_id(id)?;
    let body = super::lifecycle::body(body)?;
    let reason = check_reason(&body.reason)?;
    let a = st
        .store
        .action(&id)
        .await?
        .ok_or_else(|| ApiError::UnknownRebuild(id.clone()))?;
    if a.state != ActionState::PendingApproval {
        return Err(StorageError::Conflict(format!(
            "rebuild {id} is {}, not pending_approval",
            a.state
        ))
        .into());
    }
    let now = now_ms();
    let actor = caller.0.clone();
    let mut b = a.clone();
    b.updated_ms = now;
    b.decided_by = Some(actor.clone());
    b.decision_reason = Some(reason.clone());
    let verb = if approve {
        b.state = ActionState::Pending;
        "rebuild.approved"
    } else {
        b.state = ActionState::Rejected;
        b.finished_ms = Some(now);
        b.note = Some("rejected by an operator".into());
        "rebuild.rejected"
    };
    let entry = AuditEntry::new(
        now,
        actor,
        verb,
        a.host_id.clone(),
        json!({
            "action_id": a.id,
            "idempotency_key": a.idempotency_key,
            "reason": reason,
            "state": b.state.name(),
        }),
    );
    if !st
        .store
        .update_action(ActionState::PendingApproval, b, None, entry)
        .await?
    {
        return Err(StorageError::Conflict(format!(
            "rebuild {id} changed meanwhile (decided by someone else, or cancelled)"
        ))
        .into());
    }
    detail(&st, id).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_checked() {
        assert_eq!(
            check_reason("  drift confirmed  ").unwrap(),
            "drift confirmed"
        );
        for bad in [
            "",
            "   ",
            "a\nb",
            "\u{1b}[2J",
            &"x".repeat(params::MAX_REASON + 1),
        ] {
            assert!(
                matches!(check_reason(bad), Err(ApiError::BadParameter(_))),
                "{bad:?}"
            );
        }
    }
}
