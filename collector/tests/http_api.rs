//! The HTTP API against a real SQLite store populated through the `Storage` trait, served on
//! 127.0.0.1:0 by `http::serve` and read with plain HTTP requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet_fixture;

use std::time::Duration;

use base64::Engine;
use driftwatch_collector::http::ApiConfig;
use driftwatch_collector::storage::Role;
use fleet_fixture::{BINARY_PATH, HOSTILE_PATH, api_token, fleet, get, request, serve};
use serde_json::{Value, json};

fn hosts_by_id(v: &Value) -> std::collections::BTreeMap<String, Value> {
    v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["host_id"].as_str().unwrap().to_string(), h.clone()))
        .collect()
}

/// Paths of a violation list as raw bytes (decoding both raw-bytes forms).
fn paths(v: &Value) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = v["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            if let Some(t) = v["path"]["text"].as_str() {
                t.as_bytes().to_vec()
            } else if let Some(b) = v["path"]["bytes"].as_str() {
                base64::engine::general_purpose::STANDARD.decode(b).unwrap()
            } else {
                format!("package {}", v["package"]["name"].as_str().unwrap()).into_bytes()
            }
        })
        .collect();
    out.sort();
    out
}

fn hosts_of(v: &Value) -> Vec<String> {
    let mut h: Vec<String> = v["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["host_id"].as_str().unwrap().to_string())
        .collect();
    h.sort();
    h.dedup();
    h
}

fn assert_bad_parameter(resp: (u16, Value), parameter: &str) {
    let (status, body) = resp;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "bad_parameter", "{body}");
    assert_eq!(body["error"]["parameter"], parameter, "{body}");
    assert!(!body["error"]["message"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_list_with_derived_states() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let (status, body) = get(addr, "/api/v1/hosts").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["schema"], "driftwatch.api.v1");
    assert_eq!(body["silent_after_seconds"], 90);
    let hosts = hosts_by_id(&body);
    let states: Vec<(&str, &str)> = hosts
        .iter()
        .map(|(id, h)| (id.as_str(), h["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [
            ("db-1", "clean"),
            ("gone-1", "revoked"),
            ("inc-1", "incomplete"),
            ("new-1", "never-reported"),
            ("old-1", "silent"),
            ("web-1", "drifted"),
        ]
    );

    let web = &hosts["web-1"];
    assert_eq!(web["labels"], json!({"role": "web", "zone": "a"}));
    assert_eq!(web["image"], json!({"id": "web", "version": "2026.11.1"}));
    assert_eq!(web["baseline_root"], "ab".repeat(32));
    assert_eq!(web["agent_version"], "0.1.0");
    // Open: sshd_config (high), hostile (medium), binary (low), curl (medium); env resolved.
    assert_eq!(
        web["open"],
        json!({"total": 4, "critical": 0, "high": 1, "medium": 2, "low": 1, "info": 0})
    );
    assert_eq!(web["package_drift"], 1);
    assert_eq!(web["revoked"], false);
    assert_eq!(web["incomplete"], false);
    assert_eq!(web["stream"]["last_seq"], 2);
    for t in ["enrolled_at", "last_seen", "last_scan", "last_report"] {
        let s = web[t].as_str().unwrap();
        assert!(
            s.ends_with('Z') && humantime::parse_rfc3339(s).is_ok(),
            "{t}: {s}"
        );
    }

    let inc = &hosts["inc-1"];
    assert_eq!(inc["incomplete"], true);
    assert_eq!(inc["incomplete_reason"], "spool overflow");
    assert_eq!(inc["lost_reports"], 3);

    let new = &hosts["new-1"];
    assert!(new.get("last_report").is_none() && new.get("baseline_root").is_none());
    assert_eq!(new["image"], json!({"id": "", "version": ""}));

    // Filter by state.
    let (status, body) = get(addr, "/api/v1/hosts?state=drifted").await;
    assert_eq!(status, 200);
    assert_eq!(hosts_by_id(&body).keys().collect::<Vec<_>>(), ["web-1"]);
    assert_bad_parameter(get(addr, "/api/v1/hosts?state=dirty").await, "state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_threshold_comes_from_the_config() {
    let f = fleet().await;
    let config = ApiConfig {
        silent_after: Duration::from_secs(2),
        ..ApiConfig::default()
    };
    let (addr, _stop) = serve(f.store.clone(), config).await;
    let (_, body) = get(addr, "/api/v1/hosts?state=silent").await;
    assert_eq!(body["silent_after_seconds"], 2);
    // db-1 (5 s) and web-1 (10 s) are now silent; inc-1 (1 s ago) only if the test was slow.
    let silent: Vec<String> = hosts_by_id(&body).into_keys().collect();
    for h in ["db-1", "old-1", "web-1"] {
        assert!(silent.contains(&h.to_string()), "{silent:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_and_unknown_hosts() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let (status, body) = get(addr, "/api/v1/hosts/web-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["host"]["host_id"], "web-1");
    assert_eq!(body["host"]["state"], "drifted");

    for target in [
        "/api/v1/hosts/nope",
        "/api/v1/hosts/nope/violations",
        "/api/v1/hosts/nope/violations?include_resolved=true",
    ] {
        let (status, body) = get(addr, target).await;
        assert_eq!(status, 404, "{target}: {body}");
        assert_eq!(body["error"]["code"], "not_found");
        assert!(body["error"]["message"].as_str().unwrap().contains("nope"));
    }
    let (status, body) = get(addr, "/api/v2/hosts").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    assert_bad_parameter(get(addr, "/api/v1/hosts/web-1?verbose=1").await, "verbose");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_violations_with_before_after_and_raw_paths() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let (status, body) = get(addr, "/api/v1/hosts/web-1/violations").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["truncated"], false);
    assert_eq!(
        paths(&body),
        [
            b"/etc/ssh/sshd_config".to_vec(),
            BINARY_PATH.to_vec(),
            HOSTILE_PATH.to_vec(),
            b"package curl".to_vec(),
        ]
    );
    let vs = body["violations"].as_array().unwrap();
    let sshd = vs
        .iter()
        .find(|v| v["path"]["text"] == "/etc/ssh/sshd_config")
        .unwrap();
    assert_eq!(sshd["item"], "file");
    assert_eq!(sshd["kind"], "modified");
    assert_eq!(sshd["severity"], "high");
    assert_eq!(
        sshd["changes"],
        json!([
            {"attribute": "mode", "before": "0644 (rw-r--r--)", "after": "0666 (rw-rw-rw-)"},
            {"attribute": "content", "before": "blake3:aaaa", "after": "blake3:bbbb"},
        ])
    );
    assert_eq!(sshd["packages"], json!(["openssh-server:amd64"]));
    assert_eq!(sshd["class"], "unexplained");
    assert_eq!(sshd["config"], true);
    assert_eq!(sshd["baseline_type"], "file");
    assert_eq!(sshd["resolved"], false);
    assert!(sshd.get("resolved_at").is_none());
    let first = humantime::parse_rfc3339(sshd["first_seen"].as_str().unwrap()).unwrap();
    let last = humantime::parse_rfc3339(sshd["last_seen"].as_str().unwrap()).unwrap();
    assert!(first <= last);

    // The non-UTF-8 path is base64; the hostile one is JSON-escaped text, byte for byte.
    assert!(vs.iter().any(|v| v["path"]
        == json!({"bytes": base64::engine::general_purpose::STANDARD.encode(BINARY_PATH)})));
    assert!(
        vs.iter()
            .any(|v| v["path"] == json!({"text": std::str::from_utf8(HOSTILE_PATH).unwrap()}))
    );

    let curl = vs.iter().find(|v| v["item"] == "package").unwrap();
    assert_eq!(curl["kind"], "package_installed");
    assert_eq!(
        curl["package"],
        json!({"name": "curl", "arch": "amd64",
               "after": {"version": "8.5.0-2", "state": "installed"}})
    );
    assert!(curl.get("path").is_none());

    // include_resolved adds /usr/bin/env with its resolution time.
    let (_, body) = get(addr, "/api/v1/hosts/web-1/violations?include_resolved=true").await;
    let env = body["violations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["path"]["text"] == "/usr/bin/env")
        .expect("resolved violation listed");
    assert_eq!(env["resolved"], true);
    assert_eq!(env["severity"], "critical");
    assert!(humantime::parse_rfc3339(env["resolved_at"].as_str().unwrap()).is_ok());

    // limit and truncation.
    let (_, body) = get(addr, "/api/v1/hosts/web-1/violations?limit=2").await;
    assert_eq!(body["violations"].as_array().unwrap().len(), 2);
    assert_eq!(
        (body["limit"].as_u64(), body["truncated"].as_bool()),
        (Some(2), Some(true))
    );
    assert_bad_parameter(
        get(
            addr,
            "/api/v1/hosts/web-1/violations?include_resolved=maybe",
        )
        .await,
        "include_resolved",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_search() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let search = |q: &str| {
        let q = q.to_string();
        async move { search_at(addr, &q).await }
    };

    // Which hosts changed /etc/ssh/sshd_config?
    let body = search("path=/etc/ssh/sshd_config").await;
    assert_eq!(hosts_of(&body), ["old-1", "web-1"]);
    let body = search("path=%2Fetc%2Fssh%2F**").await;
    assert_eq!(hosts_of(&body), ["old-1", "web-1"]);
    // `*` stays within one directory.
    assert_eq!(hosts_of(&search("path=/etc/*").await), Vec::<String>::new());
    // A glob matches non-UTF-8 paths too.
    assert_eq!(paths(&search("path=/srv/*").await), [BINARY_PATH.to_vec()]);

    // Time: within the last 24 h leaves out old-1 (3 days ago).
    assert_eq!(
        hosts_of(&search("path=/etc/ssh/sshd_config&since=24h").await),
        ["web-1"]
    );
    assert_eq!(
        hosts_of(&search("path=/etc/ssh/sshd_config&until=2d").await),
        ["old-1"]
    );
    let since = driftwatch_collector::api::rfc3339_ms(f.now - 26 * fleet_fixture::HOUR);
    assert_eq!(
        hosts_of(&search(&format!("path=/etc/ssh/sshd_config&since={since}")).await),
        ["web-1"]
    );

    // Kinds by name, file and package kinds kept apart.
    let added = search("kind=added").await;
    assert_eq!(paths(&added), [BINARY_PATH.to_vec(), HOSTILE_PATH.to_vec()]);
    let installed = search("kind=package_installed").await;
    assert_eq!(paths(&installed), [b"package curl".to_vec()]);
    assert_eq!(
        search("kind=modified").await["violations"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        search("kind=modified&include_resolved=true").await["violations"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // Package: the owning package of a file, or the drifted package.
    assert_eq!(
        hosts_of(&search("package=openssh-server").await),
        ["old-1", "web-1"]
    );
    assert_eq!(
        paths(&search("package=curl").await),
        [b"package curl".to_vec()]
    );

    // Image and host.
    assert_eq!(hosts_of(&search("image=db").await), Vec::<String>::new());
    assert_eq!(hosts_of(&search("image=web").await), ["old-1", "web-1"]);
    assert_eq!(hosts_of(&search("host=old-1").await), ["old-1"]);

    // Limit.
    let body = search("limit=1").await;
    assert_eq!(body["violations"].as_array().unwrap().len(), 1);
    assert_eq!(body["truncated"], true);
    assert_eq!(search("").await["limit"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_search_parameters_are_named() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    for (q, param) in [
        ("kind=changed", "kind"),
        ("path=/etc/%5Bssh", "path"),
        ("path=etc", "path"),
        ("since=yesterday", "since"),
        ("until=2026-13-01", "until"),
        ("since=1h&until=2h", "until"),
        ("limit=0", "limit"),
        ("limit=10001", "limit"),
        ("include_resolved=1", "include_resolved"),
        ("host=a&host=b", "host"),
        ("paht=/etc", "paht"),
        ("image=", "image"),
    ] {
        assert_bad_parameter(get(addr, &format!("/api/v1/violations?{q}")).await, param);
    }
    assert_bad_parameter(get(addr, "/api/v1/security-events?since=x").await, "since");
    assert_bad_parameter(get(addr, "/api/v1/security-events?limit=-3").await, "limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_events_and_health() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let (status, body) = get(addr, "/api/v1/security-events").await;
    assert_eq!(status, 200, "{body}");
    let events = body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["kind"], "impersonation");
    assert_eq!(events[0]["peer_host_id"], "web-1");
    let (_, body) = get(addr, "/api/v1/security-events?since=10m").await;
    assert!(body["events"].as_array().unwrap().is_empty());

    let (status, body) = get(addr, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"status": "ok", "storage": "sqlite"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_non_loopback_listener_and_stops_on_shutdown() {
    let f = fleet().await;
    // 0.0.0.0 is refused before anything is served.
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let err = driftwatch_collector::http::serve(
        listener,
        f.store.clone(),
        ApiConfig::default(),
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("not a loopback address"), "{err}");

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(driftwatch_collector::http::serve(
        listener,
        f.store.clone(),
        ApiConfig::default(),
        async move {
            let _ = rx.await;
        },
    ));
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve returns after shutdown")
        .unwrap()
        .unwrap();
}

/// `GET /api/v1/violations?{q}`, which must succeed.
async fn search_at(addr: std::net::SocketAddr, q: &str) -> Value {
    let (status, body) = get(addr, &format!("/api/v1/violations?{q}")).await;
    assert_eq!(status, 200, "{q}: {body}");
    body
}

/// Dotted field paths of a JSON value (`hosts[].open.critical`); maps with free keys
/// (`labels`) stop at their own name.
fn field_paths(v: &Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                out.insert(p.clone());
                if k != "labels" {
                    field_paths(child, &p, out);
                }
            }
        }
        Value::Array(a) => {
            for child in a {
                field_paths(child, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_field_is_documented() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md")).unwrap();
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let mut fields = std::collections::BTreeSet::new();
    for target in [
        "/api/v1/hosts",
        "/api/v1/hosts/web-1",
        "/api/v1/hosts/web-1/violations?include_resolved=true",
        "/api/v1/violations?include_resolved=true",
        "/api/v1/security-events",
        "/api/v1/violations?kind=nope",
        "/healthz",
    ] {
        let (_, body) = get(addr, target).await;
        field_paths(&body, "", &mut fields);
    }
    // The admin endpoints, each answer's fields.
    let admin = api_token(Role::Admin);
    let created = request(
        addr,
        "POST",
        "/api/v1/tokens",
        Some(&admin),
        Some(r#"{"name":"doc","role":"auditor","ttl":"1h"}"#),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["token"]["id"].as_str().unwrap().to_string();
    for (method, target, body) in [
        ("GET", "/api/v1/audit".to_string(), None),
        (
            "POST",
            "/api/v1/enrollment-tokens".into(),
            Some(r#"{"host_pattern":"web-*"}"#),
        ),
        ("GET", "/api/v1/enrollment-tokens".into(), None),
        ("GET", "/api/v1/tokens".into(), None),
        ("DELETE", format!("/api/v1/tokens/{id}"), None),
        ("GET", "/api/v1/tokens".into(), None),
    ] {
        let a = request(addr, method, &target, Some(&admin), body).await;
        assert!(a.status < 300, "{method} {target}: {}", a.body);
        field_paths(&a.body, "", &mut fields);
    }
    field_paths(&created.body, "", &mut fields);
    let refused = request(addr, "GET", "/api/v1/hosts", None, None).await;
    field_paths(&refused.body, "", &mut fields);
    let undocumented: Vec<String> = fields
        .into_iter()
        // `host` of /hosts/{id} is documented as `hosts[]`.
        .map(|p| match p.strip_prefix("host.") {
            Some(rest) => format!("hosts[].{rest}"),
            None => p,
        })
        .filter(|p| !doc.contains(&format!("`{p}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "fields missing from docs/api.md: {undocumented:?}"
    );
}
