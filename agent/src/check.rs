//! The one-shot check: verify the baseline, scan the root, compare, report.

use std::path::PathBuf;

use driftwatch_proto::path as bpath;
use driftwatch_proto::v1::Entry;

use std::collections::BTreeSet;

use crate::attribution::{self, PackageDrift};
use crate::baseline::{self, Baseline, BaselineError};
use crate::cache::{CacheLookup, RootId, ScanCache, Slot};
use crate::create::Progress;
use crate::diff::{self, Violation, ViolationKind};
use crate::escape::{self, JsonBytes};
use crate::packages;
use crate::policy::{Policy, PolicyError};
use crate::report::{BaselineInfo, PolicyInfo, Report};
use crate::scan::{self, Event, HashSource, Purpose, ScanError, ScanOptions};

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Baseline(#[from] BaselineError),
    #[error("the policy embedded in the baseline is invalid: {0}")]
    EmbeddedPolicy(PolicyError),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error("cannot use state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the policy in force comes from.
#[derive(Debug, Clone)]
pub enum PolicySource {
    /// The policy the image's baseline was made with (the default).
    Baseline,
    /// A policy file given by the operator: (path for the report, parsed policy).
    File(String, Box<Policy>),
}

#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub root: PathBuf,
    pub baseline: PathBuf,
    pub trusted_keys: Vec<[u8; 32]>,
    pub policy: PolicySource,
    /// Ignore the scan cache and hash every file.
    pub full: bool,
    pub state_dir: Option<PathBuf>,
    pub threads: usize,
    pub now_unix: i64,
}

fn under_any(prefixes: &[Vec<u8>], path: &[u8]) -> bool {
    prefixes
        .iter()
        .any(|p| p.as_slice() == path || bpath::is_ancestor(p, path))
}

/// Runs a check. Drift is in the returned report; errors are for the check failing.
pub fn check(
    opts: &CheckOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Report, CheckError> {
    let baseline = baseline::read(&opts.baseline, &opts.trusted_keys, opts.now_unix)?;
    let (policy, policy_info) = match &opts.policy {
        PolicySource::Baseline => {
            let p = Policy::from_toml(&baseline.header.policy_toml)
                .map_err(CheckError::EmbeddedPolicy)?;
            let info = PolicyInfo::new("baseline", &p);
            (p, info)
        }
        PolicySource::File(path, p) => {
            let info = PolicyInfo::new(path, p);
            ((**p).clone(), info)
        }
    };
    let mut warnings = Vec::new();
    let scan_start_ns = crate::time::now_unix_ns();

    let root_id = match &opts.state_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|source| CheckError::StateDir {
                path: dir.clone(),
                source,
            })?;
            Some(RootId::of(&opts.root).map_err(|source| ScanError::Root {
                path: opts.root.clone(),
                source,
            })?)
        }
        None => None,
    };
    let n = baseline.entries.len();
    let mut cache_loaded_ok = !opts.full;
    let mut cache = match (&opts.state_dir, &root_id) {
        (Some(dir), Some(id)) if !opts.full => match ScanCache::load(dir, id, &baseline) {
            Ok(c) => c,
            Err(e) => {
                warnings.push(format!("scan cache discarded: {e}"));
                cache_loaded_ok = false;
                ScanCache::empty(n)
            }
        },
        _ => ScanCache::empty(n),
    };
    // Slots to change once the scan is over (the walk reads the cache meanwhile): only files
    // hashed in this scan, or whose cached hash is no longer valid. Without a usable cache
    // nearly every entry gets one: reserved once, because growing by doubling would hold the
    // old and the new buffer at once (≈ 1.5 × the final size) at the peak of the scan.
    let mut updates: Vec<(usize, Option<Slot>)> = if cache.filled() == 0 {
        Vec::with_capacity(n)
    } else {
        Vec::new()
    };

    let mut seen = vec![false; baseline.entries.len()];
    let mut violations: Vec<Violation> = Vec::new();
    let mut unexamined: Vec<Vec<u8>> = Vec::new();
    let mut other_fs: Vec<Vec<u8>> = Vec::new();
    let mut prog = Progress::default();
    let scan_opts = ScanOptions {
        root: opts.root.clone(),
        threads: opts.threads,
        purpose: Purpose::Check,
    };
    let lookup = CacheLookup {
        baseline: &baseline,
        cache: &cache,
    };
    let source: Option<&dyn HashSource> =
        opts.state_dir.as_ref().map(|_| &lookup as &dyn HashSource);
    let stats = scan::scan(&scan_opts, &policy, source, |ev| match ev {
        Event::Object(o) => {
            prog.entries += 1;
            if o.hashed {
                prog.bytes_hashed += o.entry.size;
            }
            progress(prog);
            let index = baseline.find(&o.entry.path);
            let base = index.map(|i| {
                seen[i] = true;
                &baseline.entries[i]
            });
            if let Some(v) = diff::compare(base, Some((&o.entry, o.problem.as_deref())), &o.policy)
            {
                violations.push(v);
            }
            if let (Some(i), Some(base)) = (index, base) {
                let slot = slot_for(&o, base);
                if cache.slot(i) != slot.as_ref() {
                    updates.push((i, slot));
                }
            }
        }
        Event::Incomplete { path, reason } => {
            let pp = policy.for_path(&path);
            violations.push(Violation {
                path: JsonBytes(path.clone()),
                kind: ViolationKind::Unverifiable,
                severity: pp.severity,
                changes: Vec::new(),
                reason: Some(reason),
                baseline: baseline
                    .find(&path)
                    .map(|i| diff::summarize(&baseline.entries[i])),
                observed: None,
                packages: Vec::new(),
                class: None,
                config: false,
            });
            unexamined.push(path);
        }
        Event::OtherFilesystem { path } => other_fs.push(path),
    })?;

    for (entry, _) in baseline.entries.iter().zip(&seen).filter(|(_, s)| !**s) {
        let p = entry.path.as_slice();
        if under_any(&unexamined, p) || under_any(&other_fs, p) || !policy.in_scope(p) {
            continue;
        }
        if let Some(v) = diff::compare(Some(entry), None, &policy.for_path(p)) {
            violations.push(v);
        }
    }
    let package_drift =
        attribute_packages(opts, &baseline, &policy, &mut violations, &mut warnings);
    violations.sort_by(|a, b| a.path.0.cmp(&b.path.0));

    let mut cache_changed = !updates.is_empty();
    for (i, slot) in updates {
        cache.set(i, slot);
    }
    for (i, _) in seen.iter().enumerate().filter(|(_, s)| !**s) {
        cache_changed |= cache.slot(i).is_some();
        cache.set(i, None);
    }
    // An unchanged cache is not rewritten (a full check of a clean tree touches no disk),
    // unless it was discarded or never written.
    let cache_file_ok = opts
        .state_dir
        .as_ref()
        .is_some_and(|d| crate::cache::cache_path(d).is_file())
        && cache_loaded_ok;
    if let (Some(dir), Some(id)) = (&opts.state_dir, &root_id)
        && (cache_changed || !cache_file_ok)
        && let Err(e) = cache.save(dir, id, &baseline.merkle_root, scan_start_ns)
    {
        warnings.push(format!(
            "cannot save the scan cache in {}: {e}",
            dir.display()
        ));
    }
    for p in &other_fs {
        warnings.push(format!(
            "{}: another filesystem is mounted here and was not checked (policy scan.one_file_system)",
            escape::bytes(p)
        ));
    }

    Ok(Report::new(
        opts.root.display().to_string(),
        BaselineInfo::new(&opts.baseline, &baseline),
        policy_info,
        violations,
        package_drift,
        stats,
        warnings,
    ))
}

/// What the scan cache may remember about a regular file observed without any problem: its
/// content hash, and whether its xattrs were the baseline entry's. The latter only when they
/// are known to belong to the hashed inode: read through the hashed descriptor, or taken from
/// the cache under the same stat key.
fn slot_for(o: &scan::Observed, base: &Entry) -> Option<Slot> {
    let key = o.key?;
    if o.problem.is_some() {
        return None;
    }
    let hash = <[u8; 32]>::try_from(o.entry.content_hash.as_slice()).ok()?;
    let xattrs_as_baseline = o.xattrs_cached || (o.hashed && o.entry.xattrs == base.xattrs);
    Some(Slot {
        key,
        hash,
        xattrs_as_baseline,
    })
}

/// Reads the live package database, reports package drift against the baseline's inventory,
/// and names the owners and class of every file violation.
fn attribute_packages(
    opts: &CheckOptions,
    baseline: &Baseline,
    policy: &Policy,
    violations: &mut Vec<Violation>,
    warnings: &mut Vec<String>,
) -> Vec<PackageDrift> {
    let header = &baseline.header;
    let unreadable = |reason: String| {
        let db: &[u8] = if header.package_manager == "rpm" {
            b"/var/lib/rpm"
        } else {
            b"/var/lib/dpkg/status"
        };
        Violation {
            path: JsonBytes(db.to_vec()),
            kind: ViolationKind::Unverifiable,
            severity: policy.packages.drift,
            changes: Vec::new(),
            reason: Some(reason),
            baseline: None,
            observed: None,
            packages: Vec::new(),
            class: None,
            config: false,
        }
    };
    // The file lists are read only if a file violation needs its owner (below).
    let live = match packages::read_lazily(&opts.root) {
        Ok(m) => m,
        Err(e) => {
            violations.push(unreadable(format!(
                "the package database cannot be read, so package drift is unknown: {e}"
            )));
            return Vec::new();
        }
    };
    let Some(live) = live else {
        if !header.package_manager.is_empty() {
            warnings.push(format!(
                "the image had a {} package database but the checked root has none: packages cannot be compared",
                header.package_manager
            ));
        }
        return Vec::new();
    };
    let note = |n: &String| format!("packages: {n}");
    warnings.extend(live.packages().notes.iter().map(note));
    let live_inventory = packages::inventory(live.packages());
    let drift = if header.package_manager.is_empty() {
        warnings.push("the baseline has no package inventory: package drift is not checked".into());
        Vec::new()
    } else {
        attribution::diff_inventories(&header.packages, &live_inventory, policy.packages.drift)
    };
    if violations.is_empty() {
        // Nothing to attribute: the file lists are only read, and the owner table (every
        // package path resolved in the root) only built, when a file violation needs them.
        return drift;
    }
    let notes_before = live.packages().notes.len();
    let live = match live.with_files() {
        Ok(m) => m,
        Err(e) => {
            violations.push(unreadable(format!(
                "the package database's file lists cannot be read, so file violations are not \
                 attributed to packages: {e}"
            )));
            return drift;
        }
    };
    warnings.extend(live.notes.iter().skip(notes_before).map(note));
    let changed: BTreeSet<String> = drift.iter().map(PackageDrift::key).collect();
    let owners = packages::Owners::build(&opts.root, &live);
    let key = |p: &driftwatch_proto::v1::Package| format!("{}:{}", p.name, p.arch);
    for v in violations.iter_mut() {
        let mut names = BTreeSet::new();
        let mut config = false;
        if let Some(e) = baseline.find(&v.path.0).map(|i| &baseline.entries[i]) {
            names.extend(
                e.packages
                    .iter()
                    .filter_map(|&i| header.packages.get(i as usize))
                    .map(key),
            );
            config |= e.config;
        }
        if let Some((idx, c)) = owners.get(&v.path.0) {
            names.extend(idx.iter().map(|&i| live.packages[i as usize].key()));
            config |= c;
        }
        attribution::attribute(v, names, config, &changed, &policy.packages);
    }
    drift
}
