//! `driftwatch audit verify` (the real binary, verifying on the client through the API) and
//! `driftwatch-collector audit verify` (reading the database) against a real SQLite file and
//! a real PostgreSQL database whose audit log is then altered, cut or reordered behind the
//! collector's back: each must fail, naming the first bad record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet_fixture;

use std::path::PathBuf;
use std::process::Output;
use std::sync::Arc;

use driftwatch_collector::http::ApiConfig;
use driftwatch_collector::storage::{AuditEntry, PgStore, Role, SqliteStore, Storage};
use fleet_fixture::{add_api_tokens, api_token, now_ms, serve};

enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(tempfile::TempDir, String),
}

impl Db {
    fn dir(&self) -> &std::path::Path {
        match self {
            Db::Sqlite(d) | Db::Postgres(d, _) => d.path(),
        }
    }

    async fn open(&self) -> Arc<dyn Storage> {
        match self {
            Db::Sqlite(d) => {
                let path = d.path().join("collector.db");
                Arc::new(
                    tokio::task::spawn_blocking(move || SqliteStore::open(path))
                        .await
                        .unwrap()
                        .unwrap(),
                )
            }
            Db::Postgres(_, url) => Arc::new(PgStore::connect(url).await.unwrap()),
        }
    }

    /// SQL behind the collector's back.
    async fn sql(&self, statements: &str) {
        match self {
            Db::Sqlite(d) => {
                let c = rusqlite::Connection::open(d.path().join("collector.db")).unwrap();
                c.execute_batch(statements).unwrap();
            }
            Db::Postgres(_, url) => {
                let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let task = tokio::spawn(conn);
                client.batch_execute(statements).await.unwrap();
                drop(client);
                let _ = task.await;
            }
        }
    }

    /// A configuration file for `driftwatch-collector` pointing at this database.
    fn config(&self) -> PathBuf {
        let path = self.dir().join("collector.toml");
        let mut text = format!("state_dir = {:?}\n", self.dir().to_str().unwrap());
        if let Db::Postgres(_, kv) = self {
            // The test server's "host=… port=… user=… dbname=…" as the URL the config takes.
            let field = |k: &str| {
                kv.split_whitespace()
                    .find_map(|p| p.strip_prefix(&format!("{k}=")))
                    .unwrap()
                    .to_string()
            };
            let url = format!(
                "postgresql://{}@/{}?host={}&port={}",
                field("user"),
                field("dbname"),
                field("host"),
                field("port")
            );
            text.push_str(&format!("database_url = {url:?}\n"));
        }
        std::fs::write(&path, text).unwrap();
        path
    }
}

async fn run(bin: &str, args: Vec<String>, env: Vec<(&'static str, String)>) -> Output {
    let mut cmd = std::process::Command::new(bin);
    cmd.args(args)
        .env_remove("DRIFTWATCH_TOKEN")
        .env_remove("DRIFTWATCH_COLLECTOR_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The tamperings: SQL, and what the verifiers must say about it.
const TAMPERINGS: &[(&str, &str, &str)] = &[
    (
        "altered",
        "UPDATE audit_log SET detail = '{\"reason\":\"nothing to see\"}' WHERE seq = 4",
        "audit record 4: its hash does not match",
    ),
    (
        "deleted",
        "DELETE FROM audit_log WHERE seq = 4",
        "audit record 5: expected record 4 here",
    ),
    (
        "reordered",
        "UPDATE audit_log SET seq = 100 WHERE seq = 2; UPDATE audit_log SET seq = 2 WHERE seq = 5; \
         UPDATE audit_log SET seq = 5 WHERE seq = 100",
        "audit record 2: does not link",
    ),
];

async fn tampering_is_caught(make: impl Fn(&str) -> Option<Db>) {
    for (what, sql, says) in TAMPERINGS {
        let Some(db) = make(what) else { return };
        let store = db.open().await;
        // Three records from the tokens, three more as changes would append them.
        add_api_tokens(store.as_ref(), now_ms()).await;
        for i in 0..3 {
            store
                .append_audit(AuditEntry::new(
                    now_ms(),
                    "token:000000c3",
                    "host.retired",
                    format!("web-{i}\u{1b}[2J"),
                    serde_json::json!({ "reason": "decommissioned |= \u{202e}" }),
                ))
                .await
                .unwrap();
        }
        let (addr, _stop) = serve(store.clone(), ApiConfig::default()).await;
        let dw = |args: &[&str]| {
            let mut v = vec!["--api".to_string(), format!("http://{addr}")];
            v.extend(args.iter().map(|s| s.to_string()));
            run(
                env!("CARGO_BIN_EXE_driftwatch"),
                v,
                vec![("DRIFTWATCH_TOKEN", api_token(Role::Auditor))],
            )
        };
        let collector = |args: &[&str]| {
            let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            v.extend(["--config".into(), db.config().to_str().unwrap().to_string()]);
            run(env!("CARGO_BIN_EXE_driftwatch-collector"), v, vec![])
        };

        let o = dw(&["audit", "verify"]).await;
        assert_eq!(o.status.code(), Some(0), "{what}: {}", show(&o));
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let head = out
            .split("head ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no head in {out}"))
            .to_string();
        assert!(head.starts_with("6:"), "{head}");
        let o = collector(&["audit", "verify", "--expect-head", &head]).await;
        assert_eq!(o.status.code(), Some(0), "{what}: {}", show(&o));
        // The listing is escaped.
        let o = dw(&["audit", "list"]).await;
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        let listing = String::from_utf8_lossy(&o.stdout);
        assert!(
            listing.contains("web-0\\x1b[2J") && listing.contains("\\u{202e}"),
            "{listing}"
        );
        assert!(!listing.contains('\u{1b}') && !listing.contains('\u{202e}'));

        db.sql(sql).await;
        let o = dw(&["audit", "verify"]).await;
        assert_eq!(o.status.code(), Some(1), "{what}: {}", show(&o));
        assert!(show(&o).contains(says), "{what}: {}", show(&o));
        let o = collector(&["audit", "verify"]).await;
        assert_eq!(o.status.code(), Some(1), "{what}: {}", show(&o));
        assert!(show(&o).contains(says), "{what}: {}", show(&o));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_tampering_fails_verification_at_that_record() {
    tampering_is_caught(|_| Some(Db::Sqlite(tempfile::tempdir().unwrap()))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tampering_fails_verification_at_that_record() {
    tampering_is_caught(|what| {
        let url = driftwatch_tests::postgres::server()?.create_database(&format!("audit {what}"));
        Some(Db::Postgres(tempfile::tempdir().unwrap(), url))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_tail_is_caught_against_the_noted_head() {
    let db = Db::Sqlite(tempfile::tempdir().unwrap());
    let store = db.open().await;
    add_api_tokens(store.as_ref(), now_ms()).await;
    let (addr, _stop) = serve(store.clone(), ApiConfig::default()).await;
    let args = |extra: &[&str]| {
        let mut v = vec![
            "--api".to_string(),
            format!("http://{addr}"),
            "audit".into(),
            "verify".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let env = || vec![("DRIFTWATCH_TOKEN", api_token(Role::Auditor))];
    let o = run(env!("CARGO_BIN_EXE_driftwatch"), args(&[]), env()).await;
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let head = out
        .split("head ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    db.sql("DELETE FROM audit_log WHERE seq = 3").await;
    // Without the head the shorter log looks whole; with it, the cut shows.
    let o = run(env!("CARGO_BIN_EXE_driftwatch"), args(&[]), env()).await;
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = run(
        env!("CARGO_BIN_EXE_driftwatch"),
        args(&["--expect-head", &head]),
        env(),
    )
    .await;
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        show(&o).contains("does not contain record 3:"),
        "{}",
        show(&o)
    );
    // A malformed head is a usage error, exit 2.
    let o = run(
        env!("CARGO_BIN_EXE_driftwatch"),
        args(&["--expect-head", "3:zz"]),
        env(),
    )
    .await;
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
}
