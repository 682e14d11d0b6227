//! The scan thread: runs checks when asked, turns each result into the host's set and hands it
//! to the outbox (spooled, synced) before the event loop is told there is something to send.
//!
//! Scanning never runs on a tokio worker: it has this thread of its own (and the check's rayon
//! pool for hashing). It talks to the event loop through a bounded request channel (a request
//! made while one is queued is merged into it) and a `Notify`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use driftwatch_proto::v1::ScanStatus;
use tokio::sync::Notify;

use super::config::{Inputs, Settings};
use super::notify::{self, Liveness};
use super::outbox::Outbox;
use super::status::{BaselineStatus, LastScan, Status};
use crate::check::{self, CheckOptions};
use crate::report_set::{DriftSet, ScanMeta};

/// A request for a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanRequest {
    /// Ignore the scan cache and hash every file.
    pub full_rehash: bool,
}

/// The event loop's handle to the scan thread.
#[derive(Debug, Clone)]
pub struct ScanQueue {
    tx: SyncSender<ScanRequest>,
}

impl ScanQueue {
    /// Asks for a scan; if one is already queued, this request is merged into it (a queued
    /// quick scan does not become a full re-hash, but the next timer tick will ask again).
    pub fn request(&self, r: ScanRequest) -> bool {
        match self.tx.try_send(r) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => false,
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

/// Everything the scan thread shares with the event loop.
#[derive(Debug)]
pub struct Shared {
    pub settings: Settings,
    pub inputs: Inputs,
    pub outbox: Mutex<Outbox>,
    pub status: Mutex<Status>,
    pub liveness: Liveness,
    /// New records are in the spool.
    pub records_ready: Notify,
    /// Set once shutdown began: a finished scan's result is then dropped, not spooled.
    pub shutting_down: AtomicBool,
}

impl Shared {
    /// Locks the outbox; a panic elsewhere while it was held does not stop the daemon (the
    /// spool re-validates its own state).
    pub fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refreshes the spool figures and writes `status.json` (errors are logged, not fatal).
    pub fn write_status(&self) {
        let (stats, last_seq, epoch) = {
            let o = self.outbox();
            (o.stats(), o.last_seq(), o.epoch())
        };
        let mut s = self.status();
        s.spool.pending_records = stats.records;
        s.spool.pending_bytes = stats.bytes;
        s.spool.last_seq = last_seq;
        s.spool.epoch = format!("{epoch:016x}");
        if let Err(e) = s.write(&self.settings.state_dir) {
            tracing::warn!("cannot write status.json: {e}");
        }
    }
}

/// Starts the scan thread. It ends when every `ScanQueue` is dropped.
pub fn start(shared: Arc<Shared>) -> std::io::Result<(ScanQueue, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let handle = std::thread::Builder::new()
        .name("driftwatch-scan".into())
        .spawn(move || run(&shared, rx))?;
    Ok((ScanQueue { tx }, handle))
}

fn run(shared: &Shared, rx: Receiver<ScanRequest>) {
    while let Ok(req) = rx.recv() {
        if shared.shutting_down.load(Ordering::Relaxed) {
            break;
        }
        scan_once(shared, req);
    }
}

fn now_ms() -> i64 {
    crate::time::now_unix_ns() / 1_000_000
}

fn scan_once(shared: &Shared, req: ScanRequest) {
    let s = &shared.settings;
    let opts = CheckOptions {
        root: s.root.clone(),
        baseline: s.baseline.clone(),
        trusted_keys: shared.inputs.trusted_keys.clone(),
        policy: shared.inputs.policy.clone(),
        full: req.full_rehash,
        state_dir: Some(s.state_dir.clone()),
        threads: s.threads.get(),
        now_unix: crate::time::now_unix(),
    };
    notify::status("scanning");
    tracing::info!(full_rehash = req.full_rehash, "scan started");
    shared.liveness.set_scanning(true);
    let started_ms = now_ms();
    let t0 = Instant::now();
    let result = check::check(&opts, &mut |_| {
        shared.liveness.ready();
        shared.liveness.progress();
    });
    shared.liveness.set_scanning(false);
    // The daemon is up even when the first scan fails: it reports the failure.
    shared.liveness.ready();
    let finished_ms = now_ms();

    if shared.shutting_down.load(Ordering::Relaxed) {
        tracing::info!("shutting down: the finished scan is not reported");
        return;
    }
    let (spooled, last_scan) = match result {
        Ok(report) => {
            let set = DriftSet::new(crate::wire::drift_set(&report));
            let last = LastScan {
                started: crate::time::format_unix(started_ms / 1000),
                finished: crate::time::format_unix(finished_ms / 1000),
                result: "complete",
                error: None,
                violations: report.violations.len(),
                package_drift: report.package_drift.len(),
                full_rehash: req.full_rehash,
            };
            tracing::info!(
                violations = report.violations.len(),
                package_drift = report.package_drift.len(),
                entries = report.summary.scan.entries,
                seconds = t0.elapsed().as_secs_f64(),
                "scan finished"
            );
            for w in &report.warnings {
                tracing::warn!("scan: {w}");
            }
            shared.status().baseline = BaselineStatus {
                image_id: report.baseline.image_id.clone(),
                image_version: report.baseline.image_version.clone(),
                merkle_root: report.baseline.merkle_root.clone(),
            };
            let meta = ScanMeta::complete(started_ms, finished_ms);
            (shared.outbox().record_scan(set, meta), last)
        }
        Err(e) => {
            let reason = format!("scan failed: {e}");
            tracing::error!("{reason}");
            let last = LastScan {
                started: crate::time::format_unix(started_ms / 1000),
                finished: crate::time::format_unix(finished_ms / 1000),
                result: "failed",
                error: Some(e.to_string()),
                violations: 0,
                package_drift: 0,
                full_rehash: req.full_rehash,
            };
            let meta = ScanMeta {
                started_unix_ms: started_ms,
                finished_unix_ms: finished_ms,
                status: ScanStatus::Incomplete,
                reason,
                lost_reports: 0,
            };
            (shared.outbox().record_failure(meta), last)
        }
    };
    match spooled {
        Ok(sp) => {
            if sp.dropped > 0 {
                tracing::error!(
                    dropped = sp.dropped,
                    "spool full: unsent reports were replaced by a full snapshot marked incomplete"
                );
            }
            if sp.reports > 0 {
                tracing::debug!(reports = sp.reports, "reports spooled");
                shared.records_ready.notify_one();
            }
        }
        Err(e) => tracing::error!("cannot spool the scan's report: {e}"),
    }
    {
        let mut st = shared.status();
        st.last_scan = Some(last_scan);
    }
    shared.write_status();
    let st = shared.status();
    notify::status(&match st.collector.state {
        "connected" => format!("connected, {} pending", st.spool.pending_records),
        "unreachable" => format!(
            "collector unreachable: {}",
            st.collector
                .last_error
                .as_deref()
                .unwrap_or("unknown error")
        ),
        other => format!("{other}, {} pending", st.spool.pending_records),
    });
}

/// What the event loop knows of the last scan, for heartbeats.
pub fn last_scan_for_heartbeat(status: &Status) -> (i64, ScanStatus) {
    match &status.last_scan {
        None => (0, ScanStatus::Unspecified),
        Some(l) => {
            let t = humantime::parse_rfc3339(&l.finished)
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_millis() as i64);
            let st = if l.result == "complete" {
                ScanStatus::Complete
            } else {
                ScanStatus::Incomplete
            };
            (t, st)
        }
    }
}
