//! SIEM exports end to end: `GET /api/v1/export` in every format over a real SQLite fleet with
//! hostile host ids, paths and package names; the real `driftwatch export` binary; and the
//! syslog forwarder against real loopback receivers (UDP, TCP, TLS with rcgen certificates).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet_fixture;

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use driftwatch_collector::export::cef;
use driftwatch_collector::export::config::{SyslogSettings, Transport};
use driftwatch_collector::export::syslog::{CURSOR_NAME, Forwarder};
use driftwatch_collector::http::ApiConfig;
use driftwatch_collector::http::auth::Role;
use driftwatch_collector::storage::export::ExportCursor;
use driftwatch_collector::storage::{
    AuditEntry, HelloInfo, IssuedCertificate, ReportToApply, SecurityEvent, Storage, ViolationQuery,
};
use driftwatch_proto::escape;
use driftwatch_proto::set::{file_key, item_hash, package_key, set_digest};
use driftwatch_proto::v1::{
    AttributeChange, DriftItem, PackageDrift, PackageDriftKind, Report, ScanStatus, Severity,
    Violation, ViolationKind, drift_item::Item,
};
use fleet_fixture::{DAY, HOUR, MINUTE, fleet, serve};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};

/// Every wait here is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

/// A host id no enrollment would accept, written straight into storage: ESC, newline, CR,
/// HTML, the CEF and CSV separators, a backslash, a bidi override, a leading `=`.
const EVIL_HOST: &str = "=evil\u{1b}[31m\n\r<script>alert(1)</script>|a=b\\c\u{202e}";
/// Paths, as bytes: control characters, HTML, separators, invalid UTF-8, bidi override,
/// formula starters after the slash.
const EVIL_PATHS: [&[u8]; 5] = [
    b"/etc/\x1b[2Jx\ny\rz",
    b"/var/www/<script>alert(1)</script>",
    b"/srv/a|b=c\\d",
    b"/bin/\xff\xfe\x1b",
    "/usr/bin/\u{202e}gnp.exe".as_bytes(),
];
/// A package whose name and version start formulas and carry separators.
const EVIL_PACKAGE: &str = "=cmd|' /C calc'!A0";
const EVIL_VERSION: &str = "@SUM(1+1)\u{1b}=";

fn evil_items() -> Vec<DriftItem> {
    let mut items: Vec<DriftItem> = EVIL_PATHS
        .iter()
        .map(|p| DriftItem {
            key: file_key(p),
            item: Some(Item::File(Violation {
                path: p.to_vec(),
                kind: ViolationKind::Added as i32,
                severity: Severity::High as i32,
                changes: vec![AttributeChange {
                    attribute: "content".into(),
                    before: "(absent)".into(),
                    after: "blake3:<b>\n|=\\".into(),
                }],
                reason: "-1+1\u{1b}]0;x\u{7}".into(),
                packages: vec![format!("{EVIL_PACKAGE}:amd64")],
                ..Default::default()
            })),
        })
        .collect();
    items.push(DriftItem {
        key: package_key(EVIL_PACKAGE, "amd64"),
        item: Some(Item::Package(PackageDrift {
            name: EVIL_PACKAGE.into(),
            arch: "amd64".into(),
            kind: PackageDriftKind::Installed as i32,
            severity: Severity::Medium as i32,
            version_after: EVIL_VERSION.into(),
            state_after: "installed".into(),
            ..Default::default()
        })),
    });
    items
}

/// The fixture's fleet plus the hostile host (6 opened violations), a hostile security event
/// and a hostile audit record.
async fn hostile_fleet() -> fleet_fixture::Fleet {
    let f = fleet().await;
    let s = f.store.as_ref();
    let at = f.now - 90 * MINUTE;
    s.enroll_host(
        vec![("role".into(), "<script>x</script>|=\\\u{1b}".into())],
        IssuedCertificate {
            host_id: EVIL_HOST.into(),
            serial: b"evil".to_vec(),
            not_before_ms: at,
            not_after_ms: at + DAY,
            issued_ms: at,
        },
        AuditEntry::new(
            at,
            format!("host:{EVIL_HOST}"),
            "host.enrolled",
            EVIL_HOST,
            serde_json::json!({}),
        ),
    )
    .await
    .unwrap();
    s.hello(
        EVIL_HOST,
        HelloInfo {
            image_id: "web|=\n".into(),
            image_version: "1".into(),
            epoch: 1,
            ..Default::default()
        },
        at,
    )
    .await
    .unwrap();
    let items = evil_items();
    let hashes = items
        .iter()
        .map(|i| (i.key.clone(), item_hash(i)))
        .collect();
    s.apply_reports(vec![ReportToApply {
        host_id: EVIL_HOST.into(),
        report: Report {
            epoch: 1,
            seq: 1,
            full: true,
            set_digest: set_digest(&hashes).to_vec(),
            upserts: items,
            status: ScanStatus::Complete as i32,
            ..Default::default()
        },
        received_ms: at,
    }])
    .await
    .unwrap();
    s.record_security_event(
        SecurityEvent {
            at_ms: at + 1,
            kind: "impersonation".into(),
            peer_host_id: Some(EVIL_HOST.into()),
            detail: "claimed \"db\"\n\u{1b}[2J<img src=x onerror=alert(1)>|x=y".into(),
        },
        AuditEntry::new(
            at + 1,
            "collector",
            "security.impersonation_refused",
            EVIL_HOST,
            serde_json::json!({"detail": "<img src=x>"}),
        ),
    )
    .await
    .unwrap();
    s.append_audit(AuditEntry::new(
        at + 2,
        "token:0123abcd",
        "host.retired",
        EVIL_HOST,
        serde_json::json!({"reason": "<script>\n|=\\\u{1b}", "name": "=1+1"}),
    ))
    .await
    .unwrap();
    f
}

/// How many events the store holds from `since_ms` on, counted without the export code:
/// occurrences opened and resolved, security events, audit records.
async fn expected_events(store: &dyn Storage, since_ms: i64) -> usize {
    let occ = store
        .search_violations(ViolationQuery {
            include_resolved: true,
            limit: 100_000,
            ..Default::default()
        })
        .await
        .unwrap();
    let opened = occ.iter().filter(|o| o.first_seen_ms >= since_ms).count();
    let resolved = occ
        .iter()
        .filter(|o| o.resolved_ms.is_some_and(|r| r >= since_ms))
        .count();
    let security = store.security_events(since_ms, 10_000).await.unwrap().len();
    let audit = store
        .audit_records(0, 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|a| a.at_ms >= since_ms)
        .count();
    opened + resolved + security + audit
}

/// Every event of the hostile fleet (all within 30 days).
async fn all_events(f: &fleet_fixture::Fleet) -> usize {
    let n = expected_events(f.store.as_ref(), f.now - 30 * DAY).await;
    // web-1 opens 5 and resolves 1, old-1 opens 1, the hostile host opens 6; two security
    // events; the audit log has more (enrollments, tokens, refusals, the retirement).
    assert!(n > 16, "{n}");
    n
}

/// An HTTP/1.0 GET (no chunked encoding to undo): status, content type, body.
async fn get_raw(addr: SocketAddr, target: &str) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let token = fleet_fixture::api_token(Role::Auditor);
    s.write_all(
        format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let status = head[9..12].parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (status, ctype, raw[split + 4..].to_vec())
}

/// No character a terminal or log viewer acts on, other than the line ends.
fn assert_terminal_safe(what: &str, bytes: &[u8]) {
    let text = std::str::from_utf8(bytes).unwrap_or_else(|_| panic!("{what} is not UTF-8"));
    for c in text.chars() {
        let bad = (c.is_control() && c != '\n' && c != '\r')
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2066}'..='\u{2069}').contains(&c);
        assert!(!bad, "{what} carries {c:?}:\n{text}");
    }
}

fn raw_bytes(v: &serde_json::Value) -> Vec<u8> {
    serde_json::from_value::<driftwatch_collector::api::RawBytes>(v.clone())
        .unwrap()
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_is_exact_valid_json_and_safe() {
    let f = hostile_fleet().await;
    let n_events = all_events(&f).await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let (status, ctype, body) = get_raw(addr, "/api/v1/export?format=jsonl&since=30d").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(ctype, "application/x-ndjson");
    assert_terminal_safe("jsonl", &body);
    let text = String::from_utf8(body.clone()).unwrap();
    for bad in ["<", ">"] {
        assert!(!text.contains(bad), "raw {bad} in the JSON Lines");
    }
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(events.len(), n_events, "{text}");
    // Oldest first; ids unique.
    let times: Vec<&str> = events
        .iter()
        .map(|e| e["@timestamp"].as_str().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let ids: BTreeSet<&str> = events
        .iter()
        .map(|e| e["event"]["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), n_events);

    // The hostile host's file events carry every path exactly.
    let evil: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["host"]["name"] == EVIL_HOST && e["file"].is_object())
        .collect();
    assert_eq!(evil.len(), EVIL_PATHS.len());
    let mut seen: Vec<Vec<u8>> = evil
        .iter()
        .map(|e| raw_bytes(&e["driftwatch"]["violation"]["path"]))
        .collect();
    seen.sort();
    let mut want: Vec<Vec<u8>> = EVIL_PATHS.iter().map(|p| p.to_vec()).collect();
    want.sort();
    assert_eq!(seen, want);
    for e in &evil {
        let exact = raw_bytes(&e["driftwatch"]["violation"]["path"]);
        let shown = e["file"]["path"].as_str().unwrap();
        match std::str::from_utf8(&exact) {
            Ok(s) => assert_eq!(shown, s),
            Err(_) => {
                assert_eq!(shown, escape::bytes(&exact));
                assert_eq!(e["driftwatch"]["path_not_utf8"], true);
            }
        }
        assert_eq!(e["event"]["kind"], "alert");
        assert_eq!(e["event"]["category"][0], "file");
        assert_eq!(e["event"]["action"], "violation.opened");
        assert_eq!(e["event"]["severity"], 4);
        assert_eq!(e["package"]["name"], EVIL_PACKAGE);
        assert_eq!(e["labels"]["role"], "<script>x</script>|=\\\u{1b}");
        assert_eq!(e["file"]["hash"]["blake3"], "<b>\n|=\\");
    }
    let pkg = events
        .iter()
        .find(|e| e["host"]["name"] == EVIL_HOST && e["event"]["category"][0] == "package")
        .unwrap();
    assert_eq!(pkg["package"]["version"], EVIL_VERSION);
    assert_eq!(pkg["rule"]["name"], "package installed");
    let sec = events
        .iter()
        .find(|e| {
            e["event"]["action"] == "security.impersonation" && e["host"]["name"] == EVIL_HOST
        })
        .unwrap();
    assert!(sec["message"].as_str().unwrap().contains("<img src=x"));
    let audit = events
        .iter()
        .find(|e| e["event"]["action"] == "host.retired")
        .unwrap();
    assert_eq!(audit["host"]["name"], EVIL_HOST);
    assert_eq!(audit["user"]["name"], "token:0123abcd");
    assert_eq!(
        audit["driftwatch"]["audit"]["detail"]["reason"],
        "<script>\n|=\\\u{1b}"
    );
    assert!(audit["driftwatch"]["audit"]["seq"].as_u64().unwrap() > 1);
    // The resolved setuid env on web-1 appears twice: opened and resolved, distinct ids.
    let env: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["file"]["path"] == "/usr/bin/env")
        .collect();
    assert_eq!(env.len(), 2);
    assert_eq!(env[0]["event"]["action"], "violation.opened");
    assert_eq!(env[1]["event"]["action"], "violation.resolved");
    assert_ne!(env[0]["event"]["id"], env[1]["event"]["id"]);

    // Same events, same ids, in another window and another format.
    let (_, _, again) = get_raw(addr, "/api/v1/export?format=jsonl&since=2h").await;
    let again_ids: BTreeSet<String> = String::from_utf8(again)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(!again_ids.is_empty());
    assert!(again_ids.len() < n_events, "2h excludes old-1's event");
    assert!(again_ids.iter().all(|id| ids.contains(id.as_str())));
    let (_, _, cef_body) = get_raw(addr, "/api/v1/export?format=cef&since=30d").await;
    let cef_ids: BTreeSet<String> = String::from_utf8(cef_body)
        .unwrap()
        .lines()
        .map(|l| {
            let (_, ext) = cef::parse(l).unwrap();
            ext.into_iter().find(|(k, _)| k == "externalId").unwrap().1
        })
        .collect();
    assert_eq!(cef_ids, ids.iter().map(|s| s.to_string()).collect());
}

fn field_paths(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                field_paths(v, &p, out);
            }
        }
        _ => {
            out.insert(prefix.to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_jsonl_field_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/exports.md"))
        .unwrap();
    let f = hostile_fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let (_, _, body) = get_raw(addr, "/api/v1/export?format=jsonl&since=30d").await;
    let mut fields = BTreeSet::new();
    for line in String::from_utf8(body).unwrap().lines() {
        field_paths(&serde_json::from_str(line).unwrap(), "", &mut fields);
    }
    assert!(fields.contains("file.hash.blake3") && fields.contains("driftwatch.security.kind"));
    let undocumented: Vec<&String> = fields
        .iter()
        // The API's violation object (docs/api.md) and the hosts' own label names.
        .filter(|p| {
            !p.starts_with("driftwatch.violation.")
                && !p.starts_with("driftwatch.audit.detail.")
                && !p.starts_with("labels.")
        })
        .filter(|p| !doc.contains(&format!("`{p}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "missing from docs/exports.md: {undocumented:?}"
    );
    // CSV columns too.
    for c in driftwatch_collector::export::csv::COLUMNS {
        assert!(
            doc.contains(&format!("`{c}`")),
            "CSV column {c} undocumented"
        );
    }
}

/// An RFC 4180 parser for the test: records of cells, or None when the text is malformed.
fn parse_csv(text: &str) -> Option<Vec<Vec<String>>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut cell = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    cell.push('"');
                }
                '"' => quoted = false,
                c => cell.push(c),
            }
            continue;
        }
        match c {
            '"' if cell.is_empty() => quoted = true,
            '"' => return None,
            ',' => record.push(std::mem::take(&mut cell)),
            '\r' => {
                if chars.next() != Some('\n') {
                    return None;
                }
                record.push(std::mem::take(&mut cell));
                records.push(std::mem::take(&mut record));
            }
            '\n' => return None,
            c => cell.push(c),
        }
    }
    (!quoted && cell.is_empty() && record.is_empty()).then_some(records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_is_one_record_per_row_and_formula_safe() {
    let f = hostile_fleet().await;
    let n_events = all_events(&f).await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let (status, ctype, body) = get_raw(addr, "/api/v1/export?format=csv&since=30d").await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/csv"), "{ctype}");
    assert_terminal_safe("csv", &body);
    let text = String::from_utf8(body).unwrap();
    // One physical line per record: no line break inside any cell.
    assert_eq!(text.matches("\r\n").count(), n_events + 1, "{text}");
    assert_eq!(text.matches('\n').count(), n_events + 1);
    let records = parse_csv(&text).expect("RFC 4180");
    assert_eq!(records[0][0], "timestamp");
    let width = records[0].len();
    for r in &records {
        assert_eq!(r.len(), width, "{r:?}");
        for cell in r {
            assert!(
                !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
                "formula cell {cell:?}"
            );
        }
    }
    let col = |name: &str| records[0].iter().position(|c| c == name).unwrap();
    let evil: Vec<&Vec<String>> = records
        .iter()
        .filter(|r| r[col("host.name")] == format!("'{}", escape::text(EVIL_HOST)))
        .collect();
    // 6 violations, the security event, the audit records of its enrollment and retirement.
    assert_eq!(evil.len(), 9, "{text}");
    let paths: BTreeSet<&str> = evil.iter().map(|r| r[col("file.path")].as_str()).collect();
    for p in EVIL_PATHS {
        assert!(
            paths.contains(escape::bytes(p).as_str()),
            "{p:?} in {paths:?}"
        );
    }
    assert!(
        evil.iter()
            .any(|r| r[col("package.name")] == format!("'{}", escape::text(EVIL_PACKAGE)))
    );
    assert!(
        evil.iter()
            .any(|r| r[col("package.version")] == format!("'{}", escape::text(EVIL_VERSION)))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cef_lines_parse_and_escape_per_spec() {
    let f = hostile_fleet().await;
    let n_events = all_events(&f).await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let (status, _, body) = get_raw(addr, "/api/v1/export?format=cef&since=30d").await;
    assert_eq!(status, 200);
    assert_terminal_safe("cef", &body);
    let text = String::from_utf8(body).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), n_events);
    let mut evil_paths = BTreeSet::new();
    for l in &lines {
        let (header, ext) = cef::parse(l).unwrap_or_else(|| panic!("unparsable CEF: {l}"));
        assert_eq!(&header[..3], ["0", "driftwatch", "driftwatch"]);
        assert!(header[6].parse::<u8>().unwrap() <= 10);
        let ext: HashMap<String, String> = ext.into_iter().collect();
        if ext.get("dhost").map(String::as_str) == Some(escape::text(EVIL_HOST).as_str())
            && let Some(p) = ext.get("filePath")
        {
            evil_paths.insert(p.clone());
            assert_eq!(ext["cs1"], escape::text(EVIL_PACKAGE));
            assert_eq!(ext["fileHash"], escape::text("<b>\n|=\\"));
            assert_eq!(
                ext["cs5"],
                escape::text("role=<script>x</script>|=\\\u{1b}")
            );
        }
    }
    let want: BTreeSet<String> = EVIL_PATHS.iter().map(|p| escape::bytes(p)).collect();
    assert_eq!(evil_paths, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_parameters_are_checked() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    for (target, param) in [
        ("/api/v1/export", "format"),
        ("/api/v1/export?format=xml", "format"),
        ("/api/v1/export?format=csv&since=later", "since"),
        ("/api/v1/export?format=csv&kind=audits", "kind"),
        ("/api/v1/export?format=csv&limit=5", "limit"),
    ] {
        let (status, ctype, body) = get_raw(addr, target).await;
        assert_eq!(status, 400, "{target}");
        assert_eq!(ctype, "application/json");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["parameter"], param, "{target}");
    }
    // An empty window is a header only (CSV) or nothing.
    let (status, _, body) = get_raw(addr, "/api/v1/export?format=csv&since=1s&kind=security").await;
    assert_eq!(status, 200);
    assert_eq!(body.matches_crlf(), 1);
    let (_, _, body) = get_raw(addr, "/api/v1/export?format=jsonl&since=1s&kind=security").await;
    assert!(body.is_empty());
}

trait Crlf {
    fn matches_crlf(&self) -> usize;
}
impl Crlf for Vec<u8> {
    fn matches_crlf(&self) -> usize {
        self.windows(2).filter(|w| w == b"\r\n").count()
    }
}

/// Runs `driftwatch ARGS` against `addr` (off the async workers: the server runs on them).
async fn driftwatch(addr: SocketAddr, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_driftwatch"));
    cmd.args(args)
        .env("DRIFTWATCH_API", format!("http://{addr}"))
        .env("DRIFTWATCH_TOKEN", fleet_fixture::api_token(Role::Auditor));
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn ok(o: &Output) -> &[u8] {
    assert!(
        o.status.success(),
        "exit {:?}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    &o.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_export_paths_are_terminal_safe() {
    let f = hostile_fleet().await;
    let n_events = all_events(&f).await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;

    // The table for people.
    let o = driftwatch(addr, &["export", "--since", "30d"]).await;
    let out = ok(&o).to_vec();
    assert_terminal_safe("export table", &out);
    assert_terminal_safe("export table stderr", &o.stderr);
    let table = String::from_utf8(out).unwrap();
    assert!(table.starts_with("TIME "), "{table}");
    assert_eq!(table.lines().count(), n_events + 1, "{table}");
    assert!(table.contains(&escape::text(EVIL_HOST)), "{table}");

    // Each machine format, to stdout and to a file: the same bytes, safe either way.
    let dir = tempfile::tempdir().unwrap();
    for format in ["jsonl", "csv", "cef"] {
        let o = driftwatch(addr, &["export", "--format", format, "--since", "30d"]).await;
        let out = ok(&o).to_vec();
        assert_terminal_safe(format, &out);
        let file = dir.path().join(format!("events.{format}"));
        let o = driftwatch(
            addr,
            &[
                "export",
                "--format",
                format,
                "--since",
                "30d",
                "--out",
                file.to_str().unwrap(),
            ],
        )
        .await;
        assert!(ok(&o).is_empty());
        assert_terminal_safe("--out stderr", &o.stderr);
        assert_eq!(std::fs::read(&file).unwrap(), out, "{format}");
    }
    // No partial file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);

    // Refusals are errors (exit 2) with a message, never a half-written file.
    let bad = dir.path().join("bad.csv");
    let o = driftwatch(
        addr,
        &[
            "export",
            "--format",
            "csv",
            "--since",
            "soon",
            "--out",
            bad.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("since"));
    assert!(!bad.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    let o = driftwatch(addr, &["hosts", "--format", "csv"]).await;
    assert_eq!(o.status.code(), Some(2));
    let o = driftwatch(addr, &["export", "--format", "json"]).await;
    assert_eq!(o.status.code(), Some(2));
}

// --- the syslog forwarder ------------------------------------------------------------------

/// A receiver on loopback: every message it gets, in order.
struct Receiver {
    addr: SocketAddr,
    messages: mpsc::UnboundedReceiver<Vec<u8>>,
    _task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn udp() -> Receiver {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let (tx, messages) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 70_000];
            while let Ok(n) = sock.recv(&mut buf).await {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Receiver {
            addr,
            messages,
            _task: task,
        }
    }

    /// TCP (octet counting), optionally under TLS; one connection at a time.
    async fn stream(tls: Option<tokio_rustls::TlsAcceptor>, addr: Option<SocketAddr>) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr.unwrap_or(([127, 0, 0, 1], 0).into()))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, messages) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let tx = tx.clone();
                match &tls {
                    None => read_framed(BufReader::new(sock), tx).await,
                    Some(acceptor) => {
                        let Ok(s) = acceptor.accept(sock).await else {
                            continue;
                        };
                        read_framed(BufReader::new(s), tx).await;
                    }
                }
            }
        });
        Receiver {
            addr,
            messages,
            _task: task,
        }
    }

    /// The next `n` messages, within `WAIT`.
    async fn take(&mut self, n: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(WAIT, self.messages.recv()).await {
                Ok(Some(m)) => out.push(m),
                _ => panic!("only {} of {n} messages arrived", out.len()),
            }
        }
        out
    }

    /// Nothing more arrives within `d`.
    async fn quiet_for(&mut self, d: Duration) {
        if let Ok(Some(m)) = tokio::time::timeout(d, self.messages.recv()).await {
            panic!("unexpected message {}", String::from_utf8_lossy(&m));
        }
    }
}

/// RFC 6587 octet counting: `LEN SP MSG`, strictly.
async fn read_framed<R: tokio::io::AsyncRead + Unpin>(
    mut r: BufReader<R>,
    tx: mpsc::UnboundedSender<Vec<u8>>,
) {
    loop {
        let mut len = Vec::new();
        match r.read_until(b' ', &mut len).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let n: usize = std::str::from_utf8(&len[..len.len() - 1])
            .expect("ASCII length")
            .parse()
            .expect("octet count");
        let mut msg = vec![0u8; n];
        if r.read_exact(&mut msg).await.is_err() {
            return;
        }
        if tx.send(msg).is_err() {
            return;
        }
    }
}

fn settings(addr: SocketAddr, transport: Transport) -> SyslogSettings {
    SyslogSettings {
        address: addr.to_string(),
        transport,
        facility: 10,
        app_name: "driftwatch".into(),
        max_message_bytes: 2048,
        delay: Duration::ZERO,
        max_backlog: Duration::from_secs(30 * 86_400),
        poll_interval: Duration::from_millis(50),
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<driftwatch_collector::export::syslog::ForwarderStats>,
}

fn start(store: Arc<dyn Storage>, s: SyslogSettings) -> Running {
    let f = Forwarder::new(store, s).unwrap();
    let stats = f.stats();
    let (stop, rx) = watch::channel(false);
    Running {
        stop,
        task: f.spawn(rx),
        stats,
    }
}

impl Running {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("forwarder stops in time")
            .unwrap();
    }
}

/// Checks one RFC 5424 message and returns its CEF extension.
fn check_message(m: &[u8], max: usize) -> HashMap<String, String> {
    assert!(m.len() <= max, "{} > {max}", m.len());
    let text = std::str::from_utf8(m).unwrap();
    assert_terminal_safe("syslog message", m);
    assert!(!text.contains('\n') && !text.contains('\r'));
    let (pri, rest) = text[1..].split_once(">1 ").unwrap();
    let pri: u16 = pri.parse().unwrap();
    assert_eq!(pri / 8, 10, "facility authpriv");
    let parts: Vec<&str> = rest.splitn(6, ' ').collect();
    assert_eq!(parts.len(), 6, "{text}");
    assert!(humantime::parse_rfc3339(parts[0]).is_ok(), "{text}");
    assert_eq!(parts[2], "driftwatch");
    assert!(parts[5].starts_with("- CEF:"), "{text}");
    let cef_line = rest
        .split_once(" - CEF:")
        .map(|(_, c)| format!("CEF:{c}"))
        .unwrap();
    let (_, ext) = cef::parse(&cef_line).unwrap_or_else(|| panic!("bad CEF {cef_line}"));
    ext.into_iter().collect()
}

async fn all_ids(store: &Arc<dyn Storage>) -> BTreeSet<String> {
    let hosts = driftwatch_collector::export::host_infos(store.as_ref())
        .await
        .unwrap();
    let mut r = driftwatch_collector::export::EventReader::new(
        driftwatch_collector::export::Position::before(0),
        i64::MAX,
        driftwatch_collector::export::Kinds::ALL,
        100,
        hosts,
    );
    r.next_batch(store.as_ref(), 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

fn ids_of(msgs: &[Vec<u8>], max: usize) -> Vec<String> {
    msgs.iter()
        .map(|m| check_message(m, max)["externalId"].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_over_udp_one_datagram_each_with_a_size_cap() {
    let f = hostile_fleet().await;
    let n_events = all_events(&f).await;
    let mut rx = Receiver::udp().await;
    let mut s = settings(rx.addr, Transport::Udp);
    s.max_message_bytes = 480;
    let run = start(f.store.clone(), s);
    let msgs = rx.take(n_events).await;
    let ids = ids_of(&msgs, 480);
    let unique: BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(unique, all_ids(&f.store).await);
    // The hostile events are long: cut, and marked.
    let cut: Vec<HashMap<String, String>> = msgs
        .iter()
        .map(|m| check_message(m, 480))
        .filter(|e| e.contains_key("cn1"))
        .collect();
    assert!(!cut.is_empty());
    assert!(cut.iter().all(|e| e["cn1Label"] == "truncatedFrom"));
    rx.quiet_for(Duration::from_millis(300)).await;
    let stats = run.stats.clone();
    run.stop().await;
    assert_eq!(stats.truncated.load(Ordering::Relaxed), cut.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_restart_resumes_without_loss_or_duplicates() {
    let f = hostile_fleet().await;
    let n_events = all_events(&f).await;
    let mut rx = Receiver::stream(None, None).await;
    let run = start(f.store.clone(), settings(rx.addr, Transport::Tcp));
    let first = ids_of(&rx.take(n_events).await, 2048);
    run.stop().await;
    assert!(f.store.export_cursor(CURSOR_NAME).await.unwrap().is_some());

    // New events while it is down (each refusal is a security event and an audit record),
    // then a restart: exactly those arrive.
    for i in 0..3 {
        let at = fleet_fixture::now_ms() - 1000 + i;
        f.store
            .record_security_event(
                SecurityEvent {
                    at_ms: at,
                    kind: "enrollment-token-refused".into(),
                    peer_host_id: None,
                    detail: format!("while down {i}"),
                },
                AuditEntry::new(
                    at,
                    "collector",
                    "security.enrollment_token_refused",
                    "",
                    serde_json::json!({}),
                ),
            )
            .await
            .unwrap();
    }
    let run = start(f.store.clone(), settings(rx.addr, Transport::Tcp));
    let second = ids_of(&rx.take(6).await, 2048);
    rx.quiet_for(Duration::from_millis(500)).await;
    run.stop().await;
    let mut all: Vec<String> = first.iter().chain(&second).cloned().collect();
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "a duplicate was sent");
    assert_eq!(
        all.into_iter().collect::<BTreeSet<_>>(),
        all_ids(&f.store).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_receiver_away_then_back_gets_everything() {
    let f = hostile_fleet().await;
    let n_events = all_events(&f).await;
    // Reserve a port, then close it: the forwarder starts against nobody.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let run = start(f.store.clone(), settings(addr, Transport::Tcp));
    tokio::time::timeout(WAIT, async {
        while run.stats.failures.load(Ordering::Relaxed) < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("connection failures are counted");
    assert_eq!(run.stats.sent.load(Ordering::Relaxed), 0);
    assert!(f.store.export_cursor(CURSOR_NAME).await.unwrap().is_none());
    let mut rx = Receiver::stream(None, Some(addr)).await;
    let ids: BTreeSet<String> = ids_of(&rx.take(n_events).await, 2048).into_iter().collect();
    assert_eq!(ids, all_ids(&f.store).await);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_past_the_backlog_are_dropped_counted_and_announced() {
    let f = hostile_fleet().await;
    let n_events = all_events(&f).await;
    let mut rx = Receiver::stream(None, None).await;
    let mut s = settings(rx.addr, Transport::Tcp);
    // Beyond a 2-day backlog: old-1's drift (3 days ago) and the first enrollments (10 days
    // ago). A first start would begin a backlog back; a forwarder that was away since before
    // it resumes from its cursor and meets the old events.
    s.max_backlog = Duration::from_secs(2 * 86_400);
    let dropped = n_events - expected_events(f.store.as_ref(), f.now - 2 * DAY).await;
    assert!(dropped >= 2, "{dropped}");
    f.store
        .save_export_cursor(
            CURSOR_NAME,
            ExportCursor {
                position: driftwatch_collector::export::Position::before(0).to_string(),
                saved_ms: 0,
            },
        )
        .await
        .unwrap();
    let run = start(f.store.clone(), s);
    // The notice, then every event within the backlog.
    let msgs = rx.take(n_events - dropped + 1).await;
    let first = check_message(&msgs[0], 2048);
    assert_eq!(first["cnt"], dropped.to_string(), "{first:?}");
    assert!(first["msg"].contains("max_backlog"));
    let start_ms: i64 = first["start"].parse().unwrap();
    let end_ms: i64 = first["end"].parse().unwrap();
    assert!((f.now - 10 * DAY - start_ms).abs() < HOUR, "{first:?}");
    assert!((f.now - 3 * DAY - end_ms).abs() < HOUR, "{first:?}");
    rx.quiet_for(Duration::from_millis(300)).await;
    let stats = run.stats.clone();
    // Counted once the batch went out (after the receiver had it): read after the stop.
    run.stop().await;
    assert_eq!(stats.dropped.load(Ordering::Relaxed), dropped as u64);
}

/// A CA and a server certificate for `localhost` (rcgen), as the receiver's TLS acceptor, and
/// the CA's PEM in a file for `ca_file`.
fn tls_receiver_identity(dir: &std::path::Path) -> (tokio_rustls::TlsAcceptor, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca_file = dir.join("siem-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_over_tls_and_refuses_a_wrong_ca() {
    let f = hostile_fleet().await;
    let n_events = all_events(&f).await;
    let dir = tempfile::tempdir().unwrap();
    let (acceptor, ca_file) = tls_receiver_identity(dir.path());
    let mut rx = Receiver::stream(Some(acceptor), None).await;
    let addr: SocketAddr = rx.addr;
    let tls = |ca_file: std::path::PathBuf| Transport::Tls {
        ca_file,
        server_name: "localhost".into(),
    };
    // A CA the receiver's certificate does not chain to: nothing is sent, failures counted.
    let other = tempfile::tempdir().unwrap();
    let (_, wrong_ca) = tls_receiver_identity(other.path());
    let run = start(f.store.clone(), settings(addr, tls(wrong_ca)));
    tokio::time::timeout(WAIT, async {
        while run.stats.failures.load(Ordering::Relaxed) < 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the handshake fails");
    run.stop().await;
    assert!(f.store.export_cursor(CURSOR_NAME).await.unwrap().is_none());
    rx.quiet_for(Duration::from_millis(200)).await;

    let run = start(f.store.clone(), settings(addr, tls(ca_file)));
    let ids: BTreeSet<String> = ids_of(&rx.take(n_events).await, 2048).into_iter().collect();
    assert_eq!(ids, all_ids(&f.store).await);
    run.stop().await;

    // A CA file that is not one stops the start.
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let err = Forwarder::new(f.store.clone(), settings(addr, tls(junk))).unwrap_err();
    assert!(err.to_string().contains("junk.pem"), "{err}");
}
