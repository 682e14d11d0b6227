//! `driftwatch-loadgen`: drives one running `driftwatch-collector serve` with many agents, each
//! its own enrolled identity on its own TLS 1.3 mTLS connection (the agent's real client code:
//! `driftwatch_agent::{enroll, transport}`), and prints one JSON object with the result.
//!
//! Modes (see `bench/collector.sh`, which runs them and renders the table):
//! - `ingest`: every agent sends reports of `--items` DriftItems back to back, keeping up to
//!   `--window` unacked reports in flight; result: acked records/s over the measured window.
//! - `latency`: the same reports, paced to `--rate` records/s in total; result: the ack latency
//!   percentiles, measured from each report's due time to its `Ack`.
//! - `idle`: `--agents` connect, say Hello and heartbeat at the Welcome interval for `--hold`;
//!   result: the collector's VmRSS/VmHWM (`--collector-pid`) while they are connected.
//!
//! Not a test: it is a workspace member outside `default-members`, so `cargo test` does not
//! build it (`cargo clippy --workspace --all-targets` does).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use driftwatch_agent::enroll::key_and_csr;
use driftwatch_agent::transport::{self, ClientAuth, CollectorUrl, ServerTrust};
use driftwatch_proto::Hash;
use driftwatch_proto::set::{file_key, item_hash, set_digest};
use driftwatch_proto::v1::enrollment_client::EnrollmentClient;
use driftwatch_proto::v1::ingest_client::IngestClient;
use driftwatch_proto::v1::{
    AgentMessage, DriftItem, EnrollRequest, Heartbeat, Hello, Report, ScanStatus, Violation,
    agent_message, collector_message, drift_item::Item,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

#[derive(Debug, Parser)]
#[command(name = "driftwatch-loadgen", about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Args, Clone)]
struct Common {
    /// The collector's gRPC URL.
    #[arg(long, default_value = "https://127.0.0.1:7443")]
    url: String,
    /// The collector CA certificate (PEM): `<state_dir>/ca/ca.pem`.
    #[arg(long)]
    ca_file: PathBuf,
    /// An enrollment token with at least `--agents` uses left.
    #[arg(long, env = "DRIFTWATCH_LOADGEN_TOKEN")]
    token: String,
    /// Number of agents (each enrolled, each its own connection).
    #[arg(long, default_value_t = 200)]
    agents: usize,
    /// Host ids are `<prefix><n>`; use a new prefix per run against the same collector.
    #[arg(long, default_value = "load-")]
    host_prefix: String,
    /// Enroll RPCs in flight.
    #[arg(long, default_value_t = 32)]
    enroll_concurrency: usize,
    /// Connection attempts (TCP + TLS + Hello) in flight.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Peak sustained rate: reports back to back, `--window` unacked per stream.
    Ingest {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
        #[arg(long, default_value_t = 4)]
        window: usize,
    },
    /// Paced at `--rate` records/s in total; ack latency percentiles.
    Latency {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        load: Load,
        /// Records per second, all agents together.
        #[arg(long)]
        rate: f64,
    },
    /// Connected, heartbeating agents; the collector's memory.
    Idle {
        #[command(flatten)]
        common: Common,
        /// How long to keep every agent connected after the last one connected.
        #[arg(long, default_value = "65s", value_parser = humantime::parse_duration)]
        hold: Duration,
        /// The collector's process id (for /proc/<pid>/status).
        #[arg(long)]
        collector_pid: u32,
    },
}

#[derive(Debug, Args, Clone)]
struct Load {
    /// The collector's process id: its CPU time over the measured window is reported.
    #[arg(long)]
    collector_pid: Option<u32>,
    /// The PostgreSQL postmaster's process id: CPU time of it and its backends over the
    /// measured window is reported.
    #[arg(long)]
    postgres_pid: Option<u32>,
    /// DriftItems (upserts) per report.
    #[arg(long, default_value_t = 500)]
    items: usize,
    /// Measured time, after the warm-up.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time at the start (streams open, first reports in flight).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    warmup: Duration,
}

/// One enrolled agent.
struct Identity {
    host: String,
    cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(async move {
        match cli.mode {
            Mode::Ingest {
                common,
                load,
                window,
            } => stream_load(&common, &load, Pace::Window(window.max(1))).await,
            Mode::Latency { common, load, rate } => {
                if rate.is_nan() || rate <= 0.0 {
                    bail!("--rate must be positive");
                }
                stream_load(&common, &load, Pace::Rate(rate)).await
            }
            Mode::Idle {
                common,
                hold,
                collector_pid,
            } => idle(&common, hold, collector_pid).await,
        }
    })?;
    println!("{out}");
    Ok(())
}

/// Streams the collector allows on one connection (`max_concurrent_streams`).
const STREAMS_PER_CONNECTION: usize = 8;

fn ca_der(common: &Common) -> Result<CertificateDer<'static>> {
    CertificateDer::from_pem_file(&common.ca_file)
        .with_context(|| format!("reading the CA certificate {}", common.ca_file.display()))
}

/// Enrolls `common.agents` hosts concurrently (one token, many uses), over a few
/// unauthenticated channels (the server allows 8 streams per connection).
///
/// Each channel has its own 8 permits. With the shared pool alone, the calls took permits in
/// the order the runtime first polled them, not in turn over the channels, so one channel
/// could start more than 8 calls at once. Until the server's SETTINGS frame arrives the client
/// does not know the limit, and the server refused the extra stream (`REFUSED_STREAM`), which
/// failed the whole run.
async fn enroll_all(common: &Common, url: &CollectorUrl) -> Result<Vec<Identity>> {
    let ca = ca_der(common)?;
    let channels = common
        .enroll_concurrency
        .div_ceil(STREAMS_PER_CONNECTION)
        .max(1);
    let mut clients = Vec::with_capacity(channels);
    for _ in 0..channels {
        let config = transport::client_config(ServerTrust::Roots(vec![ca.clone()]), None)?;
        clients.push((
            EnrollmentClient::new(transport::connect(url, config).await?),
            Arc::new(Semaphore::new(STREAMS_PER_CONNECTION)),
        ));
    }
    let permits = Arc::new(Semaphore::new(common.enroll_concurrency.max(1)));
    let mut set = JoinSet::new();
    for n in 0..common.agents {
        let host = format!("{}{n}", common.host_prefix);
        let (mut client, on_channel) = clients[n % channels].clone();
        let token = common.token.clone();
        let permits = permits.clone();
        set.spawn(async move {
            let _p = permits.acquire_owned().await?;
            let _c = on_channel.acquire_owned().await?;
            let (key, csr_der) = key_and_csr(&host)?;
            let resp = client
                .enroll(EnrollRequest {
                    token,
                    host_id: host.clone(),
                    csr_der,
                    labels: vec![],
                })
                .await
                .map_err(|s| anyhow::anyhow!("enrolling {host}: {}", describe_status(&s)))?
                .into_inner();
            Ok::<_, anyhow::Error>(Identity {
                host,
                cert: CertificateDer::from(resp.certificate_der),
                key_pkcs8: key.serialize_der(),
            })
        });
    }
    let mut out = Vec::with_capacity(common.agents);
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(id)) => out.push(id),
            Ok(Err(e)) => {
                return Err(e.context(format!(
                    "enrollment failed after {} of {} hosts had enrolled",
                    out.len(),
                    common.agents
                )));
            }
            Err(e) => bail!("an enrollment task failed: {e}"),
        }
    }
    Ok(out)
}

/// A gRPC status with everything it carries: tonic's `Display` leaves out an empty message and
/// the transport error behind a status made on the client (a reset stream, a closed
/// connection), which is all there is to go on then.
fn describe_status(s: &tonic::Status) -> String {
    let mut out = format!("gRPC status {:?}", s.code());
    if s.message().is_empty() {
        out.push_str(", no message");
    } else {
        out.push_str(&format!(", message {:?}", s.message()));
    }
    let mut source = std::error::Error::source(s);
    if source.is_none() {
        out.push_str(", no transport error behind it");
    }
    while let Some(e) = source {
        out.push_str(&format!("; caused by: {e} ({e:?})"));
        source = e.source();
    }
    let headers = s.metadata().clone().into_headers();
    if !headers.is_empty() {
        out.push_str(&format!("; metadata: {headers:?}"));
    }
    out
}

/// An open report stream: the sender and the collector's messages.
struct Stream {
    tx: mpsc::Sender<AgentMessage>,
    rx: tonic::Streaming<driftwatch_proto::v1::CollectorMessage>,
    heartbeat: Duration,
    stored_digest: Vec<u8>,
}

fn epoch_for(n: usize) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (nanos ^ ((n as u64) << 40)) | 1
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// TCP, TLS 1.3 with the agent's certificate, HTTP/2, `Ingest.Report`, Hello → Welcome.
async fn open_stream(
    url: &CollectorUrl,
    ca: &CertificateDer<'static>,
    id: &Identity,
    epoch: u64,
    queue: usize,
) -> Result<Stream> {
    let auth = ClientAuth {
        chain: vec![id.cert.clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_pkcs8.clone())),
    };
    let config = transport::client_config(ServerTrust::Roots(vec![ca.clone()]), Some(auth))?;
    let channel = transport::connect(url, config).await?;
    let (tx, rx) = mpsc::channel(queue);
    tx.send(AgentMessage {
        msg: Some(agent_message::Msg::Hello(Hello {
            agent_version: "loadgen".into(),
            host_id: id.host.clone(),
            image_id: "bench".into(),
            image_version: "1".into(),
            baseline_root: vec![7; 32],
            boot_id: "loadgen".into(),
            epoch,
        })),
    })
    .await?;
    let mut rx = IngestClient::new(channel)
        .max_encoding_message_size(4 << 20)
        .report(ReceiverStream::new(rx))
        .await?
        .into_inner();
    match tokio::time::timeout(Duration::from_secs(30), rx.message()).await {
        Ok(Ok(Some(m))) => match m.msg {
            Some(collector_message::Msg::Welcome(w)) => Ok(Stream {
                tx,
                rx,
                heartbeat: Duration::from_secs(u64::from(w.heartbeat_interval_seconds.max(1))),
                stored_digest: w.set_digest,
            }),
            other => bail!("{}: expected Welcome, got {other:?}", id.host),
        },
        Ok(Ok(None)) => bail!("{}: stream ended before Welcome", id.host),
        Ok(Err(s)) => bail!("{}: {s}", id.host),
        Err(_) => bail!("{}: no Welcome within 30 s", id.host),
    }
}

/// The agent's drift set and the reports that change it: each report upserts `items` items
/// (a fifth new paths, the rest changed content of items already in the set) and, once the set
/// is full, resolves as many of the oldest as it adds, so the set stays at `items`.
struct Generator {
    host: String,
    items: usize,
    next_path: u64,
    generation: u64,
    set: BTreeMap<Vec<u8>, Hash>,
    live: VecDeque<u64>,
}

impl Generator {
    fn new(host: &str, items: usize) -> Generator {
        Generator {
            host: host.to_string(),
            items,
            next_path: 0,
            generation: 0,
            set: BTreeMap::new(),
            live: VecDeque::new(),
        }
    }

    fn item(&self, n: u64) -> DriftItem {
        let path = format!("/srv/{}/usr/lib/x86_64-linux-gnu/lib{n:06}.so.1", self.host);
        let path = path.into_bytes();
        DriftItem {
            key: file_key(&path),
            item: Some(Item::File(Violation {
                path,
                kind: 3,
                severity: (n % 6) as i32,
                packages: vec![format!("libpkg{}:amd64", n % 97)],
                reason: format!("generation {}", self.generation),
                ..Default::default()
            })),
        }
    }

    fn next(&mut self, epoch: u64, seq: u64) -> Report {
        self.generation += 1;
        let fresh = if self.live.is_empty() {
            self.items
        } else {
            (self.items / 5).max(1)
        };
        let mut removed = Vec::new();
        let mut nums: Vec<u64> = Vec::with_capacity(self.items);
        // Resolve the oldest to make room.
        while self.live.len() + fresh > self.items {
            if let Some(old) = self.live.pop_front() {
                let path = format!(
                    "/srv/{}/usr/lib/x86_64-linux-gnu/lib{old:06}.so.1",
                    self.host
                );
                let key = file_key(path.as_bytes());
                self.set.remove(&key);
                removed.push(key);
            }
        }
        nums.extend(self.live.iter().copied().take(self.items - fresh));
        for _ in 0..fresh {
            nums.push(self.next_path);
            self.live.push_back(self.next_path);
            self.next_path += 1;
        }
        let upserts: Vec<DriftItem> = nums.into_iter().map(|n| self.item(n)).collect();
        for it in &upserts {
            self.set.insert(it.key.clone(), item_hash(it));
        }
        Report {
            epoch,
            seq,
            full: false,
            set_digest: set_digest(&self.set).to_vec(),
            scan_started_unix_ms: now_ms(),
            scan_finished_unix_ms: now_ms(),
            status: ScanStatus::Complete as i32,
            upserts,
            removed_keys: removed,
            ..Default::default()
        }
    }

    /// The whole set as one full report (after a Resync).
    fn full(&mut self, epoch: u64, seq: u64) -> Report {
        let upserts: Vec<DriftItem> = self.live.iter().map(|n| self.item(*n)).collect();
        self.set = upserts
            .iter()
            .map(|i| (i.key.clone(), item_hash(i)))
            .collect();
        Report {
            epoch,
            seq,
            full: true,
            set_digest: set_digest(&self.set).to_vec(),
            status: ScanStatus::Complete as i32,
            upserts,
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Pace {
    /// Back to back, this many unacked reports per stream.
    Window(usize),
    /// Records per second over all streams.
    Rate(f64),
}

#[derive(Default)]
struct Counters {
    records: AtomicU64,
    reports: AtomicU64,
    resyncs: AtomicU64,
    stream_errors: AtomicU64,
}

/// Per stream: what it measured.
#[derive(Default)]
struct StreamResult {
    latencies_us: Vec<u64>,
    error: Option<String>,
}

async fn stream_load(common: &Common, load: &Load, pace: Pace) -> Result<serde_json::Value> {
    let url = CollectorUrl::parse(&common.url)?;
    let ca = ca_der(common)?;
    let t0 = Instant::now();
    let ids = enroll_all(common, &url).await?;
    let enroll_s = t0.elapsed().as_secs_f64();

    // Connect everything first, then start the clock for all streams together.
    let t1 = Instant::now();
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let mut opening = JoinSet::new();
    for (n, id) in ids.into_iter().enumerate() {
        let url = url.clone();
        let ca = ca.clone();
        let permits = permits.clone();
        opening.spawn(async move {
            let _p = permits.acquire_owned().await?;
            let epoch = epoch_for(n);
            let s = open_stream(&url, &ca, &id, epoch, 64).await?;
            Ok::<_, anyhow::Error>((n, id, epoch, s))
        });
    }
    let mut streams = Vec::new();
    while let Some(r) = opening.join_next().await {
        streams.push(r??);
    }
    let connect_s = t1.elapsed().as_secs_f64();

    let agents = streams.len();
    let counters = Arc::new(Counters::default());
    let start = Instant::now();
    let measure_from = start + load.warmup;
    let end = measure_from + load.duration;
    let mut running = JoinSet::new();
    for (n, id, epoch, s) in streams {
        let counters = counters.clone();
        let items = load.items;
        running.spawn(async move {
            let mut gen_ = Generator::new(&id.host, items);
            let mut result = StreamResult::default();
            if let Err(e) = drive(
                s,
                &mut gen_,
                epoch,
                pace,
                agents,
                n,
                (start, measure_from, end),
                &counters,
                &mut result,
            )
            .await
            {
                counters.stream_errors.fetch_add(1, Ordering::Relaxed);
                result.error = Some(format!("{}: {e:#}", id.host));
            }
            result
        });
    }
    let (collector_pid, postgres_pid) = (load.collector_pid, load.postgres_pid);
    let cpu = tokio::spawn(async move {
        let sample = move || CpuSample {
            loadgen: cpu_seconds("self", false),
            collector: collector_pid.and_then(|p| cpu_seconds(&p.to_string(), false)),
            postgres: postgres_pid.and_then(|p| cpu_seconds(&p.to_string(), true)),
        };
        tokio::time::sleep_until(measure_from).await;
        let (a, wall) = (sample(), Instant::now());
        tokio::time::sleep_until(end).await;
        let (b, wall) = (sample(), wall.elapsed().as_secs_f64());
        let d = |x: Option<f64>, y: Option<f64>| Some(y? - x?);
        json!({
            "wall_s": wall,
            "loadgen": d(a.loadgen, b.loadgen),
            "collector": d(a.collector, b.collector),
            "postgres": d(a.postgres, b.postgres),
        })
    });
    let mut lat: Vec<u64> = Vec::new();
    let mut errors = Vec::new();
    while let Some(r) = running.join_next().await {
        let r = r?;
        lat.extend(r.latencies_us);
        if let Some(e) = r.error {
            errors.push(e);
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (lat.len() - 1) as f64).round() as usize;
        lat[i.min(lat.len() - 1)] as f64 / 1000.0
    };
    let cpu = cpu.await?;
    let secs = load.duration.as_secs_f64();
    let records = counters.records.load(Ordering::Relaxed);
    errors.truncate(5);
    Ok(json!({
        "mode": match pace { Pace::Window(_) => "ingest", Pace::Rate(_) => "latency" },
        "agents": agents,
        "items_per_report": load.items,
        "window": match pace { Pace::Window(w) => json!(w), Pace::Rate(_) => json!(null) },
        "target_rate": match pace { Pace::Rate(r) => json!(r), Pace::Window(_) => json!(null) },
        "measured_s": secs,
        "enroll_s": enroll_s,
        "connect_s": connect_s,
        "acked_records": records,
        "acked_reports": counters.reports.load(Ordering::Relaxed),
        "records_per_s": records as f64 / secs,
        "resyncs": counters.resyncs.load(Ordering::Relaxed),
        "stream_errors": counters.stream_errors.load(Ordering::Relaxed),
        "first_errors": errors,
        "latency_samples": lat.len(),
        "ack_ms_p50": pct(50.0),
        "ack_ms_p99": pct(99.0),
        "ack_ms_max": pct(100.0),
        "cpu_s": cpu,
    }))
}

/// CPU seconds of the processes that share the machine, at one instant.
struct CpuSample {
    loadgen: Option<f64>,
    collector: Option<f64>,
    postgres: Option<f64>,
}

/// User + system CPU seconds of `/proc/<pid>` (all its threads); with `children`, plus those of
/// its live child processes and its waited-for ones (PostgreSQL's backends are children of the
/// postmaster).
fn cpu_seconds(pid: &str, children: bool) -> Option<f64> {
    // /proc counts in USER_HZ, which Linux fixes at 100 on every architecture it exports it on.
    let ticks = 100.0;
    // Fields after the ")" that ends the command name: state (read as 0), ppid, ...; utime,
    // stime, cutime, cstime are the 12th to 15th (proc(5) fields 14 to 17).
    let fields = |path: std::path::PathBuf| -> Option<Vec<u64>> {
        let text = std::fs::read_to_string(path).ok()?;
        let rest = &text[text.rfind(')')? + 1..];
        Some(
            rest.split_whitespace()
                .map(|f| f.parse().unwrap_or(0))
                .collect(),
        )
    };
    let own = fields(format!("/proc/{pid}/stat").into())?;
    let mut total = own.get(11)? + own.get(12)?;
    if children {
        total += own.get(13)? + own.get(14)?;
        let parent: u64 = pid.parse().ok()?;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            if let Some(f) = fields(entry.path().join("stat"))
                && f.get(1) == Some(&parent)
            {
                total += f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0);
            }
        }
    }
    Some(total as f64 / ticks)
}

/// One stream's send/ack loop until `end`; acks of reports sent before `end` are awaited
/// (bounded) so the last window is not lost, but only acks inside the measured window count.
#[allow(clippy::too_many_arguments)]
async fn drive(
    mut s: Stream,
    gen_: &mut Generator,
    epoch: u64,
    pace: Pace,
    agents: usize,
    n: usize,
    (start, measure_from, end): (Instant, Instant, Instant),
    counters: &Counters,
    result: &mut StreamResult,
) -> Result<()> {
    let empty = set_digest(&BTreeMap::new());
    if s.stored_digest != empty {
        bail!("host already has a stored set (reuse of a host id?)");
    }
    // (seq, due time, records)
    let mut inflight: VecDeque<(u64, Instant, u64)> = VecDeque::new();
    let mut seq = 0u64;
    let mut resync = false;
    let (interval, window) = match pace {
        Pace::Window(w) => (None, w),
        Pace::Rate(r) => {
            let per_agent = r / agents as f64 / gen_.items as f64; // reports/s
            let iv = Duration::from_secs_f64(1.0 / per_agent);
            (Some(iv), 64)
        }
    };
    // Spread the paced agents over one interval.
    let mut due = match interval {
        Some(iv) => start + iv.mul_f64(n as f64 / agents as f64),
        None => start,
    };
    let mut next_heartbeat = start + s.heartbeat;
    let hard_end = end + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        if now >= end && inflight.is_empty() {
            break;
        }
        if now >= hard_end {
            bail!(
                "{} reports still unacked 10 s after the end",
                inflight.len()
            );
        }
        let can_send = now < end && inflight.len() < window;
        if can_send && now >= due {
            seq += 1;
            let report = if resync {
                resync = false;
                gen_.full(epoch, seq)
            } else {
                gen_.next(epoch, seq)
            };
            let records = report.upserts.len() as u64;
            let sent_due = if interval.is_some() { due } else { now };
            s.tx.send(AgentMessage {
                msg: Some(agent_message::Msg::Report(report)),
            })
            .await
            .context("stream closed")?;
            inflight.push_back((seq, sent_due, records));
            if let Some(iv) = interval {
                due += iv;
            }
            continue;
        }
        if now >= next_heartbeat {
            next_heartbeat = now + s.heartbeat;
            let _ =
                s.tx.send(AgentMessage {
                    msg: Some(agent_message::Msg::Heartbeat(Heartbeat {
                        sent_unix_ms: now_ms(),
                        last_scan_unix_ms: now_ms(),
                        last_scan_status: ScanStatus::Complete as i32,
                        last_seq: seq,
                    })),
                })
                .await;
        }
        let wake = if can_send {
            due.min(next_heartbeat)
        } else {
            hard_end.min(next_heartbeat)
        };
        tokio::select! {
            m = s.rx.message() => {
                let m = m.context("stream failed")?.context("stream ended by the collector")?;
                match m.msg {
                    Some(collector_message::Msg::Ack(a)) => {
                        let at = Instant::now();
                        while let Some(&(q, due, records)) = inflight.front() {
                            if q > a.seq {
                                break;
                            }
                            inflight.pop_front();
                            if at >= measure_from && at <= end {
                                counters.records.fetch_add(records, Ordering::Relaxed);
                                counters.reports.fetch_add(1, Ordering::Relaxed);
                                if due >= measure_from {
                                    result.latencies_us.push(at.duration_since(due).as_micros() as u64);
                                }
                            }
                        }
                    }
                    Some(collector_message::Msg::Resync(_)) => {
                        counters.resyncs.fetch_add(1, Ordering::Relaxed);
                        resync = true;
                    }
                    other => bail!("unexpected message {other:?}"),
                }
            }
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    Ok(())
}

/// Resolves once the flag is set (no borrow of the value is held across an await).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Reads `VmRSS` and `VmHWM` (KiB) of a process.
fn proc_mem(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn idle(common: &Common, hold: Duration, pid: u32) -> Result<serde_json::Value> {
    let url = CollectorUrl::parse(&common.url)?;
    let ca = ca_der(common)?;
    let before = proc_mem(pid).context("cannot read the collector's /proc/<pid>/status")?;
    let t0 = Instant::now();
    let ids = enroll_all(common, &url).await?;
    let enroll_s = t0.elapsed().as_secs_f64();
    let after_enroll = proc_mem(pid);

    let connected = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(AtomicUsize::new(0));
    let heartbeats = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let t1 = Instant::now();
    let mut tasks = JoinSet::new();
    for (n, id) in ids.into_iter().enumerate() {
        let (url, ca, permits) = (url.clone(), ca.clone(), permits.clone());
        let (connected, ended, heartbeats) = (connected.clone(), ended.clone(), heartbeats.clone());
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            let s = {
                let _p = permits.acquire_owned().await?;
                open_stream(&url, &ca, &id, epoch_for(n), 4).await?
            };
            connected.fetch_add(1, Ordering::Relaxed);
            let Stream {
                tx,
                mut rx,
                heartbeat,
                ..
            } = s;
            // Heartbeats at the Welcome interval, the first one at a random-ish phase.
            let phase = heartbeat.mul_f64((n % 1000) as f64 / 1000.0);
            let mut next = Instant::now() + phase;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {
                        next += heartbeat;
                        let hb = Heartbeat {
                            sent_unix_ms: now_ms(),
                            last_scan_unix_ms: now_ms(),
                            last_scan_status: ScanStatus::Complete as i32,
                            last_seq: 0,
                        };
                        if tx.send(AgentMessage { msg: Some(agent_message::Msg::Heartbeat(hb)) }).await.is_err() {
                            ended.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        heartbeats.fetch_add(1, Ordering::Relaxed);
                    }
                    m = rx.message() => {
                        if !matches!(m, Ok(Some(_))) {
                            ended.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    () = stopped(&mut stop) => break,
                }
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    // Wait until everyone connected (or failed), bounded.
    let connect_deadline = Instant::now() + Duration::from_secs(600);
    let mut failed = 0usize;
    let mut first_error = None;
    while connected.load(Ordering::Relaxed) + failed < common.agents
        && Instant::now() < connect_deadline
    {
        match tokio::time::timeout(Duration::from_millis(200), tasks.join_next()).await {
            Ok(Some(Ok(Err(e)))) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Ok(Some(Err(e))) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
            _ => {}
        }
    }
    let connect_s = t1.elapsed().as_secs_f64();
    let at_connected = proc_mem(pid);
    let mut peak_rss = at_connected.map(|m| m.0).unwrap_or(0);
    let hold_end = Instant::now() + hold;
    while Instant::now() < hold_end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some((rss, _)) = proc_mem(pid) {
            peak_rss = peak_rss.max(rss);
        }
    }
    let at_end = proc_mem(pid);
    let still = connected.load(Ordering::Relaxed)
        - ended
            .load(Ordering::Relaxed)
            .min(connected.load(Ordering::Relaxed));
    let _ = stop_tx.send(true);
    tasks.shutdown().await;
    let kib = |m: Option<(u64, u64)>, i: usize| m.map(|m| if i == 0 { m.0 } else { m.1 });
    Ok(json!({
        "mode": "idle",
        "agents": common.agents,
        "connected": connected.load(Ordering::Relaxed),
        "failed": failed,
        "first_error": first_error,
        "still_connected_at_end": still,
        "heartbeats_sent": heartbeats.load(Ordering::Relaxed),
        "enroll_s": enroll_s,
        "connect_s": connect_s,
        "hold_s": hold.as_secs_f64(),
        "rss_kib_before": before.0,
        "rss_kib_after_enroll": kib(after_enroll, 0),
        "rss_kib_connected": kib(at_connected, 0),
        "rss_kib_peak_sampled": peak_rss,
        "rss_kib_end": kib(at_end, 0),
        "hwm_kib_end": kib(at_end, 1),
    }))
}
