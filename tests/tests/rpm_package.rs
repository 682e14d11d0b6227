//! The RPM packages from `packaging/build.sh` (cargo-generate-rpm): their metadata as rpm reads
//! it, and install, upgrade to a rebuilt higher version and erase on a booted server with
//! systemd, so the scriptlets run against a real systemd.
//!
//! The server is the Debian one of `package.rs` with Debian's `rpm` added: its rpmdb is empty,
//! so packages go in with `--nodeps`, and the scriptlets (the `%systemd_*` macros spelled out,
//! `packaging/rpm/`) do what they would on a RHEL-family host: the collector's system user comes
//! from sysusers, the units are known to systemd, an upgrade restarts the running collector, an
//! edited `%config(noreplace)` file survives it, and `rpm -e` stops and disables the services
//! and leaves no unit behind.
//!
//! Needs root (skips with a printed reason outside CI; under CI=true a skip fails), plus
//! systemd-nspawn, debootstrap, rpm and cargo-generate-rpm.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use driftwatch_tests::nspawn::{BASE_PACKAGES, Machine, Network};
use driftwatch_tests::packaging::build_rpms;
use driftwatch_tests::{require_program, require_root, run_with_limit};

/// The version of the "rebuilt" packages: above the workspace's `0.1.0-1`.
const UPGRADE_VERSION: &str = "0.1.1";

/// `rpm -qp ARGS PACKAGE` on the host: stdout.
fn query(package: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new("rpm");
    cmd.arg("-qp").args(args).arg(package);
    let r = run_with_limit(cmd, Duration::from_secs(60));
    assert_eq!(r.code, 0, "rpm -qp {args:?}: {}", r.stderr);
    r.stdout_str()
}

/// The package's files with rpm's file flags (`c` config, `n` noreplace, `d` doc).
fn file_flags(package: &Path) -> Vec<(String, String)> {
    query(package, &["--qf", "[%{FILEFLAGS:fflags} %{FILENAMES}\\n]"])
        .lines()
        .map(|l| {
            let (flags, name) = l.split_once(' ').unwrap_or(("", l));
            (name.to_string(), flags.to_string())
        })
        .collect()
}

fn check_metadata(
    package: &Path,
    name: &str,
    version: &str,
    files: &[&str],
    config: &str,
    scripts: &[&str],
) {
    let info = query(package, &["-i"]);
    for (key, value) in [
        ("Name", name),
        ("Version", version),
        ("License", "Apache-2.0"),
        ("Architecture", std::env::consts::ARCH),
    ] {
        let line = info
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{name}: no {key} in rpm -qi:\n{info}"));
        assert_eq!(
            line.split_once(':').map(|(_, v)| v.trim()),
            Some(value),
            "{name}: {line}"
        );
    }
    let list = query(package, &["-l"]);
    for f in files {
        assert!(
            list.lines().any(|l| l == *f),
            "{name}: {f} not in rpm -qlp:\n{list}"
        );
    }
    let flags = file_flags(package);
    let config_files: Vec<_> = flags
        .iter()
        .filter(|(_, fl)| fl.contains('c'))
        .map(|(f, fl)| (f.as_str(), fl.as_str()))
        .collect();
    assert_eq!(config_files, [(config, "cn")], "{name}: config files");
    let (_, bin_flags) = flags
        .iter()
        .find(|(f, _)| f.starts_with("/usr/bin/"))
        .unwrap();
    assert!(
        !bin_flags.contains('c'),
        "{name}: a binary is a config file"
    );
    // The binaries are packed without debug info (packaging/build.sh strips them).
    let dump = query(package, &["--dump"]);
    for line in dump.lines().filter(|l| l.starts_with("/usr/bin/")) {
        let size: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            size < 80 << 20,
            "{name}: {line}: unstripped binary in the RPM"
        );
    }
    let s = query(package, &["--scripts"]);
    for want in [
        "postinstall scriptlet",
        "preuninstall scriptlet",
        "postuninstall scriptlet",
    ]
    .iter()
    .chain(scripts)
    {
        assert!(s.contains(want), "{name}: no {want:?} in --scripts:\n{s}");
    }
}

fn installed_version(m: &Machine, package: &str) -> String {
    m.ok(&["rpm", "-q", "--qf", "%{VERSION}-%{RELEASE}", package])
}

#[test]
fn rpm_metadata_install_upgrade_erase_on_a_booted_server() {
    if !require_root("boots a systemd container and installs packages into it")
        || !require_program("systemd-nspawn")
        || !require_program("debootstrap")
        || !require_program("rpm")
        || !require_program("cargo-generate-rpm")
    {
        return;
    }
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let (agent_v1, collector_v1) = build_rpms(&work.path().join("v1"), None);
    let (agent_v2, collector_v2) = build_rpms(&work.path().join("v2"), Some(UPGRADE_VERSION));

    // --- what rpm reads from the packages.
    check_metadata(
        &agent_v1,
        "driftwatch-agent",
        "0.1.0",
        &[
            "/usr/bin/driftwatch-agent",
            "/etc/driftwatch/agent.toml",
            "/usr/lib/systemd/system/driftwatch-agent.service",
            "/usr/lib/tmpfiles.d/driftwatch-agent.conf",
            "/usr/share/man/man1/driftwatch-agent-status.1",
            "/usr/share/bash-completion/completions/driftwatch-agent",
        ],
        "/etc/driftwatch/agent.toml",
        &["systemctl --no-reload preset driftwatch-agent.service"],
    );
    check_metadata(
        &collector_v1,
        "driftwatch-collector",
        "0.1.0",
        &[
            "/usr/bin/driftwatch-collector",
            "/usr/bin/driftwatch",
            "/etc/driftwatch/collector.toml",
            "/usr/lib/systemd/system/driftwatch-collector.service",
            "/usr/lib/sysusers.d/driftwatch-collector.conf",
            "/usr/lib/tmpfiles.d/driftwatch-collector.conf",
            "/usr/share/man/man1/driftwatch.1",
        ],
        "/etc/driftwatch/collector.toml",
        &[
            "systemd-sysusers /usr/lib/sysusers.d/driftwatch-collector.conf",
            "systemctl try-restart driftwatch-collector.service",
        ],
    );
    assert_eq!(
        query(&agent_v2, &["--qf", "%{VERSION}"]),
        UPGRADE_VERSION,
        "the rebuilt package's version"
    );

    // --- a booted server with rpm.
    let mut packages = BASE_PACKAGES.to_vec();
    packages.push("rpm");
    let base = driftwatch_tests::debian::root("server-rpm", &packages);
    let m = Machine::boot("dw-rpm", &base, Network::Loopback);
    for (rpm, dest) in [
        (&agent_v1, "/root/v1/agent.rpm"),
        (&collector_v1, "/root/v1/collector.rpm"),
        (&agent_v2, "/root/v2/agent.rpm"),
        (&collector_v2, "/root/v2/collector.rpm"),
    ] {
        m.copy_in(rpm, dest);
    }
    assert!(
        m.exec(&["getent", "passwd", "driftwatch"]).code != 0,
        "the image already has the user"
    );

    // --- install: %post creates the user (sysusers) and the state directory (tmpfiles) and
    // presets the units (Debian's preset policy enables them); RPM does not start services.
    m.ok(&[
        "rpm",
        "-i",
        "--nodeps",
        "/root/v1/collector.rpm",
        "/root/v1/agent.rpm",
    ]);
    assert_eq!(installed_version(&m, "driftwatch-collector"), "0.1.0-1");
    let user = m.ok(&["getent", "passwd", "driftwatch"]);
    let uid: u32 = user.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid < 1000, "not a system user: {user}");
    let owner = m.ok(&["stat", "-c", "%U %a", "/var/lib/driftwatch-collector"]);
    assert_eq!(owner.trim(), "driftwatch 700");
    assert!(m.root.join("etc/driftwatch/agent.d").is_dir());
    assert!(m.root.join("etc/driftwatch/collector.d").is_dir());
    for unit in ["driftwatch-agent.service", "driftwatch-collector.service"] {
        assert_eq!(m.unit_property(unit, "LoadState"), "loaded", "{unit}");
        assert_eq!(m.unit_property(unit, "UnitFileState"), "enabled", "{unit}");
    }
    // The agent waits for its enrollment (ConditionPathExists=): not started, not failed.
    assert_eq!(
        m.unit_property("driftwatch-agent.service", "ActiveState"),
        "inactive"
    );
    m.verify_units(&["driftwatch-agent.service", "driftwatch-collector.service"]);

    m.ok(&["systemctl", "start", "driftwatch-collector.service"]);
    m.wait_active("driftwatch-collector.service", Duration::from_secs(60));
    assert_eq!(
        m.unit_property("driftwatch-collector.service", "User"),
        "driftwatch"
    );
    let pid1 = m.unit_property("driftwatch-collector.service", "MainPID");
    let proc_user = m.ok(&["stat", "-c", "%U", &format!("/proc/{pid1}")]);
    assert_eq!(proc_user.trim(), "driftwatch");
    // An administrator's edit of a %config(noreplace) file.
    m.sh("echo '# site edit' >> /etc/driftwatch/agent.toml");

    // --- upgrade: the old package's %postun restarts the running collector.
    m.ok(&[
        "rpm",
        "-U",
        "--nodeps",
        "/root/v2/collector.rpm",
        "/root/v2/agent.rpm",
    ]);
    let v2 = format!("{UPGRADE_VERSION}-1");
    assert_eq!(installed_version(&m, "driftwatch-collector"), v2);
    assert_eq!(installed_version(&m, "driftwatch-agent"), v2);
    m.wait_active("driftwatch-collector.service", Duration::from_secs(60));
    let pid2 = m.unit_property("driftwatch-collector.service", "MainPID");
    assert_ne!(pid2, pid1, "the collector was not restarted on upgrade");
    assert_ne!(pid2, "0");
    let agent_toml = std::fs::read_to_string(m.root.join("etc/driftwatch/agent.toml")).unwrap();
    assert!(
        agent_toml.ends_with("# site edit\n"),
        "the edited config file was replaced"
    );
    assert_eq!(
        m.unit_property("driftwatch-agent.service", "UnitFileState"),
        "enabled",
        "an upgrade must not disable the agent"
    );

    // --- erase: %preun stops and disables, %postun reloads; no unit left behind.
    m.ok(&["rpm", "-e", "driftwatch-agent", "driftwatch-collector"]);
    let gone = m.exec(&["rpm", "-q", "driftwatch-collector"]);
    assert_ne!(gone.code, 0, "still installed: {}", gone.stdout_str());
    for unit in ["driftwatch-agent.service", "driftwatch-collector.service"] {
        assert_eq!(m.unit_property(unit, "ActiveState"), "inactive", "{unit}");
        assert_eq!(m.unit_property(unit, "LoadState"), "not-found", "{unit}");
    }
    let left = m.sh("systemctl list-unit-files --no-legend 'driftwatch*'; \
         find /etc/systemd /usr/lib/systemd -name 'driftwatch*'");
    assert!(left.trim().is_empty(), "left behind: {left}");
    assert!(!m.root.join("usr/bin/driftwatch-collector").exists());
    // Documented: RPM has no purge, the state stays (docs/packaging.md).
    assert!(m.root.join("var/lib/driftwatch-collector").is_dir());
    eprintln!("rpm package test: {:?}", started.elapsed());
}
