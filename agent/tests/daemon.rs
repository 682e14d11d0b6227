//! The agent daemon against an in-process test collector: a tonic server on 127.0.0.1:0 that
//! implements the generated `Enrollment` and `Ingest` services over TLS 1.3 with real rcgen
//! certificates and mutual authentication, and applies reports as the contract says (dedup by
//! seq, digest check, ack after "commit", Resync on mismatch). The agent runs as the real
//! binary: `enroll`, then `run` with a configuration file; drift is made on a temporary root and
//! SIGUSR1 asks for a scan at once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use driftwatch_proto::set::{item_hash, key_matches, set_digest};
use driftwatch_proto::v1::agent_message::Msg as AgentMsg;
use driftwatch_proto::v1::collector_message::Msg as CollectorMsg;
use driftwatch_proto::v1::enrollment_server::{Enrollment, EnrollmentServer};
use driftwatch_proto::v1::ingest_server::{Ingest, IngestServer};
use driftwatch_proto::v1::{
    Ack, AgentMessage, CollectorMessage, EnrollRequest, EnrollResponse, Hello, RenewRequest,
    RenewResponse, Report, Resync, Welcome,
};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status, Streaming};

const TOKEN: &str = "dwt_0123abcd_test-secret";
const HOST: &str = "web-01";

// ------------------------------------------------------------------------------------------
// Test collector

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

fn make_ca() -> Ca {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "driftwatch test CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

fn server_cert(ca: &Ca) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// What the test collector saw and holds.
#[derive(Default)]
struct Seen {
    hellos: Vec<Hello>,
    /// Every report received, duplicates included.
    reports: Vec<Report>,
    /// The host's set as committed.
    set: BTreeMap<Vec<u8>, [u8; 32]>,
    epoch: u64,
    committed: u64,
}

#[derive(Default)]
struct Collector {
    seen: Mutex<Seen>,
    withhold_acks: AtomicBool,
    resync_next: AtomicBool,
    /// Bumped to make every open stream fail.
    kill: AtomicU64,
}

#[derive(Clone)]
struct Svc(Arc<Collector>, Arc<Ca>);

/// The TLS stream with the peer's certificate as connect info.
struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

#[derive(Clone)]
struct PeerCert(Option<Vec<u8>>);

impl Connected for TlsConn {
    type ConnectInfo = PeerCert;
    fn connect_info(&self) -> PeerCert {
        PeerCert(
            self.0
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec()),
        )
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn host_of<T>(req: &Request<T>) -> Result<String, Status> {
    let cert = req
        .extensions()
        .get::<PeerCert>()
        .and_then(|p| p.0.clone())
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let (_, _, host) =
        driftwatch_agent::identity::certificate_facts(&cert).map_err(Status::unauthenticated)?;
    host.ok_or_else(|| Status::unauthenticated("no host id in the certificate"))
}

fn sign(ca: &Ca, csr: &[u8], host: &str) -> Result<Vec<u8>, Status> {
    let mut csr = CertificateSigningRequestParams::from_der(&csr.to_vec().into())
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    csr.params.subject_alt_names = vec![SanType::URI(
        format!("spiffe://driftwatch/host/{host}")
            .try_into()
            .unwrap(),
    )];
    csr.params.distinguished_name = rcgen::DistinguishedName::new();
    csr.params.distinguished_name.push(DnType::CommonName, host);
    csr.params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = csr
        .signed_by(&ca.issuer)
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(cert.der().to_vec())
}

#[tonic::async_trait]
impl Enrollment for Svc {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let r = req.into_inner();
        if r.token != TOKEN {
            return Err(Status::unauthenticated("unknown or used token"));
        }
        Ok(Response::new(EnrollResponse {
            certificate_der: sign(&self.1, &r.csr_der, &r.host_id)?,
            host_id: r.host_id,
            ca_certificate_der: self.1.der.to_vec(),
            not_after_unix: 4_000_000_000,
        }))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        let host = host_of(&req)?;
        Ok(Response::new(RenewResponse {
            certificate_der: sign(&self.1, &req.into_inner().csr_der, &host)?,
            not_after_unix: 4_000_000_000,
        }))
    }
}

type Out = Result<CollectorMessage, Status>;

#[tonic::async_trait]
impl Ingest for Svc {
    type ReportStream = ReceiverStream<Out>;

    async fn report(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        let host = host_of(&req)?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel::<Out>(16);
        let c = self.0.clone();
        tokio::spawn(async move {
            let kill_at_start = c.kill.load(Ordering::SeqCst);
            let send = |m: CollectorMsg| {
                let tx = tx.clone();
                async move { tx.send(Ok(CollectorMessage { msg: Some(m) })).await }
            };
            let Ok(Some(AgentMessage {
                msg: Some(AgentMsg::Hello(hello)),
            })) = inbound.message().await
            else {
                let _ = tx.send(Err(Status::invalid_argument("Hello first"))).await;
                return;
            };
            if hello.host_id != host {
                let _ = tx
                    .send(Err(Status::permission_denied("not your host id")))
                    .await;
                return;
            }
            let welcome = {
                let mut s = c.seen.lock().unwrap();
                if s.epoch != hello.epoch {
                    s.epoch = hello.epoch;
                    s.committed = 0;
                }
                s.hellos.push(hello.clone());
                Welcome {
                    host_id: host.clone(),
                    epoch: s.epoch,
                    last_committed_seq: s.committed,
                    set_digest: set_digest(&s.set).to_vec(),
                    heartbeat_interval_seconds: 30,
                }
            };
            let _ = send(CollectorMsg::Welcome(welcome)).await;
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                let msg = tokio::select! {
                    m = inbound.message() => m,
                    _ = tick.tick() => {
                        if c.kill.load(Ordering::SeqCst) != kill_at_start {
                            let _ = tx.send(Err(Status::unavailable("test: stream killed"))).await;
                            return;
                        }
                        continue;
                    }
                };
                let Ok(Some(m)) = msg else { return };
                let Some(AgentMsg::Report(r)) = m.msg else {
                    continue;
                };
                assert_eq!(r.epoch, hello.epoch, "report of another epoch");
                assert!(r.upserts.iter().all(key_matches));
                let (ack, resync) = {
                    let mut s = c.seen.lock().unwrap();
                    s.reports.push(r.clone());
                    if c.withhold_acks.load(Ordering::SeqCst) {
                        continue;
                    }
                    let mut resync = false;
                    if r.seq > s.committed {
                        if r.full {
                            s.set.clear();
                        }
                        for i in &r.upserts {
                            s.set.insert(i.key.clone(), item_hash(i));
                        }
                        for k in &r.removed_keys {
                            s.set.remove(k);
                        }
                        s.committed = r.seq;
                        resync = set_digest(&s.set).to_vec() != r.set_digest;
                    }
                    resync |= c.resync_next.swap(false, Ordering::SeqCst);
                    (s.committed, resync)
                };
                let _ = send(CollectorMsg::Ack(Ack { seq: ack })).await;
                if resync {
                    let _ = send(CollectorMsg::Resync(Resync {
                        reason: "test: digest mismatch".into(),
                    }))
                    .await;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

async fn start_collector(ca: Arc<Ca>) -> (SocketAddr, Arc<Collector>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der.clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let (cert, key) = server_cert(&ca);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert, ca.der.clone()], key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (conn_tx, conn_rx) = mpsc::channel::<Result<TlsConn, std::io::Error>>(16);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let conn_tx = conn_tx.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = conn_tx.send(Ok(TlsConn(tls))).await;
                }
            });
        }
    });
    let collector = Arc::new(Collector::default());
    let svc = Svc(collector.clone(), ca);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EnrollmentServer::new(svc.clone()))
            .add_service(IngestServer::new(svc))
            .serve_with_incoming(ReceiverStream::new(conn_rx)),
    );
    (addr, collector)
}

// ------------------------------------------------------------------------------------------
// The agent

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_driftwatch-agent"))
}

fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A root with a few files, its signed baseline and the trusted key.
fn image(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    std::fs::write(root.join("etc/app.conf"), b"setting = 1\n").unwrap();
    let keys = dir.join("pipeline");
    ok(agent().arg("keygen").arg("--out").arg(&keys));
    let baseline = dir.join("baseline.dwb");
    ok(agent()
        .args([
            "baseline",
            "create",
            "--image-id",
            "web",
            "--image-version",
            "1",
        ])
        .arg("--root")
        .arg(&root)
        .arg("--sign-key")
        .arg(keys.with_extension("key"))
        .arg("--out")
        .arg(&baseline));
    (root, baseline, keys.with_extension("pub"))
}

fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

struct Daemon(Child);

impl Daemon {
    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), sig).unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_daemon(config: &Path) -> Daemon {
    Daemon(
        agent()
            .arg("run")
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("DRIFTWATCH_TEST_LOG")
                    .unwrap_or_else(|_| "info,driftwatch_agent=debug".into()),
            )
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

fn write_config(
    dir: &Path,
    url: &str,
    trusted: &Path,
    baseline: &Path,
    root: &Path,
    state: &Path,
) -> PathBuf {
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "collector = \"{url}\"\ntrusted_keys = [{trusted:?}]\nbaseline = {baseline:?}\n\
             root = {root:?}\nstate_dir = {state:?}\nscan_interval = \"1h\"\n"
        ),
    )
    .unwrap();
    config
}

async fn stop(mut daemon: Daemon) {
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pending_records(state: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(state.join("status.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["spool"]["pending_records"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_stream_ack_resend_resync() {
    let t = tempfile::tempdir().unwrap();
    let (root, baseline, trusted) = image(t.path());
    let ca = Arc::new(make_ca());
    let ca_der = ca.der.to_vec();
    let (addr, collector) = start_collector(ca).await;
    let url = format!("https://127.0.0.1:{}", addr.port());
    let state = t.path().join("state");

    // A refused token is a clear error, exit 2.
    let out = agent()
        .args([
            "enroll",
            "--collector",
            &url,
            "--token",
            "dwt_nope_nope",
            "--host-id",
            HOST,
        ])
        .args(["--ca-fingerprint", &fingerprint(&ca_der)])
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("token refused: unknown or used token"),
        "{err}"
    );

    // A wrong fingerprint: the handshake fails, nothing is stored.
    let out = agent()
        .args([
            "enroll",
            "--collector",
            &url,
            "--token",
            TOKEN,
            "--host-id",
            HOST,
        ])
        .args(["--ca-fingerprint", &"00".repeat(32)])
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!state.join("identity/cert.pem").exists());

    // Enrollment by fingerprint pins the CA.
    ok(agent()
        .args([
            "enroll",
            "--collector",
            &url,
            "--token",
            TOKEN,
            "--host-id",
            HOST,
        ])
        .args([
            "--ca-fingerprint",
            &fingerprint(&ca_der),
            "--label",
            "role=web",
        ])
        .arg("--state-dir")
        .arg(&state));
    let id = state.join("identity");
    let key_mode = std::fs::metadata(id.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read_to_string(id.join("host-id")).unwrap().trim(),
        HOST
    );
    let pinned = driftwatch_agent::identity::parse_certs(
        &id.join("ca.pem"),
        &std::fs::read(id.join("ca.pem")).unwrap(),
    )
    .unwrap();
    assert_eq!(pinned, std::slice::from_ref(&ca_der));

    // Drift before the daemon starts: the first (full) report carries it.
    std::fs::write(root.join("etc/app.conf"), b"setting = 2\n").unwrap();
    let config = write_config(t.path(), &url, &trusted, &baseline, &root, &state);
    let daemon = start_daemon(&config);
    let seen = |f: &dyn Fn(&Seen) -> bool| f(&collector.seen.lock().unwrap());
    wait_for("hello and the full report", Duration::from_secs(60), || {
        seen(&|s| !s.reports.is_empty())
    })
    .await;
    {
        let s = collector.seen.lock().unwrap();
        let h = &s.hellos[0];
        assert_eq!(h.host_id, HOST);
        assert_eq!(h.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            (h.image_id.as_str(), h.image_version.as_str()),
            ("web", "1")
        );
        assert_eq!(h.baseline_root.len(), 32);
        assert_ne!(h.epoch, 0);
        let r = &s.reports[0];
        assert!(r.full, "the first report after a start is full");
        assert_eq!(r.seq, 1);
        assert_eq!(r.upserts.len(), 1);
        assert!(r.upserts[0].key.ends_with(b"/etc/app.conf"));
        assert_eq!(r.status, 1, "complete");
    }
    wait_for(
        "the ack to empty the spool",
        Duration::from_secs(30),
        || pending_records(&state) == Some(0),
    )
    .await;

    // A drift and SIGUSR1: a delta with the new item only.
    std::fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\necho evil\n").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_for("the delta", Duration::from_secs(30), || {
        seen(&|s| s.reports.len() >= 2)
    })
    .await;
    {
        let s = collector.seen.lock().unwrap();
        let r = &s.reports[1];
        assert!(!r.full);
        assert_eq!(r.seq, 2);
        assert_eq!(r.upserts.len(), 1);
        assert!(r.upserts[0].key.ends_with(b"/usr/bin/tool"));
        assert_eq!(r.set_digest, set_digest(&s.set).to_vec(), "digests agree");
        assert_eq!(s.set.len(), 2);
    }

    // Acks withheld: the record stays spooled, and is sent again after a reconnect.
    collector.withhold_acks.store(true, Ordering::SeqCst);
    std::fs::remove_file(root.join("usr/bin/tool")).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_for("report 3", Duration::from_secs(30), || {
        seen(&|s| s.reports.len() >= 3)
    })
    .await;
    wait_for(
        "status.json to show it pending",
        Duration::from_secs(30),
        || pending_records(&state) == Some(1),
    )
    .await;
    collector.withhold_acks.store(false, Ordering::SeqCst);
    collector.kill.fetch_add(1, Ordering::SeqCst);
    wait_for(
        "the resend after reconnecting",
        Duration::from_secs(60),
        || seen(&|s| s.reports.iter().filter(|r| r.seq == 3).count() >= 2),
    )
    .await;
    wait_for("the resent record's ack", Duration::from_secs(30), || {
        pending_records(&state) == Some(0)
    })
    .await;
    {
        let s = collector.seen.lock().unwrap();
        assert!(s.hellos.len() >= 2, "reconnected with a new Hello");
        assert_eq!(s.committed, 3);
        assert_eq!(
            s.set.len(),
            2,
            "removed file replaces modified: still two items"
        );
    }

    // A Resync: the next report is the full set.
    collector.resync_next.store(true, Ordering::SeqCst);
    std::fs::write(root.join("usr/bin/added"), b"new\n").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_for(
        "the full report after Resync",
        Duration::from_secs(30),
        || seen(&|s| s.reports.iter().any(|r| r.seq > 3 && r.full)),
    )
    .await;
    {
        let s = collector.seen.lock().unwrap();
        let full = s.reports.iter().find(|r| r.seq > 3 && r.full).unwrap();
        assert_eq!(full.upserts.len(), 3);
    }

    // SIGTERM: a clean stop.
    stop(daemon).await;
    let st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("status.json")).unwrap()).unwrap();
    assert_eq!(st["host_id"], HOST);
    assert_eq!(st["last_scan"]["result"], "complete");
    assert_eq!(st["last_scan"]["violations"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_replaces_key_and_certificate_over_mtls() {
    let t = tempfile::tempdir().unwrap();
    let ca = Arc::new(make_ca());
    let ca_pem = t.path().join("ca.pem");
    std::fs::write(
        &ca_pem,
        driftwatch_agent::identity::pem("CERTIFICATE", &ca.der),
    )
    .unwrap();
    let (addr, _collector) = start_collector(ca).await;
    let url = format!("https://localhost:{}", addr.port());
    let state = t.path().join("state");
    let enroll = |extra: &[&str]| {
        agent()
            .args([
                "enroll",
                "--collector",
                &url,
                "--token",
                TOKEN,
                "--host-id",
                HOST,
            ])
            .arg("--ca-file")
            .arg(&ca_pem)
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(enroll(&[]).status.success());
    let again = enroll(&[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already enrolled"));

    let mut id = driftwatch_agent::identity::Identity::load(&state).unwrap();
    let (old_key, old_cert) = (id.key_pem.clone(), id.cert_der.clone());
    let collector = driftwatch_agent::transport::CollectorUrl::parse(&url).unwrap();
    driftwatch_agent::enroll::renew(&collector, &state, &mut id)
        .await
        .unwrap();
    let reloaded = driftwatch_agent::identity::Identity::load(&state).unwrap();
    assert_ne!(reloaded.key_pem, old_key);
    assert_ne!(reloaded.cert_der, old_cert);
    assert_eq!(reloaded.cert_der, id.cert_der);
    assert_eq!(reloaded.host_id, HOST);
    assert!(!state.join("identity/renew").exists());
    let mode = std::fs::metadata(state.join("identity/key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_reports_survive_a_restart_and_the_first_report_after_it_is_full() {
    let t = tempfile::tempdir().unwrap();
    let (root, baseline, trusted) = image(t.path());
    let ca = Arc::new(make_ca());
    let ca_der = ca.der.to_vec();
    let (addr, collector) = start_collector(ca).await;
    let url = format!("https://127.0.0.1:{}", addr.port());
    let state = t.path().join("state");
    ok(agent()
        .args([
            "enroll",
            "--collector",
            &url,
            "--token",
            TOKEN,
            "--host-id",
            HOST,
        ])
        .args(["--ca-fingerprint", &fingerprint(&ca_der)])
        .arg("--state-dir")
        .arg(&state));
    let config = write_config(t.path(), &url, &trusted, &baseline, &root, &state);
    let seen = |f: &dyn Fn(&Seen) -> bool| f(&collector.seen.lock().unwrap());

    // The collector receives but never commits: the reports stay in the spool across a stop.
    collector.withhold_acks.store(true, Ordering::SeqCst);
    let daemon = start_daemon(&config);
    wait_for("the first report", Duration::from_secs(60), || {
        seen(&|s| !s.reports.is_empty())
    })
    .await;
    std::fs::write(root.join("usr/bin/tool"), b"changed\n").unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_for("the second report", Duration::from_secs(30), || {
        seen(&|s| s.reports.len() >= 2)
    })
    .await;
    stop(daemon).await;
    assert_eq!(pending_records(&state), Some(2));

    collector.withhold_acks.store(false, Ordering::SeqCst);
    let daemon = start_daemon(&config);
    wait_for(
        "the resent reports and a new full one",
        Duration::from_secs(60),
        || seen(&|s| s.reports.iter().any(|r| r.seq == 3)),
    )
    .await;
    wait_for("every ack", Duration::from_secs(30), || {
        pending_records(&state) == Some(0)
    })
    .await;
    {
        let s = collector.seen.lock().unwrap();
        let seqs: Vec<(u64, bool)> = s.reports.iter().map(|r| (r.seq, r.full)).collect();
        assert_eq!(
            seqs,
            [(1, true), (2, false), (1, true), (2, false), (3, true)],
            "the same records again, in order, then the full report of the new start"
        );
        assert_eq!(s.committed, 3);
        assert_eq!(s.set.len(), 1);
        assert!(
            s.hellos.iter().all(|h| h.epoch == s.hellos[0].epoch),
            "one epoch"
        );
    }
    stop(daemon).await;
}

#[test]
fn config_errors_exit_64_and_name_the_key() {
    let t = tempfile::tempdir().unwrap();
    let config = t.path().join("agent.toml");
    std::fs::write(
        &config,
        "collector = \"https://c:7443\"\ntrusted_keys = [\"/k.pub\"]\nscan_intervall = \"2s\"\n",
    )
    .unwrap();
    let out = agent()
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("scan_intervall"), "{err}");

    let out = agent()
        .arg("run")
        .arg("--config")
        .arg(t.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}
