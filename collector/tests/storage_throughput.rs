//! Ingest throughput of each storage backend, with durable commits (SQLite `synchronous=FULL`,
//! PostgreSQL with its default `fsync`/`synchronous_commit`). Ignored by default; run with
//!
//! ```text
//! cargo test -p driftwatch-collector --test storage_throughput -- --ignored --nocapture
//! ```
//!
//! Two phases per backend, each 200 batches × 500 violation records (10 reports of 50 items
//! from 10 of 100 hosts per batch; each report adds 40 items, updates 10 and resolves 10):
//! 1. **sustained**: batches back to back; prints records/s;
//! 2. **paced**: one batch every 500 / (rate / 2) seconds at half the target rate of 50,000
//!    records/s; prints the p50/p99/max time from a batch's due time to its commit (the ack
//!    latency the ingest would add on top of network and queueing).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use driftwatch_collector::storage::{
    ApplyOutcome, IssuedCertificate, PgStore, ReportToApply, SqliteStore, Storage,
};
use driftwatch_proto::set::{file_key, item_hash, set_digest};
use driftwatch_proto::v1::{DriftItem, Report, ScanStatus, Violation, drift_item::Item};

const HOSTS: usize = 100;
const BATCHES: usize = 200;
const REPORTS_PER_BATCH: usize = 10;
const ITEMS_PER_REPORT: usize = 50;
const TARGET_RATE: f64 = 50_000.0;

/// One simulated agent: its set (to compute honest digests) and what it may update or remove.
struct Agent {
    host: String,
    seq: u64,
    next_path: u64,
    set: std::collections::BTreeMap<Vec<u8>, [u8; 32]>,
    live: VecDeque<Vec<u8>>,
}

fn item(host: &str, n: u64, generation: u64) -> DriftItem {
    let path = format!("/srv/{host}/usr/lib/x86_64-linux-gnu/lib{n:06}.so.1").into_bytes();
    DriftItem {
        key: file_key(&path),
        item: Some(Item::File(Violation {
            path,
            kind: 3,
            severity: (n % 6) as i32,
            packages: vec![format!("libpkg{}:amd64", n % 97)],
            reason: format!("generation {generation}"),
            ..Default::default()
        })),
    }
}

impl Agent {
    fn report(&mut self, generation: u64) -> Report {
        let mut upserts = Vec::with_capacity(ITEMS_PER_REPORT);
        let mut removed = Vec::new();
        for _ in 0..ITEMS_PER_REPORT - 10 {
            let it = item(&self.host, self.next_path, generation);
            self.next_path += 1;
            self.live.push_back(it.key.clone());
            upserts.push(it);
        }
        // Update 10 existing (re-add with new content), resolve 10 older ones.
        let n = self.next_path;
        for i in 0..10 {
            let it = item(&self.host, n.saturating_sub(20 + i), generation);
            upserts.push(it);
        }
        if self.live.len() > 400 {
            for _ in 0..10 {
                if let Some(k) = self.live.pop_front() {
                    removed.push(k);
                }
            }
        }
        for it in &upserts {
            self.set.insert(it.key.clone(), item_hash(it));
        }
        for k in &removed {
            self.set.remove(k);
        }
        self.seq += 1;
        Report {
            epoch: 1,
            seq: self.seq,
            full: false,
            upserts,
            removed_keys: removed,
            set_digest: set_digest(&self.set).to_vec(),
            status: ScanStatus::Complete as i32,
            ..Default::default()
        }
    }
}

fn batches(hosts: &mut [Agent], count: usize, generation: u64) -> Vec<Vec<ReportToApply>> {
    let mut out = Vec::with_capacity(count);
    let mut next_host = 0;
    for _ in 0..count {
        let mut batch = Vec::with_capacity(REPORTS_PER_BATCH);
        for _ in 0..REPORTS_PER_BATCH {
            let a = &mut hosts[next_host % hosts.len()];
            next_host += 1;
            batch.push(ReportToApply {
                host_id: a.host.clone(),
                report: a.report(generation),
                received_ms: 1_800_000_000_000,
            });
        }
        out.push(batch);
    }
    out
}

async fn bench(name: &str, store: Arc<dyn Storage>) {
    let mut agents: Vec<Agent> = (0..HOSTS)
        .map(|i| Agent {
            host: format!("host-{i:03}"),
            seq: 0,
            next_path: 0,
            set: Default::default(),
            live: VecDeque::new(),
        })
        .collect();
    for a in &agents {
        store
            .enroll_host(
                vec![],
                IssuedCertificate {
                    host_id: a.host.clone(),
                    serial: a.host.as_bytes().to_vec(),
                    not_before_ms: 0,
                    not_after_ms: i64::MAX,
                    issued_ms: 0,
                },
                driftwatch_collector::storage::AuditEntry::new(
                    0,
                    "local:bench",
                    "host.enrolled",
                    a.host.clone(),
                    serde_json::json!({}),
                ),
            )
            .await
            .unwrap();
    }
    let records = (BATCHES * REPORTS_PER_BATCH * ITEMS_PER_REPORT) as f64;

    // Sustained.
    let work = batches(&mut agents, BATCHES, 1);
    let start = Instant::now();
    for b in work {
        let out = store.apply_reports(b).await.unwrap();
        assert!(out.iter().all(|o| matches!(
            o,
            ApplyOutcome::Applied {
                digest_matches: true,
                ..
            }
        )));
    }
    let elapsed = start.elapsed();
    println!(
        "{name}: sustained {:.0} records/s ({} batches of {} records in {:.2?})",
        records / elapsed.as_secs_f64(),
        BATCHES,
        REPORTS_PER_BATCH * ITEMS_PER_REPORT,
        elapsed
    );

    // Paced at half the target rate.
    let work = batches(&mut agents, BATCHES, 2);
    let interval = Duration::from_secs_f64(
        (REPORTS_PER_BATCH * ITEMS_PER_REPORT) as f64 / (TARGET_RATE / 2.0),
    );
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(BATCHES);
    for (i, b) in work.into_iter().enumerate() {
        let due = start + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let out = store.apply_reports(b).await.unwrap();
        assert!(
            out.iter()
                .all(|o| matches!(o, ApplyOutcome::Applied { .. }))
        );
        latencies.push(due.elapsed());
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{name}: paced at {:.0} records/s: commit latency p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        TARGET_RATE / 2.0,
        pct(0.50),
        pct(0.99),
        latencies[latencies.len() - 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn sqlite_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.db");
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(path))
        .await
        .unwrap()
        .unwrap();
    bench("sqlite", Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn postgres_throughput() {
    let Some(server) = driftwatch_tests::postgres::server() else {
        return;
    };
    let url = server.create_database("throughput");
    let store = PgStore::connect(&url).await.unwrap();
    bench("postgres", Arc::new(store)).await;
}
