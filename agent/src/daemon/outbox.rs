//! The outbox: the spool together with the violation set its reports lead to. Every report the
//! daemon sends is made here, numbered by the spool and appended (synced) before anything can
//! send it; records leave only on the collector's acknowledgement.
//!
//! All methods block on disk I/O: they run on the scan thread or in `spawn_blocking`, behind
//! one mutex (one writer of the spool and of the set at a time).

use driftwatch_proto::v1::{Report, ScanStatus};
use prost::Message;

use crate::report_set::{self, DriftSet, Limits, ScanMeta};
use crate::spool::{Record, Spool, SpoolError};

/// The spool and the set state of the reports in it.
#[derive(Debug)]
pub struct Outbox {
    spool: Spool,
    limits: Limits,
    /// The set as the collector has it once every spooled report is applied. `None` after a
    /// start, until the first scan: the first report after a start is always full.
    set: Option<DriftSet>,
    /// Reports known lost (spool recovery, overflow) and not yet told to the collector.
    unreported_lost: u64,
    /// The collector asked for the full set, or the first report is still to come.
    full_wanted: bool,
    /// Seq of the last full report (or part 1 of a split one) spooled.
    last_full_seq: u64,
    /// Highest seq the collector acknowledged (in the spool's current epoch).
    acked: u64,
    /// Status of the last report spooled, to report a change of status even without a change
    /// of the set.
    last_status: Option<(ScanStatus, String)>,
}

/// What one `record_*` call spooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Spooled {
    pub reports: usize,
    /// Pending records dropped because the spool was full (replaced by a full snapshot).
    pub dropped: u64,
}

impl Outbox {
    /// `lost` are the records spool recovery reported lost.
    pub fn new(spool: Spool, limits: Limits, lost: u64) -> Outbox {
        let acked = spool
            .stats()
            .oldest_seq
            .map_or(spool.next_seq() - 1, |s| s - 1);
        Outbox {
            spool,
            limits,
            set: None,
            unreported_lost: lost,
            full_wanted: true,
            last_full_seq: 0,
            acked,
            last_status: None,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.spool.epoch()
    }

    /// The newest seq assigned (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.spool.next_seq() - 1
    }

    pub fn stats(&self) -> crate::spool::Stats {
        self.spool.stats()
    }

    /// Digest of the set after every spooled report, if a scan has run since the start.
    pub fn digest(&self) -> Option<driftwatch_proto::Hash> {
        self.set.as_ref().map(DriftSet::digest)
    }

    /// The result of a completed scan: a delta against the previous set (or the full set when
    /// one is due). Nothing is spooled if neither the set nor the status changed.
    pub fn record_scan(
        &mut self,
        new: DriftSet,
        mut meta: ScanMeta,
    ) -> Result<Spooled, SpoolError> {
        meta.lost_reports = self.unreported_lost;
        if meta.lost_reports > 0 && meta.status == ScanStatus::Complete {
            // The set is complete again (full or delta, its digest is checked), but the reports
            // in between are gone: say so, once.
            meta.reason = format!("{} earlier report(s) were lost", meta.lost_reports);
        }
        let full = self.full_wanted || self.set.is_none();
        let mut reports = match (&self.set, full) {
            (Some(old), false) => report_set::delta_reports(old, &new, &meta, self.limits),
            _ => report_set::full_reports(&new, &meta, self.limits),
        };
        let status = (meta.status, meta.reason.clone());
        if reports.is_empty()
            && (self.last_status.as_ref() != Some(&status) || meta.lost_reports > 0)
        {
            reports.push(report_set::status_report(&new, &meta));
        }
        let spooled = self.spool_reports(reports, &new, full)?;
        self.set = Some(new);
        self.last_status = Some(status);
        Ok(spooled)
    }

    /// A scan that failed: the set is unknown, so it stays as it was; the collector learns the
    /// failure once (while it persists, heartbeats repeat it). Before any scan succeeded there
    /// is no set to report against, and nothing is spooled.
    pub fn record_failure(&mut self, meta: ScanMeta) -> Result<Spooled, SpoolError> {
        let status = (meta.status, meta.reason.clone());
        let Some(set) = self.set.clone() else {
            return Ok(Spooled::default());
        };
        if self.last_status.as_ref() == Some(&status) {
            return Ok(Spooled::default());
        }
        let mut meta = meta;
        meta.lost_reports = self.unreported_lost;
        let r = report_set::status_report(&set, &meta);
        let spooled = self.spool_reports(vec![r], &set, false)?;
        self.last_status = Some(status);
        Ok(spooled)
    }

    /// The collector's digest disagrees: spool the full set, unless a full report is already
    /// on its way (spooled after the last acknowledged report). Before the first scan, the
    /// first report is full anyway.
    pub fn resync(&mut self, now_ms: i64) -> Result<Spooled, SpoolError> {
        self.full_wanted = true;
        if self.last_full_seq > self.acked {
            return Ok(Spooled::default());
        }
        let Some(set) = self.set.clone() else {
            return Ok(Spooled::default());
        };
        let (status, reason) = self
            .last_status
            .clone()
            .unwrap_or((ScanStatus::Complete, String::new()));
        let meta = ScanMeta {
            started_unix_ms: now_ms,
            finished_unix_ms: now_ms,
            status,
            reason,
            lost_reports: self.unreported_lost,
        };
        let reports = report_set::full_reports(&set, &meta, self.limits);
        self.spool_reports(reports, &set, true)
    }

    /// The collector committed everything of `epoch` through `seq`.
    pub fn ack(&mut self, epoch: u64, seq: u64) -> Result<u64, SpoolError> {
        if epoch != self.spool.epoch() || seq <= self.acked {
            return Ok(0);
        }
        let seq = seq.min(self.last_seq());
        let released = self.spool.ack(seq)?;
        self.acked = self.acked.max(seq);
        Ok(released)
    }

    /// Up to `max_records` / about `max_bytes` of pending records with seq > `after`.
    pub fn pending_after(
        &self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, SpoolError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in self.spool.pending() {
            let r = r?;
            if r.seq <= after {
                continue;
            }
            bytes += r.payload.len();
            out.push(r);
            if out.len() >= max_records || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Appends reports (numbering each with the next seq). When the spool is full, every
    /// pending record is replaced by a full snapshot of `set` marked incomplete.
    fn spool_reports(
        &mut self,
        reports: Vec<Report>,
        set: &DriftSet,
        full: bool,
    ) -> Result<Spooled, SpoolError> {
        let n = reports.len();
        for (i, mut r) in reports.into_iter().enumerate() {
            let seq = self.stamp(&mut r);
            match self.spool.append(&r.encode_to_vec()) {
                Ok(s) => debug_assert_eq!(s, seq),
                Err(SpoolError::Full { .. }) => return self.overflow(set),
                Err(e) => return Err(e),
            }
            if full && i == 0 {
                self.last_full_seq = seq;
            }
            if r.lost_reports > 0 {
                self.unreported_lost = 0;
            }
        }
        if full {
            self.full_wanted = false;
        }
        Ok(Spooled {
            reports: n,
            dropped: 0,
        })
    }

    fn stamp(&self, r: &mut Report) -> u64 {
        r.epoch = self.spool.epoch();
        r.seq = self.spool.next_seq();
        r.seq
    }

    /// The spool is full: replace everything pending by the full set, marked incomplete with
    /// the number of reports dropped.
    fn overflow(&mut self, set: &DriftSet) -> Result<Spooled, SpoolError> {
        let pending = self.spool.stats().records;
        let lost = self.unreported_lost + pending;
        let now = crate::time::now_unix_ns() / 1_000_000;
        let meta = ScanMeta {
            started_unix_ms: now,
            finished_unix_ms: now,
            status: ScanStatus::Incomplete,
            reason: format!(
                "the agent's spool was full: {pending} unsent report(s) were replaced by this snapshot"
            ),
            lost_reports: lost,
        };
        let mut reports = report_set::full_reports(set, &meta, self.limits).into_iter();
        let Some(mut first) = reports.next() else {
            return Ok(Spooled::default());
        };
        let seq = self.stamp(&mut first);
        let (s, dropped) = self.spool.replace_all(&first.encode_to_vec())?;
        debug_assert_eq!(s, seq);
        self.last_full_seq = seq;
        self.acked = seq - 1;
        self.unreported_lost = 0;
        let mut n = 1;
        for mut r in reports {
            self.stamp(&mut r);
            // A set larger than the whole spool cannot be held: this fails loudly, and the
            // next scan sends the full set again.
            self.full_wanted = true;
            self.spool.append(&r.encode_to_vec())?;
            n += 1;
        }
        self.full_wanted = false;
        self.last_status = Some((ScanStatus::Incomplete, meta.reason));
        Ok(Spooled {
            reports: n,
            dropped: dropped.records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolLimits;
    use driftwatch_proto::set::file_key;
    use driftwatch_proto::v1::{DriftItem, Violation, drift_item::Item};
    use std::collections::BTreeMap;

    fn set(paths: &[&str]) -> DriftSet {
        set_kind(paths, 1)
    }

    fn set_kind(paths: &[&str], kind: i32) -> DriftSet {
        DriftSet::new(
            paths
                .iter()
                .map(|p| {
                    let i = DriftItem {
                        key: file_key(p.as_bytes()),
                        item: Some(Item::File(Violation {
                            path: p.as_bytes().to_vec(),
                            kind,
                            ..Default::default()
                        })),
                    };
                    (i.key.clone(), i)
                })
                .collect::<BTreeMap<_, _>>(),
        )
    }

    fn open(dir: &std::path::Path, limits: SpoolLimits) -> Outbox {
        open_with(dir, limits, Limits::default())
    }

    fn open_with(dir: &std::path::Path, limits: SpoolLimits, report: Limits) -> Outbox {
        let (spool, rec) = Spool::open(dir, limits).unwrap();
        Outbox::new(spool, report, rec.records_lost)
    }

    fn reports(o: &Outbox) -> Vec<Report> {
        o.pending_after(0, usize::MAX, usize::MAX)
            .unwrap()
            .iter()
            .map(|r| Report::decode(r.payload.as_slice()).unwrap())
            .collect()
    }

    fn meta() -> ScanMeta {
        ScanMeta::complete(1, 2)
    }

    #[test]
    fn first_report_full_then_deltas_then_nothing() {
        let t = tempfile::tempdir().unwrap();
        let mut o = open(t.path(), SpoolLimits::default());
        o.record_scan(set(&["/a"]), meta()).unwrap();
        o.record_scan(set(&["/a", "/b"]), meta()).unwrap();
        assert_eq!(
            o.record_scan(set(&["/a", "/b"]), meta()).unwrap().reports,
            0
        );
        let r = reports(&o);
        assert_eq!(r.len(), 2);
        assert!(r[0].full && !r[1].full);
        assert_eq!((r[0].seq, r[1].seq), (1, 2));
        assert!(r.iter().all(|r| r.epoch == o.epoch()));
        assert_eq!(r[1].set_digest, set(&["/a", "/b"]).digest().to_vec());

        o.ack(o.epoch(), 1).unwrap();
        assert_eq!(reports(&o).len(), 1);
        assert_eq!(
            o.ack(o.epoch() ^ 1, 2).unwrap(),
            0,
            "another epoch's ack is ignored"
        );
        assert_eq!(reports(&o).len(), 1);
    }

    #[test]
    fn restart_sends_full_again_and_keeps_pending() {
        let t = tempfile::tempdir().unwrap();
        {
            let mut o = open(t.path(), SpoolLimits::default());
            o.record_scan(set(&["/a"]), meta()).unwrap();
            o.record_scan(set(&["/b"]), meta()).unwrap();
        }
        let mut o = open(t.path(), SpoolLimits::default());
        o.record_scan(set(&["/b"]), meta()).unwrap();
        let r = reports(&o);
        assert_eq!(r.len(), 3);
        assert!(r[2].full, "the first report after a start is full");
        assert_eq!(r[2].seq, 3);
    }

    #[test]
    fn recovery_losses_go_into_the_next_report_once() {
        let t = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(t.path(), SpoolLimits::default()).unwrap();
        let mut o = Outbox::new(spool, Limits::default(), 3);
        o.record_scan(set(&["/a"]), meta()).unwrap();
        assert_eq!(
            o.record_scan(set(&["/a"]), meta()).unwrap().reports,
            1,
            "status changes back"
        );
        o.record_scan(set(&["/a", "/b"]), meta()).unwrap();
        let r = reports(&o);
        assert_eq!(r[0].lost_reports, 3);
        assert!(r[0].status_reason.contains("3 earlier report(s) were lost"));
        assert_eq!((r[1].lost_reports, r[1].status_reason.as_str()), (0, ""));
        assert_eq!(r[2].lost_reports, 0);
    }

    #[test]
    fn resync_spools_one_full_report() {
        let t = tempfile::tempdir().unwrap();
        let mut o = open(t.path(), SpoolLimits::default());
        o.record_scan(set(&["/a"]), meta()).unwrap();
        o.ack(o.epoch(), 1).unwrap();
        o.record_scan(set(&["/a", "/b"]), meta()).unwrap();
        o.ack(o.epoch(), 2).unwrap();
        assert_eq!(o.resync(5).unwrap().reports, 1);
        assert_eq!(
            o.resync(5).unwrap().reports,
            0,
            "a full report is already pending"
        );
        let r = reports(&o);
        assert_eq!(r.len(), 1);
        assert!(r[0].full && r[0].upserts.len() == 2);
        o.ack(o.epoch(), 3).unwrap();
        assert_eq!(
            o.resync(6).unwrap().reports,
            1,
            "acked: a new resync gets a new full"
        );
    }

    #[test]
    fn failure_reported_once_then_recovery() {
        let t = tempfile::tempdir().unwrap();
        let mut o = open(t.path(), SpoolLimits::default());
        let failed = ScanMeta {
            status: ScanStatus::Incomplete,
            reason: "baseline expired".into(),
            ..meta()
        };
        assert_eq!(
            o.record_failure(failed.clone()).unwrap().reports,
            0,
            "no set yet"
        );
        o.record_scan(set(&["/a"]), meta()).unwrap();
        assert_eq!(o.record_failure(failed.clone()).unwrap().reports, 1);
        assert_eq!(o.record_failure(failed).unwrap().reports, 0);
        assert_eq!(
            o.record_scan(set(&["/a"]), meta()).unwrap().reports,
            1,
            "complete again"
        );
        let r = reports(&o);
        assert_eq!(r[1].status, ScanStatus::Incomplete as i32);
        assert_eq!(r[2].status, ScanStatus::Complete as i32);
        assert!(r[2].upserts.is_empty());
    }

    #[test]
    fn full_spool_is_replaced_by_an_incomplete_snapshot() {
        let t = tempfile::tempdir().unwrap();
        let limits = SpoolLimits::new(64 << 10, 8 << 10, 4096).unwrap();
        let report = Limits {
            max_items: 2000,
            max_bytes: 4 << 10,
        };
        let mut o = open_with(t.path(), limits, report);
        let paths: Vec<String> = (0..50)
            .map(|i| format!("/file/{i:04}/{}", "x".repeat(100)))
            .collect();
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let mut dropped = 0;
        for i in 0..30 {
            // Every scan changes every item: each delta is as large as the set.
            dropped += o
                .record_scan(set_kind(&refs, 1 + i % 2), meta())
                .unwrap()
                .dropped;
        }
        assert!(dropped > 0, "the spool overflowed");
        let r = reports(&o);
        let first = &r[0];
        assert!(first.full, "after an overflow, a full snapshot leads");
        assert!(r.iter().all(|r| r.encoded_len() < 8 << 10));
        // The snapshot that replaced the pending records is marked, and counts what it dropped.
        let all: Vec<Report> = r.clone();
        let snapshot = all
            .iter()
            .find(|r| r.full && r.status == ScanStatus::Incomplete as i32)
            .unwrap();
        assert!(snapshot.lost_reports > 0);
        assert!(snapshot.status_reason.contains("spool was full"));
        // Applying what is pending gives the newest set.
        let mut state: BTreeMap<Vec<u8>, driftwatch_proto::Hash> = BTreeMap::new();
        for r in &r {
            if r.full {
                state.clear();
            }
            for i in &r.upserts {
                state.insert(i.key.clone(), driftwatch_proto::set::item_hash(i));
            }
            for k in &r.removed_keys {
                state.remove(k);
            }
        }
        assert_eq!(
            driftwatch_proto::set::set_digest(&state).to_vec(),
            r.last().unwrap().set_digest
        );
        assert_eq!(state.len(), 50);
    }
}
