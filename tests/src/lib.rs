//! Test harness for driftwatch's end-to-end tests: locating the real binaries, running them
//! with a time limit, building and caching real Debian root filesystems, and the rules for
//! tests that need root, and a throwaway PostgreSQL server (`postgres`).
//!
//! Run the suite with `cargo test --workspace` (which builds the binaries first) or
//! `tests/run.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// True when running under CI, where skipping a test is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// True when the process is root. A test that needs root calls this first: outside CI it
/// skips with the reason printed; under `CI=true` it fails.
pub fn require_root(why: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        !in_ci(),
        "this test needs root ({why}) and CI=true forbids skipping it"
    );
    eprintln!("SKIPPED: needs root ({why})");
    false
}

/// Like [`require_root`] for an external program.
pub fn require_program(name: &str) -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        assert!(
            !in_ci(),
            "this test needs `{name}` and CI=true forbids skipping it"
        );
        eprintln!("SKIPPED: `{name}` is not installed");
    }
    found
}

/// The directory holding the workspace's built binaries (next to this test executable).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test-binary>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// Rebuilds the workspace binaries once per test process when running under cargo, so a test
/// target run on its own (`cargo test --test hostile`) never exercises a stale binary.
fn ensure_fresh_binaries() {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| cargo_build(&["--workspace", "--bins"]));
}

/// Runs `cargo build --quiet ARGS` for this workspace, profile and target dir (nothing when
/// not running under cargo).
fn cargo_build(args: &[&str]) {
    {
        let Some(cargo) = std::env::var_os("CARGO") else {
            return;
        };
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let profile_dir = bin_dir();
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet"])
            .args(args)
            .arg("--manifest-path")
            .arg(&manifest);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        if let Some(target) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let r = run_with_limit(cmd, Duration::from_secs(1800));
        assert_eq!(r.code, 0, "building {args:?} failed:\n{}", r.stderr);
    }
}

/// `driftwatch-collector` built with the `failpoints` feature, at
/// `<profile dir>/failpoints/driftwatch-collector`. Built once per test process by
/// `cargo build -p driftwatch-collector --features failpoints` in the same target dir (its
/// dependencies are shared with the normal build; only the collector crate is compiled
/// twice), copied aside, and the normal binaries are put back in place by building them again
/// (cargo only relinks them), so every other test keeps running the binary that ships.
pub fn failpoint_collector() -> PathBuf {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let out = bin_dir().join("failpoints").join("driftwatch-collector");
    ONCE.get_or_init(|| {
        if std::env::var_os("CARGO").is_none() {
            return;
        }
        ensure_fresh_binaries();
        cargo_build(&["-p", "driftwatch-collector", "--features", "failpoints"]);
        fs::create_dir_all(out.parent().unwrap()).unwrap();
        let tmp = out.with_extension("tmp");
        fs::copy(bin_dir().join("driftwatch-collector"), &tmp).unwrap();
        fs::rename(&tmp, &out).unwrap();
        cargo_build(&["--workspace", "--bins"]);
    });
    assert!(
        out.is_file(),
        "{} is missing: run the test under cargo, which builds it",
        out.display()
    );
    out
}

/// Path of a workspace binary, rebuilt first if its sources changed.
pub fn binary(name: &str) -> PathBuf {
    ensure_fresh_binaries();
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run the suite with `cargo test --workspace` (or tests/run.sh), which builds it",
        p.display()
    );
    p
}

/// A finished command.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout_str(),
                self.stderr
            )
        })
    }
}

/// Runs `cmd` to completion, killing it after `limit` (a hang is a test failure, never a
/// stuck suite).
pub fn run_with_limit(mut cmd: Command, limit: Duration) -> Run {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = out_t.join().unwrap();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap()).into_owned();
    Run {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr,
        elapsed: started.elapsed(),
    }
}

/// Runs `driftwatch-agent` with `args` (at most 10 minutes).
pub fn agent<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(binary("driftwatch-agent"));
    cmd.args(args);
    run_with_limit(cmd, Duration::from_secs(600))
}

/// A signing key pair in a temporary directory.
#[derive(Debug)]
pub struct Keys {
    pub dir: tempfile::TempDir,
    pub private: PathBuf,
    pub public: PathBuf,
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let r = agent([
            OsStr::new("keygen"),
            OsStr::new("--out"),
            dir.path().join("k").as_os_str(),
        ]);
        assert_eq!(r.code, 0, "keygen failed: {}", r.stderr);
        Keys {
            private: dir.path().join("k.key"),
            public: dir.path().join("k.pub"),
            dir,
        }
    }
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new()
    }
}

/// Creates a baseline of `root` at `out` with `extra` arguments; panics on failure.
pub fn baseline_create(root: &Path, out: &Path, keys: &Keys, extra: &[&str]) -> Run {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("baseline"),
        OsStr::new("create"),
        OsStr::new("--root"),
        root.as_os_str(),
        OsStr::new("--image-id"),
        OsStr::new("test-image"),
        OsStr::new("--image-version"),
        OsStr::new("1"),
        OsStr::new("--sign-key"),
        keys.private.as_os_str(),
        OsStr::new("--out"),
        out.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    agent(args)
}

/// The arguments of `check` of `root` against `baseline`, trusting `keys`.
fn check_args<'a>(root: &'a Path, baseline: &'a Path, keys: &'a Keys) -> Vec<&'a OsStr> {
    vec![
        OsStr::new("check"),
        OsStr::new("--baseline"),
        baseline.as_os_str(),
        OsStr::new("--trusted-key"),
        keys.public.as_os_str(),
        OsStr::new("--root"),
        root.as_os_str(),
    ]
}

/// Runs `check --format json` of `root` against `baseline`; `state` is the state directory.
pub fn check_json(
    root: &Path,
    baseline: &Path,
    keys: &Keys,
    state: Option<&Path>,
    extra: &[&str],
) -> Run {
    let mut args = check_args(root, baseline, keys);
    args.extend([OsStr::new("--format"), OsStr::new("json")]);
    if let Some(s) = state {
        args.push(OsStr::new("--state-dir"));
        args.push(s.as_os_str());
    }
    args.extend(extra.iter().map(OsStr::new));
    agent(args)
}

/// Runs `check` of `root` against `baseline` with the human (text) report.
pub fn check_text(root: &Path, baseline: &Path, keys: &Keys) -> Run {
    agent(check_args(root, baseline, keys))
}

/// Runs `baseline show FILE --format json` with `extra` arguments.
pub fn baseline_show_json(baseline: &Path, extra: &[&str]) -> Run {
    let mut args = vec![
        OsStr::new("baseline"),
        OsStr::new("show"),
        baseline.as_os_str(),
    ];
    args.extend([OsStr::new("--format"), OsStr::new("json")]);
    args.extend(extra.iter().map(OsStr::new));
    agent(args)
}

/// Runs `verify-packages --root ROOT --format json`.
pub fn verify_packages_json(root: &Path) -> Run {
    agent([
        OsStr::new("verify-packages"),
        OsStr::new("--root"),
        root.as_os_str(),
        OsStr::new("--format"),
        OsStr::new("json"),
    ])
}

/// Decodes a JSON path (`{"text": ..}` or `{"bytes": base64}`) to raw bytes.
pub fn json_path(v: &serde_json::Value) -> Vec<u8> {
    use base64::Engine;
    if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
        return t.as_bytes().to_vec();
    }
    let b = v
        .get("bytes")
        .and_then(|b| b.as_str())
        .unwrap_or_else(|| panic!("not a JSON path: {v}"));
    base64::engine::general_purpose::STANDARD.decode(b).unwrap()
}

/// A violation reduced to what tests compare: (path, kind, sorted changed attributes).
pub type Finding = (Vec<u8>, String, Vec<String>);

/// The findings of a check report.
pub fn findings(report: &serde_json::Value) -> Vec<Finding> {
    let mut out: Vec<Finding> = report["violations"]
        .as_array()
        .unwrap_or_else(|| panic!("report has no violations array: {report}"))
        .iter()
        .map(|v| {
            let mut attrs: Vec<String> = v["changes"]
                .as_array()
                .map(|c| {
                    c.iter()
                        .map(|c| c["attribute"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default();
            attrs.sort();
            (
                json_path(&v["path"]),
                v["kind"].as_str().unwrap().to_string(),
                attrs,
            )
        })
        .collect();
    out.sort();
    out
}

/// Shorthand for building expected findings.
pub fn finding(path: &[u8], kind: &str, attrs: &[&str]) -> Finding {
    let mut a: Vec<String> = attrs.iter().map(|s| s.to_string()).collect();
    a.sort();
    (path.to_vec(), kind.to_string(), a)
}

pub mod daemon;
pub mod debian;
pub mod fleet;
pub mod nspawn;
pub mod packaging;
pub mod postgres;
pub mod webhook;
