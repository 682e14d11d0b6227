//! Baselines that are not exactly what a trusted key signed are refused, with an error that
//! says why: by `baseline verify` (exit 1) and by `check` (exit 2, never a report).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::Path;

use driftwatch_tests::{Keys, agent, baseline_create, check_json};

fn small_tree(dir: &Path) {
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(dir.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
    std::os::unix::fs::symlink("passwd", dir.join("etc/link")).unwrap();
}

fn verify(bl: &Path, key: &Path) -> driftwatch_tests::Run {
    agent([
        "baseline".as_ref(),
        "verify".as_ref(),
        bl.as_os_str(),
        "--trusted-key".as_ref(),
        key.as_os_str(),
    ])
}

#[test]
fn flipped_bytes_anywhere_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    small_tree(&root);
    let keys = Keys::new();
    let bl = t.path().join("bl");
    assert_eq!(baseline_create(&root, &bl, &keys, &[]).code, 0);
    assert_eq!(verify(&bl, &keys.public).code, 0);
    let good = fs::read(&bl).unwrap();
    let bad = t.path().join("bad");
    let mut reasons = std::collections::BTreeSet::new();
    for i in (0..good.len())
        .step_by((good.len() / 40).max(1))
        .chain([good.len() - 1])
    {
        let mut b = good.clone();
        b[i] ^= 0x04;
        fs::write(&bad, &b).unwrap();
        let r = verify(&bad, &keys.public);
        assert_eq!(r.code, 1, "flip at {i} not refused: {}", r.stdout_str());
        assert!(r.stderr.starts_with("REFUSED: "), "{}", r.stderr);
        reasons.insert(r.stderr.split(": ").nth(2).unwrap_or("").to_string());
        let c = check_json(&root, &bad, &keys, None, &[]);
        assert_eq!(
            c.code, 2,
            "check must fail, not report, on a bad baseline (flip at {i})"
        );
        assert!(c.stdout.is_empty());
        assert!(c.stderr.contains("error:"), "{}", c.stderr);
    }
    let all = reasons.into_iter().collect::<Vec<_>>().join("\n");
    assert!(all.contains("signature is invalid"), "{all}");
    assert!(
        all.contains("do not match the signed Merkle root") || all.contains("malformed"),
        "{all}"
    );
}

#[test]
fn a_wrong_key_is_refused_and_the_signer_named() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    small_tree(&root);
    let keys = Keys::new();
    let other = Keys::new();
    let bl = t.path().join("bl");
    assert_eq!(baseline_create(&root, &bl, &keys, &[]).code, 0);
    let r = verify(&bl, &other.public);
    assert_eq!(r.code, 1);
    let fp = driftwatch_tests::baseline_show_json(&bl, &[]).json()["signer"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        r.stderr.contains(&format!(
            "signed by key {fp}, which is not among the trusted keys"
        )),
        "{}",
        r.stderr
    );
    let c = check_json(&root, &bl, &other, None, &[]);
    assert_eq!(c.code, 2);
    // Any one of several trusted keys will do.
    let r = agent([
        "baseline".as_ref(),
        "verify".as_ref(),
        bl.as_os_str(),
        "--trusted-key".as_ref(),
        other.public.as_os_str(),
        keys.public.as_os_str(),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn an_expired_baseline_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    small_tree(&root);
    let keys = Keys::new();
    let bl = t.path().join("bl");
    assert_eq!(
        baseline_create(&root, &bl, &keys, &["--expires", "1s"]).code,
        0
    );
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let r = verify(&bl, &keys.public);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("the baseline expired at"), "{}", r.stderr);
    let c = check_json(&root, &bl, &keys, None, &[]);
    assert_eq!(c.code, 2);
    assert!(c.stderr.contains("expired"), "{}", c.stderr);
    // An expiry in the past is refused at creation.
    let r = baseline_create(
        &root,
        &t.path().join("x"),
        &keys,
        &["--expires", "2001-01-01"],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("in the past"), "{}", r.stderr);
}

#[test]
fn things_that_are_not_baselines_are_named() {
    let t = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let f = t.path().join("junk");
    fs::write(&f, b"#!/bin/sh\necho hi\n").unwrap();
    let r = verify(&f, &keys.public);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("is not a driftwatch baseline"),
        "{}",
        r.stderr
    );
    let r = verify(&t.path().join("missing"), &keys.public);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("cannot read"), "{}", r.stderr);
}
