//! The TLS side of the gRPC port: the rustls server configuration (ring provider, TLS 1.3 only,
//! ALPN `h2`, client certificates optional but verified against the collector CA when
//! presented) and the accept loop that turns TCP connections into [`TlsConnection`]s for tonic.
//!
//! What it owns: the connection limit (a semaphore: one permit per open connection, so at most
//! `max_connections` sockets and handshakes exist at once), the handshake timeout, and the
//! per-connection [`PeerInfo`] read from the *verified* certificate. Handlers read `PeerInfo`
//! from the request extensions; it is the only source of a peer's host id. What it must never
//! do: let one bad peer stop the loop — a failed handshake is logged at debug, counted, and
//! the loop goes on.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::ca::{self, CertificateAuthority, ClientIdentity, PeerCertError, ServerIdentity};

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// What the server knows about the peer of one connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote_addr: SocketAddr,
    /// `None`: no client certificate (only `Enroll` is allowed). `Some(Err)`: a certificate
    /// that verified against the CA but names no host.
    pub client: Option<Result<ClientIdentity, PeerCertError>>,
}

/// Counters of the accept loop (for logs, metrics and tests).
#[derive(Debug, Default)]
pub struct TlsStats {
    pub accepted: AtomicU64,
    pub handshake_failures: AtomicU64,
    pub handshake_timeouts: AtomicU64,
}

impl TlsStats {
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
            + self.handshake_timeouts.load(Ordering::Relaxed)
    }
}

/// The rustls server configuration of the gRPC port.
pub fn server_config(
    ca: &CertificateAuthority,
    identity: ServerIdentity,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        // Enrollment happens before the agent has a certificate; every other call checks
        // for one (PeerInfo::client).
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The rustls server configuration of the HTTP API: ring, TLS 1.3 only (like the gRPC port;
/// every maintained HTTP client speaks it, and a reverse proxy can serve older ones), ALPN
/// `http/1.1`, no client certificates (callers authenticate with bearer tokens).
pub fn http_server_config(identity: ServerIdentity) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Binds the listening socket. Accepted sockets inherit `SO_KEEPALIVE` from it, so a peer
/// that vanished without a FIN is eventually noticed even between HTTP/2 pings.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_keepalive(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// One accepted, handshaken connection. Holds its connection permit until dropped.
#[derive(Debug)]
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    info: PeerInfo,
    _permit: OwnedSemaphorePermit,
}

impl TlsConnection {
    /// The peer's address.
    pub fn remote_addr(&self) -> SocketAddr {
        self.info.remote_addr
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Settings of the accept loop.
#[derive(Debug, Clone)]
pub struct AcceptOptions {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
}

/// Accepts connections until `shutdown` turns true, handshakes each on its own task and hands
/// the good ones to `out` (tonic's incoming stream). Returns when shutdown is signalled or
/// `out` is closed.
pub async fn accept_loop(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    options: AcceptOptions,
    out: mpsc::Sender<TlsConnection>,
    stats: Arc<TlsStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(config);
    // One permit per connection, from accept until the connection is dropped: bounds sockets,
    // handshakes in progress and HTTP/2 connection state together.
    let permits = Arc::new(Semaphore::new(options.max_connections));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = crate::server::stop_requested(&mut shutdown) => return,
        };
        let (tcp, remote_addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = crate::server::stop_requested(&mut shutdown) => return,
        };
        if out.is_closed() {
            return;
        }
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let out = out.clone();
        let stats = stats.clone();
        let timeout = options.handshake_timeout;
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let info = PeerInfo {
                        remote_addr,
                        client: peer_identity(&stream),
                    };
                    let conn = TlsConnection {
                        stream,
                        info,
                        _permit: permit,
                    };
                    // Closed only when the server is shutting down: the connection is dropped.
                    let _ = out.send(conn).await;
                }
                Ok(Err(e)) => {
                    stats.handshake_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %remote_addr, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(peer = %remote_addr, "TLS handshake timed out");
                }
            }
        });
    }
}

fn peer_identity(stream: &TlsStream<TcpStream>) -> Option<Result<ClientIdentity, PeerCertError>> {
    let (_, conn) = stream.get_ref();
    // rustls only exposes certificates that its verifier accepted (chain to the CA, validity,
    // clientAuth EKU); the end-entity certificate comes first.
    let leaf = conn.peer_certificates()?.first()?;
    Some(ca::client_identity(leaf))
}
