//! The real `driftwatch` binary's lifecycle commands (`hosts explain`, `host ack`,
//! `host retire`, `host show`'s lifecycle, `baseline push`, `images`, `image show`) against the
//! API served in this test process on 127.0.0.1:0 over the `fleet_fixture` fleet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet_fixture;

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;

use driftwatch_collector::flagging::{FlaggingPolicy, RawFlagging};
use driftwatch_collector::http::{self, ApiConfig};
use driftwatch_collector::reconcile::{self, Policy};
use driftwatch_collector::storage::Storage;
use driftwatch_proto::v1::Header;
use driftwatch_proto::{BASELINE_FORMAT_VERSION, BASELINE_MAGIC, HASH_ALGORITHM, envelope};
use fleet_fixture::{fleet, now_ms};
use prost::Message;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};

fn policy() -> Policy {
    let raw: RawFlagging =
        toml::from_str("severity_at_least = \"medium\"\npackage_drift = true").unwrap();
    Policy {
        flagging: FlaggingPolicy::from_raw(raw).unwrap(),
        ..Policy::default()
    }
}

async fn serve_with(
    store: Arc<dyn Storage>,
    trusted: Vec<[u8; 32]>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let router = http::router_with(
        store,
        ApiConfig::default(),
        Arc::new(policy()),
        Arc::new(trusted),
    );
    tokio::spawn(http::serve_router(listener, router, async move {
        let _ = rx.await;
    }));
    (addr, tx)
}

async fn driftwatch(addr: SocketAddr, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_driftwatch"));
    cmd.args(args)
        .env("DRIFTWATCH_API", format!("http://{addr}"));
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
    assert_no_raw_controls(o);
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn assert_no_raw_controls(o: &Output) {
    for (name, bytes) in [("stdout", &o.stdout), ("stderr", &o.stderr)] {
        let text = std::str::from_utf8(bytes).unwrap_or_else(|_| panic!("{name} is not UTF-8"));
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{name} carries a raw control character:\n{text:?}"
        );
    }
}

fn failure(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    String::from_utf8(o.stderr.clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_ack_retire_and_host_show() {
    let f = fleet().await;
    reconcile::reconcile_once(&*f.store, &policy(), now_ms())
        .await
        .unwrap();
    let (addr, _stop) = serve_with(f.store.clone(), vec![]).await;

    // The hostile path (ESC, newline, `|`) is evidence of the severity reason: escaped.
    let out = stdout(&driftwatch(addr, &["hosts", "explain", "web-1"]).await);
    assert!(out.starts_with("web-1: flagged since "), "{out}");
    assert!(out.contains("FLAGGED severity:"), "{out}");
    assert!(out.contains("FLAGGED package_drift:"), "{out}");
    assert!(out.contains("path     /etc/ssh/sshd_config"), "{out}");
    assert!(out.contains("/tmp/evil\\x1b[31mRED\\nFAKE|row"), "{out}");
    assert!(out.contains("package  curl:amd64"), "{out}");
    let json = stdout(&driftwatch(addr, &["--format", "json", "hosts", "explain", "web-1"]).await);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["flagged"], true);

    let out = stdout(
        &driftwatch(
            addr,
            &[
                "host",
                "ack",
                "web-1",
                "--path",
                "/etc/ssh/sshd_config",
                "--package",
                "curl",
                "--reason",
                "hardening CHG-7",
                "--expires",
                "1d",
            ],
        )
        .await,
    );
    assert!(
        out.starts_with("web-1: 2 item(s) acknowledged until "),
        "{out}"
    );
    let out = stdout(&driftwatch(addr, &["hosts", "explain", "web-1"]).await);
    assert!(!out.contains("FLAGGED package_drift"), "{out}");
    assert!(
        out.contains("acknowledged by local:loopback-api until "),
        "{out}"
    );
    let e = failure(
        &driftwatch(
            addr,
            &[
                "host",
                "ack",
                "web-1",
                "--path",
                "/nope",
                "--reason",
                "r",
                "--expires",
                "1d",
            ],
        )
        .await,
    );
    assert!(e.contains("no open violation at path /nope"), "{e}");

    let out = stdout(&driftwatch(addr, &["host", "retire", "db-1", "--reason", "gone"]).await);
    assert!(out.starts_with("db-1: clean → retired at "), "{out}");
    let e = failure(&driftwatch(addr, &["host", "retire", "db-1", "--reason", "gone"]).await);
    assert!(e.contains("already retired"), "{e}");
    let e = failure(&driftwatch(addr, &["host", "retire", "db-1"]).await);
    assert!(e.contains("--reason"), "{e}");

    let out = stdout(&driftwatch(addr, &["host", "show", "db-1"]).await);
    assert!(out.contains("lifecycle: retired since "), "{out}");
    assert!(out.contains("retired by an operator: gone"), "{out}");
    let json = stdout(&driftwatch(addr, &["--format", "json", "host", "show", "db-1"]).await);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["transitions"]["transitions"][0]["to"], "retired", "{v}");
    assert_eq!(v["host"]["host"]["lifecycle"], "retired", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baseline_push_and_images() {
    let f = fleet().await;
    let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    let key = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
    let raw: [u8; 32] = key.public_key().as_ref().try_into().unwrap();
    let (addr, _stop) = serve_with(f.store.clone(), vec![raw]).await;

    // A baseline file as the agent writes it: magic, the length-delimited signed header, then
    // entries (none here; the CLI sends the signed header only).
    let header = Header {
        format_version: BASELINE_FORMAT_VERSION,
        image_id: "web".into(),
        image_version: "2026.11.1".into(),
        created_unix: 1_700_000_000,
        merkle_root: vec![0xab; 32],
        hash_algorithm: HASH_ALGORITHM.into(),
        ..Default::default()
    };
    let signed = envelope::sign(header.encode_to_vec(), &key);
    let mut file = BASELINE_MAGIC.to_vec();
    signed.encode_length_delimited(&mut file).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("web.dwb");
    std::fs::write(&path, &file).unwrap();
    let p = path.to_str().unwrap();

    let out = stdout(&driftwatch(addr, &["baseline", "push", p]).await);
    assert!(
        out.starts_with("registered image web version 2026.11.1\n"),
        "{out}"
    );
    assert!(
        out.contains(&format!("root   {}", "ab".repeat(32))),
        "{out}"
    );
    let e = failure(&driftwatch(addr, &["baseline", "push", p]).await);
    assert!(e.contains("not newer than the registered version"), "{e}");
    let junk = dir.path().join("junk");
    std::fs::write(&junk, b"not a baseline").unwrap();
    let e = failure(&driftwatch(addr, &["baseline", "push", junk.to_str().unwrap()]).await);
    assert!(e.contains("is not a driftwatch baseline"), "{e}");

    let out = stdout(&driftwatch(addr, &["images"]).await);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("IMAGE "), "{out}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("web ") && l.contains("2026.11.1")),
        "{out}"
    );
    assert!(lines.iter().any(|l| l.starts_with("db ")), "{out}");
    let out = stdout(&driftwatch(addr, &["image", "show", "web"]).await);
    assert!(out.contains("registered: version 2026.11.1"), "{out}");
    assert!(out.contains("consensus: inc-1"), "{out}");
    assert!(out.contains("OUTLIER"), "{out}");
    let e = failure(&driftwatch(addr, &["image", "show", "nope"]).await);
    assert!(e.contains("no such image"), "{e}");
}
