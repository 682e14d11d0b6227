//! The check report: a versioned JSON document (schema `driftwatch.check.v1`, documented in
//! docs/report-schema.md) and its rendering for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::attribution::{Class, PackageDrift};
use crate::baseline::Baseline;
use crate::diff::{Violation, ViolationKind};
use crate::escape;
use crate::policy::{Policy, Severity};
use crate::scan::ScanStats;

/// Identifies the JSON report format; bumped on any incompatible change.
pub const SCHEMA: &str = "driftwatch.check.v1";

#[derive(Debug, Clone, Serialize)]
pub struct BaselineInfo {
    pub file: String,
    pub image_id: String,
    pub image_version: String,
    pub created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    pub merkle_root: String,
    pub signer: String,
    pub entries: u64,
}

impl BaselineInfo {
    pub fn new(file: &Path, b: &Baseline) -> BaselineInfo {
        BaselineInfo {
            file: file.display().to_string(),
            image_id: b.header.image_id.clone(),
            image_version: b.header.image_version.clone(),
            created: crate::time::format_unix(b.header.created_unix),
            expires: b.header.expires_unix.map(crate::time::format_unix),
            merkle_root: hex(&b.merkle_root),
            signer: b.signer.clone(),
            entries: b.entries.len() as u64,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicyInfo {
    pub source: String,
    pub digest: String,
}

impl PolicyInfo {
    pub fn new(source: &str, p: &Policy) -> PolicyInfo {
        PolicyInfo {
            source: source.to_string(),
            digest: format!("blake3:{}", hex(&p.digest())),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub violations: usize,
    pub package_drift: usize,
    pub by_kind: BTreeMap<&'static str, usize>,
    pub by_severity: BTreeMap<&'static str, usize>,
    pub scan: ScanStats,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub root: String,
    pub baseline: BaselineInfo,
    pub policy: PolicyInfo,
    pub clean: bool,
    pub summary: Summary,
    pub warnings: Vec<String>,
    pub violations: Vec<Violation>,
    /// Packages installed, removed or changed since the image was built.
    pub package_drift: Vec<PackageDrift>,
}

/// The indented lines under a finding in the text reports: each changed attribute with before
/// and after, then the reason, if any.
pub fn write_details(s: &mut String, changes: &[crate::diff::Change], reason: Option<&str>) {
    for c in changes {
        let _ = writeln!(
            s,
            "              {}: {} -> {}",
            c.attribute, c.before, c.after
        );
    }
    if let Some(r) = reason {
        let _ = writeln!(s, "              reason: {r}");
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Report {
    pub fn new(
        root: String,
        baseline: BaselineInfo,
        policy: PolicyInfo,
        violations: Vec<Violation>,
        package_drift: Vec<PackageDrift>,
        scan: ScanStats,
        warnings: Vec<String>,
    ) -> Report {
        let mut by_kind = BTreeMap::new();
        let mut by_severity = BTreeMap::new();
        for v in &violations {
            *by_kind.entry(v.kind.as_str()).or_insert(0) += 1;
            *by_severity.entry(v.severity.as_str()).or_insert(0) += 1;
        }
        Report {
            schema: SCHEMA,
            root,
            baseline,
            policy,
            clean: violations.is_empty() && package_drift.is_empty(),
            summary: Summary {
                violations: violations.len(),
                package_drift: package_drift.len(),
                by_kind,
                by_severity,
                scan,
            },
            warnings,
            violations,
            package_drift,
        }
    }

    /// The report for people: one block per violation, then a summary.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "driftwatch check of {} against image {} {} (baseline root {}, signed by {})",
            escape::bytes(self.root.as_bytes()),
            escape::bytes(self.baseline.image_id.as_bytes()),
            escape::bytes(self.baseline.image_version.as_bytes()),
            &self.baseline.merkle_root[..16],
            self.baseline.signer
        );
        for d in &self.package_drift {
            let v = |p: &Option<crate::attribution::PackageVersion>| {
                p.as_ref().map_or("-".to_string(), |p| {
                    format!(
                        "{} ({})",
                        escape::bytes(p.version.as_bytes()),
                        escape::bytes(p.state.as_bytes())
                    )
                })
            };
            let _ = writeln!(
                s,
                "{:<9} package {:<9} {}:{}  {} -> {}",
                d.severity.as_str().to_uppercase(),
                d.kind.as_str(),
                escape::bytes(d.name.as_bytes()),
                escape::bytes(d.arch.as_bytes()),
                v(&d.before),
                v(&d.after)
            );
        }
        for v in &self.violations {
            let _ = writeln!(
                s,
                "{:<9} {:<13} {}",
                v.severity.as_str().to_uppercase(),
                v.kind.as_str(),
                escape::bytes(&v.path.0)
            );
            write_details(&mut s, &v.changes, v.reason.as_deref());
            if let Some(class) = v.class {
                let owners = if v.packages.is_empty() {
                    "no package".to_string()
                } else {
                    v.packages
                        .iter()
                        .map(|p| escape::bytes(p.as_bytes()))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let class = match class {
                    Class::PackageChange => "explained by a package change",
                    Class::Unexplained => "unexplained",
                };
                let conf = if v.config { ", configuration file" } else { "" };
                let _ = writeln!(s, "              owner: {owners} ({class}{conf})");
            }
            let obj = match v.kind {
                ViolationKind::Added => v.observed.as_ref(),
                ViolationKind::Removed => v.baseline.as_ref(),
                _ => None,
            };
            if let Some(o) = obj {
                let mut line = format!(
                    "              {} mode {} owner {}:{} size {}",
                    o.file_type, o.mode, o.uid, o.gid, o.size
                );
                if let Some(t) = &o.target {
                    let _ = write!(line, " -> {}", escape::bytes(&t.0));
                }
                if let Some(c) = &o.content {
                    let _ = write!(line, " {c}");
                }
                let _ = writeln!(s, "{line}");
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "warning: {w}");
        }
        let st = &self.summary.scan;
        if self.clean {
            let _ = writeln!(s, "clean: every object in scope matches the baseline");
        } else {
            let kinds: Vec<String> = self
                .summary
                .by_kind
                .iter()
                .map(|(k, n)| format!("{n} {}", k.replace('_', " ")))
                .collect();
            let mut sev: Vec<(Severity, usize)> = self
                .violations
                .iter()
                .fold(BTreeMap::new(), |mut m, v| {
                    *m.entry(v.severity).or_insert(0) += 1;
                    m
                })
                .into_iter()
                .collect();
            sev.reverse();
            let sevs: Vec<String> = sev.iter().map(|(k, n)| format!("{n} {k}")).collect();
            let _ = writeln!(
                s,
                "DRIFT: {} violation(s): {} ({}); {} package(s) drifted",
                self.summary.violations,
                kinds.join(", "),
                sevs.join(", "),
                self.package_drift.len()
            );
        }
        let _ = writeln!(
            s,
            "scanned {} entries in {:.2} s: {} file(s) hashed ({:.1} MiB), {} from the scan cache",
            st.entries,
            st.duration.as_secs_f64(),
            st.files_hashed,
            st.bytes_hashed as f64 / (1 << 20) as f64,
            st.cache_hits
        );
        s
    }
}
