//! Access control of the HTTP API over a real SQLite store: every route of the router with no
//! token, with each role below the one it needs and with the one it needs; the token
//! endpoints; the audit endpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet_fixture;
#[path = "common/routes.rs"]
mod routes;

use std::collections::BTreeSet;

use driftwatch_collector::http::ApiConfig;
use driftwatch_collector::storage::{ApiToken, AuditEntry, Role, Storage};
use fleet_fixture::{api_token, fleet, now_ms, request, serve};
use routes::{METHODS, ROUTES, router_paths};

/// A fresh admin-made token to revoke, so every DELETE has something to act on.
async fn fresh_token(store: &dyn Storage, n: u32) -> String {
    let id = format!("{n:08x}");
    store
        .create_api_token(
            ApiToken {
                id: id.clone(),
                name: format!("victim {n}"),
                role: Role::Auditor,
                secret_sha256: [n as u8; 32],
                created_ms: now_ms(),
                expires_ms: None,
                revoked_ms: None,
                last_used_ms: None,
                created_by: "local:test".into(),
            },
            AuditEntry::new(
                now_ms(),
                "local:test",
                "api_token.created",
                &id,
                serde_json::json!({}),
            ),
        )
        .await
        .unwrap();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_is_in_the_table() {
    let f = fleet().await;
    let served = router_paths(f.store.clone());
    let listed: BTreeSet<String> = ROUTES.iter().map(|r| r.1.to_string()).collect();
    assert!(
        served.len() >= 9,
        "the router's Debug form changed: {served:?}"
    );
    assert_eq!(
        served, listed,
        "routes served but not in ROUTES (give them a role) or listed but gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_its_role() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let mut n = 0x1000;
    for &(method, path, target, role, body, ok) in ROUTES {
        let mut target = target.to_string();
        let mut fresh = || {
            n += 1;
            n
        };
        if target.contains("{fresh}") {
            target = target.replace("{fresh}", &fresh_token(f.store.as_ref(), fresh()).await);
        }
        let what = format!("{method} {path}");
        // No token.
        let a = request(addr, method, &target, None, body).await;
        match role {
            None => assert_eq!(a.status, ok, "{what}: {}", a.body),
            Some(_) => {
                assert_eq!(a.status, 401, "{what} without a token: {}", a.body);
                assert_eq!(a.body["error"]["code"], "unauthenticated", "{what}");
                assert_eq!(
                    a.header("www-authenticate"),
                    Some("Bearer realm=\"driftwatch\""),
                    "{what}"
                );
            }
        }
        let Some(needed) = role else { continue };
        for r in Role::ALL {
            if target.contains("/api/v1/tokens/") && r.includes(needed) {
                // Each successful DELETE revokes: give every role its own victim.
                target = format!(
                    "/api/v1/tokens/{}",
                    fresh_token(f.store.as_ref(), fresh()).await
                );
            }
            let a = request(addr, method, &target, Some(&api_token(r)), body).await;
            if r.includes(needed) {
                assert_eq!(a.status, ok, "{what} as {r}: {}", a.body);
            } else {
                assert_eq!(a.status, 403, "{what} as {r}: {}", a.body);
                assert_eq!(a.body["error"]["code"], "forbidden");
                let msg = a.body["error"]["message"].as_str().unwrap();
                assert!(msg.contains(&format!("needs the {needed} role")), "{msg}");
            }
        }
    }
    // Methods a path does not route are 405 for an admin (so a new method on an old path
    // shows up here), and 401 without a token.
    for path in ROUTES.iter().map(|r| r.2).collect::<BTreeSet<_>>() {
        let target = path.replace("{fresh}", "ffffffff");
        for m in METHODS {
            if ROUTES.iter().any(|r| r.2 == path && r.0 == m) {
                continue;
            }
            let a = request(addr, m, &target, Some(&api_token(Role::Admin)), Some("{}")).await;
            assert_eq!(a.status, 405, "{m} {target}: {}", a.body);
            assert_eq!(a.body["error"]["code"], "method_not_allowed");
            if path != "/healthz" {
                let a = request(addr, m, &target, None, Some("{}")).await;
                assert_eq!(a.status, 401, "{m} {target} without a token");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens_and_headers() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let get = |token: Option<String>| async move {
        request(addr, "GET", "/api/v1/hosts", token.as_deref(), None).await
    };
    // Unknown paths need a token too: nothing is learned without one.
    let a = request(addr, "GET", "/api/v1/nothing-here", None, None).await;
    assert_eq!(a.status, 401);
    let a = request(
        addr,
        "GET",
        "/api/v1/nothing-here",
        Some(&api_token(Role::Auditor)),
        None,
    )
    .await;
    assert_eq!(a.status, 404);
    // Malformed: not Bearer, not a dwa_ token, an enrollment token.
    let enrollment = driftwatch_collector::token::Token::generate(
        driftwatch_collector::token::TokenKind::Enrollment,
    )
    .unwrap();
    for bad in [
        "dwa_nothex00_xyz".to_string(),
        enrollment.reveal().to_string(),
        format!("{}x", api_token(Role::Admin)),
    ] {
        let a = get(Some(bad.clone())).await;
        assert_eq!(a.status, 401, "{bad}");
        assert_eq!(
            a.header("www-authenticate"),
            Some("Bearer realm=\"driftwatch\", error=\"invalid_token\"")
        );
        let msg = a.body["error"]["message"].as_str().unwrap();
        assert!(msg.contains("must be \"Bearer dwa_"), "{msg}");
        assert!(!msg.contains(&bad), "the secret is echoed: {msg}");
    }
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        b"GET /api/v1/hosts HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Basic YTpi\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    // Two Authorization headers.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let t = api_token(Role::Admin);
    s.write_all(
        format!(
            "GET /api/v1/hosts HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {t}\r\nAuthorization: Bearer {t}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    // Well-formed but unknown.
    let unknown =
        driftwatch_collector::token::Token::generate(driftwatch_collector::token::TokenKind::Api)
            .unwrap();
    let a = get(Some(unknown.reveal().into())).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.body["error"]["message"], "unknown API token");
    // Expired and revoked.
    let now = now_ms();
    let expired = driftwatch_collector::token::Token::parse(
        driftwatch_collector::token::TokenKind::Api,
        &format!("dwa_0000e001_{}", "A".repeat(43)),
    )
    .unwrap();
    f.store
        .create_api_token(
            ApiToken {
                id: "0000e001".into(),
                name: "old".into(),
                role: Role::Admin,
                secret_sha256: expired.sha256(),
                created_ms: now - 10_000,
                expires_ms: Some(now - 1),
                revoked_ms: None,
                last_used_ms: None,
                created_by: "local:test".into(),
            },
            AuditEntry::new(
                now,
                "local:test",
                "api_token.created",
                "0000e001",
                serde_json::json!({}),
            ),
        )
        .await
        .unwrap();
    let a = get(Some(expired.reveal().into())).await;
    assert_eq!(a.status, 401);
    assert_eq!(a.body["error"]["message"], "API token 0000e001 has expired");
    let admin = api_token(Role::Admin);
    let a = request(
        addr,
        "DELETE",
        "/api/v1/tokens/000000b2",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["token"]["state"], "revoked");
    let a = get(Some(api_token(Role::Operator))).await;
    assert_eq!(a.status, 401);
    assert_eq!(
        a.body["error"]["message"],
        "API token 000000b2 has been revoked"
    );
    let a = request(
        addr,
        "DELETE",
        "/api/v1/tokens/000000b2",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(a.status, 409, "{}", a.body);
    let a = request(
        addr,
        "DELETE",
        "/api/v1/tokens/12345678",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(a.status, 404, "{}", a.body);
    // /healthz stays open, even with a bad token.
    let a = request(addr, "GET", "/healthz", Some("garbage"), None).await;
    assert_eq!(a.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_over_the_api_are_audited_and_work() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let admin = api_token(Role::Admin);
    let a = request(
        addr,
        "POST",
        "/api/v1/tokens",
        Some(&admin),
        Some(r#"{"name":"siem export","role":"operator","ttl":"30d"}"#),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let secret = a.body["secret"].as_str().unwrap().to_string();
    let id = a.body["token"]["id"].as_str().unwrap().to_string();
    assert!(secret.starts_with(&format!("dwa_{id}_")));
    assert_eq!(a.body["token"]["role"], "operator");
    assert_eq!(a.body["token"]["created_by"], "token:000000c3");
    assert!(a.body["token"]["expires_at"].is_string());
    // The new token works, and its use is recorded (at most once a minute).
    let a = request(addr, "GET", "/api/v1/hosts", Some(&secret), None).await;
    assert_eq!(a.status, 200);
    let mut used = false;
    for _ in 0..50 {
        let t = f.store.list_api_tokens().await.unwrap();
        if t.iter().any(|t| t.id == id && t.last_used_ms.is_some()) {
            used = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(used, "last_used was not written");
    // Listings never show a secret.
    let a = request(addr, "GET", "/api/v1/tokens", Some(&admin), None).await;
    assert_eq!(a.status, 200);
    let text = a.body.to_string();
    assert!(!text.contains(&secret[13..]));
    assert!(!text.contains("secret"));
    // Refused bodies: unknown role, unknown field, bad ttl, hostile name, no JSON.
    for body in [
        r#"{"name":"x","role":"root"}"#,
        r#"{"name":"x","role":"admin","scope":"all"}"#,
        r#"{"name":"x","role":"admin","ttl":"forever"}"#,
        r#"{"name":"x\u001b[2J","role":"admin"}"#,
        "not json",
    ] {
        let a = request(addr, "POST", "/api/v1/tokens", Some(&admin), Some(body)).await;
        assert_eq!(a.status, 422, "{body}: {}", a.body);
        assert_eq!(a.body["error"]["code"], "invalid");
    }
    // Enrollment tokens.
    let a = request(
        addr,
        "POST",
        "/api/v1/enrollment-tokens",
        Some(&admin),
        Some(r#"{"ttl":"15m","uses":3,"host_pattern":"web-*"}"#),
    )
    .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let enroll_id = a.body["token"]["id"].as_str().unwrap().to_string();
    assert!(a.body["secret"].as_str().unwrap().starts_with("dwt_"));
    assert_eq!(a.body["token"]["uses_left"], 3);
    for body in [
        r#"{"ttl":"90d"}"#,
        r#"{"uses":0}"#,
        r#"{"host_pattern":"web-["}"#,
    ] {
        let a = request(
            addr,
            "POST",
            "/api/v1/enrollment-tokens",
            Some(&admin),
            Some(body),
        )
        .await;
        assert_eq!(a.status, 422, "{body}: {}", a.body);
    }
    let a = request(addr, "GET", "/api/v1/enrollment-tokens", Some(&admin), None).await;
    assert_eq!(a.body["tokens"][0]["id"], enroll_id.as_str());
    assert_eq!(a.body["tokens"][0]["state"], "active");
    // Revoke the new token; then it is refused.
    let a = request(
        addr,
        "DELETE",
        &format!("/api/v1/tokens/{id}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(a.status, 200);
    let a = request(addr, "GET", "/api/v1/hosts", Some(&secret), None).await;
    assert_eq!(a.status, 401);
    // Each change is one audit record with the caller as actor, in order.
    let records = f.store.audit_records(0, 10_000).await.unwrap();
    let mine: Vec<(String, String, String)> = records
        .iter()
        .filter(|r| r.actor == "token:000000c3")
        .map(|r| (r.action.clone(), r.target.clone(), r.detail.clone()))
        .collect();
    assert_eq!(mine.len(), 3, "{mine:?}");
    assert_eq!(
        (mine[0].0.as_str(), mine[0].1.as_str()),
        ("api_token.created", id.as_str())
    );
    assert!(mine[0].2.contains("\"role\":\"operator\""), "{}", mine[0].2);
    assert!(mine[0].2.contains("fixture admin"), "{}", mine[0].2);
    assert!(!mine[0].2.contains(&secret[13..]));
    assert_eq!(
        (mine[1].0.as_str(), mine[1].1.as_str()),
        ("token.created", enroll_id.as_str())
    );
    assert_eq!(
        (mine[2].0.as_str(), mine[2].1.as_str()),
        ("api_token.revoked", id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_page_in_order() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let auditor = api_token(Role::Auditor);
    let total = f.store.audit_records(0, 10_000).await.unwrap().len();
    assert!(total >= 8, "{total}");
    let mut after = 0;
    let mut seen = Vec::new();
    for _ in 0..100 {
        let a = request(
            addr,
            "GET",
            &format!("/api/v1/audit?after={after}&limit=3"),
            Some(&auditor),
            None,
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.body);
        let records = a.body["records"].as_array().unwrap();
        for r in records {
            seen.push(r["seq"].as_u64().unwrap());
            assert_eq!(r["hash"].as_str().unwrap().len(), 64);
            assert!(r["detail"].is_string());
        }
        if !a.body["truncated"].as_bool().unwrap() {
            break;
        }
        after = *seen.last().unwrap();
    }
    assert_eq!(seen, (1..=total as u64).collect::<Vec<_>>());
    for bad in ["after=-1", "after=", "limit=0", "since=1h"] {
        let a = request(
            addr,
            "GET",
            &format!("/api/v1/audit?{bad}"),
            Some(&auditor),
            None,
        )
        .await;
        assert_eq!(a.status, 400, "{bad}: {}", a.body);
    }
}
