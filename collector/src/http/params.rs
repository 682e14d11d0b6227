//! Query parameters of the API, parsed into typed values. Pure: the pairs of the query string,
//! the current time and the limits in, a typed request or a [`ParamError`] naming the
//! parameter out.
//!
//! Strict on purpose: an unknown or repeated parameter is an error, not ignored, so a typo
//! (`?paht=/etc/**`) never silently widens a security search to the whole fleet.

use std::time::{Duration, UNIX_EPOCH};

use driftwatch_proto::v1::{DriftItem, PackageDriftKind, ViolationKind, drift_item};

use crate::host_state::HostState;
use crate::storage::ViolationQuery;

/// A parameter that could not be accepted; answered with 400 and the parameter's name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter {parameter:?}: {message}")]
pub struct ParamError {
    pub parameter: String,
    pub message: String,
}

impl ParamError {
    pub(crate) fn new(parameter: &str, message: impl Into<String>) -> Self {
        ParamError {
            parameter: parameter.to_string(),
            message: message.into(),
        }
    }
}

/// Default and maximum of `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub default: u32,
    pub max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default: 1000,
            max: 10_000,
        }
    }
}

/// The pairs of a query string with each name looked up at most once; what is left at the
/// end is unknown.
pub(crate) struct Pairs<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Pairs<'a> {
    pub(crate) fn new(raw: &'a [(String, String)], allowed: &[&str]) -> Result<Self, ParamError> {
        let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(raw.len());
        for (name, value) in raw {
            if !allowed.contains(&name.as_str()) {
                return Err(ParamError::new(
                    name,
                    format!(
                        "unknown parameter (this endpoint accepts: {})",
                        if allowed.is_empty() {
                            "none".to_string()
                        } else {
                            allowed.join(", ")
                        }
                    ),
                ));
            }
            if pairs.iter().any(|(n, _)| n == name) {
                return Err(ParamError::new(name, "given more than once"));
            }
            pairs.push((name, value));
        }
        Ok(Pairs { pairs })
    }

    pub(crate) fn get(&self, name: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// A non-empty value; an empty one (`?path=`) is an error rather than "any".
    pub(crate) fn text(&self, name: &str) -> Result<Option<&'a str>, ParamError> {
        match self.get(name) {
            Some("") => Err(ParamError::new(name, "empty value")),
            other => Ok(other),
        }
    }
}

/// `true` or `false`.
fn parse_bool(name: &str, v: Option<&str>) -> Result<bool, ParamError> {
    match v {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ParamError::new(
            name,
            format!("{other:?} is not a boolean (use true or false)"),
        )),
    }
}

fn parse_limit(v: Option<&str>, limits: Limits) -> Result<u32, ParamError> {
    let Some(v) = v else {
        return Ok(limits.default);
    };
    match v.parse::<u32>() {
        Ok(n) if (1..=limits.max).contains(&n) => Ok(n),
        _ => Err(ParamError::new(
            "limit",
            format!(
                "{v:?} is not a whole number from 1 to {} (default {})",
                limits.max, limits.default
            ),
        )),
    }
}

/// A point in time: RFC 3339 (`2026-11-26T08:00:00Z`, offsets allowed), a date
/// (`2026-11-26`, midnight UTC), or a duration back from `now_ms` (`24h`, `7d`, `1h 30m`).
/// Returns Unix milliseconds.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Ok(d) = humantime::parse_duration(s) {
        let back = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        return Ok(now_ms.saturating_sub(back));
    }
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    let parsed = humantime::parse_rfc3339(&full)
        .ok()
        .or_else(|| parse_with_offset(&full));
    match parsed {
        Some(t) => Ok(match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(_) => 0,
        }),
        None => Err(format!(
            "{s:?} is neither a time (RFC 3339 like 2026-11-26T08:00:00Z, or a date like \
             2026-11-26) nor a duration back from now (like 24h, 7d, 1h 30m)"
        )),
    }
}

/// RFC 3339 with a numeric offset (`+02:00`), which humantime does not take: the offset is
/// applied to the UTC reading of the same wall-clock time.
fn parse_with_offset(s: &str) -> Option<std::time::SystemTime> {
    if s.len() < 6 {
        return None;
    }
    let (local, offset) = s.split_at(s.len() - 6);
    let ob = offset.as_bytes();
    let sign = match ob[0] {
        b'+' => 1i64,
        b'-' => -1,
        _ => return None,
    };
    if ob[3] != b':' {
        return None;
    }
    let hours: u64 = offset.get(1..3)?.parse().ok()?;
    let minutes: u64 = offset.get(4..6)?.parse().ok()?;
    if hours > 23 || minutes > 59 {
        return None;
    }
    let utc_reading = humantime::parse_rfc3339(&format!("{local}Z")).ok()?;
    let shift = Duration::from_secs(hours * 3600 + minutes * 60);
    // 10:00+02:00 is 08:00Z: subtract a positive offset.
    if sign > 0 {
        utc_reading.checked_sub(shift)
    } else {
        utc_reading.checked_add(shift)
    }
}

pub(crate) fn parse_time_param(
    name: &str,
    v: Option<&str>,
    now_ms: i64,
) -> Result<Option<i64>, ParamError> {
    match v {
        None => Ok(None),
        Some(v) => parse_time(v, now_ms)
            .map(Some)
            .map_err(|m| ParamError::new(name, m)),
    }
}

/// The kind of drift a search asks for, by the names the API shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindFilter {
    File(ViolationKind),
    Package(PackageDriftKind),
}

impl KindFilter {
    pub const NAMES: [&'static str; 8] = [
        "added",
        "removed",
        "modified",
        "type_changed",
        "unverifiable",
        "package_installed",
        "package_removed",
        "package_changed",
    ];

    pub fn parse(s: &str) -> Option<KindFilter> {
        Some(match s {
            "added" => KindFilter::File(ViolationKind::Added),
            "removed" => KindFilter::File(ViolationKind::Removed),
            "modified" => KindFilter::File(ViolationKind::Modified),
            "type_changed" => KindFilter::File(ViolationKind::TypeChanged),
            "unverifiable" => KindFilter::File(ViolationKind::Unverifiable),
            "package_installed" => KindFilter::Package(PackageDriftKind::Installed),
            "package_removed" => KindFilter::Package(PackageDriftKind::Removed),
            "package_changed" => KindFilter::Package(PackageDriftKind::Changed),
            _ => return None,
        })
    }

    /// The storage query's `kind`: `ViolationKind` as i32, package kinds mapped to
    /// added/removed/modified (see [`ViolationQuery::kind`]). Storage then matches both item
    /// types, so the result is narrowed again by [`KindFilter::matches`].
    pub fn storage_kind(self) -> i32 {
        match self {
            KindFilter::File(k) => k as i32,
            KindFilter::Package(PackageDriftKind::Installed) => ViolationKind::Added as i32,
            KindFilter::Package(PackageDriftKind::Removed) => ViolationKind::Removed as i32,
            KindFilter::Package(PackageDriftKind::Changed) => ViolationKind::Modified as i32,
            KindFilter::Package(PackageDriftKind::Unspecified) => ViolationKind::Unspecified as i32,
        }
    }

    pub fn matches(self, item: &DriftItem) -> bool {
        match (self, &item.item) {
            (KindFilter::File(k), Some(drift_item::Item::File(v))) => v.kind == k as i32,
            (KindFilter::Package(k), Some(drift_item::Item::Package(p))) => p.kind == k as i32,
            _ => false,
        }
    }
}

/// `GET /api/v1/violations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViolationSearch {
    /// What to ask storage for; `limit` is the caller's, not yet adjusted for truncation
    /// detection or post-filtering.
    pub query: ViolationQuery,
    /// Set when the storage result must be narrowed by item type (see [`KindFilter`]).
    pub kind: Option<KindFilter>,
}

impl ViolationSearch {
    pub const PARAMS: [&'static str; 9] = [
        "path",
        "kind",
        "package",
        "image",
        "host",
        "since",
        "until",
        "include_resolved",
        "limit",
    ];

    pub fn parse(
        raw: &[(String, String)],
        now_ms: i64,
        limits: Limits,
    ) -> Result<Self, ParamError> {
        let p = Pairs::new(raw, &Self::PARAMS)?;
        let path_glob = p.text("path")?;
        if let Some(glob) = path_glob {
            check_path_glob(glob)?;
        }
        let kind = match p.text("kind")? {
            None => None,
            Some(k) => Some(KindFilter::parse(k).ok_or_else(|| {
                ParamError::new(
                    "kind",
                    format!(
                        "unknown kind {k:?} (expected one of: {})",
                        KindFilter::NAMES.join(", ")
                    ),
                )
            })?),
        };
        let since_ms = parse_time_param("since", p.get("since"), now_ms)?;
        let until_ms = parse_time_param("until", p.get("until"), now_ms)?;
        if let (Some(s), Some(u)) = (since_ms, until_ms)
            && s > u
        {
            return Err(ParamError::new("until", "is earlier than since"));
        }
        Ok(ViolationSearch {
            query: ViolationQuery {
                host_id: p.text("host")?.map(str::to_string),
                path_glob: path_glob.map(str::to_string),
                kind: kind.map(KindFilter::storage_kind),
                package: p.text("package")?.map(str::to_string),
                image_id: p.text("image")?.map(str::to_string),
                since_ms,
                until_ms,
                include_resolved: parse_bool("include_resolved", p.get("include_resolved"))?,
                limit: parse_limit(p.get("limit"), limits)?,
            },
            kind,
        })
    }
}

/// The glob syntax storage applies (globset, `literal_separator`, `backslash_escape`): checked here so a bad
/// pattern is a 400 naming `path`, not a storage error.
fn check_path_glob(glob: &str) -> Result<(), ParamError> {
    if !glob.starts_with('/') && !glob.starts_with('*') {
        return Err(ParamError::new(
            "path",
            format!("{glob:?} is not an absolute path glob (like /etc/ssh/** or /usr/bin/*)"),
        ));
    }
    globset::GlobBuilder::new(glob)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map(|_| ())
        .map_err(|e| ParamError::new("path", format!("invalid glob: {e}")))
}

/// `GET /api/v1/hosts/{host_id}/violations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostViolations {
    pub include_resolved: bool,
    pub limit: u32,
}

impl HostViolations {
    pub fn parse(raw: &[(String, String)], limits: Limits) -> Result<Self, ParamError> {
        let p = Pairs::new(raw, &["include_resolved", "limit"])?;
        Ok(HostViolations {
            include_resolved: parse_bool("include_resolved", p.get("include_resolved"))?,
            limit: parse_limit(p.get("limit"), limits)?,
        })
    }
}

/// `GET /api/v1/hosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFilter {
    pub state: Option<HostState>,
}

impl HostFilter {
    pub fn parse(raw: &[(String, String)]) -> Result<Self, ParamError> {
        let p = Pairs::new(raw, &["state"])?;
        let state = match p.text("state")? {
            None => None,
            Some(s) => Some(
                s.parse::<HostState>()
                    .map_err(|e| ParamError::new("state", e.to_string()))?,
            ),
        };
        Ok(HostFilter { state })
    }
}

/// `GET /api/v1/security-events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventFilter {
    /// Unix ms; [`EventFilter::DEFAULT_SINCE`] back from now when not given.
    pub since_ms: i64,
    pub limit: u32,
}

impl EventFilter {
    /// Events are listed oldest first, so an unbounded default would show the oldest
    /// `limit` events of the collector's life; a week back is what an operator looks at.
    pub const DEFAULT_SINCE: Duration = Duration::from_secs(7 * 86_400);

    pub fn parse(
        raw: &[(String, String)],
        now_ms: i64,
        limits: Limits,
    ) -> Result<Self, ParamError> {
        let p = Pairs::new(raw, &["since", "limit"])?;
        Ok(EventFilter {
            since_ms: parse_time_param("since", p.get("since"), now_ms)?
                .unwrap_or_else(|| now_ms.saturating_sub(Self::DEFAULT_SINCE.as_millis() as i64)),
            limit: parse_limit(p.get("limit"), limits)?,
        })
    }
}

/// `GET /api/v1/rebuilds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildFilter {
    pub state: Option<crate::storage::actions::ActionState>,
    pub host_id: Option<String>,
    pub limit: u32,
}

impl RebuildFilter {
    pub fn parse(raw: &[(String, String)], limits: Limits) -> Result<Self, ParamError> {
        let p = Pairs::new(raw, &["state", "host", "limit"])?;
        let state = match p.text("state")? {
            None => None,
            Some(s) => Some(s.parse().map_err(
                |e: crate::storage::actions::UnknownActionState| {
                    ParamError::new("state", e.to_string())
                },
            )?),
        };
        Ok(RebuildFilter {
            state,
            host_id: p.text("host")?.map(str::to_string),
            limit: parse_limit(p.get("limit"), limits)?,
        })
    }
}

/// Only `limit` accepted.
pub fn parse_limit_only(raw: &[(String, String)], limits: Limits) -> Result<u32, ParamError> {
    let p = Pairs::new(raw, &["limit"])?;
    parse_limit(p.get("limit"), limits)
}

/// `GET /api/v1/audit`: records after a seq, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditFilter {
    /// Records with a greater seq; 0 = from the start.
    pub after: u64,
    pub limit: u32,
}

impl AuditFilter {
    pub fn parse(raw: &[(String, String)], limits: Limits) -> Result<Self, ParamError> {
        let p = Pairs::new(raw, &["after", "limit"])?;
        let after = match p.text("after")? {
            None => 0,
            Some(v) => v.parse::<u64>().map_err(|_| {
                ParamError::new("after", format!("{v:?} is not a record number (0 or more)"))
            })?,
        };
        Ok(AuditFilter {
            after,
            limit: parse_limit(p.get("limit"), limits)?,
        })
    }
}

/// No parameters accepted.
pub fn parse_none(raw: &[(String, String)]) -> Result<(), ParamError> {
    Pairs::new(raw, &[]).map(|_| ())
}

/// Longest reason an operator gives (for an acknowledgement, a retirement, a rebuild decision).
pub const MAX_REASON: usize = 1024;

/// Such a reason: required, trimmed, at most [`MAX_REASON`] bytes, no control characters (it
/// ends up in tables and the audit log).
pub fn reason(r: &str) -> Result<String, ParamError> {
    let r = r.trim();
    if r.is_empty() || r.len() > MAX_REASON || r.chars().any(char::is_control) {
        return Err(ParamError {
            parameter: "reason".into(),
            message: format!("required: 1–{MAX_REASON} bytes without control characters"),
        });
    }
    Ok(r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    fn search(pairs: &[(&str, &str)]) -> Result<ViolationSearch, ParamError> {
        ViolationSearch::parse(&q(pairs), NOW, Limits::default())
    }

    fn err_param(r: Result<impl std::fmt::Debug, ParamError>) -> String {
        r.expect_err("should be refused").parameter
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("24h", NOW), Ok(NOW - 86_400_000));
        assert_eq!(parse_time("1h 30m", NOW), Ok(NOW - 5_400_000));
        assert_eq!(parse_time("2027-01-01", NOW), Ok(1_798_761_600_000));
        assert_eq!(
            parse_time("2027-01-01T00:00:10.5Z", NOW),
            Ok(1_798_761_610_500)
        );
        assert_eq!(
            parse_time("2027-01-01T02:00:00+02:00", NOW),
            Ok(1_798_761_600_000)
        );
        assert_eq!(
            parse_time("2026-12-31T19:00:00-05:00", NOW),
            Ok(1_798_761_600_000)
        );
        assert!(parse_time("yesterday", NOW).is_err());
        assert!(parse_time("2027-13-01", NOW).is_err());
        assert!(parse_time("2027-01-01T00:00:00+25:00", NOW).is_err());
        // A duration longer than the epoch saturates instead of overflowing.
        assert!(parse_time("1000000years", 0).is_ok());
    }

    #[test]
    fn a_full_search() {
        let s = search(&[
            ("path", "/etc/ssh/**"),
            ("kind", "modified"),
            ("package", "openssh-server"),
            ("image", "web"),
            ("host", "web-1"),
            ("since", "24h"),
            ("until", "2030-01-01"),
            ("include_resolved", "true"),
            ("limit", "50"),
        ])
        .unwrap();
        assert_eq!(
            s.query,
            ViolationQuery {
                host_id: Some("web-1".into()),
                path_glob: Some("/etc/ssh/**".into()),
                kind: Some(ViolationKind::Modified as i32),
                package: Some("openssh-server".into()),
                image_id: Some("web".into()),
                since_ms: Some(NOW - 86_400_000),
                until_ms: Some(1_893_456_000_000),
                include_resolved: true,
                limit: 50,
            }
        );
        assert_eq!(s.kind, Some(KindFilter::File(ViolationKind::Modified)));
    }

    #[test]
    fn defaults() {
        let s = search(&[]).unwrap();
        assert_eq!(
            s.query,
            ViolationQuery {
                limit: 1000,
                ..Default::default()
            }
        );
        assert_eq!(s.kind, None);
    }

    #[test]
    fn package_kinds_map_to_storage_kinds() {
        let s = search(&[("kind", "package_installed")]).unwrap();
        assert_eq!(s.query.kind, Some(ViolationKind::Added as i32));
        assert_eq!(
            s.kind,
            Some(KindFilter::Package(PackageDriftKind::Installed))
        );
        assert_eq!(
            search(&[("kind", "package_changed")]).unwrap().query.kind,
            Some(ViolationKind::Modified as i32)
        );
        for name in KindFilter::NAMES {
            assert!(KindFilter::parse(name).is_some(), "{name}");
        }
    }

    #[test]
    fn bad_parameters_are_named() {
        assert_eq!(err_param(search(&[("kind", "changed")])), "kind");
        assert_eq!(err_param(search(&[("path", "/etc/[ssh")])), "path");
        assert_eq!(err_param(search(&[("path", "etc/ssh")])), "path");
        assert_eq!(err_param(search(&[("path", "")])), "path");
        assert_eq!(err_param(search(&[("since", "soon")])), "since");
        assert_eq!(err_param(search(&[("until", "later")])), "until");
        assert_eq!(
            err_param(search(&[("since", "1h"), ("until", "2h")])),
            "until"
        );
        assert_eq!(err_param(search(&[("limit", "0")])), "limit");
        assert_eq!(err_param(search(&[("limit", "10001")])), "limit");
        assert_eq!(err_param(search(&[("limit", "-1")])), "limit");
        assert_eq!(
            err_param(search(&[("include_resolved", "yes")])),
            "include_resolved"
        );
        assert_eq!(err_param(search(&[("paht", "/etc")])), "paht");
        assert_eq!(err_param(search(&[("host", "a"), ("host", "b")])), "host");
        assert_eq!(
            err_param(HostFilter::parse(&q(&[("state", "dirty")]))),
            "state"
        );
        assert_eq!(err_param(parse_none(&q(&[("x", "1")]))), "x");
        assert_eq!(
            err_param(EventFilter::parse(
                &q(&[("since", "x")]),
                NOW,
                Limits::default()
            )),
            "since"
        );
        assert_eq!(
            err_param(HostViolations::parse(
                &q(&[("limit", "x")]),
                Limits::default()
            )),
            "limit"
        );
    }

    #[test]
    fn rebuild_filters() {
        let f = RebuildFilter::parse(
            &q(&[
                ("state", "pending_approval"),
                ("host", "web-1"),
                ("limit", "5"),
            ]),
            Limits::default(),
        )
        .unwrap();
        assert_eq!(
            f.state,
            Some(crate::storage::actions::ActionState::PendingApproval)
        );
        assert_eq!(f.host_id.as_deref(), Some("web-1"));
        assert_eq!(f.limit, 5);
        let d = RebuildFilter::parse(&[], Limits::default()).unwrap();
        assert_eq!((d.state, d.host_id, d.limit), (None, None, 1000));
        for (pairs, param) in [
            (vec![("state", "waiting")], "state"),
            (vec![("host", "")], "host"),
            (vec![("hots", "web-1")], "hots"),
            (vec![("limit", "0")], "limit"),
        ] {
            assert_eq!(
                err_param(RebuildFilter::parse(&q(&pairs), Limits::default())),
                param
            );
        }
    }

    #[test]
    fn host_filters() {
        assert_eq!(
            HostFilter::parse(&q(&[("state", "never-reported")])).unwrap(),
            HostFilter {
                state: Some(HostState::NeverReported)
            }
        );
        assert_eq!(
            HostViolations::parse(&q(&[("include_resolved", "true")]), Limits::default()).unwrap(),
            HostViolations {
                include_resolved: true,
                limit: 1000
            }
        );
        assert_eq!(
            EventFilter::parse(&q(&[]), NOW, Limits::default()).unwrap(),
            EventFilter {
                since_ms: NOW - 7 * 86_400_000,
                limit: 1000
            }
        );
    }

    #[test]
    fn kind_filter_matches_item_types() {
        use driftwatch_proto::v1::{PackageDrift, Violation};
        let file = DriftItem {
            key: vec![],
            item: Some(drift_item::Item::File(Violation {
                kind: ViolationKind::Added as i32,
                ..Default::default()
            })),
        };
        let pkg = DriftItem {
            key: vec![],
            item: Some(drift_item::Item::Package(PackageDrift {
                kind: PackageDriftKind::Installed as i32,
                ..Default::default()
            })),
        };
        let added = KindFilter::parse("added").unwrap();
        let installed = KindFilter::parse("package_installed").unwrap();
        assert!(added.matches(&file) && !added.matches(&pkg));
        assert!(installed.matches(&pkg) && !installed.matches(&file));
    }
}
