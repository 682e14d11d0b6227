//! Booted Debian "servers" for tests: systemd as PID 1 in `systemd-nspawn`, each on its own
//! writable overlay over one cached base root (the same image, many servers), following the
//! recipe in `../shared/recipes/boot-systemd-container.sh`.
//!
//! The machine this runs on has no systemd as PID 1, so nspawn runs with `--register=no
//! --keep-unit`, moved first into a private cgroup (both hierarchies) so parallel machines do
//! not share nspawn's `payload/` cgroup; commands run inside with `nsenter -a` on the
//! container's PID 1. A [`Machine`] powers off (SIGRTMIN+3), unmounts and removes everything
//! when dropped, pass or panic. Needs root.
//!
//! Networking: [`Network::Loopback`] (`--private-network`: only its own loopback), or
//! [`Network::Bridged`]: its own network namespace (created before boot, passed with
//! `--network-namespace-path`), joined by a veth pair to a [`Bridge`] in the host's namespace
//! that holds one host address — the only thing the machine can reach. Both the namespace and
//! the host end of the veth pair are removed when the machine drops; the bridge when the
//! [`Bridge`] drops.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::daemon::wait_until;
use crate::{Run, run_with_limit};

/// Packages of the base root besides minbase: systemd as init, D-Bus for systemctl, and what a
/// Debian server has anyway (`important` priority) that packages may depend on.
pub const BASE_PACKAGES: &[&str] = &["systemd", "systemd-sysv", "dbus", "iproute2", "procps"];

/// How long a boot may take before the test fails.
const BOOT_LIMIT: Duration = Duration::from_secs(90);

/// The cached Debian root with systemd that every machine boots from (read-only lower layer).
pub fn base_root() -> PathBuf {
    crate::debian::root("server", BASE_PACKAGES)
}

/// How a machine is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// Only its own loopback interface.
    Loopback,
    /// Its own network namespace with `host0` at `address` (CIDR, e.g. `10.1.2.10/24`),
    /// linked by a veth pair to the host bridge `bridge` ([`Bridge::name`]).
    Bridged { bridge: String, address: String },
}

/// A Linux bridge in the host's network namespace with one host address; machines joined to
/// it ([`Network::Bridged`]) reach that address and each other, nothing else (no route, no
/// forwarding). Deleted when dropped.
#[derive(Debug)]
pub struct Bridge {
    /// The interface name (at most 15 characters).
    pub name: String,
    /// The host's address on it, without prefix length.
    pub host_ip: String,
}

impl Bridge {
    /// Creates bridge `name` with `host_cidr` (e.g. `10.1.2.1/24`) and brings it up. A
    /// leftover interface of that name (a killed earlier run) is removed first.
    pub fn create(name: &str, host_cidr: &str) -> Bridge {
        assert!(name.len() <= 15, "bridge name {name:?} is too long");
        let _ = sh(&format!("ip link del {name} 2>/dev/null"));
        let r = sh(&format!(
            "ip link add {name} type bridge && ip addr add {host_cidr} dev {name} && \
             ip link set {name} up"
        ));
        assert_eq!(r.code, 0, "creating bridge {name}: {}", r.stderr);
        Bridge {
            name: name.to_string(),
            host_ip: host_cidr
                .split('/')
                .next()
                .expect("split yields one part")
                .to_string(),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = sh(&format!("ip link del {} 2>/dev/null", self.name));
    }
}

/// The network namespace and host-side veth of a bridged machine.
#[derive(Debug)]
struct Link {
    netns: String,
    host_veth: String,
}

impl Link {
    fn create(name: &str, bridge: &str, address: &str) -> Link {
        let link = Link {
            netns: format!("driftwatch-{name}-{}", std::process::id()),
            host_veth: format!("vh-{name}"),
        };
        link.remove();
        let r = sh(&format!(
            "ip netns add {ns} && \
             ip link add {veth} type veth peer name host0 netns {ns} && \
             ip link set {veth} master {bridge} && ip link set {veth} up && \
             ip -n {ns} addr add {address} dev host0 && ip -n {ns} link set host0 up && \
             ip -n {ns} link set lo up",
            ns = link.netns,
            veth = link.host_veth,
        ));
        if r.code != 0 {
            link.remove();
            panic!("linking {name} to bridge {bridge}: {}", r.stderr);
        }
        link
    }

    /// Deleting the namespace destroys the veth pair; the explicit delete covers a namespace
    /// that was never made.
    fn remove(&self) {
        let _ = sh(&format!(
            "ip netns del {} 2>/dev/null; ip link del {} 2>/dev/null",
            self.netns, self.host_veth
        ));
    }
}

/// A booted container. Dropping it powers it off and removes its overlay.
#[derive(Debug)]
pub struct Machine {
    pub name: String,
    /// The work directory: `root/` (the overlay mount), `upper/`, `work/`, `console.log`.
    pub dir: PathBuf,
    /// The container's root as seen from the host (files written here appear inside).
    pub root: PathBuf,
    nspawn: Option<Child>,
    /// PID (host namespace) of the container's systemd.
    pub init_pid: u32,
    cgroup: String,
    link: Option<Link>,
}

fn cgroup_root(hierarchy: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup").join(hierarchy)
}

/// The cgroup hierarchies nspawn uses here: the unified one and, on a hybrid host, the named
/// `systemd` one.
fn hierarchies() -> Vec<&'static str> {
    ["unified", "systemd"]
        .into_iter()
        .filter(|h| cgroup_root(h).join("cgroup.procs").is_file())
        .collect()
}

fn sh(cmd: &str) -> Run {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd);
    run_with_limit(c, Duration::from_secs(120))
}

impl Machine {
    /// Boots a machine named `name` (≤ 12 characters, unique among running machines) from
    /// `base` and waits until systemd reports `running` (or `degraded`, with the failed units
    /// printed).
    pub fn boot(name: &str, base: &Path, network: Network) -> Machine {
        Machine::boot_with(name, base, network, &[])
    }

    /// Like [`Machine::boot`], with system credentials for the machine's systemd
    /// (`--set-credential=ID:VALUE`), which its units take with `LoadCredential=ID`.
    pub fn boot_with(
        name: &str,
        base: &Path,
        network: Network,
        credentials: &[(&str, &str)],
    ) -> Machine {
        assert!(name.len() <= 12, "machine name {name:?} is too long");
        let dir = crate::debian::cache_dir()
            .join("work")
            .join(format!("nspawn-{name}-{}", std::process::id()));
        let _ = sh(&format!(
            "umount {0}/root 2>/dev/null; rm -rf {0}",
            dir.display()
        ));
        let root = dir.join("root");
        for d in ["root", "upper", "work"] {
            fs::create_dir_all(dir.join(d)).expect("create machine dirs");
        }
        let r = sh(&format!(
            "mount -t overlay overlay -o lowerdir={},upperdir={}/upper,workdir={}/work {}",
            base.display(),
            dir.display(),
            dir.display(),
            root.display()
        ));
        assert_eq!(r.code, 0, "overlay mount failed: {}", r.stderr);
        fs::write(root.join("etc/hostname"), format!("{name}\n")).expect("hostname");

        let cgroup = format!("driftwatch-test-{name}-{}", std::process::id());
        let mut join_cgroup = String::new();
        for h in hierarchies() {
            let cg = cgroup_root(h).join(&cgroup);
            fs::create_dir_all(&cg).expect("create cgroup");
            join_cgroup.push_str(&format!("echo $$ > {}/cgroup.procs; ", cg.display()));
        }
        let (net, link) = match network {
            Network::Loopback => ("--private-network".to_string(), None),
            Network::Bridged { bridge, address } => {
                let link = Link::create(name, &bridge, &address);
                (
                    format!("--network-namespace-path=/run/netns/{}", link.netns),
                    Some(link),
                )
            }
        };
        let mut creds = String::new();
        for (id, value) in credentials {
            assert!(
                !value.contains('\'') && !id.contains('\''),
                "credential {id}: no quotes"
            );
            creds.push_str(&format!(" '--set-credential={id}:{value}'"));
        }
        let console = fs::File::create(dir.join("console.log")).expect("console.log");
        // setsid keeps terminal signals away; the shell joins the private cgroup and becomes
        // nspawn (exec), so the child's PID is nspawn's.
        let nspawn = Command::new("setsid")
            .arg("sh")
            .arg("-c")
            .arg(format!(
                "{join_cgroup}exec systemd-nspawn --register=no --keep-unit --boot \
                 --console=passive -q -M {name} -D {} {net}{creds}",
                root.display()
            ))
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("dup console"))
            .stderr(console)
            .spawn()
            .expect("start systemd-nspawn");
        let mut m = Machine {
            name: name.to_string(),
            dir,
            root,
            init_pid: 0,
            nspawn: Some(nspawn),
            cgroup,
            link,
        };
        m.wait_booted();
        m
    }

    fn wait_booted(&mut self) {
        let started = Instant::now();
        loop {
            assert!(
                started.elapsed() < BOOT_LIMIT,
                "{} did not boot within {BOOT_LIMIT:?}:\n{}",
                self.name,
                self.console()
            );
            if let Some(Ok(Some(status))) = self.nspawn.as_mut().map(Child::try_wait) {
                panic!(
                    "systemd-nspawn of {} exited ({status}):\n{}",
                    self.name,
                    self.console()
                );
            }
            if self.init_pid == 0 {
                let npid = self.nspawn.as_ref().map_or(0, Child::id);
                let r = sh(&format!("ps -o pid= --ppid {npid}"));
                self.init_pid = r
                    .stdout_str()
                    .split_whitespace()
                    .next()
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
            }
            if self.init_pid != 0 {
                let state = self.exec(&["systemctl", "is-system-running"]).stdout_str();
                match state.trim() {
                    "running" => return,
                    "degraded" => {
                        let failed = self.exec(&["systemctl", "--failed", "--no-pager"]);
                        eprintln!("{} booted degraded:\n{}", self.name, failed.stdout_str());
                        return;
                    }
                    _ => {}
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The console output so far (boot messages).
    pub fn console(&self) -> String {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// Runs a command inside (all of the container's namespaces, a clean environment), for at
    /// most 10 minutes.
    pub fn exec(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.init_pid.to_string())
            .arg("-a")
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                "HOME=/root",
                "DEBIAN_FRONTEND=noninteractive",
            ])
            .args(args);
        run_with_limit(cmd, Duration::from_secs(600))
    }

    /// Runs a command inside and panics unless it exits 0; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.exec(args);
        assert_eq!(
            r.code,
            0,
            "{}: {args:?} exited {}:\n{}\n{}",
            self.name,
            r.code,
            r.stdout_str(),
            r.stderr
        );
        r.stdout_str()
    }

    /// A shell command line inside (`sh -c`), which must exit 0.
    pub fn sh(&self, script: &str) -> String {
        self.ok(&["sh", "-c", script])
    }

    /// Copies a host file to `dest` inside (an absolute path; not under /tmp, which is a fresh
    /// tmpfs inside).
    pub fn copy_in(&self, src: &Path, dest: &str) {
        let d = self.root.join(dest.trim_start_matches('/'));
        fs::create_dir_all(d.parent().expect("parent")).expect("mkdir inside");
        fs::copy(src, &d).unwrap_or_else(|e| panic!("copy {} in: {e}", src.display()));
    }

    /// A systemd property of a unit (`systemctl show -p NAME --value`).
    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        self.ok(&["systemctl", "show", "-p", property, "--value", unit])
            .trim()
            .to_string()
    }

    /// `systemd-analyze verify` of installed units on the booted system: exit 0 and not one
    /// warning.
    pub fn verify_units(&self, units: &[&str]) {
        let mut args = vec!["systemd-analyze", "verify", "--man=no"];
        args.extend_from_slice(units);
        let verify = self.exec(&args);
        assert!(
            verify.code == 0 && verify.stderr.trim().is_empty(),
            "systemd-analyze verify {units:?}: {}",
            verify.stderr
        );
    }

    /// Waits until `unit` is active, with its status and journal in the failure message.
    pub fn wait_active(&self, unit: &str, limit: Duration) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until(
                &format!("{unit} active"),
                limit,
                Duration::from_millis(250),
                || {
                    let s = self.unit_property(unit, "ActiveState");
                    if s == "active" { Ok(()) } else { Err(s) }
                },
            )
        }));
        if let Err(e) = r {
            eprintln!("{}", self.unit_report(unit));
            std::panic::resume_unwind(e);
        }
    }

    /// `systemctl status` and the journal of `unit`, for failure messages.
    pub fn unit_report(&self, unit: &str) -> String {
        let status = self.exec(&["systemctl", "status", "--no-pager", "-l", unit]);
        let journal = self.exec(&["journalctl", "-u", unit, "--no-pager", "-n", "60"]);
        format!(
            "--- systemctl status {unit}:\n{}\n--- journal:\n{}",
            status.stdout_str(),
            journal.stdout_str()
        )
    }

    /// Powers off (SIGRTMIN+3 to the container's systemd) and waits for nspawn to exit; kills it
    /// after 15 s.
    fn power_off(&mut self) {
        let Some(mut child) = self.nspawn.take() else {
            return;
        };
        if self.init_pid != 0 {
            // SIGRTMIN+3 is "poweroff" to systemd (nix has no real-time signals).
            let _ = sh(&format!("kill -s RTMIN+3 {}", self.init_pid));
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{} did not power off in 15 s: killing nspawn", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.power_off();
        if let Some(link) = self.link.take() {
            link.remove();
        }
        let _ = sh(&format!(
            "umount {0} 2>/dev/null || umount -l {0}",
            self.root.display()
        ));
        for h in hierarchies() {
            let cg = cgroup_root(h).join(&self.cgroup);
            // Deepest first: nspawn left payload/ and supervisor/ below ours.
            let _ = sh(&format!(
                "[ -d {0} ] && find {0} -depth -type d -exec rmdir {{}} + 2>/dev/null",
                cg.display()
            ));
        }
        if std::env::var_os("DRIFTWATCH_KEEP_MACHINES").is_none() {
            let _ = sh(&format!(
                "mountpoint -q {} || rm -rf {}",
                self.root.display(),
                self.dir.display()
            ));
        }
    }
}
