//! The README's demo command (`bash tests/demo.sh`) keeps working: it is run here on the
//! binaries this test suite built (`DRIFTWATCH_DEMO_BIN`, so no second, release build), and it
//! must reach its last step — the drifted host replaced by a rebuild the signed webhook
//! triggered, the fleet clean, the audit chain intact. No root needed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use driftwatch_tests::{bin_dir, require_program, run_with_limit};

#[test]
fn readme_demo_runs_the_whole_loop() {
    if !require_program("python3") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(repo.join("tests/demo.sh"))
        .env("DRIFTWATCH_DEMO_BIN", bin_dir())
        .env("NO_COLOR", "1");
    let r = run_with_limit(cmd, Duration::from_secs(300));
    let out = r.stdout_str();
    assert_eq!(r.code, 0, "demo failed:\n{out}\n{}", r.stderr);
    for want in [
        // The one-shot check on the test server caught the drift.
        "exit status 1",
        // The fleet part: flagged, the webhook verified by the example receiver, rebuilt.
        "FLAGGED severity",
        "rebuild command exited with status 0",
        "audit log intact",
        "demo finished: the fleet is clean again",
    ] {
        assert!(out.contains(want), "{want:?} missing from the demo:\n{out}");
    }
    eprintln!("demo took {:?}", r.elapsed);
}

/// The example receiver (packaging/examples/rebuild-receiver/receiver.py) the demo uses:
/// a signed request runs the rebuild command once, with the body on stdin, even when it is
/// delivered twice (also across a restart); a forged, a stale and an unsigned request are
/// refused with 401 and run nothing.
#[test]
fn example_receiver_verifies_and_runs_each_request_once() {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use driftwatch_tests::daemon::{Daemon, free_port, wait_until};
    use driftwatch_tests::webhook::Receiver;
    use std::io::{Read, Write};

    if !require_program("python3") {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secret = Receiver::write_secret(&dir.path().join("secret"));
    let key = STANDARD.decode(&secret["whsec_".len()..]).unwrap();
    let out = dir.path().join("rebuilds");
    let port = free_port();
    let start = || {
        let mut cmd = Command::new("python3");
        cmd.arg(repo.join("packaging/examples/rebuild-receiver/receiver.py"))
            .arg("--secret-file")
            .arg(dir.path().join("secret"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--", "/bin/sh", "-c"])
            .arg(format!(
                "cat >> {o}; echo \" host=$DRIFTWATCH_HOST_ID role=$DRIFTWATCH_ROLE\" >> {o}",
                o = out.display()
            ));
        let d = Daemon::start("receiver", cmd, &dir.path().join("receiver.log"));
        wait_until(
            "the receiver to listen",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            },
        );
        d
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let post = |id: &str, ts: u64, key: &[u8], body: &str| -> String {
        let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
        let sig = STANDARD.encode(ring::hmac::sign(&k, format!("{id}.{ts}.{body}").as_bytes()));
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        write!(
            s,
            "POST / HTTP/1.1\r\nhost: x\r\nconnection: close\r\nwebhook-id: {id}\r\n\
             webhook-timestamp: {ts}\r\nwebhook-signature: v1,{sig}\r\n\
             content-length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer.lines().next().unwrap_or("").to_string()
    };
    let body =
        r#"{"type":"driftwatch.rebuild.requested","data":{"host":{"id":"web-7"},"role":"web"}}"#;
    let mut receiver = start();
    assert!(post("rb_1", now, &key, body).contains(" 202 "));
    assert!(
        post("rb_1", now, &key, body).contains(" 200 "),
        "a redelivery"
    );
    assert!(post("rb_2", now, b"not the key", body).contains(" 401 "));
    assert!(post("rb_3", now - 3600, &key, body).contains(" 401 "));
    // Restarted, it still knows rb_1.
    receiver.stop(Duration::from_secs(10));
    let _receiver = start();
    assert!(post("rb_1", now, &key, body).contains(" 200 "));
    let text = wait_until(
        "the rebuild command's output",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || {
            std::fs::read_to_string(&out)
                .map_err(|e| e.to_string())
                .and_then(|t| if t.contains("host=") { Ok(t) } else { Err(t) })
        },
    );
    std::thread::sleep(Duration::from_millis(500)); // a second run would have shown by now
    let text = std::fs::read_to_string(&out).unwrap_or(text);
    assert_eq!(
        text,
        format!("{body} host=web-7 role=web\n"),
        "ran once, body on stdin"
    );
}
