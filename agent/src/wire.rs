//! Check results as they travel to the collector: each file [`Violation`] and [`PackageDrift`]
//! of a [`Report`] becomes one [`DriftItem`] keyed by `driftwatch_proto::set`'s keys.
//!
//! Pure conversions: no I/O, no clock. Everything a person needs to judge a finding travels:
//! kind, severity, every changed attribute with before and after, the reason, the types on both
//! sides, the owning packages, the attribution class and the configuration-file flag. For added
//! and removed objects, whose report carries the object's summary instead of changes, the
//! summary becomes changes from or to `(absent)`, so the collector shows what appeared or
//! vanished.

use std::collections::BTreeMap;

use driftwatch_proto::set::{file_key, package_key};
use driftwatch_proto::v1::{self, AttributeChange, DriftItem, drift_item::Item};

use crate::attribution::{Class, PackageDrift, PackageDriftKind, PackageVersion};
use crate::diff::{ObjectSummary, Violation, ViolationKind};
use crate::escape;
use crate::policy::Severity;
use crate::report::Report;

/// The value on the missing side of an added or removed object.
pub const ABSENT: &str = "(absent)";

pub fn severity(s: Severity) -> v1::Severity {
    match s {
        Severity::Info => v1::Severity::Info,
        Severity::Low => v1::Severity::Low,
        Severity::Medium => v1::Severity::Medium,
        Severity::High => v1::Severity::High,
        Severity::Critical => v1::Severity::Critical,
    }
}

pub fn violation_kind(k: ViolationKind) -> v1::ViolationKind {
    match k {
        ViolationKind::Added => v1::ViolationKind::Added,
        ViolationKind::Removed => v1::ViolationKind::Removed,
        ViolationKind::Modified => v1::ViolationKind::Modified,
        ViolationKind::TypeChanged => v1::ViolationKind::TypeChanged,
        ViolationKind::Unverifiable => v1::ViolationKind::Unverifiable,
    }
}

pub fn class(c: Option<Class>) -> v1::ViolationClass {
    match c {
        None => v1::ViolationClass::Unspecified,
        Some(Class::PackageChange) => v1::ViolationClass::PackageChange,
        Some(Class::Unexplained) => v1::ViolationClass::Unexplained,
    }
}

pub fn package_drift_kind(k: PackageDriftKind) -> v1::PackageDriftKind {
    match k {
        PackageDriftKind::Installed => v1::PackageDriftKind::Installed,
        PackageDriftKind::Removed => v1::PackageDriftKind::Removed,
        PackageDriftKind::Changed => v1::PackageDriftKind::Changed,
    }
}

/// An object summary as attribute values, in the attribute names `diff` uses for changes.
fn summary_attributes(s: &ObjectSummary) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("mode", s.mode.clone()),
        ("uid", s.uid.to_string()),
        ("gid", s.gid.to_string()),
    ];
    if s.file_type == "file" {
        out.push(("size", s.size.to_string()));
    }
    if let Some(c) = &s.content {
        out.push(("content", c.clone()));
    }
    if let Some(t) = &s.target {
        out.push(("target", escape::bytes(&t.0)));
    }
    out
}

/// A file violation as a set item.
pub fn file_item(v: &Violation) -> DriftItem {
    let mut changes: Vec<AttributeChange> = v
        .changes
        .iter()
        .map(|c| AttributeChange {
            attribute: c.attribute.clone(),
            before: c.before.clone(),
            after: c.after.clone(),
        })
        .collect();
    if changes.is_empty() {
        let appeared = |(a, val): (&str, String), added: bool| AttributeChange {
            attribute: a.to_string(),
            before: if added { ABSENT.into() } else { val.clone() },
            after: if added { val } else { ABSENT.into() },
        };
        match (v.kind, &v.baseline, &v.observed) {
            (ViolationKind::Added, _, Some(o)) => {
                changes.extend(summary_attributes(o).into_iter().map(|a| appeared(a, true)))
            }
            (ViolationKind::Removed, Some(b), _) => changes.extend(
                summary_attributes(b)
                    .into_iter()
                    .map(|a| appeared(a, false)),
            ),
            _ => {}
        }
    }
    let type_of = |s: &Option<ObjectSummary>| s.as_ref().map(|s| s.file_type.to_string());
    DriftItem {
        key: file_key(&v.path.0),
        item: Some(Item::File(v1::Violation {
            path: v.path.0.clone(),
            kind: violation_kind(v.kind) as i32,
            severity: severity(v.severity) as i32,
            changes,
            reason: v.reason.clone().unwrap_or_default(),
            baseline_type: type_of(&v.baseline).unwrap_or_default(),
            observed_type: type_of(&v.observed).unwrap_or_default(),
            packages: v.packages.clone(),
            class: class(v.class) as i32,
            config: v.config,
        })),
    }
}

/// A package drift as a set item.
pub fn package_item(d: &PackageDrift) -> DriftItem {
    let split = |p: &Option<PackageVersion>| {
        p.as_ref()
            .map(|p| (p.version.clone(), p.state.clone()))
            .unwrap_or_default()
    };
    let (version_before, state_before) = split(&d.before);
    let (version_after, state_after) = split(&d.after);
    DriftItem {
        key: package_key(&d.name, &d.arch),
        item: Some(Item::Package(v1::PackageDrift {
            name: d.name.clone(),
            arch: d.arch.clone(),
            kind: package_drift_kind(d.kind) as i32,
            severity: severity(d.severity) as i32,
            version_before,
            state_before,
            version_after,
            state_after,
        })),
    }
}

/// The host's violation set according to one check: every file violation and package drift,
/// by key. Two findings can never share a key (a report has one violation per path and one
/// drift per package); if they did, the later would win, and the set would still be
/// well-formed.
pub fn drift_set(report: &Report) -> BTreeMap<Vec<u8>, DriftItem> {
    report
        .violations
        .iter()
        .map(file_item)
        .chain(report.package_drift.iter().map(package_item))
        .map(|i| (i.key.clone(), i))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::Change;
    use crate::escape::JsonBytes;
    use driftwatch_proto::set::key_matches;

    fn summary(t: &'static str) -> ObjectSummary {
        ObjectSummary {
            file_type: t,
            mode: "4755".into(),
            uid: 0,
            gid: 0,
            size: 12,
            content: Some("blake3:ab".into()),
            target: None,
        }
    }

    fn violation(path: &[u8], kind: ViolationKind) -> Violation {
        Violation {
            path: JsonBytes(path.to_vec()),
            kind,
            severity: Severity::Critical,
            changes: vec![],
            reason: None,
            baseline: None,
            observed: None,
            packages: vec![],
            class: None,
            config: false,
        }
    }

    fn file_of(item: &DriftItem) -> &v1::Violation {
        match &item.item {
            Some(Item::File(v)) => v,
            other => panic!("not a file item: {other:?}"),
        }
    }

    #[test]
    fn modified_file_carries_everything() {
        let mut v = violation(b"/etc/ssh/sshd_config\xff", ViolationKind::Modified);
        v.changes = vec![
            Change {
                attribute: "content".into(),
                before: "blake3:00".into(),
                after: "blake3:11".into(),
            },
            Change {
                attribute: "mode".into(),
                before: "0644 (rw-r--r--)".into(),
                after: "0666 (rw-rw-rw-)".into(),
            },
        ];
        v.baseline = Some(summary("file"));
        v.observed = Some(summary("file"));
        v.packages = vec!["openssh-server:amd64".into()];
        v.class = Some(Class::Unexplained);
        v.config = true;
        v.reason = Some("also odd".into());
        let item = file_item(&v);
        assert!(key_matches(&item));
        assert_eq!(item.key, file_key(b"/etc/ssh/sshd_config\xff"));
        let w = file_of(&item);
        assert_eq!(w.path, b"/etc/ssh/sshd_config\xff");
        assert_eq!(w.kind, v1::ViolationKind::Modified as i32);
        assert_eq!(w.severity, v1::Severity::Critical as i32);
        assert_eq!(w.changes.len(), 2);
        assert_eq!(w.changes[1].attribute, "mode");
        assert_eq!(w.changes[1].after, "0666 (rw-rw-rw-)");
        assert_eq!(
            (w.baseline_type.as_str(), w.observed_type.as_str()),
            ("file", "file")
        );
        assert_eq!(w.packages, ["openssh-server:amd64"]);
        assert_eq!(w.class, v1::ViolationClass::Unexplained as i32);
        assert!(w.config);
        assert_eq!(w.reason, "also odd");
    }

    #[test]
    fn added_and_removed_objects_show_what_appeared_or_vanished() {
        let mut added = violation(b"/usr/bin/backdoor", ViolationKind::Added);
        added.observed = Some(summary("file"));
        let w = file_of(&file_item(&added)).clone();
        assert_eq!(w.baseline_type, "");
        assert_eq!(w.observed_type, "file");
        let mode = w.changes.iter().find(|c| c.attribute == "mode").unwrap();
        assert_eq!(
            (mode.before.as_str(), mode.after.as_str()),
            (ABSENT, "4755")
        );
        assert!(w.changes.iter().any(|c| c.attribute == "content"));

        let mut removed = violation(b"/etc/motd", ViolationKind::Removed);
        removed.baseline = Some(ObjectSummary {
            file_type: "symlink",
            target: Some(JsonBytes(b"/x".to_vec())),
            content: None,
            ..summary("symlink")
        });
        let w = file_of(&file_item(&removed)).clone();
        assert_eq!(w.kind, v1::ViolationKind::Removed as i32);
        let t = w.changes.iter().find(|c| c.attribute == "target").unwrap();
        assert_eq!((t.before.as_str(), t.after.as_str()), ("/x", ABSENT));
        assert!(w.changes.iter().all(|c| c.attribute != "size"));
    }

    #[test]
    fn unverifiable_keeps_its_reason() {
        let mut v = violation(b"/var/lib/x", ViolationKind::Unverifiable);
        v.reason = Some("changed while being read".into());
        let w = file_of(&file_item(&v)).clone();
        assert_eq!(w.kind, v1::ViolationKind::Unverifiable as i32);
        assert_eq!(w.reason, "changed while being read");
        assert!(w.changes.is_empty());
        assert_eq!(w.class, v1::ViolationClass::Unspecified as i32);
    }

    #[test]
    fn package_drift_items() {
        let d = PackageDrift {
            name: "openssl".into(),
            arch: "amd64".into(),
            kind: PackageDriftKind::Changed,
            severity: Severity::High,
            before: Some(PackageVersion {
                version: "3.0.1".into(),
                state: "installed".into(),
            }),
            after: Some(PackageVersion {
                version: "3.0.2".into(),
                state: "installed".into(),
            }),
        };
        let item = package_item(&d);
        assert!(key_matches(&item));
        let Some(Item::Package(p)) = &item.item else {
            panic!("not a package item")
        };
        assert_eq!(p.kind, v1::PackageDriftKind::Changed as i32);
        assert_eq!(p.severity, v1::Severity::High as i32);
        assert_eq!(
            (p.version_before.as_str(), p.version_after.as_str()),
            ("3.0.1", "3.0.2")
        );
        assert_eq!(p.state_after, "installed");

        let installed = package_item(&PackageDrift {
            kind: PackageDriftKind::Installed,
            before: None,
            ..d
        });
        let Some(Item::Package(p)) = &installed.item else {
            panic!("not a package item")
        };
        assert_eq!(
            (p.version_before.as_str(), p.state_before.as_str()),
            ("", "")
        );
    }
}
