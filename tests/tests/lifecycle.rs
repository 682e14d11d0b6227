//! Flagging and the image registry end to end, over the real binaries: the image pipeline's
//! signed baseline pushed with `driftwatch baseline push`, agents enrolled with
//! `--label role=web` on their own copies of a Debian root, one drifted until the collector's
//! reconciler flags it (`hosts explain` names the reasons and the evidence), and a host whose
//! baseline root is not the registered one flagged for exactly that. Every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use driftwatch_tests::fleet::{Agent, Collector, Image};
use driftwatch_tests::{binary, debian, require_root};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(60);

fn codes(explain: &Value) -> Vec<String> {
    explain["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| r["code"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn wait_lifecycles(c: &Collector, what: &str, want: &[(&str, &str)]) {
    c.wait_lifecycles(what, SETTLE, want);
}

#[test]
fn a_drifted_host_and_a_host_off_the_registered_root_are_flagged_with_their_reasons() {
    if !require_root("copies of a Debian root with their ownership") {
        return;
    }
    let started = std::time::Instant::now();
    let base = debian::minbase();
    let work = tempfile::tempdir().unwrap();
    let image = Image::create(&base, work.path());
    // Another build of the "same" image: one file more, so another root, never pushed.
    let other_root = debian::copy(&base);
    fs::write(other_root.path().join("etc/local-build"), "built by hand\n").unwrap();
    let other_dir = work.path().join("other-image");
    fs::create_dir_all(&other_dir).unwrap();
    let other_image = Image::create(other_root.path(), &other_dir);

    let extra = format!(
        "trusted_keys = [{key:?}]\nreconcile_interval = \"200ms\"\n\
         [flagging]\nseverity_at_least = \"high\"\nregistered_root = true\n",
        key = image.keys.public.display().to_string()
    );
    let collector =
        Collector::start_configured(work.path(), None, binary("driftwatch-collector"), &extra);

    // The pipeline registers its baseline; the collector verified it against trusted_keys.
    let image_path = image.baseline.display().to_string();
    let pushed = collector.cli(&["baseline", "push", &image_path]).unwrap();
    let root = pushed["baseline"]["root"].as_str().unwrap().to_string();
    assert_eq!(pushed["baseline"]["image_id"], "test-image", "{pushed}");
    assert_eq!(root.len(), 64);
    // The same version again is refused; so is a baseline signed by an untrusted key.
    let again = collector
        .cli(&["baseline", "push", &image_path])
        .unwrap_err();
    assert!(again.contains("not newer"), "{again}");
    let other = other_image.baseline.display().to_string();
    let untrusted = collector.cli(&["baseline", "push", &other]).unwrap_err();
    assert!(
        untrusted.contains("not among the trusted keys"),
        "{untrusted}"
    );

    let token = collector.token(4);
    let fp = collector.ca_fingerprint();
    let roots: Vec<_> = (0..3).map(|_| debian::copy(&base)).collect();
    let mut agents: Vec<Agent> = Vec::new();
    for (i, r) in roots.iter().enumerate() {
        let dir = work.path().join(format!("agent-{i}"));
        fs::create_dir_all(&dir).unwrap();
        agents.push(Agent::enroll_labeled(
            &collector,
            &token,
            &fp,
            &format!("web-{i}"),
            &dir,
            r.path(),
            &image,
            &["role=web"],
        ));
    }
    let dir = work.path().join("agent-odd");
    fs::create_dir_all(&dir).unwrap();
    agents.push(Agent::enroll_labeled(
        &collector,
        &token,
        &fp,
        "web-odd",
        &dir,
        other_root.path(),
        &other_image,
        &["role=web"],
    ));
    for a in &mut agents {
        a.start();
    }
    wait_lifecycles(
        &collector,
        "three clean hosts and the one off the registered root flagged",
        &[
            ("web-0", "clean"),
            ("web-1", "clean"),
            ("web-2", "clean"),
            ("web-odd", "flagged"),
        ],
    );
    eprintln!("{:?}: fleet assessed", started.elapsed());
    let odd = collector.cli(&["hosts", "explain", "web-odd"]).unwrap();
    assert_eq!(codes(&odd), ["baseline_root_mismatch"], "{odd}");
    assert_eq!(odd["reasons"][0]["evidence"]["expected"], root.as_str());
    assert_ne!(odd["reasons"][0]["evidence"]["observed"], root.as_str());
    let clean = collector.cli(&["hosts", "explain", "web-0"]).unwrap();
    assert_eq!(clean["flagged"], false, "{clean}");

    // An intruder on web-1: a setuid binary (critical) and an edited /etc/passwd.
    let r1 = roots[1].path();
    fs::set_permissions(r1.join("usr/bin/env"), fs::Permissions::from_mode(0o4755)).unwrap();
    let passwd = r1.join("etc/passwd");
    let mut text = fs::read_to_string(&passwd).unwrap();
    text.push_str("toor:x:0:0::/root:/bin/sh\n");
    fs::write(&passwd, text).unwrap();
    agents[1].scan_now();
    wait_lifecycles(
        &collector,
        "web-1 flagged",
        &[
            ("web-0", "clean"),
            ("web-1", "flagged"),
            ("web-2", "clean"),
            ("web-odd", "flagged"),
        ],
    );
    eprintln!("{:?}: web-1 flagged", started.elapsed());
    let e = collector.cli(&["hosts", "explain", "web-1"]).unwrap();
    assert_eq!(codes(&e), ["severity"], "{e}");
    let paths: Vec<&str> = e["reasons"][0]["evidence"]["paths"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["text"].as_str())
        .collect();
    assert!(paths.contains(&"/usr/bin/env"), "{e}");
    // The transition is stored with its cause, and shown by `host show`.
    let show = collector.cli(&["host", "show", "web-1"]).unwrap();
    let t = &show["transitions"]["transitions"][0];
    assert_eq!(
        (t["from"].as_str(), t["to"].as_str()),
        (Some("clean"), Some("flagged")),
        "{show}"
    );
    assert_eq!(t["actor"], "collector");
    assert!(
        t["cause"].as_str().unwrap().starts_with("severity: "),
        "{t}"
    );

    // The image view: consensus web-0, web-2; outliers web-1 (drift) and web-odd (root).
    let img = collector.cli(&["image", "show", "test-image"]).unwrap();
    assert_eq!(
        img["consensus"],
        serde_json::json!(["web-0", "web-2"]),
        "{img}"
    );
    let outliers: Vec<(&str, bool, bool)> = img["outliers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["host_id"].as_str().unwrap(),
                o["other_root"].as_bool().unwrap(),
                o["drift"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(outliers, [("web-1", false, true), ("web-odd", true, false)]);

    // An operator retires the odd host; it is no longer assessed.
    let retired = collector
        .cli(&["host", "retire", "web-odd", "--reason", "built by hand"])
        .unwrap();
    assert_eq!(retired["transition"]["to"], "retired", "{retired}");
    wait_lifecycles(
        &collector,
        "web-odd retired",
        &[
            ("web-0", "clean"),
            ("web-1", "flagged"),
            ("web-2", "clean"),
            ("web-odd", "retired"),
        ],
    );
    for a in &mut agents {
        a.stop();
    }
}
