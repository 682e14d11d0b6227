//! Package awareness on an rpm root: two real packages built with rpmbuild and installed with
//! `rpm --root` into a real SQLite rpmdb; one erased, a file of the other tampered with. The
//! check reports the package drift and attributes every file violation; verify-packages finds
//! the tampered file from rpm's own digests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use driftwatch_tests::{
    Keys, baseline_create, check_json, json_path, require_program, require_root, run_with_limit,
};

const ALPHA: &str = r#"Name: dwrpm-alpha
Epoch: 1
Version: 2.0
Release: 3
Summary: driftwatch e2e test package
License: MIT
BuildArch: noarch
%description
driftwatch e2e test package.
%install
mkdir -p %{buildroot}/usr/bin %{buildroot}/etc
printf '#!/bin/sh\necho alpha\n' > %{buildroot}/usr/bin/dwalpha
printf 'alpha=1\n' > %{buildroot}/etc/dwalpha.conf
%files
%attr(0755,root,root) /usr/bin/dwalpha
%config(noreplace) /etc/dwalpha.conf
"#;

const BETA: &str = r#"Name: dwrpm-beta
Version: 0.9
Release: 1
Summary: driftwatch e2e test package
License: MIT
BuildArch: noarch
%description
driftwatch e2e test package.
%install
mkdir -p %{buildroot}/usr/lib/dwbeta
seq 1 2000 > %{buildroot}/usr/lib/dwbeta/data.txt
%files
%dir /usr/lib/dwbeta
/usr/lib/dwbeta/data.txt
"#;

fn run(cmd: Command) {
    let r = run_with_limit(cmd, Duration::from_secs(300));
    assert_eq!(r.code, 0, "{}\n{}", r.stdout_str(), r.stderr);
}

fn rpmbuild(dir: &Path, name: &str, spec: &str) -> PathBuf {
    let spec_file = dir.join(format!("{name}.spec"));
    fs::write(&spec_file, spec).unwrap();
    let top = dir.join("top");
    let mut cmd = Command::new("rpmbuild");
    cmd.args(["-bb", "--nodeps", "--define"])
        .arg(format!("_topdir {}", top.display()))
        .args([
            "--define",
            "_binary_filedigest_algorithm 8",
            "--define",
            "debug_package %{nil}",
        ])
        .args([
            "--define",
            "__os_install_post %{nil}",
            "--define",
            "_build_id_links none",
        ])
        .arg(&spec_file);
    run(cmd);
    let rpms = top.join("RPMS/noarch");
    fs::read_dir(&rpms)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(name))
        .unwrap()
}

fn rpm(root: &Path, args: &[&str]) {
    let mut cmd = Command::new("rpm");
    cmd.arg("--root")
        .arg(root)
        .args(["--dbpath", "/var/lib/rpm", "--define", "_db_backend sqlite"])
        .args(args);
    run(cmd);
}

#[test]
fn rpm_package_drift_is_detected_and_attributed() {
    if !require_root("rpm --root installs through chroot")
        || !require_program("rpmbuild")
        || !require_program("rpm")
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let alpha = rpmbuild(work.path(), "dwrpm-alpha", ALPHA);
    let beta = rpmbuild(work.path(), "dwrpm-beta", BETA);
    let root = work.path().join("root");
    fs::create_dir_all(root.join("var/lib/rpm")).unwrap();
    rpm(
        &root,
        &[
            "--nodeps",
            "-i",
            alpha.to_str().unwrap(),
            beta.to_str().unwrap(),
        ],
    );
    assert!(
        root.join("var/lib/rpm/rpmdb.sqlite").is_file(),
        "a real SQLite rpmdb"
    );

    let keys = Keys::new();
    let bl = work.path().join("image.dwb");
    let r = baseline_create(&root, &bl, &keys, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let show = driftwatch_tests::baseline_show_json(&bl, &[]);
    assert_eq!(show.code, 0);
    let r = check_json(&root, &bl, &keys, None, &[]);
    assert_eq!(
        r.code,
        0,
        "untouched rpm root not clean: {}",
        r.stdout_str()
    );
    let r = driftwatch_tests::verify_packages_json(&root);
    assert_eq!(r.code, 0, "{}", r.stdout_str());
    assert_eq!(r.json()["package_manager"], "rpm");

    // Erase one package; tamper with a file of the other (same size, so only the digest tells).
    rpm(&root, &["--nodeps", "-e", "dwrpm-beta"]);
    let bin = root.join("usr/bin/dwalpha");
    let mut content = fs::read(&bin).unwrap();
    let last = content.len() - 2;
    content[last] = b'X';
    fs::write(&bin, &content).unwrap();

    let r = check_json(&root, &bl, &keys, None, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let report = r.json();
    let drift = report["package_drift"].as_array().unwrap();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0]["name"], "dwrpm-beta");
    assert_eq!(drift[0]["arch"], "noarch");
    assert_eq!(drift[0]["kind"], "removed");
    assert_eq!(drift[0]["before"]["version"], "0.9-1");

    let mut got = Vec::new();
    for v in report["violations"].as_array().unwrap() {
        let path = String::from_utf8(json_path(&v["path"])).unwrap();
        let owners: Vec<String> = v["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect();
        got.push((
            path,
            v["kind"].as_str().unwrap().to_string(),
            v["class"].as_str().unwrap().to_string(),
            owners,
            v["severity"].as_str().unwrap().to_string(),
        ));
    }
    got.sort();
    let s = |x: &str| x.to_string();
    assert_eq!(
        got,
        vec![
            (
                s("/usr/bin/dwalpha"),
                s("modified"),
                s("unexplained"),
                vec![s("dwrpm-alpha:noarch")],
                s("critical")
            ),
            (
                s("/usr/lib/dwbeta"),
                s("removed"),
                s("package-change"),
                vec![s("dwrpm-beta:noarch")],
                s("low")
            ),
            (
                s("/usr/lib/dwbeta/data.txt"),
                s("removed"),
                s("package-change"),
                vec![s("dwrpm-beta:noarch")],
                s("low")
            ),
        ]
    );

    // verify-packages: the tampered file, from rpm's own SHA-256, and nothing else.
    let r = driftwatch_tests::verify_packages_json(&root);
    assert_eq!(r.code, 1);
    let findings = r.json()["findings"].as_array().unwrap().clone();
    assert_eq!(findings.len(), 1, "{findings:?}");
    assert_eq!(findings[0]["path"]["text"], "/usr/bin/dwalpha");
    assert_eq!(findings[0]["package"], "dwrpm-alpha:noarch");
    assert!(
        findings[0]["changes"][0]["before"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
}
