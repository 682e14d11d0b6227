//! Real Debian root filesystems for tests, built once with debootstrap from the mirror that
//! apt on this machine already uses, cached, and copied per test.
//!
//! The cache lives in `$DRIFTWATCH_TEST_CACHE` (default `/var/cache/driftwatch-tests`). A root
//! is built in a temporary directory and renamed into place, under a file lock, so parallel
//! tests wait for one build and never see a half-built root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::run_with_limit;

/// The cache directory.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("DRIFTWATCH_TEST_CACHE").map_or_else(
        || PathBuf::from("/var/cache/driftwatch-tests"),
        PathBuf::from,
    )
}

/// The release of this machine (`VERSION_CODENAME` of /etc/os-release), e.g. "bookworm".
pub fn suite() -> String {
    let text = fs::read_to_string("/etc/os-release").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "bookworm".to_string())
}

/// The Debian mirror apt uses here: the first `URIs:` of a deb822 source in
/// /etc/apt/sources.list.d/ that carries `suite`, else the first matching `deb` line of
/// /etc/apt/sources.list.
pub fn mirror(suite: &str) -> Option<String> {
    let mut files: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "sources"))
    {
        let text = fs::read_to_string(f).unwrap_or_default();
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            let suites = field("Suites:").unwrap_or_default();
            if suites.split_whitespace().any(|s| s == suite)
                && let Some(uris) = field("URIs:")
                && let Some(first) = uris.split_whitespace().next()
            {
                return Some(first.to_string());
            }
        }
    }
    let mut lists = vec![PathBuf::from("/etc/apt/sources.list")];
    lists.extend(
        files
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "list")),
    );
    for f in lists {
        for line in fs::read_to_string(f).unwrap_or_default().lines() {
            let words: Vec<&str> = line
                .split_whitespace()
                .filter(|w| !w.starts_with('['))
                .collect();
            if words.first() == Some(&"deb") && words.get(2) == Some(&suite) {
                return Some(words[1].to_string());
            }
        }
    }
    None
}

fn lock(path: &Path) -> nix::fcntl::Flock<fs::File> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .expect("open lock file");
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("flock")
}

/// The file in the cache beside a root that records the `--include` list it was built with.
fn include_stamp(target: &Path) -> PathBuf {
    let mut s = target.as_os_str().to_owned();
    s.push(".include");
    PathBuf::from(s)
}

/// The cached minbase root of this machine's Debian release, built on first use (needs root
/// and the network access apt has). `include` lists extra packages; each `name` is its own
/// cached root. The list a root was built with is recorded beside it (`<root>.include`): a
/// root whose recorded list differs from `include` is rebuilt, so changing a list never
/// leaves a stale cache. (A root cached before the record existed is taken as built with
/// `include`, and the record written: rebuilding it could pull it from under a running test.)
pub fn root(name: &str, include: &[&str]) -> PathBuf {
    let dir = cache_dir();
    fs::create_dir_all(&dir).expect("create test cache dir");
    let suite = suite();
    let target = dir.join(format!("debian-{suite}-{name}"));
    let _guard = lock(&dir.join(format!(".{name}.lock")));
    let want = include.join(",");
    let stamp = include_stamp(&target);
    if target.join("var/lib/dpkg/status").is_file() {
        match fs::read_to_string(&stamp) {
            Ok(got) if got.trim() == want => return target,
            Ok(got) => {
                eprintln!(
                    "the cached {name} root was built with --include={} and is wanted with \
                     --include={want}: rebuilding it",
                    got.trim()
                );
                let r = run_with_limit(
                    {
                        let mut c = Command::new("rm");
                        c.arg("-rf").arg(&target);
                        c
                    },
                    Duration::from_secs(300),
                );
                assert_eq!(r.code, 0, "removing the stale root failed: {}", r.stderr);
            }
            Err(_) => {
                fs::write(&stamp, format!("{want}\n")).expect("write include record");
                return target;
            }
        }
    }
    let mirror = mirror(&suite).unwrap_or_else(|| {
        panic!("no apt source for {suite} found in /etc/apt; cannot debootstrap")
    });
    let tmp = dir.join(format!(".debian-{suite}-{name}.building"));
    if tmp.exists() {
        // A build that was interrupted; never reuse it.
        let _ = Command::new("rm").arg("-rf").arg(&tmp).status();
    }
    let mut cmd = Command::new("debootstrap");
    cmd.arg("--variant=minbase");
    if !include.is_empty() {
        cmd.arg(format!("--include={}", include.join(",")));
    }
    cmd.arg(&suite).arg(&tmp).arg(&mirror);
    eprintln!(
        "building the Debian test root with {cmd:?} (once; cached in {})",
        dir.display()
    );
    let r = run_with_limit(cmd, Duration::from_secs(1200));
    assert_eq!(
        r.code,
        0,
        "debootstrap failed:\n{}\n{}",
        r.stdout_str(),
        r.stderr
    );
    // apt's downloaded packages are not part of an image.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "rm -f {}/var/cache/apt/archives/*.deb",
            tmp.display()
        ))
        .status();
    fs::rename(&tmp, &target).expect("rename built root into place");
    fs::write(&stamp, format!("{want}\n")).expect("write include record");
    target
}

/// The default test root: `debootstrap --variant=minbase` of this machine's release.
pub fn minbase() -> PathBuf {
    root("minbase", &[])
}

/// A private, writable copy of `src` (`cp -a`), removed when dropped.
pub fn copy(src: &Path) -> tempfile::TempDir {
    let parent = cache_dir().join("work");
    fs::create_dir_all(&parent).expect("create work dir");
    let dir = tempfile::Builder::new()
        .prefix("root-")
        .tempdir_in(&parent)
        .expect("tempdir");
    let mut cmd = Command::new("cp");
    cmd.arg("-a")
        .arg("--reflink=auto")
        .arg(format!("{}/.", src.display()))
        .arg(dir.path());
    let r = run_with_limit(cmd, Duration::from_secs(300));
    assert_eq!(r.code, 0, "copying the test root failed: {}", r.stderr);
    dir
}

/// Builds a binary package with `dpkg-deb --build` into `out_dir` and returns its path.
/// `files` are (absolute path, content); `conffiles` lists which of them are conffiles.
pub fn build_deb(
    out_dir: &Path,
    name: &str,
    version: &str,
    files: &[(&str, &str)],
    conffiles: &[&str],
) -> PathBuf {
    let tree = out_dir.join(format!("{name}_{version}.tree"));
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(tree.join("DEBIAN")).expect("create DEBIAN");
    fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: driftwatch tests <tests@invalid>\nPriority: optional\nSection: misc\nDescription: driftwatch test package {name}\n"
        ),
    )
    .expect("write control");
    if !conffiles.is_empty() {
        fs::write(
            tree.join("DEBIAN/conffiles"),
            conffiles
                .iter()
                .map(|c| format!("{c}\n"))
                .collect::<String>(),
        )
        .expect("conffiles");
    }
    for (path, content) in files {
        let p = tree.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, content).expect("write file");
    }
    let deb = out_dir.join(format!("{name}_{version}_all.deb"));
    let mut cmd = Command::new("dpkg-deb");
    cmd.args(["--root-owner-group", "--build"])
        .arg(&tree)
        .arg(&deb);
    let r = run_with_limit(cmd, Duration::from_secs(120));
    assert_eq!(r.code, 0, "dpkg-deb failed: {}", r.stderr);
    deb
}

/// Runs `dpkg --root ROOT ARGS...` (maintainer scripts run chrooted into the root).
pub fn dpkg(root: &Path, args: &[&str]) {
    let mut cmd = Command::new("dpkg");
    cmd.arg(format!("--root={}", root.display()))
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive");
    let r = run_with_limit(cmd, Duration::from_secs(300));
    assert_eq!(
        r.code,
        0,
        "dpkg {args:?} failed:\n{}\n{}",
        r.stdout_str(),
        r.stderr
    );
}
