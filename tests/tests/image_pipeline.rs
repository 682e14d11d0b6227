//! The image-pipeline example (`packaging/examples/packer/`) for real, without Packer: its
//! provisioner script runs as root inside a Debian server root (a chroot standing in for the VM
//! being built) with the real agent .deb, the build's files "uploaded" to its /run; the baseline
//! it made is "downloaded" and `push-baseline.sh` registers it, from the host, with a real
//! collector on loopback. Then what the pipeline promises:
//!
//! - the agent is installed, the drop-in names the collector, the image holds the public key
//!   and no trace of the private one;
//! - the collector's image registry has the image at the baseline's Merkle root;
//! - the one-shot check of the built root (the "test server" before promotion) is clean, and a
//!   change to it is found;
//! - pushing the same version again is refused, and a push without a token fails clearly.
//!
//! Needs root (skips with a printed reason outside CI; under CI=true a skip fails), debootstrap
//! and cargo-deb.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use driftwatch_tests::fleet::Collector;
use driftwatch_tests::packaging::build_debs;
use driftwatch_tests::{
    Keys, Run, baseline_show_json, bin_dir, binary, debian, nspawn, require_program, require_root,
    run_with_limit,
};

const IMAGE_ID: &str = "pipeline-web";
const IMAGE_VERSION: &str = "2026.11.26-1";
const COLLECTOR_GRPC: &str = "https://collector.example.test:7443";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `argv` chrooted into `root` (own mount namespace with /proc, a clean environment plus
/// `env`), as a provisioner runs inside the build VM.
fn in_root(root: &Path, env: &[(&str, &str)], argv: &[&str]) -> Run {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--fork", "sh", "-c"])
        .arg("mount -t proc proc \"$0/proc\" && exec chroot \"$0\" \"$@\"")
        .arg(root)
        .args([
            "/usr/bin/env",
            "-i",
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8",
            "HOME=/root",
        ]);
    for (k, v) in env {
        cmd.arg(format!("{k}={v}"));
    }
    cmd.args(argv);
    run_with_limit(cmd, Duration::from_secs(600))
}

/// `push-baseline.sh FILE` on the host with the `driftwatch` CLI of this build on PATH.
fn push(baseline: &Path, env: &[(&str, &str)]) -> Run {
    let script = workspace().join("packaging/examples/packer/push-baseline.sh");
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("sh");
    cmd.arg(script)
        .arg(baseline)
        .env_clear()
        .env("PATH", path)
        .envs(env.iter().copied());
    run_with_limit(cmd, Duration::from_secs(120))
}

#[test]
fn provisioner_installs_signs_and_registers_the_image_baseline() {
    if !require_root("installs a package into a chroot of a Debian root")
        || !require_program("debootstrap")
        || !require_program("cargo-deb")
        || !require_program("unshare")
    {
        return;
    }
    let started = Instant::now();
    let work = tempfile::tempdir().unwrap();
    let (deb, _) = build_debs(&work.path().join("debs"), None);
    let keys = Keys::new();
    let private_key = fs::read_to_string(&keys.private).unwrap();
    let key_line = private_key
        .lines()
        .find(|l| !l.starts_with("-----"))
        .unwrap()
        .to_string();

    let collector_dir = work.path().join("collector");
    fs::create_dir_all(&collector_dir).unwrap();
    let collector = Collector::start_configured(
        &collector_dir,
        None,
        binary("driftwatch-collector"),
        &format!("trusted_keys = [{:?}]\n", keys.public.display().to_string()),
    );

    // The image being built: the Debian server root (systemd, no agent yet).
    let image = debian::copy(&nspawn::base_root());
    let root = image.path();
    assert!(!root.join("usr/bin/driftwatch-agent").exists());

    // What Packer's file provisioner uploads to /run/driftwatch-build.
    let build_dir = root.join("run/driftwatch-build");
    fs::create_dir_all(&build_dir).unwrap();
    let examples = workspace().join("packaging/examples");
    for (src, name) in [
        (keys.private.clone(), "pipeline.key"),
        (keys.public.clone(), "pipeline.pub"),
        (deb.clone(), "driftwatch-agent.deb"),
        (examples.join("policy-web.toml"), "policy.toml"),
        (examples.join("packer/provision.sh"), "provision.sh"),
    ] {
        fs::copy(&src, build_dir.join(name)).unwrap();
    }

    // Bad input first: without the collector the script refuses, and still deletes the key.
    let refused = in_root(
        root,
        &[
            ("DRIFTWATCH_IMAGE_ID", IMAGE_ID),
            ("DRIFTWATCH_IMAGE_VERSION", IMAGE_VERSION),
        ],
        &["sh", "/run/driftwatch-build/provision.sh"],
    );
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("DRIFTWATCH_COLLECTOR"),
        "{}",
        refused.stderr
    );
    fs::copy(&keys.private, build_dir.join("pipeline.key")).unwrap();

    let provision_started = Instant::now();
    let r = in_root(
        root,
        &[
            ("DRIFTWATCH_IMAGE_ID", IMAGE_ID),
            ("DRIFTWATCH_IMAGE_VERSION", IMAGE_VERSION),
            ("DRIFTWATCH_COLLECTOR", COLLECTOR_GRPC),
            (
                "DRIFTWATCH_AGENT_PACKAGE",
                "/run/driftwatch-build/driftwatch-agent.deb",
            ),
            ("DRIFTWATCH_BASELINE_EXPIRES", "365d"),
        ],
        &["sh", "/run/driftwatch-build/provision.sh"],
    );
    assert_eq!(
        r.code,
        0,
        "provision.sh failed:\n{}\n{}",
        r.stdout_str(),
        r.stderr
    );
    eprintln!("provision.sh: {:?}", provision_started.elapsed());

    // The image: the agent package, the drop-in, the public key, the baseline; no private key.
    let status = in_root(
        root,
        &[],
        &["dpkg-query", "-W", "-f=${Status}", "driftwatch-agent"],
    );
    assert_eq!(status.stdout_str(), "install ok installed");
    let dropin = fs::read_to_string(root.join("etc/driftwatch/agent.d/50-image.toml")).unwrap();
    assert!(
        dropin.contains(&format!("collector = \"{COLLECTOR_GRPC}\"")),
        "{dropin}"
    );
    assert_eq!(
        fs::read(root.join("etc/driftwatch/pipeline.pub")).unwrap(),
        fs::read(&keys.public).unwrap()
    );
    assert!(!build_dir.join("pipeline.key").exists(), "key not deleted");
    let mut grep = Command::new("grep");
    grep.args([
        "-rlF",
        "--devices=skip",
        "--exclude-dir=proc",
        "-e",
        &key_line,
    ])
    .arg(root);
    let found = run_with_limit(grep, Duration::from_secs(300));
    assert_eq!(
        found.code,
        1,
        "the private key is in the image: {}{}",
        found.stdout_str(),
        found.stderr
    );
    // The agent's configuration as installed parses, with the image's drop-in.
    let config = in_root(
        root,
        &[],
        &["driftwatch-agent", "policy", "show", "--path", "/etc/motd"],
    );
    assert_eq!(config.code, 0, "{}", config.stderr);

    // Packer's download, then the shell-local push from the build host.
    let baseline = work.path().join(format!("{IMAGE_ID}-{IMAGE_VERSION}.dwb"));
    fs::copy(root.join("etc/driftwatch/baseline.dwb"), &baseline).unwrap();
    let show = baseline_show_json(&baseline, &[]).json();
    let merkle_root = show["merkle_root"].as_str().unwrap().to_string();

    let no_token = push(&baseline, &[("DRIFTWATCH_API", &collector.api)]);
    assert_eq!(no_token.code, 1);
    assert!(
        no_token.stderr.contains("DRIFTWATCH_TOKEN"),
        "{}",
        no_token.stderr
    );
    let pushed = push(
        &baseline,
        &[
            ("DRIFTWATCH_API", &collector.api),
            ("DRIFTWATCH_TOKEN", &collector.api_token),
        ],
    );
    assert_eq!(
        pushed.code,
        0,
        "push: {}{}",
        pushed.stdout_str(),
        pushed.stderr
    );
    assert!(
        pushed.stdout_str().contains(&format!(
            "registered image {IMAGE_ID} version {IMAGE_VERSION}"
        )),
        "{}",
        pushed.stdout_str()
    );
    let images = collector.cli(&["images"]).unwrap();
    let entry = images["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image_id"] == IMAGE_ID)
        .unwrap_or_else(|| panic!("{IMAGE_ID} not in the registry: {images}"))
        .clone();
    assert_eq!(entry["registered"]["version"], IMAGE_VERSION, "{entry}");
    assert_eq!(entry["registered"]["root"], merkle_root.as_str(), "{entry}");
    let again = push(
        &baseline,
        &[
            ("DRIFTWATCH_API", &collector.api),
            ("DRIFTWATCH_TOKEN", &collector.api_token),
        ],
    );
    assert_ne!(again.code, 0);
    assert!(again.stderr.contains("not newer"), "{}", again.stderr);

    // Before promotion: the one-shot check of a server from the image is clean...
    let check_args = [
        "driftwatch-agent",
        "check",
        "--baseline",
        "/etc/driftwatch/baseline.dwb",
        "--trusted-key",
        "/etc/driftwatch/pipeline.pub",
    ];
    let check = in_root(root, &[], &check_args);
    assert_eq!(
        check.code,
        0,
        "check of the fresh image:\n{}\n{}",
        check.stdout_str(),
        check.stderr
    );
    // ...and finds a change.
    fs::write(root.join("usr/local/bin/backdoor"), "#!/bin/sh\n").unwrap();
    let check = in_root(root, &[], &check_args);
    assert_eq!(check.code, 1, "{}\n{}", check.stdout_str(), check.stderr);
    assert!(
        check.stdout_str().contains("/usr/local/bin/backdoor"),
        "{}",
        check.stdout_str()
    );
    eprintln!("image pipeline test: {:?}", started.elapsed());
}
