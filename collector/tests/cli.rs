//! The real `driftwatch` binary against the API served in this test process on 127.0.0.1:0
//! (a real SQLite store populated through the `Storage` trait).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet_fixture;

use std::net::SocketAddr;
use std::process::Output;

use driftwatch_collector::http::ApiConfig;
use driftwatch_collector::storage::Role;
use fleet_fixture::{api_token, fleet, serve};

/// Runs `driftwatch ARGS` with `DRIFTWATCH_API` pointing at `addr` (off the async workers:
/// the server runs on them).
async fn driftwatch(addr: Option<SocketAddr>, args: &[&str]) -> Output {
    driftwatch_as(Role::Auditor, addr, args).await
}

/// [`driftwatch`] with the fixture's token of `role`.
async fn driftwatch_as(role: Role, addr: Option<SocketAddr>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_driftwatch"));
    cmd.args(args);
    cmd.env("DRIFTWATCH_TOKEN", api_token(role));
    match addr {
        Some(a) => cmd.env("DRIFTWATCH_API", format!("http://{a}")),
        None => cmd.env_remove("DRIFTWATCH_API"),
    };
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// No terminal control character (other than the line ends) reaches stdout or stderr.
fn assert_no_raw_controls(o: &Output) {
    for (name, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        let text = std::str::from_utf8(bytes).unwrap_or_else(|_| panic!("{name} is not UTF-8"));
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{name} carries a raw control character:\n{text:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_table_and_json() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;

    let o = driftwatch(Some(addr), &["hosts"]).await;
    let out = stdout(&o);
    assert_no_raw_controls(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("HOST "), "{out}");
    assert!(
        lines[0].contains("STATE")
            && lines[0].contains("LIFECYCLE")
            && lines[0].contains("LAST SEEN"),
        "{out}"
    );
    assert_eq!(lines.len(), 7, "{out}");
    // Aligned: the STATE column starts at the same offset on every line.
    let col = lines[0].find("STATE").unwrap();
    for (line, state) in lines[1..].iter().zip([
        "clean",
        "revoked",
        "incomplete",
        "never-reported",
        "silent",
        "drifted",
    ]) {
        assert_eq!(&line[col..col + state.len()], state, "{out}");
    }
    let web = lines.iter().find(|l| l.starts_with("web-1")).unwrap();
    assert!(web.contains("web 2026.11.1"), "{web}");

    let out = stdout(&driftwatch(Some(addr), &["hosts", "--state", "drifted"]).await);
    assert_eq!(out.lines().count(), 2, "{out}");

    // --format json is the API's body.
    let out = stdout(&driftwatch(Some(addr), &["--format", "json", "hosts"]).await);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["schema"], "driftwatch.api.v1");
    assert_eq!(v["hosts"].as_array().unwrap().len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_show_escapes_hostile_names() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;

    let o = driftwatch(Some(addr), &["host", "show", "web-1"]).await;
    let out = stdout(&o);
    assert_no_raw_controls(&o);
    assert!(out.contains("state        drifted"), "{out}");
    assert!(out.contains("labels       role=web, zone=a"), "{out}");
    assert!(
        out.contains("4 (1 high, 2 medium, 1 low), of which 1 package drift"),
        "{out}"
    );
    // The hostile path on one line, escaped as the agent escapes it.
    assert!(out.contains("/tmp/evil\\x1b[31mRED\\nFAKE|row"), "{out}");
    assert!(out.contains("/srv/data\\xff\\xfe"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("FAKE")), "{out}");
    // Before and after of every change, escaped too.
    assert!(
        out.contains("mode: 0644 (rw-r--r--) -> 0666 (rw-rw-rw-)"),
        "{out}"
    );
    assert!(
        out.contains("content: \\x1b]0;pwned\\x07 -> after|with|pipes\\nand newline"),
        "{out}"
    );
    assert!(out.contains("packages: openssh-server:amd64 (unexplained), configuration file"));
    assert!(out.contains("package curl:amd64"), "{out}");
    assert!(
        out.contains("version: (absent) -> 8.5.0-2 (installed)"),
        "{out}"
    );
    assert!(
        !out.contains("/usr/bin/env"),
        "resolved only with --resolved:\n{out}"
    );

    let out = stdout(&driftwatch(Some(addr), &["host", "show", "web-1", "--resolved"]).await);
    assert!(out.contains("modified (resolved)"), "{out}");
    assert!(out.contains("/usr/bin/env"), "{out}");
    assert!(out.contains("resolved 20"), "{out}");

    let out = stdout(&driftwatch(Some(addr), &["host", "show", "web-1", "--format", "json"]).await);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["host"]["host"]["host_id"], "web-1");
    assert_eq!(v["violations"]["violations"].as_array().unwrap().len(), 4);

    // Unknown host: exit 2 with the API's message.
    let o = driftwatch(Some(addr), &["host", "show", "nope"]).await;
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("no such host \"nope\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn violations_search_and_events() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;

    let o = driftwatch(
        Some(addr),
        &["violations", "search", "--path", "/etc/ssh/**"],
    )
    .await;
    let out = stdout(&o);
    let rows: Vec<&str> = out.lines().filter(|l| !l.starts_with("    ")).collect();
    assert!(rows[0].starts_with("HOST "), "{out}");
    assert_eq!(rows.len(), 3, "{out}");
    assert!(rows.iter().any(|r| r.starts_with("old-1 ")), "{out}");
    assert!(rows.iter().any(|r| r.starts_with("web-1 ")), "{out}");

    let out = stdout(
        &driftwatch(
            Some(addr),
            &[
                "violations",
                "search",
                "--path",
                "/etc/ssh/**",
                "--since",
                "24h",
            ],
        )
        .await,
    );
    assert!(!out.contains("old-1"), "{out}");

    let o = driftwatch(Some(addr), &["violations", "search", "--kind", "added"]).await;
    let out = stdout(&o);
    assert_no_raw_controls(&o);
    assert!(out.contains("/tmp/evil\\x1b[31mRED\\nFAKE|row"), "{out}");

    let out = stdout(
        &driftwatch(
            Some(addr),
            &[
                "violations",
                "search",
                "--kind",
                "package_installed",
                "--format",
                "json",
            ],
        )
        .await,
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["violations"][0]["package"]["name"], "curl");

    let out = stdout(&driftwatch(Some(addr), &["violations", "search", "--limit", "1"]).await);
    assert!(out.contains("only the first 1 shown"), "{out}");

    let out = stdout(&driftwatch(Some(addr), &["violations", "search", "--host", "db-1"]).await);
    assert_eq!(out, "no violations\n");

    // A parameter the API refuses: exit 2, the API's message naming it.
    let o = driftwatch(
        Some(addr),
        &["violations", "search", "--since", "yesterday"],
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("\"yesterday\" is neither a time"), "{err}");
    // One clap refuses itself (exit 2 too).
    let o = driftwatch(Some(addr), &["violations", "search", "--kind", "changed"]).await;
    assert_eq!(o.status.code(), Some(2));

    let o = driftwatch(Some(addr), &["events"]).await;
    let out = stdout(&o);
    assert_no_raw_controls(&o);
    assert!(out.starts_with("TIME "), "{out}");
    assert!(out.contains("impersonation  web-1"), "{out}");
    assert!(out.contains("\\x1b[2J"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_collector_is_an_error() {
    // A port nobody listens on: bind, note it, close.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let o = driftwatch(Some(addr), &["hosts"]).await;
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("cannot connect to the collector"), "{err}");

    let o = driftwatch(None, &["--api", "https://127.0.0.1:1", "hosts"]).await;
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("needs --ca-file"), "{err}");

    let o = driftwatch(None, &["--help"]).await;
    let help = stdout(&o);
    for want in [
        "DRIFTWATCH_API",
        "DRIFTWATCH_CA_FILE",
        "DRIFTWATCH_TOKEN",
        "--token-file",
        "Exit status",
        "audit verify",
    ] {
        assert!(help.contains(want), "{want} missing from:\n{help}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_managed_by_admins_through_the_cli() {
    let f = fleet().await;
    let (addr, _stop) = serve(f.store.clone(), ApiConfig::default()).await;
    let a = Some(addr);
    // An auditor may not.
    let o = driftwatch(
        a,
        &["api-token", "create", "--role", "auditor", "--name", "x"],
    )
    .await;
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("needs the admin role"), "{err}");
    // An admin creates one: only the token on stdout, usable at once.
    let args = [
        "api-token",
        "create",
        "--role",
        "auditor",
        "--name",
        "siem\u{1b}x",
    ];
    let o = driftwatch_as(Role::Admin, a, &args).await;
    assert_eq!(
        o.status.code(),
        Some(2),
        "a control character in the name is refused"
    );
    let o = driftwatch_as(
        Role::Admin,
        a,
        &[
            "api-token",
            "create",
            "--role",
            "auditor",
            "--name",
            "siem",
            "--ttl",
            "90d",
        ],
    )
    .await;
    let token = stdout(&o).trim().to_string();
    assert!(token.starts_with("dwa_") && token.len() == 56, "{token}");
    let id = token[4..12].to_string();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_driftwatch"));
    cmd.args(["--api", &format!("http://{addr}"), "hosts"])
        .env("DRIFTWATCH_TOKEN", &token);
    let o = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(stdout(&o).contains("web-1"));
    let o = driftwatch_as(Role::Admin, a, &["api-token", "list"]).await;
    let out = stdout(&o);
    assert!(
        out.contains(&id) && out.contains("siem") && out.contains("token:000000c3"),
        "{out}"
    );
    assert!(!out.contains(&token[13..]));
    let o = driftwatch_as(Role::Admin, a, &["api-token", "revoke", &id]).await;
    assert!(stdout(&o).contains("revoked"));
    let o = driftwatch_as(Role::Admin, a, &["api-token", "revoke", &id]).await;
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already revoked"));
    // Enrollment tokens.
    let o = driftwatch_as(
        Role::Admin,
        a,
        &[
            "enrollment-token",
            "create",
            "--uses",
            "3",
            "--host-pattern",
            "web-*",
        ],
    )
    .await;
    let t = stdout(&o).trim().to_string();
    assert!(t.starts_with("dwt_"), "{t}");
    let o = driftwatch_as(Role::Admin, a, &["enrollment-token", "list"]).await;
    let out = stdout(&o);
    assert!(out.contains(&t[4..12]) && out.contains("web-*"), "{out}");
    // Every change is in the audit log, which an auditor reads.
    let o = driftwatch(a, &["audit", "list", "--since", "1h"]).await;
    let out = stdout(&o);
    for action in ["api_token.created", "api_token.revoked", "token.created"] {
        assert!(out.contains(action), "{action} missing:\n{out}");
    }
}
