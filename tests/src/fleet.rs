//! A fleet from the real binaries: a `driftwatch-collector serve` on free loopback ports, agents
//! enrolled with a token and running `driftwatch-agent run` on their own Debian roots, and the
//! collector's view read back through the `driftwatch` CLI (`--format json`).
//!
//! Every wait is bounded ([`wait_until`]); every daemon is killed when its guard drops.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::daemon::{Daemon, free_port, wait_until};
use crate::{Keys, binary, json_path, run_with_limit};

/// How long a CLI call may take before the test fails.
const CLI_LIMIT: Duration = Duration::from_secs(60);

/// Where a collector keeps its state, how it is reached, and its process (`None` while stopped).
#[derive(Debug)]
pub struct Collector {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// `https://127.0.0.1:PORT`, for agents.
    pub grpc_url: String,
    /// `http://127.0.0.1:PORT`, for the `driftwatch` CLI.
    pub api: String,
    /// An admin API token (`dwa_…`) the `driftwatch` CLI uses.
    pub api_token: String,
    pub daemon: Option<Daemon>,
    /// The binary `start` runs (the normal one, or one built with the `failpoints` feature).
    pub exe: PathBuf,
}

impl Collector {
    /// Writes a config in `dir` (state in `dir/state`, SQLite unless `database_url`, heartbeat
    /// every 2 s) and starts `driftwatch-collector serve`, waiting until its HTTP API answers.
    pub fn start(dir: &Path, database_url: Option<&str>) -> Collector {
        Collector::start_exe(dir, database_url, binary("driftwatch-collector"))
    }

    /// Like [`Collector::start`] with another collector binary.
    pub fn start_exe(dir: &Path, database_url: Option<&str>, exe: PathBuf) -> Collector {
        Collector::start_configured(dir, database_url, exe, "")
    }

    /// Like [`Collector::start_exe`], with `extra` appended to the configuration (keys, then
    /// any `[section]`s: it comes last).
    pub fn start_configured(
        dir: &Path,
        database_url: Option<&str>,
        exe: PathBuf,
        extra: &str,
    ) -> Collector {
        Collector::start_listening(dir, database_url, exe, "127.0.0.1", "2s", extra)
    }

    /// Like [`Collector::start_configured`], with the agents' gRPC port on `grpc_ip` (an
    /// address of this host, e.g. on a bridge to booted machines; also the server
    /// certificate's name) and `heartbeat_interval` (hosts are silent after three). The HTTP
    /// API stays on loopback.
    pub fn start_listening(
        dir: &Path,
        database_url: Option<&str>,
        exe: PathBuf,
        grpc_ip: &str,
        heartbeat: &str,
        extra: &str,
    ) -> Collector {
        let grpc = free_port();
        let http = free_port();
        let config = dir.join("collector.toml");
        let mut text = format!(
            "state_dir = {state:?}\ngrpc_listen = \"{grpc_ip}:{grpc}\"\n\
             http_listen = \"127.0.0.1:{http}\"\nserver_names = [\"{grpc_ip}\"]\n\
             heartbeat_interval = \"{heartbeat}\"\n",
            state = dir.join("state").display().to_string(),
        );
        if let Some(url) = database_url {
            text.push_str(&format!("database_url = {url:?}\n"));
        }
        text.push_str(extra);
        fs::write(&config, text).expect("write collector config");
        let mut c = Collector {
            dir: dir.to_path_buf(),
            config,
            grpc_url: format!("https://{grpc_ip}:{grpc}"),
            api: format!("http://127.0.0.1:{http}"),
            api_token: String::new(),
            daemon: None,
            exe,
        };
        // Made on the database before the server starts, as an operator bootstraps one.
        let out = c.admin(&["api-token", "create", "--role", "admin", "--name", "tests"]);
        c.api_token = out.trim().to_string();
        assert!(c.api_token.starts_with("dwa_"), "no API token in {out:?}");
        c.restart(&[]);
        c
    }

    /// Starts the (stopped) collector again with extra environment variables, and waits until
    /// its HTTP API answers.
    pub fn restart(&mut self, env: &[(&str, &str)]) {
        assert!(self.daemon.is_none(), "collector is still running");
        let mut cmd = Command::new(&self.exe);
        cmd.arg("serve").arg("--config").arg(&self.config);
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let d = Daemon::start("collector", cmd, &self.dir.join("collector.log"));
        self.daemon = Some(d);
        wait_until(
            "the collector's HTTP API",
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                if let Some(st) = self.daemon.as_mut().and_then(Daemon::try_exit) {
                    panic!("collector exited with {st}:\n{}", self.log());
                }
                self.try_hosts().map(|_| ())
            },
        );
    }

    /// SIGKILLs the collector (a crash).
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill_hard();
        }
    }

    /// Stops the collector with SIGTERM (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(10));
        }
    }

    /// The collector's log so far.
    pub fn log(&self) -> String {
        fs::read(self.dir.join("collector.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn admin(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(&self.exe);
        cmd.args(args).arg("--config").arg(&self.config);
        let r = run_with_limit(cmd, CLI_LIMIT);
        assert_eq!(r.code, 0, "driftwatch-collector {args:?}: {}", r.stderr);
        r.stdout_str()
    }

    /// `token create --uses N`: the printed `dwt_…` token.
    pub fn token(&self, uses: u32) -> String {
        let out = self.admin(&["token", "create", "--uses", &uses.to_string()]);
        out.split_whitespace()
            .find(|w| w.starts_with("dwt_"))
            .unwrap_or_else(|| panic!("no token in {out:?}"))
            .to_string()
    }

    /// `ca show`: the CA's SHA-256 fingerprint.
    pub fn ca_fingerprint(&self) -> String {
        let out = self.admin(&["ca", "show"]);
        out.lines()
            .find_map(|l| l.strip_prefix("sha256 fingerprint:"))
            .unwrap_or_else(|| panic!("no fingerprint in {out:?}"))
            .trim()
            .to_string()
    }

    /// Runs `driftwatch --api … --format json ARGS`; an error (not running, exit ≠ 0) is `Err`.
    pub fn cli(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let out = self.cli_text(&[&["--format", "json"], args].concat())?;
        serde_json::from_str(&out).map_err(|e| format!("not JSON ({e}): {out}"))
    }

    /// Runs `driftwatch --api … ARGS` (with the admin token); its standard output, or `Err`
    /// with the exit status and standard error.
    pub fn cli_text(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(binary("driftwatch"));
        cmd.args(["--api", &self.api, "--timeout", "10s"])
            .args(args)
            .env("DRIFTWATCH_TOKEN", &self.api_token);
        let r = run_with_limit(cmd, CLI_LIMIT);
        if r.code != 0 {
            return Err(format!("driftwatch {args:?} exit {}: {}", r.code, r.stderr));
        }
        Ok(r.stdout_str())
    }

    /// Every host's (host id, lifecycle), sorted.
    pub fn lifecycles(&self) -> Result<Vec<(String, String)>, String> {
        let mut v: Vec<(String, String)> = self
            .try_hosts()?
            .iter()
            .map(|h| {
                (
                    h["host_id"].as_str().unwrap_or("").to_string(),
                    h["lifecycle"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        v.sort();
        Ok(v)
    }

    /// Waits (at most `limit`, polling every 250 ms) until [`Collector::lifecycles`] is `want`.
    pub fn wait_lifecycles(&self, what: &str, limit: Duration, want: &[(&str, &str)]) {
        let mut want: Vec<(String, String)> = want
            .iter()
            .map(|(h, l)| (h.to_string(), l.to_string()))
            .collect();
        want.sort();
        wait_until(what, limit, Duration::from_millis(250), || {
            let got = self.lifecycles()?;
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}, want {want:?}"))
            }
        });
    }

    /// `driftwatch hosts`: the `hosts` array.
    pub fn try_hosts(&self) -> Result<Vec<serde_json::Value>, String> {
        let v = self.cli(&["hosts"])?;
        v["hosts"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("no hosts array: {v}"))
    }

    /// `driftwatch host show HOST`: the host object.
    pub fn try_host(&self, host: &str) -> Result<serde_json::Value, String> {
        let v = self.cli(&["host", "show", host])?;
        Ok(v["host"]["host"].clone())
    }

    /// The host's open violations as sorted (path, kind) pairs (file items only; package drift
    /// has no path and shows as its package name).
    pub fn try_open(&self, host: &str) -> Result<Vec<Drift>, String> {
        let v = self.cli(&["host", "show", host])?;
        let list = v["violations"]["violations"]
            .as_array()
            .ok_or_else(|| format!("no violations array: {v}"))?;
        Ok(drifts(list))
    }

    /// The raw open violation objects of a host.
    pub fn try_violations(&self, host: &str) -> Result<Vec<serde_json::Value>, String> {
        let v = self.cli(&["host", "show", host])?;
        v["violations"]["violations"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("no violations array: {v}"))
    }

    /// Waits until every host in `want` is listed with exactly the open drift given (and
    /// state `clean` when it has none, `drifted` otherwise).
    pub fn wait_for_state(&self, what: &str, limit: Duration, want: &[(&str, Vec<Drift>)]) {
        wait_until(what, limit, Duration::from_millis(250), || {
            let hosts = self.try_hosts()?;
            for (host, drift) in want {
                let h = hosts
                    .iter()
                    .find(|h| h["host_id"] == *host)
                    .ok_or_else(|| format!("{host} not listed"))?;
                let state = if drift.is_empty() { "clean" } else { "drifted" };
                if h["state"] != state {
                    return Err(format!("{host}: {h}"));
                }
                let open = self.try_open(host)?;
                if open != *drift {
                    return Err(format!("{host} open drift {open:?}, want {drift:?}"));
                }
            }
            Ok(())
        });
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- collector log ---\n{}", self.log());
        }
    }
}

/// The `postgresql://` URL the collector's `database_url` wants for a libpq-style connection
/// string (`host=DIR port=P user=U dbname=D`, as [`crate::postgres::PgServer::url`] gives).
pub fn postgres_url(conninfo: &str) -> String {
    let get = |k: &str| {
        conninfo
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k} in {conninfo:?}"))
    };
    format!(
        "postgresql://{}@/{}?host={}&port={}",
        get("user"),
        get("dbname"),
        get("host"),
        get("port")
    )
}

/// A drift item reduced to what fleet tests compare: (path or package, kind).
pub type Drift = (Vec<u8>, String);

/// Sorted (path, kind) pairs of a list of API violations or check report violations.
pub fn drifts(list: &[serde_json::Value]) -> Vec<Drift> {
    let mut out: Vec<Drift> = list
        .iter()
        .map(|v| {
            let path = if v.get("path").is_some_and(|p| !p.is_null()) {
                json_path(&v["path"])
            } else {
                v["package"]
                    .as_str()
                    .or_else(|| v["package"]["name"].as_str())
                    .unwrap_or("")
                    .as_bytes()
                    .to_vec()
            };
            (path, v["kind"].as_str().unwrap_or("").to_string())
        })
        .collect();
    out.sort();
    out
}

/// Shorthand for expected drift.
pub fn drift(path: &str, kind: &str) -> Drift {
    (path.as_bytes().to_vec(), kind.to_string())
}

/// A signed baseline shared by a test's agents.
#[derive(Debug)]
pub struct Image {
    pub keys: Keys,
    pub baseline: PathBuf,
}

impl Image {
    /// Baselines `root` into `dir/image.dwb`.
    pub fn create(root: &Path, dir: &Path) -> Image {
        let keys = Keys::new();
        let baseline = dir.join("image.dwb");
        let r = crate::baseline_create(root, &baseline, &keys, &[]);
        assert_eq!(r.code, 0, "baseline create: {}", r.stderr);
        Image { keys, baseline }
    }
}

/// An enrolled agent: its state dir, config, root, and daemon (`None` while stopped).
#[derive(Debug)]
pub struct Agent {
    pub host_id: String,
    pub dir: PathBuf,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    pub root: PathBuf,
    pub daemon: Option<Daemon>,
}

impl Agent {
    /// Enrolls `host_id` (state in `dir/state`) with `token` and writes its daemon config
    /// (`scan_interval` 2 s) checking `root` against `image`. Not started.
    pub fn enroll(
        collector: &Collector,
        token: &str,
        fingerprint: &str,
        host_id: &str,
        dir: &Path,
        root: &Path,
        image: &Image,
    ) -> Agent {
        Agent::enroll_labeled(
            collector,
            token,
            fingerprint,
            host_id,
            dir,
            root,
            image,
            &[],
        )
    }

    /// Like [`Agent::enroll`], with enrollment labels (`["role=web"]`).
    #[allow(clippy::too_many_arguments)]
    pub fn enroll_labeled(
        collector: &Collector,
        token: &str,
        fingerprint: &str,
        host_id: &str,
        dir: &Path,
        root: &Path,
        image: &Image,
        labels: &[&str],
    ) -> Agent {
        let state_dir = dir.join("state");
        fs::create_dir_all(&state_dir).expect("agent state dir");
        let label_args = labels
            .iter()
            .flat_map(|l| [OsStr::new("--label"), OsStr::new(l)]);
        let r = crate::agent(
            [
                OsStr::new("enroll"),
                OsStr::new("--collector"),
                OsStr::new(&collector.grpc_url),
                OsStr::new("--ca-fingerprint"),
                OsStr::new(fingerprint),
                OsStr::new("--token"),
                OsStr::new(token),
                OsStr::new("--host-id"),
                OsStr::new(host_id),
                OsStr::new("--state-dir"),
                state_dir.as_os_str(),
            ]
            .into_iter()
            .chain(label_args),
        );
        assert_eq!(
            r.code,
            0,
            "enroll {host_id}: {}\n{}",
            r.stdout_str(),
            r.stderr
        );
        let config = dir.join("agent.toml");
        let text = format!(
            "collector = {url:?}\ntrusted_keys = [{key:?}]\nbaseline = {bl:?}\n\
             state_dir = {st:?}\nroot = {root:?}\nscan_interval = \"2s\"\nthreads = 2\n",
            url = collector.grpc_url,
            key = image.keys.public.display().to_string(),
            bl = image.baseline.display().to_string(),
            st = state_dir.display().to_string(),
            root = root.display().to_string(),
        );
        fs::write(&config, text).expect("write agent config");
        Agent {
            host_id: host_id.to_string(),
            dir: dir.to_path_buf(),
            state_dir,
            config,
            root: root.to_path_buf(),
            daemon: None,
        }
    }

    /// Starts `driftwatch-agent run --config …` (output appended to `dir/agent.log`).
    pub fn start(&mut self) {
        assert!(self.daemon.is_none(), "agent {} is running", self.host_id);
        let mut cmd = Command::new(binary("driftwatch-agent"));
        cmd.arg("run").arg("--config").arg(&self.config);
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1");
        self.daemon = Some(Daemon::start(
            &self.host_id,
            cmd,
            &self.dir.join("agent.log"),
        ));
    }

    /// SIGKILL (a crash at whatever point it was).
    pub fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill_hard();
        }
    }

    /// SIGTERM, SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.stop(Duration::from_secs(10));
        }
    }

    /// SIGUSR1: scan now.
    pub fn scan_now(&self) {
        if let Some(d) = &self.daemon {
            d.signal(nix::sys::signal::Signal::SIGUSR1);
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        fs::read(self.dir.join("agent.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// `status.json` as the daemon last wrote it.
    pub fn status(&self) -> Result<serde_json::Value, String> {
        let b = fs::read(self.state_dir.join("status.json")).map_err(|e| e.to_string())?;
        serde_json::from_slice(&b).map_err(|e| e.to_string())
    }

    /// Waits until `status.json` says no spool record is pending.
    pub fn wait_spool_empty(&self, limit: Duration) {
        wait_until(
            &format!("{}'s spool to drain", self.host_id),
            limit,
            Duration::from_millis(250),
            || {
                let s = self.status()?;
                match s["spool"]["pending_records"].as_u64() {
                    Some(0) => Ok(()),
                    _ => Err(format!("status: {}", s["spool"])),
                }
            },
        );
    }

    /// The file violations a one-shot `driftwatch-agent check --format json` reports for this
    /// agent's root (package drift, whose kinds are spelled differently, left out).
    pub fn check(&self, image: &Image) -> Vec<Drift> {
        let r = crate::check_json(&self.root, &image.baseline, &image.keys, None, &[]);
        assert!(r.code == 0 || r.code == 1, "check: {}", r.stderr);
        let v = r.json();
        drifts(v["violations"].as_array().map(Vec::as_slice).unwrap_or(&[]))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- agent {} log ---\n{}", self.host_id, self.log());
        }
    }
}
