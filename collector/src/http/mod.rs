//! The HTTP JSON API for people and their tools (schema `driftwatch.api.v1`, `docs/api.md`):
//! the fleet overview, one host, its violations with before/after, a fleet-wide violation
//! search, security events, the audit log, API and enrollment tokens, a health check and the
//! API's own OpenAPI description ([`OPENAPI`]).
//!
//! What this module owns: routing by role (`auth`: every route but `/healthz` needs a bearer
//! token; each route group requires a role), parameter parsing (`params`), the mapping of
//! storage values to API values (`convert`) and of errors to statuses (`error`), and the
//! listener (plain HTTP on loopback, TLS anywhere). What it must never do: change state
//! without an audit record in the same transaction, decide fleet policy beyond the display
//! state (`crate::host_state`), or listen beyond loopback without TLS ([`check_listen_addr`],
//! and [`serve`] checks its listener again).
//!
//! `driftwatch-collector serve` runs [`serve`] or [`serve_tls`] with the configured
//! `http_listen` beside the gRPC port (`crate::server`).

mod access;
mod audit;
pub mod auth;
pub(crate) mod convert;
mod error;
mod lifecycle;
pub mod params;
mod rebuilds;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

pub use error::ApiError;
use params::{EventFilter, HostFilter, HostViolations, Limits, ParamError, ViolationSearch};

use crate::api::{self, SCHEMA, rfc3339_ms};
use crate::host_state::{self, DEFAULT_SILENT_AFTER};
use crate::storage::{Storage, ViolationQuery, ViolationRecord};
use auth::Role;

/// The default `http_listen`: loopback, where plain HTTP is allowed.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7480";

/// Tunables of the API, from the collector's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiConfig {
    /// A host not heard from for longer than this is `silent` (default: 3 × the 30 s
    /// heartbeat interval).
    pub silent_after: Duration,
    /// Default and maximum `limit` of the list endpoints.
    pub limits: Limits,
    /// A request that takes longer (a slow database) is answered 503 `timeout`.
    pub request_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            silent_after: DEFAULT_SILENT_AFTER,
            limits: Limits::default(),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// `http_listen` is not a loopback address and TLS is off.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "http_listen {0} is not a loopback address, so the API must use TLS there: bearer tokens \
     never cross a network in the clear (set http_tls = true, the default for such addresses, \
     or listen on 127.0.0.1 or ::1)"
)]
pub struct PlainNonLoopback(pub SocketAddr);

/// Whether `addr` is a loopback address (IPv4-mapped loopback included).
pub fn is_loopback(addr: SocketAddr) -> bool {
    match addr {
        SocketAddr::V4(a) => a.ip().is_loopback(),
        SocketAddr::V6(a) => {
            a.ip().is_loopback() || a.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Refuses plain HTTP on a non-loopback address. For the config validation (exit 64 on
/// failure) and for [`serve`].
pub fn check_listen_addr(addr: SocketAddr, tls: bool) -> Result<(), PlainNonLoopback> {
    if tls || is_loopback(addr) {
        Ok(())
    } else {
        Err(PlainNonLoopback(addr))
    }
}

/// What every handler shares. Features add fields; none are reordered.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) store: Arc<dyn Storage>,
    pub(crate) config: ApiConfig,
    /// The flagging policy and thresholds `explain` and the image views judge by (the
    /// reconciler's).
    pub(crate) policy: Arc<crate::reconcile::Policy>,
    /// Raw Ed25519 keys a pushed baseline must be signed with.
    pub(crate) trusted_keys: Arc<Vec<[u8; 32]>>,
}

/// The API's routes over `store`. Every response is JSON, errors included. Every route but
/// `/healthz` needs a bearer token (unknown paths too: 401 before 404); each group needs its
/// role.
pub fn router(store: Arc<dyn Storage>, config: ApiConfig) -> Router {
    router_with(store, config, Arc::default(), Arc::default())
}

/// [`router`], judging hosts by `policy` and accepting baselines signed by one of
/// `trusted_keys`.
pub fn router_with(
    store: Arc<dyn Storage>,
    config: ApiConfig,
    policy: Arc<crate::reconcile::Policy>,
    trusted_keys: Arc<Vec<[u8; 32]>>,
) -> Router {
    let state = AppState {
        store: store.clone(),
        config,
        policy,
        trusted_keys,
    };
    let auditor = Router::new()
        .route("/api/v1/hosts", get(list_hosts))
        .route("/api/v1/hosts/{host_id}", get(one_host))
        .route("/api/v1/hosts/{host_id}/violations", get(host_violations))
        .route("/api/v1/violations", get(search_violations))
        .route("/api/v1/security-events", get(security_events))
        .route("/api/v1/openapi.json", get(openapi))
        .merge(audit::auditor_routes())
        .merge(crate::export::http::auditor_routes())
        .merge(lifecycle::auditor_routes())
        .merge(rebuilds::auditor_routes());
    let operator = lifecycle::operator_routes().merge(rebuilds::operator_routes());
    let admin = access::admin_routes().merge(lifecycle::admin_routes());
    Router::new()
        .merge(auditor.route_layer(auth::require(Role::Auditor)))
        .merge(operator.route_layer(auth::require(Role::Operator)))
        .merge(admin.route_layer(auth::require(Role::Admin)))
        .route("/healthz", get(healthz))
        .method_not_allowed_fallback(wrong_method)
        .fallback(unknown_endpoint)
        .layer(middleware::from_fn_with_state(
            auth::Authenticator::new(store),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            config.request_timeout,
            time_limit,
        ))
        .with_state(state)
}

/// Serves the API over plain HTTP on `listener` until `shutdown` completes, then lets
/// in-flight requests finish. Refuses a listener that is not on loopback (see
/// [`check_listen_addr`]; use [`serve_tls`] there).
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Storage>,
    config: ApiConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_router(listener, router(store, config), shutdown).await
}

/// Serves `router` (from [`router_with`]) like [`serve`].
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    check_listen_addr(addr, false)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tracing::info!(%addr, "HTTP API listening (plain HTTP, loopback)");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves the API over TLS (`tls`: [`crate::tls::http_server_config`]) on `listener`, on any
/// address, until `shutdown` completes. Handshakes run on their own tasks (at most
/// `max_connections` connections, each handshake within `handshake_timeout`), so a slow
/// client cannot stall the accept loop.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Storage>,
    config: ApiConfig,
    tls: Arc<rustls::ServerConfig>,
    options: crate::tls::AcceptOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls_router(listener, router(store, config), tls, options, shutdown).await
}

/// Serves `router` (from [`router_with`]) like [`serve_tls`].
pub async fn serve_tls_router(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Arc<rustls::ServerConfig>,
    options: crate::tls::AcceptOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Small: the accept loop's semaphore is what bounds connections.
    let (conn_tx, conn_rx) = tokio::sync::mpsc::channel(16);
    let stats = Arc::new(crate::tls::TlsStats::default());
    let accept = tokio::spawn(crate::tls::accept_loop(
        listener, tls, options, conn_tx, stats, stop_rx,
    ));
    tracing::info!(%addr, "HTTP API listening (TLS)");
    let result = axum::serve(
        TlsListener {
            incoming: conn_rx,
            addr,
        },
        router,
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    let _ = accept.await;
    result
}

/// Handshaken TLS connections from [`crate::tls::accept_loop`], as axum's listener.
struct TlsListener {
    incoming: tokio::sync::mpsc::Receiver<crate::tls::TlsConnection>,
    addr: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = crate::tls::TlsConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(conn) => {
                let peer = conn.remote_addr();
                (conn, peer)
            }
            // The accept loop stopped (shutdown): no more connections; graceful shutdown
            // ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Why a middleware rather than a tower layer: the answer must be the API's JSON error, and
/// tower's `Timeout` would need an extra error-handling layer and crate for that.
async fn time_limit(State(limit): State<Duration>, req: Request, next: Next) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Timeout(limit).into_response(),
    }
}

pub(crate) type Pairs = Vec<(String, String)>;

/// The query string as name/value pairs; a malformed one is a 400 like any bad parameter.
pub(crate) fn pairs(q: Result<Query<Pairs>, QueryRejection>) -> Result<Pairs, ApiError> {
    q.map(|Query(p)| p).map_err(|e| {
        ApiError::BadParameter(ParamError {
            parameter: "(query string)".into(),
            message: e.body_text(),
        })
    })
}

fn host_id(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(h)| h).map_err(|e| {
        ApiError::BadParameter(ParamError {
            parameter: "host_id".into(),
            message: e.body_text(),
        })
    })
}

async fn wrong_method(method: axum::http::Method) -> ApiError {
    ApiError::MethodNotAllowed(method.to_string())
}

async fn unknown_endpoint(uri: Uri) -> ApiError {
    ApiError::UnknownEndpoint(uri.path().to_string())
}

/// The OpenAPI 3.1 description of this API (`collector/openapi.json`), embedded at build time.
/// `collector/tests/openapi.rs` checks it against the router and the real responses.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// `GET /api/v1/openapi.json` (auditor): [`OPENAPI`] as it is. Behind a token like every
/// route but `/healthz`: an unauthenticated caller learns nothing about the API, not even
/// the collector's version; the same document is in the source tree for anyone.
async fn openapi(q: Result<Query<Pairs>, QueryRejection>) -> Result<Response, ApiError> {
    params::parse_none(&pairs(q)?)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response())
}

async fn healthz(State(st): State<AppState>) -> Response {
    // The cheapest read the trait offers: an index probe that returns nothing.
    match st.store.security_events(i64::MAX, 1).await {
        Ok(_) => Json(api::Health {
            status: "ok".into(),
            storage: st.store.backend().into(),
            error: None,
        })
        .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(api::Health {
                status: "unavailable".into(),
                storage: st.store.backend().into(),
                error: Some(e.to_string()),
            }),
        )
            .into_response(),
    }
}

async fn list_hosts(
    State(st): State<AppState>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<api::HostList>, ApiError> {
    let filter = HostFilter::parse(&pairs(q)?)?;
    let hosts = st.store.list_hosts().await?;
    let lifecycles = lifecycle_names(&st).await?;
    let now = now_ms();
    let silent_after = st.config.silent_after;
    let hosts = hosts
        .iter()
        .filter(|h| {
            filter
                .state
                .is_none_or(|want| host_state::derive(h, now, silent_after) == want)
        })
        .map(|h| {
            let mut out = convert::host(h, now, silent_after);
            out.lifecycle = lifecycle_of(&lifecycles, &h.host_id);
            out
        })
        .collect();
    Ok(Json(api::HostList {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now),
        silent_after_seconds: silent_after.as_secs(),
        hosts,
    }))
}

async fn one_host(
    State(st): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<api::HostDetail>, ApiError> {
    let id = host_id(id)?;
    params::parse_none(&pairs(q)?)?;
    let host = st.store.host(&id).await?.ok_or(ApiError::UnknownHost(id))?;
    let lifecycles = lifecycle_names(&st).await?;
    let now = now_ms();
    let mut out = convert::host(&host, now, st.config.silent_after);
    out.lifecycle = lifecycle_of(&lifecycles, &host.host_id);
    Ok(Json(api::HostDetail {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now),
        silent_after_seconds: st.config.silent_after.as_secs(),
        host: out,
    }))
}

/// Host id → lifecycle state, for the host list and detail.
async fn lifecycle_names(
    st: &AppState,
) -> Result<std::collections::HashMap<String, crate::lifecycle::Lifecycle>, ApiError> {
    Ok(st
        .store
        .lifecycle_states()
        .await?
        .into_iter()
        .map(|s| (s.host_id, s.state))
        .collect())
}

fn lifecycle_of(
    m: &std::collections::HashMap<String, crate::lifecycle::Lifecycle>,
    host_id: &str,
) -> String {
    m.get(host_id)
        .copied()
        .unwrap_or(crate::lifecycle::Lifecycle::Enrolled)
        .name()
        .to_string()
}

async fn host_violations(
    State(st): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<api::ViolationList>, ApiError> {
    let id = host_id(id)?;
    let p = HostViolations::parse(&pairs(q)?, st.config.limits)?;
    if st.store.host(&id).await?.is_none() {
        return Err(ApiError::UnknownHost(id));
    }
    let search = ViolationSearch {
        query: ViolationQuery {
            host_id: Some(id),
            include_resolved: p.include_resolved,
            limit: p.limit,
            ..Default::default()
        },
        kind: None,
    };
    run_search(&st, search).await
}

async fn search_violations(
    State(st): State<AppState>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<api::ViolationList>, ApiError> {
    let search = ViolationSearch::parse(&pairs(q)?, now_ms(), st.config.limits)?;
    run_search(&st, search).await
}

/// Asks storage for one row more than the caller's limit, to know whether the answer is
/// truncated. A kind filter that storage cannot express exactly (file and package kinds share
/// storage's numbers) is applied here, over a fetch of the maximum limit.
async fn run_search(
    st: &AppState,
    search: ViolationSearch,
) -> Result<Json<api::ViolationList>, ApiError> {
    let ViolationSearch { mut query, kind } = search;
    let limit = query.limit;
    let fetch = if kind.is_some() {
        st.config.limits.max.max(limit)
    } else {
        limit
    };
    query.limit = fetch.saturating_add(1);
    let rows: Vec<ViolationRecord> = st.store.search_violations(query).await?;
    let storage_truncated = rows.len() > fetch as usize;
    let mut matched: Vec<ViolationRecord> = rows
        .into_iter()
        .take(fetch as usize)
        .filter(|r| kind.is_none_or(|k| k.matches(&r.item)))
        .collect();
    let truncated = storage_truncated || matched.len() > limit as usize;
    matched.truncate(limit as usize);
    Ok(Json(api::ViolationList {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now_ms()),
        limit,
        truncated,
        violations: matched.iter().map(convert::violation).collect(),
    }))
}

async fn security_events(
    State(st): State<AppState>,
    q: Result<Query<Pairs>, QueryRejection>,
) -> Result<Json<api::SecurityEventList>, ApiError> {
    let now = now_ms();
    let f = EventFilter::parse(&pairs(q)?, now, st.config.limits)?;
    let mut events = st
        .store
        .security_events(f.since_ms, f.limit.saturating_add(1))
        .await?;
    let truncated = events.len() > f.limit as usize;
    events.truncate(f.limit as usize);
    Ok(Json(api::SecurityEventList {
        schema: SCHEMA.into(),
        generated_at: rfc3339_ms(now),
        limit: f.limit,
        truncated,
        events: events.iter().map(convert::security_event).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_on_loopback() {
        for ok in [
            "127.0.0.1:7480",
            "127.1.2.3:1",
            "[::1]:7480",
            "[::ffff:127.0.0.1]:80",
        ] {
            assert!(
                check_listen_addr(ok.parse().unwrap(), false).is_ok(),
                "{ok}"
            );
            assert!(check_listen_addr(ok.parse().unwrap(), true).is_ok(), "{ok}");
        }
        for bad in [
            "0.0.0.0:7480",
            "10.0.0.1:7480",
            "[::]:7480",
            "[2001:db8::1]:80",
        ] {
            let err = check_listen_addr(bad.parse().unwrap(), false).unwrap_err();
            assert!(err.to_string().contains("must use TLS"), "{err}");
            assert!(
                check_listen_addr(bad.parse().unwrap(), true).is_ok(),
                "{bad}"
            );
        }
        assert!(check_listen_addr(DEFAULT_LISTEN.parse().unwrap(), false).is_ok());
    }
}
