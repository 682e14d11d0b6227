//! `driftwatch-agent run`: the daemon. It scans on a schedule, keeps the host's violation set,
//! spools every change as a report and streams the spool to the collector.
//!
//! ```text
//! timer / SIGHUP / SIGUSR1 ─▶ scan thread ─check─▶ set ─delta─▶ outbox (spool, fsync) ─┐
//!                                                                  ▲ ack / resync        │ notify
//! collector ◀──────────── session (Hello, Welcome, reports, heartbeats) ◀────────────────┘
//! ```
//!
//! - [`config`]: the configuration in stages; [`outbox`]: the spool and the set its reports
//!   lead to; [`scanner`]: the scan thread; [`session`]: one report stream; [`backoff`],
//!   [`notify`] (systemd), [`status`] (`status.json`).
//! - Tasks: the event loop here (signals, scan timer, connections with backoff, certificate
//!   renewal) on a small tokio runtime; the scan thread; `spawn_blocking` for spool I/O.
//! - Shutdown (SIGTERM, SIGINT): stop asking for scans, let a running scan finish for a few
//!   seconds (its result is not spooled), drain acks for a moment, close the stream, wait until
//!   no spool write is in progress, `STOPPING=1`.

pub mod backoff;
pub mod config;
pub mod notify;
pub mod outbox;
pub mod scanner;
pub mod session;
pub mod status;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};

use crate::identity::Identity;
use crate::spool::Spool;
use backoff::Backoff;
use config::{ConfigError, Inputs, Settings};
use outbox::Outbox;
use scanner::{ScanQueue, ScanRequest, Shared};
use session::{HelloFacts, SessionEnd};
use status::Status;

/// How the daemon failed to start or run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Exit 64: systemd does not restart on it.
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    /// Exit 64: enrolling at start failed in a way retrying cannot fix (token refused, host id
    /// refused, token unreadable).
    #[error("enrollment at start: {0}")]
    Enrollment(String),
    #[error(transparent)]
    Spool(#[from] crate::spool::SpoolError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Retry delay of a failed certificate renewal while the old certificate is still valid.
const RENEW_RETRY: Duration = Duration::from_secs(300);
/// How long shutdown waits for a running scan.
const SCAN_GRACE: Duration = Duration::from_secs(5);

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(settings: Settings, inputs: Inputs) -> Result<(), DaemonError> {
    // Signal handlers first: until one is installed, SIGHUP and SIGUSR1 keep their default
    // action and would kill the daemon, so a "scan now" (or `systemctl reload`) just after
    // start must find them already in place.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let scan_now = ScanSignals {
        hup: signal(SignalKind::hangup())?,
        usr1: signal(SignalKind::user_defined1())?,
    };
    let state_dir = settings.state_dir.clone();
    let liveness = notify::Liveness::new();
    let identity = match Identity::load(&state_dir) {
        Err(crate::identity::IdentityError::NotEnrolled { .. })
            if settings.enrollment.is_some() =>
        {
            tokio::select! {
                r = enroll_at_start(&settings, &liveness) => r?,
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
            }
        }
        other => other?,
    };
    tracing::info!(host_id = %identity.host_id, collector = %settings.collector, "starting");

    let spool_dir = state_dir.join("spool");
    let limits = settings.spool;
    let (spool, recovery) = tokio::task::spawn_blocking(move || Spool::open(&spool_dir, limits))
        .await
        .map_err(std::io::Error::other)??;
    if !recovery.is_clean() {
        tracing::warn!(
            lost = recovery.records_lost,
            recovered = recovery.records_recovered,
            bytes_discarded = recovery.bytes_discarded,
            new_epoch = recovery.epoch_restarted(),
            "spool recovered with losses"
        );
        for p in &recovery.problems {
            tracing::warn!(
                "spool: {}: offset {}: {}",
                p.file.display(),
                p.offset,
                p.kind
            );
        }
    }
    let outbox = Outbox::new(spool, settings.report_limits, recovery.records_lost);
    let status = Status::new(
        &identity.host_id,
        &settings.collector.text,
        identity.not_after_unix,
    );
    let shared = Arc::new(Shared {
        settings,
        inputs,
        outbox: std::sync::Mutex::new(outbox),
        status: std::sync::Mutex::new(status),
        liveness,
        records_ready: Notify::new(),
        shutting_down: AtomicBool::new(false),
    });
    // The first Hello names the image and baseline root even before the first scan is done.
    let s = shared.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let st = &s.settings;
        match crate::baseline::read(
            &st.baseline,
            &s.inputs.trusted_keys,
            crate::time::now_unix(),
        ) {
            Ok(b) => {
                s.status().baseline = status::BaselineStatus {
                    image_id: b.header.image_id.clone(),
                    image_version: b.header.image_version.clone(),
                    merkle_root: crate::report::hex(&b.merkle_root),
                }
            }
            Err(e) => tracing::warn!("baseline {}: {e}", st.baseline.display()),
        }
    })
    .await;
    let (queue, scan_thread) = scanner::start(shared.clone())?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let facts = HelloFacts {
        host_id: identity.host_id.clone(),
        boot_id: boot_id(),
    };
    let connection = tokio::spawn(connection_loop(
        shared.clone(),
        identity,
        facts,
        shutdown_rx.clone(),
    ));
    let scheduler = tokio::spawn(schedule(shared.clone(), queue, scan_now, shutdown_rx));

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    notify::stopping();
    shared.shutting_down.store(true, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    // The scheduler owns the only ScanQueue: when it ends, the scan thread's channel closes.
    let _ = scheduler.await;
    let _ = connection.await;
    let joined = tokio::task::spawn_blocking(move || {
        let _ = scan_thread.join();
    });
    if tokio::time::timeout(SCAN_GRACE, joined).await.is_err() {
        tracing::info!("abandoning the running scan (its result would not be reported)");
    }
    // No spool write may be cut short by the exit: wait until none is in progress.
    let s = shared.clone();
    let _ = tokio::task::spawn_blocking(move || {
        drop(s.outbox());
        s.status().set_collector("stopped", None);
        s.write_status();
    })
    .await;
    tracing::info!("stopped");
    Ok(())
}

/// First start of a host without an identity and with `[enrollment]` configured: enrolls with
/// the token from its file or credential, retrying with backoff while the collector cannot be
/// reached (a fleet booting before its collector). The service is ready meanwhile: enrolling
/// is its work, and a start timeout must not turn an unreachable collector into a restart
/// loop. A refusal (token, host id) or an unreadable token ends the daemon (exit 64).
async fn enroll_at_start(
    settings: &Settings,
    liveness: &notify::Liveness,
) -> Result<Identity, DaemonError> {
    use crate::enroll::EnrollOptions;
    let Some(e) = &settings.enrollment else {
        return Err(DaemonError::Enrollment("no [enrollment] configured".into()));
    };
    let token = e
        .token(config::credentials_dir().as_deref())
        .map_err(DaemonError::Enrollment)?;
    let opts = EnrollOptions {
        collector: settings.collector.clone(),
        trust: e.trust.clone(),
        token,
        host_id: e.host_id.clone(),
        labels: e.labels.clone(),
        state_dir: settings.state_dir.clone(),
        force: false,
    };
    liveness.ready();
    let mut backoff = Backoff::new();
    loop {
        notify::status(&format!("enrolling with {}", settings.collector));
        match crate::enroll::enroll(&opts).await {
            Ok(id) => {
                tracing::info!(host_id = %id.host_id, collector = %settings.collector, "enrolled");
                return Ok(id);
            }
            Err(err) if retryable(&err) => {
                let delay = backoff.next_delay(backoff::random_u32());
                tracing::warn!("enrollment failed, retrying in {delay:.1?}: {err}");
                notify::status(&format!("enrollment failed, retrying: {err}"));
                let until = tokio::time::Instant::now() + delay;
                let mut tick = tokio::time::interval(liveness.tick_interval());
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        _ = tick.tick() => liveness.tick(),
                    }
                }
            }
            Err(err) => return Err(DaemonError::Enrollment(err.to_string())),
        }
    }
}

/// Whether an enrollment failure may go away by itself: the collector unreachable or
/// overloaded, not a refusal of what was asked.
fn retryable(err: &crate::enroll::EnrollError) -> bool {
    use crate::enroll::EnrollError;
    match err {
        EnrollError::Transport(crate::transport::TransportError::Connect { .. }) => true,
        EnrollError::Refused { code, .. } => matches!(
            code,
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::ResourceExhausted
                | tonic::Code::Aborted
                | tonic::Code::Internal
                | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// The signals that ask for a scan at once, installed when the daemon starts.
#[derive(Debug)]
struct ScanSignals {
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
}

/// Asks for scans: at start, then every interval (±10 %), at once on SIGHUP or SIGUSR1. Every
/// `full_rehash_interval` a scan ignores the scan cache.
async fn schedule(
    shared: Arc<Shared>,
    queue: ScanQueue,
    scan_now: ScanSignals,
    mut shutdown: watch::Receiver<bool>,
) {
    let ScanSignals { mut hup, mut usr1 } = scan_now;
    let s = &shared.settings;
    let mut last_full = tokio::time::Instant::now();
    let mut first = true;
    loop {
        let full_rehash = !first && last_full.elapsed() >= s.full_rehash_interval;
        if queue.request(ScanRequest { full_rehash }) && full_rehash {
            last_full = tokio::time::Instant::now();
        }
        first = false;
        let wait = backoff::jittered(s.scan_interval, backoff::random_u32());
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = hup.recv() => tracing::info!("SIGHUP: scanning now"),
            _ = usr1.recv() => tracing::info!("SIGUSR1: scanning now"),
            _ = shutdown.changed() => return,
        }
    }
}

/// Connects, streams, and reconnects with backoff; renews the certificate when it is due.
async fn connection_loop(
    shared: Arc<Shared>,
    mut identity: Identity,
    facts: HelloFacts,
    mut shutdown: watch::Receiver<bool>,
) {
    let url = shared.settings.collector.clone();
    let state_dir = shared.settings.state_dir.clone();
    let mut backoff = Backoff::new();
    let mut renew_retry_at = 0i64;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let now = crate::time::now_unix();
        if now >= identity.renew_at() && now >= renew_retry_at {
            match crate::enroll::renew(&url, &state_dir, &mut identity).await {
                Ok(()) => {
                    tracing::info!(
                        not_after = %crate::time::format_unix(identity.not_after_unix),
                        "client certificate renewed"
                    );
                    shared.status().certificate_not_after =
                        crate::time::format_unix(identity.not_after_unix);
                }
                Err(e) => {
                    renew_retry_at = now + RENEW_RETRY.as_secs() as i64;
                    if now >= identity.not_after_unix {
                        tracing::error!(
                            "the client certificate expired and cannot be renewed ({e}): enroll this host again"
                        );
                    } else {
                        tracing::warn!("certificate renewal failed, retrying later: {e}");
                    }
                }
            }
        }
        let renew_in = (identity.renew_at().max(renew_retry_at) - crate::time::now_unix()).max(1);
        let renew_at = tokio::time::Instant::now() + Duration::from_secs(renew_in as u64);

        let mut connected = false;
        let result = async {
            let auth = identity
                .client_auth()
                .map_err(|e| format!("identity: {e}"))?;
            let config = crate::transport::client_config(identity.server_trust(), Some(auth))
                .map_err(|e| e.to_string())?;
            let channel = crate::transport::connect(&url, config)
                .await
                .map_err(|e| format!("{e}: {}", error_chain(&e)))?;
            session::run(
                &shared,
                channel,
                &facts,
                renew_at,
                &mut shutdown,
                &mut connected,
            )
            .await
            .map_err(|e| e.to_string())
        }
        .await;
        if connected {
            backoff.reset();
        }
        match result {
            Ok(SessionEnd::Shutdown) => return,
            Ok(SessionEnd::Renew) | Ok(SessionEnd::EpochChange) => {
                backoff.reset();
                continue;
            }
            Err(e) => {
                let delay = backoff.next_delay(backoff::random_u32());
                tracing::warn!("collector unreachable: {e} (retrying in {delay:.1?})");
                notify::status(&format!("collector unreachable: {e}"));
                let changed = shared
                    .status()
                    .set_collector("unreachable", Some(e.clone()));
                if changed {
                    let s = shared.clone();
                    tokio::task::spawn_blocking(move || s.write_status());
                }
                // Wait out the delay, ticking the watchdog: this loop is alive.
                let until = tokio::time::Instant::now() + delay;
                let mut tick = tokio::time::interval(shared.liveness.tick_interval());
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => break,
                        _ = tick.tick() => shared.liveness.tick(),
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
    }
}

/// The sources of an error, joined: tonic's transport errors hide the useful part there.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

/// Loads the configuration and its inputs (both are configuration errors: exit 64).
pub fn load(path: &std::path::Path) -> Result<(Settings, Inputs), ConfigError> {
    let settings = Settings::load(path)?;
    let inputs = settings.inputs(path)?;
    Ok((settings, inputs))
}
