//! The reconciler: a task that periodically assesses every live host and records its lifecycle
//! transitions (clean, drifted, flagged, silent and back; replaced when a successor enrolled).
//!
//! One round: [`gather`] reads a [`Snapshot`] of the fleet (hosts, lifecycle states, the
//! registry, unexpired acknowledgements, the open drift of every drifted host), [`assess`]
//! turns it into a [`Verdict`] per host — purely: the flagging policy (`crate::flagging`) on
//! each host's facts, with acknowledged items and the image's likely defects
//! (`crate::registry`) left out — and [`plan`] into the transitions to record. Each is recorded
//! with compare-and-set (`LifecycleStore::record_transition`), so a transition the dispatcher
//! or an operator made in the meantime wins and the reconciler simply sees it next round.
//!
//! The `explain` endpoint and the image views use the same [`gather`] and [`assess`], so what
//! they show is what the reconciler acts on.
//!
//! What it must never do: trigger rebuilds (the dispatcher, `crate::actions`, takes flagged
//! hosts) or move a host out of `rebuild_requested` other than to `replaced`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use driftwatch_proto::v1::{ViolationClass, drift_item};
use tokio::sync::watch;

use crate::flagging::{self, Exclusion, FlaggingPolicy, HostFacts, OpenItem, Reason};
use crate::http::convert::{file_kind_name, package_kind_name};
use crate::lifecycle::{self, Assessment, Event, Lifecycle};
use crate::registry::{self, ImageAnalysis, ImageMember};
use crate::storage::{
    Acknowledgement, AuditEntry, HostLifecycle, HostSummary, RegisteredBaseline, Storage,
    StorageError, StreamPosition, TransitionRecord, ViolationQuery, ViolationRecord,
};

/// Default time between rounds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// Most open items read per host per round (a host with more is judged on these).
pub const MAX_OPEN_PER_HOST: u32 = 10_000;

/// What the reconciler (and `explain`, and the image views) judge by.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub flagging: FlaggingPolicy,
    /// A host not heard from for longer than this is `silent` (3 heartbeat intervals and the
    /// heartbeat write interval).
    pub silent_after: Duration,
    /// A path drifted on more than this share of an image's hosts (and on at least
    /// [`registry::MIN_DEFECT_HOSTS`]) is a likely image defect.
    pub image_defect_ratio: f64,
    /// Time between rounds.
    pub interval: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            flagging: FlaggingPolicy::default(),
            silent_after: crate::host_state::DEFAULT_SILENT_AFTER,
            image_defect_ratio: registry::DEFAULT_IMAGE_DEFECT_RATIO,
            interval: DEFAULT_INTERVAL,
        }
    }
}

/// The fleet as one round sees it.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub now_ms: i64,
    pub hosts: Vec<HostSummary>,
    pub states: HashMap<String, HostLifecycle>,
    /// The newest registered baseline per image id.
    pub registered: HashMap<String, RegisteredBaseline>,
    pub acks: Vec<Acknowledgement>,
    /// Open drift of hosts that have any.
    pub open: HashMap<String, Arc<Vec<ViolationRecord>>>,
}

/// Reads a snapshot at `now_ms`. With `image`, only that image's hosts are read in full (the
/// rest of the fleet is still listed, for replacement matching).
pub async fn gather(
    store: &dyn Storage,
    now_ms: i64,
    image: Option<&str>,
) -> Result<Snapshot, StorageError> {
    gather_cached(store, now_ms, image, &OpenCache::default()).await
}

/// What a host's stored open drift is read at: every write to a host's violations is a report
/// apply, which moves its stream position (a new seq, or a new epoch) and, with it, usually its
/// set digest and open counts. While all of them stay, the open rows read before are still the
/// stored ones.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OpenStamp {
    position: StreamPosition,
    counts: OpenCounts,
}

/// How many items a host has open, by severity, and how many of them are packages.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OpenCounts {
    by_severity: [u64; 6],
    packages: u64,
}

impl OpenStamp {
    /// Whether rows held at `self` may stand for the stored ones at `listed`: the same stamp,
    /// or a later report of the same epoch. The ingest moves held rows only after a commit, so
    /// rows held past a round's listing are the stored rows of a later moment (a report
    /// committed between the listing and the lookup), not a guess.
    fn covers(&self, listed: &OpenStamp) -> bool {
        self == listed || self.is_after(listed)
    }

    /// A later report of the same epoch than `other`.
    fn is_after(&self, other: &OpenStamp) -> bool {
        self.position.epoch == other.position.epoch
            && self.position.last_seq > other.position.last_seq
    }

    fn of(h: &HostSummary) -> Self {
        OpenStamp {
            position: h.position.clone(),
            counts: OpenCounts {
                by_severity: h.open_by_severity,
                packages: h.open_packages,
            },
        }
    }
}

/// Marks an assessment running (see [`reconcile_round`]) until dropped.
struct AssessGuard(Arc<std::sync::atomic::AtomicBool>);

impl AssessGuard {
    /// The guard, or `None` while another one is held.
    fn take(flag: &Arc<std::sync::atomic::AtomicBool>) -> Option<AssessGuard> {
        flag.compare_exchange(
            false,
            true,
            std::sync::atomic::Ordering::AcqRel,
            std::sync::atomic::Ordering::Acquire,
        )
        .ok()
        .map(|_| AssessGuard(Arc::clone(flag)))
    }
}

impl Drop for AssessGuard {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// A host's open rows and the stamp they are the stored ones at.
#[derive(Debug)]
struct Held {
    stamp: OpenStamp,
    rows: Arc<Vec<ViolationRecord>>,
}

/// Open drift of earlier rounds, per host, with the [`OpenStamp`] it is the stored drift at.
/// The reconciler keeps one across rounds and reads a host's open rows again only when its
/// stamp moved. The ingest shares it ([`OpenCache::advance`]): a report this collector applied
/// moves the rows it holds for that host along with the stored ones, so a host of a busy fleet
/// whose drift churns costs its rounds no reads either.
#[derive(Debug, Default)]
pub struct OpenCache {
    hosts: std::sync::Mutex<HashMap<String, Held>>,
    /// Zero, or how long a round may spread its reads over.
    read_spread: Duration,
    /// Hosts read from storage so far.
    reads: std::sync::atomic::AtomicU64,
    /// Set while a round's assessment runs.
    assessing: Arc<std::sync::atomic::AtomicBool>,
    /// What earlier rounds' assessments worked out (taken while one runs).
    memo: std::sync::Mutex<RoundMemo>,
}

impl OpenCache {
    /// The background reconciler's cache: a round spreads its reads evenly over up to half the
    /// `interval` (it never waits once it is behind). Its reads are background work; read in
    /// one burst, every host that reported since the last round, they held up the report
    /// batches committing alongside (issue 4: the p99 acknowledgement latency).
    pub fn background(interval: Duration) -> Self {
        OpenCache {
            read_spread: interval / 2,
            ..OpenCache::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        // Nothing is changed while it is held (rows are replayed outside it), so a panic of
        // a holder leaves the map as it was.
        self.hosts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `held` for `host_id` unless rows of a later report are held already (the ingest
    /// moved them along, or a round read them, while `held` was being made).
    fn keep(&self, host_id: &str, held: Held) {
        let mut map = self.lock();
        match map.get_mut(host_id) {
            Some(x) if x.stamp.covers(&held.stamp) => {}
            Some(x) => *x = held,
            None => {
                map.insert(host_id.to_owned(), held);
            }
        }
    }

    /// How many hosts' open rows were read from storage so far.
    pub fn reads(&self) -> u64 {
        self.reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether rows are held for `host_id`.
    pub fn holds(&self, host_id: &str) -> bool {
        self.lock().contains_key(host_id)
    }

    /// Whether [`OpenCache::advance`] may use `report` of `host_id`, so the ingest keeps a copy
    /// of it until it is applied: rows are held for the host, or the report opens items (if
    /// the host had none open, they are its rows).
    pub fn wants(&self, host_id: &str, report: &driftwatch_proto::v1::Report) -> bool {
        !report.upserts.is_empty() || self.holds(host_id)
    }

    /// Moves the rows held for `host_id` by `report`, which storage applied with `outcome`
    /// after the position they are held at, as the storage's apply does (upserts before
    /// removals; a full report resolves what it does not list; first and last seen at
    /// `received_ms`). Called in the order the reports were applied. A report that does not
    /// follow the held position directly (a gap, a new epoch, a report another replica
    /// applied in between), a digest mismatch, rows that do not come out as the set the
    /// report's digest names, or more than [`MAX_OPEN_PER_HOST`] rows drop the host instead:
    /// its next round reads it. A report at or before the held position (a round read the
    /// rows after it committed) leaves them as they are.
    ///
    /// Rows of a host that is not held start from its report when the host had no open item
    /// before it (`from_empty`): a fleet's new hosts, or a clean host that drifted, are held
    /// from their first drift on, and no round reads them (each read is a query of all the
    /// host's open rows; a rollout of hundreds of new hosts made one round read them all).
    pub fn advance(
        &self,
        host_id: &str,
        report: driftwatch_proto::v1::Report,
        received_ms: i64,
        outcome: &crate::storage::ApplyOutcome,
    ) {
        // Applied with the digest the report names: whether the host had no open item before.
        let applied = match *outcome {
            crate::storage::ApplyOutcome::Applied {
                digest_matches: true,
                from_empty,
            } => Some(from_empty),
            _ => None,
        };
        // Out of the map while it is replayed: the other lane's replays and a round's reads
        // wait only for the map, not for this host's rows to be replayed and hashed. Not put
        // back means dropped; rows a round read meanwhile stay unless these are later.
        let taken = self.lock().remove(host_id);
        let mut held = match taken {
            Some(held) => {
                let pos = &held.stamp.position;
                if report.epoch == pos.epoch && report.seq <= pos.last_seq {
                    self.keep(host_id, held);
                    return;
                }
                let follows = report.epoch == pos.epoch && report.seq == pos.last_seq + 1;
                if !follows || applied.is_none() {
                    return;
                }
                held
            }
            // Its stamp is set below, once the rows are checked against the digest.
            None if applied == Some(true) && !report.upserts.is_empty() => Held {
                stamp: OpenStamp {
                    position: StreamPosition {
                        epoch: 0,
                        last_seq: 0,
                        set_digest: [0; 32],
                    },
                    counts: counts_of(&[]),
                },
                rows: Arc::new(Vec::new()),
            },
            None => return,
        };
        let (epoch, seq) = (report.epoch, report.seq);
        let Ok(digest) = <[u8; 32]>::try_from(report.set_digest.as_slice()) else {
            return;
        };
        let rows = Arc::make_mut(&mut held.rows);
        apply_to_rows(rows, host_id, report, received_ms);
        // The rows must be the set the stored digest names (a replay that differs from the
        // storage's apply, or rows cut at MAX_OPEN_PER_HOST): else the next round reads them.
        if rows.len() > MAX_OPEN_PER_HOST as usize || digest_of(rows) != digest {
            return;
        }
        held.stamp = OpenStamp {
            position: StreamPosition {
                epoch,
                last_seq: seq,
                set_digest: digest,
            },
            counts: counts_of(rows),
        };
        self.keep(host_id, held);
    }

    /// Hosts whose rows are held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// [`OpenCache::advance`]'s replay of one applied report on a host's open rows (the report's
/// items are moved into them).
fn apply_to_rows(
    rows: &mut Vec<ViolationRecord>,
    host_id: &str,
    report: driftwatch_proto::v1::Report,
    received_ms: i64,
) {
    let driftwatch_proto::v1::Report {
        full,
        upserts,
        removed_keys,
        ..
    } = report;
    // Where each upsert and removal lands among the rows as they were.
    let (targets, removed): (Vec<Option<usize>>, Vec<usize>) = {
        let at: HashMap<&[u8], usize> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.key.as_slice(), i))
            .collect();
        (
            upserts
                .iter()
                .map(|u| at.get(u.key.as_slice()).copied())
                .collect(),
            removed_keys
                .iter()
                .filter_map(|k| at.get(k.as_slice()).copied())
                .collect(),
        )
    };
    let mut keep = vec![!full; rows.len()];
    // Keys this report opens (listed twice: the second is an update).
    let mut opened: HashMap<Vec<u8>, usize> = HashMap::new();
    for (item, target) in upserts.into_iter().zip(targets) {
        match target.or_else(|| opened.get(&item.key).copied()) {
            Some(i) => {
                if let (Some(r), Some(k)) = (rows.get_mut(i), keep.get_mut(i)) {
                    r.item = item;
                    r.last_seen_ms = received_ms;
                    *k = true;
                }
            }
            None => {
                opened.insert(item.key.clone(), rows.len());
                rows.push(ViolationRecord {
                    host_id: host_id.to_owned(),
                    key: item.key.clone(),
                    item,
                    first_seen_ms: received_ms,
                    last_seen_ms: received_ms,
                    resolved_ms: None,
                });
                keep.push(true);
            }
        }
    }
    // Removals after upserts: a key in both ends resolved.
    let opened_removed = removed_keys.iter().filter_map(|k| opened.get(k).copied());
    for i in removed.into_iter().chain(opened_removed) {
        if let Some(k) = keep.get_mut(i) {
            *k = false;
        }
    }
    let mut kept = keep.into_iter();
    rows.retain(|_| kept.next().unwrap_or(false));
}

/// The set digest of a host's open rows (`driftwatch_proto::set::set_digest`).
fn digest_of(rows: &[ViolationRecord]) -> [u8; 32] {
    let mut hashed: Vec<(&[u8], [u8; 32])> = rows
        .iter()
        .map(|r| (r.key.as_slice(), driftwatch_proto::set::item_hash(&r.item)))
        .collect();
    hashed.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut d = driftwatch_proto::set::SetDigest::new();
    for (key, hash) in &hashed {
        // A key twice (it cannot be: rows are by key) makes the digest wrong, not a panic.
        let _ = d.push(key, hash);
    }
    d.finish()
}

/// The open counts storage keeps for a host, of its rows.
fn counts_of(rows: &[ViolationRecord]) -> OpenCounts {
    let (by_severity, packages) =
        crate::storage::open_counts(rows.iter().map(|r| match &r.item.item {
            Some(drift_item::Item::File(f)) => (f.severity, false),
            Some(drift_item::Item::Package(p)) => (p.severity, true),
            None => (0, false),
        }));
    OpenCounts {
        by_severity,
        packages,
    }
}

/// [`gather`], reusing the open rows `cache` holds for hosts at the stamp listed or a later
/// one ([`OpenStamp::covers`]) and leaving in it the rows of this snapshot (hosts without open
/// drift dropped).
pub async fn gather_cached(
    store: &dyn Storage,
    now_ms: i64,
    image: Option<&str>,
    cache: &OpenCache,
) -> Result<Snapshot, StorageError> {
    let hosts = store.list_hosts().await?;
    let states = store
        .lifecycle_states()
        .await?
        .into_iter()
        .map(|s| (s.host_id.clone(), s))
        .collect();
    let mut registered = HashMap::new();
    // Newest first per image id: the first one seen is the registered one.
    for b in store.registered_baselines().await? {
        registered.entry(b.image_id.clone()).or_insert(b);
    }
    let acks = store.acknowledgements(None, now_ms).await?;
    let mut open = HashMap::new();
    let mut stale = Vec::new();
    {
        let held = cache.lock();
        for h in &hosts {
            let has_open = h.open_by_severity.iter().any(|&n| n > 0) || h.open_packages > 0;
            if !has_open || image.is_some_and(|i| h.hello.image_id != i) {
                continue;
            }
            let stamp = OpenStamp::of(h);
            match held.get(&h.host_id) {
                Some(x) if x.stamp.covers(&stamp) => {
                    open.insert(h.host_id.clone(), Arc::clone(&x.rows));
                }
                _ => stale.push(h),
            }
        }
    }
    let reused = open.len();
    let mut unsettled = 0usize;
    let started = tokio::time::Instant::now();
    let n = u32::try_from(stale.len()).unwrap_or(u32::MAX);
    for (i, h) in (1..).zip(stale) {
        let (rows, stamp) = read_open(store, &h.host_id).await?;
        cache
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rows = Arc::new(rows);
        match stamp {
            Some(stamp) => cache.keep(
                &h.host_id,
                Held {
                    stamp,
                    rows: Arc::clone(&rows),
                },
            ),
            // A report committed during the read: the rows serve this round; the next round
            // reads the host again unless the ingest's replays hold it by then.
            None => unsettled += 1,
        }
        open.insert(h.host_id.clone(), rows);
        if !cache.read_spread.is_zero() && i < n {
            // The i-th of n reads is due to end by i/n of the spread.
            tokio::time::sleep_until(
                started + cache.read_spread.mul_f64(f64::from(i) / f64::from(n)),
            )
            .await;
        }
    }
    if image.is_none() {
        // Hosts without open drift (or gone) are not held.
        cache.lock().retain(|h, _| open.contains_key(h));
    }
    tracing::debug!(
        hosts = hosts.len(),
        reused,
        read = open.len() - reused,
        unsettled,
        "reconcile round: open rows"
    );
    Ok(Snapshot {
        now_ms,
        hosts,
        states,
        registered,
        acks,
        open,
    })
}

/// A host's open rows, with the stamp they are the stored rows at when no report committed
/// while they were read (the host's stamp was the same before and after; positions only move
/// forward, so an unchanged one means no apply in between). The stamp is never the round's
/// listing: reads are spread over seconds, and rows read later than the stamp they are held at
/// cannot follow the ingest's next report, so the host was read again every round.
async fn read_open(
    store: &dyn Storage,
    host_id: &str,
) -> Result<(Vec<ViolationRecord>, Option<OpenStamp>), StorageError> {
    let before = store.host(host_id).await?.map(|h| OpenStamp::of(&h));
    let rows = store
        .search_violations(ViolationQuery {
            host_id: Some(host_id.to_owned()),
            limit: MAX_OPEN_PER_HOST,
            ..ViolationQuery::default()
        })
        .await?;
    let after = store.host(host_id).await?.map(|h| OpenStamp::of(&h));
    let stamp = before.filter(|b| after.as_ref() == Some(b));
    Ok((rows, stamp))
}

/// The judgement on one host.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub host_id: String,
    pub state: Lifecycle,
    pub since_ms: i64,
    /// `None` when the host is not assessed: revoked, awaiting its rebuild, terminal, or
    /// enrolled and never heard from within the silence threshold.
    pub assessment: Option<Assessment>,
    /// Why it is flagged (empty: it is not).
    pub reasons: Vec<Reason>,
    /// Its open items, each marked when it does not count.
    pub items: Arc<Vec<OpenItem>>,
    /// How long since it was last heard from (its enrollment when never).
    pub silent_for_ms: i64,
    /// For a host awaiting its rebuild: the successor that replaces it.
    pub successor: Option<String>,
}

/// Open items of a host as the policy sees them, with exclusions applied.
fn open_items(
    rows: &[ViolationRecord],
    acks: &[&Acknowledgement],
    defects: &BTreeSet<Vec<u8>>,
) -> Vec<OpenItem> {
    let acks: HashMap<&[u8], &Acknowledgement> =
        acks.iter().map(|a| (a.key.as_slice(), *a)).collect();
    rows.iter()
        .map(|v| {
            let mut item = OpenItem {
                path: None,
                package: None,
                kind: "",
                severity: 0,
                unexplained: false,
                first_seen_ms: v.first_seen_ms,
                excluded: None,
            };
            match &v.item.item {
                Some(drift_item::Item::File(f)) => {
                    item.path = Some(f.path.clone());
                    item.kind = file_kind_name(f.kind);
                    item.severity = f.severity;
                    item.unexplained = f.class == ViolationClass::Unexplained as i32;
                }
                Some(drift_item::Item::Package(p)) => {
                    item.package = Some(if p.arch.is_empty() {
                        p.name.clone()
                    } else {
                        format!("{}:{}", p.name, p.arch)
                    });
                    item.kind = package_kind_name(p.kind);
                    item.severity = p.severity;
                }
                None => {}
            }
            // The item's hash only where an acknowledgement names its key: hashing every
            // open item of the fleet was about a fifth of a round's assessment.
            if let Some(a) = acks.get(v.key.as_slice())
                && a.item_hash == driftwatch_proto::set::item_hash(&v.item)
            {
                item.excluded = Some(Exclusion::Acknowledged {
                    by: a.actor.clone(),
                    reason: a.reason.clone(),
                    until_ms: a.expires_ms,
                });
            } else if item.path.as_ref().is_some_and(|p| defects.contains(p)) {
                item.excluded = Some(Exclusion::ImageDefect);
            }
            item
        })
        .collect()
}

fn last_heard_ms(h: &HostSummary) -> i64 {
    h.last_seen_ms
        .into_iter()
        .chain(h.last_report_ms)
        .max()
        .unwrap_or(h.enrolled_ms)
}

fn is_live(h: &HostSummary, state: Lifecycle) -> bool {
    !h.revoked && !state.is_terminal()
}

fn state_of(snap: &Snapshot, host_id: &str, enrolled_ms: i64) -> (Lifecycle, i64) {
    snap.states
        .get(host_id)
        .map_or((Lifecycle::Enrolled, enrolled_ms), |s| {
            (s.state, s.since_ms)
        })
}

/// The image members (live hosts on `image_id`) of a snapshot.
fn members(snap: &Snapshot, image_id: &str) -> Vec<ImageMember> {
    snap.hosts
        .iter()
        .filter(|h| h.hello.image_id == image_id)
        .filter(|h| is_live(h, state_of(snap, &h.host_id, h.enrolled_ms).0))
        .map(|h| {
            let rows = snap.open.get(&h.host_id).map_or(&[][..], |r| r.as_slice());
            ImageMember {
                host_id: h.host_id.clone(),
                baseline_root: h.hello.baseline_root.clone(),
                drifted_paths: rows
                    .iter()
                    .filter_map(|v| match &v.item.item {
                        Some(drift_item::Item::File(f)) => Some(f.path.clone()),
                        _ => None,
                    })
                    .collect(),
                drifted: !rows.is_empty(),
            }
        })
        .collect()
}

/// Consensus, outliers and likely defects of one image.
pub fn analyse(snap: &Snapshot, policy: &Policy, image_id: &str) -> ImageAnalysis {
    registry::analyse_image(
        &members(snap, image_id),
        snap.registered
            .get(image_id)
            .map(|b| b.merkle_root.as_slice()),
        policy.image_defect_ratio,
    )
}

/// Judges every host of the snapshot (pure).
pub fn assess(snap: &Snapshot, policy: &Policy) -> Vec<Verdict> {
    assess_with(snap, policy, &mut RoundMemo::default())
}

/// What earlier rounds of the reconciler worked out per host, kept while the host's open rows
/// stay the same (the same allocation: the ingest replaces or moves a host's rows whenever
/// they change, see [`OpenCache::advance`]): its drifted paths' hashes, and its open items as
/// the policy sees them with the acknowledgements and image defects they were judged with.
/// A round counts every image's drifted paths to find its defects and marks every open item;
/// doing both once per change, not once per round, is most of a round's assessment for a
/// fleet whose hosts mostly do not report new drift between two rounds.
#[derive(Debug, Default)]
struct RoundMemo {
    /// One seed for all of them, so equal paths hash equal across hosts and rounds.
    hasher: foldhash::fast::RandomState,
    hosts: HashMap<String, HostMemo>,
    /// Per image, the defects of the last round (shared, so an unchanged set is one pointer).
    defects: HashMap<String, Arc<BTreeSet<Vec<u8>>>>,
}

/// An image member as its defects are counted: its host id and open rows.
type Member<'a> = (&'a str, Option<&'a Arc<Vec<ViolationRecord>>>);

#[derive(Debug)]
struct HostMemo {
    /// The rows. Weak: a held reference would make the ingest's next move of the rows copy
    /// them (`Arc::make_mut`); a weak one keeps only the address from being reused.
    rows: std::sync::Weak<Vec<ViolationRecord>>,
    /// Per file row: its path's hash and its index in the rows.
    hashes: Vec<(u64, usize)>,
    items: Option<JudgedItems>,
}

#[derive(Debug)]
struct JudgedItems {
    acks: Vec<Acknowledgement>,
    defects: Arc<BTreeSet<Vec<u8>>>,
    items: Arc<Vec<OpenItem>>,
}

impl RoundMemo {
    /// `host_id`'s memo for `rows`, its open rows (started afresh when they changed).
    fn host(&mut self, host_id: &str, rows: &Arc<Vec<ViolationRecord>>) -> &mut HostMemo {
        use std::hash::BuildHasher;
        let hasher = &self.hasher;
        let fresh = || HostMemo {
            rows: Arc::downgrade(rows),
            hashes: rows
                .iter()
                .enumerate()
                .filter_map(|(i, v)| match &v.item.item {
                    Some(drift_item::Item::File(f)) => Some((hasher.hash_one(&f.path), i)),
                    _ => None,
                })
                .collect(),
            items: None,
        };
        self.hosts
            .entry(host_id.to_owned())
            .and_modify(|e| {
                if !std::ptr::eq(e.rows.as_ptr(), Arc::as_ptr(rows)) {
                    *e = fresh();
                }
            })
            .or_insert_with(fresh)
    }

    /// The defects of one image whose live members are `members` (host id and open rows):
    /// counted by path hash, then, for the few hashes on enough hosts, by path (two paths of
    /// one hash are told apart there, so the result is [`registry::defects_of`]'s). The same
    /// set as the last round's is the same pointer.
    fn defects<'a>(
        &mut self,
        image_id: &str,
        members: &[Member<'a>],
        ratio: f64,
    ) -> Arc<BTreeSet<Vec<u8>>> {
        let mut counts: foldhash::HashMap<u64, usize> = foldhash::HashMap::default();
        for (host, rows) in members {
            if let Some(rows) = *rows {
                for (h, _) in &self.host(host, rows).hashes {
                    *counts.entry(*h).or_default() += 1;
                }
            }
        }
        let candidates: HashSet<u64> = counts
            .into_iter()
            .filter(|(_, n)| registry::is_defect(*n, members.len(), ratio))
            .map(|(h, _)| h)
            .collect();
        let mut set = BTreeSet::new();
        if !candidates.is_empty() {
            let mut paths: Vec<Vec<&'a [u8]>> = Vec::with_capacity(members.len());
            for (host, rows) in members {
                let mut mine = Vec::new();
                if let Some(rows) = *rows {
                    for (h, i) in &self.host(host, rows).hashes {
                        if candidates.contains(h)
                            && let Some(drift_item::Item::File(f)) = &rows[*i].item.item
                        {
                            mine.push(f.path.as_slice());
                        }
                    }
                }
                paths.push(mine);
            }
            set = registry::defects_of(paths, ratio)
                .into_iter()
                .map(|d| d.path)
                .collect();
        }
        match self.defects.get(image_id) {
            Some(last) if **last == set => Arc::clone(last),
            _ => {
                let set = Arc::new(set);
                self.defects.insert(image_id.to_owned(), Arc::clone(&set));
                set
            }
        }
    }

    /// `host_id`'s open items ([`open_items`]), the last round's while its rows, its
    /// acknowledgements and its image's defects are the same.
    fn items(
        &mut self,
        host_id: &str,
        rows: &Arc<Vec<ViolationRecord>>,
        acks: &[&Acknowledgement],
        defects: &Arc<BTreeSet<Vec<u8>>>,
    ) -> Arc<Vec<OpenItem>> {
        let memo = self.host(host_id, rows);
        if let Some(j) = &memo.items
            && Arc::ptr_eq(&j.defects, defects)
            && j.acks.iter().eq(acks.iter().copied())
        {
            return Arc::clone(&j.items);
        }
        let items = Arc::new(open_items(rows, acks, defects));
        memo.items = Some(JudgedItems {
            acks: acks.iter().map(|a| (*a).clone()).collect(),
            defects: Arc::clone(defects),
            items: Arc::clone(&items),
        });
        items
    }
}

/// [`assess`] with what earlier rounds worked out ([`RoundMemo`]).
fn assess_with(snap: &Snapshot, policy: &Policy, memo: &mut RoundMemo) -> Vec<Verdict> {
    let now = snap.now_ms;
    let mut acks: HashMap<&str, Vec<&Acknowledgement>> = HashMap::new();
    for a in &snap.acks {
        acks.entry(a.host_id.as_str()).or_default().push(a);
    }
    // Each image's live hosts, the members its defects are counted over.
    let mut live: HashMap<&str, Vec<Member<'_>>> = HashMap::new();
    for h in &snap.hosts {
        if !h.hello.image_id.is_empty() && is_live(h, state_of(snap, &h.host_id, h.enrolled_ms).0) {
            live.entry(h.hello.image_id.as_str())
                .or_default()
                .push((h.host_id.as_str(), snap.open.get(&h.host_id)));
        }
    }
    let defects: HashMap<&str, Arc<BTreeSet<Vec<u8>>>> = live
        .iter()
        .map(|(i, members)| (*i, memo.defects(i, members, policy.image_defect_ratio)))
        .collect();
    // Hosts and images gone, or without open drift, are forgotten.
    let listed: HashSet<&str> = snap.hosts.iter().map(|h| h.host_id.as_str()).collect();
    memo.hosts
        .retain(|h, _| snap.open.contains_key(h) && listed.contains(h.as_str()));
    memo.defects.retain(|i, _| defects.contains_key(i.as_str()));
    let no_defects = Arc::new(BTreeSet::new());
    let no_items = Arc::new(Vec::new());
    let silent_after_ms = i64::try_from(policy.silent_after.as_millis()).unwrap_or(i64::MAX);
    let successors = match_successors(snap);

    snap.hosts
        .iter()
        .map(|h| {
            let (state, since_ms) = state_of(snap, &h.host_id, h.enrolled_ms);
            let items = match snap.open.get(&h.host_id) {
                Some(rows) => memo.items(
                    &h.host_id,
                    rows,
                    acks.get(h.host_id.as_str()).map_or(&[][..], Vec::as_slice),
                    defects
                        .get(h.hello.image_id.as_str())
                        .unwrap_or(&no_defects),
                ),
                None => Arc::clone(&no_items),
            };
            let facts = HostFacts {
                agent_version: h.hello.agent_version.clone(),
                image_id: h.hello.image_id.clone(),
                baseline_root: h.hello.baseline_root.clone(),
                registered_root: snap
                    .registered
                    .get(&h.hello.image_id)
                    .map(|b| b.merkle_root.to_vec()),
                last_heard_ms: last_heard_ms(h),
                open: items,
            };
            let reasons = flagging::evaluate(&policy.flagging, &facts, now);
            let silent_for_ms = now.saturating_sub(facts.last_heard_ms);
            let silent = silent_for_ms > silent_after_ms;
            let assessment = if h.revoked || !state.is_assessed() {
                None
            } else if !reasons.is_empty() {
                Some(Assessment::Flagged)
            } else if silent {
                Some(Assessment::Silent)
            } else if h.last_report_ms.is_none() {
                None
            } else if !facts.open.is_empty() {
                Some(Assessment::Drifted)
            } else {
                Some(Assessment::Clean)
            };
            Verdict {
                host_id: h.host_id.clone(),
                state,
                since_ms,
                assessment,
                reasons,
                items: facts.open,
                silent_for_ms,
                successor: successors.get(&h.host_id).cloned(),
            }
        })
        .collect()
}

/// Predecessor → successor: a host awaiting its rebuild is replaced by a host with the same
/// `role` label and image id that enrolled at or after the rebuild was requested and has said
/// `Hello` (so its image is known). Each successor replaces one predecessor: successors already
/// used by hosts replaced earlier are worked out first (each replaced host took the newest
/// candidate enrolled at or before its replacement), then the waiting predecessors, oldest
/// request first, take the earliest-enrolled free candidate.
fn match_successors(snap: &Snapshot) -> HashMap<String, String> {
    type Group<'a> = (&'a str, &'a str);
    let mut candidates: BTreeMap<Group<'_>, Vec<&HostLifecycle>> = BTreeMap::new();
    let mut waiting: BTreeMap<Group<'_>, Vec<&HostLifecycle>> = BTreeMap::new();
    let mut replaced: BTreeMap<Group<'_>, Vec<&HostLifecycle>> = BTreeMap::new();
    let revoked: HashSet<&str> = snap
        .hosts
        .iter()
        .filter(|h| h.revoked)
        .map(|h| h.host_id.as_str())
        .collect();
    for s in snap.states.values() {
        let (Some(role), false) = (s.role.as_deref(), s.image_id.is_empty()) else {
            continue;
        };
        let g = (role, s.image_id.as_str());
        match s.state {
            Lifecycle::RebuildRequested => waiting.entry(g).or_default().push(s),
            Lifecycle::Replaced => replaced.entry(g).or_default().push(s),
            _ => {}
        }
        if s.state != Lifecycle::RebuildRequested && !revoked.contains(s.host_id.as_str()) {
            candidates.entry(g).or_default().push(s);
        }
    }
    let mut out = HashMap::new();
    for (g, mut preds) in waiting {
        let mut cands: Vec<&HostLifecycle> = candidates.remove(&g).unwrap_or_default();
        cands.sort_by_key(|c| (c.enrolled_ms, c.host_id.as_str()));
        let mut used: HashSet<&str> = HashSet::new();
        let mut done = replaced.remove(&g).unwrap_or_default();
        done.sort_by_key(|r| (r.since_ms, r.host_id.as_str()));
        for r in done {
            if let Some(c) = cands.iter().rev().find(|c| {
                c.enrolled_ms <= r.since_ms
                    && c.host_id != r.host_id
                    && !used.contains(c.host_id.as_str())
            }) {
                used.insert(c.host_id.as_str());
            }
        }
        preds.sort_by_key(|p| (p.since_ms, p.host_id.as_str()));
        for p in preds {
            if let Some(c) = cands.iter().find(|c| {
                c.enrolled_ms >= p.since_ms
                    && c.host_id != p.host_id
                    && !c.state.is_terminal()
                    && !used.contains(c.host_id.as_str())
            }) {
                used.insert(c.host_id.as_str());
                out.insert(p.host_id.clone(), c.host_id.clone());
            }
        }
    }
    out
}

/// A transition to record, with its audit record.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub transition: TransitionRecord,
    pub audit: AuditEntry,
}

/// The actor of the reconciler's transitions.
pub const ACTOR: &str = "collector";

/// The audit action of a transition to `to`.
pub fn audit_action(to: Lifecycle) -> &'static str {
    match to {
        Lifecycle::Flagged => "host.flagged",
        Lifecycle::Replaced => "host.replaced",
        Lifecycle::Retired => "host.retired",
        Lifecycle::RebuildRequested => "rebuild.requested",
        Lifecycle::Enrolled => "host.reenrolled",
        Lifecycle::Clean | Lifecycle::Drifted | Lifecycle::Silent => "host.state_changed",
    }
}

/// The sentence a verdict's transition is stored with.
fn cause(v: &Verdict, to: Lifecycle, policy: &Policy) -> String {
    match to {
        Lifecycle::Flagged => v
            .reasons
            .iter()
            .map(|r| format!("{}: {}", r.code, r.text))
            .collect::<Vec<_>>()
            .join("; "),
        Lifecycle::Silent => format!(
            "not heard from for {} s (silent after {} s)",
            v.silent_for_ms / 1000,
            policy.silent_after.as_secs()
        ),
        Lifecycle::Drifted => {
            let counted = v.items.iter().filter(|i| i.excluded.is_none()).count();
            format!(
                "{} open drift item(s) ({counted} counted), nothing the flagging policy flags",
                v.items.len()
            )
        }
        Lifecycle::Clean => "no open drift".into(),
        Lifecycle::Replaced => format!(
            "successor {} enrolled with the same role label and image",
            v.successor.as_deref().unwrap_or("?")
        ),
        _ => String::new(),
    }
}

/// The transitions a round's verdicts call for (pure).
pub fn plan(verdicts: &[Verdict], policy: &Policy, now_ms: i64) -> Vec<Planned> {
    let mut out = Vec::new();
    for v in verdicts {
        let event = match (v.assessment, &v.successor) {
            (Some(a), _) => Event::Assessed(a),
            (None, Some(_)) if v.state == Lifecycle::RebuildRequested => Event::Replaced,
            _ => continue,
        };
        let Ok(to) = lifecycle::next(v.state, event) else {
            continue;
        };
        if to == v.state {
            continue;
        }
        let cause = cause(v, to, policy);
        let mut detail = serde_json::json!({
            "from": v.state.name(),
            "to": to.name(),
            "cause": cause,
        });
        if to == Lifecycle::Flagged {
            detail["reasons"] = v.reasons.iter().map(|r| r.code).collect();
        }
        if let Some(s) = &v.successor
            && to == Lifecycle::Replaced
        {
            detail["successor"] = serde_json::json!(s);
        }
        out.push(Planned {
            transition: TransitionRecord {
                host_id: v.host_id.clone(),
                from: v.state,
                to,
                at_ms: now_ms,
                cause,
                actor: ACTOR.into(),
            },
            audit: AuditEntry::new(now_ms, ACTOR, audit_action(to), &v.host_id, detail),
        });
    }
    out
}

/// One round: gather, assess, record. Returns how many transitions were recorded.
pub async fn reconcile_once(
    store: &dyn Storage,
    policy: &Policy,
    now_ms: i64,
) -> Result<usize, StorageError> {
    reconcile_round(store, policy, now_ms, &OpenCache::default()).await
}

/// [`reconcile_once`] with the open rows of earlier rounds (see [`OpenCache`]). The round's
/// transitions are recorded in one storage call (one transaction, one commit): the writer that
/// commits report batches is not handed one commit per moved host.
pub async fn reconcile_round(
    store: &dyn Storage,
    policy: &Policy,
    now_ms: i64,
    cache: &OpenCache,
) -> Result<usize, StorageError> {
    let started = std::time::Instant::now();
    let snap = gather_cached(store, now_ms, None, cache).await?;
    let gathered = started.elapsed();
    let hosts = snap.hosts.len();
    // Judging a large fleet can take a second of CPU (less with the memo, but a first round
    // or a fleet-wide change pays it in full): on a thread of its own at a lower
    // priority ([`crate::priority`]), not on a runtime worker the report streams share, and not
    // on a blocking-pool thread (which would stay lowered for the storage work it runs next).
    // One at a time: a round that timed out while its thread still runs skips the next ones.
    let Some(busy) = AssessGuard::take(&cache.assessing) else {
        tracing::warn!(
            hosts,
            "reconcile round skipped: the previous assessment still runs"
        );
        return Ok(0);
    };
    let judge = policy.clone();
    // A round that times out loses it; the next one starts afresh.
    let mut memo = std::mem::take(
        &mut *cache
            .memo
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let assessing = std::time::Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("dw-assess".into())
        .spawn(move || {
            if let Err(e) = crate::priority::lower_this_thread(crate::priority::BACKGROUND_NICE) {
                tracing::debug!(error = %e, "assessment thread keeps its priority");
            }
            let t = std::time::Instant::now();
            let v = assess_with(&snap, &judge, &mut memo);
            let took = t.elapsed();
            // The snapshot (and the rows it shares with the cache) is let go, and the next
            // round may assess, before the verdicts are handed over: a round that starts right
            // after this one ends is not skipped.
            drop(snap);
            drop(busy);
            // The round may have timed out and gone: then nobody needs them.
            let _ = tx.send((v, took, memo));
        });
    if let Err(e) = thread {
        tracing::warn!(error = %e, "reconcile round skipped: no thread to assess on");
        return Ok(0);
    }
    let Ok((verdicts, assess_time, memo)) = rx.await else {
        // Only a panic drops the sender unsent; its message is on stderr.
        tracing::error!("reconcile round failed: the assessment panicked");
        return Ok(0);
    };
    *cache
        .memo
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = memo;
    let assessed = assessing.elapsed();
    let planned = plan(&verdicts, policy, now_ms);
    // What a round costs, for tuning the interval against the ingest (docs/benchmarks.md):
    // `assess_ms` is the assessment itself, `assessed_ms` adds its thread's start and hand-over.
    let timing = |moves: usize| {
        tracing::debug!(
            hosts,
            gather_ms = gathered.as_secs_f64() * 1e3,
            assess_ms = assess_time.as_secs_f64() * 1e3,
            assessed_ms = assessed.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            moves,
            "reconcile round: timing"
        );
    };
    if planned.is_empty() {
        timing(0);
        return Ok(0);
    }
    let moves: Vec<TransitionRecord> = planned.iter().map(|p| p.transition.clone()).collect();
    let done = store
        .record_transitions(
            planned
                .into_iter()
                .map(|p| (p.transition, p.audit))
                .collect(),
        )
        .await?;
    let mut recorded = 0;
    for (t, ok) in moves.iter().zip(done) {
        if ok {
            tracing::info!(host = t.host_id, from = %t.from, to = %t.to, cause = t.cause, "host lifecycle");
            recorded += 1;
        }
    }
    timing(moves.len());
    Ok(recorded)
}

/// What an enrollment means for the lifecycle: a host id enrolling again starts a new life.
/// A host awaiting its rebuild that re-enrolls under its own id was replaced by its successor
/// of the same name first. Called by the enrollment service after the host is recorded.
pub async fn after_enrollment(
    store: &dyn Storage,
    host_id: &str,
    now_ms: i64,
) -> Result<(), StorageError> {
    let Some(state) = store
        .lifecycle_states()
        .await?
        .into_iter()
        .find(|s| s.host_id == host_id)
        .map(|s| s.state)
    else {
        return Ok(());
    };
    let actor = format!("host:{host_id}");
    let mut state = state;
    if state == Lifecycle::RebuildRequested {
        let cause = "successor enrolled under the same host id".to_string();
        let t = TransitionRecord {
            host_id: host_id.into(),
            from: state,
            to: Lifecycle::Replaced,
            at_ms: now_ms,
            cause: cause.clone(),
            actor: actor.clone(),
        };
        let audit = AuditEntry::new(
            now_ms,
            &actor,
            audit_action(Lifecycle::Replaced),
            host_id,
            serde_json::json!({"from": state.name(), "to": "replaced", "cause": cause, "successor": host_id}),
        );
        if store.record_transition(t, audit).await? {
            state = Lifecycle::Replaced;
        }
    }
    if state.is_terminal() {
        let cause = "enrolled again: a new life under the same host id".to_string();
        let t = TransitionRecord {
            host_id: host_id.into(),
            from: state,
            to: Lifecycle::Enrolled,
            at_ms: now_ms,
            cause: cause.clone(),
            actor: actor.clone(),
        };
        let audit = AuditEntry::new(
            now_ms,
            &actor,
            audit_action(Lifecycle::Enrolled),
            host_id,
            serde_json::json!({"from": state.name(), "to": "enrolled", "cause": cause}),
        );
        store.record_transition(t, audit).await?;
    }
    Ok(())
}

/// Runs rounds every `policy.interval` until `stop` is set. A failed round is logged and the
/// next one tries again (storage may be back).
pub fn spawn(
    store: Arc<dyn Storage>,
    policy: Arc<Policy>,
    open: Arc<OpenCache>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(policy.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = crate::server::stop_requested(&mut stop) => return,
            }
            // A round is bounded by the interval's worth of storage calls plus a margin; a
            // stuck database must not make rounds pile up.
            let limit = policy.interval.max(Duration::from_secs(30));
            let round = reconcile_round(&*store, &policy, now_ms(), &open);
            match tokio::time::timeout(limit, round).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "reconcile round failed"),
                Err(_) => tracing::warn!(?limit, "reconcile round timed out"),
            }
        }
    })
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{HelloInfo, StreamPosition};
    use driftwatch_proto::v1::{DriftItem, ScanStatus, Severity, Violation};

    const NOW: i64 = 1_800_000_000_000;

    fn host(id: &str, image: &str, root: u8) -> HostSummary {
        HostSummary {
            host_id: id.into(),
            labels: vec![("role".into(), "web".into())],
            enrolled_ms: NOW - 3_600_000,
            hello: HelloInfo {
                agent_version: "0.1.0".into(),
                image_id: image.into(),
                image_version: "1".into(),
                baseline_root: vec![root; 32],
                boot_id: String::new(),
                epoch: 1,
            },
            last_seen_ms: Some(NOW - 1000),
            last_scan_ms: Some(NOW - 1000),
            last_scan_status: ScanStatus::Complete,
            last_report_ms: Some(NOW - 2000),
            incomplete: false,
            incomplete_reason: String::new(),
            lost_reports: 0,
            position: StreamPosition {
                epoch: 1,
                last_seq: 1,
                set_digest: [0; 32],
            },
            open_by_severity: [0; 6],
            open_packages: 0,
            revoked: false,
        }
    }

    fn violation(host: &str, path: &str, sev: Severity) -> ViolationRecord {
        ViolationRecord {
            host_id: host.into(),
            key: driftwatch_proto::set::file_key(path.as_bytes()),
            item: DriftItem {
                key: driftwatch_proto::set::file_key(path.as_bytes()),
                item: Some(drift_item::Item::File(Violation {
                    path: path.as_bytes().to_vec(),
                    kind: 3,
                    severity: sev as i32,
                    class: ViolationClass::Unexplained as i32,
                    ..Default::default()
                })),
            },
            first_seen_ms: NOW - 10_000,
            last_seen_ms: NOW - 2000,
            resolved_ms: None,
        }
    }

    /// An acknowledgement of `v` as it is, until `until_ms`.
    fn ack(v: &ViolationRecord, until_ms: i64) -> Acknowledgement {
        let path = match &v.item.item {
            Some(drift_item::Item::File(f)) => Some(f.path.clone()),
            _ => None,
        };
        Acknowledgement {
            host_id: v.host_id.clone(),
            key: v.key.clone(),
            item_hash: driftwatch_proto::set::item_hash(&v.item),
            path,
            package: None,
            reason: "rotating".into(),
            actor: "token:op".into(),
            at_ms: NOW - 1000,
            expires_ms: until_ms,
        }
    }

    fn state(id: &str, s: Lifecycle, since: i64, enrolled: i64, image: &str) -> HostLifecycle {
        HostLifecycle {
            host_id: id.into(),
            state: s,
            since_ms: since,
            role: Some("web".into()),
            image_id: image.into(),
            enrolled_ms: enrolled,
        }
    }

    fn snapshot(hosts: Vec<HostSummary>, open: Vec<ViolationRecord>) -> Snapshot {
        let mut snap = Snapshot {
            now_ms: NOW,
            ..Default::default()
        };
        for v in open {
            Arc::make_mut(snap.open.entry(v.host_id.clone()).or_default()).push(v);
        }
        for h in &hosts {
            snap.states.insert(
                h.host_id.clone(),
                state(
                    &h.host_id,
                    Lifecycle::Clean,
                    NOW - 60_000,
                    h.enrolled_ms,
                    &h.hello.image_id,
                ),
            );
        }
        snap.hosts = hosts;
        snap
    }

    fn verdict<'a>(v: &'a [Verdict], id: &str) -> &'a Verdict {
        v.iter().find(|v| v.host_id == id).unwrap()
    }

    #[test]
    fn clean_drifted_flagged_silent() {
        let mut quiet = host("quiet", "web", 1);
        quiet.last_seen_ms = Some(NOW - 600_000);
        quiet.last_report_ms = Some(NOW - 600_000);
        let snap = snapshot(
            vec![
                host("a", "web", 1),
                host("b", "web", 1),
                host("c", "web", 1),
                quiet,
            ],
            vec![
                violation("b", "/etc/motd", Severity::Low),
                violation("c", "/etc/shadow", Severity::Critical),
            ],
        );
        let v = assess(&snap, &Policy::default());
        assert_eq!(verdict(&v, "a").assessment, Some(Assessment::Clean));
        assert_eq!(verdict(&v, "b").assessment, Some(Assessment::Drifted));
        assert_eq!(verdict(&v, "c").assessment, Some(Assessment::Flagged));
        assert_eq!(verdict(&v, "c").reasons[0].code, "severity");
        assert_eq!(verdict(&v, "quiet").assessment, Some(Assessment::Silent));

        let planned = plan(&v, &Policy::default(), NOW);
        let moves: Vec<(&str, Lifecycle, &str)> = planned
            .iter()
            .map(|p| {
                (
                    p.transition.host_id.as_str(),
                    p.transition.to,
                    p.audit.action.as_str(),
                )
            })
            .collect();
        assert_eq!(
            moves,
            [
                ("b", Lifecycle::Drifted, "host.state_changed"),
                ("c", Lifecycle::Flagged, "host.flagged"),
                ("quiet", Lifecycle::Silent, "host.state_changed"),
            ]
        );
        let flagged = &planned[1];
        assert!(
            flagged.transition.cause.starts_with("severity: "),
            "{}",
            flagged.transition.cause
        );
        assert_eq!(
            flagged.audit.detail["reasons"],
            serde_json::json!(["severity"])
        );
        assert_eq!(flagged.transition.actor, "collector");
    }

    #[test]
    fn acknowledged_items_do_not_flag_until_they_change() {
        let v = violation("c", "/etc/shadow", Severity::Critical);
        let mut snap = snapshot(vec![host("c", "web", 1)], vec![v.clone()]);
        snap.acks.push(ack(&v, NOW + 1000));
        let out = assess(&snap, &Policy::default());
        assert_eq!(out[0].assessment, Some(Assessment::Drifted));
        assert!(matches!(
            out[0].items[0].excluded,
            Some(Exclusion::Acknowledged { .. })
        ));
        // The same path changed again: the acknowledgement no longer covers it.
        let mut changed = v;
        if let Some(drift_item::Item::File(f)) = &mut changed.item.item {
            f.reason = "changed again".into();
        }
        snap.open.insert("c".into(), Arc::new(vec![changed]));
        assert_eq!(
            assess(&snap, &Policy::default())[0].assessment,
            Some(Assessment::Flagged)
        );
    }

    #[test]
    fn a_defect_of_the_image_does_not_flag_its_hosts() {
        let hosts = (0..4).map(|i| host(&format!("h{i}"), "web", 1)).collect();
        let open = (0..3)
            .map(|i| violation(&format!("h{i}"), "/etc/issue", Severity::Critical))
            .collect();
        let snap = snapshot(hosts, open);
        let out = assess(&snap, &Policy::default());
        for i in 0..3 {
            let v = verdict(&out, &format!("h{i}"));
            assert_eq!(v.assessment, Some(Assessment::Drifted), "{v:?}");
            assert_eq!(v.items[0].excluded, Some(Exclusion::ImageDefect));
        }
        let a = analyse(&snap, &Policy::default(), "web");
        assert_eq!(a.defects.len(), 1);
        assert_eq!(a.consensus.len(), 0, "nothing registered: {a:?}");
    }

    #[test]
    fn unassessed_hosts_stay() {
        let mut revoked = host("r", "web", 1);
        revoked.revoked = true;
        let mut fresh = host("new", "web", 1);
        fresh.last_report_ms = None;
        fresh.last_seen_ms = Some(NOW - 100);
        let mut snap = snapshot(vec![revoked, fresh, host("p", "web", 1)], vec![]);
        snap.states.get_mut("new").unwrap().state = Lifecycle::Enrolled;
        snap.states.get_mut("p").unwrap().state = Lifecycle::Retired;
        let out = assess(&snap, &Policy::default());
        assert!(out.iter().all(|v| v.assessment.is_none()), "{out:?}");
        assert!(plan(&out, &Policy::default(), NOW).is_empty());
    }

    #[test]
    fn a_successor_replaces_one_predecessor() {
        let t0 = NOW - 100_000;
        let mut snap = snapshot(vec![], vec![]);
        for s in [
            state(
                "old-1",
                Lifecycle::RebuildRequested,
                t0,
                t0 - 1_000_000,
                "web",
            ),
            state(
                "old-2",
                Lifecycle::RebuildRequested,
                t0 + 1,
                t0 - 1_000_000,
                "web",
            ),
            // Enrolled before the requests: not a successor.
            state("peer", Lifecycle::Clean, t0 - 500_000, t0 - 900_000, "web"),
            // Another role or image: not a successor.
            state("db-new", Lifecycle::Enrolled, t0 + 10, t0 + 10, "db"),
            state("new-1", Lifecycle::Enrolled, t0 + 20, t0 + 20, "web"),
        ] {
            snap.states.insert(s.host_id.clone(), s);
        }
        snap.states.get_mut("db-new").unwrap().role = Some("db".into());
        let m = match_successors(&snap);
        assert_eq!(
            m,
            HashMap::from([("old-1".to_string(), "new-1".to_string())])
        );

        // Once old-1 is replaced, new-1 is taken: old-2 waits for a successor of its own.
        let s = snap.states.get_mut("old-1").unwrap();
        s.state = Lifecycle::Replaced;
        s.since_ms = t0 + 30;
        assert_eq!(match_successors(&snap), HashMap::new());
        snap.states.insert(
            "new-2".into(),
            state("new-2", Lifecycle::Enrolled, t0 + 40, t0 + 40, "web"),
        );
        assert_eq!(
            match_successors(&snap),
            HashMap::from([("old-2".to_string(), "new-2".to_string())])
        );
    }

    #[test]
    fn replacement_is_planned_with_the_successor_in_its_cause() {
        let v = Verdict {
            host_id: "old".into(),
            state: Lifecycle::RebuildRequested,
            since_ms: NOW - 10,
            assessment: None,
            reasons: vec![],
            items: Arc::default(),
            silent_for_ms: 0,
            successor: Some("new".into()),
        };
        let p = plan(&[v], &Policy::default(), NOW);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].transition.to, Lifecycle::Replaced);
        assert!(
            p[0].transition.cause.contains("new"),
            "{}",
            p[0].transition.cause
        );
        assert_eq!(p[0].audit.action, "host.replaced");
        assert_eq!(p[0].audit.detail["successor"], "new");
    }

    /// The reconciler's rounds keep what they worked out ([`RoundMemo`]): whatever changed
    /// in between (a host's rows moved in place by the ingest or replaced, an image defect
    /// appearing or going, a host gone or revoked), a round judges as a fresh assessment does.
    #[test]
    fn rounds_with_remembered_paths_judge_as_fresh_ones() {
        let p = Policy::default();
        let mut memo = RoundMemo::default();
        let round = |snap: &Snapshot, memo: &mut RoundMemo| {
            let v = assess_with(snap, &p, memo);
            assert_eq!(v, assess(snap, &p));
            v
        };
        let hosts: Vec<_> = (0..6).map(|i| host(&format!("h{i}"), "img", 1)).collect();
        // /etc/a is drifted on 4 of 6 hosts: an image defect, not counted.
        let mut open = Vec::new();
        for i in 0..4 {
            open.push(violation(&format!("h{i}"), "/etc/a", Severity::Critical));
        }
        for i in 0..6 {
            open.push(violation(
                &format!("h{i}"),
                &format!("/own/{i}"),
                Severity::Low,
            ));
        }
        let mut snap = snapshot(hosts, open);
        let v = round(&snap, &mut memo);
        assert_eq!(verdict(&v, "h2").assessment, Some(Assessment::Drifted));
        assert_eq!(round(&snap, &mut memo), v);
        // The ingest moves h0's and h1's rows (in place, as `OpenCache::advance` does): /etc/a
        // is back as installed there, so it is on 2 hosts, no defect, and counts on the rest.
        for h in ["h0", "h1"] {
            Arc::make_mut(snap.open.get_mut(h).unwrap())
                .retain(|v| v.key != driftwatch_proto::set::file_key(b"/etc/a"));
        }
        let v = round(&snap, &mut memo);
        assert_eq!(verdict(&v, "h2").assessment, Some(Assessment::Flagged));
        assert_eq!(verdict(&v, "h0").assessment, Some(Assessment::Drifted));
        // h0 reports it again, in rows read anew; h4 is revoked; h5 is gone.
        snap.open.insert(
            "h0".into(),
            Arc::new(vec![
                violation("h0", "/etc/a", Severity::Critical),
                violation("h0", "/own/0", Severity::Low),
            ]),
        );
        snap.hosts[4].revoked = true;
        snap.hosts.pop();
        snap.open.remove("h5");
        let v = round(&snap, &mut memo);
        // On 3 of the 4 live hosts (h4 is revoked): a defect again.
        assert_eq!(verdict(&v, "h2").assessment, Some(Assessment::Drifted));
        assert_eq!(memo.hosts.len(), 5, "h5 is forgotten");
        // An acknowledgement of h3's critical item (its rows the same): not counted.
        let critical = violation("h3", "/own/3", Severity::Critical);
        Arc::make_mut(snap.open.get_mut("h3").unwrap())[1] = critical.clone();
        let v = round(&snap, &mut memo);
        assert_eq!(verdict(&v, "h3").assessment, Some(Assessment::Flagged));
        snap.acks.push(ack(&critical, NOW + 1000));
        let v = round(&snap, &mut memo);
        assert_eq!(verdict(&v, "h3").assessment, Some(Assessment::Drifted));
        // Extended: the same item, acknowledged anew.
        snap.acks[0] = ack(&critical, NOW + 2000);
        round(&snap, &mut memo);
        // Expired (a round's snapshot no longer lists it): counted again.
        snap.acks.clear();
        let v = round(&snap, &mut memo);
        assert_eq!(verdict(&v, "h3").assessment, Some(Assessment::Flagged));
    }

    /// One assessment at a time: while a guard is held (a round that timed out, its thread
    /// still running), no second one is handed out; its drop, also by a panicking thread,
    /// releases it.
    #[test]
    fn one_assessment_at_a_time() {
        let cache = OpenCache::default();
        let first = AssessGuard::take(&cache.assessing).unwrap();
        assert!(AssessGuard::take(&cache.assessing).is_none());
        let t = std::thread::spawn(move || {
            let _held = first;
            panic!("an assessment that panics");
        });
        assert!(t.join().is_err());
        assert!(AssessGuard::take(&cache.assessing).is_some());
    }

    /// The cost of one round's assessment on a fleet shaped like the collector benchmark's
    /// (`bench/collector.sh`): 200, 600 and 1,200 hosts of one image, 500 open file items
    /// each, every path its host's own. Not a pass/fail timing: it prints the median of 5 assessments, for
    /// docs/benchmarks.md (run it with `--release --ignored --nocapture`).
    #[test]
    #[ignore = "a measurement: cargo test --release -p driftwatch-collector assess_cost -- --ignored --nocapture"]
    fn assess_cost() {
        for n in [200usize, 600, 1200] {
            let mut hosts = Vec::new();
            let mut open = Vec::new();
            for i in 0..n {
                let id = format!("l1-{i}");
                hosts.push(host(&id, "img", 1));
                for k in 0..500u64 {
                    let path = format!("/srv/{id}/usr/lib/x86_64-linux-gnu/lib{k:06}.so.1");
                    let mut v = violation(&id, &path, Severity::Low);
                    if let Some(drift_item::Item::File(f)) = &mut v.item.item {
                        f.severity = (k % 6) as i32;
                        f.packages = vec![format!("libpkg{}:amd64", k % 97)];
                        f.reason = "generation 7".into();
                    }
                    open.push(v);
                }
            }
            let snap = snapshot(hosts, open);
            let policy = Policy::default();
            // Fresh: the first round, or every host's rows changed since the last one. Then
            // again with the path hashes of the round before (no host's rows changed).
            let mut memo = RoundMemo::default();
            for (what, mut memo) in [("fresh", None), ("again", Some(&mut memo))] {
                let mut times = Vec::new();
                for _ in 0..5 {
                    let t = std::time::Instant::now();
                    let v = match memo {
                        Some(ref mut m) => assess_with(&snap, &policy, m),
                        None => assess(&snap, &policy),
                    };
                    times.push(t.elapsed());
                    assert_eq!(v.len(), n);
                    assert!(v.iter().all(|v| v.assessment == Some(Assessment::Flagged)));
                }
                times.sort();
                let ms = times[2].as_secs_f64() * 1e3;
                println!(
                    "assess {what}: {n} hosts, {} items: median {ms:.1} ms ({:.2} us per item)",
                    n * 500,
                    ms * 1e3 / (n * 500) as f64
                );
            }
        }
    }
}
