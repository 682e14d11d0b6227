//! The CEF syslog forwarder: a collector task (`[export.syslog]`) that sends every event, in
//! export order, as one RFC 5424 message with a CEF body to a SIEM's syslog receiver.
//!
//! - **Framing.** RFC 5424 messages (`<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`,
//!   the event's own time, MSGID = the event's action). UDP (RFC 5426): one message per
//!   datagram. TCP and TLS (RFC 6587 section 3.4.1, RFC 5425 section 4.3): octet counting,
//!   `MSG-LEN SP SYSLOG-MSG`. Every message is at most `max_message_bytes`; a longer CEF body
//!   loses its least important extension fields and carries `cn1Label=truncatedFrom cn1=<n>`.
//! - **TLS.** rustls with ring (the collector's one TLS stack), TLS 1.3, the receiver's
//!   certificate verified against `ca_file` for `server_name`.
//! - **Delivery.** The position of the last event sent is saved in the database
//!   (`export_cursors`, name `syslog`) after each batch has been written and flushed, so a
//!   restart resumes after it: nothing is skipped and, after a clean stop, nothing repeats. A
//!   crash between a write and its save resends that one batch (at most [`BATCH`] events,
//!   with the same event ids, so the SIEM can drop them). A failed write resends the batch on
//!   the next connection. Syslog has no application acknowledgement: bytes a TCP receiver's
//!   kernel accepted before it died are beyond any sender's knowledge.
//! - **Lag and backlog.** Events are forwarded `delay` after their time (they are stamped before
//!   their transaction commits, and replicas' clocks differ). While the receiver is away the
//!   events stay in the database, not in memory: memory is one batch, whatever the outage. An
//!   event older than `max_backlog` when its turn comes is skipped and counted, and the SIEM
//!   gets one `export.dropped` message with the count and time range; the count is also logged
//!   and in [`ForwarderStats`].
//! - **Reconnects** back off exponentially from 0.5 s to 30 s; every network wait is bounded
//!   (connect and each batch write: 10 s).
//!
//! Run it on one collector replica only: replicas do not coordinate a shared cursor.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::watch;

use super::config::{SyslogSettings, Transport};
use super::{ExportEvent, Kinds, Position, cef, host_infos};
use crate::api::rfc3339_ms;
use crate::storage::export::ExportCursor;
use crate::storage::{Storage, StorageError};
use driftwatch_proto::v1::Severity;

/// Events read, framed and written per batch (and the most a crash can resend).
pub const BATCH: usize = 256;
/// The cursor's name in `export_cursors`.
pub const CURSOR_NAME: &str = "syslog";
/// Bound on one connection attempt and on one batch's writes.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often host labels and images are re-read for the events' `labels`/image fields.
const HOSTS_REFRESH: Duration = Duration::from_secs(60);

/// Why the forwarder could not start.
#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("export.syslog.ca_file {path}: {detail}")]
    CaFile { path: String, detail: String },
}

/// Counters, for logs, tests and (later) metrics.
#[derive(Debug, Default)]
pub struct ForwarderStats {
    /// Messages written (events and drop notices).
    pub sent: AtomicU64,
    /// Events skipped because they were older than `max_backlog`.
    pub dropped: AtomicU64,
    /// Messages shortened to `max_message_bytes`.
    pub truncated: AtomicU64,
    /// Connection attempts or writes that failed.
    pub failures: AtomicU64,
}

/// RFC 5424 severity (0 emergency … 7 debug) of an event.
pub fn syslog_severity(e: &ExportEvent) -> u8 {
    match e.severity().map(Severity::try_from) {
        Some(Ok(Severity::Critical)) => 2,
        Some(Ok(Severity::High)) => 3,
        Some(Ok(Severity::Medium)) => 4,
        Some(Ok(Severity::Low)) => 5,
        Some(Ok(Severity::Info)) => 6,
        // Security events (refusals) and items without a severity.
        _ => 4,
    }
}

/// The fixed parts of every message's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framing {
    pub facility: u8,
    /// RFC 5424 HOSTNAME: 1..=255 printable US-ASCII, or `-`.
    pub hostname: String,
    pub app_name: String,
    pub procid: String,
    pub max_message_bytes: usize,
}

/// A header field: printable US-ASCII without spaces (RFC 5424 PRINTUSASCII), at most `max`
/// characters; anything else is replaced by `_`, an empty field is `-` (NILVALUE).
fn header_field(s: &str, max: usize) -> String {
    let f: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    if f.is_empty() { "-".into() } else { f }
}

impl Framing {
    pub fn new(settings: &SyslogSettings, hostname: &str) -> Framing {
        Framing {
            facility: settings.facility,
            hostname: header_field(hostname, 255),
            app_name: header_field(&settings.app_name, 48),
            procid: std::process::id().to_string(),
            max_message_bytes: settings.max_message_bytes,
        }
    }

    fn header(&self, severity: u8, at_ms: i64, msgid: &str) -> String {
        format!(
            "<{}>1 {} {} {} {} {} - ",
            u16::from(self.facility) * 8 + u16::from(severity),
            rfc3339_ms(at_ms),
            self.hostname,
            self.app_name,
            self.procid,
            header_field(msgid, 32),
        )
    }

    /// One event as an RFC 5424 message (no BOM: the CEF body is UTF-8, as CEF receivers
    /// expect), at most `max_message_bytes`. Returns whether the body was shortened.
    pub fn message(&self, e: &ExportEvent) -> (Vec<u8>, bool) {
        let header = self.header(syslog_severity(e), e.at_ms, &e.action);
        let budget = self.max_message_bytes.saturating_sub(header.len());
        let (body, truncated) = cef::line_capped(e, budget);
        let mut m = header.into_bytes();
        m.extend_from_slice(body.as_bytes());
        (m, truncated)
    }

    /// The notice for events skipped as older than `max_backlog`.
    pub fn dropped_notice(&self, count: u64, first_ms: i64, last_ms: i64, now_ms: i64) -> Vec<u8> {
        let mut m = self.header(4, now_ms, "export.dropped").into_bytes();
        m.extend_from_slice(
            format!(
                "CEF:0|driftwatch|driftwatch|{}|export.dropped|events dropped by the syslog \
                 forwarder|5|rt={now_ms} cnt={count} start={first_ms} end={last_ms} \
                 msg=older than max_backlog when the forwarder reached them",
                cef::escape_header(env!("CARGO_PKG_VERSION"))
            )
            .as_bytes(),
        );
        m
    }
}

/// RFC 6587 octet counting: `MSG-LEN SP SYSLOG-MSG`.
pub fn octet_counted(msg: &[u8]) -> Vec<u8> {
    let mut out = format!("{} ", msg.len()).into_bytes();
    out.extend_from_slice(msg);
    out
}

/// This machine's host name for the HOSTNAME field (`-` when unknown).
fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

enum Connection {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection {
    async fn send(&mut self, messages: &[Vec<u8>]) -> std::io::Result<()> {
        match self {
            Connection::Udp(s) => {
                for m in messages {
                    s.send(m).await?;
                }
                Ok(())
            }
            Connection::Tcp(s) => {
                let mut buf = Vec::new();
                for m in messages {
                    buf.extend_from_slice(&octet_counted(m));
                }
                s.write_all(&buf).await?;
                s.flush().await
            }
            Connection::Tls(s) => {
                let mut buf = Vec::new();
                for m in messages {
                    buf.extend_from_slice(&octet_counted(m));
                }
                s.write_all(&buf).await?;
                s.flush().await
            }
        }
    }

    async fn close(self) {
        match self {
            Connection::Udp(_) => {}
            Connection::Tcp(mut s) => {
                let _ = tokio::time::timeout(IO_TIMEOUT, s.shutdown()).await;
            }
            Connection::Tls(mut s) => {
                // close_notify, so the receiver knows the stream ended on purpose.
                let _ = tokio::time::timeout(IO_TIMEOUT, s.shutdown()).await;
            }
        }
    }
}

/// The forwarder task: create it at startup (reads the CA file), then [`Forwarder::run`].
pub struct Forwarder {
    store: Arc<dyn Storage>,
    settings: SyslogSettings,
    framing: Framing,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
    stats: Arc<ForwarderStats>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A rustls client configuration trusting only the CA certificates in `pem_path`.
pub fn client_config(pem_path: &std::path::Path) -> Result<rustls::ClientConfig, ForwarderError> {
    use rustls_pki_types::pem::PemObject;
    let err = |detail: String| ForwarderError::CaFile {
        path: pem_path.display().to_string(),
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(pem_path)
        .map_err(|e| err(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| err(e.to_string()))?;
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Sleeps `d` unless stopped first; returns whether to stop.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    match tokio::time::timeout(d, stop.wait_for(|s| *s)).await {
        Err(_) => false,
        Ok(Ok(_)) => true,
        // The sender is gone: nobody could stop the task later, so stop now.
        Ok(Err(_)) => true,
    }
}

impl Forwarder {
    pub fn new(
        store: Arc<dyn Storage>,
        settings: SyslogSettings,
    ) -> Result<Forwarder, ForwarderError> {
        let tls =
            match &settings.transport {
                Transport::Tls {
                    ca_file,
                    server_name,
                } => {
                    let name = rustls_pki_types::ServerName::try_from(server_name.clone())
                        .map_err(|e| ForwarderError::CaFile {
                            path: ca_file.display().to_string(),
                            detail: format!("server name {server_name:?}: {e}"),
                        })?;
                    Some((Arc::new(client_config(ca_file)?), name))
                }
                Transport::Udp | Transport::Tcp => None,
            };
        let framing = Framing::new(&settings, &local_hostname());
        Ok(Forwarder {
            store,
            settings,
            framing,
            tls,
            stats: Arc::new(ForwarderStats::default()),
        })
    }

    pub fn stats(&self) -> Arc<ForwarderStats> {
        self.stats.clone()
    }

    async fn connect(&self) -> std::io::Result<Connection> {
        let addr = self.settings.address.as_str();
        let conn = async {
            Ok(match (&self.settings.transport, &self.tls) {
                (Transport::Udp, _) => {
                    let target = tokio::net::lookup_host(addr).await?.next().ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                    })?;
                    let local: std::net::SocketAddr = if target.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                    };
                    let s = UdpSocket::bind(local).await?;
                    // Connected: a receiver that is gone shows as ECONNREFUSED on a send.
                    s.connect(target).await?;
                    Connection::Udp(s)
                }
                (Transport::Tcp, _) => {
                    let s = TcpStream::connect(addr).await?;
                    s.set_nodelay(true)?;
                    Connection::Tcp(s)
                }
                (Transport::Tls { .. }, Some((config, name))) => {
                    let s = TcpStream::connect(addr).await?;
                    s.set_nodelay(true)?;
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name.clone(), s)
                        .await?;
                    Connection::Tls(Box::new(tls))
                }
                (Transport::Tls { .. }, None) => {
                    return Err(std::io::Error::other("TLS transport without a TLS config"));
                }
            })
        };
        tokio::time::timeout(IO_TIMEOUT, conn)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }

    async fn load_position(&self) -> Result<Position, StorageError> {
        let fresh = Position::before(now_ms().saturating_sub(ms(self.settings.max_backlog)));
        Ok(match self.store.export_cursor(CURSOR_NAME).await? {
            None => fresh,
            Some(c) => match c.position.parse::<Position>() {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "syslog forwarder: unreadable saved cursor; starting max_backlog back");
                    fresh
                }
            },
        })
    }

    /// Forwards until `stop` becomes true. Errors are logged and retried with backoff; the
    /// task only ends when stopped.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let target = self.settings.address.clone();
        tracing::info!(address = %target, transport = ?self.settings.transport, "syslog forwarder starting");
        let mut backoff = BACKOFF_MIN;
        let mut position = loop {
            match self.load_position().await {
                Ok(p) => break p,
                Err(e) => {
                    tracing::warn!(error = %e, "syslog forwarder: cannot read its cursor");
                    if pause(backoff, &mut stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        };
        let mut conn: Option<Connection> = None;
        let mut hosts = Default::default();
        let mut hosts_read: Option<tokio::time::Instant> = None;
        // Dropped events not yet announced: count, first and last time.
        let mut dropped: Option<(u64, i64, i64)> = None;
        while !*stop.borrow() {
            if hosts_read.is_none_or(|t| t.elapsed() >= HOSTS_REFRESH) {
                match host_infos(self.store.as_ref()).await {
                    Ok(h) => {
                        hosts = h;
                        hosts_read = Some(tokio::time::Instant::now());
                    }
                    Err(e) => tracing::warn!(error = %e, "syslog forwarder: cannot read hosts"),
                }
            }
            let now = now_ms();
            let until = now.saturating_sub(ms(self.settings.delay));
            let floor = now.saturating_sub(ms(self.settings.max_backlog));
            let mut reader =
                super::EventReader::new(position, until, Kinds::ALL, BATCH as u32, hosts.clone());
            let batch = match reader.next_batch(self.store.as_ref(), BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "syslog forwarder: cannot read events");
                    if pause(backoff, &mut stop).await {
                        break;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            let Some(last) = batch.last().map(|e| e.position) else {
                if pause(self.settings.poll_interval, &mut stop).await {
                    break;
                }
                continue;
            };
            let caught_up = batch.len() < BATCH;
            // What is dropped and announced only counts once the batch went out: a failed
            // send re-reads the same events.
            let mut pending = dropped;
            let mut messages = Vec::with_capacity(batch.len() + 1);
            let mut truncated = 0u64;
            let mut kept_any = false;
            let mut batch_dropped = 0u64;
            for e in &batch {
                if e.at_ms < floor {
                    batch_dropped += 1;
                    let d = pending.get_or_insert((0, e.at_ms, e.at_ms));
                    d.0 += 1;
                    d.2 = e.at_ms;
                    continue;
                }
                if !kept_any {
                    kept_any = true;
                    if let Some((n, first, last)) = pending {
                        messages.push(self.framing.dropped_notice(n, first, last, now));
                    }
                }
                let (m, cut) = self.framing.message(e);
                truncated += u64::from(cut);
                messages.push(m);
            }
            let announce = pending.is_some() && (kept_any || caught_up);
            if !kept_any
                && caught_up
                && let Some((n, first, last)) = pending
            {
                messages.push(self.framing.dropped_notice(n, first, last, now));
            }
            if !messages.is_empty() {
                if conn.is_none() {
                    match self.connect().await {
                        Ok(c) => {
                            tracing::info!(address = %target, "syslog forwarder connected");
                            conn = Some(c);
                        }
                        Err(e) => {
                            self.stats.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(address = %target, error = %e, retry_in = ?backoff, "syslog forwarder: cannot connect");
                            if pause(backoff, &mut stop).await {
                                break;
                            }
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            continue;
                        }
                    }
                }
                let Some(c) = conn.as_mut() else { continue };
                let sent = tokio::time::timeout(IO_TIMEOUT, c.send(&messages)).await;
                match sent {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => {
                        let reason = match sent {
                            Ok(Err(e)) => e.to_string(),
                            _ => "write timed out".into(),
                        };
                        self.stats.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(address = %target, error = %reason, retry_in = ?backoff, "syslog forwarder: send failed; resending the batch after reconnecting");
                        conn = None;
                        if pause(backoff, &mut stop).await {
                            break;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
                self.stats
                    .sent
                    .fetch_add(messages.len() as u64, Ordering::Relaxed);
                self.stats.truncated.fetch_add(truncated, Ordering::Relaxed);
            }
            if batch_dropped > 0 {
                tracing::warn!(
                    count = batch_dropped,
                    "syslog forwarder: events older than max_backlog skipped"
                );
                self.stats
                    .dropped
                    .fetch_add(batch_dropped, Ordering::Relaxed);
            }
            dropped = if announce { None } else { pending };
            backoff = BACKOFF_MIN;
            position = last;
            if let Err(e) = self
                .store
                .save_export_cursor(
                    CURSOR_NAME,
                    ExportCursor {
                        position: position.to_string(),
                        saved_ms: now_ms(),
                    },
                )
                .await
            {
                // Kept in memory: this process will not resend; a restart before the next
                // successful save resends from the older saved position.
                tracing::warn!(error = %e, "syslog forwarder: cannot save its cursor");
            }
        }
        if let Some(c) = conn {
            c.close().await;
        }
        tracing::info!("syslog forwarder stopped");
    }

    /// Spawns [`Forwarder::run`]; the task ends when `stop` becomes true.
    pub fn spawn(self, stop: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(self.run(stop))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_are_printable_ascii() {
        assert_eq!(header_field("web 1\u{1b}é", 255), "web_1__");
        assert_eq!(header_field("", 10), "-");
        assert_eq!(header_field(&"a".repeat(40), 32).len(), 32);
    }

    #[test]
    fn octet_counting() {
        assert_eq!(octet_counted(b"<14>1 x"), b"7 <14>1 x");
        assert_eq!(octet_counted("é".as_bytes()), "2 é".as_bytes());
    }
}
