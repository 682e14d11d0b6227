//! The agent's connection to the collector: gRPC (tonic) over TLS 1.3 (rustls with the ring
//! provider, ALPN `h2`) over TCP.
//!
//! The server's certificate is verified against the collector CA (`identity/ca.pem`), or, while
//! enrolling with `--ca-fingerprint`, against whichever CA certificate in the server's chain has
//! that SHA-256 ([`FingerprintVerifier`]). The client presents its certificate when it has one;
//! only `Enrollment.Enroll` works without.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::transport::{Channel, Endpoint, Uri};

/// Port of a collector URL without one (the contract's default gRPC port).
pub const DEFAULT_PORT: u16 = 7443;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid collector URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("no usable CA certificate: {0}")]
    Roots(String),
    #[error("cannot connect to the collector at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A collector address: `https://HOST[:PORT]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectorUrl {
    /// As written in the configuration, for messages.
    pub text: String,
    uri: Uri,
    host: String,
    port: u16,
}

impl CollectorUrl {
    pub fn parse(text: &str) -> Result<CollectorUrl, TransportError> {
        let err = |reason: &str| TransportError::Url {
            url: text.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = text.parse().map_err(|_| err("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(err(
                "the scheme must be https (the collector only speaks TLS)",
            ));
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(err("a collector URL has no path"));
        }
        let host = uri.host().ok_or_else(|| err("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(DEFAULT_PORT);
        ServerName::try_from(host.clone())
            .map_err(|_| err("the host is not a DNS name or IP address"))?;
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let uri = Uri::builder()
            .scheme("https")
            .authority(authority)
            .path_and_query("/")
            .build()
            .map_err(|_| err("not a URL"))?;
        Ok(CollectorUrl {
            text: text.to_string(),
            uri,
            host,
            port,
        })
    }

    /// The name the server certificate must carry: the URL's host.
    pub fn server_name(&self) -> ServerName<'static> {
        match self.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            // Checked in `parse`.
            Err(_) => ServerName::try_from(self.host.clone())
                .unwrap_or_else(|_| ServerName::IpAddress(IpAddr::from([0, 0, 0, 0]).into())),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl std::fmt::Display for CollectorUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// The one crypto provider: ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How the client decides that it talks to the real collector.
#[derive(Debug)]
pub enum ServerTrust {
    /// Certificates (the collector CA) the server's chain must lead to.
    Roots(Vec<CertificateDer<'static>>),
    /// Trust-on-enrollment by fingerprint: see [`FingerprintVerifier`].
    Fingerprint(Arc<FingerprintVerifier>),
}

/// The client certificate chain and its key.
#[derive(Debug)]
pub struct ClientAuth {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// rustls client configuration: TLS 1.3 only, ring, ALPN h2.
pub fn client_config(
    trust: ServerTrust,
    auth: Option<ClientAuth>,
) -> Result<ClientConfig, TransportError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        ServerTrust::Roots(certs) => {
            let mut roots = RootCertStore::empty();
            for c in certs {
                roots
                    .add(c)
                    .map_err(|e| TransportError::Roots(e.to_string()))?;
            }
            if roots.is_empty() {
                return Err(TransportError::Roots(
                    "the CA file holds no certificate".into(),
                ));
            }
            builder.with_root_certificates(roots)
        }
        ServerTrust::Fingerprint(v) => builder.dangerous().with_custom_certificate_verifier(v),
    };
    let mut config = match auth {
        Some(a) => builder.with_client_auth_cert(a.chain, a.key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Opens a gRPC channel to the collector: TCP, then the TLS handshake with `config`, then
/// HTTP/2. Keepalive pings detect a dead peer within about a minute.
pub async fn connect(url: &CollectorUrl, config: ClientConfig) -> Result<Channel, TransportError> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = url.server_name();
    let addr = (url.host.clone(), url.port);
    let service = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let name = name.clone();
        let addr = addr.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from(url.uri.clone())
        .connect_timeout(Duration::from_secs(15))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_with_connector(service)
        .await
        .map_err(|source| TransportError::Connect {
            url: url.text.clone(),
            source,
        })
}

/// SHA-256 of a certificate's DER.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Parses a SHA-256 fingerprint: 64 hex digits, `:` separators and a `sha256:` prefix allowed.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let t = s.trim();
    let t = t
        .strip_prefix("sha256:")
        .or_else(|| t.strip_prefix("SHA256:"))
        .unwrap_or(t);
    let hex: String = t.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a SHA-256 fingerprint (64 hex digits, ':' separators allowed)"
        ));
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
    }
    Ok(out)
}

/// Accepts a server only if its chain contains a certificate with the expected SHA-256 and the
/// server certificate verifies (signature, validity, name) with that certificate as the only
/// trust anchor. The matching certificate is kept, so the caller can pin it.
#[derive(Debug)]
pub struct FingerprintVerifier {
    expected: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
    pinned: Mutex<Option<CertificateDer<'static>>>,
}

impl FingerprintVerifier {
    pub fn new(expected: [u8; 32]) -> FingerprintVerifier {
        FingerprintVerifier {
            expected,
            algorithms: provider().signature_verification_algorithms,
            pinned: Mutex::new(None),
        }
    }

    /// The CA certificate that matched, after a successful handshake.
    pub fn pinned(&self) -> Option<CertificateDer<'static>> {
        self.pinned.lock().ok().and_then(|p| p.clone())
    }
}

#[derive(Debug)]
struct NoFingerprintMatch(String);

impl std::fmt::Display for NoFingerprintMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NoFingerprintMatch {}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| fingerprint(c.as_ref()) == self.expected)
        else {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(NoFingerprintMatch(
                    format!(
                        "no CA certificate in the collector's chain has the SHA-256 fingerprint {}",
                        crate::report::hex(&self.expected)
                    ),
                )))),
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let ok = inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        if let Ok(mut p) = self.pinned.lock() {
            *p = Some(ca.clone().into_owned());
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = CollectorUrl::parse("https://collector.example:9443").unwrap();
        assert_eq!((u.host(), u.port()), ("collector.example", 9443));
        assert!(matches!(u.server_name(), ServerName::DnsName(_)));
        let u = CollectorUrl::parse("https://127.0.0.1").unwrap();
        assert_eq!(u.port(), DEFAULT_PORT);
        assert!(matches!(u.server_name(), ServerName::IpAddress(_)));
        let u = CollectorUrl::parse("https://[::1]:7443/").unwrap();
        assert_eq!(u.host(), "::1");
        assert!(matches!(u.server_name(), ServerName::IpAddress(_)));
        for bad in ["http://x:1", "collector:7443", "https://x/api", "https://"] {
            assert!(CollectorUrl::parse(bad).is_err(), "{bad}");
        }
    }

    fn ca(
        name: &str,
    ) -> (
        rcgen::Issuer<'static, rcgen::KeyPair>,
        CertificateDer<'static>,
    ) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        (rcgen::Issuer::new(params, key), cert.der().clone())
    }

    fn leaf(issuer: &rcgen::Issuer<'static, rcgen::KeyPair>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params.signed_by(&key, issuer).unwrap().der().clone()
    }

    #[test]
    fn fingerprint_verifier_needs_the_ca_in_the_chain_and_a_server_cert_it_signed() {
        let (a, a_der) = ca("A");
        let (b, b_der) = ca("B");
        let name = ServerName::try_from("localhost").unwrap();
        let now = UnixTime::now();
        let v = FingerprintVerifier::new(fingerprint(&a_der));

        // Signed by B, but A (the fingerprinted CA) rides along in the chain: refused.
        let forged = leaf(&b);
        assert!(
            v.verify_server_cert(&forged, std::slice::from_ref(&a_der), &name, &[], now)
                .is_err()
        );
        // The CA is not in the chain at all: refused.
        let good = leaf(&a);
        assert!(
            v.verify_server_cert(&good, std::slice::from_ref(&b_der), &name, &[], now)
                .is_err()
        );
        assert!(v.pinned().is_none());
        // Wrong name: refused.
        let other = ServerName::try_from("collector.example").unwrap();
        assert!(
            v.verify_server_cert(&good, std::slice::from_ref(&a_der), &other, &[], now)
                .is_err()
        );
        // Signed by A, A in the chain: accepted and pinned.
        v.verify_server_cert(&good, &[b_der, a_der.clone()], &name, &[], now)
            .unwrap();
        assert_eq!(v.pinned().unwrap(), a_der);
    }

    #[test]
    fn fingerprints() {
        let fp = [0xabu8; 32];
        let colons: Vec<String> = fp.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")), Ok(fp));
        assert_eq!(
            parse_fingerprint(&format!("sha256:{}", "ab".repeat(32))),
            Ok(fp)
        );
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }
}
