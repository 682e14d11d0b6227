//! `status.json` in the state directory: what the agent last saw, for people and for a later
//! `driftwatch-agent status`. Replaced atomically after each scan and on connection changes.
//!
//! Schema `driftwatch.agent-status.v1`; times are RFC 3339 (UTC).

use std::path::Path;

use serde::Serialize;

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
}
