//! The state a host is shown in: one word that says what an operator should do about it.
//!
//! Pure: a [`HostSummary`] from storage, the current time and the silence threshold in, a
//! [`HostState`] out. The HTTP API, the CLI filter and (later) the dashboard and metrics all
//! use this one derivation, so they can never disagree about a host.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use driftwatch_proto::v1::ScanStatus;

use crate::storage::HostSummary;

/// The heartbeat interval the collector asks agents for (contract: default 30 s).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);

/// Silence longer than this makes a host `silent` by default: three missed heartbeats, the
/// same rule that makes the ingest end a stream.
pub const DEFAULT_SILENT_AFTER: Duration = Duration::from_secs(3 * 30);

/// A host's derived state.
///
/// When several apply, the first in this order wins: `revoked` (the host is no longer
/// trusted at all), `never-reported` (there is no data to judge), `silent` (the data is stale
/// and silence is itself an alarm), `drifted` (known drift: replace it), `incomplete` (no known
/// drift, but the host's set may be missing some), `clean`. The `incomplete` flag and the drift
/// counts are shown next to the state, so nothing is hidden by the precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostState {
    Clean,
    Drifted,
    Incomplete,
    Silent,
    Revoked,
    NeverReported,
}

impl HostState {
    /// Every state, in the order of [`HostState::name`]'s documentation.
    pub const ALL: [HostState; 6] = [
        HostState::Clean,
        HostState::Drifted,
        HostState::Incomplete,
        HostState::Silent,
        HostState::Revoked,
        HostState::NeverReported,
    ];

    /// The name used in JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HostState::Clean => "clean",
            HostState::Drifted => "drifted",
            HostState::Incomplete => "incomplete",
            HostState::Silent => "silent",
            HostState::Revoked => "revoked",
            HostState::NeverReported => "never-reported",
        }
    }
}

impl fmt::Display for HostState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown state name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown host state {0:?} (expected one of: clean, drifted, incomplete, silent, revoked, never-reported)"
)]
pub struct UnknownHostState(pub String);

impl FromStr for HostState {
    type Err = UnknownHostState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HostState::ALL
            .into_iter()
            .find(|st| st.name() == s)
            .ok_or_else(|| UnknownHostState(s.to_string()))
    }
}

/// Derives the state of `host` at `now_ms` (Unix milliseconds); a host not heard from for
/// longer than `silent_after` is silent.
///
/// Incomplete is the stored flag (the last report said so) or the last scan's status (a
/// heartbeat said the newest scan failed part-way, before any report about it arrived).
///
/// "Heard from" is the newest of its last heartbeat and its last report: a report is a sign
/// of life too, and a backend that only updates one of them must not make a live host silent.
pub fn derive(host: &HostSummary, now_ms: i64, silent_after: Duration) -> HostState {
    if host.revoked {
        return HostState::Revoked;
    }
    let Some(last_report_ms) = host.last_report_ms else {
        return HostState::NeverReported;
    };
    let last_heard_ms = host
        .last_seen_ms
        .unwrap_or(last_report_ms)
        .max(last_report_ms);
    let silent_after_ms = i64::try_from(silent_after.as_millis()).unwrap_or(i64::MAX);
    if now_ms.saturating_sub(last_heard_ms) > silent_after_ms {
        return HostState::Silent;
    }
    if host.open_by_severity.iter().any(|&n| n > 0) || host.open_packages > 0 {
        return HostState::Drifted;
    }
    if host.incomplete || host.last_scan_status == ScanStatus::Incomplete {
        return HostState::Incomplete;
    }
    HostState::Clean
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{HelloInfo, StreamPosition};

    const NOW: i64 = 1_800_000_000_000;
    const SILENT: Duration = DEFAULT_SILENT_AFTER;

    fn host() -> HostSummary {
        HostSummary {
            host_id: "web-1".into(),
            labels: vec![],
            enrolled_ms: NOW - 3_600_000,
            hello: HelloInfo::default(),
            last_seen_ms: Some(NOW - 10_000),
            last_scan_ms: Some(NOW - 60_000),
            last_scan_status: ScanStatus::Complete,
            last_report_ms: Some(NOW - 60_000),
            incomplete: false,
            incomplete_reason: String::new(),
            lost_reports: 0,
            position: StreamPosition {
                epoch: 1,
                last_seq: 3,
                set_digest: [0; 32],
            },
            open_by_severity: [0; 6],
            open_packages: 0,
            revoked: false,
        }
    }

    #[test]
    fn a_reporting_host_without_drift_is_clean() {
        assert_eq!(derive(&host(), NOW, SILENT), HostState::Clean);
    }

    #[test]
    fn any_open_item_is_drift() {
        for sev in 0..6 {
            let mut h = host();
            h.open_by_severity[sev] = 1;
            assert_eq!(
                derive(&h, NOW, SILENT),
                HostState::Drifted,
                "severity {sev}"
            );
        }
        let mut h = host();
        h.open_packages = 1;
        assert_eq!(derive(&h, NOW, SILENT), HostState::Drifted);
    }

    #[test]
    fn incomplete_without_known_drift() {
        let mut h = host();
        h.incomplete = true;
        assert_eq!(derive(&h, NOW, SILENT), HostState::Incomplete);
        h.open_by_severity[5] = 2;
        assert_eq!(derive(&h, NOW, SILENT), HostState::Drifted);
        let mut h = host();
        h.last_scan_status = ScanStatus::Incomplete;
        assert_eq!(derive(&h, NOW, SILENT), HostState::Incomplete);
    }

    #[test]
    fn silence_is_strictly_longer_than_the_threshold() {
        let mut h = host();
        h.last_seen_ms = Some(NOW - 90_000);
        h.last_report_ms = Some(NOW - 100_000);
        assert_eq!(derive(&h, NOW, SILENT), HostState::Clean);
        h.last_seen_ms = Some(NOW - 90_001);
        assert_eq!(derive(&h, NOW, SILENT), HostState::Silent);
        // Silence outranks drift: the drift picture is stale.
        h.open_by_severity[4] = 1;
        assert_eq!(derive(&h, NOW, SILENT), HostState::Silent);
        // A shorter threshold given to the router.
        let h = host();
        assert_eq!(derive(&h, NOW, Duration::from_secs(5)), HostState::Silent);
    }

    #[test]
    fn a_recent_report_counts_as_a_sign_of_life() {
        let mut h = host();
        h.last_seen_ms = Some(NOW - 500_000);
        h.last_report_ms = Some(NOW - 1_000);
        assert_eq!(derive(&h, NOW, SILENT), HostState::Clean);
        h.last_seen_ms = None;
        assert_eq!(derive(&h, NOW, SILENT), HostState::Clean);
    }

    #[test]
    fn never_reported_even_with_heartbeats() {
        let mut h = host();
        h.last_report_ms = None;
        assert_eq!(derive(&h, NOW, SILENT), HostState::NeverReported);
        h.last_seen_ms = None;
        assert_eq!(derive(&h, NOW, SILENT), HostState::NeverReported);
    }

    #[test]
    fn revoked_outranks_everything() {
        let mut h = host();
        h.revoked = true;
        h.last_report_ms = None;
        assert_eq!(derive(&h, NOW, SILENT), HostState::Revoked);
    }

    #[test]
    fn clock_skew_never_panics() {
        let mut h = host();
        h.last_seen_ms = Some(i64::MAX);
        h.last_report_ms = Some(i64::MIN);
        assert_eq!(derive(&h, i64::MIN, Duration::MAX), HostState::Clean);
        assert_eq!(derive(&h, i64::MAX, Duration::ZERO), HostState::Clean);
    }

    #[test]
    fn names_round_trip() {
        for st in HostState::ALL {
            assert_eq!(st.name().parse::<HostState>(), Ok(st));
        }
        assert!("Drifted".parse::<HostState>().is_err());
    }
}
