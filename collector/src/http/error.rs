//! Every way an API request fails, and the one place that turns it into an HTTP status and a
//! JSON [`ErrorBody`].

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::auth::{AuthError, Role};
use super::params::ParamError;
use crate::api::{ErrorBody, ErrorDetail};
use crate::storage::StorageError;

/// Why a request was not answered with data.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    BadParameter(#[from] ParamError),
    #[error("no such host {0:?}")]
    UnknownHost(String),
    #[error("no such image {0:?} (no host reports it and no baseline is registered for it)")]
    UnknownImage(String),
    /// A pushed baseline that does not verify (signature, format, expiry).
    #[error("baseline refused: {0}")]
    Push(#[from] crate::registry::PushError),
    #[error("no such rebuild {0:?}")]
    UnknownRebuild(String),
    #[error("no such endpoint {0:?} (the API is under /api/v1/)")]
    UnknownEndpoint(String),
    #[error("{0} is not a method of this endpoint")]
    MethodNotAllowed(String),
    #[error(transparent)]
    Unauthenticated(#[from] AuthError),
    #[error("this needs the {needed} role; API token {token_id} has the {has} role")]
    Forbidden {
        needed: Role,
        token_id: String,
        has: Role,
    },
    /// A request body that is not what the endpoint takes (syntax, unknown field, bad value).
    #[error("{0}")]
    Invalid(String),
    /// Something other than a host that is not there (a token id).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with the current state (revoking a revoked token).
    #[error("{0}")]
    Conflict(String),
    #[error("request took longer than {0:?}")]
    Timeout(std::time::Duration),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl ApiError {
    /// Status and machine-readable code. One exhaustive `match` over every cause, storage's
    /// included, so a new `StorageError` variant cannot compile without a decision here.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadParameter(_) => (StatusCode::BAD_REQUEST, "bad_parameter"),
            ApiError::Push(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ApiError::UnknownHost(_)
            | ApiError::UnknownImage(_)
            | ApiError::UnknownRebuild(_)
            | ApiError::UnknownEndpoint(_)
            | ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ApiError::Forbidden { .. } => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Timeout(_) => (StatusCode::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::Storage(e) => match e {
                // The database is down or refused: retrying later may work.
                StorageError::Backend(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
                }
                StorageError::UnknownHost(_) => (StatusCode::NOT_FOUND, "not_found"),
                // A value the parameter parsing let through but storage refused.
                StorageError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "bad_parameter"),
                // A change the stored state refuses (an older baseline version).
                StorageError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
                // Deployment or data problems no retry fixes.
                StorageError::SchemaTooNew { .. } | StorageError::Corrupt { .. } => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal")
                }
                // The API never consumes enrollment tokens: seeing one here is a bug.
                StorageError::Token(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
        }
    }

    pub fn body(&self) -> (StatusCode, ErrorBody) {
        let (status, code) = self.status_and_code();
        let parameter = match self {
            ApiError::BadParameter(p) => Some(p.parameter.clone()),
            _ => None,
        };
        let message = match self {
            ApiError::BadParameter(p) => p.message.clone(),
            other => other.to_string(),
        };
        (
            status,
            ErrorBody {
                error: ErrorDetail {
                    status: status.as_u16(),
                    code: code.to_string(),
                    message,
                    parameter,
                },
            },
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, body) = self.body();
        if status.is_server_error() {
            tracing::warn!(error = %self, "HTTP API request failed");
        }
        let mut resp = (status, Json(body)).into_response();
        // RFC 6750 §3: how to authenticate, and whether the token presented was the problem.
        let challenge = match &self {
            ApiError::Unauthenticated(a) if a.token_presented() => {
                Some("Bearer realm=\"driftwatch\", error=\"invalid_token\"")
            }
            ApiError::Unauthenticated(_) => Some("Bearer realm=\"driftwatch\""),
            ApiError::Forbidden { .. } => {
                Some("Bearer realm=\"driftwatch\", error=\"insufficient_scope\"")
            }
            _ => None,
        };
        if let Some(c) = challenge {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static(c),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::TokenError;

    #[test]
    fn statuses() {
        let cases: Vec<(ApiError, u16, &str)> = vec![
            (
                ParamError {
                    parameter: "kind".into(),
                    message: "unknown".into(),
                }
                .into(),
                400,
                "bad_parameter",
            ),
            (ApiError::UnknownHost("x".into()), 404, "not_found"),
            (
                StorageError::UnknownHost("x".into()).into(),
                404,
                "not_found",
            ),
            (
                StorageError::Backend("down".into()).into(),
                503,
                "storage_unavailable",
            ),
            (
                StorageError::Corrupt {
                    table: "hosts",
                    detail: "x".into(),
                }
                .into(),
                500,
                "internal",
            ),
            (
                StorageError::SchemaTooNew {
                    found: 9,
                    supported: 1,
                }
                .into(),
                500,
                "internal",
            ),
            (
                StorageError::Token(TokenError::Unknown).into(),
                500,
                "internal",
            ),
            (AuthError::Missing.into(), 401, "unauthenticated"),
            (
                AuthError::Revoked("0123abcd".into()).into(),
                401,
                "unauthenticated",
            ),
            (
                ApiError::Forbidden {
                    needed: Role::Admin,
                    token_id: "0123abcd".into(),
                    has: Role::Operator,
                },
                403,
                "forbidden",
            ),
            (ApiError::Invalid("x".into()), 422, "invalid"),
            (
                ApiError::MethodNotAllowed("PUT".into()),
                405,
                "method_not_allowed",
            ),
            (ApiError::Conflict("x".into()), 409, "conflict"),
            (ApiError::NotFound("x".into()), 404, "not_found"),
            (
                ApiError::Timeout(std::time::Duration::from_secs(1)),
                503,
                "timeout",
            ),
        ];
        for (err, status, code) in cases {
            let (s, body) = err.body();
            assert_eq!(
                (s.as_u16(), body.error.code.as_str()),
                (status, code),
                "{err}"
            );
            assert_eq!(body.error.status, status);
        }
        let (_, body) = ApiError::from(ParamError {
            parameter: "since".into(),
            message: "bad".into(),
        })
        .body();
        assert_eq!(body.error.parameter.as_deref(), Some("since"));
    }
}
