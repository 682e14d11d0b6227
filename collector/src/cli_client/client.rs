//! A small HTTP/1.1 client for the collector's API: one connection per request, GET and JSON POST,
//! hyper directly (already in the dependency graph through axum and tonic) rather than another
//! HTTP client crate. Plain HTTP to loopback for now; HTTPS comes with access control.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use http_body_util::{BodyExt, Full, Limited};
use hyper::Method;
use hyper::body::Bytes;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;

use crate::api::ErrorBody;

/// The largest response body accepted (10 000 violations with long before/after values fit).
const MAX_BODY: usize = 256 << 20;

/// Where the API is: `http://host[:port][/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiBase {
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
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => bail!(
                "API URL {url:?}: https is not supported yet (the API listens on loopback over \
                 plain HTTP until it has access control); use http://127.0.0.1:7480 or an SSH \
                 tunnel"
            ),
            _ => bail!("API URL {url:?} must start with http://"),
        }
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
            host,
            port: authority.port_u16().unwrap_or(80),
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

/// GETs `target` from `base`, the whole exchange within `timeout`.
pub async fn get(base: &ApiBase, target: &str, timeout: Duration) -> anyhow::Result<Response> {
    request(base, Method::GET, target, None, timeout).await
}

/// POSTs the JSON `body` to `target`, the whole exchange within `timeout`.
pub async fn post(
    base: &ApiBase,
    target: &str,
    body: Vec<u8>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    request(base, Method::POST, target, Some(body), timeout).await
}

async fn request(
    base: &ApiBase,
    method: Method,
    target: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    tokio::time::timeout(timeout, request_inner(base, method, target, body))
        .await
        .map_err(|_| {
            anyhow!(
                "no answer from the collector at {} within {timeout:?}",
                base.authority
            )
        })?
}

async fn request_inner(
    base: &ApiBase,
    method: Method,
    target: &str,
    body: Option<Vec<u8>>,
) -> anyhow::Result<Response> {
    let stream = tokio::net::TcpStream::connect((base.host.as_str(), base.port))
        .await
        .with_context(|| {
            format!(
                "cannot connect to the collector's HTTP API at {} (is driftwatch-collector \
                 running? set --api or DRIFTWATCH_API)",
                base.authority
            )
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    // The connection task drives the socket; it ends when the response is read and the
    // sender dropped.
    let conn = tokio::spawn(conn);
    let mut req = Request::builder().method(method.clone()).uri(target);
    if body.is_some() {
        req = req.header(CONTENT_TYPE, "application/json");
    }
    let req = req
        .header(HOST, &base.authority)
        .header(ACCEPT, "application/json")
        .header(
            USER_AGENT,
            concat!("driftwatch/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .with_context(|| format!("building the request for {target:?}"))?;
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
        assert!(ApiBase::parse("https://127.0.0.1:7480").is_err());
        assert!(ApiBase::parse("127.0.0.1:7480").is_err());
        assert!(ApiBase::parse("http://h/?x=1").is_err());
    }
}
