//! A fleet of real servers in one test: the immutable-infrastructure loop end to end, with the
//! real agent package on booted systemd machines (systemd-nspawn) and the real collector.
//!
//! 1. The image: a cached Debian root with systemd and openssh-server, copied; the agent .deb
//!    (`packaging/build.sh`) installed into it in a non-booted nspawn; the pipeline's public
//!    key, the site drop-in (collector URL, `[enrollment]` with the collector CA's fingerprint
//!    and `role=web`) and the signed baseline put where the package looks for them. The
//!    pipeline key stays on the test host.
//! 2. The collector on the test host, SQLite, its gRPC port bound only to a bridge address the
//!    machines reach over their veth links; flagging on package drift and on unexplained
//!    changes under `/etc/ssh`; rebuilds by webhook to a verifying receiver on loopback
//!    ([`driftwatch_tests::webhook`]). The baseline is pushed with `driftwatch baseline push`.
//! 3. Three machines boot from the image (own overlay, own network namespace); each gets a
//!    single-use enrollment token as a system credential, and its agent service enrolls itself
//!    (host id = hostname) and reports clean.
//! 4. `/etc/ssh/sshd_config` edited on one, a package `dpkg -i`'d on another: both flagged
//!    with the right paths, packages, classes and reasons. The webhooks reach the receiver,
//!    the harness destroys each flagged machine and boots a fresh one (new name, same role);
//!    the old hosts become `replaced` and the fleet is clean again. The agent stopped on the
//!    third machine: the collector marks it `silent`.
//!
//! Needs root, systemd-nspawn, debootstrap, ip, dpkg-deb and cargo-deb (skips with a reason
//! outside CI; under CI=true a skip fails). Everything it creates (machines, overlays,
//! namespaces, veths, the bridge, cgroups) is removed when it ends, pass or panic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use driftwatch_tests::daemon::wait_until;
use driftwatch_tests::fleet::Collector;
use driftwatch_tests::nspawn::{BASE_PACKAGES, Bridge, Machine, Network};
use driftwatch_tests::packaging::build_debs;
use driftwatch_tests::webhook::{Delivery, Receiver};
use driftwatch_tests::{Keys, binary, debian, json_path, require_program, require_root};
use driftwatch_tests::{agent, run_with_limit};
use serde_json::Value;

const IMAGE_ID: &str = "fleet-web";
const ROLE: &str = "web";
/// How long the fleet may take to reach a state (first scans of a whole root included).
const SETTLE: Duration = Duration::from_secs(180);
/// The collector's heartbeat interval: a host not heard from for three is silent. Generous
/// enough that a busy test machine (the agents run at Nice=10, idle I/O, a CPU quota) does not
/// make a running agent look silent.
const HEARTBEAT: &str = "5s";
/// The package installed by hand on one server.
const ROGUE: &str = "fleet-rogue";

/// The machine image: a private copy of the cached root, finished like a pipeline would.
struct Image {
    root: tempfile::TempDir,
    baseline: PathBuf,
}

fn sh(cmd: &str) -> String {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd);
    let r = run_with_limit(c, Duration::from_secs(300));
    assert_eq!(r.code, 0, "{cmd}: {}\n{}", r.stdout_str(), r.stderr);
    r.stdout_str()
}

/// Copies the base root, installs the agent package in a non-booted container, and puts the
/// pipeline key, site configuration and signed baseline in place.
fn build_image(base: &Path, agent_deb: &Path, keys: &Keys, site_toml: &str, work: &Path) -> Image {
    let root = debian::copy(base);
    let r = root.path();
    fs::copy(agent_deb, r.join("root/driftwatch-agent.deb")).unwrap();
    let mut c = Command::new("systemd-nspawn");
    c.args([
        "--register=no",
        "--keep-unit",
        "-q",
        "--private-network",
        "-D",
    ])
    .arg(r)
    .args(["dpkg", "-i", "/root/driftwatch-agent.deb"])
    .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1");
    let out = run_with_limit(c, Duration::from_secs(300));
    assert_eq!(
        out.code,
        0,
        "dpkg -i in the image: {}\n{}",
        out.stdout_str(),
        out.stderr
    );
    fs::remove_file(r.join("root/driftwatch-agent.deb")).unwrap();
    // The image must be enabled but neither enrolled nor started.
    // (An absolute symlink into the image: look at the link, not at the host's file.)
    let wants = r.join("etc/systemd/system/multi-user.target.wants/driftwatch-agent.service");
    assert!(
        fs::symlink_metadata(&wants).is_ok(),
        "the package did not enable its unit in the image"
    );
    assert!(!r.join("var/lib/driftwatch/identity").exists());

    let etc = r.join("etc/driftwatch");
    fs::copy(&keys.public, etc.join("pipeline.pub")).unwrap();
    fs::set_permissions(etc.join("pipeline.pub"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(etc.join("agent.d/50-site.toml"), site_toml).unwrap();

    // The baseline is written into the image after it is made: the pipeline's policy leaves
    // that one file out (everything else is the built-in policy).
    let policy = work.join("pipeline-policy.toml");
    fs::write(
        &policy,
        "[paths]\n# Written into the image after the baseline is made.\n\
         exclude = [\"/etc/driftwatch/baseline.dwb\"]\n",
    )
    .unwrap();
    let baseline = work.join("baseline.dwb");
    let out = agent([
        "baseline".as_ref(),
        "create".as_ref(),
        "--root".as_ref(),
        r.as_os_str(),
        "--image-id".as_ref(),
        IMAGE_ID.as_ref(),
        "--image-version".as_ref(),
        "1".as_ref(),
        "--policy".as_ref(),
        policy.as_os_str(),
        "--sign-key".as_ref(),
        keys.private.as_os_str(),
        "--out".as_ref(),
        baseline.as_os_str(),
    ] as [&std::ffi::OsStr; 14]);
    assert_eq!(out.code, 0, "baseline create: {}", out.stderr);
    fs::copy(&baseline, etc.join("baseline.dwb")).unwrap();
    fs::set_permissions(etc.join("baseline.dwb"), fs::Permissions::from_mode(0o644)).unwrap();
    Image { root, baseline }
}

/// The fleet: the machines by name, and how new ones are made.
struct Fleet<'a> {
    image: &'a Image,
    bridge: &'a Bridge,
    collector: &'a Collector,
    prefix: String,
    net: String,
    booted: u32,
    machines: HashMap<String, Machine>,
}

impl Fleet<'_> {
    /// Boots the next machine with a fresh single-use token as its system credential.
    fn boot(&mut self) -> String {
        self.booted += 1;
        let name = format!("{}{}", self.prefix, self.booted);
        let token = self.collector.token(1);
        let m = Machine::boot_with(
            &name,
            self.image.root.path(),
            Network::Bridged {
                bridge: self.bridge.name.clone(),
                address: format!("{}.{}/24", self.net, 10 + self.booted),
            },
            &[("driftwatch-agent.enrollment-token", &token)],
        );
        self.machines.insert(name.clone(), m);
        name
    }

    fn get(&self, name: &str) -> &Machine {
        self.machines
            .get(name)
            .unwrap_or_else(|| panic!("no machine {name}"))
    }

    /// Powers the machine off and removes it (overlay, namespace, veth).
    fn destroy(&mut self, name: &str) {
        let m = self
            .machines
            .remove(name)
            .unwrap_or_else(|| panic!("no machine {name} to destroy"));
        drop(m);
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.machines.keys().cloned().collect();
        v.sort();
        v
    }

    /// Every agent's journal (for failure messages).
    fn journals(&self) -> String {
        self.machines
            .iter()
            .map(|(n, m)| format!("=== {n}\n{}", m.unit_report("driftwatch-agent.service")))
            .collect()
    }
}

/// [`Collector::wait_lifecycles`], with the servers' agent journals when it fails.
fn wait_lifecycles(c: &Collector, fleet: &Fleet, what: &str, want: &[(&str, &str)]) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        c.wait_lifecycles(what, SETTLE, want)
    }));
    if let Err(e) = r {
        eprintln!("{}", fleet.journals());
        std::panic::resume_unwind(e);
    }
}

fn reason_codes(explain: &Value) -> Vec<String> {
    explain["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["code"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A file violation as (path, kind, class, owning packages without arch).
fn file_view(v: &Value) -> (String, String, String, Vec<String>) {
    let path = String::from_utf8_lossy(&json_path(&v["path"])).into_owned();
    let packages = v["packages"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p.as_str())
                .map(|p| p.split(':').next().unwrap_or(p).to_string())
                .collect()
        })
        .unwrap_or_default();
    (
        path,
        v["kind"].as_str().unwrap_or("").to_string(),
        v["class"].as_str().unwrap_or("").to_string(),
        packages,
    )
}

/// The harness's rebuild automation: for each verified webhook, destroy the flagged machine and
/// boot its successor from the image. Returns (old, new) names in delivery order.
fn handle_rebuilds(
    receiver: &mut Receiver,
    fleet: &mut Fleet,
    flagged: &[&str],
) -> Vec<(String, String)> {
    let mut done = Vec::new();
    let deadline = Instant::now() + SETTLE;
    while done.len() < flagged.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let d: Delivery = receiver.next(left).unwrap_or_else(|| {
            panic!(
                "no verified rebuild webhook within {SETTLE:?} (refused: {:?}); handled {done:?}",
                receiver.rejected()
            )
        });
        let host = d.host().to_string();
        assert!(
            flagged.contains(&host.as_str()),
            "rebuild requested for {host}, which is not a flagged host: {}",
            d.body
        );
        assert_eq!(d.body["type"], "driftwatch.rebuild.requested", "{}", d.body);
        assert_eq!(d.body["data"]["role"], ROLE, "{}", d.body);
        assert_eq!(d.body["data"]["image"]["id"], IMAGE_ID, "{}", d.body);
        assert_eq!(d.body["data"]["dry_run"], false);
        assert!(d.id.starts_with("rb_"), "{}", d.id);
        fleet.destroy(&host);
        let successor = fleet.boot();
        eprintln!("rebuild {}: destroyed {host}, booted {successor}", d.id);
        done.push((host, successor));
    }
    done
}

#[test]
fn a_fleet_booted_from_one_image_is_flagged_rebuilt_and_watched_for_silence() {
    if !require_root("boots systemd containers on veth links to a bridge")
        || !require_program("systemd-nspawn")
        || !require_program("debootstrap")
        || !require_program("ip")
        || !require_program("dpkg-deb")
        || !require_program("cargo-deb")
    {
        return;
    }
    let started = Instant::now();
    let lap = |what: &str| eprintln!("[{:>6.1?}] {what}", started.elapsed());
    let work = tempfile::tempdir().unwrap();
    let w = work.path();

    let (agent_deb, _) = build_debs(&w.join("debs"), None);
    lap("packages built");
    let mut packages: Vec<&str> = BASE_PACKAGES.to_vec();
    packages.push("openssh-server");
    let base = debian::root("server-ssh", &packages);
    assert!(base.join("etc/ssh/sshd_config").is_file());
    lap("base root ready");

    // The network: one bridge in the host namespace, the collector's gRPC port on its address.
    let pid = std::process::id();
    let net = format!("10.213.{}", 16 + pid % 224);
    let bridge = Bridge::create(&format!("dwfl{pid}"), &format!("{net}.1/24"));

    let keys = Keys::new();
    let secret_file = w.join("rebuild-webhook.secret");
    let secret = Receiver::write_secret(&secret_file);
    let mut receiver = Receiver::start(&secret, None);
    let collector_dir = w.join("collector");
    fs::create_dir_all(&collector_dir).unwrap();
    let extra = format!(
        "trusted_keys = [{key:?}]\nreconcile_interval = \"500ms\"\n\
         [flagging]\nseverity_at_least = \"off\"\npackage_drift = true\n\
         unexplained_under = [\"/etc/ssh/**\"]\n\
         [actions]\nkind = \"webhook\"\nurl = {url:?}\nsecret_file = {secret:?}\n\
         approval = false\nmax_in_flight = 2\nmax_percent_per_image = 100\ncooldown = \"1s\"\n\
         timeout = \"10s\"\nrebuild_timeout = \"10m\"\n",
        key = keys.public.display().to_string(),
        url = receiver.url,
        secret = secret_file.display().to_string(),
    );
    let collector = Collector::start_listening(
        &collector_dir,
        None,
        binary("driftwatch-collector"),
        &bridge.host_ip,
        HEARTBEAT,
        &extra,
    );
    let fingerprint = collector.ca_fingerprint();
    lap("collector running");

    let site = format!(
        "# Site settings, written by the image pipeline.\n\
         collector = {url:?}\nscan_interval = \"4s\"\n\
         [enrollment]\nca_fingerprint = {fingerprint:?}\nlabels = [\"role={ROLE}\"]\n",
        url = collector.grpc_url,
    );
    let image = build_image(&base, &agent_deb, &keys, &site, w);
    lap("image built and baselined");
    let pushed = collector
        .cli(&["baseline", "push", &image.baseline.display().to_string()])
        .unwrap();
    assert_eq!(pushed["baseline"]["image_id"], IMAGE_ID, "{pushed}");
    let image_root = pushed["baseline"]["root"].as_str().unwrap().to_string();

    let mut fleet = Fleet {
        image: &image,
        bridge: &bridge,
        collector: &collector,
        prefix: format!("w{}-", pid % 100_000),
        net: net.clone(),
        booted: 0,
        machines: HashMap::new(),
    };
    let (s1, s2, s3) = (fleet.boot(), fleet.boot(), fleet.boot());
    lap("three servers booted");
    for n in fleet.names() {
        let m = fleet.get(&n);
        m.wait_active("driftwatch-agent.service", Duration::from_secs(60));
        // Nothing but the bridge address is reachable: no default route in the namespace.
        let routes = m.ok(&["ip", "-4", "route"]);
        assert!(!routes.contains("default"), "{n}: {routes}");
    }
    wait_lifecycles(
        &collector,
        &fleet,
        "three servers enrolled by their own services and clean",
        &[(&s1, "clean"), (&s2, "clean"), (&s3, "clean")],
    );
    lap("fleet clean");
    for n in [&s1, &s2, &s3] {
        let h = collector.try_host(n).unwrap();
        assert_eq!(h["image"]["id"], IMAGE_ID, "{h}");
        assert_eq!(h["baseline_root"], image_root.as_str(), "{h}");
        assert_eq!(h["labels"]["role"], ROLE, "{h}");
    }

    // --- An administrator "fixes" sshd on s1; someone installs a package by hand on s2.
    fleet
        .get(&s1)
        .sh("echo 'PermitRootLogin yes' >> /etc/ssh/sshd_config");
    let deb_dir = w.join("rogue");
    fs::create_dir_all(&deb_dir).unwrap();
    let rogue = debian::build_deb(
        &deb_dir,
        ROGUE,
        "1.0",
        &[
            ("/usr/bin/fleet-rogue", "#!/bin/sh\necho rogue\n"),
            ("/usr/share/doc/fleet-rogue/README", "installed by hand\n"),
        ],
        &[],
    );
    let m2 = fleet.get(&s2);
    m2.copy_in(&rogue, "/root/fleet-rogue.deb");
    m2.ok(&["dpkg", "-i", "/root/fleet-rogue.deb"]);
    for n in [&s1, &s2] {
        fleet
            .get(n)
            .ok(&["systemctl", "reload", "driftwatch-agent.service"]);
    }
    wait_until(
        "both drifted servers flagged",
        SETTLE,
        Duration::from_millis(250),
        || {
            let l = collector.lifecycles()?;
            let flagged_or_later = |h: &str| {
                l.iter().any(|(id, s)| {
                    id == h && ["flagged", "rebuild_requested"].contains(&s.as_str())
                })
            };
            if flagged_or_later(&s1) && flagged_or_later(&s2) {
                Ok(())
            } else {
                Err(format!("{l:?}"))
            }
        },
    );
    lap("drifted servers flagged");

    // s1: exactly sshd_config, modified content, unexplained (no package changed; Debian's
    // sshd_config is written by openssh-server's postinst through ucf, so no package owns
    // it), critical under /etc/ssh, flagged for that.
    let v1 = collector.try_violations(&s1).unwrap();
    let files1: Vec<_> = v1.iter().map(file_view).collect();
    assert_eq!(files1.len(), 1, "{v1:?}");
    let (path, kind, class, owners) = &files1[0];
    assert_eq!(
        (path.as_str(), kind.as_str(), class.as_str()),
        ("/etc/ssh/sshd_config", "modified", "unexplained"),
        "{v1:?}"
    );
    assert!(owners.is_empty(), "{v1:?}");
    assert_eq!(v1[0]["severity"], "critical", "{v1:?}");
    let changed: Vec<&str> = v1[0]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["attribute"].as_str())
        .collect();
    assert!(changed.contains(&"content"), "{v1:?}");
    let e1 = collector.cli(&["hosts", "explain", &s1]).unwrap();
    assert_eq!(reason_codes(&e1), ["unexplained_change"], "{e1}");

    // s2: the package installed, its files added and explained by it, flagged for that (the
    // unexplained .deb under /root is outside unexplained_under, so it is no reason).
    let v2 = collector.try_violations(&s2).unwrap();
    let pkgs: Vec<(&str, &str)> = v2
        .iter()
        .filter(|v| v["item"] == "package")
        .map(|v| {
            (
                v["package"]["name"].as_str().unwrap_or(""),
                v["kind"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(pkgs, [(ROGUE, "package_installed")], "{v2:?}");
    let pkg = v2.iter().find(|v| v["item"] == "package").unwrap();
    assert_eq!(pkg["package"]["after"]["version"], "1.0", "{pkg}");
    let mut files2: Vec<_> = v2
        .iter()
        .filter(|v| v["item"] == "file")
        .map(file_view)
        .collect();
    files2.sort();
    let rogue_file = |p: &str| {
        (
            p.to_string(),
            "added".to_string(),
            "package-change".to_string(),
            vec![ROGUE.to_string()],
        )
    };
    // The .deb the intruder copied in is an added file of no package: unexplained.
    let copied = (
        "/root/fleet-rogue.deb".to_string(),
        "added".to_string(),
        "unexplained".to_string(),
        Vec::new(),
    );
    assert_eq!(
        files2,
        [
            copied,
            rogue_file("/usr/bin/fleet-rogue"),
            rogue_file("/usr/share/doc/fleet-rogue"),
            rogue_file("/usr/share/doc/fleet-rogue/README"),
        ],
        "{v2:?}"
    );
    let e2 = collector.cli(&["hosts", "explain", &s2]).unwrap();
    assert_eq!(reason_codes(&e2), ["package_drift"], "{e2}");

    // --- The rebuild automation: verified webhooks, replace each flagged server.
    let replaced = handle_rebuilds(&mut receiver, &mut fleet, &[&s1, &s2]);
    lap("flagged servers destroyed, successors booted");
    let mut want: Vec<(&str, &str)> = vec![(&s1, "replaced"), (&s2, "replaced"), (&s3, "clean")];
    for (_, new) in &replaced {
        want.push((new, "clean"));
    }
    wait_lifecycles(
        &collector,
        &fleet,
        "the old servers replaced, their successors enrolled and clean",
        &want,
    );
    lap("fleet clean again");
    assert!(receiver.rejected().is_empty(), "{:?}", receiver.rejected());
    // Each old host's `replaced` transition names a successor; the collector pairs them by
    // role and image (any fresh `web` server replaces a waiting one), so the pairs need not be
    // the harness's, but every successor is named exactly once.
    let mut named: Vec<String> = Vec::new();
    for (old, new) in &replaced {
        let h = collector.try_host(new).unwrap();
        assert_eq!(h["labels"]["role"], ROLE, "{h}");
        let show = collector.cli(&["host", "show", old]).unwrap();
        let t = &show["transitions"]["transitions"][0];
        assert_eq!(t["to"], "replaced", "{show}");
        let cause = t["cause"].as_str().unwrap_or("");
        let successor = replaced
            .iter()
            .map(|(_, n)| n)
            .find(|n| cause.contains(&format!("successor {n} ")))
            .unwrap_or_else(|| panic!("{old}'s replacement names no successor: {t}"));
        named.push(successor.clone());
    }
    named.sort();
    let mut successors: Vec<String> = replaced.iter().map(|(_, n)| n.clone()).collect();
    successors.sort();
    assert_eq!(named, successors);
    // The dispatcher closes each action (`completed`, "host is replaced") on its next round.
    wait_until(
        "both rebuild actions completed",
        Duration::from_secs(30),
        Duration::from_millis(500),
        || {
            let rebuilds = collector.cli(&["rebuilds"])?;
            let states: Vec<&str> = rebuilds["rebuilds"]
                .as_array()
                .ok_or_else(|| format!("{rebuilds}"))?
                .iter()
                .filter_map(|r| r["state"].as_str())
                .collect();
            if states == ["completed", "completed"] {
                Ok(())
            } else {
                Err(format!("{rebuilds}"))
            }
        },
    );

    // --- The agent on s3 stops: the collector marks the host silent.
    fleet
        .get(&s3)
        .ok(&["systemctl", "stop", "driftwatch-agent.service"]);
    want.retain(|(h, _)| *h != s3.as_str());
    want.push((&s3, "silent"));
    wait_lifecycles(&collector, &fleet, "s3 silent", &want);
    lap("stopped agent marked silent");

    let names = fleet.names();
    drop(fleet);
    drop(collector);
    drop(bridge);
    let left = sh(&format!(
        "ip -br link | grep -c -e dwfl{pid} -e 'vh-w{}' || true",
        pid % 100_000
    ));
    assert_eq!(left.trim(), "0", "interfaces left after {names:?}");
    lap("done");
}
