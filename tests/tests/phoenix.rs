//! The phoenix loop end to end, over the real binaries: agents with `--label role=web` on their
//! own copies of a Debian root; one drifts; the collector's flagging policy flags it and its
//! rebuild action fires — a Standard Webhooks request over HTTPS to a receiver that verifies the
//! signature (tests/src/webhook.rs), or a command that queues the request — and the harness
//! "rebuilds" the way a deploy system would: the drifted server is destroyed, a fresh copy of
//! the image root gets a new agent enrolled under the same role label, and the collector marks
//! the old host replaced. The fleet ends clean, the action completed, and the audit chain
//! verifies with every step in it. Every wait is bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use driftwatch_tests::daemon::wait_until;
use driftwatch_tests::fleet::{Agent, Collector, Image};
use driftwatch_tests::webhook::{Receiver, Tls};
use driftwatch_tests::{binary, debian, require_root};
use serde_json::Value;

const SETTLE: Duration = Duration::from_secs(60);

/// How a rebuild request reaches the "deploy system" of this test.
enum Trigger {
    Webhook(Receiver),
    /// The command action writes each request into this queue directory.
    Command(PathBuf),
}

impl Trigger {
    /// The `[actions]` keys for this trigger (files it needs written under `dir`).
    fn config(&self, dir: &Path, tls: Option<&Tls>, secret_file: &Path) -> String {
        match self {
            Trigger::Webhook(r) => {
                let ca = dir.join("receiver-ca.pem");
                fs::write(&ca, &tls.expect("webhook over https").ca_pem).unwrap();
                format!(
                    "kind = \"webhook\"\nurl = {url:?}\nsecret_file = {s:?}\nca_file = {ca:?}\n",
                    url = r.url,
                    s = secret_file.display().to_string(),
                    ca = ca.display().to_string(),
                )
            }
            Trigger::Command(queue) => {
                // A real command: the body from stdin into a queue file named by the action
                // id (written under a temporary name, then renamed, so a half-written request
                // is never picked up).
                let script = dir.join("queue-rebuild");
                fs::write(
                    &script,
                    format!(
                        "#!/bin/sh\nset -e\nq={q:?}\n\
                         cat > \"$q/.$DRIFTWATCH_ACTION_ID.tmp\"\n\
                         mv \"$q/.$DRIFTWATCH_ACTION_ID.tmp\" \"$q/$DRIFTWATCH_ACTION_ID.json\"\n\
                         echo \"queued $DRIFTWATCH_HOST_ID\" >&2\n",
                        q = queue.display().to_string()
                    ),
                )
                .unwrap();
                fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
                format!(
                    "kind = \"command\"\nargv = [{s:?}]\n",
                    s = script.display().to_string()
                )
            }
        }
    }

    /// The next rebuild request: (action id, body).
    fn next(&mut self, seen: &mut Vec<String>, limit: Duration) -> Option<(String, Value)> {
        match self {
            Trigger::Webhook(r) => r.next(limit).map(|d| (d.id.clone(), d.body)),
            Trigger::Command(queue) => {
                let q = queue.clone();
                let started = Instant::now();
                while started.elapsed() < limit {
                    let mut names: Vec<String> = fs::read_dir(&q)
                        .unwrap()
                        .filter_map(|e| e.ok()?.file_name().into_string().ok())
                        .filter(|n| n.ends_with(".json") && !seen.contains(n))
                        .collect();
                    names.sort();
                    if let Some(n) = names.into_iter().next() {
                        let body: Value =
                            serde_json::from_slice(&fs::read(q.join(&n)).unwrap()).unwrap();
                        seen.push(n.clone());
                        return Some((n.trim_end_matches(".json").to_string(), body));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                None
            }
        }
    }
}

fn wait_lifecycles(c: &Collector, what: &str, want: &[(&str, &str)]) {
    c.wait_lifecycles(what, SETTLE, want);
}

fn phoenix(kind: &str) {
    if !require_root("copies of a Debian root with their ownership") {
        return;
    }
    let started = Instant::now();
    let base = debian::minbase();
    let work = tempfile::tempdir().unwrap();
    let image = Image::create(&base, work.path());
    let secret_file = work.path().join("rebuild.secret");
    let secret = Receiver::write_secret(&secret_file);
    let tls = Tls::generate();
    let mut trigger = match kind {
        "webhook" => Trigger::Webhook(Receiver::start(&secret, Some(&tls))),
        _ => {
            let q = work.path().join("rebuild-queue");
            fs::create_dir(&q).unwrap();
            Trigger::Command(q)
        }
    };
    let extra = format!(
        "trusted_keys = [{key:?}]\nreconcile_interval = \"200ms\"\n\
         [flagging]\nseverity_at_least = \"high\"\nregistered_root = true\n\
         [actions]\n{action}approval = false\nmax_in_flight = 1\ntimeout = \"20s\"\n\
         rebuild_timeout = \"5m\"\n",
        key = image.keys.public.display().to_string(),
        action = trigger.config(work.path(), Some(&tls), &secret_file),
    );
    let collector =
        Collector::start_configured(work.path(), None, binary("driftwatch-collector"), &extra);
    eprintln!("{:?}: collector up", started.elapsed());
    let pushed = collector
        .cli(&["baseline", "push", &image.baseline.display().to_string()])
        .unwrap();
    let image_root = pushed["baseline"]["root"].as_str().unwrap().to_string();

    // Three servers from the image, one spare root for the successor.
    let token = collector.token(4);
    let fp = collector.ca_fingerprint();
    let server = |name: &str, root: &Path| -> Agent {
        let dir = work.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        let mut a = Agent::enroll_labeled(
            &collector,
            &token,
            &fp,
            name,
            &dir,
            root,
            &image,
            &["role=web"],
        );
        a.start();
        a
    };
    let mut roots: Vec<_> = (0..3).map(|_| Some(debian::copy(&base))).collect();
    eprintln!("{:?}: roots copied", started.elapsed());
    let mut agents: Vec<Agent> = (0..3)
        .map(|i| server(&format!("web-{i}"), roots[i].as_ref().unwrap().path()))
        .collect();
    wait_lifecycles(
        &collector,
        "three clean hosts",
        &[("web-0", "clean"), ("web-1", "clean"), ("web-2", "clean")],
    );
    eprintln!("{:?}: fleet clean", started.elapsed());

    // Someone "fixes" web-1 by hand: a setuid shell helper (critical).
    let r1 = roots[1].as_ref().unwrap().path().to_path_buf();
    fs::set_permissions(r1.join("usr/bin/env"), fs::Permissions::from_mode(0o4755)).unwrap();
    agents[1].scan_now();

    // The collector flags it and asks for its rebuild.
    let mut seen = Vec::new();
    let (action_id, body) = trigger
        .next(&mut seen, SETTLE)
        .unwrap_or_else(|| panic!("no rebuild request; collector log:\n{}", collector.log()));
    eprintln!("{:?}: rebuild requested ({action_id})", started.elapsed());
    let data = &body["data"];
    assert_eq!(body["type"], "driftwatch.rebuild.requested", "{body}");
    assert_eq!(data["action_id"], action_id.as_str());
    assert_eq!(data["host"]["id"], "web-1", "{body}");
    assert_eq!(data["role"], "web");
    assert_eq!(data["image"]["id"], "test-image");
    assert_eq!(data["image"]["root"], image_root.as_str());
    assert_eq!(data["dry_run"], false);
    let paths: Vec<&str> = data["violations"]["paths"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(paths, ["/usr/bin/env"], "{body}");
    assert!(
        data["idempotency_key"]
            .as_str()
            .unwrap()
            .starts_with("web-1:")
    );
    let lc = collector.lifecycles().unwrap();
    assert!(
        lc.contains(&("web-1".into(), "rebuild_requested".into())),
        "{lc:?}"
    );

    // The deploy system destroys web-1 and boots web-3 from the image, same role.
    agents[1].stop();
    roots[1] = None;
    let fresh = debian::copy(&base);
    agents.push(server("web-3", fresh.path()));
    wait_lifecycles(
        &collector,
        "web-1 replaced by web-3, the fleet clean",
        &[
            ("web-0", "clean"),
            ("web-1", "replaced"),
            ("web-2", "clean"),
            ("web-3", "clean"),
        ],
    );
    eprintln!("{:?}: web-1 replaced, fleet clean", started.elapsed());

    // The dispatcher closes the action (`completed`: the host is replaced) on its next round;
    // nothing else was requested.
    wait_until(
        "the rebuild action completed",
        SETTLE,
        Duration::from_millis(250),
        || {
            let actions = collector.cli(&["rebuilds"])?;
            let list = actions["rebuilds"].as_array().cloned().unwrap_or_default();
            match list.as_slice() {
                [a] if a["id"] == action_id.as_str() && a["state"] == "completed" => Ok(()),
                _ => Err(actions.to_string()),
            }
        },
    );
    assert!(
        trigger.next(&mut seen, Duration::from_secs(6)).is_none(),
        "a second rebuild request"
    );
    // Its history names the successor.
    let show = collector.cli_text(&["host", "show", "web-1"]).unwrap();
    assert!(
        show.contains("successor web-3 enrolled"),
        "the successor is named: {show}"
    );

    // The audit log tells web-1's story (every record's target is the host id), and its
    // chain verifies.
    let audit = collector.cli(&["audit", "list"]).unwrap();
    let steps: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["target"] == "web-1")
        .filter_map(|r| r["action"].as_str())
        .collect();
    for want in [
        "host.enrolled",
        "host.flagged",
        "rebuild.triggered",
        "rebuild.succeeded",
        "host.replaced",
        "rebuild.completed",
    ] {
        assert!(steps.contains(&want), "{want} missing from {steps:?}");
    }
    let verify = collector.cli_text(&["audit", "verify"]).unwrap();
    assert!(verify.starts_with("audit log intact"), "{verify}");
    if let Trigger::Webhook(r) = &trigger {
        assert!(r.rejected().is_empty(), "{:?}", r.rejected());
    }
    eprintln!("{:?}: done", started.elapsed());
}

#[test]
fn phoenix_loop_with_a_signed_https_webhook() {
    phoenix("webhook");
}

#[test]
fn phoenix_loop_with_a_command_action() {
    phoenix("command");
}
