//! Exports for the SIEM: the fleet's events — violations opened and resolved, security
//! events, audit records — as JSON Lines with ECS-style field names (`jsonl`), CSV (`csv`) or CEF (`cef`), served by
//! `GET /api/v1/export` (`http`) and forwarded as CEF over syslog (`syslog`, configured by
//! `[export.syslog]`, `config`). `docs/exports.md` documents every field.
//!
//! What this module owns: the one event model all formats render ([`ExportEvent`]), the
//! stable event ids, the time order of events and its cursor ([`Position`]), and the readers
//! that merge the storage's sources page by page ([`EventReader`]). What it must never do:
//! write fleet state (the forwarder's cursor is its only write), or let anything a host
//! reported leave unescaped for the format it is in — every renderer is tested with hostile
//! host ids, paths and package names.
//!
//! **Order.** Events are ordered by `(time, source, row id)`: time is the event's own time
//! (`first_seen` for an opened violation, `resolved_at` for a resolved one, `at` for a security
//! event or an audit record), source breaks ties between kinds, the storage row id within one. A [`Position`] in
//! that order is an exclusive cursor: "everything up to here has been exported".
//!
//! **Stable ids.** `event.id` is the first 16 bytes of SHA-256, in hex, over a domain tag and
//! the event's identity, each part length-prefixed: an opened violation is (host id, drift key,
//! `first_seen` ms), its resolution the same with another tag, a security event its row id and
//! time, an audit record its chain seq and hash. The same event has the same id in every export and every format, so a SIEM can drop
//! duplicates (an overlapping export window, a forwarder batch resent after a crash).

pub mod cef;
pub mod config;
pub mod csv;
pub mod http;
pub mod jsonl;
pub mod syslog;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use driftwatch_proto::v1::{PackageDriftKind, Severity, ViolationClass, ViolationKind, drift_item};

use crate::api::hex;
use crate::storage::export::{
    ExportSecurityEvent, ExportViolation, MAX_EXPORT_PAGE, RowPosition, ViolationEdge,
};
use crate::storage::{AuditRecord, SecurityEvent, Storage, StorageError, ViolationRecord};

/// Where an event comes from; the order of the variants breaks ties between events of the
/// same millisecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    ViolationOpened = 0,
    ViolationResolved = 1,
    Security = 2,
    Audit = 3,
}

impl Source {
    pub const ALL: [Source; 4] = [
        Source::ViolationOpened,
        Source::ViolationResolved,
        Source::Security,
        Source::Audit,
    ];

    fn rank(self) -> u8 {
        self as u8
    }

    fn from_rank(r: u8) -> Option<Source> {
        Source::ALL.into_iter().find(|s| s.rank() == r)
    }
}

/// Which sources an export reads: the `kind` parameter (comma-separated names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kinds {
    pub opened: bool,
    pub resolved: bool,
    pub security: bool,
    pub audit: bool,
}

impl Kinds {
    pub const ALL: Kinds = Kinds {
        opened: true,
        resolved: true,
        security: true,
        audit: true,
    };
    /// The names `kind` accepts.
    pub const NAMES: [&'static str; 5] = [
        "violation",
        "violation_opened",
        "violation_resolved",
        "security",
        "audit",
    ];

    fn includes(self, s: Source) -> bool {
        match s {
            Source::ViolationOpened => self.opened,
            Source::ViolationResolved => self.resolved,
            Source::Security => self.security,
            Source::Audit => self.audit,
        }
    }
}

impl FromStr for Kinds {
    type Err = String;
    fn from_str(s: &str) -> Result<Kinds, String> {
        let mut k = Kinds {
            opened: false,
            resolved: false,
            security: false,
            audit: false,
        };
        for name in s.split(',').map(str::trim) {
            match name {
                "violation" => {
                    k.opened = true;
                    k.resolved = true;
                }
                "violation_opened" => k.opened = true,
                "violation_resolved" => k.resolved = true,
                "security" => k.security = true,
                "audit" => k.audit = true,
                other => {
                    return Err(format!(
                        "unknown kind {other:?} (expected a comma-separated list of: {})",
                        Kinds::NAMES.join(", ")
                    ));
                }
            }
        }
        Ok(k)
    }
}

/// A place in the export order (see the module doc); exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub at_ms: i64,
    pub source: u8,
    pub row: i64,
}

impl Position {
    /// Just before every event at or after `ms`.
    pub fn before(ms: i64) -> Position {
        Position {
            at_ms: ms,
            source: 0,
            row: i64::MIN,
        }
    }

    /// The exclusive lower bound of `source`'s rows that lie after this position.
    fn row_bound(self, source: Source) -> RowPosition {
        let row = match source.rank().cmp(&self.source) {
            std::cmp::Ordering::Greater => i64::MIN,
            std::cmp::Ordering::Equal => self.row,
            std::cmp::Ordering::Less => i64::MAX,
        };
        RowPosition {
            at_ms: self.at_ms,
            row,
        }
    }
}

/// `at_ms:source:row`, the form the forwarder's cursor is saved in.
impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.at_ms, self.source, self.row)
    }
}

impl FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Position, String> {
        let bad = || format!("{s:?} is not an export position (at_ms:source:row)");
        let mut parts = s.split(':');
        let (Some(a), Some(b), Some(c), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let source: u8 = b.parse().map_err(|_| bad())?;
        if Source::from_rank(source).is_none() {
            return Err(bad());
        }
        Ok(Position {
            at_ms: a.parse().map_err(|_| bad())?,
            source,
            row: c.parse().map_err(|_| bad())?,
        })
    }
}

/// What the export knows about a host besides its id (from `list_hosts`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostInfo {
    pub labels: Vec<(String, String)>,
    pub image_id: String,
    pub image_version: String,
}

/// What happened, with its source record.
#[derive(Debug, Clone, PartialEq)]
pub enum Detail {
    Violation {
        record: ViolationRecord,
        resolved: bool,
    },
    Security(SecurityEvent),
    Audit(AuditRecord),
}

/// One exported event: everything every format renders. Strings from hosts are kept exactly
/// (renderers escape them for their format).
#[derive(Debug, Clone, PartialEq)]
pub struct ExportEvent {
    /// Stable id (module doc): 32 lowercase hex digits.
    pub id: String,
    pub at_ms: i64,
    pub position: Position,
    /// `violation.opened`, `violation.resolved`, `security.<kind>`, or an audit record's
    /// action (`host.retired`, …).
    pub action: String,
    /// Host id the event is about (a security event: the peer certificate's, when there was
    /// one; an audit record of a `host.*` or `rebuild.*` action: its target).
    pub host: Option<String>,
    pub host_info: HostInfo,
    pub detail: Detail,
}

/// The file or package an event is about, when it is about one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Object<'a> {
    File(&'a driftwatch_proto::v1::Violation),
    Package(&'a driftwatch_proto::v1::PackageDrift),
}

impl ExportEvent {
    pub fn source(&self) -> Source {
        match &self.detail {
            Detail::Violation {
                resolved: false, ..
            } => Source::ViolationOpened,
            Detail::Violation { resolved: true, .. } => Source::ViolationResolved,
            Detail::Security(_) => Source::Security,
            Detail::Audit(_) => Source::Audit,
        }
    }

    pub fn object(&self) -> Option<Object<'_>> {
        match &self.detail {
            Detail::Violation { record, .. } => match &record.item.item {
                Some(drift_item::Item::File(f)) => Some(Object::File(f)),
                Some(drift_item::Item::Package(p)) => Some(Object::Package(p)),
                None => None,
            },
            Detail::Security(_) | Detail::Audit(_) => None,
        }
    }

    /// ECS `event.kind`: a violation is an `alert` (driftwatch detected something), the rest
    /// are `event`s.
    pub fn ecs_kind(&self) -> &'static str {
        match self.detail {
            Detail::Violation { .. } => "alert",
            Detail::Security(_) | Detail::Audit(_) => "event",
        }
    }

    /// ECS `event.category` (one value from ECS's allowed list).
    pub fn ecs_category(&self) -> &'static str {
        match (&self.detail, self.object()) {
            (_, Some(Object::File(_))) => "file",
            (_, Some(Object::Package(_))) => "package",
            (Detail::Security(e), _) if e.kind == "impersonation" => "intrusion_detection",
            (Detail::Security(_), _) => "authentication",
            (Detail::Audit(a), _) if a.action.starts_with("security.") => "intrusion_detection",
            (Detail::Audit(a), _) if a.action.contains("token.") => "iam",
            (Detail::Audit(_), _) => "configuration",
            (Detail::Violation { .. }, None) => "host",
        }
    }

    /// ECS `event.type`.
    pub fn ecs_type(&self) -> &'static str {
        match (&self.detail, self.object()) {
            (Detail::Violation { resolved: true, .. }, _) => "info",
            (_, Some(Object::File(f))) => match ViolationKind::try_from(f.kind) {
                Ok(ViolationKind::Added) => "creation",
                Ok(ViolationKind::Removed) => "deletion",
                Ok(ViolationKind::Modified | ViolationKind::TypeChanged) => "change",
                _ => "info",
            },
            (_, Some(Object::Package(p))) => match PackageDriftKind::try_from(p.kind) {
                Ok(PackageDriftKind::Installed) => "installation",
                Ok(PackageDriftKind::Removed) => "deletion",
                _ => "change",
            },
            (Detail::Security(_), _) => "denied",
            (Detail::Audit(a), _) if a.action.starts_with("security.") => "denied",
            (Detail::Audit(_), _) => "change",
            (Detail::Violation { .. }, None) => "info",
        }
    }

    /// The drift kind's API name (`modified`, `package_installed`, …) for violations.
    pub fn drift_kind(&self) -> Option<&'static str> {
        Some(match self.object()? {
            Object::File(f) => crate::http::convert::file_kind_name(f.kind),
            Object::Package(p) => crate::http::convert::package_kind_name(p.kind),
        })
    }

    /// Severity as `Severity` (0 unspecified … 5 critical); none for security events.
    pub fn severity(&self) -> Option<i32> {
        Some(match self.object()? {
            Object::File(f) => f.severity,
            Object::Package(p) => p.severity,
        })
    }

    pub fn severity_name(&self) -> Option<&'static str> {
        self.severity().map(crate::http::convert::severity_name)
    }

    /// `rule.name`: what driftwatch's check found (`file modified`, `package installed`,
    /// `security impersonation`).
    pub fn rule_name(&self) -> String {
        match (&self.detail, self.drift_kind()) {
            (Detail::Security(e), _) => format!("security {}", e.kind),
            (Detail::Audit(a), _) => format!("audit {}", a.action),
            (_, Some(k)) => match k.strip_prefix("package_") {
                Some(p) => format!("package {p}"),
                None => format!("file {}", k.replace('_', " ")),
            },
            (_, None) => "drift".into(),
        }
    }

    /// The file path, exactly.
    pub fn path(&self) -> Option<&[u8]> {
        match self.object()? {
            Object::File(f) => Some(&f.path),
            Object::Package(_) => None,
        }
    }

    /// BLAKE3 (hex) of the content before / after, from a `content` change.
    pub fn content_hashes(&self) -> (Option<&str>, Option<&str>) {
        let Some(Object::File(f)) = self.object() else {
            return (None, None);
        };
        let Some(c) = f.changes.iter().find(|c| c.attribute == "content") else {
            return (None, None);
        };
        (
            c.before.strip_prefix("blake3:"),
            c.after.strip_prefix("blake3:"),
        )
    }

    /// `package.name`, `package.version` and architecture: the drifted package (its version on
    /// the host, or in the image when removed), or the first owner of a drifted file.
    pub fn package(&self) -> Option<(String, Option<String>, Option<String>)> {
        match self.object()? {
            Object::Package(p) => {
                let version = if p.version_after.is_empty() {
                    &p.version_before
                } else {
                    &p.version_after
                };
                Some((
                    p.name.clone(),
                    (!version.is_empty()).then(|| version.clone()),
                    (!p.arch.is_empty()).then(|| p.arch.clone()),
                ))
            }
            Object::File(f) => {
                let owner = f.packages.first()?;
                let (name, arch) = match owner.rsplit_once(':') {
                    Some((n, a)) => (n.to_string(), Some(a.to_string())),
                    None => (owner.clone(), None),
                };
                Some((name, None, arch))
            }
        }
    }

    /// A one-line description for people (exact text: renderers escape it).
    pub fn message(&self) -> String {
        match &self.detail {
            Detail::Security(e) => e.detail.clone(),
            Detail::Audit(a) => {
                if a.target.is_empty() {
                    format!("{} by {}", a.action, a.actor)
                } else {
                    format!("{} {} by {}", a.action, a.target, a.actor)
                }
            }
            Detail::Violation { resolved, .. } => {
                let what = match self.object() {
                    Some(Object::File(f)) => {
                        format!("{} {}", self.rule_name(), String::from_utf8_lossy(&f.path))
                    }
                    Some(Object::Package(p)) => {
                        format!("{} {}:{}", self.rule_name(), p.name, p.arch)
                    }
                    None => self.rule_name(),
                };
                let host = self.host.as_deref().unwrap_or("?");
                if *resolved {
                    format!("resolved on {host}: {what}")
                } else {
                    format!("drift on {host}: {what}")
                }
            }
        }
    }

    /// Every changed attribute as `attr: before -> after`, `; `-separated (exact text).
    pub fn changes_line(&self) -> String {
        let Some(Object::File(f)) = self.object() else {
            return String::new();
        };
        f.changes
            .iter()
            .map(|c| format!("{}: {} -> {}", c.attribute, c.before, c.after))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// `class` of a file violation (`package-change`, `unexplained`).
    pub fn class(&self) -> Option<&'static str> {
        let Some(Object::File(f)) = self.object() else {
            return None;
        };
        match ViolationClass::try_from(f.class) {
            Ok(ViolationClass::PackageChange) => Some("package-change"),
            Ok(ViolationClass::Unexplained) => Some("unexplained"),
            _ => None,
        }
    }
}

/// Severity on a 0–10 scale (CEF): unspecified 0, info 1, low 3, medium 5, high 8, critical 10.
pub fn severity_0_to_10(sev: Option<i32>) -> u8 {
    match sev.map(Severity::try_from) {
        Some(Ok(Severity::Info)) => 1,
        Some(Ok(Severity::Low)) => 3,
        Some(Ok(Severity::Medium)) => 5,
        Some(Ok(Severity::High)) => 8,
        Some(Ok(Severity::Critical)) => 10,
        _ => 0,
    }
}

/// The stable id (module doc): SHA-256 over a domain tag and length-prefixed parts, 16 bytes
/// in hex.
fn stable_id(tag: &str, parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"driftwatch.export.v1\0");
    for part in std::iter::once(tag.as_bytes()).chain(parts.iter().copied()) {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part);
    }
    hex(&ctx.finish().as_ref()[..16])
}

/// The event for a violation occurrence at one of its edges.
pub fn violation_event(
    v: ExportViolation,
    resolved: bool,
    hosts: &HashMap<String, HostInfo>,
) -> ExportEvent {
    let r = &v.record;
    let (tag, action, at_ms, source) = if resolved {
        (
            "violation.resolved",
            "violation.resolved",
            r.resolved_ms.unwrap_or(r.last_seen_ms),
            Source::ViolationResolved,
        )
    } else {
        (
            "violation.opened",
            "violation.opened",
            r.first_seen_ms,
            Source::ViolationOpened,
        )
    };
    let id = stable_id(
        tag,
        &[
            r.host_id.as_bytes(),
            &r.key,
            r.first_seen_ms.to_string().as_bytes(),
        ],
    );
    ExportEvent {
        id,
        at_ms,
        position: Position {
            at_ms,
            source: source.rank(),
            row: v.row,
        },
        action: action.into(),
        host: Some(r.host_id.clone()),
        host_info: hosts.get(&r.host_id).cloned().unwrap_or_default(),
        detail: Detail::Violation {
            record: v.record,
            resolved,
        },
    }
}

/// The event for a security event.
pub fn security_event(e: ExportSecurityEvent, hosts: &HashMap<String, HostInfo>) -> ExportEvent {
    let id = stable_id(
        "security",
        &[
            e.row.to_string().as_bytes(),
            e.event.at_ms.to_string().as_bytes(),
        ],
    );
    let host = e.event.peer_host_id.clone();
    ExportEvent {
        id,
        at_ms: e.event.at_ms,
        position: Position {
            at_ms: e.event.at_ms,
            source: Source::Security.rank(),
            row: e.row,
        },
        action: format!("security.{}", e.event.kind),
        host_info: host
            .as_ref()
            .and_then(|h| hosts.get(h).cloned())
            .unwrap_or_default(),
        host,
        detail: Detail::Security(e.event),
    }
}

/// The event for an audit record.
pub fn audit_event(a: AuditRecord, hosts: &HashMap<String, HostInfo>) -> ExportEvent {
    let seq = a.seq.to_string();
    let id = stable_id("audit", &[seq.as_bytes(), &a.hash]);
    let about_host = ["host.", "rebuild."]
        .iter()
        .any(|p| a.action.starts_with(p));
    let host = (about_host && !a.target.is_empty()).then(|| a.target.clone());
    ExportEvent {
        id,
        at_ms: a.at_ms,
        position: Position {
            at_ms: a.at_ms,
            source: Source::Audit.rank(),
            row: i64::try_from(a.seq).unwrap_or(i64::MAX),
        },
        action: a.action.clone(),
        host_info: host
            .as_ref()
            .and_then(|h| hosts.get(h).cloned())
            .unwrap_or_default(),
        host,
        detail: Detail::Audit(a),
    }
}

/// Labels and image of every host, for the events' `labels.*` and image fields.
pub async fn host_infos(store: &dyn Storage) -> Result<HashMap<String, HostInfo>, StorageError> {
    Ok(store
        .list_hosts()
        .await?
        .into_iter()
        .map(|h| {
            (
                h.host_id,
                HostInfo {
                    labels: h.labels,
                    image_id: h.hello.image_id,
                    image_version: h.hello.image_version,
                },
            )
        })
        .collect())
}

/// Rows of one source fetched ahead of the merge.
#[derive(Debug)]
struct SourceBuffer {
    source: Source,
    /// Exclusive bound of the next fetch.
    next: RowPosition,
    rows: std::collections::VecDeque<ExportEvent>,
    exhausted: bool,
}

/// Reads events in export order after a position, up to a time bound: a k-way merge of the
/// sources, each read a page at a time, so memory stays at a page per source whatever the
/// window holds.
#[derive(Debug)]
pub struct EventReader {
    until_ms: i64,
    page: u32,
    hosts: HashMap<String, HostInfo>,
    sources: Vec<SourceBuffer>,
}

impl EventReader {
    /// Events after `after` and at or before `until_ms`, from the sources `kinds` selects.
    /// `page` is the storage page size (clamped to 1 ..= 10 000).
    pub fn new(
        after: Position,
        until_ms: i64,
        kinds: Kinds,
        page: u32,
        hosts: HashMap<String, HostInfo>,
    ) -> EventReader {
        let sources = Source::ALL
            .into_iter()
            .filter(|s| kinds.includes(*s))
            .map(|source| SourceBuffer {
                source,
                next: after.row_bound(source),
                rows: Default::default(),
                exhausted: false,
            })
            .collect();
        EventReader {
            until_ms,
            page: page.clamp(1, MAX_EXPORT_PAGE),
            hosts,
            sources,
        }
    }

    async fn fill(&mut self, store: &dyn Storage, i: usize) -> Result<(), StorageError> {
        let (page, until, hosts) = (self.page, self.until_ms, &self.hosts);
        let b = &mut self.sources[i];
        if !b.rows.is_empty() || b.exhausted {
            return Ok(());
        }
        let events: Vec<ExportEvent> = match b.source {
            Source::ViolationOpened | Source::ViolationResolved => {
                let resolved = b.source == Source::ViolationResolved;
                let edge = if resolved {
                    ViolationEdge::Resolved
                } else {
                    ViolationEdge::Opened
                };
                store
                    .export_violations(edge, b.next, until, page)
                    .await?
                    .into_iter()
                    .map(|v| violation_event(v, resolved, hosts))
                    .collect()
            }
            Source::Security => store
                .export_security_events(b.next, until, page)
                .await?
                .into_iter()
                .map(|e| security_event(e, hosts))
                .collect(),
            Source::Audit => store
                .export_audit(b.next, until, page)
                .await?
                .into_iter()
                .map(|a| audit_event(a, hosts))
                .collect(),
        };
        b.exhausted = events.len() < page as usize;
        if let Some(last) = events.last() {
            b.next = RowPosition {
                at_ms: last.position.at_ms,
                row: last.position.row,
            };
        }
        b.rows.extend(events);
        Ok(())
    }

    /// Up to `max` next events in export order; empty when the window is exhausted.
    pub async fn next_batch(
        &mut self,
        store: &dyn Storage,
        max: usize,
    ) -> Result<Vec<ExportEvent>, StorageError> {
        let mut out = Vec::new();
        while out.len() < max {
            for i in 0..self.sources.len() {
                self.fill(store, i).await?;
            }
            let next = self
                .sources
                .iter()
                .enumerate()
                .filter_map(|(i, b)| b.rows.front().map(|e| (e.position, i)))
                .min();
            let Some((_, i)) = next else { break };
            if let Some(e) = self.sources[i].rows.pop_front() {
                out.push(e);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftwatch_proto::v1::DriftItem;

    #[test]
    fn positions_round_trip_and_order() {
        let p = Position {
            at_ms: 1_700_000_000_123,
            source: 2,
            row: 42,
        };
        assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        assert!("1:9:1".parse::<Position>().is_err());
        assert!("1:0".parse::<Position>().is_err());
        assert!("a:0:1".parse::<Position>().is_err());
        assert!("1:0:1:2".parse::<Position>().is_err());
        // Exclusive bounds per source.
        assert_eq!(
            p.row_bound(Source::ViolationOpened),
            RowPosition {
                at_ms: p.at_ms,
                row: i64::MAX
            }
        );
        assert_eq!(
            p.row_bound(Source::Security),
            RowPosition {
                at_ms: p.at_ms,
                row: 42
            }
        );
        let q = Position::before(5);
        assert_eq!(q.row_bound(Source::ViolationOpened).row, i64::MIN);
        assert!(
            q < Position {
                at_ms: 5,
                source: 0,
                row: 1
            }
        );
    }

    #[test]
    fn kinds_parse() {
        assert_eq!("violation,security,audit".parse::<Kinds>(), Ok(Kinds::ALL));
        assert_eq!(
            "violation_resolved".parse::<Kinds>(),
            Ok(Kinds {
                opened: false,
                resolved: true,
                security: false,
                audit: false
            })
        );
        assert!("audit,x".parse::<Kinds>().unwrap_err().contains("\"x\""));
    }

    fn record(host: &str, key: &[u8], first: i64) -> ExportViolation {
        ExportViolation {
            row: 7,
            record: ViolationRecord {
                host_id: host.into(),
                key: key.to_vec(),
                item: DriftItem::default(),
                first_seen_ms: first,
                last_seen_ms: first,
                resolved_ms: Some(first + 10),
            },
        }
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let hosts = HashMap::new();
        let a = violation_event(record("web-1", b"f\0/etc/x", 1000), false, &hosts);
        let again = violation_event(record("web-1", b"f\0/etc/x", 1000), false, &hosts);
        assert_eq!(a.id, again.id);
        assert_eq!(a.id.len(), 32);
        let resolved = violation_event(record("web-1", b"f\0/etc/x", 1000), true, &hosts);
        assert_ne!(a.id, resolved.id);
        assert_eq!(resolved.at_ms, 1010);
        for other in [
            record("web-2", b"f\0/etc/x", 1000),
            record("web-1", b"f\0/etc/y", 1000),
            record("web-1", b"f\0/etc/x", 1001),
            // Length prefixes: moving bytes between parts changes the id.
            record("web-1f", b"\0/etc/x", 1000),
        ] {
            assert_ne!(a.id, violation_event(other, false, &hosts).id);
        }
        // Pinned (computed independently, docs/exports.md's rule): the rule is part of the
        // format; changing it re-ids every event a SIEM holds.
        assert_eq!(a.id, "dba86cb42f206861c10f665f50a4bc89");
    }
}
