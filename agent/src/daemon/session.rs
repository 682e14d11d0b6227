//! One report stream (`Ingest.Report`): Hello, Welcome, then every pending spool record in seq
//! order and new ones as they are spooled, heartbeats, and the collector's acks and resyncs.
//!
//! Records leave the spool only on an `Ack`. A record is sent at most once per stream; after a
//! reconnect every record still pending is sent again (the collector deduplicates by
//! (host, epoch, seq)).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use driftwatch_proto::v1::agent_message::Msg as Out;
use driftwatch_proto::v1::collector_message::Msg as In;
use driftwatch_proto::v1::ingest_client::IngestClient;
use driftwatch_proto::v1::{AgentMessage, Heartbeat, Hello, Report, Welcome};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::notify;
use super::scanner::{Shared, last_scan_for_heartbeat};
use crate::spool::Record;

/// gRPC message size limit, both ways (the contract's 4 MiB).
pub const MAX_MESSAGE: usize = 4 << 20;
/// How long the collector has to answer Hello.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Records read from the spool at a time.
const BATCH_RECORDS: usize = 64;
const BATCH_BYTES: usize = 8 << 20;
/// Heartbeat interval when the Welcome names none (the contract's default).
const DEFAULT_HEARTBEAT_SECONDS: u64 = 30;
/// On shutdown, how long to wait for the acks of records already sent.
const DRAIN: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the collector refused the stream: {0}")]
    Status(#[from] tonic::Status),
    #[error("the collector closed the stream")]
    Closed,
    #[error("the collector did not answer Hello within {0:?}")]
    NoWelcome(Duration),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("spool: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("internal: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Why a stream ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    Shutdown,
    /// The certificate is due for renewal: renew, then reconnect.
    Renew,
    /// Pending records of another epoch follow: reconnect with a Hello of their epoch.
    EpochChange,
}

/// Host facts for Hello.
#[derive(Debug, Clone, Default)]
pub struct HelloFacts {
    pub host_id: String,
    pub boot_id: String,
}

fn hex_to_bytes(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    f: impl FnOnce(&Shared) -> T + Send + 'static,
) -> Result<T, SessionError> {
    let s = shared.clone();
    Ok(tokio::task::spawn_blocking(move || f(&s)).await?)
}

/// Runs one stream until it fails, the certificate is due, or shutdown.
pub async fn run(
    shared: &Arc<Shared>,
    channel: Channel,
    facts: &HelloFacts,
    renew_at: tokio::time::Instant,
    shutdown: &mut watch::Receiver<bool>,
    connected: &mut bool,
) -> Result<SessionEnd, SessionError> {
    // The stream's epoch: that of the oldest pending record (records written before a lost
    // spool meta keep their epoch), else the spool's.
    let (epoch, first_pending) = blocking(shared, |s| {
        let o = s.outbox();
        let first = o.pending_after(0, 1, 1).map(|v| v.into_iter().next());
        (o.epoch(), first)
    })
    .await?;
    let epoch = first_pending?.map_or(epoch, |r| r.epoch);

    let baseline = shared.status().baseline.clone();
    let hello = Hello {
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        host_id: facts.host_id.clone(),
        image_id: baseline.image_id,
        image_version: baseline.image_version,
        baseline_root: hex_to_bytes(&baseline.merkle_root),
        boot_id: facts.boot_id.clone(),
        epoch,
    };
    // Bounded: a slow collector pushes back on the sender instead of filling memory.
    let (tx, rx) = mpsc::channel::<AgentMessage>(8);
    let _ = tx
        .send(AgentMessage {
            msg: Some(Out::Hello(hello)),
        })
        .await;
    let mut client = IngestClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut inbound = client.report(ReceiverStream::new(rx)).await?.into_inner();
    let welcome: Welcome = match tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()).await {
        Err(_) => return Err(SessionError::NoWelcome(WELCOME_TIMEOUT)),
        Ok(Err(s)) => return Err(s.into()),
        Ok(Ok(None)) => return Err(SessionError::Closed),
        Ok(Ok(Some(m))) => match m.msg {
            Some(In::Welcome(w)) => w,
            other => {
                return Err(SessionError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
        },
    };
    // The collector's committed seq counts only for our epoch (it may still hold another).
    let committed = if welcome.epoch == epoch {
        welcome.last_committed_seq
    } else {
        tracing::debug!(
            "Welcome for epoch {:x}, Hello said {epoch:x}: nothing of ours is committed",
            welcome.epoch
        );
        0
    };
    tracing::info!(
        host_id = %welcome.host_id,
        last_committed_seq = welcome.last_committed_seq,
        "connected to the collector"
    );
    // What the collector already committed leaves the spool now; if nothing is pending and
    // its digest is not ours, it gets the full set.
    let digest = welcome.set_digest.clone();
    let (acked_through, pending) = blocking(shared, move |s| {
        let mut o = s.outbox();
        if committed > 0
            && let Err(e) = o.ack(epoch, committed)
        {
            tracing::warn!("cannot apply the collector's committed seq {committed}: {e}");
        }
        if o.stats().records == 0
            && let Some(ours) = o.digest()
            && ours.as_slice() != digest.as_slice()
        {
            tracing::info!("the collector's set digest differs from ours: sending the full set");
            if let Err(e) = o.resync(crate::time::now_unix_ns() / 1_000_000) {
                tracing::error!("cannot spool the full set: {e}");
            }
        }
        (
            o.stats().oldest_seq.map_or(o.last_seq(), |s| s - 1),
            o.stats().records,
        )
    })
    .await?;
    *connected = true;
    shared.status().set_collector("connected", None);
    notify::status(&format!("connected, {pending} pending"));
    {
        let s = shared.clone();
        tokio::task::spawn_blocking(move || s.write_status());
    }

    let heartbeat_every = Duration::from_secs(match welcome.heartbeat_interval_seconds {
        0 => DEFAULT_HEARTBEAT_SECONDS,
        n => u64::from(n),
    });
    let mut heartbeat = tokio::time::interval(heartbeat_every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut tick = tokio::time::interval(shared.liveness.tick_interval());
    let mut sent_through = acked_through;
    let mut acked = acked_through;
    let mut queue: VecDeque<Record> = VecDeque::new();
    let mut load = true;
    let mut epoch_change = false;

    loop {
        if load && queue.is_empty() && !epoch_change {
            let after = sent_through;
            let batch = blocking(shared, move |s| {
                s.outbox().pending_after(after, BATCH_RECORDS, BATCH_BYTES)
            })
            .await??;
            load = batch.len() >= BATCH_RECORDS;
            queue.extend(batch);
        }
        if epoch_change && acked >= sent_through {
            return Ok(SessionEnd::EpochChange);
        }
        tokio::select! {
            _ = shutdown.changed() => break,
            msg = inbound.message() => match msg? {
                None => return Err(SessionError::Closed),
                Some(m) => match m.msg {
                    Some(In::Ack(a)) => {
                        if a.seq > sent_through {
                            return Err(SessionError::Protocol(format!(
                                "ack of seq {} beyond the last sent {sent_through}", a.seq
                            )));
                        }
                        let seq = a.seq;
                        let pending = blocking(shared, move |s| {
                            let mut o = s.outbox();
                            o.ack(epoch, seq).map(|_| o.stats().records)
                        }).await??;
                        acked = acked.max(seq);
                        notify::status(&format!("connected, {pending} pending"));
                        let s = shared.clone();
                        tokio::task::spawn_blocking(move || s.write_status());
                    }
                    Some(In::Resync(r)) => {
                        tracing::warn!(reason = %r.reason, "the collector asked for the full set");
                        let n = blocking(shared, |s| {
                            s.outbox().resync(crate::time::now_unix_ns() / 1_000_000)
                        }).await??;
                        if n.reports > 0 {
                            load = true;
                        }
                    }
                    Some(In::Welcome(_)) | None => {
                        return Err(SessionError::Protocol("unexpected message".into()));
                    }
                },
            },
            permit = tx.reserve(), if !queue.is_empty() && !epoch_change => {
                let Ok(permit) = permit else { return Err(SessionError::Closed) };
                let Some(rec) = queue.pop_front() else { continue };
                if rec.epoch != epoch {
                    // Finish this epoch (wait for its acks), then reconnect under the next.
                    epoch_change = true;
                    queue.clear();
                    continue;
                }
                let report = Report::decode(rec.payload.as_slice()).map_err(|e| {
                    SessionError::Protocol(format!("spool record {} is not a report: {e}", rec.seq))
                })?;
                permit.send(AgentMessage { msg: Some(Out::Report(report)) });
                sent_through = rec.seq;
            }
            _ = shared.records_ready.notified() => {
                load = true;
            }
            _ = heartbeat.tick() => {
                let (last_scan, last_status) = last_scan_for_heartbeat(&shared.status());
                let last_seq = blocking(shared, |s| s.outbox().last_seq()).await?;
                let hb = Heartbeat {
                    sent_unix_ms: crate::time::now_unix_ns() / 1_000_000,
                    last_scan_unix_ms: last_scan,
                    last_scan_status: last_status as i32,
                    last_seq,
                };
                // Never wait for room: a heartbeat behind a full queue is pointless anyway.
                let _ = tx.try_send(AgentMessage { msg: Some(Out::Heartbeat(hb)) });
            }
            _ = tokio::time::sleep_until(renew_at) => return Ok(SessionEnd::Renew),
            _ = tick.tick() => shared.liveness.tick(),
        }
    }
    drain(inbound, tx, shared, epoch, acked, sent_through).await;
    Ok(SessionEnd::Shutdown)
}

/// Shutdown: send nothing more, wait briefly for the acks of what was sent, then close the
/// request stream (END_STREAM) and give the collector a moment to end its side, so the stream
/// ends cleanly instead of being reset.
async fn drain(
    mut inbound: tonic::Streaming<driftwatch_proto::v1::CollectorMessage>,
    tx: mpsc::Sender<AgentMessage>,
    shared: &Arc<Shared>,
    epoch: u64,
    mut acked: u64,
    sent_through: u64,
) {
    let deadline = tokio::time::Instant::now() + DRAIN;
    while acked < sent_through {
        match tokio::time::timeout_at(deadline, inbound.message()).await {
            Ok(Ok(Some(m))) => {
                if let Some(In::Ack(a)) = m.msg {
                    let seq = a.seq.min(sent_through);
                    let s = shared.clone();
                    let _ = tokio::task::spawn_blocking(move || s.outbox().ack(epoch, seq)).await;
                    acked = acked.max(seq);
                }
            }
            _ => return,
        }
    }
    drop(tx);
    while let Ok(Ok(Some(_))) = tokio::time::timeout_at(deadline, inbound.message()).await {}
}
