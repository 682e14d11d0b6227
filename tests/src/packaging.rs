//! The real packages for tests: `packaging/build.sh` run for this test's profile and target
//! directory, so a test installs exactly what the workspace builds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{bin_dir, run_with_limit};

/// Builds the .debs into `out`; `version` overrides the package version. Returns the agent's
/// and the collector's package.
pub fn build_debs(out: &Path, version: Option<&str>) -> (PathBuf, PathBuf) {
    build(out, "--deb-only", version.map(|v| vec!["--version", v]))
}

/// Builds the RPMs into `out`; `version` overrides the package version and packs the binaries
/// of an earlier call as they are (`--no-build`: a rebuilt package of the same code). Returns
/// the agent's and the collector's package.
pub fn build_rpms(out: &Path, version: Option<&str>) -> (PathBuf, PathBuf) {
    build(
        out,
        "--rpm-only",
        version.map(|v| vec!["--version", v, "--no-build"]),
    )
}

fn build(out: &Path, only: &str, extra: Option<Vec<&str>>) -> (PathBuf, PathBuf) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let profile_dir = bin_dir();
    let profile = if profile_dir.file_name().is_some_and(|n| n == "release") {
        "release"
    } else {
        "dev"
    };
    let mut cmd = Command::new("bash");
    cmd.arg(workspace.join("packaging/build.sh"))
        .args(["--profile", profile, only, "--fast", "--out"])
        .arg(out)
        .args(extra.unwrap_or_default());
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let started = Instant::now();
    let r = run_with_limit(cmd, Duration::from_secs(3600));
    assert_eq!(
        r.code,
        0,
        "packaging/build.sh {only} failed:\n{}\n{}",
        r.stdout_str(),
        r.stderr
    );
    eprintln!("packaging/build.sh {only}: {:?}", started.elapsed());
    let rpm = only == "--rpm-only";
    let find = |name: &str| {
        std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let f = p.file_name().unwrap().to_string_lossy().into_owned();
                if rpm {
                    f.starts_with(&format!("{name}-")) && f.ends_with(".rpm")
                } else {
                    f.starts_with(&format!("{name}_")) && f.ends_with(".deb")
                }
            })
            .unwrap_or_else(|| panic!("no {name} package ({only}) in {}", out.display()))
    };
    (find("driftwatch-agent"), find("driftwatch-collector"))
}
