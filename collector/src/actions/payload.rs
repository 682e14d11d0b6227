//! The body of a rebuild request, type `driftwatch.rebuild.requested` (documented field by field
//! in `docs/rebuild-actions.md`). The same bytes go to a webhook (signed) and to a command's
//! stdin, and the bytes are fixed when the action triggers, so every retry sends exactly what
//! the first attempt sent.
//!
//! Pure: values in, bytes out. Everything a host reported (paths, package names, the image id it
//! claimed) is passed through `driftwatch_proto::escape` before it enters the body, so a
//! receiver that logs or shells out with these strings cannot be steered by a hostile file
//! name; JSON escaping alone would keep the JSON valid but pass ESC and newlines through.

use std::collections::BTreeMap;

use driftwatch_proto::escape;
use driftwatch_proto::v1::{DriftItem, drift_item};
use serde::{Deserialize, Serialize};

use crate::api::{hex, rfc3339_ms};
use crate::http::convert::{file_kind_name, package_kind_name, severity_name};

/// The event type of every rebuild request.
pub const EVENT_TYPE: &str = "driftwatch.rebuild.requested";

/// At most this many paths are listed in `data.violations.paths`.
pub const MAX_PATHS: usize = 20;

/// The whole body (the Standard Webhooks shape: `type`, `timestamp`, `data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildRequest {
    #[serde(rename = "type")]
    pub event_type: String,
    /// When the action triggered (RFC 3339, UTC, ms). Not the attempt's time: the body is the
    /// same on every retry; the `webhook-timestamp` header carries the attempt's time.
    pub timestamp: String,
    pub data: RebuildData,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildData {
    /// The action's id, also the `webhook-id` header and `DRIFTWATCH_ACTION_ID`.
    pub action_id: String,
    /// `<host id>:<Unix ms of the host's flagged transition>`: one per flagging of a host;
    /// a receiver that has seen it already must not rebuild twice.
    pub idempotency_key: String,
    /// True when the collector runs in dry-run mode (nothing is sent then, so a receiver only
    /// sees this in documentation and tests).
    pub dry_run: bool,
    pub host: HostRef,
    pub image: ImageRef,
    /// The host's role label (`--label role=web` at enrollment); a replacement enrolled with
    /// the same role and image marks this host replaced.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Why the host was flagged, as the flagging policy said it.
    pub reasons: Vec<String>,
    pub violations: ViolationSummary,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRef {
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub id: String,
    pub version: String,
    /// Merkle root of the baseline the host runs (hex); empty when not known.
    pub root: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ViolationSummary {
    /// Open violations and package drift items.
    pub open: u64,
    /// Counts by kind name (`added`, `modified`, …, `package_installed`, …).
    pub by_kind: BTreeMap<String, u64>,
    /// Counts by severity name (`critical`, `high`, …).
    pub by_severity: BTreeMap<String, u64>,
    /// The first [`MAX_PATHS`] file paths (most severe first, then by path), display-escaped.
    pub paths: Vec<String>,
    /// True when more paths drifted than are listed (or the summary was cut short).
    pub paths_truncated: bool,
}

/// What the body is made of.
#[derive(Debug, Clone)]
pub struct PayloadInput<'a> {
    pub action_id: &'a str,
    pub idempotency_key: &'a str,
    pub dry_run: bool,
    pub triggered_ms: i64,
    pub host_id: &'a str,
    pub role: Option<&'a str>,
    pub image_id: &'a str,
    pub image_version: &'a str,
    pub baseline_root: &'a [u8],
    pub reasons: &'a [String],
    /// The host's open items.
    pub items: &'a [DriftItem],
    /// True when `items` is not all the host has (the read was limited).
    pub items_truncated: bool,
}

/// Builds the request value.
pub fn request(input: &PayloadInput<'_>) -> RebuildRequest {
    RebuildRequest {
        event_type: EVENT_TYPE.into(),
        timestamp: rfc3339_ms(input.triggered_ms),
        data: RebuildData {
            action_id: input.action_id.into(),
            idempotency_key: escape::text(input.idempotency_key),
            dry_run: input.dry_run,
            host: HostRef {
                id: escape::text(input.host_id),
            },
            image: ImageRef {
                id: escape::text(input.image_id),
                version: escape::text(input.image_version),
                root: hex(input.baseline_root),
            },
            role: input.role.map(escape::text),
            reasons: input.reasons.iter().map(|r| escape::text(r)).collect(),
            violations: summary(input.items, input.items_truncated),
        },
    }
}

/// The body's bytes (compact JSON).
pub fn body(input: &PayloadInput<'_>) -> Vec<u8> {
    // Serialising plain structs of strings and maps cannot fail; an empty object would be a
    // visible bug at the receiver rather than a panic in the collector.
    serde_json::to_vec(&request(input)).unwrap_or_else(|_| b"{}".to_vec())
}

fn summary(items: &[DriftItem], truncated: bool) -> ViolationSummary {
    let mut s = ViolationSummary {
        paths_truncated: truncated,
        ..Default::default()
    };
    // (severity descending, path) so the most severe paths are the ones listed.
    let mut paths: Vec<(i32, &[u8])> = Vec::new();
    for item in items {
        let (kind, sev) = match &item.item {
            Some(drift_item::Item::File(f)) => {
                paths.push((f.severity, &f.path));
                (file_kind_name(f.kind), f.severity)
            }
            Some(drift_item::Item::Package(p)) => (package_kind_name(p.kind), p.severity),
            None => continue,
        };
        s.open += 1;
        *s.by_kind.entry(kind.to_string()).or_default() += 1;
        *s.by_severity
            .entry(severity_name(sev).to_string())
            .or_default() += 1;
    }
    paths.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    if paths.len() > MAX_PATHS {
        s.paths_truncated = true;
    }
    s.paths = paths
        .iter()
        .take(MAX_PATHS)
        .map(|(_, p)| escape::bytes(p))
        .collect();
    s
}

#[cfg(test)]
mod tests {
    use driftwatch_proto::v1::{
        PackageDrift, PackageDriftKind, Severity, Violation, ViolationKind,
    };

    use super::*;

    fn file(path: &[u8], kind: ViolationKind, sev: Severity) -> DriftItem {
        DriftItem {
            key: [b"f\0".as_slice(), path].concat(),
            item: Some(drift_item::Item::File(Violation {
                path: path.to_vec(),
                kind: kind as i32,
                severity: sev as i32,
                ..Default::default()
            })),
        }
    }

    fn input<'a>(items: &'a [DriftItem], reasons: &'a [String]) -> PayloadInput<'a> {
        PayloadInput {
            action_id: "rb_0123",
            idempotency_key: "web-1:1764166800000",
            dry_run: false,
            triggered_ms: 1_764_166_801_234,
            host_id: "web-1",
            role: Some("web"),
            image_id: "web",
            image_version: "2026.11.1",
            baseline_root: &[0xab, 0xcd],
            reasons,
            items,
            items_truncated: false,
        }
    }

    #[test]
    fn body_has_every_documented_field() {
        let items = vec![
            file(
                b"/etc/ssh/sshd_config",
                ViolationKind::Modified,
                Severity::High,
            ),
            file(b"/usr/bin/nc", ViolationKind::Added, Severity::Critical),
            DriftItem {
                key: b"p\0netcat\0amd64".to_vec(),
                item: Some(drift_item::Item::Package(PackageDrift {
                    name: "netcat".into(),
                    arch: "amd64".into(),
                    kind: PackageDriftKind::Installed as i32,
                    severity: Severity::High as i32,
                    ..Default::default()
                })),
            },
        ];
        let reasons = vec!["severity high or above: 3 open".to_string()];
        let v: serde_json::Value = serde_json::from_slice(&body(&input(&items, &reasons))).unwrap();
        assert_eq!(v["type"], EVENT_TYPE);
        assert_eq!(v["timestamp"], "2025-11-26T14:20:01.234Z");
        let d = &v["data"];
        assert_eq!(d["action_id"], "rb_0123");
        assert_eq!(d["idempotency_key"], "web-1:1764166800000");
        assert_eq!(d["dry_run"], false);
        assert_eq!(d["host"]["id"], "web-1");
        assert_eq!(d["role"], "web");
        assert_eq!(d["image"]["id"], "web");
        assert_eq!(d["image"]["version"], "2026.11.1");
        assert_eq!(d["image"]["root"], "abcd");
        assert_eq!(d["reasons"][0], "severity high or above: 3 open");
        let s = &d["violations"];
        assert_eq!(s["open"], 3);
        assert_eq!(s["by_kind"]["modified"], 1);
        assert_eq!(s["by_kind"]["added"], 1);
        assert_eq!(s["by_kind"]["package_installed"], 1);
        assert_eq!(s["by_severity"]["high"], 2);
        assert_eq!(s["by_severity"]["critical"], 1);
        // Most severe first.
        assert_eq!(s["paths"][0], "/usr/bin/nc");
        assert_eq!(s["paths"][1], "/etc/ssh/sshd_config");
        assert_eq!(s["paths_truncated"], false);
        // The body parses back into the documented type.
        let back: RebuildRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back.data.violations.open, 3);
    }

    #[test]
    fn hostile_names_are_escaped_and_paths_bounded() {
        let mut items: Vec<DriftItem> = (0..30)
            .map(|i| {
                file(
                    format!("/tmp/f{i:02}").as_bytes(),
                    ViolationKind::Added,
                    Severity::Low,
                )
            })
            .collect();
        items.push(file(
            b"/etc/\x1b[31mred\n<b>|x=1\xff",
            ViolationKind::Modified,
            Severity::Critical,
        ));
        let reasons = vec!["path \x1b]0;pwned\x07".to_string()];
        let mut inp = input(&items, &reasons);
        inp.host_id = "web-1";
        let raw = body(&inp);
        let text = String::from_utf8(raw.clone()).unwrap();
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(
            !text.contains("\\u001b"),
            "ESC must be display-escaped: {text}"
        );
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        let s = &v["data"]["violations"];
        assert_eq!(s["paths"][0], "/etc/\\x1b[31mred\\n<b>|x=1\\xff");
        assert_eq!(s["paths"].as_array().unwrap().len(), MAX_PATHS);
        assert_eq!(s["paths_truncated"], true);
        assert_eq!(s["open"], 31);
        assert_eq!(v["data"]["reasons"][0], "path \\x1b]0;pwned\\x07");
    }
}
