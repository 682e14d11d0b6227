//! The host's violation set as the agent tracks it between scans, and the reports that carry
//! its changes to the collector. Pure: values in, values out.
//!
//! A scan yields a new [`DriftSet`]; [`delta_reports`] turns the difference from the previous
//! set into reports, [`full_reports`] sends a whole set (the first report after a start, and
//! after the collector asks for a resync). Every report carries the digest
//! (`driftwatch_proto::set`) of the set the collector holds once it has applied that report.
//!
//! Large changes are split so that no message comes near gRPC's 4 MiB limit: at most
//! [`Limits::max_items`] items and about [`Limits::max_bytes`] encoded bytes per report. A split
//! full set is a full report with the first part, continued by delta reports; each part carries
//! the digest of the set as it stands after that part, and every part but the last is marked
//! `SCAN_STATUS_INCOMPLETE` ("part k of n"), because until the last part arrives the collector's
//! set is not the whole truth.

use std::collections::BTreeMap;

use driftwatch_proto::Hash;
use driftwatch_proto::set::{SetDigest, item_hash, set_digest};
use driftwatch_proto::v1::{DriftItem, Report, ScanStatus};
use prost::Message;

/// How large one report may grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_items: usize,
    pub max_bytes: usize,
}

impl Default for Limits {
    /// The contract's limits: about 1 MiB or 2000 items per report.
    fn default() -> Self {
        Limits {
            max_items: 2000,
            max_bytes: 1 << 20,
        }
    }
}

/// What a report says about the scan behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanMeta {
    pub started_unix_ms: i64,
    pub finished_unix_ms: i64,
    pub status: ScanStatus,
    /// Why the status is incomplete, for people.
    pub reason: String,
    /// Reports lost before this one (spool overflow or corruption).
    pub lost_reports: u64,
}

impl ScanMeta {
    pub fn complete(started_unix_ms: i64, finished_unix_ms: i64) -> ScanMeta {
        ScanMeta {
            started_unix_ms,
            finished_unix_ms,
            status: ScanStatus::Complete,
            reason: String::new(),
            lost_reports: 0,
        }
    }
}

/// One member of the set with the hash it contributes to the digest.
#[derive(Debug, Clone, PartialEq)]
struct Tracked {
    item: DriftItem,
    hash: Hash,
}

/// A host's violation set, by key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DriftSet {
    items: BTreeMap<Vec<u8>, Tracked>,
}

impl DriftSet {
    pub fn new(items: BTreeMap<Vec<u8>, DriftItem>) -> DriftSet {
        DriftSet {
            items: items
                .into_iter()
                .map(|(k, item)| {
                    let hash = item_hash(&item);
                    (k, Tracked { item, hash })
                })
                .collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// `driftwatch_proto::set` digest of the whole set.
    pub fn digest(&self) -> Hash {
        let mut d = SetDigest::new();
        for (k, t) in &self.items {
            // BTreeMap keys ascend strictly: push cannot fail.
            let _ = d.push(k, &t.hash);
        }
        d.finish()
    }

    pub fn items(&self) -> impl Iterator<Item = &DriftItem> {
        self.items.values().map(|t| &t.item)
    }

    fn hashes(&self) -> BTreeMap<Vec<u8>, Hash> {
        self.items
            .iter()
            .map(|(k, t)| (k.clone(), t.hash))
            .collect()
    }
}

/// One change to the set.
#[derive(Debug, Clone)]
enum Change<'a> {
    Upsert(&'a Tracked),
    Remove(&'a [u8]),
}

impl Change<'_> {
    fn encoded_len(&self) -> usize {
        // Field tag and length prefix included, roughly: a few bytes either way do not matter
        // against a 4 MiB limit.
        match self {
            Change::Upsert(t) => t.item.encoded_len() + 8,
            Change::Remove(k) => k.len() + 8,
        }
    }
}

/// Cuts changes into parts within the limits, in order. Every part holds at least one change.
fn parts<'a>(changes: Vec<Change<'a>>, limits: Limits) -> Vec<Vec<Change<'a>>> {
    let mut out: Vec<Vec<Change<'a>>> = Vec::new();
    let mut cur: Vec<Change<'a>> = Vec::new();
    let mut bytes = 0;
    for c in changes {
        let len = c.encoded_len();
        if !cur.is_empty() && (cur.len() >= limits.max_items || bytes + len > limits.max_bytes) {
            out.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += len;
        cur.push(c);
    }
    if !cur.is_empty() || out.is_empty() {
        out.push(cur);
    }
    out
}

fn report(full: bool, part: &[Change<'_>], digest: Hash, meta: &ScanMeta) -> Report {
    let mut r = Report {
        full,
        set_digest: digest.to_vec(),
        scan_started_unix_ms: meta.started_unix_ms,
        scan_finished_unix_ms: meta.finished_unix_ms,
        status: meta.status as i32,
        status_reason: meta.reason.clone(),
        ..Default::default()
    };
    for c in part {
        match c {
            Change::Upsert(t) => r.upserts.push(t.item.clone()),
            Change::Remove(k) => r.removed_keys.push(k.to_vec()),
        }
    }
    r
}

/// Marks all but the last of a split report's parts incomplete, and counts lost reports once.
fn finish_parts(mut reports: Vec<Report>, meta: &ScanMeta) -> Vec<Report> {
    let n = reports.len();
    if n > 1 {
        for (i, r) in reports.iter_mut().enumerate().take(n - 1) {
            r.status = ScanStatus::Incomplete as i32;
            let part = format!("part {} of {} of a split report", i + 1, n);
            r.status_reason = if meta.reason.is_empty() {
                part
            } else {
                format!("{}; {part}", meta.reason)
            };
        }
    }
    if let Some(first) = reports.first_mut() {
        first.lost_reports = meta.lost_reports;
    }
    reports
}

/// The whole set: one full report, or a full report continued by deltas when the set exceeds
/// the limits. An empty set is one full report with no items.
pub fn full_reports(set: &DriftSet, meta: &ScanMeta, limits: Limits) -> Vec<Report> {
    let changes: Vec<Change<'_>> = set.items.values().map(Change::Upsert).collect();
    let mut digest = SetDigest::new();
    let mut reports = Vec::new();
    for (i, part) in parts(changes, limits).iter().enumerate() {
        // Parts follow key order, so the set after part i is a prefix of the key order and its
        // digest is the running digest.
        for c in part {
            if let Change::Upsert(t) = c {
                let _ = digest.push(&t.item.key, &t.hash);
            }
        }
        reports.push(report(i == 0, part, digest.finish(), meta));
    }
    finish_parts(reports, meta)
}

/// The changes from `old` to `new` as delta reports; none when the sets are equal.
pub fn delta_reports(
    old: &DriftSet,
    new: &DriftSet,
    meta: &ScanMeta,
    limits: Limits,
) -> Vec<Report> {
    let mut changes = Vec::new();
    for (k, t) in &new.items {
        if old.items.get(k).is_none_or(|o| o.hash != t.hash) {
            changes.push(Change::Upsert(t));
        }
    }
    for k in old.items.keys() {
        if !new.items.contains_key(k) {
            changes.push(Change::Remove(k));
        }
    }
    if changes.is_empty() {
        return Vec::new();
    }
    let split = parts(changes, limits);
    if split.len() == 1 {
        return finish_parts(vec![report(false, &split[0], new.digest(), meta)], meta);
    }
    let mut state = old.hashes();
    let mut reports = Vec::new();
    for part in &split {
        for c in part {
            match c {
                Change::Upsert(t) => {
                    state.insert(t.item.key.clone(), t.hash);
                }
                Change::Remove(k) => {
                    state.remove(*k);
                }
            }
        }
        reports.push(report(false, part, set_digest(&state), meta));
    }
    finish_parts(reports, meta)
}

/// A report that changes nothing but tells the collector about the scan (e.g. that it failed):
/// no items, the digest of the unchanged set.
pub fn status_report(set: &DriftSet, meta: &ScanMeta) -> Report {
    finish_parts(vec![report(false, &[], set.digest(), meta)], meta)
        .pop()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftwatch_proto::set::{file_key, key_matches};
    use driftwatch_proto::v1::{Violation, drift_item::Item};

    fn item(path: &str, kind: i32) -> DriftItem {
        DriftItem {
            key: file_key(path.as_bytes()),
            item: Some(Item::File(Violation {
                path: path.as_bytes().to_vec(),
                kind,
                ..Default::default()
            })),
        }
    }

    fn set(items: &[DriftItem]) -> DriftSet {
        DriftSet::new(items.iter().map(|i| (i.key.clone(), i.clone())).collect())
    }

    fn many(n: usize, kind: i32) -> Vec<DriftItem> {
        (0..n).map(|i| item(&format!("/f/{i:06}"), kind)).collect()
    }

    /// What the collector does with a report: the independent reference for the digests.
    fn apply(state: &mut BTreeMap<Vec<u8>, Hash>, r: &Report) {
        if r.full {
            state.clear();
        }
        for i in &r.upserts {
            assert!(key_matches(i));
            state.insert(i.key.clone(), item_hash(i));
        }
        for k in &r.removed_keys {
            state.remove(k);
        }
        assert_eq!(
            r.set_digest,
            set_digest(state).to_vec(),
            "every report carries the digest of the set after it"
        );
    }

    fn meta() -> ScanMeta {
        ScanMeta::complete(1, 2)
    }

    #[test]
    fn digest_is_the_protocol_digest() {
        let s = set(&[item("/b", 3), item("/a", 1)]);
        let independent: BTreeMap<_, _> = [item("/a", 1), item("/b", 3)]
            .iter()
            .map(|i| (i.key.clone(), item_hash(i)))
            .collect();
        assert_eq!(s.digest(), set_digest(&independent));
        assert_eq!(DriftSet::default().digest(), set_digest(&BTreeMap::new()));
    }

    #[test]
    fn delta_holds_upserts_and_removals() {
        let old = set(&[item("/a", 1), item("/b", 3), item("/c", 3)]);
        let new = set(&[item("/a", 1), item("/b", 4), item("/d", 1)]);
        let reports = delta_reports(&old, &new, &meta(), Limits::default());
        assert_eq!(reports.len(), 1);
        let r = &reports[0];
        assert!(!r.full);
        let up: Vec<_> = r.upserts.iter().map(|i| i.key.clone()).collect();
        assert_eq!(up, [file_key(b"/b"), file_key(b"/d")]);
        assert_eq!(r.removed_keys, [file_key(b"/c")]);
        assert_eq!(r.status, ScanStatus::Complete as i32);
        let mut state = old.hashes();
        apply(&mut state, r);
        assert_eq!(state, new.hashes());
        assert!(delta_reports(&new, &new, &meta(), Limits::default()).is_empty());
    }

    #[test]
    fn full_report_of_an_empty_set() {
        let reports = full_reports(&DriftSet::default(), &meta(), Limits::default());
        assert_eq!(reports.len(), 1);
        assert!(reports[0].full && reports[0].upserts.is_empty());
        apply(&mut BTreeMap::new(), &reports[0]);
    }

    #[test]
    fn large_full_set_is_split_into_full_then_deltas() {
        let s = set(&many(4500, 1));
        let mut m = meta();
        m.lost_reports = 3;
        let reports = full_reports(&s, &m, Limits::default());
        assert_eq!(reports.len(), 3);
        assert!(reports[0].full);
        assert!(reports[1..].iter().all(|r| !r.full));
        assert!(reports.iter().all(|r| r.upserts.len() <= 2000));
        assert!(reports.iter().all(|r| r.encoded_len() < 1 << 21));
        assert_eq!(reports[0].lost_reports, 3);
        assert!(reports[1..].iter().all(|r| r.lost_reports == 0));
        assert_eq!(reports[0].status, ScanStatus::Incomplete as i32);
        assert_eq!(reports[0].status_reason, "part 1 of 3 of a split report");
        assert_eq!(reports[2].status, ScanStatus::Complete as i32);
        // A collector that had something else before ends up with exactly the set.
        let mut state: BTreeMap<_, _> = [(file_key(b"/stale"), [0u8; 32])].into();
        for r in &reports {
            apply(&mut state, r);
        }
        assert_eq!(state, s.hashes());
        assert_eq!(reports[2].set_digest, s.digest().to_vec());
    }

    #[test]
    fn byte_limit_splits_too() {
        let s = set(&many(100, 1));
        let limits = Limits {
            max_items: 2000,
            max_bytes: 300,
        };
        let reports = full_reports(&s, &meta(), limits);
        assert!(reports.len() > 10);
        let mut state = BTreeMap::new();
        for r in &reports {
            assert!(!r.upserts.is_empty());
            apply(&mut state, r);
        }
        assert_eq!(state, s.hashes());
    }

    #[test]
    fn large_delta_is_split_with_intermediate_digests() {
        let old = set(&many(3000, 1));
        let mut new_items = many(5000, 3);
        new_items.drain(..1000); // 1000 removed, 2000 changed, 2000 added
        let new = set(&new_items);
        let reports = delta_reports(&old, &new, &meta(), Limits::default());
        assert_eq!(reports.len(), 3);
        let mut state = old.hashes();
        for r in &reports {
            assert!(!r.full);
            assert!(r.upserts.len() + r.removed_keys.len() <= 2000);
            apply(&mut state, r);
        }
        assert_eq!(state, new.hashes());
    }

    #[test]
    fn status_report_changes_nothing() {
        let s = set(&[item("/a", 1)]);
        let m = ScanMeta {
            status: ScanStatus::Incomplete,
            reason: "baseline expired".into(),
            lost_reports: 2,
            ..meta()
        };
        let r = status_report(&s, &m);
        assert!(!r.full && r.upserts.is_empty() && r.removed_keys.is_empty());
        assert_eq!(r.status_reason, "baseline expired");
        assert_eq!(r.lost_reports, 2);
        let mut state = s.hashes();
        apply(&mut state, &r);
    }
}
