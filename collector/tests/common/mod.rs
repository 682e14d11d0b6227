//! An in-process collector on `127.0.0.1:0` over a real SQLite store in a temporary directory,
//! and tonic clients speaking TLS 1.3 with real rcgen certificates.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use driftwatch_collector::ca::{CertificateAuthority, unix_ms};
use driftwatch_collector::config::Settings;
use driftwatch_collector::server::{ServeError, Server};
use driftwatch_collector::storage::{SqliteStore, Storage};
use driftwatch_collector::tls::TlsStats;
use driftwatch_collector::token::{Token, TokenKind};
use driftwatch_proto::v1::enrollment_client::EnrollmentClient;
use driftwatch_proto::v1::ingest_client::IngestClient;
use driftwatch_proto::v1::{
    AgentMessage, CollectorMessage, EnrollRequest, Hello, Report, ScanStatus, agent_message,
    collector_message,
};
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Status, Streaming};

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestCollector {
    pub dir: tempfile::TempDir,
    pub addr: std::net::SocketAddr,
    pub ca: Arc<CertificateAuthority>,
    pub store: Arc<dyn Storage>,
    pub stats: Arc<TlsStats>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

/// A client identity: key and certificate (DER), or none.
#[derive(Clone)]
pub struct ClientCert {
    pub key: Arc<KeyPair>,
    pub cert: CertificateDer<'static>,
}

impl TestCollector {
    pub async fn start() -> TestCollector {
        TestCollector::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Settings)) -> TestCollector {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = Settings::for_local(dir.path());
        settings.tuning.revocation_refresh = Duration::from_millis(100);
        settings.tuning.heartbeat_flush = Duration::from_millis(100);
        settings.tuning.shutdown_grace = Duration::from_secs(3);
        tweak(&mut settings);
        let db = dir.path().join("collector.db");
        let store: Arc<dyn Storage> = Arc::new(SqliteStore::open(&db).unwrap());
        let server = Server::bind(settings, store.clone()).await.unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let addr = server.local_addr();
        let ca = server.ca().clone();
        let stats = server.tls_stats();
        let task = tokio::spawn(server.run(async {
            let _ = stop_rx.await;
        }));
        TestCollector {
            dir,
            addr,
            ca,
            store,
            stats,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Stops the server and waits for it (bounded).
    pub async fn stop(&mut self) -> Result<(), ServeError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let task = self.task.take().expect("stopped twice");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("shutdown took too long")
            .unwrap()
    }

    /// A token valid for `ttl` with `uses` uses.
    pub async fn token(&self, ttl: Duration, uses: u32, pattern: Option<&str>) -> String {
        let token = Token::generate(TokenKind::Enrollment).unwrap();
        let now = unix_ms(SystemTime::now());
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap();
        self.store
            .create_enrollment_token(
                token.record(now, now + ttl_ms, uses, pattern.map(String::from)),
                driftwatch_collector::storage::AuditEntry::new(
                    now,
                    "local:test",
                    "token.created",
                    token.id(),
                    serde_json::json!({}),
                ),
            )
            .await
            .unwrap();
        token.reveal().to_string()
    }

    /// A gRPC channel over TLS, presenting `client` if given.
    pub async fn channel(
        &self,
        client: Option<&ClientCert>,
    ) -> Result<Channel, tonic::transport::Error> {
        let config = client_tls(&self.ca.cert_der().clone(), client);
        connect(self.addr, config).await
    }

    pub async fn enroll_client(
        &self,
    ) -> Result<EnrollmentClient<Channel>, tonic::transport::Error> {
        Ok(EnrollmentClient::new(self.channel(None).await?))
    }

    /// Enrolls `host_id` with a fresh token and returns its identity.
    pub async fn enroll(&self, host_id: &str) -> ClientCert {
        let token = self.token(Duration::from_secs(3600), 1, None).await;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let resp = self
            .enroll_client()
            .await
            .unwrap()
            .enroll(EnrollRequest {
                token,
                host_id: host_id.into(),
                csr_der: csr(&key),
                labels: vec![],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.host_id, host_id);
        assert_eq!(resp.ca_certificate_der, self.ca.cert_der().to_vec());
        ClientCert {
            key: Arc::new(key),
            cert: CertificateDer::from(resp.certificate_der),
        }
    }

    /// Opens a report stream as `client`.
    pub async fn stream(&self, client: &ClientCert) -> Result<AgentStream, Status> {
        let channel = self
            .channel(Some(client))
            .await
            .map_err(|e| Status::unavailable(format!("{e:?}")))?;
        AgentStream::open(channel).await
    }

    /// Waits (bounded) until `pred` holds for the recorded security events.
    pub async fn wait_for_security_event(
        &self,
        kind: &str,
    ) -> Vec<driftwatch_collector::storage::SecurityEvent> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let events = self.store.security_events(0, 1000).await.unwrap();
            if events.iter().any(|e| e.kind == kind) {
                return events;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {kind} event: {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for TestCollector {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// A DER CSR for `key` (asking for things the collector must ignore).
pub fn csr(key: &KeyPair) -> Vec<u8> {
    let mut params = CertificateParams::new(vec!["ignored.example.com".into()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.serialize_request(key).unwrap().der().to_vec()
}

pub fn client_tls(
    ca: &CertificateDer<'static>,
    client: Option<&ClientCert>,
) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => builder
            .with_client_auth_cert(
                vec![c.cert.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.serialize_der())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// Connects a tonic channel through our own TLS connector (tonic is built without TLS).
pub async fn connect(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
) -> Result<Channel, tonic::transport::Error> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    Endpoint::from_shared(format!("http://localhost:{}", addr.port()))?
        .connect_timeout(WAIT)
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
}

/// The agent's side of one report stream.
pub struct AgentStream {
    pub tx: mpsc::Sender<AgentMessage>,
    pub rx: Streaming<CollectorMessage>,
}

impl AgentStream {
    pub async fn open(channel: Channel) -> Result<AgentStream, Status> {
        let (tx, rx) = mpsc::channel(16);
        let response = IngestClient::new(channel)
            .max_encoding_message_size(64 << 20)
            .report(ReceiverStream::new(rx))
            .await?;
        Ok(AgentStream {
            tx,
            rx: response.into_inner(),
        })
    }

    pub async fn send(&self, msg: agent_message::Msg) {
        let _ = self.tx.send(AgentMessage { msg: Some(msg) }).await;
    }

    /// The next message, or the status that ended the stream (bounded wait).
    pub async fn next(&mut self) -> Result<collector_message::Msg, Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Err(_) => panic!("no message from the collector within {WAIT:?}"),
            Ok(Err(status)) => Err(status),
            Ok(Ok(None)) => Err(Status::ok("stream ended")),
            Ok(Ok(Some(m))) => Ok(m.msg.expect("empty CollectorMessage")),
        }
    }

    pub async fn hello(
        &mut self,
        host_id: &str,
        epoch: u64,
    ) -> Result<driftwatch_proto::v1::Welcome, Status> {
        self.send(agent_message::Msg::Hello(Hello {
            agent_version: "test".into(),
            host_id: host_id.into(),
            image_id: "img".into(),
            image_version: "1".into(),
            baseline_root: vec![7; 32],
            boot_id: "boot".into(),
            epoch,
        }))
        .await;
        match self.next().await? {
            collector_message::Msg::Welcome(w) => Ok(w),
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    /// Sends a report and returns the messages up to and including its ack.
    pub async fn report(&mut self, report: Report) -> Result<Vec<collector_message::Msg>, Status> {
        let seq = report.seq;
        self.send(agent_message::Msg::Report(report)).await;
        let mut got = Vec::new();
        loop {
            let m = self.next().await?;
            let done = matches!(&m, collector_message::Msg::Ack(a) if a.seq == seq);
            got.push(m);
            if done {
                return Ok(got);
            }
        }
    }
}

/// A complete report making the set exactly `items`, with a correct digest.
pub fn full_report(epoch: u64, seq: u64, items: Vec<driftwatch_proto::v1::DriftItem>) -> Report {
    let map = items
        .iter()
        .map(|i| (i.key.clone(), driftwatch_proto::set::item_hash(i)))
        .collect();
    Report {
        epoch,
        seq,
        full: true,
        set_digest: driftwatch_proto::set::set_digest(&map).to_vec(),
        status: ScanStatus::Complete as i32,
        upserts: items,
        ..Default::default()
    }
}

pub fn file_item(path: &str) -> driftwatch_proto::v1::DriftItem {
    use driftwatch_proto::v1::{Violation, drift_item::Item};
    driftwatch_proto::v1::DriftItem {
        key: driftwatch_proto::set::file_key(path.as_bytes()),
        item: Some(Item::File(Violation {
            path: path.as_bytes().to_vec(),
            kind: 3,
            severity: 4,
            ..Default::default()
        })),
    }
}

/// Proof that the collector still serves a good client: a fresh stream, hello, one report,
/// its ack.
pub async fn good_client_still_served(
    c: &TestCollector,
    client: &ClientCert,
    host: &str,
    seq: u64,
) {
    let mut s = c.stream(client).await.unwrap();
    let w = s.hello(host, 1).await.unwrap();
    assert_eq!(w.last_committed_seq, seq - 1);
    let msgs = s
        .report(full_report(
            1,
            seq,
            vec![file_item(&format!("/etc/good-{seq}"))],
        ))
        .await
        .unwrap();
    assert!(matches!(msgs.last(), Some(collector_message::Msg::Ack(a)) if a.seq == seq));
}
