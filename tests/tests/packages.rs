//! Package awareness on a real Debian root: package drift (installed, removed, upgraded), and
//! every file violation attributed to its owning package and classified; `verify-packages`
//! agrees with debsums.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use driftwatch_tests::debian::{self, build_deb, dpkg};
use driftwatch_tests::{
    Keys, baseline_create, check_json, json_path, require_program, require_root, run_with_limit,
};

/// Paths debsums reports as changed or missing (`debsums --root R -s -a`).
fn debsums(root: &Path) -> BTreeSet<String> {
    let mut cmd = Command::new("debsums");
    cmd.arg(format!("--root={}", root.display()))
        .args(["-s", "-a"]);
    let r = run_with_limit(cmd, Duration::from_secs(300));
    // debsums prints the host path (root + package path); compare package paths.
    let prefix = root.display().to_string();
    r.stderr
        .lines()
        .filter_map(|l| {
            let rest = l
                .strip_prefix("debsums: changed file ")
                .or_else(|| l.strip_prefix("debsums: missing file "))?;
            let host = rest.split(" (from ").next()?;
            Some(
                host.strip_prefix(prefix.as_str())
                    .unwrap_or(host)
                    .to_string(),
            )
        })
        .collect()
}

fn verify_packages(root: &Path) -> (i32, serde_json::Value) {
    let r = driftwatch_tests::verify_packages_json(root);
    assert!(
        r.code == 0 || r.code == 1,
        "verify-packages failed: {}",
        r.stderr
    );
    (r.code, r.json())
}

/// The canonical paths of verify-packages findings, in dpkg's spelling (as debsums prints
/// them): the package's own path.
fn finding_paths(report: &serde_json::Value) -> BTreeSet<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| String::from_utf8(json_path(&f["path"])).unwrap())
        .collect()
}

#[test]
fn package_drift_is_reported_and_every_file_attributed() {
    if !require_root("dpkg --root runs maintainer scripts chrooted")
        || !require_program("dpkg-deb")
        || !require_program("debsums")
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let debs = work.path();
    let conf_v1 = build_deb(
        debs,
        "dwtest-conf",
        "1.0",
        &[
            ("/etc/dwtest/dwtest.conf", "listen 8080\n"),
            ("/usr/share/dwtest-conf/README", "conf package\n"),
        ],
        &["/etc/dwtest/dwtest.conf"],
    );
    let up_v1 = build_deb(
        debs,
        "dwtest-up",
        "1.0",
        &[("/usr/lib/dwtest-up/data.txt", "version one\n")],
        &[],
    );
    let up_v11 = build_deb(
        debs,
        "dwtest-up",
        "1.1",
        &[("/usr/lib/dwtest-up/data.txt", "version one.one\n")],
        &[],
    );
    let new_v1 = build_deb(
        debs,
        "dwtest-new",
        "1.0",
        &[("/usr/bin/dwtest-new", "#!/bin/sh\necho new\n")],
        &[],
    );

    let copy = debian::copy(&debian::minbase());
    let root = copy.path();
    dpkg(
        root,
        &["-i", conf_v1.to_str().unwrap(), up_v1.to_str().unwrap()],
    );

    // The image: its baseline carries the package inventory and file owners.
    let keys = Keys::new();
    let bl = work.path().join("image.dwb");
    let r = baseline_create(root, &bl, &keys, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = check_json(root, &bl, &keys, None, &[]);
    assert_eq!(
        r.code,
        0,
        "untouched root is not clean:\n{}",
        r.stdout_str()
    );

    // verify-packages agrees with debsums on the untouched root: nothing.
    let (code, report) = verify_packages(root);
    assert_eq!(
        code,
        0,
        "untouched root: {:?}",
        finding_paths(&report)
            .into_iter()
            .take(10)
            .collect::<Vec<_>>()
    );
    assert!(debsums(root).is_empty());
    let adduser_files: BTreeSet<Vec<u8>> =
        fs::read_to_string(root.join("var/lib/dpkg/info/adduser.list"))
            .unwrap()
            .lines()
            .map(|l| l.as_bytes().to_vec())
            .collect();

    // --- drift ---
    dpkg(root, &["-i", new_v1.to_str().unwrap()]); // installed
    dpkg(root, &["--purge", "--force-depends", "adduser"]); // removed
    dpkg(root, &["-i", up_v11.to_str().unwrap()]); // upgraded to a rebuilt higher version
    fs::write(root.join("etc/dwtest/dwtest.conf"), "listen 0.0.0.0:22\n").unwrap(); // conffile changed
    let tac = root.join("usr/bin/tac");
    let len = fs::metadata(&tac).unwrap().len() as usize;
    fs::write(&tac, vec![b'X'; len]).unwrap(); // a file of an unchanged package overwritten

    let r = check_json(root, &bl, &keys, None, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();

    let drift: BTreeSet<(String, String, String, String)> = report["package_drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let v = |x: &serde_json::Value| x["version"].as_str().unwrap_or("-").to_string();
            (
                d["name"].as_str().unwrap().to_string(),
                d["kind"].as_str().unwrap().to_string(),
                v(&d["before"]),
                v(&d["after"]),
            )
        })
        .collect();
    let adduser_version = report["package_drift"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "adduser")
        .unwrap()["before"]["version"]
        .as_str()
        .unwrap()
        .to_string();
    let want: BTreeSet<(String, String, String, String)> = [
        ("adduser", "removed", adduser_version.as_str(), "-"),
        ("dwtest-new", "installed", "-", "1.0"),
        ("dwtest-up", "changed", "1.0", "1.1"),
    ]
    .iter()
    .map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string()))
    .collect();
    assert_eq!(drift, want);

    let mut explained_removals = 0;
    let mut seen = BTreeSet::new();
    for v in report["violations"].as_array().unwrap() {
        let path = json_path(&v["path"]);
        let p = String::from_utf8_lossy(&path).to_string();
        let kind = v["kind"].as_str().unwrap();
        let class = v["class"].as_str().unwrap_or("(none)");
        let owners: Vec<&str> = v["packages"]
            .as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap()).collect())
            .unwrap_or_default();
        let sev = v["severity"].as_str().unwrap();
        match p.as_str() {
            // Its owner is only in the live database: attributed from the file lists that the
            // check reads once there is a file violation to attribute.
            "/usr/bin/dwtest-new" => assert_eq!(
                (kind, class, owners.as_slice(), sev),
                ("added", "package-change", &["dwtest-new:all"][..], "low"),
                "{v}"
            ),
            "/usr/lib/dwtest-up/data.txt" => {
                assert_eq!(
                    (kind, class, owners.as_slice(), sev),
                    ("modified", "package-change", &["dwtest-up:all"][..], "low"),
                    "{v}"
                )
            }
            "/etc/dwtest/dwtest.conf" => {
                assert_eq!(
                    (kind, class, owners.as_slice(), sev),
                    (
                        "modified",
                        "unexplained",
                        &["dwtest-conf:all"][..],
                        "critical"
                    ),
                    "{v}"
                );
                assert_eq!(v["config"], true);
            }
            "/usr/bin/tac" => assert_eq!(
                (kind, class, owners.as_slice(), sev),
                (
                    "modified",
                    "unexplained",
                    &["coreutils:amd64"][..],
                    "critical"
                ),
                "{v}"
            ),
            _ => {
                // Everything else is a file or directory of the purged package, removed, and
                // explained by that removal.
                assert_eq!(kind, "removed", "unexpected violation {v}");
                assert!(owners.contains(&"adduser:all"), "{v}");
                assert_eq!(class, "package-change", "{v}");
                assert!(
                    adduser_files
                        .iter()
                        .any(|f| f.as_slice() == path.as_slice() || f.ends_with(&path)),
                    "{v}"
                );
                explained_removals += 1;
            }
        }
        seen.insert(p);
    }
    for p in [
        "/usr/bin/dwtest-new",
        "/usr/lib/dwtest-up/data.txt",
        "/etc/dwtest/dwtest.conf",
        "/usr/bin/tac",
        "/usr/sbin/adduser",
    ] {
        assert!(seen.contains(p), "{p} not reported");
    }
    assert!(explained_removals >= 3);

    // verify-packages reports the same files as debsums: the conffile and the overwritten file
    // (the upgraded and the new package are consistent with themselves).
    let (code, report) = verify_packages(root);
    assert_eq!(code, 1);
    let ours = finding_paths(&report);
    let theirs = debsums(root);
    // debsums prints dpkg's own spelling (/usr/bin/tac); ours is the package path too.
    assert_eq!(ours, theirs, "verify-packages and debsums disagree");
    assert_eq!(
        ours,
        [
            "/etc/dwtest/dwtest.conf".to_string(),
            "/usr/bin/tac".to_string()
        ]
        .into()
    );
}

#[test]
fn file_lists_are_read_only_when_a_file_violation_needs_an_owner() {
    if !require_root("copies of the Debian root keep owners only as root") {
        return;
    }
    let copy = debian::copy(&debian::minbase());
    let root = copy.path();
    let work = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let bl = work.path().join("image.dwb");
    let r = baseline_create(root, &bl, &keys, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    // A file list dpkg itself would refuse (no final newline). /var/lib/** is mutable, so the
    // file's own change is no violation.
    let list = root.join("var/lib/dpkg/info/sed.list");
    let mut data = fs::read(&list).unwrap();
    assert_eq!(data.pop(), Some(b'\n'));
    fs::write(&list, data).unwrap();

    // Nothing to attribute: package drift comes from `status` alone, the lists are not read.
    let r = check_json(root, &bl, &keys, None, &[]);
    assert_eq!(r.code, 0, "{}", r.stdout_str());
    assert!(r.json()["warnings"].as_array().unwrap().is_empty());

    // A file violation needs its owner: now the lists are read, and the broken one is reported
    // instead of an attribution (package drift, from `status`, is still known: none).
    fs::write(root.join("usr/bin/tac"), "tampered\n").unwrap();
    let r = check_json(root, &bl, &keys, None, &[]);
    assert_eq!(r.code, 1);
    let report = r.json();
    assert!(report["package_drift"].as_array().unwrap().is_empty());
    let violations = report["violations"].as_array().unwrap();
    let db = violations
        .iter()
        .find(|v| json_path(&v["path"]) == b"/var/lib/dpkg/status")
        .unwrap_or_else(|| panic!("no package database finding: {report}"));
    assert_eq!(db["kind"], "unverifiable");
    let reason = db["reason"].as_str().unwrap();
    assert!(
        reason.contains("file lists cannot be read") && reason.contains("sed.list"),
        "{reason}"
    );
    let tac = violations
        .iter()
        .find(|v| json_path(&v["path"]) == b"/usr/bin/tac")
        .unwrap();
    assert_eq!(tac["kind"], "modified");
}
