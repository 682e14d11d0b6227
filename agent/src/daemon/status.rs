//! `status.json` in the state directory: what the agent last saw, for people and for
//! `driftwatch-agent status`. Replaced atomically after each scan and on connection changes.
//!
//! Schema `driftwatch.agent-status.v1`; times are RFC 3339 (UTC). The daemon writes [`Status`];
//! `status` reads it back as a [`StatusView`] (owned, tolerant of fields added later) and
//! renders it with [`StatusView::render_text`] and [`StatusView::outcome`] (pure).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "driftwatch.agent-status.v1";
pub const FILE_NAME: &str = "status.json";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LastScan {
    pub started: String,
    pub finished: String,
    /// "complete" or "failed".
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub violations: usize,
    pub package_drift: usize,
    pub full_rehash: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Collector {
    pub url: String,
    /// "connecting", "connected", "unreachable" or "stopped".
    pub state: &'static str,
    pub since: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct SpoolStatus {
    pub pending_records: u64,
    pub pending_bytes: u64,
    pub last_seq: u64,
    pub epoch: String,
}

/// What the agent knows about the baseline it checks against.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, Default)]
pub struct BaselineStatus {
    pub image_id: String,
    pub image_version: String,
    pub merkle_root: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Status {
    pub schema: &'static str,
    pub host_id: String,
    pub agent_version: &'static str,
    pub updated: String,
    pub certificate_not_after: String,
    pub baseline: BaselineStatus,
    pub last_scan: Option<LastScan>,
    pub collector: Collector,
    pub spool: SpoolStatus,
}

impl Status {
    pub fn new(host_id: &str, collector_url: &str, not_after: i64) -> Status {
        let now = crate::time::format_unix(crate::time::now_unix());
        Status {
            schema: SCHEMA,
            host_id: host_id.to_string(),
            agent_version: env!("CARGO_PKG_VERSION"),
            updated: now.clone(),
            certificate_not_after: crate::time::format_unix(not_after),
            baseline: BaselineStatus::default(),
            last_scan: None,
            collector: Collector {
                url: collector_url.to_string(),
                state: "connecting",
                since: now,
                last_error: None,
            },
            spool: SpoolStatus::default(),
        }
    }

    /// Records a connection state change (a no-op if nothing changed).
    pub fn set_collector(&mut self, state: &'static str, error: Option<String>) -> bool {
        if self.collector.state == state && self.collector.last_error == error {
            return false;
        }
        if self.collector.state != state {
            self.collector.since = crate::time::format_unix(crate::time::now_unix());
        }
        self.collector.state = state;
        self.collector.last_error = error;
        true
    }

    /// Writes `status.json` atomically.
    pub fn write(&mut self, state_dir: &Path) -> std::io::Result<()> {
        self.updated = crate::time::format_unix(crate::time::now_unix());
        let mut text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        text.push(b'\n');
        crate::fsutil::write_atomic(&state_dir.join(FILE_NAME), &text, 0o644)
    }
}

/// `status.json` as read back. Unknown fields are ignored, so an older `status` still reads a
/// newer agent's file of the same schema.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct StatusView {
    pub schema: String,
    pub host_id: String,
    pub agent_version: String,
    pub updated: String,
    pub certificate_not_after: String,
    #[serde(default)]
    pub baseline: BaselineView,
    pub last_scan: Option<LastScanView>,
    pub collector: CollectorView,
    #[serde(default)]
    pub spool: SpoolView,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct BaselineView {
    pub image_id: String,
    pub image_version: String,
    pub merkle_root: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct LastScanView {
    pub started: String,
    pub finished: String,
    pub result: String,
    pub error: Option<String>,
    pub violations: usize,
    pub package_drift: usize,
    pub full_rehash: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct CollectorView {
    pub url: String,
    pub state: String,
    pub since: String,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct SpoolView {
    pub pending_records: u64,
    pub pending_bytes: u64,
    pub last_seq: u64,
    pub epoch: String,
}

/// What `driftwatch-agent status` concludes (its exit status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 0: the last scan was complete and found no drift.
    Clean,
    /// 1: the last scan found drift, failed, or no scan has finished yet.
    Attention,
}

/// Why `status.json` could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Exit 3: nothing to show.
    #[error(
        "no {FILE_NAME} in {dir}: the agent has never run with this state directory (start it with `systemctl start driftwatch-agent` or `driftwatch-agent run`)"
    )]
    NeverRan { dir: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an agent status file ({reason})")]
    Invalid { path: PathBuf, reason: String },
}

/// Reads `status.json` of `state_dir`: the parsed view and the file's JSON value as written.
pub fn read(state_dir: &Path) -> Result<(StatusView, serde_json::Value), ReadError> {
    let path = state_dir.join(FILE_NAME);
    let bytes = std::fs::read(&path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            ReadError::NeverRan {
                dir: state_dir.to_path_buf(),
            }
        } else {
            ReadError::Read {
                path: path.clone(),
                source,
            }
        }
    })?;
    let invalid = |reason: String| ReadError::Invalid {
        path: path.clone(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if value.get("schema").and_then(|s| s.as_str()) != Some(SCHEMA) {
        return Err(invalid(format!("schema is not {SCHEMA}")));
    }
    let view = serde_json::from_value(value.clone()).map_err(|e| invalid(e.to_string()))?;
    Ok((view, value))
}

impl StatusView {
    pub fn outcome(&self) -> Outcome {
        match &self.last_scan {
            Some(s) if s.result == "complete" && s.violations == 0 && s.package_drift == 0 => {
                Outcome::Clean
            }
            _ => Outcome::Attention,
        }
    }

    /// The human rendering; `now_unix` decides whether the certificate has expired. Every
    /// string from the file is display-escaped.
    pub fn render_text(&self, now_unix: i64) -> String {
        use crate::escape::bytes as esc;
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<13}{v}\n"));
        line("host:", esc(self.host_id.as_bytes()));
        line(
            "agent:",
            format!(
                "driftwatch-agent {}, status written {}",
                esc(self.agent_version.as_bytes()),
                esc(self.updated.as_bytes())
            ),
        );
        line(
            "baseline:",
            if self.baseline.image_id.is_empty() {
                "(not read yet)".to_string()
            } else {
                format!(
                    "image {} {}, Merkle root {}",
                    esc(self.baseline.image_id.as_bytes()),
                    esc(self.baseline.image_version.as_bytes()),
                    esc(self.baseline.merkle_root.as_bytes())
                )
            },
        );
        line(
            "last scan:",
            match &self.last_scan {
                None => "none finished yet".to_string(),
                Some(s) => {
                    let mut t = format!(
                        "{} at {} (started {}{})",
                        esc(s.result.as_bytes()),
                        esc(s.finished.as_bytes()),
                        esc(s.started.as_bytes()),
                        if s.full_rehash { ", full re-hash" } else { "" }
                    );
                    if let Some(e) = &s.error {
                        t.push_str(&format!(": {}", esc(e.as_bytes())));
                    } else {
                        t.push_str(&format!(
                            "; {} violations, {} package changes",
                            s.violations, s.package_drift
                        ));
                    }
                    t
                }
            },
        );
        let mut c = format!(
            "{} {} since {}",
            esc(self.collector.url.as_bytes()),
            esc(self.collector.state.as_bytes()),
            esc(self.collector.since.as_bytes())
        );
        if let Some(e) = &self.collector.last_error {
            c.push_str(&format!(" ({})", esc(e.as_bytes())));
        }
        line("collector:", c);
        line(
            "spool:",
            format!(
                "{} reports ({} bytes) waiting for the collector, last seq {}",
                self.spool.pending_records, self.spool.pending_bytes, self.spool.last_seq
            ),
        );
        let expired = humantime::parse_rfc3339(&self.certificate_not_after)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .is_some_and(|d| d.as_secs() as i64 <= now_unix);
        line(
            "certificate:",
            format!(
                "valid until {}{}",
                esc(self.certificate_not_after.as_bytes()),
                if expired {
                    " — EXPIRED: enroll this host again"
                } else {
                    ""
                }
            ),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_as_json() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Status::new("web-01", "https://c:7443", 0);
        assert!(s.set_collector("unreachable", Some("refused".into())));
        assert!(!s.set_collector("unreachable", Some("refused".into())));
        s.write(t.path()).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(t.path().join(FILE_NAME)).unwrap()).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["collector"]["state"], "unreachable");
        assert_eq!(v["collector"]["last_error"], "refused");
        assert_eq!(v["last_scan"], serde_json::Value::Null);
    }

    fn scanned(violations: usize, result: &'static str) -> Status {
        let mut s = Status::new("web-01", "https://c:7443", 4_102_444_800);
        s.last_scan = Some(LastScan {
            started: "2026-11-26T10:00:00Z".into(),
            finished: "2026-11-26T10:00:05Z".into(),
            result,
            error: (result == "failed").then(|| "baseline expired".to_string()),
            violations,
            package_drift: 0,
            full_rehash: false,
        });
        s
    }

    fn round_trip(mut s: Status) -> StatusView {
        let t = tempfile::tempdir().unwrap();
        s.write(t.path()).unwrap();
        read(t.path()).unwrap().0
    }

    #[test]
    fn read_back_and_outcome() {
        let v = round_trip(scanned(0, "complete"));
        assert_eq!(v.outcome(), Outcome::Clean);
        assert_eq!(v.host_id, "web-01");
        let text = v.render_text(0);
        assert!(text.contains("complete at 2026-11-26T10:00:05Z"), "{text}");
        assert!(text.contains("0 violations"), "{text}");
        assert!(!text.contains("EXPIRED"), "{text}");
        assert_eq!(
            round_trip(scanned(3, "complete")).outcome(),
            Outcome::Attention
        );
        let failed = round_trip(scanned(0, "failed"));
        assert_eq!(failed.outcome(), Outcome::Attention);
        assert!(failed.render_text(0).contains("baseline expired"));
        let never = round_trip(Status::new("h", "https://c:7443", 0));
        assert_eq!(never.outcome(), Outcome::Attention);
        assert!(never.render_text(1).contains("EXPIRED"));
        assert!(never.render_text(1).contains("none finished yet"));
    }

    #[test]
    fn hostile_strings_are_escaped() {
        let mut s = scanned(0, "complete");
        s.set_collector("unreachable", Some("evil\u{1b}[2Jtext".into()));
        let text = round_trip(s).render_text(0);
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    #[test]
    fn missing_and_bad_files() {
        let t = tempfile::tempdir().unwrap();
        assert!(matches!(read(t.path()), Err(ReadError::NeverRan { .. })));
        assert!(matches!(
            read(&t.path().join("nope")),
            Err(ReadError::NeverRan { .. })
        ));
        std::fs::write(t.path().join(FILE_NAME), "{\"schema\": \"other\"}").unwrap();
        assert!(matches!(read(t.path()), Err(ReadError::Invalid { .. })));
        std::fs::write(t.path().join(FILE_NAME), "not json").unwrap();
        assert!(matches!(read(t.path()), Err(ReadError::Invalid { .. })));
    }
}
