//! Making a baseline from an image root: scan everything in scope, refuse to sign anything
//! that could not be read completely, sign and write.

use std::path::PathBuf;

use driftwatch_proto::v1::Entry;
use ring::signature::Ed25519KeyPair;

use crate::baseline::{self, BaselineError, BaselineMeta};
use crate::escape;
use crate::packages::{self, Manifest};
use crate::policy::Policy;
use crate::scan::{self, Event, Purpose, ScanError, ScanOptions, ScanStats};

#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Baseline(#[from] BaselineError),
    #[error("cannot read the image's package database: {0}")]
    Packages(#[from] packages::PackageError),
    #[error("baseline not written: {count} object(s) could not be read completely, first: {}", .sample.join("; "))]
    Incomplete { count: usize, sample: Vec<String> },
}

#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub root: PathBuf,
    pub out: PathBuf,
    pub image_id: String,
    pub image_version: String,
    pub created_unix: i64,
    pub expires_unix: Option<i64>,
    pub threads: usize,
}

#[derive(Debug, Clone)]
pub struct CreateOutcome {
    pub merkle_root: [u8; 32],
    pub entries: u64,
    pub stats: ScanStats,
    /// Things the operator should know: files above the size limit, skipped mounts.
    pub warnings: Vec<String>,
}

/// Running totals for a progress display.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub entries: u64,
    pub bytes_hashed: u64,
}

/// Scans `opts.root` under `policy`, then signs and writes the baseline.
pub fn create(
    opts: &CreateOptions,
    policy: &Policy,
    key: &Ed25519KeyPair,
    progress: &mut dyn FnMut(Progress),
) -> Result<CreateOutcome, CreateError> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    let mut warnings: Vec<String> = Vec::new();
    let mut prog = Progress::default();
    let scan_opts = ScanOptions {
        root: opts.root.clone(),
        threads: opts.threads,
        purpose: Purpose::Baseline,
    };
    let stats = scan::scan(&scan_opts, policy, None, |ev| {
        match ev {
        Event::Object(o) => {
            prog.entries += 1;
            if o.hashed {
                prog.bytes_hashed += o.entry.size;
            }
            progress(prog);
            if !o.entry.unhashed_reason.is_empty() {
                warnings.push(format!("{}: {}", escape::bytes(&o.entry.path), o.entry.unhashed_reason));
            } else if let Some(p) = &o.problem {
                problems.push(format!("{}: {p}", escape::bytes(&o.entry.path)));
            }
            entries.push(o.entry);
        }
        Event::Incomplete { path, reason } => problems.push(format!("{}: {reason}", escape::bytes(&path))),
        Event::OtherFilesystem { path } => warnings.push(format!(
            "{}: another filesystem is mounted here; not included (list it in scan.cross_filesystems to include it)",
            escape::bytes(&path)
        )),
    }
    })?;
    if !problems.is_empty() {
        problems.sort();
        let count = problems.len();
        problems.truncate(10);
        return Err(CreateError::Incomplete {
            count,
            sample: problems,
        });
    }
    let manifest = packages::read_manifest(&opts.root)?;
    let (package_manager, inventory, package_notes) = match &manifest {
        Some(m) => {
            let (inventory, positions) = packages::inventory_with_positions(m);
            attach_owners(&opts.root, m, &positions, &mut entries);
            (m.manager.as_str().to_string(), inventory, m.notes.clone())
        }
        None => (String::new(), Vec::new(), Vec::new()),
    };
    let meta = BaselineMeta {
        image_id: opts.image_id.clone(),
        image_version: opts.image_version.clone(),
        created_unix: opts.created_unix,
        expires_unix: opts.expires_unix,
        policy_toml: policy.to_toml(),
        package_manager,
        packages: inventory,
        package_notes,
    };
    let merkle_root = baseline::write(&opts.out, &meta, &mut entries, key)?;
    Ok(CreateOutcome {
        merkle_root,
        entries: entries.len() as u64,
        stats,
        warnings,
    })
}

/// Records on every entry which packages own it and whether it is a configuration file.
/// `positions[i]` is the inventory index of the manifest's package `i`
/// ([`packages::inventory_with_positions`]).
pub fn attach_owners(
    root: &std::path::Path,
    manifest: &Manifest,
    positions: &[u32],
    entries: &mut [Entry],
) {
    let owners = packages::Owners::build(root, manifest);
    for e in entries.iter_mut() {
        if let Some((idx, config)) = owners.get(&e.path) {
            let mut v: Vec<u32> = idx.iter().map(|&i| positions[i as usize]).collect();
            v.sort_unstable();
            v.dedup();
            e.packages = v;
            e.config = config;
        }
    }
}
