//! The `Ingest.Report` stream: one long-lived stream per agent carrying its host's violation set
//! changes, committed in group transactions and acknowledged only after their commit.
//!
//! ```text
//! agent ─Hello→ stream task ─Welcome→ agent
//! agent ─Report→ stream task ─ApplyJob(report, oneshot)→ [bounded mpsc] → writer task of
//!                                                          the host's lane:
//!                                                          apply_reports(batch)  (one transaction)
//! agent ←Ack{seq} (←Resync) ─ stream task ←─────────── oneshot(outcome) ──────┘
//! agent ─Heartbeat→ stream task → heartbeat batch (memory) → record_heartbeats every few s
//! ```
//!
//! What it owns: the stream protocol (Hello first and within a deadline, identity only from the
//! certificate, per-message checks, idle timeout, revocation), the group-commit writer and the
//! heartbeat batch. What it must never do: send an `Ack` for a report whose transaction has not
//! committed, or take a host id from anything but the certificate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use driftwatch_proto::set::key_matches;
use driftwatch_proto::v1::ingest_server::Ingest;
use driftwatch_proto::v1::{
    Ack, AgentMessage, CollectorMessage, Heartbeat, Hello, Report, Resync, ScanStatus, Welcome,
    agent_message, collector_message, drift_item,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::{ClientIdentity, unix_ms};
use crate::config::Settings;
use crate::failpoint;
use crate::reconcile::OpenCache;
use crate::revocation::Revocations;
use crate::rpc_error::RpcError;
use crate::security;
use crate::storage::{
    ApplyOutcome, HeartbeatRecord, HelloInfo, ReportToApply, Storage, StorageError,
};
use crate::tls::PeerInfo;

/// Longest item key accepted ("f\0" + a path up to PATH_MAX, with room to spare).
const MAX_KEY_BYTES: usize = 8192;
/// Longest free-text field of a Hello.
const MAX_HELLO_FIELD: usize = 512;

type ApplyResult = Result<ApplyOutcome, Arc<StorageError>>;

/// One report on its way to the writer, with the channel its outcome comes back on.
#[derive(Debug)]
struct ApplyJob {
    report: ReportToApply,
    done: oneshot::Sender<ApplyResult>,
    /// When the stream task queued it (the writer's statistics: time from queue to commit).
    queued: Instant,
}

/// Tunables of the ingest, taken from [`Settings`].
#[derive(Debug, Clone)]
struct Limits {
    hello_timeout: Duration,
    heartbeat_interval: Duration,
    heartbeat_seconds: u32,
    max_in_flight: usize,
}

/// State shared by every stream.
#[derive(Debug)]
struct Shared {
    store: Arc<dyn Storage>,
    /// Bounded: when the writer falls behind, streams wait here (and stop reading their
    /// sockets) instead of queueing without limit.
    /// One per write lane of the store (`Storage::write_lanes`); a host's reports all go to
    /// the writer of its lane (`storage::lane_of`), so they are applied in order.
    writers: Vec<mpsc::Sender<ApplyJob>>,
    heartbeats: Arc<HeartbeatBatch>,
    revocations: Revocations,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
}

/// The `driftwatch.v1.Ingest` service.
#[derive(Debug, Clone)]
pub struct IngestService {
    shared: Arc<Shared>,
}

/// The ingest's background tasks; [`IngestTasks::finish`] waits for them after shutdown.
#[derive(Debug)]
pub struct IngestTasks {
    writers: Vec<tokio::task::JoinHandle<()>>,
    flusher: tokio::task::JoinHandle<()>,
}

impl IngestTasks {
    /// Waits (at most `grace`) for the writer to commit what it was given and the last
    /// heartbeats to be written. The writer ends once every stream has ended.
    pub async fn finish(self, grace: Duration) {
        let all = async {
            for w in self.writers {
                let _ = w.await;
            }
            let _ = self.flusher.await;
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!("ingest writer did not finish within the grace period");
        }
    }
}

impl IngestService {
    /// Starts the writer and heartbeat tasks. Both stop when `shutdown` turns true and their
    /// work is done.
    pub fn start(
        settings: &Settings,
        store: Arc<dyn Storage>,
        revocations: Revocations,
        open_rows: Arc<OpenCache>,
        shutdown: watch::Receiver<bool>,
    ) -> (IngestService, IngestTasks) {
        let tuning = &settings.tuning;
        let (mut writer_txs, mut writers) = (Vec::new(), Vec::new());
        for lane in 0..store.write_lanes().max(1) {
            let (tx, rx) = mpsc::channel(tuning.commit_batch_max.get() * 4);
            writer_txs.push(tx);
            writers.push(tokio::spawn(run_writer(
                store.clone(),
                open_rows.clone(),
                rx,
                lane,
                tuning.commit_batch_max.get(),
                tuning.commit_linger,
            )));
        }
        let heartbeats = Arc::new(HeartbeatBatch::default());
        let flusher = tokio::spawn(run_heartbeat_flusher(
            store.clone(),
            heartbeats.clone(),
            tuning.heartbeat_flush,
            shutdown.clone(),
        ));
        let shared = Arc::new(Shared {
            store,
            writers: writer_txs,
            heartbeats,
            revocations,
            limits: Limits {
                hello_timeout: tuning.hello_timeout,
                heartbeat_interval: settings.heartbeat_interval.as_duration(),
                heartbeat_seconds: settings.heartbeat_interval.seconds(),
                max_in_flight: tuning.max_reports_in_flight.get(),
            },
            shutdown,
        });
        (IngestService { shared }, IngestTasks { writers, flusher })
    }
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type ReportStream = ReceiverStream<Result<CollectorMessage, Status>>;

    async fn report(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let peer = security::peer(request.extensions()).cloned();
        let identity = match security::authenticated_client(peer.as_ref(), &self.shared.revocations)
        {
            Ok(id) => id,
            Err(e) => {
                let kind = match e {
                    RpcError::Revoked => "revoked-certificate",
                    _ => "unauthenticated-report",
                };
                security::record(&self.shared.store, kind, peer.as_ref(), None, e.to_string())
                    .await;
                return Err(e.into());
            }
        };
        let inbound = request.into_inner();
        // Small: the stream task waits for the agent to read its acks rather than buffering.
        let (tx, rx) = mpsc::channel(8);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let host = identity.host_id.clone();
            let result = run_stream(&shared, &identity, peer.as_ref(), inbound, &tx).await;
            match result {
                Ok(()) => tracing::debug!(host, "report stream ended"),
                Err(e) => {
                    match &e {
                        RpcError::Impersonation { .. } => {
                            security::record(
                                &shared.store,
                                "impersonation",
                                peer.as_ref(),
                                Some(&host),
                                e.to_string(),
                            )
                            .await
                        }
                        RpcError::Revoked => {
                            security::record(
                                &shared.store,
                                "revoked-certificate",
                                peer.as_ref(),
                                Some(&host),
                                "report stream closed: the host's certificate was revoked".into(),
                            )
                            .await
                        }
                        _ => tracing::info!(host, error = %e, "report stream closed"),
                    }
                    let _ = tx.send(Err(e.into())).await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

type Outbound = mpsc::Sender<Result<CollectorMessage, Status>>;

async fn send(tx: &Outbound, msg: collector_message::Msg) -> Result<(), RpcError> {
    tx.send(Ok(CollectorMessage { msg: Some(msg) }))
        .await
        // The agent went away; nothing more to say to it.
        .map_err(|_| RpcError::AgentGone)
}

/// A report sent to the writer whose outcome is awaited, in stream order.
struct Pending {
    seq: u64,
    full: bool,
    done: oneshot::Receiver<ApplyResult>,
}

async fn run_stream(
    shared: &Shared,
    identity: &ClientIdentity,
    peer: Option<&PeerInfo>,
    mut inbound: Streaming<AgentMessage>,
    tx: &Outbound,
) -> Result<(), RpcError> {
    let limits = &shared.limits;
    let writer = &shared.writers[crate::storage::lane_of(&identity.host_id, shared.writers.len())];
    let first = match tokio::time::timeout(limits.hello_timeout, inbound.message()).await {
        Err(_) => return Err(RpcError::HelloTimeout(limits.hello_timeout)),
        Ok(Err(status)) => return Err(RpcError::InvalidMessage(status.message().to_string())),
        Ok(Ok(None)) => return Ok(()),
        Ok(Ok(Some(m))) => m,
    };
    let hello = match first.msg {
        Some(agent_message::Msg::Hello(h)) => h,
        _ => return Err(RpcError::HelloMissing),
    };
    if hello.host_id != identity.host_id {
        return Err(RpcError::Impersonation {
            certified: identity.host_id.clone(),
            claimed: hello.host_id,
        });
    }
    let info = hello_info(hello)?;
    let epoch = info.epoch;
    let position = shared
        .store
        .hello(&identity.host_id, info, unix_ms(SystemTime::now()))
        .await?;
    tracing::debug!(host = identity.host_id, peer = ?peer.map(|p| p.remote_addr), epoch, last_seq = position.last_seq, "stream open");
    send(
        tx,
        collector_message::Msg::Welcome(Welcome {
            host_id: identity.host_id.clone(),
            epoch: position.epoch,
            last_committed_seq: position.last_seq,
            set_digest: position.set_digest.to_vec(),
            heartbeat_interval_seconds: limits.heartbeat_seconds,
        }),
    )
    .await?;

    let silence = limits.heartbeat_interval * 3;
    let idle = tokio::time::sleep(silence);
    tokio::pin!(idle);
    let mut revoked = shared.revocations.subscribe();
    let mut shutdown = shared.shutdown.clone();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut last_seq: Option<u64> = None;
    let mut resync_outstanding = false;
    let mut reading = true;
    let mut watching_revocations = true;

    loop {
        let can_read = reading && pending.len() < limits.max_in_flight;
        tokio::select! {
            // Outcomes first: acks go out as soon as their commit is known.
            biased;
            outcome = async {
                match pending.front_mut() {
                    Some(p) => (&mut p.done).await.ok(),
                    None => std::future::pending().await,
                }
            }, if !pending.is_empty() => {
                let Some(p) = pending.pop_front() else { continue };
                // No answer at all: the writer is gone (shutdown past its grace period).
                let outcome = outcome.ok_or(RpcError::ShuttingDown)?.map_err(RpcError::CommitFailed)?;
                if p.full {
                    resync_outstanding = false;
                }
                send(tx, collector_message::Msg::Ack(Ack { seq: p.seq })).await?;
                if let ApplyOutcome::Applied { digest_matches: false, .. } = outcome
                    && !resync_outstanding
                {
                    resync_outstanding = true;
                    send(tx, collector_message::Msg::Resync(Resync {
                        reason: format!(
                            "the collector's set after report {} differs from the agent's digest",
                            p.seq
                        ),
                    }))
                    .await?;
                }
            }
            _ = crate::server::stop_requested(&mut shutdown), if reading => {
                // Stop reading; what was received is still committed and acked above.
                reading = false;
            }
            changed = revoked.changed(), if watching_revocations => {
                if changed.is_err() {
                    // The refresher stopped (shutdown): nothing more will change.
                    watching_revocations = false;
                } else if revoked.borrow_and_update().contains(&identity.serial) {
                    return Err(RpcError::Revoked);
                }
            }
            _ = &mut idle, if reading => {
                return Err(RpcError::Silent(silence));
            }
            msg = inbound.message(), if can_read => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    // The agent closed its side: finish the acks, then end.
                    Ok(None) => { reading = false; continue; }
                    Err(status) => return Err(RpcError::InvalidMessage(status.message().to_string())),
                };
                idle.as_mut().reset(tokio::time::Instant::now() + silence);
                match msg.msg {
                    Some(agent_message::Msg::Report(report)) => {
                        check_report(&report, epoch, last_seq)?;
                        last_seq = Some(report.seq);
                        let (done_tx, done_rx) = oneshot::channel();
                        pending.push_back(Pending { seq: report.seq, full: report.full, done: done_rx });
                        let job = ApplyJob {
                            report: ReportToApply {
                                host_id: identity.host_id.clone(),
                                report,
                                received_ms: unix_ms(SystemTime::now()),
                            },
                            done: done_tx,
                            queued: Instant::now(),
                        };
                        writer.send(job).await.map_err(|_| RpcError::ShuttingDown)?;
                    }
                    Some(agent_message::Msg::Heartbeat(hb)) => {
                        shared.heartbeats.add(&identity.host_id, &hb);
                    }
                    Some(agent_message::Msg::Hello(_)) => {
                        return Err(RpcError::InvalidMessage("a second Hello on one stream".into()));
                    }
                    None => return Err(RpcError::InvalidMessage("empty AgentMessage".into())),
                }
            }
        }
        if !reading && pending.is_empty() {
            return if *shutdown.borrow() {
                Err(RpcError::ShuttingDown)
            } else {
                Ok(())
            };
        }
    }
}

/// The storage view of a Hello, after checking its fields.
fn hello_info(h: Hello) -> Result<HelloInfo, RpcError> {
    for (name, value) in [
        ("agent_version", &h.agent_version),
        ("image_id", &h.image_id),
        ("image_version", &h.image_version),
        ("boot_id", &h.boot_id),
    ] {
        if value.len() > MAX_HELLO_FIELD {
            return Err(RpcError::InvalidMessage(format!(
                "Hello.{name} is longer than {MAX_HELLO_FIELD} bytes"
            )));
        }
        no_nul(value, || format!("Hello.{name}"))?;
    }
    if !(h.baseline_root.is_empty() || h.baseline_root.len() == driftwatch_proto::HASH_LEN) {
        return Err(RpcError::InvalidMessage(
            "Hello.baseline_root must be 32 bytes (or empty)".into(),
        ));
    }
    Ok(HelloInfo {
        agent_version: h.agent_version,
        image_id: h.image_id,
        image_version: h.image_version,
        baseline_root: h.baseline_root,
        boot_id: h.boot_id,
        epoch: h.epoch,
    })
}

/// Refuses a NUL character in a string the collector stores as text: PostgreSQL cannot hold
/// one in a text column, and the failed statement would fail the whole group commit, with the
/// reports of every other host in it.
fn no_nul(value: &str, what: impl FnOnce() -> String) -> Result<(), RpcError> {
    if value.contains('\0') {
        return Err(RpcError::InvalidMessage(format!(
            "{} contains a NUL character",
            what()
        )));
    }
    Ok(())
}

/// Checks one report before it goes near storage. Pure.
fn check_report(r: &Report, stream_epoch: u64, last_seq: Option<u64>) -> Result<(), RpcError> {
    let bad = |m: String| Err(RpcError::InvalidMessage(m));
    if r.epoch != stream_epoch {
        return Err(RpcError::EpochMismatch {
            stream: stream_epoch,
            got: r.epoch,
        });
    }
    if r.seq == 0 {
        return bad("Report.seq must be at least 1".into());
    }
    if let Some(prev) = last_seq
        && r.seq <= prev
    {
        return bad(format!(
            "Report.seq {} does not follow {prev} (seqs increase within a stream)",
            r.seq
        ));
    }
    if r.set_digest.len() != driftwatch_proto::HASH_LEN {
        return bad(format!(
            "Report.set_digest is {} bytes, not 32",
            r.set_digest.len()
        ));
    }
    if ScanStatus::try_from(r.status).is_err() {
        return bad(format!("Report.status {} is not a ScanStatus", r.status));
    }
    no_nul(&r.status_reason, || "Report.status_reason".into())?;
    let mut keys = HashSet::with_capacity(r.upserts.len());
    for item in &r.upserts {
        if item.key.len() > MAX_KEY_BYTES {
            return bad(format!("an item key is longer than {MAX_KEY_BYTES} bytes"));
        }
        if !key_matches(item) {
            return bad(format!(
                "item key {:?} does not match its content",
                String::from_utf8_lossy(&item.key)
            ));
        }
        let package_text = |text: &str| {
            no_nul(text, || {
                format!(
                    "a package name of item {:?}",
                    String::from_utf8_lossy(&item.key)
                )
            })
        };
        match &item.item {
            Some(drift_item::Item::File(v)) => {
                for owner in &v.packages {
                    package_text(owner)?;
                }
            }
            Some(drift_item::Item::Package(p)) => {
                package_text(&p.name)?;
                package_text(&p.arch)?;
            }
            None => {}
        }
        if !keys.insert(item.key.as_slice()) {
            return bad(format!(
                "item key {:?} appears twice in one report",
                String::from_utf8_lossy(&item.key)
            ));
        }
    }
    for key in &r.removed_keys {
        if key.len() > MAX_KEY_BYTES || !(key.starts_with(b"f\0") || key.starts_with(b"p\0")) {
            return bad("a removed key is not an item key".into());
        }
        if keys.contains(key.as_slice()) {
            return bad(format!(
                "key {:?} is both upserted and removed",
                String::from_utf8_lossy(key)
            ));
        }
    }
    Ok(())
}

/// How often the writer logs its statistics (at debug level, target
/// `driftwatch_collector::ingest::writer`).
const WRITER_STATS_PERIOD: Duration = Duration::from_secs(5);

/// What the group-commit writer did since its last statistics line: batch sizes, commit times
/// and how long reports waited, to tell tiny batches from slow commits from a deep queue. Kept
/// and logged only when debug logging of the writer is on.
#[derive(Debug, Default)]
struct WriterStats {
    batches: u64,
    reports: u64,
    /// Upserted items plus removed keys.
    records: u64,
    max_batch: usize,
    /// Time from the first job of a batch to the start of its apply (linger and gathering).
    gather: Duration,
    /// Time in `apply_reports` (the transaction, including its durable commit).
    commit: Duration,
    max_commit: Duration,
    /// Jobs still queued when a batch started its apply (reports that will wait a round).
    max_queued: usize,
    /// From a report's queueing by its stream to its commit: sum over reports, and maximum.
    wait: Duration,
    max_wait: Duration,
}

impl WriterStats {
    fn record(
        &mut self,
        jobs: &[(Instant, usize)],
        gather: Duration,
        commit: Duration,
        queued: usize,
    ) {
        let done = Instant::now();
        self.batches += 1;
        self.reports += jobs.len() as u64;
        self.max_batch = self.max_batch.max(jobs.len());
        self.gather += gather;
        self.commit += commit;
        self.max_commit = self.max_commit.max(commit);
        self.max_queued = self.max_queued.max(queued);
        for (at, records) in jobs {
            self.records += *records as u64;
            let wait = done.saturating_duration_since(*at);
            self.wait += wait;
            self.max_wait = self.max_wait.max(wait);
        }
    }

    fn log(&self, lane: usize, period: Duration) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let per_batch = |d: Duration| ms(d) / self.batches.max(1) as f64;
        tracing::debug!(
            target: "driftwatch_collector::ingest::writer",
            lane,
            period_s = period.as_secs_f64(),
            batches = self.batches,
            reports = self.reports,
            records = self.records,
            reports_per_batch = self.reports as f64 / self.batches.max(1) as f64,
            max_batch = self.max_batch,
            gather_ms_mean = per_batch(self.gather),
            commit_ms_mean = per_batch(self.commit),
            commit_ms_max = ms(self.max_commit),
            busy = self.commit.as_secs_f64() / period.as_secs_f64().max(1e-9),
            wait_ms_mean = ms(self.wait) / self.reports.max(1) as f64,
            wait_ms_max = ms(self.max_wait),
            max_queued = self.max_queued,
            "group commit writer"
        );
    }
}

/// Upserted items plus removed keys of a report: the records a commit writes.
fn records_of(r: &ReportToApply) -> usize {
    r.report.upserts.len() + r.report.removed_keys.len()
}

/// The group-commit writer of one write lane: takes the first waiting job and every job already
/// queued, waits up to `linger` for more (at most `batch_max` in all), applies them in one
/// transaction, then answers every job. Ends when every sender is gone and the queue is empty.
async fn run_writer(
    store: Arc<dyn Storage>,
    open_rows: Arc<OpenCache>,
    mut rx: mpsc::Receiver<ApplyJob>,
    lane: usize,
    batch_max: usize,
    linger: Duration,
) {
    let mut stats = WriterStats::default();
    let mut stats_since = Instant::now();
    while let Some(first) = rx.recv().await {
        let gather_start = Instant::now();
        let mut jobs = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while jobs.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                // Nothing more queued: with no linger, commit what there is. Reports arriving
                // meanwhile queue up and form the next batch, so batches grow with the load
                // without an idle wait in front of every commit when it is light.
                Err(mpsc::error::TryRecvError::Empty) if linger.is_zero() => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, rx.recv()).await {
                        Ok(Some(job)) => jobs.push(job),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        let stats_on = tracing::enabled!(
            target: "driftwatch_collector::ingest::writer",
            tracing::Level::DEBUG
        );
        let timing: Vec<(Instant, usize)> = if stats_on {
            jobs.iter()
                .map(|j| (j.queued, records_of(&j.report)))
                .collect()
        } else {
            Vec::new()
        };
        let queued = rx.len();
        let apply_start = Instant::now();
        let (reports, dones): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|j| (j.report, j.done)).unzip();
        let count = reports.len();
        // Copies of the reports the reconciler's cache can use (`OpenCache::wants`), to move
        // the rows it holds along, or start them, once the batch committed.
        let replay: Vec<Option<ReportToApply>> = reports
            .iter()
            .map(|r| open_rows.wants(&r.host_id, &r.report).then(|| r.clone()))
            .collect();
        let result = match store.apply_reports(reports).await {
            Ok(outcomes) if outcomes.len() == count => Ok(outcomes),
            Ok(outcomes) => Err(Arc::new(StorageError::Backend(format!(
                "apply_reports returned {} outcomes for {count} reports",
                outcomes.len()
            )))),
            Err(e) => Err(Arc::new(e)),
        };
        if stats_on {
            stats.record(
                &timing,
                apply_start - gather_start,
                apply_start.elapsed(),
                queued,
            );
            let period = stats_since.elapsed();
            if period >= WRITER_STATS_PERIOD {
                stats.log(lane, period);
                stats = WriterStats::default();
                stats_since = Instant::now();
            }
        }
        match result {
            Ok(outcomes) => {
                let replay: Vec<(ReportToApply, ApplyOutcome)> = replay
                    .into_iter()
                    .zip(&outcomes)
                    .filter_map(|(r, o)| Some((r?, o.clone())))
                    .collect();
                failpoint::hit("collector-after-commit-before-ack");
                for (done, outcome) in dones.into_iter().zip(outcomes) {
                    // A stream that went away meanwhile: its agent resends, and gets a
                    // duplicate ack.
                    let _ = done.send(Ok(outcome));
                }
                // After the acks, so they do not wait for it.
                for (r, outcome) in replay {
                    open_rows.advance(&r.host_id, r.report, r.received_ms, &outcome);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, reports = count, "group commit failed");
                for done in dones {
                    let _ = done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Heartbeats of the last few seconds, newest per host, waiting to be written together.
#[derive(Debug, Default)]
struct HeartbeatBatch {
    // A std mutex: held only to insert or swap the map, never across an await.
    pending: Mutex<HashMap<String, HeartbeatRecord>>,
}

impl HeartbeatBatch {
    fn add(&self, host_id: &str, hb: &Heartbeat) {
        let record = HeartbeatRecord {
            host_id: host_id.to_string(),
            received_ms: unix_ms(SystemTime::now()),
            last_scan_ms: hb.last_scan_unix_ms,
            last_scan_status: ScanStatus::try_from(hb.last_scan_status)
                .unwrap_or(ScanStatus::Unspecified),
        };
        if let Ok(mut p) = self.pending.lock() {
            p.insert(host_id.to_string(), record);
        }
    }

    fn take(&self) -> Vec<HeartbeatRecord> {
        match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p).into_values().collect(),
            Err(_) => Vec::new(),
        }
    }
}

async fn run_heartbeat_flusher(
    store: Arc<dyn Storage>,
    batch: Arc<HeartbeatBatch>,
    period: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stop = tokio::select! {
            _ = tick.tick() => false,
            _ = crate::server::stop_requested(&mut shutdown) => true,
        };
        // One batch per write lane, written at once, each on its lane's connection.
        let lanes = store.write_lanes().max(1);
        let mut by_lane: Vec<Vec<HeartbeatRecord>> = (0..lanes).map(|_| Vec::new()).collect();
        for r in batch.take() {
            by_lane[crate::storage::lane_of(&r.host_id, lanes)].push(r);
        }
        let writes = by_lane
            .into_iter()
            .filter(|b| !b.is_empty())
            .map(|b| store.record_heartbeats(b));
        for r in futures_util::future::join_all(writes).await {
            if let Err(e) = r {
                tracing::warn!(error = %e, "writing heartbeats failed");
            }
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftwatch_proto::set::{file_key, package_key};
    use driftwatch_proto::v1::{DriftItem, PackageDrift, Violation, drift_item::Item};

    fn item(path: &[u8]) -> DriftItem {
        DriftItem {
            key: file_key(path),
            item: Some(Item::File(Violation {
                path: path.to_vec(),
                ..Default::default()
            })),
        }
    }

    fn report(seq: u64) -> Report {
        Report {
            epoch: 7,
            seq,
            set_digest: vec![0; 32],
            status: ScanStatus::Complete as i32,
            upserts: vec![item(b"/etc/a"), item(b"/etc/b")],
            ..Default::default()
        }
    }

    fn refused(r: &Report, last: Option<u64>) -> String {
        check_report(r, 7, last).unwrap_err().to_string()
    }

    #[test]
    fn good_report_passes() {
        check_report(&report(1), 7, None).unwrap();
        check_report(&report(5), 7, Some(4)).unwrap();
    }

    #[test]
    fn bad_reports_are_refused_with_the_reason() {
        let mut r = report(1);
        r.epoch = 8;
        assert!(matches!(
            check_report(&r, 7, None),
            Err(RpcError::EpochMismatch { stream: 7, got: 8 })
        ));
        assert!(refused(&report(0), None).contains("seq"));
        assert!(refused(&report(3), Some(3)).contains("does not follow"));
        let mut r = report(1);
        r.set_digest.pop();
        assert!(refused(&r, None).contains("set_digest"));
        let mut r = report(1);
        r.status = 99;
        assert!(refused(&r, None).contains("status"));
        let mut r = report(1);
        r.upserts[1].key = file_key(b"/etc/other");
        assert!(refused(&r, None).contains("does not match"));
        let mut r = report(1);
        r.upserts.push(item(b"/etc/a"));
        assert!(refused(&r, None).contains("twice"));
        let mut r = report(1);
        r.removed_keys.push(file_key(b"/etc/a"));
        assert!(refused(&r, None).contains("both"));
        let mut r = report(1);
        r.removed_keys.push(b"x".to_vec());
        assert!(refused(&r, None).contains("removed key"));
        // Text the database stores as text holds no NUL (PostgreSQL refuses it, failing the
        // whole batch).
        let mut r = report(1);
        r.status_reason = "scan\0failed".into();
        assert!(refused(&r, None).contains("Report.status_reason contains a NUL"));
        let mut r = report(1);
        if let Some(Item::File(v)) = &mut r.upserts[0].item {
            v.packages = vec!["openssh-server:amd64".into(), "evil\0:amd64".into()];
        }
        assert!(refused(&r, None).contains("a package name of item"));
        let mut r = report(1);
        r.upserts.push(DriftItem {
            key: package_key("libc6", "amd\x0064"),
            item: Some(Item::Package(PackageDrift {
                name: "libc6".into(),
                arch: "amd\x0064".into(),
                ..Default::default()
            })),
        });
        assert!(refused(&r, None).contains("NUL"));
    }

    #[test]
    fn hello_fields_are_bounded() {
        let h = Hello {
            image_id: "x".repeat(MAX_HELLO_FIELD + 1),
            ..Default::default()
        };
        assert!(hello_info(h).unwrap_err().to_string().contains("image_id"));
        let h = Hello {
            agent_version: "0.1\0".into(),
            ..Default::default()
        };
        assert!(
            hello_info(h)
                .unwrap_err()
                .to_string()
                .contains("Hello.agent_version contains a NUL")
        );
        let h = Hello {
            baseline_root: vec![1; 31],
            ..Default::default()
        };
        assert!(hello_info(h).is_err());
    }
}
