//! Storage values to API values (`crate::api`): names for enums, RFC 3339 for times, hex for
//! hashes, raw-bytes objects for paths. Pure.

use std::time::Duration;

use driftwatch_proto::v1::{
    DriftItem, PackageDriftKind, ScanStatus, Severity, ViolationClass, ViolationKind, drift_item,
};

use crate::api::{self, RawBytes, hex, rfc3339_ms};
use crate::host_state;
use crate::storage::{HostSummary, SecurityEvent, ViolationRecord};

pub fn severity_name(sev: i32) -> &'static str {
    match Severity::try_from(sev) {
        Ok(Severity::Info) => "info",
        Ok(Severity::Low) => "low",
        Ok(Severity::Medium) => "medium",
        Ok(Severity::High) => "high",
        Ok(Severity::Critical) => "critical",
        Ok(Severity::Unspecified) | Err(_) => "unspecified",
    }
}

pub fn file_kind_name(kind: i32) -> &'static str {
    match ViolationKind::try_from(kind) {
        Ok(ViolationKind::Added) => "added",
        Ok(ViolationKind::Removed) => "removed",
        Ok(ViolationKind::Modified) => "modified",
        Ok(ViolationKind::TypeChanged) => "type_changed",
        Ok(ViolationKind::Unverifiable) => "unverifiable",
        Ok(ViolationKind::Unspecified) | Err(_) => "unspecified",
    }
}

pub fn package_kind_name(kind: i32) -> &'static str {
    match PackageDriftKind::try_from(kind) {
        Ok(PackageDriftKind::Installed) => "package_installed",
        Ok(PackageDriftKind::Removed) => "package_removed",
        Ok(PackageDriftKind::Changed) => "package_changed",
        Ok(PackageDriftKind::Unspecified) | Err(_) => "package_unspecified",
    }
}

fn class_name(class: i32) -> Option<String> {
    match ViolationClass::try_from(class) {
        Ok(ViolationClass::PackageChange) => Some("package-change".into()),
        Ok(ViolationClass::Unexplained) => Some("unexplained".into()),
        Ok(ViolationClass::Unspecified) | Err(_) => None,
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

pub fn host(h: &HostSummary, now_ms: i64, silent_after: Duration) -> api::Host {
    let [unspecified, info, low, medium, high, critical] = h.open_by_severity;
    api::Host {
        host_id: h.host_id.clone(),
        state: host_state::derive(h, now_ms, silent_after)
            .name()
            .to_string(),
        labels: h.labels.iter().cloned().collect(),
        enrolled_at: rfc3339_ms(h.enrolled_ms),
        image: api::Image {
            id: h.hello.image_id.clone(),
            version: h.hello.image_version.clone(),
        },
        baseline_root: (!h.hello.baseline_root.is_empty()).then(|| hex(&h.hello.baseline_root)),
        agent_version: non_empty(&h.hello.agent_version),
        boot_id: non_empty(&h.hello.boot_id),
        last_seen: h.last_seen_ms.map(rfc3339_ms),
        last_scan: h.last_scan_ms.map(rfc3339_ms),
        last_scan_status: match h.last_scan_status {
            ScanStatus::Complete => Some("complete".into()),
            ScanStatus::Incomplete => Some("incomplete".into()),
            ScanStatus::Unspecified => None,
        },
        last_report: h.last_report_ms.map(rfc3339_ms),
        incomplete: h.incomplete,
        incomplete_reason: if h.incomplete {
            non_empty(&h.incomplete_reason)
        } else {
            None
        },
        lost_reports: h.lost_reports,
        open: api::OpenCounts {
            total: h.open_by_severity.iter().sum(),
            critical,
            high,
            medium,
            low,
            info,
            unspecified,
        },
        package_drift: h.open_packages,
        revoked: h.revoked,
        stream: api::Stream {
            epoch: h.position.epoch,
            last_seq: h.position.last_seq,
            set_digest: hex(&h.position.set_digest),
        },
        // Filled in by the handler from the lifecycle store.
        lifecycle: String::new(),
    }
}

pub fn violation(v: &ViolationRecord) -> api::Violation {
    let mut out = api::Violation {
        host_id: v.host_id.clone(),
        item: "unknown".into(),
        kind: "unspecified".into(),
        severity: "unspecified".into(),
        first_seen: rfc3339_ms(v.first_seen_ms),
        last_seen: rfc3339_ms(v.last_seen_ms),
        resolved: v.resolved_ms.is_some(),
        resolved_at: v.resolved_ms.map(rfc3339_ms),
        path: None,
        changes: vec![],
        reason: None,
        baseline_type: None,
        observed_type: None,
        packages: vec![],
        class: None,
        config: false,
        package: None,
    };
    let DriftItem { item, .. } = &v.item;
    match item {
        Some(drift_item::Item::File(f)) => {
            out.item = "file".into();
            out.kind = file_kind_name(f.kind).into();
            out.severity = severity_name(f.severity).into();
            out.path = Some(RawBytes(f.path.clone()));
            out.changes = f
                .changes
                .iter()
                .map(|c| api::Change {
                    attribute: c.attribute.clone(),
                    before: c.before.clone(),
                    after: c.after.clone(),
                })
                .collect();
            out.reason = non_empty(&f.reason);
            out.baseline_type = non_empty(&f.baseline_type);
            out.observed_type = non_empty(&f.observed_type);
            out.packages = f.packages.clone();
            out.class = class_name(f.class);
            out.config = f.config;
        }
        Some(drift_item::Item::Package(p)) => {
            out.item = "package".into();
            out.kind = package_kind_name(p.kind).into();
            out.severity = severity_name(p.severity).into();
            let side = |version: &str, state: &str| {
                (!version.is_empty() || !state.is_empty()).then(|| api::PackageVersion {
                    version: version.to_string(),
                    state: state.to_string(),
                })
            };
            out.package = Some(api::PackageDrift {
                name: p.name.clone(),
                arch: p.arch.clone(),
                before: side(&p.version_before, &p.state_before),
                after: side(&p.version_after, &p.state_after),
            });
        }
        // Storage only accepts items with content; keep the row visible rather than hide it.
        None => {}
    }
    out
}

pub fn security_event(e: &SecurityEvent) -> api::SecurityEvent {
    api::SecurityEvent {
        at: rfc3339_ms(e.at_ms),
        kind: e.kind.clone(),
        peer_host_id: e.peer_host_id.clone(),
        detail: e.detail.clone(),
    }
}
