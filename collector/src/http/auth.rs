//! Access control of the HTTP API: bearer API tokens with roles.
//!
//! Two layers. [`authenticate`] wraps the whole router and is deny-by-default: every request
//! except the [`PUBLIC_PATHS`] (`/healthz`) must carry `Authorization: Bearer dwa_…` naming an
//! active token, or it is answered 401 — unknown paths included, so nothing about the API is
//! learned without a token. The caller found is put into the request's extensions as a
//! [`Caller`]. [`require`] is a route layer per role group: a caller whose role does not
//! include the group's is answered 403 naming the role needed. A route that forgot its
//! `require` is therefore still closed to anyone without a valid token.
//!
//! No timing oracle on token ids: a token is looked up only by the SHA-256 of the whole
//! string presented (a unique index), never by its id, and a presented id that exists with a
//! wrong secret takes the same path as an id that does not exist. What the lookup's timing
//! could reveal is how the presented string's hash compares with stored hashes, which says
//! nothing an attacker can steer (finding a string with a chosen hash prefix is a preimage
//! search). Malformed tokens are refused before any lookup, which says nothing about ids
//! either. Hence no constant-time comparison is needed: no secret is compared byte by byte.
//!
//! `last_used` is written at most once a minute per token: an in-memory note per token id
//! skips the write, and the UPDATE itself is conditional (several replicas share the rule).
//!
//! What this module must never do: log or store a presented secret, or let a request reach a
//! handler without a [`Caller`] unless its path is public.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use super::now_ms;
use crate::storage::Storage;
use crate::storage::access::LAST_USED_GRANULARITY_MS;
pub use crate::storage::access::Role;
use crate::token::{Token, TokenKind};

/// Paths answered without a token: the load balancer's health check.
pub const PUBLIC_PATHS: &[&str] = &["/healthz"];

/// Who is calling: put into the request extensions by [`authenticate`]. Handlers that change
/// state take `Extension<Caller>` and record [`Caller::actor`] in the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub role: Role,
}

impl Caller {
    /// The audit actor: `token:<id>`.
    pub fn actor(&self) -> String {
        format!("token:{}", self.token_id)
    }
}

/// Why a request was not authenticated. The message is for the caller; it never contains
/// the presented secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("an API token is required (Authorization: Bearer dwa_…)")]
    Missing,
    #[error("the Authorization header must be \"Bearer dwa_<id>_<secret>\"")]
    Malformed,
    #[error("unknown API token")]
    Unknown,
    #[error("API token {0} has expired")]
    Expired(String),
    #[error("API token {0} has been revoked")]
    Revoked(String),
}

impl AuthError {
    /// Whether a token was presented (RFC 6750: `error="invalid_token"` then).
    pub fn token_presented(&self) -> bool {
        !matches!(self, AuthError::Missing)
    }
}

/// The state of [`authenticate`]: the store, and when each token's `last_used` was last
/// written by this process. The map holds only ids of real, authenticated tokens, so its
/// size is bounded by the number of tokens.
#[derive(Debug)]
pub struct Authenticator {
    store: Arc<dyn Storage>,
    touched: Mutex<HashMap<String, i64>>,
}

impl Authenticator {
    pub fn new(store: Arc<dyn Storage>) -> Arc<Authenticator> {
        Arc::new(Authenticator {
            store,
            touched: Mutex::new(HashMap::new()),
        })
    }

    /// The caller a request's `Authorization` header names.
    pub async fn caller(&self, header: Option<&[u8]>, now_ms: i64) -> Result<Caller, ApiError> {
        let header = header.ok_or(AuthError::Missing)?;
        let text = std::str::from_utf8(header).map_err(|_| AuthError::Malformed)?;
        let (scheme, credentials) = text.trim().split_once(' ').ok_or(AuthError::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::Malformed.into());
        }
        let token = Token::parse(TokenKind::Api, credentials).map_err(|_| AuthError::Malformed)?;
        let record = self
            .store
            .api_token_by_hash(token.sha256())
            .await?
            // The hash covers the id, so this only fails on a hand-edited row.
            .filter(|t| t.id == token.id())
            .ok_or(AuthError::Unknown)?;
        if record.revoked_ms.is_some() {
            return Err(AuthError::Revoked(record.id).into());
        }
        if !record.active_at(now_ms) {
            return Err(AuthError::Expired(record.id).into());
        }
        self.note_use(&record.id, now_ms);
        Ok(Caller {
            token_id: record.id,
            name: record.name,
            role: record.role,
        })
    }

    /// Writes `last_used` when this process has not written it for a minute; off the request
    /// path (a failed write is logged: it is bookkeeping, not access control).
    fn note_use(&self, id: &str, now_ms: i64) {
        {
            let Ok(mut touched) = self.touched.lock() else {
                return;
            };
            match touched.get(id) {
                Some(&at) if now_ms - at < LAST_USED_GRANULARITY_MS => return,
                _ => {
                    touched.insert(id.to_string(), now_ms);
                }
            }
        }
        let store = self.store.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            if let Err(e) = store.touch_api_token(&id, now_ms).await {
                tracing::warn!(token = id, error = %e, "recording an API token's last use failed");
            }
        });
    }
}

/// The outermost access layer (see the module doc): 401 unless the path is public or the
/// request names an active token; the [`Caller`] goes into the extensions.
pub async fn authenticate(
    State(auth): State<Arc<Authenticator>>,
    mut req: Request,
    next: Next,
) -> Response {
    if PUBLIC_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let mut values = req.headers().get_all(AUTHORIZATION).iter();
    let header = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(v), None) => Some(v.as_bytes()),
        // Two Authorization headers: which one a proxy saw is anyone's guess.
        (Some(_), Some(_)) => return ApiError::from(AuthError::Malformed).into_response(),
    };
    match auth.caller(header, now_ms()).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => {
            if let ApiError::Unauthenticated(a) = &e {
                tracing::info!(path = req.uri().path(), reason = %a, "HTTP API request refused");
            }
            e.into_response()
        }
    }
}

/// A route layer: only callers whose role includes `role` pass; others get 403.
pub fn require(role: Role) -> RequireRole {
    RequireRole { role }
}

/// See [`require`].
#[derive(Debug, Clone, Copy)]
pub struct RequireRole {
    role: Role,
}

impl<S> tower::Layer<S> for RequireRole {
    type Service = RequireRoleService<S>;

    fn layer(&self, inner: S) -> RequireRoleService<S> {
        RequireRoleService {
            role: self.role,
            inner,
        }
    }
}

/// The service [`RequireRole`] wraps a route in.
#[derive(Debug, Clone)]
pub struct RequireRoleService<S> {
    role: Role,
    inner: S,
}

impl<S> tower::Service<Request> for RequireRoleService<S>
where
    S: tower::Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let verdict = match req.extensions().get::<Caller>() {
            // Only reachable if the route's path were public: fail closed.
            None => Err(ApiError::from(AuthError::Missing)),
            Some(c) if c.role.includes(self.role) => Ok(()),
            Some(c) => Err(ApiError::Forbidden {
                needed: self.role,
                token_id: c.token_id.clone(),
                has: c.role,
            }),
        };
        match verdict {
            Ok(()) => {
                // The clone that was polled ready is the one that must be called.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(e) => Box::pin(async move { Ok(e.into_response()) }),
        }
    }
}
