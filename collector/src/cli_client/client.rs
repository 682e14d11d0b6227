//! A small HTTP/1.1 client for the collector's API: one connection per request, hyper directly
//! (already in the dependency graph through axum and tonic) rather than another HTTP client
//! crate. `http://` (the collector's loopback default) or `https://` with TLS 1.3 (ring),
//! trusting only the CA file given (`--ca-file`: the collector CA, or whatever issued a
//! certificate configured with `http_tls_cert`); the server name is the URL's host.
//! A bearer token, when given, goes into every request; it is never printed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::api::ErrorBody;

/// The largest response body accepted (10 000 violations with long before/after values fit).
const MAX_BODY: usize = 256 << 20;

/// Where the API is: `http[s]://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiBase {
    https: bool,
    host: String,
    port: u16,
    authority: String,
    prefix: String,
}

impl ApiBase {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid API URL {url:?}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("API URL {url:?} must start with http:// or https://"),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("API URL {url:?} has no host"))?;
        if uri.query().is_some() {
            bail!("API URL {url:?} must not have a query string");
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(ApiBase {
            https,
            host,
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            authority: authority.as_str().to_string(),
            prefix: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The request target for `path` (which starts with `/`) and the query pairs (values
    /// percent-encoded; pairs with `None` values left out).
    pub fn target(&self, path: &str, query: &[(&str, Option<String>)]) -> String {
        let mut ser = form_urlencoded::Serializer::new(String::new());
        for (name, value) in query {
            if let Some(v) = value {
                ser.append_pair(name, v);
            }
        }
        let q = ser.finish();
        if q.is_empty() {
            format!("{}{path}", self.prefix)
        } else {
            format!("{}{path}?{q}", self.prefix)
        }
    }
}

/// A response: status and the raw body (passed through unchanged by `--format json`).
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Response {
    /// The API's error message for a non-2xx response, or a generic one when the body is not
    /// the API's error JSON (a proxy, another server on the port).
    pub fn error_message(&self) -> String {
        match serde_json::from_slice::<ErrorBody>(&self.body) {
            Ok(e) => e.error.message,
            Err(_) => format!(
                "HTTP {} ({} bytes of non-API body)",
                self.status,
                self.body.len()
            ),
        }
    }
}

/// A connection recipe: where, how to trust it, who is asking, how long to wait.
pub struct Client {
    base: ApiBase,
    tls: Option<tokio_rustls::TlsConnector>,
    /// `Bearer dwa_…`.
    authorization: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    // Never print the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("tls", &self.tls.is_some())
            .field("token", &self.authorization.is_some())
            .finish()
    }
}

impl Client {
    /// `ca_file`: PEM certificates to trust for `https://` (required for it: the collector's
    /// certificate comes from its own CA, which no system store holds).
    pub fn new(
        base: ApiBase,
        ca_file: Option<&Path>,
        token: Option<String>,
        timeout: Duration,
    ) -> anyhow::Result<Client> {
        let tls = match (base.https, ca_file) {
            (false, _) => None,
            (true, None) => bail!(
                "an https:// API URL needs --ca-file (or DRIFTWATCH_CA_FILE): the CA that issued \
                 the API's certificate (the collector CA: `driftwatch-collector ca show`)"
            ),
            (true, Some(path)) => Some(tls_connector(path)?),
        };
        Ok(Client {
            base,
            tls,
            authorization: token.map(|t| format!("Bearer {t}")),
            timeout,
        })
    }

    pub fn base(&self) -> &ApiBase {
        &self.base
    }

    /// GETs `target`.
    pub async fn get(&self, target: &str) -> anyhow::Result<Response> {
        self.send(Method::GET, target, None).await
    }

    /// Sends one request (a JSON body for POST), the whole exchange within the timeout.
    pub async fn send(
        &self,
        method: Method,
        target: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Response> {
        tokio::time::timeout(self.timeout, self.send_inner(method, target, body))
            .await
            .map_err(|_| {
                anyhow!(
                    "no answer from the collector at {} within {:?}",
                    self.base.authority,
                    self.timeout
                )
            })?
    }

    async fn send_inner(
        &self,
        method: Method,
        target: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<Response> {
        let base = &self.base;
        let tcp = tokio::net::TcpStream::connect((base.host.as_str(), base.port))
            .await
            .with_context(|| {
                format!(
                    "cannot connect to the collector's HTTP API at {} (is driftwatch-collector \
                     running? set --api or DRIFTWATCH_API)",
                    base.authority
                )
            })?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(target)
            .header(HOST, &base.authority)
            .header(ACCEPT, "application/json")
            .header(
                USER_AGENT,
                concat!("driftwatch/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(a) = &self.authorization {
            req = req.header(AUTHORIZATION, a);
        }
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .with_context(|| format!("building the request for {target:?}"))?;
        match &self.tls {
            None => exchange(tcp, req, &method, target).await,
            Some(connector) => {
                let name = ServerName::try_from(base.host.clone())
                    .with_context(|| format!("{:?} is not a server name", base.host))?;
                let tls = connector.connect(name, tcp).await.with_context(|| {
                    format!(
                        "TLS with the collector's HTTP API at {} (is --ca-file the CA that \
                         issued its certificate, and the URL's host one of its server_names?)",
                        base.authority
                    )
                })?;
                exchange(tls, req, &method, target).await
            }
        }
    }
}

fn tls_connector(ca_file: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_file_iter(ca_file)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading the CA file {}", ca_file.display()))?;
    if certs.is_empty() {
        bail!("the CA file {} holds no certificate", ca_file.display());
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .with_context(|| format!("a certificate in {}", ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS configuration")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

async fn exchange<S>(
    stream: S,
    req: Request<Full<Bytes>>,
    method: &Method,
    target: &str,
) -> anyhow::Result<Response>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    // The connection task drives the socket; it ends when the response is read and the
    // sender dropped.
    let conn = tokio::spawn(conn);
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("{method} {target}"))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the response to {method} {target}: {e}"))?
        .to_bytes();
    drop(sender);
    conn.abort();
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let b = ApiBase::parse("http://127.0.0.1:7480").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("127.0.0.1", 7480));
        assert_eq!(b.target("/api/v1/hosts", &[]), "/api/v1/hosts");
        let b = ApiBase::parse("http://[::1]:9000/dw/").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 9000));
        assert_eq!(
            b.target(
                "/api/v1/violations",
                &[
                    ("path", Some("/etc/ssh/**".into())),
                    ("kind", None),
                    ("since", Some("1h 30m".into())),
                ]
            ),
            "/dw/api/v1/violations?path=%2Fetc%2Fssh%2F**&since=1h+30m"
        );
        assert_eq!(ApiBase::parse("http://localhost").unwrap().port, 80);
        let b = ApiBase::parse("https://collector.example.com").unwrap();
        assert!(b.https);
        assert_eq!(b.port, 443);
        assert!(ApiBase::parse("ftp://127.0.0.1:7480").is_err());
        assert!(ApiBase::parse("127.0.0.1:7480").is_err());
        assert!(ApiBase::parse("http://h/?x=1").is_err());
    }
}
