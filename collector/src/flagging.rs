//! The flagging policy: which hosts are snowflakes to replace, and why.
//!
//! Configured in the collector's `[flagging]` section ([`RawFlagging`] → validated
//! [`FlaggingPolicy`]); evaluated purely: a host's facts ([`HostFacts`]: its open drift, each
//! item marked when an operator's acknowledgement or an image defect keeps it from counting,
//! its image and registered root, its agent version, when it was last heard from) and the time
//! in, the list of [`Reason`]s out — each a machine-readable code, a sentence for people, and
//! the evidence (paths, packages, roots, ages). An empty list means not flagged.
//!
//! What this module must never do: read storage or a clock (the reconciler and the `explain`
//! endpoint gather the facts), or decide what happens to a flagged host (`crate::lifecycle`,
//! the rebuild dispatcher).

use std::cmp::Ordering;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::registry::compare_versions;

/// Most paths or packages a reason lists as evidence (the count says how many there were).
pub const MAX_EVIDENCE: usize = 50;

/// The `[flagging]` section as written; unknown keys are refused by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlagging {
    /// `info`, `low`, `medium`, `high`, `critical`, or `off`. Default `critical`.
    pub severity_at_least: Option<String>,
    /// Flag on any package installed, removed or changed. Default false.
    pub package_drift: Option<bool>,
    /// Flag on an unexplained change (a file no package change explains) under these globs.
    pub unexplained_under: Option<Vec<String>>,
    /// Flag on drift open for longer than this (humantime). Default off.
    pub drift_older_than: Option<String>,
    /// Flag on a host not heard from for longer than this (humantime). Default off.
    pub silent_longer_than: Option<String>,
    /// Flag a host whose baseline root is not the registered one for its image, or whose
    /// image is not registered. Default false.
    pub registered_root: Option<bool>,
    /// Flag a host whose agent is older than this version. Default off.
    pub min_agent_version: Option<String>,
}

/// A policy value that is not valid: the key (under `flagging.`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct FlaggingError {
    pub key: &'static str,
    pub message: String,
}

fn bad(key: &'static str, message: impl Into<String>) -> FlaggingError {
    FlaggingError {
        key,
        message: message.into(),
    }
}

/// Severity levels in order, as the policy and the API name them (`driftwatch.v1.Severity`
/// numbers: info 1 … critical 5).
pub const SEVERITIES: [&str; 5] = ["info", "low", "medium", "high", "critical"];

/// The severity number of a name (`info` = 1 … `critical` = 5).
pub fn severity_number(name: &str) -> Option<i32> {
    SEVERITIES
        .iter()
        .position(|s| *s == name)
        .map(|i| i as i32 + 1)
}

fn severity_name(n: i32) -> &'static str {
    usize::try_from(n - 1)
        .ok()
        .and_then(|i| SEVERITIES.get(i))
        .copied()
        .unwrap_or("unspecified")
}

/// Compiled path globs (globset over raw bytes, `*` within a directory, `**` across), compared
/// by their patterns.
#[derive(Debug, Clone)]
pub struct PathGlobs {
    patterns: Vec<String>,
    set: GlobSet,
}

impl PartialEq for PathGlobs {
    fn eq(&self, other: &Self) -> bool {
        self.patterns == other.patterns
    }
}
impl Eq for PathGlobs {}

impl PathGlobs {
    pub fn new(patterns: Vec<String>) -> Result<PathGlobs, String> {
        let mut b = GlobSetBuilder::new();
        for p in &patterns {
            if !p.starts_with('/') {
                return Err(format!("{p:?} must be an absolute path glob"));
            }
            b.add(
                GlobBuilder::new(p)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| format!("{p:?}: {e}"))?,
            );
        }
        let set = b.build().map_err(|e| e.to_string())?;
        Ok(PathGlobs { patterns, set })
    }

    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn is_match(&self, path: &[u8]) -> bool {
        self.set.is_match(Path::new(OsStr::from_bytes(path)))
    }
}

/// The validated policy. Every rule is off unless configured, except the severity rule
/// (default: critical).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlaggingPolicy {
    /// Flag on a counted item of at least this severity (1 info … 5 critical); `None` = off.
    pub severity_at_least: Option<i32>,
    pub package_drift: bool,
    pub unexplained_under: PathGlobs,
    pub drift_older_than: Option<Duration>,
    pub silent_longer_than: Option<Duration>,
    pub registered_root: bool,
    pub min_agent_version: Option<String>,
}

impl Default for FlaggingPolicy {
    fn default() -> Self {
        FlaggingPolicy {
            severity_at_least: Some(5),
            package_drift: false,
            unexplained_under: PathGlobs {
                patterns: Vec::new(),
                set: GlobSet::empty(),
            },
            drift_older_than: None,
            silent_longer_than: None,
            registered_root: false,
            min_agent_version: None,
        }
    }
}

impl FlaggingPolicy {
    /// Validates the section; the error names the key.
    pub fn from_raw(raw: RawFlagging) -> Result<FlaggingPolicy, FlaggingError> {
        let mut p = FlaggingPolicy::default();
        if let Some(s) = raw.severity_at_least {
            p.severity_at_least = match s.as_str() {
                "off" => None,
                name => Some(severity_number(name).ok_or_else(|| {
                    bad(
                        "flagging.severity_at_least",
                        format!("{s:?}: expected one of info, low, medium, high, critical, off"),
                    )
                })?),
            };
        }
        p.package_drift = raw.package_drift.unwrap_or(false);
        if let Some(globs) = raw.unexplained_under {
            p.unexplained_under =
                PathGlobs::new(globs).map_err(|m| bad("flagging.unexplained_under", m))?;
        }
        p.drift_older_than = raw
            .drift_older_than
            .map(|s| duration("flagging.drift_older_than", &s))
            .transpose()?;
        p.silent_longer_than = raw
            .silent_longer_than
            .map(|s| duration("flagging.silent_longer_than", &s))
            .transpose()?;
        p.registered_root = raw.registered_root.unwrap_or(false);
        if let Some(v) = raw.min_agent_version {
            let ok = !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'_'));
            if !ok {
                return Err(bad(
                    "flagging.min_agent_version",
                    format!("{v:?} is not a version (e.g. \"0.2.0\")"),
                ));
            }
            p.min_agent_version = Some(v);
        }
        Ok(p)
    }
}

fn duration(key: &'static str, s: &str) -> Result<Duration, FlaggingError> {
    let d = humantime::parse_duration(s).map_err(|e| bad(key, format!("{s:?}: {e}")))?;
    if d.is_zero() {
        return Err(bad(key, "must be longer than 0s"));
    }
    Ok(d)
}

/// Why an open item does not count toward flagging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exclusion {
    /// An operator acknowledged it, until `until_ms`.
    Acknowledged {
        by: String,
        reason: String,
        until_ms: i64,
    },
    /// The same path drifted on most hosts of the image: an image defect, not a snowflake.
    ImageDefect,
}

/// One open drift item of a host, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenItem {
    /// File items: the raw path.
    pub path: Option<Vec<u8>>,
    /// Package items: the drifted package (`name` or `name:arch`).
    pub package: Option<String>,
    /// `added`, `modified`, … or `package_installed`, … (the API's kind names).
    pub kind: &'static str,
    /// `driftwatch.v1.Severity` number.
    pub severity: i32,
    /// A file change no package change explains.
    pub unexplained: bool,
    pub first_seen_ms: i64,
    pub excluded: Option<Exclusion>,
}

/// What the policy looks at for one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFacts {
    /// Empty before the agent's first `Hello`.
    pub agent_version: String,
    pub image_id: String,
    /// The Merkle root of the baseline the agent checks against; empty before its `Hello`.
    pub baseline_root: Vec<u8>,
    /// The registered root for `image_id` (newest registered version); `None` = not
    /// registered.
    pub registered_root: Option<Vec<u8>>,
    /// Newest of heartbeat, `Hello` and report; its enrollment when never heard from.
    pub last_heard_ms: i64,
    /// Shared with the reconciler's memo of earlier rounds.
    pub open: std::sync::Arc<Vec<OpenItem>>,
}

/// Machine-readable reason codes (stable; documented in `docs/api.md`).
pub mod code {
    pub const SEVERITY: &str = "severity";
    pub const PACKAGE_DRIFT: &str = "package_drift";
    pub const UNEXPLAINED_CHANGE: &str = "unexplained_change";
    pub const PERSISTENT_DRIFT: &str = "persistent_drift";
    pub const SILENT: &str = "silent";
    pub const BASELINE_ROOT_MISMATCH: &str = "baseline_root_mismatch";
    pub const IMAGE_UNREGISTERED: &str = "image_unregistered";
    pub const AGENT_OUTDATED: &str = "agent_outdated";
}

/// What a reason rests on. Lists hold at most [`MAX_EVIDENCE`] entries; `items` counts them all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Evidence {
    pub paths: Vec<Vec<u8>>,
    pub packages: Vec<String>,
    /// How many items the reason covers (paths and packages together).
    pub items: u64,
    /// Age that made the rule fire (oldest drift, silence), ms.
    pub age_ms: Option<i64>,
    /// What the host has (root hex, agent version, image id) and what the policy wants.
    pub observed: Option<String>,
    pub expected: Option<String>,
}

impl Evidence {
    fn add(&mut self, item: &OpenItem) {
        self.items += 1;
        if self.paths.len() + self.packages.len() >= MAX_EVIDENCE {
            return;
        }
        match (&item.path, &item.package) {
            (Some(p), _) => self.paths.push(p.clone()),
            (None, Some(p)) => self.packages.push(p.clone()),
            (None, None) => {}
        }
    }
}

/// One reason a host is flagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// One of [`code`].
    pub code: &'static str,
    /// A sentence for people (host-supplied strings are not in it; they are in `evidence`).
    pub text: String,
    pub evidence: Evidence,
}

/// Evaluates `policy` on `facts` at `now_ms`: every reason that applies, in a fixed order
/// (drift rules, then silence, image and agent). Excluded items never count.
pub fn evaluate(policy: &FlaggingPolicy, facts: &HostFacts, now_ms: i64) -> Vec<Reason> {
    let counted: Vec<&OpenItem> = facts.open.iter().filter(|i| i.excluded.is_none()).collect();
    let mut out = Vec::new();

    if let Some(min) = policy.severity_at_least {
        let mut ev = Evidence::default();
        for i in counted.iter().filter(|i| i.severity >= min) {
            ev.add(i);
        }
        if ev.items > 0 {
            out.push(Reason {
                code: code::SEVERITY,
                text: format!(
                    "{} open item(s) of severity {} or above",
                    ev.items,
                    severity_name(min)
                ),
                evidence: ev,
            });
        }
    }
    if policy.package_drift {
        let mut ev = Evidence::default();
        for i in counted
            .iter()
            .filter(|i| i.package.is_some() && i.path.is_none())
        {
            ev.add(i);
        }
        if ev.items > 0 {
            out.push(Reason {
                code: code::PACKAGE_DRIFT,
                text: format!(
                    "{} package(s) installed, removed or changed outside the image",
                    ev.items
                ),
                evidence: ev,
            });
        }
    }
    if !policy.unexplained_under.is_empty() {
        let mut ev = Evidence::default();
        for i in counted.iter().filter(|i| {
            i.unexplained
                && i.path
                    .as_deref()
                    .is_some_and(|p| policy.unexplained_under.is_match(p))
        }) {
            ev.add(i);
        }
        if ev.items > 0 {
            out.push(Reason {
                code: code::UNEXPLAINED_CHANGE,
                text: format!(
                    "{} unexplained change(s) under {}",
                    ev.items,
                    policy.unexplained_under.patterns().join(", ")
                ),
                evidence: ev,
            });
        }
    }
    if let Some(limit) = policy.drift_older_than {
        let limit_ms = ms(limit);
        let mut ev = Evidence::default();
        let mut oldest: Option<i64> = None;
        for i in counted
            .iter()
            .filter(|i| now_ms.saturating_sub(i.first_seen_ms) > limit_ms)
        {
            ev.add(i);
            oldest = Some(oldest.map_or(i.first_seen_ms, |o: i64| o.min(i.first_seen_ms)));
        }
        if let Some(oldest) = oldest {
            ev.age_ms = Some(now_ms.saturating_sub(oldest));
            out.push(Reason {
                code: code::PERSISTENT_DRIFT,
                text: format!(
                    "{} item(s) open for longer than {}",
                    ev.items,
                    humantime::format_duration(limit)
                ),
                evidence: ev,
            });
        }
    }
    if let Some(limit) = policy.silent_longer_than {
        let age = now_ms.saturating_sub(facts.last_heard_ms);
        if age > ms(limit) {
            out.push(Reason {
                code: code::SILENT,
                text: format!(
                    "not heard from for longer than {}",
                    humantime::format_duration(limit)
                ),
                evidence: Evidence {
                    age_ms: Some(age),
                    ..Evidence::default()
                },
            });
        }
    }
    // Only once the agent said which baseline it checks against.
    if policy.registered_root && !facts.baseline_root.is_empty() {
        match &facts.registered_root {
            None => out.push(Reason {
                code: code::IMAGE_UNREGISTERED,
                text: "its image id has no registered baseline".into(),
                evidence: Evidence {
                    observed: Some(facts.image_id.clone()),
                    ..Evidence::default()
                },
            }),
            Some(root) if *root != facts.baseline_root => out.push(Reason {
                code: code::BASELINE_ROOT_MISMATCH,
                text: "its baseline root is not the one registered for its image".into(),
                evidence: Evidence {
                    observed: Some(crate::api::hex(&facts.baseline_root)),
                    expected: Some(crate::api::hex(root)),
                    ..Evidence::default()
                },
            }),
            Some(_) => {}
        }
    }
    if let Some(min) = &policy.min_agent_version
        && !facts.agent_version.is_empty()
        && compare_versions(&facts.agent_version, min) == Ordering::Less
    {
        out.push(Reason {
            code: code::AGENT_OUTDATED,
            text: format!("its agent is older than {min}"),
            evidence: Evidence {
                observed: Some(facts.agent_version.clone()),
                expected: Some(min.clone()),
                ..Evidence::default()
            },
        });
    }
    out
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;
    const H: i64 = 3_600_000;

    fn policy(toml_text: &str) -> Result<FlaggingPolicy, FlaggingError> {
        let raw: RawFlagging = toml::from_str(toml_text).unwrap();
        FlaggingPolicy::from_raw(raw)
    }

    fn file(path: &str, severity: i32, unexplained: bool, age_ms: i64) -> OpenItem {
        OpenItem {
            path: Some(path.as_bytes().to_vec()),
            package: None,
            kind: "modified",
            severity,
            unexplained,
            first_seen_ms: NOW - age_ms,
            excluded: None,
        }
    }

    fn package(name: &str) -> OpenItem {
        OpenItem {
            path: None,
            package: Some(name.into()),
            kind: "package_installed",
            severity: 3,
            unexplained: false,
            first_seen_ms: NOW,
            excluded: None,
        }
    }

    fn facts(open: Vec<OpenItem>) -> HostFacts {
        HostFacts {
            agent_version: "0.2.0".into(),
            image_id: "web".into(),
            baseline_root: vec![1; 32],
            registered_root: Some(vec![1; 32]),
            last_heard_ms: NOW,
            open: open.into(),
        }
    }

    fn codes(r: &[Reason]) -> Vec<&'static str> {
        r.iter().map(|r| r.code).collect()
    }

    #[test]
    fn defaults_flag_only_critical() {
        let p = FlaggingPolicy::from_raw(RawFlagging::default()).unwrap();
        assert_eq!(p, FlaggingPolicy::default());
        assert!(evaluate(&p, &facts(vec![file("/etc/motd", 4, true, 0)]), NOW).is_empty());
        let r = evaluate(&p, &facts(vec![file("/etc/shadow", 5, true, 0)]), NOW);
        assert_eq!(codes(&r), ["severity"]);
        assert_eq!(r[0].evidence.paths, [b"/etc/shadow".to_vec()]);
        assert!(r[0].text.contains("critical"), "{}", r[0].text);
    }

    #[test]
    fn every_rule_fires_with_its_evidence() {
        let p = policy(
            r#"
            severity_at_least = "high"
            package_drift = true
            unexplained_under = ["/etc/ssh/**", "/usr/bin/*"]
            drift_older_than = "2h"
            silent_longer_than = "10m"
            registered_root = true
            min_agent_version = "0.10.0"
            "#,
        )
        .unwrap();
        let mut f = facts(vec![
            file("/etc/ssh/sshd_config", 3, true, 3 * H),
            file("/usr/bin/env", 5, false, 0),
            file("/var/www/index.html", 2, true, 0),
            package("curl:amd64"),
        ]);
        f.last_heard_ms = NOW - 11 * 60_000;
        f.baseline_root = vec![2; 32];
        f.agent_version = "0.9.7".into();
        let r = evaluate(&p, &f, NOW);
        assert_eq!(
            codes(&r),
            [
                "severity",
                "package_drift",
                "unexplained_change",
                "persistent_drift",
                "silent",
                "baseline_root_mismatch",
                "agent_outdated"
            ]
        );
        assert_eq!(r[0].evidence.paths, [b"/usr/bin/env".to_vec()]);
        assert_eq!(r[1].evidence.packages, ["curl:amd64"]);
        assert_eq!(r[2].evidence.paths, [b"/etc/ssh/sshd_config".to_vec()]);
        assert_eq!(r[3].evidence.age_ms, Some(3 * H));
        assert_eq!(r[3].evidence.items, 1);
        assert_eq!(r[4].evidence.age_ms, Some(11 * 60_000));
        assert_eq!(
            r[5].evidence.observed.as_deref(),
            Some(&"02".repeat(32)[..])
        );
        assert_eq!(
            r[5].evidence.expected.as_deref(),
            Some(&"01".repeat(32)[..])
        );
        assert_eq!(r[6].evidence.observed.as_deref(), Some("0.9.7"));

        f.registered_root = None;
        let r = evaluate(&p, &f, NOW);
        assert!(codes(&r).contains(&"image_unregistered"), "{r:?}");
        assert_eq!(
            r.iter()
                .find(|r| r.code == "image_unregistered")
                .unwrap()
                .evidence
                .observed,
            Some("web".into())
        );
    }

    #[test]
    fn nothing_fires_on_a_host_within_the_policy() {
        let p = policy(
            r#"
            severity_at_least = "high"
            package_drift = true
            unexplained_under = ["/etc/ssh/**"]
            drift_older_than = "2h"
            silent_longer_than = "10m"
            registered_root = true
            min_agent_version = "0.2.0"
            "#,
        )
        .unwrap();
        let f = facts(vec![
            // Explained, below the level, young, not under the globs.
            file("/etc/ssh/moduli", 3, false, H),
            file("/etc/motd", 2, true, H),
        ]);
        assert_eq!(evaluate(&p, &f, NOW), []);
        // Silence exactly at the limit is not longer than it.
        let mut f = facts(vec![]);
        f.last_heard_ms = NOW - 10 * 60_000;
        assert_eq!(evaluate(&p, &f, NOW), []);
        // No Hello yet: nothing to compare roots or versions with.
        let mut f = facts(vec![]);
        f.baseline_root.clear();
        f.registered_root = None;
        f.agent_version.clear();
        assert_eq!(evaluate(&p, &f, NOW), []);
    }

    #[test]
    fn excluded_items_do_not_count() {
        let p = policy("severity_at_least = \"low\"\npackage_drift = true").unwrap();
        let mut acked = file("/etc/motd", 5, true, 0);
        acked.excluded = Some(Exclusion::Acknowledged {
            by: "token:t1".into(),
            reason: "planned".into(),
            until_ms: NOW + H,
        });
        let mut defect = file("/etc/issue", 5, true, 0);
        defect.excluded = Some(Exclusion::ImageDefect);
        let mut pkg = package("vim");
        pkg.excluded = Some(Exclusion::ImageDefect);
        assert_eq!(evaluate(&p, &facts(vec![acked, defect, pkg]), NOW), []);
    }

    #[test]
    fn evidence_is_capped_but_counted() {
        let p = FlaggingPolicy::default();
        let open = (0..200)
            .map(|i| file(&format!("/bin/x{i}"), 5, true, 0))
            .collect();
        let r = evaluate(&p, &facts(open), NOW);
        assert_eq!(r[0].evidence.items, 200);
        assert_eq!(r[0].evidence.paths.len(), MAX_EVIDENCE);
        assert!(r[0].text.starts_with("200 "), "{}", r[0].text);
    }

    #[test]
    fn globs_match_raw_bytes() {
        let g = PathGlobs::new(vec!["/etc/**".into()]).unwrap();
        assert!(g.is_match(b"/etc/a\xff/b"));
        assert!(!g.is_match(b"/usr/etc/a"));
        let one = PathGlobs::new(vec!["/usr/bin/*".into()]).unwrap();
        assert!(one.is_match(b"/usr/bin/env"));
        assert!(!one.is_match(b"/usr/bin/sub/env"));
    }

    #[test]
    fn bad_values_name_their_key() {
        for (text, key) in [
            (
                "severity_at_least = \"severe\"",
                "flagging.severity_at_least",
            ),
            (
                "unexplained_under = [\"etc/**\"]",
                "flagging.unexplained_under",
            ),
            (
                "unexplained_under = [\"/etc/[\"]",
                "flagging.unexplained_under",
            ),
            ("drift_older_than = \"soon\"", "flagging.drift_older_than"),
            ("drift_older_than = \"0s\"", "flagging.drift_older_than"),
            (
                "silent_longer_than = \"-1m\"",
                "flagging.silent_longer_than",
            ),
            ("min_agent_version = \"\"", "flagging.min_agent_version"),
            ("min_agent_version = \"1 0\"", "flagging.min_agent_version"),
        ] {
            let e = policy(text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
        }
        assert!(toml::from_str::<RawFlagging>("severity = \"high\"").is_err());
        assert_eq!(
            policy("severity_at_least = \"off\"")
                .unwrap()
                .severity_at_least,
            None
        );
    }
}
