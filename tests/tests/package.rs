//! The Debian packages on a booted Debian server (systemd-nspawn): install, upgrade to a
//! rebuilt higher version, purge — with the real packages from `packaging/build.sh`.
//!
//! Inside one machine: the collector package starts its service as its own system user; the
//! agent package stays inactive until the host is enrolled; the pipeline key reaches the agent
//! only as a systemd credential; the agent enrolls with the local collector, its service runs and
//! `driftwatch-agent status` (without root) shows what it saw. The installed units verify with no
//! warnings and their exposure on the booted system is within the limits. An upgrade restarts
//! both services (new MainPID); a purge removes their state, configuration and every file of the
//! collector's user.
//!
//! Needs root (skips with a printed reason outside CI; under CI=true a skip fails), plus
//! systemd-nspawn, debootstrap and cargo-deb.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use driftwatch_tests::daemon::wait_until;
use driftwatch_tests::nspawn::{Machine, Network, base_root};
use driftwatch_tests::packaging::build_debs;
use driftwatch_tests::{require_program, require_root};

/// The version of the "rebuilt" packages: above the workspace's `0.1.0-1`.
const UPGRADE_VERSION: &str = "0.1.0+rebuild1-1";

fn installed_version(m: &Machine, package: &str) -> String {
    m.ok(&["dpkg-query", "-W", "-f=${Version}", package])
}

/// `driftwatch-agent status --format json` inside, as `user`: (exit code, JSON or null).
fn agent_status(m: &Machine, user: &str) -> (i32, serde_json::Value) {
    let r = m.exec(&[
        "runuser",
        "-u",
        user,
        "--",
        "driftwatch-agent",
        "status",
        "--format",
        "json",
    ]);
    let v = serde_json::from_slice(&r.stdout).unwrap_or(serde_json::Value::Null);
    (r.code, v)
}

#[test]
fn install_upgrade_purge_on_a_booted_server() {
    if !require_root("boots a systemd container and installs packages into it")
        || !require_program("systemd-nspawn")
        || !require_program("debootstrap")
        || !require_program("cargo-deb")
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (agent_v1, collector_v1) = build_debs(&work.path().join("v1"), None);
    let (agent_v2, collector_v2) = build_debs(&work.path().join("v2"), Some(UPGRADE_VERSION));

    let m = Machine::boot("dw-pkg", &base_root(), Network::Loopback);
    for (deb, dest) in [
        (&agent_v1, "/root/v1/agent.deb"),
        (&collector_v1, "/root/v1/collector.deb"),
        (&agent_v2, "/root/v2/agent.deb"),
        (&collector_v2, "/root/v2/collector.deb"),
    ] {
        m.copy_in(deb, dest);
    }

    // --- install: the collector runs as its own user at once.
    m.ok(&["dpkg", "-i", "/root/v1/collector.deb"]);
    m.wait_active("driftwatch-collector.service", Duration::from_secs(60));
    assert_eq!(
        m.unit_property("driftwatch-collector.service", "User"),
        "driftwatch"
    );
    let main_pid = m.unit_property("driftwatch-collector.service", "MainPID");
    let owner = m.ok(&["stat", "-c", "%U %a", "/var/lib/driftwatch-collector"]);
    assert_eq!(owner.trim(), "driftwatch 700");
    let proc_user = m.ok(&["stat", "-c", "%U", &format!("/proc/{main_pid}")]);
    assert_eq!(proc_user.trim(), "driftwatch");
    assert!(
        m.root
            .join("var/lib/driftwatch-collector/ca/ca-key.pem")
            .is_file()
    );

    // The agent package: installed, not started (the host is not enrolled yet).
    m.ok(&["dpkg", "-i", "/root/v1/agent.deb"]);
    assert_eq!(
        m.unit_property("driftwatch-agent.service", "ActiveState"),
        "inactive"
    );
    assert_eq!(
        m.unit_property("driftwatch-agent.service", "UnitFileState"),
        "enabled"
    );
    for f in [
        "etc/driftwatch/agent.toml",
        "etc/driftwatch/collector.toml",
        "usr/share/man/man1/driftwatch-agent.1",
        "usr/share/man/man1/driftwatch-agent-status.1",
        "usr/share/man/man1/driftwatch-collector.1",
        "usr/share/man/man1/driftwatch.1",
        "usr/share/bash-completion/completions/driftwatch-agent",
        "usr/share/zsh/vendor-completions/_driftwatch",
        "usr/share/fish/vendor_completions.d/driftwatch-collector.fish",
    ] {
        let p = m.root.join(f);
        let gz = PathBuf::from(format!("{}.gz", p.display()));
        assert!(p.is_file() || gz.is_file(), "{f} is not installed");
    }
    assert!(m.root.join("etc/driftwatch/agent.d").is_dir());
    assert!(m.root.join("etc/driftwatch/collector.d").is_dir());
    let conffiles = m.ok(&["dpkg-query", "-W", "-f=${Conffiles}", "driftwatch-agent"]);
    assert!(
        conffiles.contains("/etc/driftwatch/agent.toml"),
        "{conffiles}"
    );

    // The installed units as they are: no warnings, and the exposure on this booted system.
    m.verify_units(&["driftwatch-agent.service", "driftwatch-collector.service"]);
    for (unit, limit) in [
        ("driftwatch-agent.service", 2.5),
        ("driftwatch-collector.service", 2.0),
    ] {
        let out = m.exec(&["systemd-analyze", "security", "--no-pager", unit]);
        let exposure: f64 = out
            .stdout_str()
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no exposure for {unit}: {}", out.stdout_str()));
        eprintln!("{unit}: exposure {exposure} on the booted server (limit {limit})");
        assert!(exposure <= limit, "{unit}: exposure {exposure} > {limit}");
    }

    // --- configure the agent the way an image pipeline would: the collector in a drop-in, the
    // pipeline's public key only as a system credential, a signed baseline of this root.
    m.ok(&["driftwatch-agent", "keygen", "--out", "/root/pipeline"]);
    m.sh("install -d -m 0700 /etc/credstore && \
         install -m 0600 /root/pipeline.pub /etc/credstore/driftwatch-agent.pipeline.pub");
    std::fs::write(
        m.root.join("etc/driftwatch/agent.d/50-test.toml"),
        "collector = \"https://127.0.0.1:7443\"\nscan_interval = \"10m\"\n",
    )
    .unwrap();
    assert!(!m.root.join("etc/driftwatch/pipeline.pub").exists());
    m.ok(&[
        "driftwatch-agent",
        "baseline",
        "create",
        "--root",
        "/",
        "--image-id",
        "pkg-test",
        "--image-version",
        "1",
        "--sign-key",
        "/root/pipeline.key",
        "--out",
        "/etc/driftwatch/baseline.dwb",
    ]);
    // Never ran: exit 3 with a clear message, also for a user without root.
    let never = m.exec(&[
        "runuser",
        "-u",
        "nobody",
        "--",
        "driftwatch-agent",
        "status",
    ]);
    assert_eq!(never.code, 3, "{}", never.stderr);
    assert!(never.stderr.contains("never run"), "{}", never.stderr);

    let token_out = m.ok(&[
        "runuser",
        "-u",
        "driftwatch",
        "--",
        "driftwatch-collector",
        "token",
        "create",
        "--uses",
        "1",
    ]);
    let token = token_out
        .split_whitespace()
        .find(|w| w.starts_with("dwt_"))
        .unwrap_or_else(|| panic!("no token in {token_out}"))
        .to_string();
    m.ok(&[
        "driftwatch-agent",
        "enroll",
        "--collector",
        "https://127.0.0.1:7443",
        "--ca-file",
        "/var/lib/driftwatch-collector/ca/ca.pem",
        "--token",
        &token,
        "--host-id",
        "pkg-test",
    ]);
    m.ok(&["systemctl", "start", "driftwatch-agent.service"]);
    m.wait_active("driftwatch-agent.service", Duration::from_secs(120));
    let status = wait_until(
        "the agent's first scan, connected to the collector",
        Duration::from_secs(300),
        Duration::from_secs(1),
        || {
            let (code, v) = agent_status(&m, "nobody");
            let scanned = v["last_scan"]["result"] == "complete";
            let connected = v["collector"]["state"] == "connected";
            if (code == 0 || code == 1) && scanned && connected {
                Ok(v)
            } else {
                Err(format!("exit {code}: {v}"))
            }
        },
    );
    assert_eq!(status["host_id"], "pkg-test");
    assert_eq!(status["baseline"]["image_id"], "pkg-test");
    let text = m.exec(&[
        "runuser",
        "-u",
        "nobody",
        "--",
        "driftwatch-agent",
        "status",
    ]);
    assert!(
        text.stdout_str().contains("connected"),
        "{}",
        text.stdout_str()
    );
    let agent_caps = m.unit_property("driftwatch-agent.service", "CapabilityBoundingSet");
    assert_eq!(agent_caps, "cap_dac_read_search cap_fowner");
    let agent_pid = m.unit_property("driftwatch-agent.service", "MainPID");

    // --- upgrade to the rebuilt higher version: both services restart.
    m.ok(&["dpkg", "-i", "/root/v2/collector.deb", "/root/v2/agent.deb"]);
    assert_eq!(installed_version(&m, "driftwatch-agent"), UPGRADE_VERSION);
    assert_eq!(
        installed_version(&m, "driftwatch-collector"),
        UPGRADE_VERSION
    );
    m.wait_active("driftwatch-collector.service", Duration::from_secs(60));
    m.wait_active("driftwatch-agent.service", Duration::from_secs(120));
    let collector_pid2 = m.unit_property("driftwatch-collector.service", "MainPID");
    let agent_pid2 = m.unit_property("driftwatch-agent.service", "MainPID");
    assert_ne!(collector_pid2, main_pid, "the collector was not restarted");
    assert_ne!(agent_pid2, agent_pid, "the agent was not restarted");
    assert_ne!(agent_pid2, "0");
    // The configuration and the enrollment survived the upgrade.
    assert!(m.root.join("etc/driftwatch/agent.d/50-test.toml").is_file());
    assert!(
        m.root
            .join("var/lib/driftwatch/identity/cert.pem")
            .is_file()
    );

    // --- purge: services gone, state gone, configuration gone, nothing owned by the user.
    m.ok(&[
        "dpkg",
        "--purge",
        "driftwatch-agent",
        "driftwatch-collector",
    ]);
    for unit in ["driftwatch-agent.service", "driftwatch-collector.service"] {
        let state = m.unit_property(unit, "ActiveState");
        assert_eq!(state, "inactive", "{unit} after purge");
    }
    for gone in [
        "var/lib/driftwatch",
        "var/lib/driftwatch-collector",
        "etc/driftwatch/agent.toml",
        "etc/driftwatch/collector.toml",
        "etc/driftwatch/collector.d",
        "usr/bin/driftwatch-agent",
        "usr/lib/systemd/system/driftwatch-agent.service",
    ] {
        assert!(!m.root.join(gone).exists(), "{gone} survived the purge");
    }
    // The administrator's drop-in stays (it is not the package's).
    assert!(m.root.join("etc/driftwatch/agent.d/50-test.toml").is_file());
    let owned = m.sh("find / -xdev -user driftwatch 2>/dev/null | head -5");
    assert!(
        owned.trim().is_empty(),
        "files of user driftwatch left: {owned}"
    );
}
