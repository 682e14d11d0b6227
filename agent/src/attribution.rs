//! Package drift, and the attribution of file violations to the packages that own them. Pure
//! functions over values: no filesystem, no package database access.
//!
//! A file violation is `package-change` when one of its owning packages was installed, removed
//! or changed since the image was built (the package drift is the finding; its files are the
//! evidence), and `unexplained` otherwise. A file of an unchanged package that changed is the
//! loudest case there is.

use std::collections::BTreeSet;

use driftwatch_proto::v1::Package;
use serde::Serialize;

use crate::diff::Violation;
use crate::policy::{PackagePolicy, Severity};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PackageDriftKind {
    Installed,
    Removed,
    Changed,
}

impl PackageDriftKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PackageDriftKind::Installed => "installed",
            PackageDriftKind::Removed => "removed",
            PackageDriftKind::Changed => "changed",
        }
    }
}

/// A package's version and state at one point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageVersion {
    pub version: String,
    pub state: String,
}

/// A package installed, removed or changed since the image was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageDrift {
    pub name: String,
    pub arch: String,
    pub kind: PackageDriftKind,
    pub severity: Severity,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<PackageVersion>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<PackageVersion>,
}

impl PackageDrift {
    /// `name:arch`.
    pub fn key(&self) -> String {
        format!("{}:{}", self.name, self.arch)
    }
}

/// Why a file violation happened, as far as packages tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// An owning package was installed, removed or changed.
    PackageChange,
    /// No owning package changed (or no package owns the path).
    Unexplained,
}

fn key(p: &Package) -> (&str, &str) {
    (p.name.as_str(), p.arch.as_str())
}

fn version(p: &Package) -> PackageVersion {
    PackageVersion {
        version: p.version.clone(),
        state: p.state.clone(),
    }
}

/// Whether a package in this state has its files on disk: `config-files` (removed, not
/// purged) and `not-installed` do not.
fn present(state: &str) -> bool {
    !matches!(state, "config-files" | "not-installed")
}

/// Compares two inventories, each sorted by (name, arch). A package that went from installed to
/// `config-files` was removed; the other way round, installed.
pub fn diff_inventories(
    before: &[Package],
    after: &[Package],
    severity: Severity,
) -> Vec<PackageDrift> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    let drift = |p: &Package, kind, before, after| PackageDrift {
        name: p.name.clone(),
        arch: p.arch.clone(),
        kind,
        severity,
        before,
        after,
    };
    while i < before.len() || j < after.len() {
        let ord = match (before.get(i), after.get(j)) {
            (Some(b), Some(a)) => key(b).cmp(&key(a)),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match ord {
            std::cmp::Ordering::Less => {
                out.push(drift(
                    &before[i],
                    PackageDriftKind::Removed,
                    Some(version(&before[i])),
                    None,
                ));
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(drift(
                    &after[j],
                    PackageDriftKind::Installed,
                    None,
                    Some(version(&after[j])),
                ));
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                let (b, a) = (&before[i], &after[j]);
                let kind = match (present(&b.state), present(&a.state)) {
                    (true, false) => Some(PackageDriftKind::Removed),
                    (false, true) => Some(PackageDriftKind::Installed),
                    _ if b.version != a.version || b.state != a.state => {
                        Some(PackageDriftKind::Changed)
                    }
                    _ => None,
                };
                if let Some(kind) = kind {
                    out.push(drift(b, kind, Some(version(b)), Some(version(a))));
                }
                i += 1;
                j += 1;
            }
        }
    }
    out
}

/// Names the owners of a file violation, classifies it and sets its severity per policy.
/// `owners` are `name:arch` keys; `changed` holds the keys of every drifted package.
pub fn attribute(
    v: &mut Violation,
    owners: BTreeSet<String>,
    config: bool,
    changed: &BTreeSet<String>,
    policy: &PackagePolicy,
) {
    let class = if owners.iter().any(|o| changed.contains(o)) {
        Class::PackageChange
    } else {
        Class::Unexplained
    };
    match class {
        Class::PackageChange => v.severity = policy.explained,
        Class::Unexplained if !owners.is_empty() => {
            v.severity = v.severity.max(policy.unexplained_owned)
        }
        Class::Unexplained => {}
    }
    v.class = Some(class);
    v.config = config;
    v.packages = owners.into_iter().collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diff::ViolationKind;
    use crate::escape::JsonBytes;

    fn pkg(name: &str, version: &str, state: &str) -> Package {
        Package {
            name: name.into(),
            version: version.into(),
            arch: "amd64".into(),
            state: state.into(),
        }
    }

    fn policy() -> PackagePolicy {
        crate::policy::Policy::builtin().packages
    }

    fn violation(sev: Severity) -> Violation {
        Violation {
            path: JsonBytes(b"/usr/bin/x".to_vec()),
            kind: ViolationKind::Modified,
            severity: sev,
            changes: vec![],
            reason: None,
            baseline: None,
            observed: None,
            packages: vec![],
            class: None,
            config: false,
        }
    }

    #[test]
    fn inventories_diff_into_installed_removed_and_changed() {
        let before = vec![
            pkg("a", "1", "installed"),
            pkg("b", "1", "installed"),
            pkg("c", "1", "installed"),
            pkg("d", "2", "installed"),
        ];
        let after = vec![
            pkg("a", "1", "installed"),
            pkg("b", "1.1", "installed"),
            pkg("d", "2", "config-files"),
            pkg("e", "1", "installed"),
        ];
        let d = diff_inventories(&before, &after, Severity::High);
        let got: Vec<_> = d.iter().map(|d| (d.name.as_str(), d.kind)).collect();
        assert_eq!(
            got,
            [
                ("b", PackageDriftKind::Changed),
                ("c", PackageDriftKind::Removed),
                ("d", PackageDriftKind::Removed),
                ("e", PackageDriftKind::Installed)
            ]
        );
        assert_eq!(d[0].before.as_ref().unwrap().version, "1");
        assert_eq!(d[0].after.as_ref().unwrap().version, "1.1");
        assert_eq!(d[2].after.as_ref().unwrap().state, "config-files");
        assert!(diff_inventories(&before, &before, Severity::High).is_empty());
    }

    #[test]
    fn classes_and_severities() {
        let changed: BTreeSet<String> = ["b:amd64".to_string()].into();
        let p = policy();
        let mut v = violation(Severity::High);
        attribute(&mut v, ["b:amd64".to_string()].into(), false, &changed, &p);
        assert_eq!(
            (v.class, v.severity),
            (Some(Class::PackageChange), p.explained)
        );

        let mut v = violation(Severity::High);
        attribute(
            &mut v,
            ["coreutils:amd64".to_string()].into(),
            false,
            &changed,
            &p,
        );
        assert_eq!(
            (v.class, v.severity),
            (Some(Class::Unexplained), Severity::Critical),
            "changed inside an unchanged package"
        );
        assert_eq!(v.packages, ["coreutils:amd64"]);

        let mut v = violation(Severity::Medium);
        attribute(&mut v, BTreeSet::new(), false, &changed, &p);
        assert_eq!(
            (v.class, v.severity),
            (Some(Class::Unexplained), Severity::Medium),
            "unowned keeps the path's severity"
        );
    }
}
