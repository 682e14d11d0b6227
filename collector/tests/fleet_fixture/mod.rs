//! A small fleet in a real SQLite store, written only through the `Storage` trait, and the
//! HTTP API served from it on 127.0.0.1:0. Shared by `http_api.rs` and `cli.rs`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use driftwatch_collector::http::{self, ApiConfig};
use driftwatch_collector::storage::{
    ApiToken, AuditEntry, HeartbeatRecord, HelloInfo, IssuedCertificate, ReportToApply, Role,
    SecurityEvent, SqliteStore, Storage,
};
use driftwatch_collector::token::{Token, TokenKind};
use driftwatch_proto::set::{file_key, item_hash, package_key, set_digest};
use driftwatch_proto::v1::{
    AttributeChange, DriftItem, PackageDrift, PackageDriftKind, Report, ScanStatus, Severity,
    Violation, ViolationClass, ViolationKind, drift_item::Item,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const MINUTE: i64 = 60_000;
pub const HOUR: i64 = 60 * MINUTE;
pub const DAY: i64 = 24 * HOUR;

/// A path with ESC, a newline and a table separator: must never reach a terminal raw.
pub const HOSTILE_PATH: &[u8] = b"/tmp/evil\x1b[31mRED\nFAKE|row";
/// Not UTF-8: travels as `{"bytes": base64}`.
pub const BINARY_PATH: &[u8] = b"/srv/data\xff\xfe";

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The store, the directory it lives in, and the time the fleet was built at.
pub struct Fleet {
    pub _dir: tempfile::TempDir,
    pub store: Arc<dyn Storage>,
    pub now: i64,
}

pub fn file(
    path: &[u8],
    kind: ViolationKind,
    severity: Severity,
    changes: &[(&str, &str, &str)],
) -> DriftItem {
    DriftItem {
        key: file_key(path),
        item: Some(Item::File(Violation {
            path: path.to_vec(),
            kind: kind as i32,
            severity: severity as i32,
            changes: changes
                .iter()
                .map(|(a, b, c)| AttributeChange {
                    attribute: a.to_string(),
                    before: b.to_string(),
                    after: c.to_string(),
                })
                .collect(),
            ..Default::default()
        })),
    }
}

pub fn package(name: &str, kind: PackageDriftKind, after: &str) -> DriftItem {
    DriftItem {
        key: package_key(name, "amd64"),
        item: Some(Item::Package(PackageDrift {
            name: name.into(),
            arch: "amd64".into(),
            kind: kind as i32,
            severity: Severity::Medium as i32,
            version_after: after.into(),
            state_after: "installed".into(),
            ..Default::default()
        })),
    }
}

/// sshd_config, modified, owned by openssh-server (a conffile, unexplained).
pub fn sshd_config() -> DriftItem {
    let mut i = file(
        b"/etc/ssh/sshd_config",
        ViolationKind::Modified,
        Severity::High,
        &[
            ("mode", "0644 (rw-r--r--)", "0666 (rw-rw-rw-)"),
            ("content", "blake3:aaaa", "blake3:bbbb"),
        ],
    );
    if let Some(Item::File(v)) = &mut i.item {
        v.packages = vec!["openssh-server:amd64".into()];
        v.class = ViolationClass::Unexplained as i32;
        v.config = true;
        v.baseline_type = "file".into();
        v.observed_type = "file".into();
    }
    i
}

/// The agent's set, from which each report's digest is computed.
#[derive(Default)]
pub struct Agent {
    seq: u64,
    set: BTreeMap<Vec<u8>, DriftItem>,
}

impl Agent {
    pub fn report(&mut self, full: bool, upserts: Vec<DriftItem>, removed: Vec<Vec<u8>>) -> Report {
        if full {
            self.set.clear();
        }
        for i in &upserts {
            self.set.insert(i.key.clone(), i.clone());
        }
        for k in &removed {
            self.set.remove(k);
        }
        self.seq += 1;
        let hashes = self
            .set
            .iter()
            .map(|(k, i)| (k.clone(), item_hash(i)))
            .collect();
        Report {
            epoch: 1,
            seq: self.seq,
            full,
            upserts,
            removed_keys: removed,
            set_digest: set_digest(&hashes).to_vec(),
            status: ScanStatus::Complete as i32,
            ..Default::default()
        }
    }
}

async fn enroll(s: &dyn Storage, host: &str, labels: &[(&str, &str)], at: i64) {
    s.enroll_host(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        IssuedCertificate {
            host_id: host.into(),
            serial: host.as_bytes().to_vec(),
            not_before_ms: at,
            not_after_ms: at + 30 * DAY,
            issued_ms: at,
        },
        AuditEntry::new(
            at,
            format!("host:{host}"),
            "host.enrolled",
            host,
            serde_json::json!({}),
        ),
    )
    .await
    .unwrap();
}

/// The fixture's API token of `role` (a fixed string, so helpers need no fleet handle).
pub fn api_token(role: Role) -> String {
    let (id, fill) = match role {
        Role::Auditor => ("000000a1", 1u8),
        Role::Operator => ("000000b2", 2),
        Role::Admin => ("000000c3", 3),
    };
    format!(
        "dwa_{id}_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([fill; 32])
    )
}

/// Stores the three [`api_token`]s.
pub async fn add_api_tokens(s: &dyn Storage, now: i64) {
    for role in Role::ALL {
        let t = Token::parse(TokenKind::Api, &api_token(role)).unwrap();
        s.create_api_token(
            ApiToken {
                id: t.id().into(),
                name: format!("fixture {role}"),
                role,
                secret_sha256: t.sha256(),
                created_ms: now - DAY,
                expires_ms: None,
                revoked_ms: None,
                last_used_ms: None,
                created_by: "local:test".into(),
            },
            AuditEntry::new(
                now - DAY,
                "local:test",
                "api_token.created",
                t.id(),
                serde_json::json!({ "role": role.name() }),
            ),
        )
        .await
        .unwrap();
    }
}

async fn hello(s: &dyn Storage, host: &str, image: &str, version: &str, at: i64) {
    s.hello(
        host,
        HelloInfo {
            agent_version: "0.1.0".into(),
            image_id: image.into(),
            image_version: version.into(),
            baseline_root: vec![0xab; 32],
            boot_id: "b00t".into(),
            epoch: 1,
        },
        at,
    )
    .await
    .unwrap();
}

pub async fn apply(s: &dyn Storage, host: &str, report: Report, at: i64) {
    s.apply_reports(vec![ReportToApply {
        host_id: host.into(),
        report,
        received_ms: at,
    }])
    .await
    .unwrap();
}

async fn heartbeat(s: &dyn Storage, host: &str, at: i64) {
    s.record_heartbeats(vec![HeartbeatRecord {
        host_id: host.into(),
        received_ms: at,
        last_scan_ms: at - MINUTE,
        last_scan_status: ScanStatus::Complete,
    }])
    .await
    .unwrap();
}

/// The fleet:
/// - `web-1` (image web 2026.11.1): drifted — sshd_config modified (high), the hostile and the
///   binary path added, curl installed, and `/usr/bin/env` setuid (critical) resolved 30 min ago;
/// - `db-1` (image db 2026.10.2): clean;
/// - `old-1` (image web): sshd_config modified 3 days ago, silent since;
/// - `inc-1`: incomplete (spool overflow, 3 lost reports), no known drift;
/// - `gone-1`: revoked; `new-1`: enrolled, never reported;
/// - one impersonation security event.
pub async fn fleet() -> Fleet {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.db");
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(path))
        .await
        .unwrap()
        .unwrap();
    let store: Arc<dyn Storage> = Arc::new(store);
    let s = store.as_ref();
    let now = now_ms();

    enroll(
        s,
        "web-1",
        &[("role", "web"), ("zone", "a")],
        now - 10 * DAY,
    )
    .await;
    hello(s, "web-1", "web", "2026.11.1", now - 3 * HOUR).await;
    let mut web = Agent::default();
    let env = file(
        b"/usr/bin/env",
        ViolationKind::Modified,
        Severity::Critical,
        &[("mode", "0755 (rwxr-xr-x)", "4755 (rwsr-xr-x)")],
    );
    let hostile = file(
        HOSTILE_PATH,
        ViolationKind::Added,
        Severity::Medium,
        &[(
            "content",
            "\x1b]0;pwned\x07",
            "after|with|pipes\nand newline",
        )],
    );
    let binary = file(BINARY_PATH, ViolationKind::Added, Severity::Low, &[]);
    let r = web.report(
        true,
        vec![
            sshd_config(),
            hostile,
            binary,
            package("curl", PackageDriftKind::Installed, "8.5.0-2"),
            env.clone(),
        ],
        vec![],
    );
    apply(s, "web-1", r, now - 2 * HOUR).await;
    let r = web.report(false, vec![], vec![env.key.clone()]);
    apply(s, "web-1", r, now - 30 * MINUTE).await;
    heartbeat(s, "web-1", now - 10_000).await;

    enroll(s, "db-1", &[("role", "db")], now - 10 * DAY).await;
    hello(s, "db-1", "db", "2026.10.2", now - HOUR).await;
    let r = Agent::default().report(true, vec![], vec![]);
    apply(s, "db-1", r, now - HOUR).await;
    heartbeat(s, "db-1", now - 5_000).await;

    enroll(s, "old-1", &[], now - 10 * DAY).await;
    hello(s, "old-1", "web", "2026.11.1", now - 3 * DAY).await;
    let r = Agent::default().report(true, vec![sshd_config()], vec![]);
    apply(s, "old-1", r, now - 3 * DAY).await;

    enroll(s, "inc-1", &[], now - DAY).await;
    hello(s, "inc-1", "web", "2026.11.1", now - HOUR).await;
    let mut r = Agent::default().report(true, vec![], vec![]);
    r.status = ScanStatus::Incomplete as i32;
    r.status_reason = "spool overflow".into();
    r.lost_reports = 3;
    apply(s, "inc-1", r, now - HOUR).await;
    heartbeat(s, "inc-1", now - 1_000).await;

    enroll(s, "gone-1", &[], now - DAY).await;
    hello(s, "gone-1", "web", "2026.11.1", now - HOUR).await;
    let r = Agent::default().report(true, vec![], vec![]);
    apply(s, "gone-1", r, now - HOUR).await;
    s.revoke_host(
        "gone-1",
        now - MINUTE,
        AuditEntry::new(
            now - MINUTE,
            "local:test",
            "host.revoked",
            "gone-1",
            serde_json::json!({}),
        ),
    )
    .await
    .unwrap();

    enroll(s, "new-1", &[], now - MINUTE).await;

    s.record_security_event(
        SecurityEvent {
            at_ms: now - 20 * MINUTE,
            kind: "impersonation".into(),
            peer_host_id: Some("web-1".into()),
            detail: "Hello.host_id \"db-1\"\x1b[2J differs from the certificate".into(),
        },
        AuditEntry::new(
            now - 20 * MINUTE,
            "collector",
            "security.impersonation_refused",
            "web-1",
            serde_json::json!({ "detail": "Hello.host_id \"db-1\"\x1b[2J" }),
        ),
    )
    .await
    .unwrap();
    add_api_tokens(s, now).await;

    Fleet {
        _dir: dir,
        store,
        now,
    }
}

/// The API over `store` on 127.0.0.1:0; dropping the sender shuts it down.
pub async fn serve(
    store: Arc<dyn Storage>,
    config: ApiConfig,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(http::serve(listener, store, config, async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

/// A plain HTTP/1.1 GET as the fixture's auditor (independent of the CLI's client): status
/// and body.
pub async fn get(addr: SocketAddr, target: &str) -> (u16, serde_json::Value) {
    let r = request(addr, "GET", target, Some(&api_token(Role::Auditor)), None).await;
    (r.status, r.body)
}

/// An answer of [`request`].
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Header lines, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: serde_json::Value,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One plain HTTP/1.1 request with an optional bearer token and JSON body.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body);
    s.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("response within 30 s")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{method} {target}: {head}"
    );
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    Answer {
        status,
        headers,
        body: json,
    }
}
