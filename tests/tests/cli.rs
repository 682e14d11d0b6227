//! The command line as operators and pipelines use it: exit codes, refusals, help, the policy
//! commands, the scan cache's recovery from corruption, and the documented report schema.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use driftwatch_tests::{Keys, agent, baseline_create, check_json, finding, findings};

#[test]
fn keygen_writes_a_private_key_0600_and_never_overwrites() {
    let t = tempfile::tempdir().unwrap();
    let prefix = t.path().join("pipeline");
    let r = agent(["keygen".as_ref(), "--out".as_ref(), prefix.as_os_str()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout_str().contains("fingerprint: ed25519:"));
    let key = t.path().join("pipeline.key");
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = fs::read(&key).unwrap();
    let r = agent(["keygen".as_ref(), "--out".as_ref(), prefix.as_os_str()]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("refusing to overwrite"), "{}", r.stderr);
    assert_eq!(fs::read(&key).unwrap(), before);
}

#[test]
fn help_teaches_the_commands() {
    let r = agent(["--help"]);
    assert_eq!(r.code, 0);
    let s = r.stdout_str();
    for needle in [
        "keygen",
        "baseline",
        "check",
        "policy",
        "Exit status of check: 0 clean, 1 drift found, 2 error",
        "--sign-key",
    ] {
        assert!(s.contains(needle), "{needle} missing from --help:\n{s}");
    }
    let r = agent(["check", "--help"]);
    for needle in [
        "--baseline",
        "--trusted-key",
        "--state-dir",
        "--full",
        "--format",
    ] {
        assert!(r.stdout_str().contains(needle), "{needle}");
    }
    // A usage error exits 2, like every other error.
    assert_eq!(agent(["check"]).code, 2);
}

#[test]
fn policy_show_prints_a_policy_that_parses_back_to_itself() {
    let t = tempfile::tempdir().unwrap();
    let r = agent(["policy", "show"]);
    assert_eq!(r.code, 0);
    let text = r.stdout_str();
    let digest = |s: &str| {
        s.lines()
            .next()
            .unwrap()
            .rsplit("digest ")
            .next()
            .unwrap()
            .to_string()
    };
    let f = t.path().join("effective.toml");
    fs::write(&f, &text).unwrap();
    let again = agent([
        "policy".as_ref(),
        "show".as_ref(),
        "--policy".as_ref(),
        f.as_os_str(),
    ]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(digest(&text), digest(&again.stdout_str()));

    let r = agent([
        "policy",
        "show",
        "--path",
        "/etc/ssh/sshd_config",
        "/proc/1/status",
        "/etc/resolv.conf",
    ]);
    let s = r.stdout_str();
    assert!(s.contains("/etc/ssh/sshd_config: severity critical"), "{s}");
    assert!(s.contains("/proc/1/status: excluded"), "{s}");
    assert!(
        s.contains("/etc/resolv.conf: severity low") && s.contains("mutable"),
        "{s}"
    );
}

#[test]
fn a_bad_policy_is_refused_naming_the_key() {
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("p.toml");
    fs::write(&f, "[scan]\nmax_hash_sise = \"1 GiB\"\n").unwrap();
    let r = agent([
        "policy".as_ref(),
        "show".as_ref(),
        "--policy".as_ref(),
        f.as_os_str(),
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("max_hash_sise") && r.stderr.contains("p.toml"),
        "{}",
        r.stderr
    );
}

#[test]
fn errors_exit_2_with_the_cause() {
    let t = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    let bl = t.path().join("bl");
    assert_eq!(baseline_create(&root, &bl, &keys, &[]).code, 0);
    let r = check_json(&t.path().join("nope"), &bl, &keys, None, &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("cannot scan root"), "{}", r.stderr);
    let r = check_json(&root, &t.path().join("missing.dwb"), &keys, None, &[]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("missing.dwb"), "{}", r.stderr);
}

#[test]
fn a_corrupted_scan_cache_is_discarded_with_a_warning_never_trusted() {
    let t = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    for i in 0..50 {
        fs::write(root.join(format!("f{i}")), format!("content {i}")).unwrap();
    }
    std::thread::sleep(Duration::from_millis(2500));
    let bl = t.path().join("bl");
    let state = t.path().join("state");
    assert_eq!(baseline_create(&root, &bl, &keys, &[]).code, 0);
    assert_eq!(check_json(&root, &bl, &keys, Some(&state), &[]).code, 0);
    let warm = check_json(&root, &bl, &keys, Some(&state), &[]);
    assert_eq!(warm.json()["summary"]["scan"]["cache_hits"], 50);

    let cache = state.join("scan-cache.v2");
    let mut bytes = fs::read(&cache).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&cache, &bytes).unwrap();
    // Meanwhile a file changes: the broken cache must not hide it.
    fs::write(root.join("f7"), "content X").unwrap();
    let r = check_json(&root, &bl, &keys, Some(&state), &[]);
    assert_eq!(r.code, 1);
    let j = r.json();
    assert_eq!(j["summary"]["scan"]["cache_hits"], 0);
    assert!(
        j["warnings"][0]
            .as_str()
            .unwrap()
            .contains("scan cache discarded")
            && j["warnings"][0].as_str().unwrap().contains("corrupt"),
        "{j}"
    );
    assert_eq!(j["violations"][0]["path"]["text"], "/f7");
    // The next check has a good cache again.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(check_json(&root, &bl, &keys, Some(&state), &[]).code, 1);
    let r = check_json(&root, &bl, &keys, Some(&state), &[]);
    assert!(r.json()["summary"]["scan"]["cache_hits"].as_u64().unwrap() >= 49);
    assert!(r.json()["warnings"].as_array().unwrap().is_empty());
}

#[test]
fn an_xattr_changed_behind_a_warm_scan_cache_is_reported() {
    // A cache hit stands for the xattrs too (setxattr moves ctime, so the stat key misses);
    // this pins that a changed xattr is found, and that a file whose xattrs already differed
    // from the baseline when it was hashed keeps being reported on later cache hits.
    let t = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    for i in 0..10 {
        fs::write(root.join(format!("f{i}")), format!("content {i}")).unwrap();
    }
    xattr::set(root.join("f3"), "user.origin", b"image").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let bl = t.path().join("bl");
    let state = t.path().join("state");
    assert_eq!(baseline_create(&root, &bl, &keys, &[]).code, 0);
    assert_eq!(check_json(&root, &bl, &keys, Some(&state), &[]).code, 0);
    let warm = check_json(&root, &bl, &keys, Some(&state), &[]);
    assert_eq!(warm.code, 0);
    assert_eq!(warm.json()["summary"]["scan"]["cache_hits"], 10);

    // Only xattrs change: content, size and mtime stay as they were.
    let mtime = fs::metadata(root.join("f3")).unwrap().modified().unwrap();
    xattr::set(root.join("f3"), "user.origin", b"tampered").unwrap();
    xattr::set(root.join("f5"), "user.added", b"1").unwrap();
    assert_eq!(
        fs::metadata(root.join("f3")).unwrap().modified().unwrap(),
        mtime
    );
    let expected = vec![
        finding(b"/f3", "modified", &["xattr user.origin"]),
        finding(b"/f5", "modified", &["xattr user.added"]),
    ];
    let r = check_json(&root, &bl, &keys, Some(&state), &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(findings(&r.json()), expected);
    assert_eq!(r.json()["summary"]["scan"]["cache_hits"], 8);

    // Hashed again with the changed xattrs: their content is cached from now on, their xattrs
    // are not (they are not the baseline's), so they are still reported.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(check_json(&root, &bl, &keys, Some(&state), &[]).code, 1);
    let r = check_json(&root, &bl, &keys, Some(&state), &[]);
    assert_eq!(r.code, 1);
    assert_eq!(findings(&r.json()), expected);
    assert_eq!(r.json()["summary"]["scan"]["cache_hits"], 10);

    // Put back: clean again.
    xattr::set(root.join("f3"), "user.origin", b"image").unwrap();
    xattr::remove(root.join("f5"), "user.added").unwrap();
    let r = check_json(&root, &bl, &keys, Some(&state), &[]);
    assert_eq!(r.code, 0, "{}", r.stdout_str());
}

fn key_paths(v: &serde_json::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, child) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                // Maps keyed by data (counts by kind or severity) are documented as maps.
                if prefix.ends_with("by_kind") || prefix.ends_with("by_severity") {
                    continue;
                }
                out.insert(p.clone());
                key_paths(child, &p, out);
            }
        }
        serde_json::Value::Array(a) => {
            for child in a {
                key_paths(child, &format!("{prefix}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_report_field_is_documented_in_the_schema() {
    let doc = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/report-schema.md"
    ))
    .unwrap();
    let t = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let root = t.path().join("root");
    fs::create_dir(&root).unwrap();
    fs::write(root.join("a"), "a").unwrap();
    fs::write(root.join("big"), "b").unwrap();
    std::os::unix::fs::symlink("a", root.join("l")).unwrap();
    let bl = t.path().join("bl");
    assert_eq!(
        baseline_create(&root, &bl, &keys, &["--expires", "30d"]).code,
        0
    );
    fs::write(root.join("a"), "A").unwrap();
    fs::remove_file(root.join("l")).unwrap();
    std::os::unix::fs::symlink("b", root.join("l2")).unwrap();
    fs::write(root.join("\u{1}x"), "new").unwrap();
    fs::write(root.join("\u{ff}"), "x").unwrap();
    let r = check_json(&root, &bl, &keys, None, &[]);
    let mut fields = BTreeSet::new();
    key_paths(&r.json(), "", &mut fields);
    assert!(fields.contains("violations[].changes[].before"));
    let missing: Vec<_> = fields
        .iter()
        .filter(|f| !doc.contains(&format!("`{f}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "fields missing from docs/report-schema.md: {missing:?}"
    );
}

#[test]
fn every_shipped_example_policy_parses() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/examples");
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        // policy-*.toml are policies; agent.toml and collector.toml are parsed by the tests of
        // their own crates' config modules.
        let is_policy = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("policy") && n.ends_with(".toml"));
        if is_policy {
            let r = agent([
                "policy".as_ref(),
                "show".as_ref(),
                "--policy".as_ref(),
                p.as_os_str(),
            ]);
            assert_eq!(r.code, 0, "{}: {}", p.display(), r.stderr);
            n += 1;
        }
    }
    assert!(n >= 1);
}
