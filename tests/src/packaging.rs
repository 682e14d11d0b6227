//! The real packages for tests: `packaging/build.sh` run for this test's profile and target
//! directory, so a test installs exactly what the workspace builds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{bin_dir, run_with_limit};

/// Builds the .debs into `out` with `packaging/build.sh`, for this test's profile and target
/// dir; `version` overrides the package version.
pub fn build_debs(out: &Path, version: Option<&str>) -> (PathBuf, PathBuf) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let profile_dir = bin_dir();
    let profile = if profile_dir.file_name().is_some_and(|n| n == "release") {
        "release"
    } else {
        "dev"
    };
    let mut cmd = Command::new("bash");
    cmd.arg(workspace.join("packaging/build.sh"))
        .args(["--profile", profile, "--deb-only", "--fast", "--out"])
        .arg(out);
    if let Some(v) = version {
        cmd.args(["--version", v]);
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let r = run_with_limit(cmd, Duration::from_secs(3600));
    assert_eq!(
        r.code,
        0,
        "packaging/build.sh failed:\n{}\n{}",
        r.stdout_str(),
        r.stderr
    );
    let find = |name: &str| {
        std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(&format!("{name}_"))
                    && p.extension().is_some_and(|e| e == "deb")
            })
            .unwrap_or_else(|| panic!("no {name} .deb in {}", out.display()))
    };
    (find("driftwatch-agent"), find("driftwatch-collector"))
}
