//! The pure part of `Storage::apply_reports`, shared by both backends: given each host's stored
//! stream position and open violation set (key → item hash), it applies a batch of reports in
//! memory and returns the outcomes and the exact row changes to write. The backends only load
//! state and write the plan, so deduplication, occurrences, full-set replacement, the digest and
//! the incomplete flag behave identically on SQLite and PostgreSQL.
//!
//! No I/O here.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use driftwatch_proto::Hash;
use driftwatch_proto::set::{SetDigest, item_hash_of_encoded};
use driftwatch_proto::v1::{DriftItem, PackageDriftKind, ScanStatus, ViolationKind, drift_item};
use prost::Message;

use super::{ApplyOutcome, ReportToApply, StorageError};

/// Separator around each package name in the `packages` column ("\x1fname:arch\x1f…"), so a
/// search for a package name is a substring test on both backends.
pub(crate) const PACKAGE_SEPARATOR: char = '\x1f';

/// The columns of a violation row derived from its item.
#[derive(Debug, Clone)]
pub(crate) struct ItemColumns {
    /// The encoded `DriftItem`.
    pub encoded: Vec<u8>,
    pub hash: Hash,
    /// Raw path, file items only.
    pub path: Option<Vec<u8>>,
    /// `ViolationKind` as i32; package drift mapped to added/removed/modified.
    pub kind: i32,
    pub severity: i32,
    pub is_package: bool,
    /// Owning packages (files) or the package itself, each "name:arch", between separators.
    pub packages: String,
    /// `path` and `is_package` are what the item's key implies (a file key is `f\0` + the
    /// path, a package key starts with `p\0`), as for every item the ingest accepts. Then a
    /// content update of the open occurrence with that key cannot change them, and the SQLite
    /// backend leaves them (and the path index) alone.
    pub identity_from_key: bool,
}

impl ItemColumns {
    pub fn new(item: &DriftItem) -> Self {
        let key = item.key.as_slice();
        let identity_from_key = match &item.item {
            Some(drift_item::Item::File(v)) => key.strip_prefix(b"f\0") == Some(v.path.as_slice()),
            Some(drift_item::Item::Package(_)) => key.starts_with(b"p\0"),
            None => false,
        };
        let encoded = item.encode_to_vec();
        let hash = item_hash_of_encoded(&encoded);
        let sep = PACKAGE_SEPARATOR;
        let (path, kind, severity, is_package, packages) = match &item.item {
            Some(drift_item::Item::File(v)) => {
                let mut packages = String::new();
                for p in &v.packages {
                    packages.push(sep);
                    packages.push_str(p);
                }
                if !packages.is_empty() {
                    packages.push(sep);
                }
                (Some(v.path.clone()), v.kind, v.severity, false, packages)
            }
            Some(drift_item::Item::Package(p)) => {
                let kind = match PackageDriftKind::try_from(p.kind) {
                    Ok(PackageDriftKind::Installed) => ViolationKind::Added,
                    Ok(PackageDriftKind::Removed) => ViolationKind::Removed,
                    Ok(PackageDriftKind::Changed) => ViolationKind::Modified,
                    _ => ViolationKind::Unspecified,
                };
                let packages = format!("{sep}{}:{}{sep}", p.name, p.arch);
                (None, kind as i32, p.severity, true, packages)
            }
            None => (None, 0, 0, false, String::new()),
        };
        ItemColumns {
            encoded,
            hash,
            path,
            kind,
            severity,
            is_package,
            packages,
            identity_from_key,
        }
    }
}

/// Where an open occurrence's row is: stored already, or planned in this batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowRef {
    Stored(i64),
    /// Index into [`Plan::inserts`].
    New(usize),
}

/// One open (unresolved) occurrence as the planner needs it.
#[derive(Debug, Clone)]
pub(crate) struct OpenEntry {
    pub row: RowRef,
    pub hash: Hash,
    pub severity: i32,
    pub is_package: bool,
}

/// A host's stored state, loaded by the backend inside the apply transaction.
#[derive(Debug, Clone)]
pub(crate) struct HostState {
    pub pk: i64,
    /// Incremented by every batch that changes the host: the backends' open-set caches are
    /// valid only for the version they loaded.
    pub apply_version: i64,
    pub epoch: u64,
    pub last_seq: u64,
    pub incomplete: bool,
    pub incomplete_reason: String,
    pub lost_reports: u64,
    pub last_scan_ms: Option<i64>,
    pub last_scan_status: i32,
    pub open: BTreeMap<Vec<u8>, OpenEntry>,
}

/// A new occurrence row.
#[derive(Debug, Clone)]
pub(crate) struct NewRow {
    pub host_pk: i64,
    pub key: Vec<u8>,
    pub columns: ItemColumns,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub resolved_ms: Option<i64>,
}

/// Changes to a stored occurrence row.
#[derive(Debug, Clone, Default)]
pub(crate) struct RowUpdate {
    /// New content, when the item changed.
    pub columns: Option<ItemColumns>,
    pub last_seen_ms: Option<i64>,
    pub resolved_ms: Option<i64>,
}

/// A host row after the batch.
#[derive(Debug, Clone)]
pub(crate) struct HostUpdate {
    pub pk: i64,
    pub apply_version: i64,
    pub epoch: u64,
    pub last_seq: u64,
    pub set_digest: Hash,
    pub incomplete: bool,
    pub incomplete_reason: String,
    pub lost_reports: u64,
    pub last_report_ms: i64,
    pub last_scan_ms: Option<i64>,
    pub last_scan_status: i32,
    pub open_by_severity: [i64; 6],
    pub open_packages: i64,
}

/// Everything a batch does, to be written in one transaction: first `updates` (they may resolve
/// an occurrence whose key a later report opens again), then `inserts`, then `hosts`.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub outcomes: Vec<ApplyOutcome>,
    pub updates: BTreeMap<i64, RowUpdate>,
    pub inserts: Vec<NewRow>,
    pub hosts: Vec<HostUpdate>,
}

impl Plan {
    fn resolve(&mut self, row: RowRef, at_ms: i64) {
        match row {
            RowRef::Stored(id) => self.updates.entry(id).or_default().resolved_ms = Some(at_ms),
            RowRef::New(i) => self.inserts[i].resolved_ms = Some(at_ms),
        }
    }

    fn touch(&mut self, row: RowRef, at_ms: i64, columns: Option<ItemColumns>) {
        match row {
            RowRef::Stored(id) => {
                let u = self.updates.entry(id).or_default();
                u.last_seen_ms = Some(at_ms);
                if columns.is_some() {
                    u.columns = columns;
                }
            }
            RowRef::New(i) => {
                let r = &mut self.inserts[i];
                r.last_seen_ms = at_ms;
                if let Some(c) = columns {
                    r.columns = c;
                }
            }
        }
    }
}

/// The digest of a host's open set, by an ordered scan of (key, item hash).
pub(crate) fn digest_of(open: &BTreeMap<Vec<u8>, OpenEntry>) -> Hash {
    let mut d = SetDigest::new();
    for (key, entry) in open {
        // BTreeMap keys are unique and ascending: push cannot fail.
        let _ = d.push(key, &entry.hash);
    }
    d.finish()
}

/// Applies `batch` in order to `hosts` (keyed by host id; every host of the batch must be
/// there, else `UnknownHost`). `hosts` is left in its state after the batch.
pub(crate) fn plan(
    hosts: &mut HashMap<String, HostState>,
    batch: Vec<ReportToApply>,
) -> Result<Plan, StorageError> {
    let mut plan = Plan::default();
    // Host id → (last report's received time, digest after it), for hosts with at least one
    // applied report.
    let mut touched: BTreeMap<String, (i64, Hash)> = BTreeMap::new();
    for ReportToApply {
        host_id,
        report,
        received_ms,
    } in batch
    {
        let Some(st) = hosts.get_mut(&host_id) else {
            return Err(StorageError::UnknownHost(host_id));
        };
        if report.epoch == st.epoch && report.seq <= st.last_seq {
            plan.outcomes.push(ApplyOutcome::Duplicate);
            continue;
        }
        let now = received_ms;
        let from_empty = st.open.is_empty();
        if report.full {
            let keep: HashSet<&[u8]> = report.upserts.iter().map(|i| i.key.as_slice()).collect();
            let gone: Vec<Vec<u8>> = st
                .open
                .keys()
                .filter(|k| !keep.contains(k.as_slice()))
                .cloned()
                .collect();
            for key in gone {
                if let Some(e) = st.open.remove(&key) {
                    plan.resolve(e.row, now);
                }
            }
        }
        // Upserts before removals: a key in both ends resolved, without a phantom occurrence.
        for item in &report.upserts {
            let columns = ItemColumns::new(item);
            match st.open.get_mut(&item.key) {
                Some(e) => {
                    let changed = e.hash != columns.hash;
                    if changed {
                        e.hash = columns.hash;
                        e.severity = columns.severity;
                        e.is_package = columns.is_package;
                    }
                    let row = e.row;
                    plan.touch(row, now, changed.then_some(columns));
                }
                None => {
                    let entry = OpenEntry {
                        row: RowRef::New(plan.inserts.len()),
                        hash: columns.hash,
                        severity: columns.severity,
                        is_package: columns.is_package,
                    };
                    plan.inserts.push(NewRow {
                        host_pk: st.pk,
                        key: item.key.clone(),
                        columns,
                        first_seen_ms: now,
                        last_seen_ms: now,
                        resolved_ms: None,
                    });
                    st.open.insert(item.key.clone(), entry);
                }
            }
        }
        for key in &report.removed_keys {
            if let Some(e) = st.open.remove(key) {
                plan.resolve(e.row, now);
            }
        }

        st.epoch = report.epoch;
        st.last_seq = report.seq;
        st.lost_reports = st.lost_reports.saturating_add(report.lost_reports);
        let status = ScanStatus::try_from(report.status).unwrap_or(ScanStatus::Unspecified);
        if status == ScanStatus::Incomplete || report.lost_reports > 0 {
            st.incomplete = true;
            st.incomplete_reason = if !report.status_reason.is_empty() {
                report.status_reason.clone()
            } else if report.lost_reports > 0 {
                format!("{} reports lost", report.lost_reports)
            } else {
                "incomplete scan".to_owned()
            };
        } else if status == ScanStatus::Complete {
            st.incomplete = false;
            st.incomplete_reason.clear();
        }
        if status != ScanStatus::Unspecified {
            st.last_scan_status = status as i32;
        }
        if report.scan_finished_unix_ms > 0 {
            st.last_scan_ms = Some(st.last_scan_ms.map_or(report.scan_finished_unix_ms, |t| {
                t.max(report.scan_finished_unix_ms)
            }));
        }
        let digest = digest_of(&st.open);
        plan.outcomes.push(ApplyOutcome::Applied {
            digest_matches: report.set_digest.as_slice() == digest.as_slice(),
            from_empty,
        });
        touched.insert(host_id, (now, digest));
    }

    for (host_id, (last_report_ms, set_digest)) in touched {
        let Some(st) = hosts.get_mut(&host_id) else {
            continue;
        };
        st.apply_version += 1;
        let (by_severity, packages) =
            super::open_counts(st.open.values().map(|e| (e.severity, e.is_package)));
        plan.hosts.push(HostUpdate {
            pk: st.pk,
            apply_version: st.apply_version,
            epoch: st.epoch,
            last_seq: st.last_seq,
            set_digest,
            incomplete: st.incomplete,
            incomplete_reason: st.incomplete_reason.clone(),
            lost_reports: st.lost_reports,
            last_report_ms,
            last_scan_ms: st.last_scan_ms,
            last_scan_status: st.last_scan_status,
            open_by_severity: by_severity.map(to_i64),
            open_packages: to_i64(packages),
        });
    }
    Ok(plan)
}

/// After the plan committed: rewrites the open sets' `RowRef::New(i)` to the ids the inserts
/// got, so the sets can be cached for the next batch.
pub(crate) fn settle_new_rows(open: &mut BTreeMap<Vec<u8>, OpenEntry>, new_ids: &[i64]) {
    for e in open.values_mut() {
        if let RowRef::New(i) = e.row
            && let Some(id) = new_ids.get(i)
        {
            e.row = RowRef::Stored(*id);
        }
    }
}

/// Where an apply batch's time went, logged at debug level (target
/// `driftwatch_collector::storage::apply`) when that is enabled: loading host state, planning,
/// writing the rows, and the durable commit.
#[derive(Debug)]
pub(crate) struct ApplyTimer {
    on: bool,
    at: Instant,
    load: Duration,
    plan: Duration,
    write: Duration,
}

impl ApplyTimer {
    pub fn start() -> Self {
        ApplyTimer {
            on: tracing::enabled!(
                target: "driftwatch_collector::storage::apply",
                tracing::Level::DEBUG
            ),
            at: Instant::now(),
            load: Duration::ZERO,
            plan: Duration::ZERO,
            write: Duration::ZERO,
        }
    }

    fn lap(&mut self) -> Duration {
        let now = Instant::now();
        let d = now - self.at;
        self.at = now;
        d
    }

    /// Host rows and open sets loaded.
    pub fn loaded(&mut self) {
        self.load = self.lap();
    }

    /// The plan made.
    pub fn planned(&mut self) {
        self.plan = self.lap();
    }

    /// The rows written (not yet committed; PostgreSQL pipelines its `COMMIT` behind the
    /// writes, so there this includes the commit and `commit_ms` is about 0).
    pub fn written(&mut self) {
        self.write = self.lap();
    }

    /// Committed: logs the batch.
    pub fn committed(
        &mut self,
        backend: &'static str,
        plan: &Plan,
        reports: usize,
        reloaded: usize,
    ) {
        if !self.on {
            return;
        }
        let commit = self.lap();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        tracing::debug!(
            target: "driftwatch_collector::storage::apply",
            backend,
            reports,
            hosts = plan.hosts.len(),
            reloaded_hosts = reloaded,
            updates = plan.updates.len(),
            inserts = plan.inserts.len(),
            load_ms = ms(self.load),
            plan_ms = ms(self.plan),
            write_ms = ms(self.write),
            commit_ms = ms(commit),
            "apply batch"
        );
    }
}

/// u64 values (epochs, seqs, counters) are stored bit-for-bit in signed 64-bit columns.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}
