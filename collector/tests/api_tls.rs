//! The HTTP API over TLS, end to end: a collector serving it on 127.0.0.2 with a certificate
//! from its own CA, and the real `driftwatch` binary trusting that CA with `--ca-file`.
//! Plus the configuration rule: plain HTTP beyond loopback is refused (exit 64).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet_fixture;

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;

use driftwatch_collector::config::{HttpTls, Settings};
use driftwatch_collector::server::Server;
use driftwatch_collector::storage::{Role, SqliteStore, Storage};
use fleet_fixture::{add_api_tokens, api_token, now_ms};

async fn run(bin: &str, args: Vec<String>, env: Vec<(&'static str, String)>) -> Output {
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args)
        .env_remove("DRIFTWATCH_TOKEN")
        .env_remove("DRIFTWATCH_API")
        .env_remove("DRIFTWATCH_CA_FILE")
        .env_remove("DRIFTWATCH_COLLECTOR_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driftwatch_over_tls_with_the_collector_ca() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::for_local(dir.path());
    settings.http_listen = "127.0.0.2:0".parse().unwrap();
    settings.http_tls = HttpTls::CollectorCa;
    settings.server_names.push("127.0.0.2".into());
    let db = dir.path().join("collector.db");
    let store: Arc<dyn Storage> = Arc::new(SqliteStore::open(&db).unwrap());
    add_api_tokens(store.as_ref(), now_ms()).await;
    let server = Server::bind(settings, store.clone()).await.unwrap();
    let http: SocketAddr = server.http_addr();
    assert_eq!(http.ip().to_string(), "127.0.0.2");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, server.ca().cert_pem()).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    let dw = env!("CARGO_BIN_EXE_driftwatch");
    let url = format!("https://{http}");
    let token = ("DRIFTWATCH_TOKEN", api_token(Role::Auditor));
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["--api".to_string(), url.clone()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let ca = ca_file.to_str().unwrap();

    // Trusted CA and a token: it works.
    let o = run(dw, args(&["--ca-file", ca, "hosts"]), vec![token.clone()]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("no hosts"),
        "{}",
        text(&o)
    );
    // The CA from the environment, the token from a file.
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{}\n", api_token(Role::Admin))).unwrap();
    let o = run(
        dw,
        args(&[
            "--token-file",
            token_file.to_str().unwrap(),
            "audit",
            "verify",
        ]),
        vec![("DRIFTWATCH_CA_FILE", ca.to_string())],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("audit log intact"),
        "{}",
        text(&o)
    );
    // No token: the API's 401, with how to get one.
    let o = run(dw, args(&["--ca-file", ca, "hosts"]), vec![]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("api-token create"), "{}", text(&o));
    // No CA file: refused before connecting.
    let o = run(dw, args(&["hosts"]), vec![token.clone()]).await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("needs --ca-file"), "{}", text(&o));
    // Another CA: the handshake fails.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.2".to_string()]).unwrap();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.cert.pem()).unwrap();
    let o = run(
        dw,
        args(&["--ca-file", other_file.to_str().unwrap(), "hosts"]),
        vec![token.clone()],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        text(&o).contains("TLS with the collector's HTTP API"),
        "{}",
        text(&o)
    );
    // Plain HTTP to the TLS port gets nothing.
    let o = run(
        dw,
        vec![
            "--api".into(),
            format!("http://{http}"),
            "--timeout".into(),
            "5s".into(),
            "hosts".into(),
        ],
        vec![token.clone()],
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    let _ = stop_tx.send(());
    tokio::time::timeout(std::time::Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_beyond_loopback_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = {:?}\nhttp_listen = \"0.0.0.0:7480\"\nhttp_tls = false\n",
            dir.path().to_str().unwrap()
        ),
    )
    .unwrap();
    let o = run(
        env!("CARGO_BIN_EXE_driftwatch-collector"),
        vec![
            "ca".into(),
            "show".into(),
            "--config".into(),
            config.to_str().unwrap().into(),
        ],
        vec![],
    )
    .await;
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("http_tls") && err.contains("must use TLS"),
        "{err}"
    );
}
