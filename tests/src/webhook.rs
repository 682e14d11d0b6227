//! A rebuild-webhook receiver for the end-to-end tests, written independently of the
//! collector's code: it verifies every request the way a real receiver must (Standard Webhooks
//! `v1` HMAC-SHA256 over `"{id}.{timestamp}.{body}"`, timestamp within five minutes), answers
//! `202 Accepted` to a verified request and `401` to anything else, and hands each verified
//! request to the test once per `webhook-id` (the collector may deliver one twice).
//!
//! Plain HTTP, or HTTPS with a certificate for `127.0.0.1` from a throwaway CA made with rcgen
//! ([`Tls::generate`]); the collector is given that CA as its `ca_file`. One thread accepts; each
//! connection is handled on its own thread with read/write timeouts, so a stuck client cannot
//! hang the test. The listener stops when the [`Receiver`] drops.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver as Rx, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::hmac;

/// Largest request head and body the receiver reads.
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 1024 * 1024;
/// Allowed distance of `webhook-timestamp` from now.
const TOLERANCE_S: u64 = 5 * 60;
/// Per-connection read/write timeout.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A verified request.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `webhook-id`: the collector's action id.
    pub id: String,
    pub timestamp: u64,
    /// The parsed JSON body.
    pub body: serde_json::Value,
}

impl Delivery {
    /// `data.host.id`.
    pub fn host(&self) -> &str {
        self.body["data"]["host"]["id"].as_str().unwrap_or("")
    }
}

/// Server certificate and key for an HTTPS receiver, and the CA's PEM for the collector.
pub struct Tls {
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    /// The CA certificate (PEM) that signed the receiver's certificate.
    pub ca_pem: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive() // no key material in test output
    }
}

impl Tls {
    /// A fresh CA and a certificate for `127.0.0.1` signed by it.
    pub fn generate() -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "rebuild receiver test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA cert");
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).expect("server cert");
        Tls {
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            ca_pem: ca.pem(),
        }
    }

    fn config(&self) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![rustls_pki_types::CertificateDer::from(
                    self.cert_der.clone(),
                )],
                rustls_pki_types::PrivateKeyDer::Pkcs8(self.key_der.clone().into()),
            )
            .expect("server certificate");
        Arc::new(cfg)
    }
}

/// A running receiver.
pub struct Receiver {
    /// The URL to configure as `actions.url`.
    pub url: String,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    verified: Rx<Delivery>,
    seen: HashSet<String>,
    rejected: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// Listens on a free loopback port; `secret` is the `whsec_…` secret shared with the
    /// collector; `tls` makes it HTTPS.
    pub fn start(secret: &str, tls: Option<&Tls>) -> Receiver {
        let key = STANDARD
            .decode(secret.trim().trim_start_matches("whsec_"))
            .expect("secret is whsec_<base64>");
        let key = hmac::Key::new(hmac::HMAC_SHA256, &key);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{port}/hooks/rebuild");
        let tls_cfg = tls.map(Tls::config);
        let stop = Arc::new(AtomicBool::new(false));
        let rejected = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = channel();
        let accept = {
            let stop = stop.clone();
            let rejected = rejected.clone();
            std::thread::spawn(move || accept_loop(listener, stop, key, tls_cfg, tx, rejected))
        };
        Receiver {
            url,
            stop,
            accept: Some(accept),
            verified: rx,
            seen: HashSet::new(),
            rejected,
        }
    }

    /// The next verified request with a `webhook-id` not seen before, waiting at most `limit`.
    pub fn next(&mut self, limit: Duration) -> Option<Delivery> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.verified.recv_timeout(left) {
                Ok(d) if self.seen.insert(d.id.clone()) => return Some(d),
                Ok(_) => continue, // a redelivery of one already handled
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Why each refused request was refused.
    pub fn rejected(&self) -> Vec<String> {
        self.rejected.lock().expect("lock").clone()
    }

    /// Writes a fresh `whsec_` secret (32 random bytes) to `path`, mode 0600, and returns it.
    pub fn write_secret(path: &Path) -> String {
        use std::os::unix::fs::PermissionsExt;
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .expect("random key");
        let secret = format!("whsec_{}", STANDARD.encode(key));
        std::fs::write(path, format!("{secret}\n")).expect("write secret");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        secret
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    key: hmac::Key,
    tls: Option<Arc<rustls::ServerConfig>>,
    tx: Sender<Delivery>,
    rejected: Arc<Mutex<Vec<String>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((sock, _)) => {
                let (key, tls, tx, rejected) =
                    (key.clone(), tls.clone(), tx.clone(), rejected.clone());
                std::thread::spawn(move || {
                    let verdict = serve(sock, &key, tls);
                    match verdict {
                        Ok(Some(d)) => {
                            let _ = tx.send(d);
                        }
                        Ok(None) => {}
                        Err(why) => rejected.lock().expect("lock").push(why),
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Handles one connection: `Ok(Some)` for a verified request, `Ok(None)` for a connection that
/// sent nothing, `Err(why)` for a refused one (answered 400/401).
fn serve(
    sock: TcpStream,
    key: &hmac::Key,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<Option<Delivery>, String> {
    sock.set_nonblocking(false).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(IO_TIMEOUT))
        .map_err(|e| e.to_string())?;
    match tls {
        None => exchange(sock, key),
        Some(cfg) => {
            let conn = rustls::ServerConnection::new(cfg).map_err(|e| e.to_string())?;
            exchange(rustls::StreamOwned::new(conn, sock), key)
        }
    }
}

fn exchange<S: Read + Write>(mut s: S, key: &hmac::Key) -> Result<Option<Delivery>, String> {
    let (head, mut body) = match read_head(&mut s)? {
        Some(x) => x,
        None => return Ok(None),
    };
    let header = |name: &str| -> Option<String> {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or("no content-length")?;
    if len > MAX_BODY {
        respond(&mut s, "413 Payload Too Large");
        return Err(format!("body of {len} bytes"));
    }
    while body.len() < len {
        let mut buf = [0u8; 8192];
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed inside the body".into());
        }
        body.extend_from_slice(&buf[..n]);
    }
    body.truncate(len);
    match verify(key, &header, &body) {
        Ok(d) => {
            respond(&mut s, "202 Accepted");
            Ok(Some(d))
        }
        Err(why) => {
            respond(&mut s, "401 Unauthorized");
            Err(why)
        }
    }
}

/// Reads up to the end of the request head; returns it and whatever body bytes followed.
fn read_head<S: Read>(s: &mut S) -> Result<Option<(String, Vec<u8>)>, String> {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            return Ok(Some((head, buf[end + 4..].to_vec())));
        }
        if buf.len() > MAX_HEAD {
            return Err("request head too large".into());
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).map_err(|e| e.to_string())?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("connection closed inside the head".into())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn verify(
    key: &hmac::Key,
    header: &dyn Fn(&str) -> Option<String>,
    body: &[u8],
) -> Result<Delivery, String> {
    let id = header("webhook-id").ok_or("no webhook-id")?;
    let ts_text = header("webhook-timestamp").ok_or("no webhook-timestamp")?;
    let ts: u64 = ts_text.parse().map_err(|_| "bad webhook-timestamp")?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    if now.abs_diff(ts) > TOLERANCE_S {
        return Err(format!("timestamp {ts} is {}s from now", now.abs_diff(ts)));
    }
    let sigs = header("webhook-signature").ok_or("no webhook-signature")?;
    let mut signed = format!("{id}.{ts_text}.").into_bytes();
    signed.extend_from_slice(body);
    let ok = sigs.split(' ').any(|sig| {
        sig.strip_prefix("v1,")
            .and_then(|b64| STANDARD.decode(b64).ok())
            .is_some_and(|mac| hmac::verify(key, &signed, &mac).is_ok())
    });
    if !ok {
        return Err(format!("no matching v1 signature for {id}"));
    }
    let body = serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    Ok(Delivery {
        id,
        timestamp: ts,
        body,
    })
}

fn respond<S: Write>(s: &mut S, status: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    let _ = s.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed_request(key: &[u8], id: &str, ts: u64, body: &str) -> String {
        let k = hmac::Key::new(hmac::HMAC_SHA256, key);
        let mac = hmac::sign(&k, format!("{id}.{ts}.{body}").as_bytes());
        format!(
            "POST /hooks/rebuild HTTP/1.1\r\nwebhook-id: {id}\r\nwebhook-timestamp: {ts}\r\n\
             webhook-signature: v1a,xyz v1,{}\r\ncontent-length: {}\r\n\r\n{body}",
            STANDARD.encode(mac.as_ref()),
            body.len()
        )
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn post(url: &str, request: &str) -> String {
        let addr = url
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    }

    #[test]
    fn verified_requests_pass_once_and_forgeries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let secret = Receiver::write_secret(&dir.path().join("s"));
        let key = STANDARD.decode(&secret["whsec_".len()..]).unwrap();
        let mut r = Receiver::start(&secret, None);
        let body = r#"{"data":{"host":{"id":"web-1"}}}"#;
        let good = signed_request(&key, "rb_1", now(), body);
        assert!(post(&r.url, &good).starts_with("HTTP/1.1 202"));
        assert!(post(&r.url, &good).starts_with("HTTP/1.1 202")); // a redelivery
        let forged = signed_request(b"another key", "rb_2", now(), body);
        assert!(post(&r.url, &forged).starts_with("HTTP/1.1 401"));
        let stale = signed_request(&key, "rb_3", now() - 3600, body);
        assert!(post(&r.url, &stale).starts_with("HTTP/1.1 401"));
        let d = r
            .next(Duration::from_secs(5))
            .expect("the verified request");
        assert_eq!((d.id.as_str(), d.host()), ("rb_1", "web-1"));
        assert!(
            r.next(Duration::from_millis(300)).is_none(),
            "delivered twice"
        );
        let rejected = r.rejected();
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert!(
            rejected
                .iter()
                .any(|w| w.contains("no matching v1 signature for rb_2"))
        );
        assert!(
            rejected.iter().any(|w| w.contains("s from now")),
            "{rejected:?}"
        );
    }
}
