//! The admin endpoints for access: API tokens (`/api/v1/tokens`) and enrollment tokens
//! (`/api/v1/enrollment-tokens`). Every create and revoke is audited in the same transaction,
//! with the calling token as the actor. A secret appears once, in the creating answer.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use serde::Deserialize;

use super::auth::Caller;
use super::{ApiError, AppState, now_ms};
use crate::api::{self, SCHEMA, rfc3339_ms};
use crate::cli::{api_token_revoke_audit, enrollment_token_audit, new_api_token};
use crate::storage::{ApiToken, EnrollmentToken, RevokeOutcome, Role};
use crate::token::{Token, TokenKind};

/// Routes for the `admin` role.
pub(crate) fn admin_routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", delete(revoke_token))
        .route(
            "/api/v1/enrollment-tokens",
            get(list_enrollment_tokens).post(create_enrollment_token),
        )
}

/// Longest lifetime of an enrollment token made over the API.
const MAX_ENROLLMENT_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Most uses of one enrollment token.
const MAX_ENROLLMENT_USES: u32 = 100_000;

fn body<T>(b: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    b.map(|Json(t)| t)
        .map_err(|e| ApiError::Invalid(format!("request body: {}", e.body_text())))
}

fn duration(field: &str, s: &str) -> Result<Duration, ApiError> {
    humantime::parse_duration(s)
        .map_err(|e| ApiError::Invalid(format!("{field}: {s:?}: {e} (e.g. \"90d\")")))
}

fn token_info(t: &ApiToken, now: i64) -> api::ApiTokenInfo {
    let state = if t.revoked_ms.is_some() {
        "revoked"
    } else if !t.active_at(now) {
        "expired"
    } else {
        "active"
    };
    api::ApiTokenInfo {
        id: t.id.clone(),
        name: t.name.clone(),
        role: t.role.name().into(),
        state: state.into(),
        created_at: rfc3339_ms(t.created_ms),
        created_by: t.created_by.clone(),
        expires_at: t.expires_ms.map(rfc3339_ms),
        revoked_at: t.revoked_ms.map(rfc3339_ms),
        last_used_at: t.last_used_ms.map(rfc3339_ms),
    }
}

fn enrollment_info(t: &EnrollmentToken, now: i64) -> api::EnrollmentTokenInfo {
    let state = if t.expires_ms <= now {
        "expired"
    } else if t.uses_left == 0 {
        "used_up"
    } else {
        "active"
    };
    api::EnrollmentTokenInfo {
        id: t.id.clone(),
        state: state.into(),
        created_at: rfc3339_ms(t.created_ms),
        expires_at: rfc3339_ms(t.expires_ms),
        uses_left: t.uses_left,
        host_pattern: t.host_pattern.clone(),
    }
}

async fn list_tokens(State(st): State<AppState>) -> Result<Json<api::ApiTokenList>, ApiError> {
    let now = now_ms();
    let tokens = st.store.list_api_tokens().await?;
    Ok(Json(api::ApiTokenList {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now),
        tokens: tokens.iter().map(|t| token_info(t, now)).collect(),
    }))
}

/// `POST /api/v1/tokens` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewApiToken {
    name: String,
    role: String,
    /// Default: valid until revoked.
    ttl: Option<String>,
}

async fn create_token(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    b: Result<Json<NewApiToken>, JsonRejection>,
) -> Result<(StatusCode, Json<api::ApiTokenAnswer>), ApiError> {
    let b = body(b)?;
    let role: Role = b
        .role
        .parse()
        .map_err(|e: crate::storage::access::UnknownRole| ApiError::Invalid(e.to_string()))?;
    let ttl = b.ttl.as_deref().map(|t| duration("ttl", t)).transpose()?;
    let now = now_ms();
    let (token, record, mut audit) = new_api_token(role, b.name, ttl, caller.actor(), now)
        .map_err(|e| ApiError::Invalid(format!("{e:#}")))?;
    audit.detail["by_name"] = caller.name.clone().into();
    st.store.create_api_token(record.clone(), audit).await?;
    Ok((
        StatusCode::CREATED,
        Json(api::ApiTokenAnswer {
            schema: SCHEMA.into(),
            token: token_info(&record, now),
            secret: Some(token.reveal().to_string()),
        }),
    ))
}

async fn revoke_token(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<api::ApiTokenAnswer>, ApiError> {
    let id = id
        .map(|Path(i)| i)
        .map_err(|e| ApiError::Invalid(format!("token id: {}", e.body_text())))?;
    let now = now_ms();
    let mut audit = api_token_revoke_audit(&id, caller.actor(), now);
    audit.detail["by_name"] = caller.name.clone().into();
    match st.store.revoke_api_token(&id, now, audit).await? {
        RevokeOutcome::Revoked => {}
        RevokeOutcome::NotFound => {
            return Err(ApiError::NotFound(format!("no API token with id {id:?}")));
        }
        RevokeOutcome::AlreadyRevoked(at) => {
            return Err(ApiError::Conflict(format!(
                "API token {id} was already revoked at {}",
                rfc3339_ms(at)
            )));
        }
    }
    let token = st
        .store
        .list_api_tokens()
        .await?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or_else(|| ApiError::NotFound(format!("no API token with id {id:?}")))?;
    Ok(Json(api::ApiTokenAnswer {
        schema: SCHEMA.into(),
        token: token_info(&token, now),
        secret: None,
    }))
}

async fn list_enrollment_tokens(
    State(st): State<AppState>,
) -> Result<Json<api::EnrollmentTokenList>, ApiError> {
    let now = now_ms();
    let tokens = st.store.list_enrollment_tokens().await?;
    Ok(Json(api::EnrollmentTokenList {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now),
        tokens: tokens.iter().map(|t| enrollment_info(t, now)).collect(),
    }))
}

/// `POST /api/v1/enrollment-tokens` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewEnrollmentToken {
    /// Default 1h.
    ttl: Option<String>,
    /// Default 1.
    uses: Option<u32>,
    host_pattern: Option<String>,
}

async fn create_enrollment_token(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    b: Result<Json<NewEnrollmentToken>, JsonRejection>,
) -> Result<(StatusCode, Json<api::EnrollmentTokenAnswer>), ApiError> {
    let b = body(b)?;
    let ttl = match b.ttl.as_deref() {
        Some(t) => duration("ttl", t)?,
        None => Duration::from_secs(3600),
    };
    if ttl.is_zero() || ttl > MAX_ENROLLMENT_TTL {
        return Err(ApiError::Invalid(
            "ttl: must be above 0 and at most 30d".into(),
        ));
    }
    let uses = b.uses.unwrap_or(1);
    if !(1..=MAX_ENROLLMENT_USES).contains(&uses) {
        return Err(ApiError::Invalid(format!(
            "uses: must be 1 to {MAX_ENROLLMENT_USES}"
        )));
    }
    if let Some(p) = &b.host_pattern {
        crate::storage::check_host_pattern(p).map_err(|e| ApiError::Invalid(e.to_string()))?;
    }
    let token = Token::generate(TokenKind::Enrollment)
        .map_err(|e| ApiError::Storage(crate::storage::StorageError::Backend(e.to_string())))?;
    let now = now_ms();
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let record = token.record(now, now.saturating_add(ttl_ms), uses, b.host_pattern);
    let mut audit = enrollment_token_audit(&record, caller.actor());
    audit.detail["by_name"] = caller.name.clone().into();
    st.store
        .create_enrollment_token(record.clone(), audit)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(api::EnrollmentTokenAnswer {
            schema: SCHEMA.into(),
            token: enrollment_info(&record, now),
            secret: token.reveal().to_string(),
        }),
    ))
}
