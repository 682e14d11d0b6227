//! Delivering one rebuild request: one attempt of a webhook POST (HTTP or HTTPS) or of a
//! command, bounded by the configured timeout, and its outcome as data.
//!
//! - Webhook: `POST url` with the JSON body, `content-type: application/json` and the Standard
//!   Webhooks headers (`webhook-id` = the action id, `webhook-timestamp` = now, signature over
//!   both and the body). One connection per attempt (hyper's HTTP/1.1 client directly). HTTPS
//!   uses rustls with the ring provider and only the certificates of the configured CA file.
//!   A 2xx answer is delivered; anything else is a failed attempt with the status and the first
//!   [`EXCERPT_BYTES`] of the answer's body recorded.
//! - Command: `argv` run directly (no shell) in its own process group with a clean environment
//!   (`PATH`, `DRIFTWATCH_ACTION_ID`, `DRIFTWATCH_IDEMPOTENCY_KEY`, `DRIFTWATCH_HOST_ID`), the
//!   body on stdin, stdout discarded. Exit 0 is delivered; anything else a failed attempt with
//!   the first [`EXCERPT_BYTES`] of stderr. On timeout the whole process group is killed.
//!
//! What this module must never do: retry (the dispatcher decides), touch storage, or let a
//! receiver's bytes through unescaped (`driftwatch_proto::escape` on every excerpt).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes_excerpt::Excerpt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::{CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use super::config::{ActionSettings, ExecutorSettings};
use super::webhook::Secret;
use crate::config::{ConfigError, invalid};

/// At most this much of a receiver's answer (or a command's stderr) is kept.
pub const EXCERPT_BYTES: usize = 512;

/// What one attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptOutcome {
    pub delivered: bool,
    /// The HTTP status, or the command's exit code.
    pub status: Option<i32>,
    /// For people: what happened, with the bounded, escaped excerpt.
    pub detail: String,
    pub duration: Duration,
}

/// What one delivery carries.
#[derive(Debug, Clone, Copy)]
pub struct DeliveryRequest<'a> {
    pub action_id: &'a str,
    pub idempotency_key: &'a str,
    pub host_id: &'a str,
    pub body: &'a [u8],
    /// Unix seconds for `webhook-timestamp`.
    pub now_s: i64,
}

/// The configured way to request a rebuild, with its secret and trust loaded.
#[derive(Debug, Clone)]
pub struct Executor {
    kind: Kind,
    timeout: Duration,
}

#[derive(Debug, Clone)]
enum Kind {
    Webhook(Arc<WebhookTarget>),
    Command(Arc<Vec<String>>),
}

struct WebhookTarget {
    url: Uri,
    host: String,
    port: u16,
    authority: String,
    path_and_query: String,
    secret: Secret,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// Reads the secret and CA files. Errors name the `[actions]` key (exit 64 at startup).
    pub fn load(settings: &ActionSettings) -> Result<Executor, ConfigError> {
        let kind = match &settings.executor {
            ExecutorSettings::Webhook {
                url,
                secret_file,
                ca_file,
            } => Kind::Webhook(Arc::new(webhook_target(
                url,
                secret_file,
                ca_file.as_deref(),
            )?)),
            ExecutorSettings::Command { argv } => Kind::Command(Arc::new(argv.clone())),
        };
        Ok(Executor {
            kind,
            timeout: settings.timeout,
        })
    }

    /// For audit records: how requests are sent (never the secret).
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Webhook(t) => format!("webhook POST {}", t.url),
            Kind::Command(argv) => format!("command {}", argv.first().map_or("?", String::as_str)),
        }
    }

    /// One attempt; never longer than the timeout (plus the time to reap a killed command).
    pub async fn deliver(&self, req: DeliveryRequest<'_>) -> AttemptOutcome {
        let started = Instant::now();
        let (delivered, status, detail) = match &self.kind {
            Kind::Webhook(t) => match tokio::time::timeout(self.timeout, post(t, req)).await {
                Ok(Ok((status, excerpt))) => {
                    let ok = (200..300).contains(&status);
                    let detail = if excerpt.is_empty() {
                        format!("HTTP {status}")
                    } else {
                        format!("HTTP {status}: {excerpt}")
                    };
                    (ok, Some(i32::from(status)), detail)
                }
                Ok(Err(e)) => (false, None, e),
                Err(_) => (
                    false,
                    None,
                    format!(
                        "no answer within {}",
                        humantime::format_duration(self.timeout)
                    ),
                ),
            },
            Kind::Command(argv) => run_command(argv, req, self.timeout).await,
        };
        AttemptOutcome {
            delivered,
            status,
            detail,
            duration: started.elapsed(),
        }
    }
}

fn webhook_target(
    url: &Uri,
    secret_file: &Path,
    ca_file: Option<&Path>,
) -> Result<WebhookTarget, ConfigError> {
    let text = std::fs::read_to_string(secret_file).map_err(|e| {
        invalid(
            "actions.secret_file",
            format!("cannot read {}: {e}", secret_file.display()),
        )
    })?;
    let secret = Secret::parse(&text).map_err(|e| {
        invalid(
            "actions.secret_file",
            format!("{}: {e}", secret_file.display()),
        )
    })?;
    let https = url.scheme_str() == Some("https");
    let authority = url
        .authority()
        .ok_or_else(|| invalid("actions.url", "has no host"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path_and_query = url
        .path_and_query()
        .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
    let tls = match (https, ca_file) {
        (true, Some(ca)) => Some(tls_connector(ca)?),
        (true, None) => return Err(invalid("actions.ca_file", "is required for an https url")),
        (false, _) => None,
    };
    Ok(WebhookTarget {
        url: url.clone(),
        host,
        port,
        authority: authority.as_str().to_string(),
        path_and_query,
        secret,
        tls,
    })
}

fn tls_connector(ca_file: &Path) -> Result<tokio_rustls::TlsConnector, ConfigError> {
    let bad = |m: String| invalid("actions.ca_file", format!("{}: {m}", ca_file.display()));
    let pem = std::fs::read(ca_file).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("bad PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(bad("holds no certificate".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Sends the request; the status and the escaped body excerpt, or why it could not.
async fn post(t: &WebhookTarget, req: DeliveryRequest<'_>) -> Result<(u16, String), String> {
    let tcp = tokio::net::TcpStream::connect((t.host.as_str(), t.port))
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", t.authority))?;
    let _ = tcp.set_nodelay(true);
    match &t.tls {
        None => exchange(t, req, TokioIo::new(tcp)).await,
        Some(tls) => {
            let name = ServerName::try_from(t.host.clone())
                .map_err(|e| format!("{:?} is not a TLS server name: {e}", t.host))?;
            let stream = tls
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {}: {e}", t.authority))?;
            exchange(t, req, TokioIo::new(stream)).await
        }
    }
}

async fn exchange<IO>(
    t: &WebhookTarget,
    req: DeliveryRequest<'_>,
    io: TokioIo<IO>,
) -> Result<(u16, String), String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake with {}: {e}", t.authority))?;
    // The connection task drives the socket; it ends with the exchange (or with the
    // timeout dropping the caller's future, which drops `sender` and so closes it).
    let conn = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut builder = Request::post(t.path_and_query.as_str())
        .header(HOST, t.authority.as_str())
        .header(CONTENT_TYPE, "application/json")
        .header(
            USER_AGENT,
            concat!("driftwatch-collector/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in t.secret.headers(req.action_id, req.now_s, req.body) {
        builder = builder.header(name, value);
    }
    let request = builder
        .body(Full::new(Bytes::copy_from_slice(req.body)))
        .map_err(|e| format!("building the request: {e}"))?;
    let result = async {
        let resp = sender
            .send_request(request)
            .await
            .map_err(|e| format!("POST to {}: {e}", t.authority))?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut excerpt = Excerpt::new(EXCERPT_BYTES);
        // Read only as much as the excerpt keeps: a huge answer costs nothing.
        while !excerpt.full() {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        excerpt.push(data);
                    }
                }
                Some(Err(_)) | None => break,
            }
        }
        Ok((status, excerpt.finish()))
    }
    .await;
    drop(sender);
    conn.abort();
    result
}

/// Runs the command once. (delivered, exit code, detail)
///
/// `std::process` on a blocking thread (the command's life is at most `timeout`), polling its
/// exit every 20 ms: the collector's tokio carries no process driver.
async fn run_command(
    argv: &[String],
    req: DeliveryRequest<'_>,
    timeout: Duration,
) -> (bool, Option<i32>, String) {
    let argv = argv.to_vec();
    let env = [
        ("DRIFTWATCH_ACTION_ID", req.action_id.to_string()),
        (
            "DRIFTWATCH_IDEMPOTENCY_KEY",
            req.idempotency_key.to_string(),
        ),
        ("DRIFTWATCH_HOST_ID", req.host_id.to_string()),
    ];
    let body = req.body.to_vec();
    match tokio::task::spawn_blocking(move || run_command_blocking(&argv, &env, body, timeout))
        .await
    {
        Ok(r) => r,
        Err(e) => (false, None, format!("the command task failed: {e}")),
    }
}

fn run_command_blocking(
    argv: &[String],
    env: &[(&str, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> (bool, Option<i32>, String) {
    use std::io::{Read, Write};
    use std::os::unix::process::{CommandExt, ExitStatusExt};

    let Some((program, args)) = argv.split_first() else {
        return (false, None, "no program configured".into());
    };
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout can kill everything it started.
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (false, None, format!("cannot run {program}: {e}")),
    };
    let deadline = Instant::now() + timeout;
    let pgid = child.id();
    // Written from its own thread: a command that does not read stdin must not block us
    // (the thread ends when the command exits or is killed: the pipe breaks).
    if let Some(mut stdin) = child.stdin.take() {
        let _ = std::thread::Builder::new()
            .name("rebuild-stdin".into())
            .spawn(move || {
                let _ = stdin.write_all(&body);
            });
    }
    // stderr is read to its end (so the command never blocks on a full pipe) but only the
    // excerpt is kept; the result comes back over a channel so waiting for it is bounded.
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = std::thread::Builder::new()
            .name("rebuild-stderr".into())
            .spawn(move || {
                let mut excerpt = Excerpt::new(EXCERPT_BYTES);
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    excerpt.push(&buf[..n]);
                }
                let _ = tx.send(excerpt.finish());
            });
    }
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                kill_group(pgid);
                // Reap the leader; SIGKILL cannot be ignored, so this returns.
                let _ = child.wait();
                return (
                    false,
                    None,
                    format!(
                        "{program} did not finish within {}; its process group was killed",
                        humantime::format_duration(timeout)
                    ),
                );
            }
            Err(e) => {
                kill_group(pgid);
                let _ = child.wait();
                return (false, None, format!("waiting for {program}: {e}"));
            }
        }
    };
    // A background child of the command may hold stderr open: wait briefly, then go on.
    let excerpt = rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
    let code = status.code();
    let how = match code {
        Some(c) => format!("exit status {c}"),
        None => format!(
            "killed by signal {}",
            status
                .signal()
                .map_or_else(|| "?".into(), |s| s.to_string())
        ),
    };
    let detail = if excerpt.is_empty() {
        how
    } else {
        format!("{how}: {excerpt}")
    };
    (status.success(), code, detail)
}

/// SIGKILL to the command's process group (its pgid is its pid: `process_group(0)`).
fn kill_group(pgid: u32) {
    let Ok(pid) = i32::try_from(pgid) else {
        return;
    };
    // ESRCH (already gone) is fine.
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
}

mod bytes_excerpt {
    use driftwatch_proto::escape;

    /// The first `max` bytes of a stream, display-escaped when finished.
    #[derive(Debug)]
    pub struct Excerpt {
        buf: Vec<u8>,
        max: usize,
        cut: bool,
    }

    impl Excerpt {
        pub fn new(max: usize) -> Self {
            Excerpt {
                buf: Vec::new(),
                max,
                cut: false,
            }
        }
        pub fn push(&mut self, data: &[u8]) {
            let room = self.max.saturating_sub(self.buf.len());
            if data.len() > room {
                self.cut = true;
            }
            self.buf.extend_from_slice(&data[..data.len().min(room)]);
        }
        pub fn full(&self) -> bool {
            self.buf.len() >= self.max
        }
        pub fn finish(self) -> String {
            let mut s = escape::bytes(self.buf.trim_ascii());
            if self.cut {
                s.push('…');
            }
            s
        }
    }
}

/// The delay before retry number `failed_attempts` (1 = after the first failure): `initial`
/// doubled per earlier failure, at most `max`, then scaled by a jitter factor in
/// [0.8, 1.2) from `jitter` (a uniformly random `u32`). Pure.
pub fn backoff(failed_attempts: u32, initial: Duration, max: Duration, jitter: u32) -> Duration {
    let exp = failed_attempts.saturating_sub(1).min(30);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    let factor = 0.8 + 0.4 * (f64::from(jitter) / (f64::from(u32::MAX) + 1.0));
    base.mul_f64(factor)
}

/// A random `u32` for [`backoff`]'s jitter.
pub fn jitter() -> u32 {
    let mut b = [0u8; 4];
    // A failing system RNG only costs the jitter.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let s = Duration::from_secs;
        let mid = u32::MAX / 2 + 1; // factor 1.0
        assert_eq!(backoff(1, s(10), s(600), mid), s(10));
        assert_eq!(backoff(2, s(10), s(600), mid), s(20));
        assert_eq!(backoff(3, s(10), s(600), mid), s(40));
        assert_eq!(backoff(10, s(10), s(600), mid), s(600));
        assert_eq!(backoff(u32::MAX, s(10), s(600), mid), s(600));
        assert_eq!(backoff(1, s(10), s(600), 0), s(8));
        let hi = backoff(1, s(10), s(600), u32::MAX);
        assert!(hi < s(12) && hi > Duration::from_millis(11_999), "{hi:?}");
    }

    #[test]
    fn excerpt_is_bounded_and_escaped() {
        let mut e = Excerpt::new(8);
        e.push(b"\x1b[31m");
        e.push(b"error: disk full");
        assert!(e.full());
        assert_eq!(e.finish(), "\\x1b[31merr…");
        let mut e = Excerpt::new(100);
        e.push(b"  ok\n");
        assert_eq!(e.finish(), "ok");
    }

    fn settings(argv: &[&str], timeout: Duration) -> ActionSettings {
        let raw = crate::actions::config::RawActions {
            kind: Some("command".into()),
            argv: Some(argv.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        let mut s = ActionSettings::from_raw(raw).unwrap();
        s.timeout = timeout;
        s
    }

    fn request(body: &[u8]) -> DeliveryRequest<'_> {
        DeliveryRequest {
            action_id: "rb_test",
            idempotency_key: "web-1:1",
            host_id: "web-1",
            body,
            now_s: 1_700_000_000,
        }
    }

    #[tokio::test]
    async fn command_gets_body_and_env_and_exit_status_decides() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("got");
        let script = format!(
            "cat > {o}; printf '%s %s %s' \"$DRIFTWATCH_ACTION_ID\" \"$DRIFTWATCH_IDEMPOTENCY_KEY\" \
             \"$DRIFTWATCH_HOST_ID\" > {o}.env; echo 'rebuild queued' >&2",
            o = out.display()
        );
        let ex = Executor::load(&settings(
            &["/bin/sh", "-c", &script],
            Duration::from_secs(10),
        ))
        .unwrap();
        let r = ex.deliver(request(b"{\"x\":1}")).await;
        assert!(r.delivered, "{r:?}");
        assert_eq!(r.status, Some(0));
        assert_eq!(r.detail, "exit status 0: rebuild queued");
        assert_eq!(std::fs::read(&out).unwrap(), b"{\"x\":1}");
        assert_eq!(
            std::fs::read_to_string(format!("{}.env", out.display())).unwrap(),
            "rb_test web-1:1 web-1"
        );

        let ex = Executor::load(&settings(
            &["/bin/sh", "-c", "printf 'no capacity\\033[2J' >&2; exit 3"],
            Duration::from_secs(10),
        ))
        .unwrap();
        let r = ex.deliver(request(b"{}")).await;
        assert!(!r.delivered);
        assert_eq!(r.status, Some(3));
        assert_eq!(r.detail, "exit status 3: no capacity\\x1b[2J");

        let ex =
            Executor::load(&settings(&["/nonexistent/rebuild"], Duration::from_secs(5))).unwrap();
        let r = ex.deliver(request(b"{}")).await;
        assert!(!r.delivered);
        assert!(
            r.detail.starts_with("cannot run /nonexistent/rebuild"),
            "{}",
            r.detail
        );
    }

    #[tokio::test]
    async fn command_timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("bg.pid");
        // A background grandchild that would outlive a kill of the leader alone.
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let ex = Executor::load(&settings(
            &["/bin/sh", "-c", &script],
            Duration::from_millis(500),
        ))
        .unwrap();
        let started = Instant::now();
        let r = ex.deliver(request(b"{}")).await;
        assert!(!r.delivered);
        assert!(
            r.detail.contains("process group was killed"),
            "{}",
            r.detail
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild is gone (give the kernel a moment to deliver the signal).
        let mut gone = false;
        for _ in 0..50 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for its (killed) parent's reaper.
            if stat.is_empty() || stat.split(' ').nth(2) == Some("Z") {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gone, "background child {pid} survived the timeout");
    }
}
