//! The gRPC server: one TLS port serving `Enrollment`, `Ingest`, `grpc.health.v1.Health` and
//! reflection, and its lifecycle (bind, ready, graceful shutdown).
//!
//! The whole public surface for starting a collector in-process (tests, load generators) or from
//! the binary:
//!
//! ```no_run
//! # async fn f(settings: driftwatch_collector::config::Settings,
//! #            store: std::sync::Arc<dyn driftwatch_collector::storage::Storage>) {
//! let server = driftwatch_collector::server::Server::bind(settings, store).await.unwrap();
//! let addr = server.local_addr();          // port 0 in the settings → the real port
//! let ca_pem = server.ca().cert_pem().to_string();
//! server.run(async { /* resolves when the server should stop */ }).await.unwrap();
//! # }
//! ```
//!
//! Shutdown order: stop accepting, tell every stream to stop reading, let the writer commit and
//! the streams ack what they already received, end the streams with UNAVAILABLE, wait for the
//! connections (at most the grace period), then the last heartbeats are written.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use driftwatch_proto::v1::enrollment_server::EnrollmentServer;
use driftwatch_proto::v1::ingest_server::IngestServer;
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

use crate::ca::{CaError, CertificateAuthority};
use crate::config::{HttpTls, Settings};
use crate::enroll::EnrollmentService;
use crate::export::syslog::Forwarder;
use crate::http::ApiConfig;
use crate::ingest::IngestService;
use crate::revocation::Revocations;
use crate::storage::{Storage, StorageError};
use crate::tls::{self, AcceptOptions, TlsError, TlsStats};

/// Largest Enroll/Renew request (a CSR, a token and a few labels).
const MAX_ENROLLMENT_MESSAGE: usize = 64 * 1024;

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("HTTP API TLS: {0}")]
    HttpTls(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Export(#[from] crate::export::syslog::ForwarderError),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The `[actions]` secret or CA file could not be used.
    #[error("configuration: {0}")]
    Actions(crate::config::ConfigError),
}

/// A collector bound to its port, not yet serving.
#[derive(Debug)]
pub struct Server {
    settings: Settings,
    store: Arc<dyn Storage>,
    ca: Arc<CertificateAuthority>,
    listener: tokio::net::TcpListener,
    local_addr: SocketAddr,
    http_listener: tokio::net::TcpListener,
    http_addr: SocketAddr,
    /// `None`: plain HTTP (loopback only).
    http_tls: Option<Arc<rustls::ServerConfig>>,
    tls: Arc<rustls::ServerConfig>,
    stats: Arc<TlsStats>,
    forwarder: Option<Forwarder>,
}

impl Server {
    /// Opens (or creates) the CA, issues the server certificate and binds the gRPC port.
    /// `store` must already be open.
    pub async fn bind(settings: Settings, store: Arc<dyn Storage>) -> Result<Server, ServeError> {
        let ca_source = settings.ca.clone();
        let names = settings.server_names.clone();
        // Key generation and a few small file writes: off the async workers.
        let want_api_cert = settings.http_tls == HttpTls::CollectorCa;
        let (ca, identity, api_identity) = tokio::task::spawn_blocking(move || {
            let ca = CertificateAuthority::open(&ca_source)?;
            let identity = ca.issue_server(&names)?;
            let api_identity = if want_api_cert {
                Some(ca.issue_server(&names)?)
            } else {
                None
            };
            Ok::<_, CaError>((ca, identity, api_identity))
        })
        .await
        .map_err(|e| CaError::Invalid {
            path: settings.state_dir.clone(),
            detail: format!("CA task failed: {e}"),
        })??;
        let tls = tls::server_config(&ca, identity)?;
        let http_tls = match (&settings.http_tls, api_identity) {
            (HttpTls::Off, _) => None,
            (HttpTls::CollectorCa, Some(id)) => Some(tls::http_server_config(id)?),
            (HttpTls::Given { cert, key }, _) => {
                Some(tls::http_server_config(load_identity(cert, key)?)?)
            }
            (HttpTls::CollectorCa, None) => {
                return Err(ServeError::HttpTls("no API certificate was issued".into()));
            }
        };
        crate::http::check_listen_addr(settings.http_listen, http_tls.is_some())
            .map_err(|e| ServeError::HttpTls(e.to_string()))?;
        let addr = settings.grpc_listen;
        let listener = tls::bind(addr).map_err(|source| ServeError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ServeError::Bind { addr, source })?;
        let http_addr = settings.http_listen;
        let http_listener = tokio::net::TcpListener::bind(http_addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: http_addr,
                source,
            })?;
        let http_addr = http_listener
            .local_addr()
            .map_err(|source| ServeError::Bind {
                addr: http_addr,
                source,
            })?;
        // The CA file is read now, so a bad one stops the start rather than the forwarder.
        let forwarder = settings
            .export
            .syslog
            .clone()
            .map(|s| Forwarder::new(store.clone(), s))
            .transpose()?;
        tracing::info!(
            %local_addr,
            %http_addr,
            backend = store.backend(),
            ca_fingerprint = ca.fingerprint(),
            "collector bound"
        );
        Ok(Server {
            settings,
            store,
            ca: Arc::new(ca),
            listener,
            local_addr,
            http_listener,
            http_addr,
            http_tls,
            tls,
            stats: Arc::new(TlsStats::default()),
            forwarder,
        })
    }

    /// The address the gRPC port is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address the HTTP JSON API is bound to.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The collector CA (its certificate is the agents' trust anchor).
    pub fn ca(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    /// Counters of the TLS accept loop.
    pub fn tls_stats(&self) -> Arc<TlsStats> {
        self.stats.clone()
    }

    /// Serves until `shutdown` resolves, then shuts down gracefully (see the module doc).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let Server {
            settings,
            store,
            ca,
            listener,
            local_addr,
            http_listener,
            http_addr,
            http_tls,
            tls,
            stats,
            forwarder,
        } = self;
        let tuning = &settings.tuning;
        // One flag every task watches: accept loop, streams, refreshers.
        let (stop_tx, stop_rx) = watch::channel(false);

        let revocations =
            Revocations::start(store.clone(), tuning.revocation_refresh, stop_rx.clone()).await?;
        // The reconciler's open rows, which the ingest moves along with the reports it applies.
        let open_rows = Arc::new(crate::reconcile::OpenCache::background(
            settings.reconcile_interval,
        ));
        let (ingest, ingest_tasks) = IngestService::start(
            &settings,
            store.clone(),
            revocations.clone(),
            open_rows.clone(),
            stop_rx.clone(),
        );
        let enrollment = EnrollmentService::new(
            ca,
            store.clone(),
            revocations,
            settings.client_cert_lifetime,
        );
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<EnrollmentServer<EnrollmentService>>()
            .await;
        health.set_serving::<IngestServer<IngestService>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(driftwatch_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let max_message = settings.max_message_bytes.get();

        // Accepted, handshaken connections travel to tonic through this channel; small, as the
        // accept loop's semaphore is what bounds connections.
        let (conn_tx, conn_rx) = mpsc::channel(64);
        let accept = tokio::spawn(tls::accept_loop(
            listener,
            tls,
            AcceptOptions {
                max_connections: settings.max_connections.get(),
                handshake_timeout: tuning.handshake_timeout,
            },
            conn_tx,
            stats,
            stop_rx.clone(),
        ));
        let incoming = ReceiverStream::new(conn_rx).map(Ok::<_, std::io::Error>);

        let mut stop_for_tonic = stop_rx.clone();
        // Boxed, not pinned on the stack: it is dropped explicitly during shutdown.
        let mut serve = Box::pin(
            tonic::transport::Server::builder()
                // Many mostly idle agents: small windows (memory is committed only as data arrives,
                // but they cap what one connection can buffer), few streams per connection, and
                // pings to notice dead peers behind NATs and load balancers.
                .initial_stream_window_size(256 * 1024)
                .initial_connection_window_size(512 * 1024)
                .max_concurrent_streams(8)
                .concurrency_limit_per_connection(8)
                .http2_keepalive_interval(Some(Duration::from_secs(60)))
                .http2_keepalive_timeout(Some(Duration::from_secs(20)))
                .http2_max_header_list_size(16 * 1024)
                .accept_http1(false)
                .add_service(health_service)
                .add_service(reflection)
                .add_service(
                    EnrollmentServer::new(enrollment)
                        .max_decoding_message_size(MAX_ENROLLMENT_MESSAGE)
                        .max_encoding_message_size(MAX_ENROLLMENT_MESSAGE),
                )
                .add_service(
                    IngestServer::new(ingest)
                        .max_decoding_message_size(max_message)
                        .max_encoding_message_size(max_message),
                )
                .serve_with_incoming_shutdown(incoming, async move {
                    stop_requested(&mut stop_for_tonic).await;
                }),
        );

        // The read API for people: it shares the store, and stops with everything else.
        // Silent: three heartbeats missed. Heartbeats reach the database in batches every
        // `heartbeat_flush`, so the stored "last heard" lags by up to that much more; without
        // it a host heartbeating on time flaps silent/clean when the interval is short.
        let api_config = ApiConfig {
            silent_after: 3 * settings.heartbeat_interval.as_duration() + tuning.heartbeat_flush,
            ..ApiConfig::default()
        };
        // The reconciler judges hosts by the same policy `explain` shows.
        let policy = Arc::new(crate::reconcile::Policy {
            flagging: settings.flagging.clone(),
            silent_after: api_config.silent_after,
            image_defect_ratio: settings.image_defect_ratio.0,
            interval: settings.reconcile_interval,
        });
        let reconciler =
            crate::reconcile::spawn(store.clone(), policy.clone(), open_rows, stop_rx.clone());
        let mut stop_for_http = stop_rx.clone();
        let http_stop = async move { stop_requested(&mut stop_for_http).await };
        let router = crate::http::router_with(
            store.clone(),
            api_config,
            policy,
            Arc::new(settings.trusted_keys.clone()),
        );
        let http = match http_tls {
            None => tokio::spawn(crate::http::serve_router(http_listener, router, http_stop)),
            Some(config) => tokio::spawn(crate::http::serve_tls_router(
                http_listener,
                router,
                config,
                AcceptOptions {
                    max_connections: settings.max_connections.get(),
                    handshake_timeout: tuning.handshake_timeout,
                },
                http_stop,
            )),
        };

        // The SIEM forwarder, when configured: stops with everything else.
        let forwarder = forwarder.map(|f| f.spawn(stop_rx.clone()));

        // Rebuild actions, when configured: one task, stopped with everything else.
        let dispatcher = match settings.actions.clone() {
            Some(actions) => Some(
                crate::actions::spawn(store.clone(), actions, stop_rx.clone())
                    .map_err(ServeError::Actions)?,
            ),
            None => None,
        };

        notify_systemd(&[sd_notify::NotifyState::Ready]);
        let watchdog = tokio::spawn(feed_watchdog());
        tracing::info!(%local_addr, %http_addr, "collector serving");
        let early = tokio::select! {
            r = &mut serve => Some(r),
            () = shutdown => None,
        };
        if let Some(result) = early {
            watchdog.abort();
            let _ = stop_tx.send(true);
            let _ = reconciler.await;
            ingest_tasks.finish(tuning.shutdown_grace).await;
            if let Some(f) = forwarder {
                let _ = f.await;
            }
            finish_dispatcher(dispatcher, &settings).await;
            return result.map_err(ServeError::from);
        }

        tracing::info!("shutting down: no new connections, draining streams");
        notify_systemd(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("draining report streams"),
        ]);
        health
            .set_not_serving::<IngestServer<IngestService>>()
            .await;
        health
            .set_not_serving::<EnrollmentServer<EnrollmentService>>()
            .await;
        let _ = stop_tx.send(true);
        let result = match tokio::time::timeout(tuning.shutdown_grace, &mut serve).await {
            Ok(r) => r.map_err(ServeError::from),
            Err(_) => {
                tracing::warn!(
                    grace = ?tuning.shutdown_grace,
                    "connections still open after the grace period; closing them"
                );
                Ok(())
            }
        };
        // Dropping the server drops the services and with them the writer's last senders
        // (once the stream tasks have ended), so the writer finishes its queue and stops.
        drop(serve);
        let _ = accept.await;
        ingest_tasks.finish(tuning.shutdown_grace).await;
        finish_dispatcher(dispatcher, &settings).await;
        if let Err(e) = reconciler.await {
            tracing::warn!(error = %e, "reconciler task failed");
        }
        match http.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "HTTP API ended with an error"),
            Err(e) => tracing::warn!(error = %e, "HTTP API task failed"),
        }
        if let Some(f) = forwarder
            && let Err(e) = f.await
        {
            tracing::warn!(error = %e, "syslog forwarder task failed");
        }
        watchdog.abort();
        tracing::info!("collector stopped");
        result
    }
}

/// An operator-provided certificate chain (PEM, leaf first) and private key (PEM).
fn load_identity(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<crate::ca::ServerIdentity, ServeError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServeError::HttpTls(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(ServeError::HttpTls(format!(
            "{}: no certificate in it",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServeError::HttpTls(format!("{}: {e}", key.display())))?;
    Ok(crate::ca::ServerIdentity {
        chain,
        key,
        // Not ours to renew; rustls checks nothing here and clients check the dates.
        not_after_ms: i64::MAX,
    })
}

/// Waits for the rebuild dispatcher's current round (its deliveries are bounded by the action
/// timeout) so no attempt is left half-recorded; gives up after the grace period plus that
/// timeout.
async fn finish_dispatcher(task: Option<tokio::task::JoinHandle<()>>, settings: &Settings) {
    let Some(task) = task else { return };
    let limit = settings.tuning.shutdown_grace
        + settings
            .actions
            .as_ref()
            .map_or(Duration::ZERO, |a| a.timeout);
    if tokio::time::timeout(limit, task).await.is_err() {
        tracing::warn!("the rebuild dispatcher did not stop in time");
    }
}

/// Binds and serves until `shutdown` resolves: [`Server::bind`] then [`Server::run`].
pub async fn serve(
    settings: Settings,
    store: Arc<dyn Storage>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    Server::bind(settings, store).await?.run(shutdown).await
}

/// Tells systemd (when running under it with `Type=notify`) how the service is doing; a no-op
/// otherwise.
fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Pings systemd's watchdog (`WatchdogSec=`) at a third of its interval for as long as the
/// runtime schedules this task: a wedged runtime (every worker blocked) gets the collector
/// restarted. Storage outages do not stop the pings: a restart would not cure them. Returns at
/// once outside systemd or without a watchdog.
async fn feed_watchdog() {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = (Duration::from_micros(usec) / 3).max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        notify_systemd(&[sd_notify::NotifyState::Watchdog]);
    }
}

/// Resolves once the stop flag is set (or its sender is gone). Returns nothing, so no borrow
/// of the watch value is held across an await.
pub(crate) async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
