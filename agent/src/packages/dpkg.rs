//! The dpkg database of a root (`var/lib/dpkg`): which packages are installed, in which state,
//! and which files each one owns, with the MD5 sums, conffile marks, diversions and stat
//! overrides dpkg recorded.
//!
//! [`read`] reads the database of any root — a mounted image as well as `/` — and fills a
//! [`Manifest`]: `status`, the pending journal in `updates/` (as `dpkg-query` does),
//! `diversions`, `statoverride`, and each package's `info/<pkg>[:<arch>].list` and `.md5sums`,
//! every file read once. It reads in two steps ([`read_status`], then [`Status::with_files`])
//! so that a caller that only needs the package inventory reads `status` and the journal only. The parsers ([`parse_status`], [`parse_list`], [`parse_md5sums`],
//! [`parse_diversions`], [`parse_statoverride`]) are pure: bytes in, values or an error
//! naming the file and line out. They never panic, and allocate only in proportion to their
//! input.
//!
//! What dpkg tolerates is tolerated: field names in any case, whitespace before the colon,
//! unknown fields (skipped unchecked), whitespace-only continuation lines, a carriage return at
//! the end of a value (whitespace to dpkg, trimmed). What dpkg refuses is refused: a file
//! without a final newline, a duplicate field, unknown `Status` words, a missing `Version`,
//! two non-coinstallable instances of a package. One decision of our own: a line holding only
//! a carriage return (the blank separator of a file with CRLF line endings, which dpkg takes
//! as part of the previous value and then fails on) is refused with an error that says so.
//! Package and architecture names must be what dpkg allows, since they name files in `info/`.
//!
//! This module never writes, never runs dpkg, and never reads outside the root: files are
//! opened with `openat2(RESOLVE_IN_ROOT)` (symlinks resolve as they would inside the root;
//! kernels before 5.6 fall back to `openat`), never through a final symlink, only if they are
//! regular files, and never beyond a size limit.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use driftwatch_proto::path as baseline_path;
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;

use super::{
    Digest, Diversion, Manager, Manifest, Package, PackageError, PackageFile, StatOverride,
};
use crate::escape;

/// dpkg's administrative directory, relative to the root.
const ADMIN_DIR: &str = "var/lib/dpkg";
/// No database file is read beyond this size: a real `status` is a few MiB.
const MAX_FILE_BYTES: u64 = 256 << 20;
/// Nor all of them together beyond this (a server with 3,000 packages reads ~50 MiB).
const MAX_TOTAL_BYTES: u64 = 1 << 30;
/// dpkg folds its journal into `status` every few dozen entries; thousands mean tampering.
const MAX_JOURNAL_FILES: usize = 4096;
/// Longest excerpt of input quoted in an error message.
const SHOW_MAX: usize = 80;

/// The first `Status` word: what the administrator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Unknown,
    Install,
    Hold,
    Deinstall,
    Purge,
}

/// The second `Status` word: `reinstreq` marks a package broken until reinstalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorFlag {
    Ok,
    ReinstReq,
}

/// The third `Status` word: how far dpkg got with the package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    NotInstalled,
    ConfigFiles,
    HalfInstalled,
    Unpacked,
    HalfConfigured,
    TriggersAwaited,
    TriggersPending,
    Installed,
}

/// The `Multi-Arch` field; `same` packages may be installed once per architecture and keep
/// their `info/` files under `<name>:<arch>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MultiArch {
    #[default]
    No,
    Same,
    Foreign,
    Allowed,
}

const WANTS: [(&str, Want); 5] = [
    ("unknown", Want::Unknown),
    ("install", Want::Install),
    ("hold", Want::Hold),
    ("deinstall", Want::Deinstall),
    ("purge", Want::Purge),
];
const ERROR_FLAGS: [(&str, ErrorFlag); 2] =
    [("ok", ErrorFlag::Ok), ("reinstreq", ErrorFlag::ReinstReq)];
const STATES: [(&str, State); 8] = [
    ("not-installed", State::NotInstalled),
    ("config-files", State::ConfigFiles),
    ("half-installed", State::HalfInstalled),
    ("unpacked", State::Unpacked),
    ("half-configured", State::HalfConfigured),
    ("triggers-awaited", State::TriggersAwaited),
    ("triggers-pending", State::TriggersPending),
    ("installed", State::Installed),
];
const MULTI_ARCHES: [(&str, MultiArch); 4] = [
    ("no", MultiArch::No),
    ("same", MultiArch::Same),
    ("foreign", MultiArch::Foreign),
    ("allowed", MultiArch::Allowed),
];

/// Looks `word` up in one of the tables above, ignoring case as dpkg does.
fn lookup<T: Copy>(table: &[(&'static str, T)], word: &[u8]) -> Option<T> {
    table
        .iter()
        .find(|(name, _)| name.as_bytes().eq_ignore_ascii_case(word))
        .map(|&(_, value)| value)
}

/// The name of `value` in `table` (every variant is in its table).
fn name_in<T: Copy + PartialEq>(table: &[(&'static str, T)], value: T) -> &'static str {
    table
        .iter()
        .find(|(_, v)| *v == value)
        .map_or("?", |(name, _)| name)
}

impl Want {
    pub fn as_str(self) -> &'static str {
        name_in(&WANTS, self)
    }
}

impl ErrorFlag {
    pub fn as_str(self) -> &'static str {
        name_in(&ERROR_FLAGS, self)
    }
}

impl State {
    /// The word as dpkg writes it (`config-files`, `half-installed`, ...).
    pub fn as_str(self) -> &'static str {
        name_in(&STATES, self)
    }
}

impl MultiArch {
    pub fn as_str(self) -> &'static str {
        name_in(&MULTI_ARCHES, self)
    }
}

/// One line of a `Conffiles` field: ` /path md5hex [obsolete] [remove-on-upgrade]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conffile {
    /// Normalized to baseline path rules.
    pub path: Vec<u8>,
    /// The MD5 of the installed conffile; `None` for dpkg's markers (`newconffile` before
    /// the first configuration, `nonexistent`, `-`).
    pub md5: Option<[u8; 16]>,
    /// No longer shipped by the package, but still on disk and still the package's.
    pub obsolete: bool,
    /// To be removed when the package is next upgraded.
    pub remove_on_upgrade: bool,
}

/// What one stanza of `status` (or of a journal file in `updates/`) says about a package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRecord {
    /// Line of the stanza's first field, for messages.
    pub line: usize,
    /// Lower-cased as dpkg does.
    pub name: String,
    /// As written; empty when the stanza has no `Architecture` (dpkg only warns).
    pub arch: String,
    /// As written, epoch included; empty only for `not-installed` and `half-installed`.
    pub version: String,
    pub want: Want,
    pub error: ErrorFlag,
    pub state: State,
    pub multi_arch: MultiArch,
    pub conffiles: Vec<Conffile>,
}

/// One line of an `info/<pkg>.md5sums` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Md5sum<'a> {
    /// The path relative to the root, without a leading `/` (`usr/bin/dpkg`). Borrowed from
    /// the input unless the line used md5sum's backslash escapes.
    pub path: Cow<'a, [u8]>,
    pub md5: [u8; 16],
}

/// Reads the dpkg database of `root`. A missing `status` is an error; missing `diversions`,
/// `statoverride` and `updates/` are empty; a package without a file list is recorded with
/// only the conffiles `status` names, and a note says so.
pub fn read(root: &Path) -> Result<Manifest, PackageError> {
    read_status(root)?.with_files()
}

/// The first step of [`read`]: `status` and the pending journal, which say which packages are
/// installed in which version and state, but not their files.
#[derive(Debug)]
pub struct Status {
    db: AdminDir,
    records: Vec<StatusRecord>,
}

/// Reads `status` and the journal of `root`'s dpkg database (see [`read`]).
pub fn read_status(root: &Path) -> Result<Status, PackageError> {
    let db = AdminDir::open(root)?;
    let status_path = db.path("status");
    let Some(data) = db.read("status")? else {
        return Err(PackageError::Io {
            path: status_path,
            source: io::Error::new(io::ErrorKind::NotFound, "dpkg status file not found"),
        });
    };
    let mut records = parse_status(&data, &status_path)?;
    drop(data);
    apply_journal(&db, &mut records)?;
    records.retain(|r| r.state != State::NotInstalled);
    Ok(Status { db, records })
}

impl Status {
    /// The packages without their files (no file lists read): what [`read`] gives, with every
    /// `files`, the diversions, the stat overrides and the notes empty.
    pub fn packages_only(&self) -> Manifest {
        Manifest {
            manager: Manager::Dpkg,
            packages: self
                .records
                .iter()
                .map(|r| Package {
                    name: r.name.clone(),
                    version: r.version.clone(),
                    arch: r.arch.clone(),
                    state: r.state.as_str().to_string(),
                    files: Vec::new(),
                })
                .collect(),
            diversions: Vec::new(),
            stat_overrides: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The second step of [`read`]: `diversions`, `statoverride` and every package's file
    /// list and MD5 sums. The packages are those of [`Status::packages_only`], in its order.
    pub fn with_files(self) -> Result<Manifest, PackageError> {
        let Status { db, records } = self;
        let diversions = match db.read("diversions")? {
            Some(data) => parse_diversions(&data, &db.path("diversions"))?,
            None => Vec::new(),
        };
        let stat_overrides = match db.read("statoverride")? {
            Some(data) => parse_statoverride(&data, &db.path("statoverride"))?,
            None => Vec::new(),
        };
        // Sorted by path for lookups (the parsers refused duplicates).
        let mut diverted: Vec<(&[u8], &Diversion)> =
            diversions.iter().map(|d| (d.from.as_slice(), d)).collect();
        diverted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut overridden: Vec<(&[u8], &StatOverride)> = stat_overrides
            .iter()
            .map(|o| (o.path.as_slice(), o))
            .collect();
        overridden.sort_unstable_by(|a, b| a.0.cmp(b.0));

        let mut notes = Vec::new();
        let mut packages = Vec::with_capacity(records.len());
        for record in records {
            let mut list = None;
            let mut sums_data = None;
            let mut sums_path = PathBuf::new();
            // A package in config-files state has only its conffiles left on disk.
            if record.state != State::ConfigFiles {
                for base in info_names(&record) {
                    let rel = format!("info/{base}.list");
                    if let Some(data) = db.read(&rel)? {
                        list = Some(parse_list(&data, &db.path(&rel))?);
                        let rel = format!("info/{base}.md5sums");
                        sums_path = db.path(&rel);
                        sums_data = db.read(&rel)?;
                        break;
                    }
                }
                if list.is_none() {
                    notes.push(format!(
                        "dpkg: package {}:{} ({}) has no file list in {ADMIN_DIR}/info: only its \
                         conffiles are known",
                        record.name,
                        record.arch,
                        record.state.as_str()
                    ));
                }
            }
            let sums = match &sums_data {
                Some(data) => parse_md5sums(data, &sums_path)?,
                None => Vec::new(),
            };
            let files = package_files(
                &record,
                list.unwrap_or_default(),
                &sums,
                &diverted,
                &overridden,
            );
            packages.push(Package {
                name: record.name,
                version: record.version,
                arch: record.arch,
                state: record.state.as_str().to_string(),
                files,
            });
        }
        Ok(Manifest {
            manager: Manager::Dpkg,
            packages,
            diversions,
            stat_overrides,
            notes,
        })
    }
}

/// The names under which dpkg may keep a package's `info/` files, most likely first:
/// `<name>:<arch>` for `Multi-Arch: same` packages, `<name>` for the others (and for
/// databases from before multiarch).
fn info_names(record: &StatusRecord) -> Vec<String> {
    if record.arch.is_empty() {
        return vec![record.name.clone()];
    }
    let qualified = format!("{}:{}", record.name, record.arch);
    if record.multi_arch == MultiArch::Same {
        vec![qualified, record.name.clone()]
    } else {
        vec![record.name.clone(), qualified]
    }
}

/// Merges what the database says about one package's files: the listed paths, their MD5 sums
/// (an MD5 for an unlisted path adds it), the conffiles (their digest from `status` wins),
/// stat overrides (looked up on the package's own name for the file, as dpkg does when it
/// unpacks), then diversions by anyone but the package itself (local ones included), which
/// move the file to the diverted-to path as debsums does. Sorted by path, one entry per path.
/// `diversions` and `overrides` are sorted by path.
fn package_files(
    record: &StatusRecord,
    mut list: Vec<Vec<u8>>,
    sums: &[Md5sum<'_>],
    diversions: &[(&[u8], &Diversion)],
    overrides: &[(&[u8], &StatOverride)],
) -> Vec<PackageFile> {
    if record.state == State::ConfigFiles {
        list.clear();
    }
    // Sorting the paths first is much cheaper than sorting the (large) PackageFile values.
    list.sort_unstable();
    list.dedup();
    let mut files: Vec<PackageFile> = list
        .into_iter()
        .map(|path| PackageFile {
            path,
            ..PackageFile::default()
        })
        .collect();

    if record.state != State::ConfigFiles && !sums.is_empty() {
        add_md5sums(&mut files, sums);
    }

    let mut extra = Vec::new();
    for conffile in &record.conffiles {
        let digest = conffile.md5.map(Digest::Md5);
        match files.binary_search_by(|f| f.path.cmp(&conffile.path)) {
            Ok(i) => {
                files[i].config = true;
                files[i].digest = digest;
            }
            Err(_) => extra.push(PackageFile {
                path: conffile.path.clone(),
                digest,
                config: true,
                ..PackageFile::default()
            }),
        }
    }
    if !extra.is_empty() {
        files.append(&mut extra);
        sort_and_merge(&mut files);
    }

    for (f, e) in matching(&files, overrides) {
        let o = overrides[e].1;
        files[f].user = Some(o.user.clone());
        files[f].group = Some(o.group.clone());
        files[f].mode = Some(o.mode);
    }
    let mut moved = false;
    for (f, e) in matching(&files, diversions) {
        let d = diversions[e].1;
        if d.package.as_deref() != Some(record.name.as_str()) {
            files[f].path = d.to.clone();
            moved = true;
        }
    }
    if moved {
        sort_and_merge(&mut files);
    }
    files
}

/// Sets the digests of `files` (sorted) from `sums`; sums for unlisted paths add files.
fn add_md5sums(files: &mut Vec<PackageFile>, sums: &[Md5sum<'_>]) {
    // Every path starts with '/', so ordering by the rest is ordering by the path.
    fn rel(path: &[u8]) -> &[u8] {
        path.get(1..).unwrap_or_default()
    }
    let mut unlisted = Vec::new();
    let mut set = |files: &mut [PackageFile], found: Option<usize>, sum: &Md5sum<'_>| match found {
        Some(i) => files[i].digest = Some(Digest::Md5(sum.md5)),
        None => unlisted.push(PackageFile {
            path: [b"/", &sum.path[..]].concat(),
            digest: Some(Digest::Md5(sum.md5)),
            ..PackageFile::default()
        }),
    };
    if sums.is_sorted_by(|a, b| a.path <= b.path) {
        // dh_md5sums writes sorted files: one merge pass instead of a search per line.
        let mut i = 0;
        for sum in sums {
            while i < files.len() && rel(&files[i].path) < &sum.path[..] {
                i += 1;
            }
            let found = (i < files.len() && rel(&files[i].path) == &sum.path[..]).then_some(i);
            set(files, found, sum);
        }
    } else {
        for sum in sums {
            let found = files.binary_search_by(|f| rel(&f.path).cmp(&sum.path)).ok();
            set(files, found, sum);
        }
    }
    if !unlisted.is_empty() {
        files.append(&mut unlisted);
        sort_and_merge(files);
    }
}

/// Pairs (file index, entry index) of the files (sorted by path) whose path is the key of an
/// entry (sorted by key). Searches from the smaller side: a package's files are looked up in
/// a long table, a short table's keys in the package's files.
fn matching<T>(files: &[PackageFile], entries: &[(&[u8], &T)]) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    if entries.len() <= files.len() {
        for (e, (key, _)) in entries.iter().enumerate() {
            if let Ok(f) = files.binary_search_by(|f| f.path.as_slice().cmp(key)) {
                found.push((f, e));
            }
        }
    } else {
        for (f, file) in files.iter().enumerate() {
            if let Ok(e) = entries.binary_search_by(|(key, _)| (*key).cmp(file.path.as_slice())) {
                found.push((f, e));
            }
        }
    }
    found
}

/// Sorts by path and folds entries with the same path into one, keeping what either knew.
fn sort_and_merge(files: &mut Vec<PackageFile>) {
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files.dedup_by(|later, kept| {
        if later.path != kept.path {
            return false;
        }
        kept.config |= later.config;
        if kept.digest.is_none() {
            kept.digest = later.digest.take();
        }
        if kept.mode.is_none() {
            kept.mode = later.mode;
            kept.user = later.user.take();
            kept.group = later.group.take();
        }
        true
    });
}

/// Applies dpkg's journal (`updates/0000`, `updates/0001`, ...: stanzas written since
/// `status` was last rewritten) in name order: each stanza replaces the package's record.
fn apply_journal(db: &AdminDir, records: &mut Vec<StatusRecord>) -> Result<(), PackageError> {
    let names = db.journal_names()?;
    if names.is_empty() {
        return Ok(());
    }
    let mut index: HashMap<(String, String), usize> = records
        .iter()
        .enumerate()
        .map(|(i, r)| ((r.name.clone(), r.arch.clone()), i))
        .collect();
    for name in names {
        let rel = format!("updates/{name}");
        let Some(data) = db.read(&rel)? else {
            continue;
        };
        for record in parse_status(&data, &db.path(&rel))? {
            let key = (record.name.clone(), record.arch.clone());
            match index.get(&key) {
                Some(&i) => records[i] = record,
                None => {
                    index.insert(key, records.len());
                    records.push(record);
                }
            }
        }
    }
    records.sort_by(|a, b| (&a.name, &a.arch).cmp(&(&b.name, &b.arch)));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parsers.

/// Parses a dpkg `status` file (or a journal file from `updates/`). Returns every stanza,
/// `not-installed` ones included, sorted by (name, arch).
pub fn parse_status(data: &[u8], file: &Path) -> Result<Vec<StatusRecord>, PackageError> {
    require_final_newline(data, file)?;
    let mut records = Vec::new();
    let mut stanza: Option<Stanza<'_>> = None;
    let mut field: Option<OpenField<'_>> = None;
    for (number, start, line) in Lines::new(data) {
        if line.is_empty() {
            close_field(data, field.take(), stanza.as_mut(), file)?;
            if let Some(s) = stanza.take() {
                records.push(finish_stanza(s, file)?);
            }
            continue;
        }
        if line == b"\r" {
            return Err(parse_error(
                file,
                number,
                "line holds only a carriage return: CRLF line endings are not dpkg's format",
            ));
        }
        if is_space(line[0]) {
            match field.as_mut() {
                Some(f) => f.end = start + line.len(),
                None => return Err(parse_error(file, number, "empty field name")),
            }
            continue;
        }
        close_field(data, field.take(), stanza.as_mut(), file)?;
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(parse_error(
                file,
                number,
                format!("field name '{}' must be followed by a colon", show(line)),
            ));
        };
        let name = trim_end(&line[..colon]);
        if name.is_empty() {
            return Err(parse_error(file, number, "empty field name"));
        }
        if name.iter().any(|&b| is_space(b)) {
            return Err(parse_error(
                file,
                number,
                format!("field name '{}' must be followed by a colon", show(name)),
            ));
        }
        let value_start = line[colon + 1..]
            .iter()
            .position(|&b| !is_space(b))
            .map_or(line.len(), |i| colon + 1 + i);
        stanza.get_or_insert_with(|| Stanza {
            line: number,
            ..Stanza::default()
        });
        field = Some(OpenField {
            name,
            line: number,
            start: start + value_start,
            end: start + line.len(),
        });
    }
    close_field(data, field.take(), stanza.as_mut(), file)?;
    if let Some(s) = stanza.take() {
        records.push(finish_stanza(s, file)?);
    }
    check_instances(&mut records, file)?;
    Ok(records)
}

/// A field whose value may still grow by continuation lines: `data[start..end]`.
struct OpenField<'a> {
    name: &'a [u8],
    line: usize,
    start: usize,
    end: usize,
}

/// The fields of one stanza this reader uses, as (line, value); the others are skipped.
#[derive(Default)]
struct Stanza<'a> {
    line: usize,
    package: Option<(usize, &'a [u8])>,
    status: Option<(usize, &'a [u8])>,
    version: Option<(usize, &'a [u8])>,
    architecture: Option<(usize, &'a [u8])>,
    multi_arch: Option<(usize, &'a [u8])>,
    conffiles: Option<(usize, &'a [u8])>,
}

fn close_field<'a>(
    data: &'a [u8],
    field: Option<OpenField<'a>>,
    stanza: Option<&mut Stanza<'a>>,
    file: &Path,
) -> Result<(), PackageError> {
    let (Some(f), Some(s)) = (field, stanza) else {
        return Ok(());
    };
    let name = f.name.to_ascii_lowercase();
    let slot = match name.as_slice() {
        b"package" => &mut s.package,
        b"status" => &mut s.status,
        b"version" => &mut s.version,
        b"architecture" => &mut s.architecture,
        b"multi-arch" => &mut s.multi_arch,
        b"conffiles" => &mut s.conffiles,
        _ => return Ok(()),
    };
    if slot.is_some() {
        return Err(parse_error(
            file,
            f.line,
            format!("duplicate value for field '{}'", show(f.name)),
        ));
    }
    let value = data.get(f.start..f.end).unwrap_or_default();
    *slot = Some((f.line, trim_end(value)));
    Ok(())
}

fn finish_stanza(s: Stanza<'_>, file: &Path) -> Result<StatusRecord, PackageError> {
    let at = |line: usize| move |what: String| parse_error(file, line, what);
    let Some((line, value)) = s.package else {
        return Err(parse_error(file, s.line, "stanza has no 'Package' field"));
    };
    let name = package_name(value).map_err(at(line))?;
    // A stanza without Status is a package dpkg knows nothing about: not-installed.
    let (want, error, state) = match s.status {
        Some((line, value)) => status_words(value).map_err(at(line))?,
        None => (Want::Unknown, ErrorFlag::Ok, State::NotInstalled),
    };
    let version = match s.version {
        Some((line, value)) => version_string(value).map_err(at(line))?,
        None if matches!(state, State::NotInstalled | State::HalfInstalled) => String::new(),
        None => {
            return Err(parse_error(
                file,
                s.line,
                format!(
                    "package '{name}' in state '{}' has no 'Version' field",
                    state.as_str()
                ),
            ));
        }
    };
    let arch = match s.architecture {
        Some((line, value)) => arch_name(value).map_err(at(line))?,
        None => String::new(),
    };
    let multi_arch = match s.multi_arch {
        Some((line, value)) => lookup(&MULTI_ARCHES, value).ok_or_else(|| {
            parse_error(
                file,
                line,
                format!("'Multi-Arch' field has invalid value '{}'", show(value)),
            )
        })?,
        None => MultiArch::No,
    };
    let conffiles = match s.conffiles {
        Some((line, value)) => parse_conffiles(value, line, file)?,
        None => Vec::new(),
    };
    Ok(StatusRecord {
        line: s.line,
        name,
        arch,
        version,
        want,
        error,
        state,
        multi_arch,
        conffiles,
    })
}

fn status_words(value: &[u8]) -> Result<(Want, ErrorFlag, State), String> {
    let mut words = value.split(|&b| is_space(b)).filter(|w| !w.is_empty());
    let mut word = |which: &str| {
        words
            .next()
            .ok_or_else(|| format!("'Status' field has no {which} word"))
    };
    let (w, e, s) = (word("first")?, word("second")?, word("third")?);
    let invalid = |which: &str, w: &[u8]| {
        format!(
            "{which} word in 'Status' field has invalid value '{}'",
            show(w)
        )
    };
    let want = lookup(&WANTS, w).ok_or_else(|| invalid("first (want)", w))?;
    let error = lookup(&ERROR_FLAGS, e).ok_or_else(|| invalid("second (error)", e))?;
    let state = lookup(&STATES, s).ok_or_else(|| invalid("third (status)", s))?;
    if words.next().is_some() {
        return Err("'Status' field has more than three words".to_string());
    }
    Ok((want, error, state))
}

/// dpkg's package name rule: a letter or digit, then letters, digits and `-+._`. Lower-cased,
/// as dpkg does. The rule matters here: the name names files in `info/`.
fn package_name(value: &[u8]) -> Result<String, String> {
    let Some(&first) = value.first() else {
        return Err("empty package name".to_string());
    };
    if !first.is_ascii_alphanumeric() {
        return Err(format!(
            "invalid package name '{}': must start with a letter or digit",
            show(value)
        ));
    }
    if let Some(&bad) = value
        .iter()
        .find(|&&b| !(b.is_ascii_alphanumeric() || b"-+._".contains(&b)))
    {
        return Err(format!(
            "invalid package name '{}': character '{}' not allowed",
            show(value),
            show(&[bad])
        ));
    }
    Ok(value
        .iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// dpkg's architecture name rule (letters, digits, `-`); it names files in `info/`.
fn arch_name(value: &[u8]) -> Result<String, String> {
    if let Some(&bad) = value
        .iter()
        .find(|&&b| !(b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(format!(
            "invalid architecture name '{}': character '{}' not allowed",
            show(value),
            show(&[bad])
        ));
    }
    Ok(value.iter().map(|&b| char::from(b)).collect())
}

/// A version as written; dpkg refuses embedded whitespace, and versions are printable ASCII.
fn version_string(value: &[u8]) -> Result<String, String> {
    if value.is_empty() {
        return Err("empty 'Version' field".to_string());
    }
    if value.iter().any(|&b| is_space(b)) {
        return Err(format!("version '{}' has embedded whitespace", show(value)));
    }
    if let Some(&bad) = value.iter().find(|&&b| !b.is_ascii_graphic()) {
        return Err(format!(
            "version '{}' has invalid character '{}'",
            show(value),
            show(&[bad])
        ));
    }
    Ok(value.iter().map(|&b| char::from(b)).collect())
}

/// The value of a `Conffiles` field (starting right after the colon), whose field name is on
/// line `line`: nothing on the first line, one conffile per continuation line.
fn parse_conffiles(value: &[u8], line: usize, file: &Path) -> Result<Vec<Conffile>, PackageError> {
    let mut lines = value.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    if !first.is_empty() {
        return Err(parse_error(
            file,
            line,
            format!(
                "value of 'Conffiles' field must start on the next line, not with '{}'",
                show(first)
            ),
        ));
    }
    let mut conffiles = Vec::new();
    for (i, entry) in lines.enumerate() {
        let entry = trim(entry);
        if entry.is_empty() {
            continue;
        }
        conffiles.push(conffile(entry).map_err(|what| parse_error(file, line + 1 + i, what))?);
    }
    Ok(conffiles)
}

/// One conffile, read from the right as dpkg does (the path may contain spaces):
/// `path hash [obsolete] [remove-on-upgrade]`.
fn conffile(entry: &[u8]) -> Result<Conffile, String> {
    let malformed = || {
        format!(
            "malformed 'Conffiles' line '{}' (expected: path md5 [obsolete] [remove-on-upgrade])",
            show(entry)
        )
    };
    let (mut rest, mut word) = split_last_word(entry).ok_or_else(malformed)?;
    let remove_on_upgrade = word == b"remove-on-upgrade";
    if remove_on_upgrade {
        (rest, word) = split_last_word(rest).ok_or_else(malformed)?;
    }
    let obsolete = word == b"obsolete";
    if obsolete {
        (rest, word) = split_last_word(rest).ok_or_else(malformed)?;
    }
    let md5 = match word {
        b"newconffile" | b"nonexistent" | b"-" => None,
        hash => Some(md5_hex(hash).ok_or_else(|| {
            format!(
                "conffile hash '{}' is neither an MD5 sum nor a dpkg marker",
                show(hash)
            )
        })?),
    };
    Ok(Conffile {
        path: normalize_path(rest)?,
        md5,
        obsolete,
        remove_on_upgrade,
    })
}

/// Splits `s` (trimmed) at its last whitespace: (what comes before, trimmed; the last word).
/// `None` when `s` is a single word.
fn split_last_word(s: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = s.iter().rposition(|&b| is_space(b))?;
    let rest = trim_end(&s[..i]);
    if rest.is_empty() {
        return None;
    }
    Some((rest, &s[i + 1..]))
}

/// Refuses two stanzas for one (name, arch), and two installed instances of a package that
/// are not all `Multi-Arch: same`, as dpkg does. Sorts by (name, arch) as a side effect.
fn check_instances(records: &mut [StatusRecord], file: &Path) -> Result<(), PackageError> {
    records.sort_by(|a, b| (&a.name, &a.arch).cmp(&(&b.name, &b.arch)));
    for group in records.chunk_by(|a, b| a.name == b.name) {
        for pair in group.windows(2) {
            if pair[0].arch == pair[1].arch {
                let (first, second) = (
                    pair[0].line.min(pair[1].line),
                    pair[0].line.max(pair[1].line),
                );
                return Err(parse_error(
                    file,
                    second,
                    format!(
                        "second stanza for package '{}:{}' (the first is at line {first})",
                        pair[0].name, pair[0].arch
                    ),
                ));
            }
        }
        let mut live = group.iter().filter(|r| r.state != State::NotInstalled);
        if let (Some(a), Some(b)) = (live.next(), live.next())
            && group
                .iter()
                .filter(|r| r.state != State::NotInstalled)
                .any(|r| r.multi_arch != MultiArch::Same)
        {
            return Err(parse_error(
                file,
                a.line.max(b.line),
                format!(
                    "package '{}' is present for architectures '{}' and '{}' but is not \
                     'Multi-Arch: same'",
                    a.name, a.arch, b.arch
                ),
            ));
        }
    }
    Ok(())
}

/// Parses an `info/<pkg>.list` file: one path per line, as raw bytes. `/.` is the root
/// directory; paths are normalized to baseline path rules (absolute, no trailing slash).
pub fn parse_list(data: &[u8], file: &Path) -> Result<Vec<Vec<u8>>, PackageError> {
    require_final_newline(data, file)?;
    // A path per ~40 bytes on real lists; never more than the input can hold.
    let mut paths = Vec::with_capacity(data.len() / 40);
    for (number, _, line) in Lines::new(data) {
        if line.is_empty() {
            return Err(parse_error(file, number, "empty path"));
        }
        paths.push(normalize_path(line).map_err(|what| parse_error(file, number, what))?);
    }
    Ok(paths)
}

/// Parses an `info/<pkg>.md5sums` file: `md5hex␠␠relative/path` (or `md5hex␠*path`), as
/// `md5sum` writes it, including its escaping: a line starting with `\` has `\\`, `\n` and
/// `\r` escapes in the path. A missing final newline and blank lines are tolerated (md5sum
/// and debsums tolerate them).
pub fn parse_md5sums<'a>(data: &'a [u8], file: &Path) -> Result<Vec<Md5sum<'a>>, PackageError> {
    let mut sums = Vec::with_capacity(data.len() / 64);
    for (number, _, line) in Lines::new(data) {
        if line.is_empty() {
            continue;
        }
        let at = |what: String| parse_error(file, number, what);
        let (escaped, rest) = match line.strip_prefix(b"\\") {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let (Some(hash), Some(sep), Some(raw)) = (rest.get(..32), rest.get(32..34), rest.get(34..))
        else {
            return Err(at(format!(
                "malformed line '{}' (expected: md5  path)",
                show(line)
            )));
        };
        let md5 = md5_hex(hash).ok_or_else(|| at(format!("'{}' is not an MD5 sum", show(hash))))?;
        if sep != b"  " && sep != b" *" {
            return Err(at(format!(
                "malformed line '{}' (expected two spaces after the MD5 sum)",
                show(line)
            )));
        }
        let mut raw = raw;
        loop {
            if let Some(r) = raw.strip_prefix(b"./") {
                raw = r;
            } else if let Some(r) = raw.strip_prefix(b"/") {
                raw = r;
            } else {
                break;
            }
        }
        let path = if escaped {
            Cow::Owned(unescape_md5sum(raw).map_err(at)?)
        } else {
            Cow::Borrowed(raw)
        };
        if !valid_relative(&path) {
            return Err(at(format!("invalid path '{}'", show(&path))));
        }
        sums.push(Md5sum { path, md5 });
    }
    Ok(sums)
}

fn unescape_md5sum(raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'\\') => out.push(b'\\'),
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            _ => return Err(format!("invalid escape in path '{}'", show(raw))),
        }
    }
    Ok(out)
}

/// Parses `var/lib/dpkg/diversions`: groups of three lines (the diverted path, where it is
/// diverted to, the diverting package or `:` for a local diversion).
pub fn parse_diversions(data: &[u8], file: &Path) -> Result<Vec<Diversion>, PackageError> {
    require_final_newline(data, file)?;
    let mut diversions = Vec::new();
    let mut from_lines = Vec::new();
    let mut to_lines = Vec::new();
    let mut lines = Lines::new(data);
    while let Some((n_from, _, from)) = lines.next() {
        let Some((n_to, _, to)) = lines.next() else {
            return Err(parse_error(
                file,
                n_from,
                format!("diversion of '{}' has no diverted-to line", show(from)),
            ));
        };
        let Some((n_by, _, by)) = lines.next() else {
            return Err(parse_error(
                file,
                n_to,
                format!("diversion of '{}' has no package line", show(from)),
            ));
        };
        let from = normalize_path(from).map_err(|w| parse_error(file, n_from, w))?;
        let to = normalize_path(to).map_err(|w| parse_error(file, n_to, w))?;
        let package = if by == b":" {
            None
        } else {
            Some(package_name(by).map_err(|w| parse_error(file, n_by, w))?)
        };
        from_lines.push(n_from);
        to_lines.push(n_to);
        diversions.push(Diversion { from, to, package });
    }
    // dpkg-divert never writes two diversions of one path, nor two to one path.
    unique(
        &diversions,
        |d| &d.from,
        &from_lines,
        file,
        "second diversion of",
    )?;
    unique(
        &diversions,
        |d| &d.to,
        &to_lines,
        file,
        "second diversion to",
    )?;
    Ok(diversions)
}

/// Parses `var/lib/dpkg/statoverride`: lines `user group mode path` (mode in octal; user and
/// group are names or `#id`; the path is the rest of the line).
pub fn parse_statoverride(data: &[u8], file: &Path) -> Result<Vec<StatOverride>, PackageError> {
    require_final_newline(data, file)?;
    let mut overrides = Vec::new();
    let mut lines_of = Vec::new();
    for (number, _, line) in Lines::new(data) {
        let at = |what: String| parse_error(file, number, what);
        let mut parts = line.splitn(4, |&b| b == b' ');
        let (Some(user), Some(group), Some(mode), Some(path)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(at(format!(
                "malformed line '{}' (expected: user group mode path)",
                show(line)
            )));
        };
        let mode_value = parse_octal_mode(mode).ok_or_else(|| {
            at(format!(
                "invalid mode '{}' (expected octal, at most 7777)",
                show(mode)
            ))
        })?;
        overrides.push(StatOverride {
            path: normalize_path(path).map_err(at)?,
            user: owner_name(user).map_err(at)?,
            group: owner_name(group).map_err(at)?,
            mode: mode_value,
        });
        lines_of.push(number);
    }
    unique(
        &overrides,
        |o| &o.path,
        &lines_of,
        file,
        "second stat override for",
    )?;
    Ok(overrides)
}

fn parse_octal_mode(s: &[u8]) -> Option<u32> {
    if s.is_empty() || s.len() > 6 || !s.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return None;
    }
    let mode = s.iter().fold(0u32, |m, &b| m * 8 + u32::from(b - b'0'));
    (mode <= 0o7777).then_some(mode)
}

/// A user or group name (or `#uid`) as a string: non-empty UTF-8 without whitespace or
/// control characters.
fn owner_name(s: &[u8]) -> Result<String, String> {
    match std::str::from_utf8(s) {
        Ok(name)
            if !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c.is_control()) =>
        {
            Ok(name.to_string())
        }
        _ => Err(format!("invalid user or group name '{}'", show(s))),
    }
}

/// Fails if two items share a key; the error names the later line and the earlier one.
fn unique<T>(
    items: &[T],
    key: impl Fn(&T) -> &Vec<u8>,
    lines: &[usize],
    file: &Path,
    what: &str,
) -> Result<(), PackageError> {
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by(|&a, &b| key(&items[a]).cmp(key(&items[b])).then(a.cmp(&b)));
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if key(&items[a]) == key(&items[b]) {
            return Err(parse_error(
                file,
                lines[b],
                format!(
                    "{what} '{}' (the first is at line {})",
                    show(key(&items[b])),
                    lines[a]
                ),
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Byte helpers.

/// Lines of `data`, split at `\n` (not included), numbered from 1, with their offset. A last
/// line without `\n` is returned too; callers that need one call [`require_final_newline`].
struct Lines<'a> {
    data: &'a [u8],
    pos: usize,
    number: usize,
}

impl<'a> Lines<'a> {
    fn new(data: &'a [u8]) -> Lines<'a> {
        Lines {
            data,
            pos: 0,
            number: 0,
        }
    }
}

impl<'a> Iterator for Lines<'a> {
    /// (line number, offset of the line in the data, the line)
    type Item = (usize, usize, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.data.get(self.pos..).filter(|r| !r.is_empty())?;
        let start = self.pos;
        let len = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        self.pos = start + len + 1;
        self.number += 1;
        Some((self.number, start, &rest[..len]))
    }
}

/// dpkg refuses database files whose last line is not terminated (a sign of truncation).
fn require_final_newline(data: &[u8], file: &Path) -> Result<(), PackageError> {
    match data.last() {
        Some(&b) if b != b'\n' => {
            let line = data.iter().filter(|&&b| b == b'\n').count() + 1;
            Err(parse_error(
                file,
                line,
                "missing final newline (is the file truncated?)",
            ))
        }
        _ => Ok(()),
    }
}

/// Whitespace as dpkg's parser (C `isspace`) sees it.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

fn trim_end(s: &[u8]) -> &[u8] {
    let end = s.iter().rposition(|&b| !is_space(b)).map_or(0, |i| i + 1);
    &s[..end]
}

fn trim(s: &[u8]) -> &[u8] {
    let s = trim_end(s);
    let start = s.iter().position(|&b| !is_space(b)).unwrap_or(s.len());
    &s[start..]
}

fn md5_hex(hex: &[u8]) -> Option<[u8; 16]> {
    if hex.len() != 32 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// A path from the database in baseline form: `/.` is `/`, trailing slashes go, a missing
/// leading slash is added (dpkg roots conffile names the same way); anything else that breaks
/// the baseline path rules (`..`, empty components, NUL) is refused.
fn normalize_path(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw == b"/." {
        return Ok(b"/".to_vec());
    }
    let mut p = raw;
    while p.len() > 1 && p.ends_with(b"/") {
        p = &p[..p.len() - 1];
    }
    let mut path = Vec::with_capacity(p.len() + 1);
    if p.first() != Some(&b'/') {
        path.push(b'/');
    }
    path.extend_from_slice(p);
    baseline_path::validate(&path).map_err(|e| format!("invalid path '{}': {e}", show(raw)))?;
    Ok(path)
}

/// True when `/` + `p` is a valid baseline path other than `/`.
fn valid_relative(p: &[u8]) -> bool {
    !p.is_empty()
        && !p.contains(&0)
        && p.split(|&b| b == b'/')
            .all(|c| !c.is_empty() && c != b"." && c != b"..")
}

/// Input quoted in a message: escaped, and cut at [`SHOW_MAX`] bytes.
fn show(b: &[u8]) -> String {
    if b.len() > SHOW_MAX {
        format!("{}...", escape::bytes(&b[..SHOW_MAX]))
    } else {
        escape::bytes(b)
    }
}

fn parse_error(file: &Path, line: usize, what: impl Into<String>) -> PackageError {
    PackageError::Parse {
        path: file.to_path_buf(),
        position: format!("line {line}"),
        what: what.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Reading the files of one root.

/// `var/lib/dpkg` of one root: files opened inside the root, within a byte budget.
#[derive(Debug)]
struct AdminDir {
    root: PathBuf,
    root_fd: OwnedFd,
    openat2: std::cell::Cell<bool>,
    read_total: std::cell::Cell<u64>,
}

impl AdminDir {
    fn open(root: &Path) -> Result<AdminDir, PackageError> {
        let root_fd = nix::fcntl::open(
            root,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| PackageError::Io {
            path: root.to_path_buf(),
            source: e.into(),
        })?;
        Ok(AdminDir {
            root: root.to_path_buf(),
            root_fd,
            openat2: std::cell::Cell::new(true),
            read_total: std::cell::Cell::new(0),
        })
    }

    /// The full path of `rel` (relative to the admin dir), for messages.
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(ADMIN_DIR).join(rel)
    }

    /// Opens `rel` inside the root: symlinks on the way resolve against the root, never the
    /// host. Without openat2 (Linux < 5.6, or filtered by seccomp) intermediate symlinks are
    /// followed as the kernel does.
    fn open_in_root(&self, rel: &str, flags: OFlag) -> Result<OwnedFd, Errno> {
        let rel = format!("{ADMIN_DIR}/{rel}");
        if self.openat2.get() {
            let how = OpenHow::new()
                .flags(flags)
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            match nix::fcntl::openat2(&self.root_fd, rel.as_str(), how) {
                Err(Errno::ENOSYS) => self.openat2.set(false),
                // seccomp filters that predate openat2 answer EPERM; a real EPERM repeats below.
                Err(Errno::EPERM) => {}
                result => return result,
            }
        }
        nix::fcntl::openat(&self.root_fd, rel.as_str(), flags, Mode::empty())
    }

    /// The content of the regular file `rel`, `None` if it does not exist.
    fn read(&self, rel: &str) -> Result<Option<Vec<u8>>, PackageError> {
        let path = self.path(rel);
        let io_error = |source: io::Error| PackageError::Io {
            path: path.clone(),
            source,
        };
        let flags = OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY;
        let fd = match self.open_in_root(rel, flags) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(Errno::ELOOP) => {
                return Err(io_error(io::Error::other(
                    "is a symbolic link (database files are not read through symlinks)",
                )));
            }
            Err(e) => return Err(io_error(e.into())),
        };
        let file = File::from(fd);
        let meta = file.metadata().map_err(io_error)?;
        if !meta.is_file() {
            return Err(io_error(io::Error::other("not a regular file")));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(io_error(io::Error::other(format!(
                "{} bytes: larger than the {} MiB a dpkg database file may have",
                meta.len(),
                MAX_FILE_BYTES >> 20
            ))));
        }
        let total = self.read_total.get() + meta.len();
        if total > MAX_TOTAL_BYTES {
            return Err(io_error(io::Error::other(format!(
                "the dpkg database exceeds {} MiB in total",
                MAX_TOTAL_BYTES >> 20
            ))));
        }
        // usize::try_from cannot fail for a length below MAX_FILE_BYTES on 64-bit targets.
        let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        // The file may grow while read: read one byte past the limit to notice.
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut data)
            .map_err(io_error)?;
        if data.len() as u64 > MAX_FILE_BYTES {
            return Err(io_error(io::Error::other(
                "grew beyond the size limit while read",
            )));
        }
        self.read_total
            .set(self.read_total.get() + data.len() as u64);
        Ok(Some(data))
    }

    /// Names of the journal files in `updates/` (all digits, as dpkg writes them), sorted.
    fn journal_names(&self) -> Result<Vec<String>, PackageError> {
        let path = self.path("updates");
        let io_error = |source: io::Error| PackageError::Io {
            path: path.clone(),
            source,
        };
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        let dir = match self.open_in_root("updates", flags) {
            Ok(fd) => File::from(fd),
            Err(Errno::ENOENT) => return Ok(Vec::new()),
            Err(e) => return Err(io_error(e.into())),
        };
        // Listing goes by path (std has no fd-based listing); it must be the directory that
        // was opened inside the root, not one a symlink leads to outside it.
        let inside = dir.metadata().map_err(io_error)?;
        let by_path = std::fs::metadata(&path).map_err(io_error)?;
        if (inside.dev(), inside.ino()) != (by_path.dev(), by_path.ino()) {
            return Err(io_error(io::Error::other(
                "resolves outside the root; not listed",
            )));
        }
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&path).map_err(io_error)? {
            let entry = entry.map_err(io_error)?;
            let name = entry.file_name();
            if let Some(name) = name.to_str()
                && !name.is_empty()
                && name.bytes().all(|b| b.is_ascii_digit())
            {
                if names.len() == MAX_JOURNAL_FILES {
                    return Err(io_error(io::Error::other(format!(
                        "more than {MAX_JOURNAL_FILES} journal files"
                    ))));
                }
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use md5::{Digest as _, Md5};
    use std::process::Command;

    fn p() -> &'static Path {
        Path::new("status")
    }

    /// The message of a parse error, with its position, or a panic.
    fn parse_failure(result: Result<impl std::fmt::Debug, PackageError>) -> (String, String) {
        match result {
            Err(PackageError::Parse { position, what, .. }) => (position, what),
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    fn stanza(name: &str, arch: &str, status: &str, extra: &str) -> String {
        format!(
            "Package: {name}\nStatus: {status}\nPriority: optional\nArchitecture: {arch}\n\
             Version: 1.0-1\n{extra}Description: the {name} package\n long text\n .\n more\n\n"
        )
    }

    /// A root with a dpkg database written by the test.
    struct Root(tempfile::TempDir);

    impl Root {
        fn new(status: &str) -> Root {
            let root = Root(tempfile::tempdir().unwrap());
            std::fs::create_dir_all(root.0.path().join("var/lib/dpkg/info")).unwrap();
            root.write("status", status.as_bytes());
            root
        }

        fn write(&self, rel: &str, data: &[u8]) {
            let path = self.0.path().join("var/lib/dpkg").join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, data).unwrap();
        }

        fn read(&self) -> Manifest {
            read(self.0.path()).unwrap()
        }
    }

    fn package<'a>(m: &'a Manifest, key: &str) -> &'a Package {
        m.packages
            .iter()
            .find(|p| p.key() == key)
            .unwrap_or_else(|| panic!("no package {key} in {:?}", m.packages))
    }

    fn file<'a>(p: &'a Package, path: &[u8]) -> &'a PackageFile {
        p.files
            .iter()
            .find(|f| f.path == path)
            .unwrap_or_else(|| panic!("{} has no {}", p.key(), escape::bytes(path)))
    }

    fn paths(p: &Package) -> Vec<&[u8]> {
        p.files.iter().map(|f| f.path.as_slice()).collect()
    }

    const MD5_A: &str = "0123456789abcdef0123456789abcdef";
    const MD5_A_BYTES: [u8; 16] = [
        0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd,
        0xef,
    ];

    #[test]
    fn stanzas_with_continuation_lines_and_fields_in_any_case() {
        let data = b"PACKAGE: Foo\nstatus:   install ok installed  \nversion: 1:2.3-4\n\
            Description: short\n long\n .\n  indented\n\tTab continued\narchitecture : amd64\n\
            X-Unknown: kept out\n\n\n\
            Package: bar\nStatus: install\n ok\n installed\nVersion: 2\nArchitecture: all\n";
        let records = parse_status(data, p()).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].name, "bar");
        assert_eq!(records[0].state, State::Installed);
        assert_eq!(records[0].line, 13);
        let foo = &records[1];
        assert_eq!(foo.name, "foo", "names are lower-cased as dpkg does");
        assert_eq!(foo.version, "1:2.3-4", "the epoch is part of the version");
        assert_eq!(foo.arch, "amd64");
        assert_eq!(
            (foo.want, foo.error, foo.state),
            (Want::Install, ErrorFlag::Ok, State::Installed)
        );
        assert_eq!(foo.multi_arch, MultiArch::No);
        assert_eq!(foo.line, 1);
    }

    #[test]
    fn every_status_word() {
        for (word, state) in STATES {
            let version = if state == State::NotInstalled {
                ""
            } else {
                "Version: 1\n"
            };
            let data =
                format!("Package: a\nStatus: install ok {word}\n{version}Architecture: all\n");
            let r = parse_status(data.as_bytes(), p()).unwrap();
            assert_eq!(r[0].state, state, "{word}");
            assert_eq!(r[0].state.as_str(), word);
        }
        for (word, want) in WANTS {
            let data = format!("Package: a\nStatus: {word} ok installed\nVersion: 1\n");
            assert_eq!(parse_status(data.as_bytes(), p()).unwrap()[0].want, want);
        }
        let r = parse_status(
            b"Package: a\nStatus: install reinstreq half-installed\n",
            p(),
        )
        .unwrap();
        assert_eq!(r[0].error, ErrorFlag::ReinstReq);
        assert_eq!(
            r[0].version, "",
            "half-installed packages may lack a version"
        );
        let r = parse_status(b"Package: a\nStatus: Hold OK Installed\nVersion: 1\n", p()).unwrap();
        assert_eq!((r[0].want, r[0].state), (Want::Hold, State::Installed));
        let r = parse_status(b"Package: a\nVersion: 1\n", p()).unwrap();
        assert_eq!(
            r[0].state,
            State::NotInstalled,
            "no Status means not-installed"
        );
    }

    #[test]
    fn manifest_keeps_every_state_but_not_installed() {
        let mut status = String::new();
        for (word, _) in STATES {
            let extra = if word == "config-files" {
                format!("Conffiles:\n /etc/{word}.conf {MD5_A}\n")
            } else {
                String::new()
            };
            status += &stanza(
                &format!("pkg-{word}"),
                "amd64",
                &format!("install ok {word}"),
                &extra,
            );
        }
        let root = Root::new(&status);
        for (word, _) in STATES {
            if word != "config-files" {
                root.write(&format!("info/pkg-{word}.list"), b"/usr\n");
            }
        }
        let m = root.read();
        let states: Vec<&str> = m.packages.iter().map(|p| p.state.as_str()).collect();
        assert_eq!(
            states,
            [
                "config-files",
                "half-configured",
                "half-installed",
                "installed",
                "triggers-awaited",
                "triggers-pending",
                "unpacked"
            ]
        );
        assert!(m.notes.is_empty(), "{:?}", m.notes);
        assert_eq!(m.manager, Manager::Dpkg);
    }

    #[test]
    fn multi_arch_same_packages_use_qualified_info_names() {
        let status = stanza(
            "libfoo1",
            "amd64",
            "install ok installed",
            "Multi-Arch: same\n",
        ) + &stanza(
            "libfoo1",
            "i386",
            "install ok installed",
            "Multi-Arch: same\n",
        ) + &stanza(
            "tool",
            "amd64",
            "install ok installed",
            "Multi-Arch: foreign\n",
        ) + &stanza("old", "amd64", "install ok installed", "");
        let root = Root::new(&status);
        root.write(
            "info/libfoo1:amd64.list",
            b"/usr/lib/x86_64-linux-gnu/libfoo.so.1\n",
        );
        root.write(
            "info/libfoo1:amd64.md5sums",
            format!("{MD5_A}  usr/lib/x86_64-linux-gnu/libfoo.so.1\n").as_bytes(),
        );
        root.write(
            "info/libfoo1:i386.list",
            b"/usr/lib/i386-linux-gnu/libfoo.so.1\n",
        );
        root.write("info/tool.list", b"/usr/bin/tool\n");
        // A package whose list sits under the other form is found all the same.
        root.write("info/old:amd64.list", b"/usr/bin/old\n");
        let m = root.read();
        let keys: Vec<String> = m.packages.iter().map(Package::key).collect();
        assert_eq!(
            keys,
            ["libfoo1:amd64", "libfoo1:i386", "old:amd64", "tool:amd64"]
        );
        let amd64 = package(&m, "libfoo1:amd64");
        assert_eq!(
            file(amd64, b"/usr/lib/x86_64-linux-gnu/libfoo.so.1").digest,
            Some(Digest::Md5(MD5_A_BYTES))
        );
        assert_eq!(
            paths(package(&m, "libfoo1:i386")),
            [b"/usr/lib/i386-linux-gnu/libfoo.so.1"]
        );
        assert_eq!(paths(package(&m, "tool:amd64")), [b"/usr/bin/tool"]);
        assert_eq!(paths(package(&m, "old:amd64")), [b"/usr/bin/old"]);
        assert!(m.notes.is_empty());
    }

    #[test]
    fn conffiles_with_md5_obsolete_remove_on_upgrade_and_markers() {
        let conffiles = format!(
            "Conffiles:\n /etc/a.conf {MD5_A}\n /etc/with space.conf {MD5_A}\n \
             /etc/old.conf {MD5_A} obsolete\n /etc/gone.conf {MD5_A} obsolete remove-on-upgrade\n \
             /etc/rou.conf {MD5_A} remove-on-upgrade\n /etc/new.conf newconffile\n"
        );
        let status = stanza("pkg", "all", "install ok installed", &conffiles);
        let r = parse_status(status.as_bytes(), p()).unwrap();
        let c = &r[0].conffiles;
        assert_eq!(c.len(), 6);
        assert_eq!(
            c[0],
            Conffile {
                path: b"/etc/a.conf".to_vec(),
                md5: Some(MD5_A_BYTES),
                obsolete: false,
                remove_on_upgrade: false
            }
        );
        assert_eq!(c[1].path, b"/etc/with space.conf");
        assert!(c[2].obsolete && !c[2].remove_on_upgrade);
        assert!(c[3].obsolete && c[3].remove_on_upgrade);
        assert!(!c[4].obsolete && c[4].remove_on_upgrade);
        assert_eq!(c[5].md5, None);

        let root = Root::new(&status);
        root.write(
            "info/pkg.list",
            b"/.\n/etc\n/etc/a.conf\n/etc/with space.conf\n/etc/new.conf\n/usr/bin/pkg\n",
        );
        // md5sums usually lacks conffiles; when it has one, the status field wins.
        let other = "ffffffffffffffffffffffffffffffff";
        root.write(
            "info/pkg.md5sums",
            format!("{other}  etc/a.conf\n{MD5_A}  usr/bin/pkg\n").as_bytes(),
        );
        let m = root.read();
        let pkg = package(&m, "pkg:all");
        let a = file(pkg, b"/etc/a.conf");
        assert!(a.config);
        assert_eq!(a.digest, Some(Digest::Md5(MD5_A_BYTES)));
        let old = file(pkg, b"/etc/old.conf");
        assert!(old.config, "an obsolete conffile is still the package's");
        assert_eq!(old.digest, Some(Digest::Md5(MD5_A_BYTES)));
        assert!(file(pkg, b"/etc/gone.conf").config);
        let new = file(pkg, b"/etc/new.conf");
        assert!(new.config);
        assert_eq!(new.digest, None);
        assert!(!file(pkg, b"/usr/bin/pkg").config);
        assert!(!file(pkg, b"/").config);
        assert_eq!(file(pkg, b"/etc").digest, None);
    }

    #[test]
    fn config_files_packages_keep_only_their_conffiles() {
        let status = stanza(
            "removed",
            "amd64",
            "deinstall ok config-files",
            &format!(
                "Conffiles:\n /etc/removed.conf {MD5_A}\n /etc/removed/other obsolete-hash-marker-not\n"
            ),
        );
        // That conffile line has an invalid hash: refused.
        assert!(parse_status(status.as_bytes(), p()).is_err());
        let status = stanza(
            "removed",
            "amd64",
            "deinstall ok config-files",
            &format!("Conffiles:\n /etc/removed.conf {MD5_A}\n"),
        );
        let root = Root::new(&status);
        // A leftover list is ignored: only conffiles stay on disk.
        root.write(
            "info/removed.list",
            b"/usr/bin/removed\n/etc/removed.conf\n",
        );
        let m = root.read();
        let pkg = package(&m, "removed:amd64");
        assert_eq!(pkg.state, "config-files");
        assert_eq!(paths(pkg), [b"/etc/removed.conf"]);
        assert!(pkg.files[0].config);
        assert!(
            m.notes.is_empty(),
            "no list is expected for config-files: {:?}",
            m.notes
        );
    }

    #[test]
    fn diversions_by_another_package_move_the_file_local_ones_too() {
        let status = stanza("dash", "amd64", "install ok installed", "")
            + &stanza("bash", "amd64", "install ok installed", "")
            + &stanza("tool", "amd64", "install ok installed", "");
        let root = Root::new(&status);
        root.write("info/dash.list", b"/bin/sh\n/usr/bin/dash\n");
        root.write("info/bash.list", b"/bin/sh\n/usr/bin/bash\n");
        root.write("info/tool.list", b"/usr/bin/tool\n/etc/tool.conf\n");
        root.write("info/bash.md5sums", format!("{MD5_A}  bin/sh\n").as_bytes());
        root.write(
            "diversions",
            b"/bin/sh\n/bin/sh.distrib\ndash\n/usr/bin/tool\n/usr/bin/tool.orig\n:\n",
        );
        let m = root.read();
        assert_eq!(
            m.diversions,
            [
                Diversion {
                    from: b"/bin/sh".to_vec(),
                    to: b"/bin/sh.distrib".to_vec(),
                    package: Some("dash".into())
                },
                Diversion {
                    from: b"/usr/bin/tool".to_vec(),
                    to: b"/usr/bin/tool.orig".to_vec(),
                    package: None
                },
            ]
        );
        // dash diverted it: dash's own /bin/sh stays where it is.
        assert_eq!(
            paths(package(&m, "dash:amd64")),
            [&b"/bin/sh"[..], b"/usr/bin/dash"]
        );
        // bash's copy lives at the diverted-to path, with its checksum.
        let bash = package(&m, "bash:amd64");
        assert_eq!(paths(bash), [&b"/bin/sh.distrib"[..], b"/usr/bin/bash"]);
        assert_eq!(bash.files[0].digest, Some(Digest::Md5(MD5_A_BYTES)));
        // A local diversion applies to every package.
        assert_eq!(
            paths(package(&m, "tool:amd64")),
            [&b"/etc/tool.conf"[..], b"/usr/bin/tool.orig"]
        );
    }

    #[test]
    fn stat_overrides_are_recorded_and_applied() {
        let status = stanza("sudo", "amd64", "install ok installed", "");
        let root = Root::new(&status);
        root.write(
            "info/sudo.list",
            b"/usr/bin/sudo\n/var/lib/sudo\n/usr/bin/with space\n",
        );
        root.write(
            "statoverride",
            b"root root 4711 /usr/bin/sudo\n#0 adm 750 /var/lib/sudo/\nroot root 0755 /usr/bin/with space\nnobody nogroup 0600 /not/owned\n",
        );
        let m = root.read();
        assert_eq!(m.stat_overrides.len(), 4);
        assert_eq!(m.stat_overrides[3].path, b"/not/owned");
        let sudo = package(&m, "sudo:amd64");
        let bin = file(sudo, b"/usr/bin/sudo");
        assert_eq!(
            (bin.user.as_deref(), bin.group.as_deref(), bin.mode),
            (Some("root"), Some("root"), Some(0o4711))
        );
        let dir = file(sudo, b"/var/lib/sudo");
        assert_eq!(
            (dir.user.as_deref(), dir.group.as_deref(), dir.mode),
            (Some("#0"), Some("adm"), Some(0o750))
        );
        assert_eq!(file(sudo, b"/usr/bin/with space").mode, Some(0o755));
    }

    #[test]
    fn list_paths_are_raw_bytes_in_baseline_form() {
        let data = b"/.\n/etc/\n/usr/share/caf\xe9\n/usr/share/new\rline\n/usr/share/a b\n";
        let list = parse_list(data, Path::new("x.list")).unwrap();
        let want: Vec<&[u8]> = vec![
            b"/",
            b"/etc",
            b"/usr/share/caf\xe9",
            b"/usr/share/new\rline",
            b"/usr/share/a b",
        ];
        assert_eq!(list, want);
        for bad in [
            &b"/usr/../etc\n"[..],
            b"//etc\n",
            b"/a/./b\n",
            b"/a\0b\n",
            b"\n",
        ] {
            let (position, what) =
                parse_failure(parse_list(&[b"/ok\n", bad].concat(), Path::new("x.list")));
            assert_eq!(position, "line 2", "{what}");
        }
        let (position, what) = parse_failure(parse_list(b"/a\n/b", Path::new("x.list")));
        assert_eq!(position, "line 2");
        assert!(what.contains("final newline"), "{what}");
    }

    #[test]
    fn md5sums_join_the_list_and_keep_unlisted_sums() {
        let data = format!(
            "{MD5_A}  usr/bin/a\n{}  ./usr/bin/b\n\n{MD5_A} *usr/bin/binary-mode\n\\{MD5_A}  usr/share/back\\\\slash\\nnewline\n{MD5_A}  usr/bin/no-final-newline",
            MD5_A.to_uppercase()
        );
        let sums = parse_md5sums(data.as_bytes(), Path::new("x.md5sums")).unwrap();
        let got: Vec<&[u8]> = sums.iter().map(|s| &s.path[..]).collect();
        let want: Vec<&[u8]> = vec![
            b"usr/bin/a",
            b"usr/bin/b",
            b"usr/bin/binary-mode",
            b"usr/share/back\\slash\nnewline",
            b"usr/bin/no-final-newline",
        ];
        assert_eq!(got, want);
        assert!(sums.iter().all(|s| s.md5 == MD5_A_BYTES));
        assert!(
            matches!(sums[0].path, Cow::Borrowed(_)),
            "no allocation for plain lines"
        );

        for (bad, what) in [
            (format!("{MD5_A}  ../etc/shadow\n"), "invalid path"),
            ("0123  usr/bin/a\n".to_string(), "malformed"),
            (format!("{}  usr/bin/a\n", "g".repeat(32)), "not an MD5"),
            (format!("{MD5_A} usr/bin/a\n"), "two spaces"),
            (format!("{MD5_A}  \n"), "invalid path"),
        ] {
            let input = format!("{MD5_A}  ok\n{bad}");
            let (position, message) =
                parse_failure(parse_md5sums(input.as_bytes(), Path::new("x.md5sums")));
            assert_eq!(position, "line 2", "{message}");
            assert!(message.contains(what), "{message}");
        }

        let status = stanza("pkg", "all", "install ok installed", "");
        let root = Root::new(&status);
        root.write("info/pkg.list", b"/usr/bin/a\n/usr/bin\n");
        root.write(
            "info/pkg.md5sums",
            format!("{MD5_A}  usr/bin/a\n{MD5_A}  usr/bin/unlisted\n").as_bytes(),
        );
        let pkg = package(&root.read(), "pkg:all").clone();
        assert_eq!(
            paths(&pkg),
            [&b"/usr/bin"[..], b"/usr/bin/a", b"/usr/bin/unlisted"]
        );
        assert_eq!(pkg.files[0].digest, None);
        assert_eq!(pkg.files[2].digest, Some(Digest::Md5(MD5_A_BYTES)));
    }

    #[test]
    fn md5sums_in_any_order_join_the_same_way() {
        let status = stanza("pkg", "all", "install ok installed", "");
        let other = "ffffffffffffffffffffffffffffffff";
        let sorted =
            format!("{MD5_A}  usr/a\n{other}  usr/b\n{MD5_A}  usr/c-unlisted\n{other}  usr/d\n");
        let unsorted =
            format!("{other}  usr/d\n{MD5_A}  usr/c-unlisted\n{MD5_A}  usr/a\n{other}  usr/b\n");
        let mut seen = Vec::new();
        for sums in [sorted, unsorted] {
            let root = Root::new(&status);
            root.write("info/pkg.list", b"/usr/d\n/usr\n/usr/b\n/usr/a\n");
            root.write("info/pkg.md5sums", sums.as_bytes());
            seen.push(package(&root.read(), "pkg:all").files.clone());
        }
        assert_eq!(seen[0], seen[1]);
        let digests: Vec<Option<Digest>> = seen[0].iter().map(|f| f.digest.clone()).collect();
        let (a, f) = (
            Some(Digest::Md5(MD5_A_BYTES)),
            Some(Digest::Md5([0xff; 16])),
        );
        assert_eq!(digests, [None, a.clone(), f.clone(), a, f]);
        assert_eq!(seen[0][3].path, b"/usr/c-unlisted");
    }

    #[test]
    fn files_are_sorted_and_deduplicated() {
        let status = stanza(
            "pkg",
            "all",
            "install ok installed",
            &format!("Conffiles:\n /etc/b {MD5_A}\n"),
        );
        let root = Root::new(&status);
        root.write(
            "info/pkg.list",
            b"/usr/z\n/etc/b\n/etc\n/usr/z\n/\n/usr/z/\n/etc/a\n",
        );
        let m = root.read();
        assert_eq!(
            paths(&m.packages[0]),
            [&b"/"[..], b"/etc", b"/etc/a", b"/etc/b", b"/usr/z"]
        );
    }

    #[test]
    fn missing_list_is_a_note_and_missing_status_an_error() {
        let status = stanza(
            "ghost",
            "amd64",
            "install ok installed",
            &format!("Conffiles:\n /etc/ghost {MD5_A}\n"),
        ) + &stanza("fine", "amd64", "install ok installed", "");
        let root = Root::new(&status);
        root.write("info/fine.list", b"/usr/bin/fine\n");
        let m = root.read();
        let ghost = package(&m, "ghost:amd64");
        assert_eq!(paths(ghost), [b"/etc/ghost"], "only what status says");
        assert_eq!(m.notes.len(), 1);
        assert!(m.notes[0].contains("ghost:amd64"), "{:?}", m.notes);

        let empty = tempfile::tempdir().unwrap();
        match read(empty.path()) {
            Err(PackageError::Io { path, source }) => {
                assert_eq!(path, empty.path().join("var/lib/dpkg/status"));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected a missing-file error, got {other:?}"),
        }
    }

    #[test]
    fn the_status_step_reads_no_file_list_and_the_files_step_gives_what_read_gives() {
        let status = stanza("foo", "amd64", "install ok installed", "")
            + &stanza("bar", "amd64", "install ok unpacked", "")
            + &stanza("gone", "amd64", "deinstall ok config-files", "");
        let root = Root::new(&status);
        root.write("info/foo.list", b"/usr/bin/foo\n");
        root.write(
            "info/foo.md5sums",
            format!("{MD5_A}  usr/bin/foo\n").as_bytes(),
        );
        root.write("diversions", b"/usr/bin/bar\n/usr/bin/bar.real\nfoo\n");
        // Unreadable as a list: only the second step may notice.
        root.write("info/bar.list", b"no final newline");
        let step = read_status(root.0.path()).unwrap();
        let only = step.packages_only();
        let keys: Vec<(String, &str, &str)> = only
            .packages
            .iter()
            .map(|p| (p.key(), p.version.as_str(), p.state.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("bar:amd64".to_string(), "1.0-1", "unpacked"),
                ("foo:amd64".to_string(), "1.0-1", "installed"),
                ("gone:amd64".to_string(), "1.0-1", "config-files"),
            ]
        );
        assert!(only.packages.iter().all(|p| p.files.is_empty()));
        assert!(only.diversions.is_empty() && only.notes.is_empty());
        assert!(matches!(
            step.with_files(),
            Err(PackageError::Parse { path, .. }) if path.ends_with("info/bar.list")
        ));

        root.write("info/bar.list", b"/usr/bin/bar\n");
        let full = read_status(root.0.path()).unwrap().with_files().unwrap();
        assert_eq!(full, root.read());
        let names = |m: &Manifest| -> Vec<String> { m.packages.iter().map(Package::key).collect() };
        assert_eq!(names(&full), names(&only), "same packages, same order");
    }

    #[test]
    fn malformed_stanzas_name_their_line() {
        let cases: &[(&[u8], &str, &str)] = &[
            (b"Package: a\nStatus: install ok installed\nVersion: 1\nno colon here\n", "line 4", "colon"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1", "line 3", "final newline"),
            (b"Package: a\r\nStatus: install ok installed\r\nVersion: 1\r\n\r\nPackage: b\r\n", "line 4", "CRLF"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\nversion: 2\n", "line 4", "duplicate"),
            (b"\n\nPackage: a\nStatus: install ok bogus\nVersion: 1\n", "line 4", "third (status) word"),
            (b"Package: a\nStatus: install ok\nVersion: 1\n", "line 2", "no third word"),
            (b"Package: a\nStatus: install ok installed now\nVersion: 1\n", "line 2", "more than three"),
            (b"Package: a\nStatus: wish ok installed\nVersion: 1\n", "line 2", "first (want)"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\n\nStatus: install ok installed\nVersion: 1\n", "line 5", "no 'Package'"),
            (b"Package: a\nStatus: install ok installed\nArchitecture: all\n", "line 1", "no 'Version'"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1 2\n", "line 3", "whitespace"),
            (b"Package: ../../etc\nStatus: install ok installed\nVersion: 1\n", "line 1", "package name"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\nArchitecture: ../x\n", "line 4", "architecture"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\nMulti-Arch: maybe\n", "line 4", "Multi-Arch"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\n: empty\n", "line 4", "empty field name"),
            (b" Package: a\n", "line 1", "empty field name"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\nConffiles: /etc/a x\n", "line 4", "next line"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\nConffiles:\n /etc/a 0123456789abcdef0123456789abcdef\n /etc/b\n", "line 6", "malformed"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\nConffiles:\n /etc/a 0123\n", "line 5", "MD5"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\nConffiles:\n /etc/../a newconffile\n", "line 5", "invalid path"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\nArchitecture: all\n\nPackage: a\nStatus: install ok installed\nVersion: 2\nArchitecture: all\n", "line 6", "second stanza"),
            (b"Package: a\nStatus: install ok installed\nVersion: 1\nArchitecture: amd64\n\nPackage: a\nStatus: install ok installed\nVersion: 1\nArchitecture: i386\n", "line 6", "Multi-Arch: same"),
        ];
        for (data, position, what) in cases {
            let (got_position, got_what) = parse_failure(parse_status(data, p()));
            assert_eq!(
                &got_position,
                position,
                "{} -> {got_what}",
                escape::bytes(data)
            );
            assert!(
                got_what.contains(what),
                "{} -> {got_what}",
                escape::bytes(data)
            );
        }
        // What dpkg tolerates: a CR ending a value, whitespace before the colon, an empty file.
        let r = parse_status(
            b"Package: a\r\nStatus : install ok installed\r\nVersion: 1\r\n",
            p(),
        )
        .unwrap();
        assert_eq!((r[0].name.as_str(), r[0].version.as_str()), ("a", "1"));
        assert!(parse_status(b"", p()).unwrap().is_empty());
        assert!(parse_status(b"\n\n", p()).unwrap().is_empty());
    }

    #[test]
    fn malformed_diversions_and_overrides_name_their_line() {
        let f = Path::new("diversions");
        let (position, what) = parse_failure(parse_diversions(b"/a\n/a.distrib\n", f));
        assert_eq!(
            (position.as_str(), what.contains("no package line")),
            ("line 2", true)
        );
        let (position, _) = parse_failure(parse_diversions(b"/a\n/b\n:\n/c\n", f));
        assert_eq!(position, "line 4");
        let (position, what) = parse_failure(parse_diversions(b"/a\n/b\n:\n/a\n/c\nx\n", f));
        assert_eq!(
            (position.as_str(), what.contains("second diversion of")),
            ("line 4", true),
            "{what}"
        );
        let (position, what) = parse_failure(parse_diversions(b"/a\n/b\nNot/A/Package\n", f));
        assert_eq!(
            (position.as_str(), what.contains("package name")),
            ("line 3", true)
        );
        assert!(parse_diversions(b"", f).unwrap().is_empty());

        let f = Path::new("statoverride");
        for (data, position, what) in [
            (
                &b"root root 0755 /a\nroot root 8755 /b\n"[..],
                "line 2",
                "invalid mode",
            ),
            (b"root root 17777 /b\n", "line 1", "invalid mode"),
            (b"root root 0755\n", "line 1", "malformed"),
            (b"root root 0755 relative/../x\n", "line 1", "invalid path"),
            (
                b"root root 0755 /a\nroot adm 0700 /a/\n",
                "line 2",
                "second stat override",
            ),
            (b"\n", "line 1", "malformed"),
        ] {
            let (got_position, got_what) = parse_failure(parse_statoverride(data, f));
            assert_eq!(got_position, position, "{got_what}");
            assert!(got_what.contains(what), "{got_what}");
        }
    }

    #[test]
    fn journal_updates_override_status() {
        let status = stanza("a", "all", "install ok installed", "")
            + &stanza("b", "all", "install ok installed", "");
        let root = Root::new(&status);
        root.write("info/a.list", b"/a\n");
        root.write("info/b.list", b"/b\n");
        root.write("info/c.list", b"/c\n");
        root.write(
            "updates/0000",
            b"Package: a\nStatus: install ok unpacked\nVersion: 2\nArchitecture: all\n",
        );
        root.write(
            "updates/0001",
            b"Package: b\nStatus: purge ok not-installed\nArchitecture: all\n",
        );
        root.write(
            "updates/0002",
            b"Package: c\nStatus: install ok installed\nVersion: 3\nArchitecture: all\n",
        );
        root.write("updates/tmp.i", b"not a journal entry");
        let m = root.read();
        let got: Vec<(String, &str, &str)> = m
            .packages
            .iter()
            .map(|p| (p.key(), p.version.as_str(), p.state.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a:all".to_string(), "2", "unpacked"),
                ("c:all".to_string(), "3", "installed")
            ]
        );
    }

    #[test]
    fn nothing_is_read_through_symlinks_or_outside_the_root() {
        // An absolute symlink in the image resolves inside the image, not on the host.
        let outside = Root::new(&stanza("host-only", "all", "install ok installed", ""));
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("var/lib")).unwrap();
        std::os::unix::fs::symlink(
            outside.0.path().join("var/lib/dpkg"),
            root.path().join("var/lib/dpkg"),
        )
        .unwrap();
        match read(root.path()) {
            Err(PackageError::Io { source, .. }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound)
            }
            other => panic!("read the host's database through a symlink: {other:?}"),
        }
        // A database file that is a symlink is refused, even within the root.
        let root = Root::new(&stanza("a", "all", "install ok installed", ""));
        std::fs::write(root.0.path().join("elsewhere"), b"/etc/shadow\n").unwrap();
        std::os::unix::fs::symlink(
            "../../../../elsewhere",
            root.0.path().join("var/lib/dpkg/info/a.list"),
        )
        .unwrap();
        assert!(matches!(read(root.0.path()), Err(PackageError::Io { .. })));
    }

    #[test]
    fn md5_hex_accepts_only_32_hex_digits() {
        assert_eq!(md5_hex(MD5_A.as_bytes()), Some(MD5_A_BYTES));
        assert_eq!(md5_hex(MD5_A.to_uppercase().as_bytes()), Some(MD5_A_BYTES));
        assert_eq!(md5_hex(&MD5_A.as_bytes()[1..]), None);
        assert_eq!(md5_hex("+123456789abcdef0123456789abcdef".as_bytes()), None);
    }

    /// Like `driftwatch_tests::require_program` (this crate cannot depend on the tests crate):
    /// outside CI a missing prerequisite skips with the reason printed; under CI=true it fails.
    fn require(found: bool, what: &str) -> bool {
        if !found {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(
                !ci,
                "this test needs {what} and CI=true forbids skipping it"
            );
            eprintln!("SKIPPED: needs {what}");
        }
        found
    }

    const DEBIAN_ROOT: &str = "/var/cache/driftwatch-tests/debian-bookworm-minbase";

    #[test]
    fn real_debian_root() {
        let root = Path::new(DEBIAN_ROOT);
        if !require(
            root.join("var/lib/dpkg/status").is_file(),
            &format!(
                "the Debian root at {DEBIAN_ROOT} (cargo run -p driftwatch-tests --bin debian-root)"
            ),
        ) {
            return;
        }
        let started = std::time::Instant::now();
        let m = read(root).unwrap();
        let elapsed = started.elapsed();
        let files: usize = m.packages.iter().map(|p| p.files.len()).sum();
        eprintln!(
            "read {} packages, {files} files in {elapsed:?}",
            m.packages.len()
        );
        assert!(m.packages.len() > 80, "{} packages", m.packages.len());
        assert!(files > 3000, "{files} files");
        assert!(m.notes.is_empty(), "{:?}", m.notes);
        for pkg in &m.packages {
            assert!(
                pkg.files.windows(2).all(|w| w[0].path < w[1].path),
                "{} files unsorted",
                pkg.key()
            );
            for f in &pkg.files {
                baseline_path::validate(&f.path).unwrap();
            }
        }
        assert!(
            m.packages
                .windows(2)
                .all(|w| (&w[0].name, &w[0].arch) < (&w[1].name, &w[1].arch))
        );

        let dpkg = package(&m, "dpkg:amd64");
        assert_eq!(dpkg.state, "installed");
        let real: [u8; 16] = Md5::digest(std::fs::read(root.join("usr/bin/dpkg")).unwrap()).into();
        assert_eq!(file(dpkg, b"/usr/bin/dpkg").digest, Some(Digest::Md5(real)));

        let base_files = package(&m, "base-files:amd64");
        let conffiles: Vec<&PackageFile> = base_files.files.iter().filter(|f| f.config).collect();
        assert!(conffiles.len() >= 5, "{conffiles:?}");
        let issue = file(base_files, b"/etc/issue");
        assert!(issue.config);
        let real: [u8; 16] = Md5::digest(std::fs::read(root.join("etc/issue")).unwrap()).into();
        assert_eq!(
            issue.digest,
            Some(Digest::Md5(real)),
            "an untouched conffile matches"
        );
        assert!(
            file(base_files, b"/").digest.is_none(),
            "base-files owns /. as /"
        );

        // dash diverts /bin/sh itself: its own /bin/sh stays put.
        assert!(
            m.diversions
                .iter()
                .any(|d| d.from == b"/bin/sh" && d.package.as_deref() == Some("dash"))
        );
        file(package(&m, "dash:amd64"), b"/bin/sh");

        if !require(
            Command::new("dpkg-query").arg("--version").output().is_ok(),
            "dpkg-query",
        ) {
            return;
        }
        let out = Command::new("dpkg-query")
            .arg(format!("--admindir={DEBIAN_ROOT}/var/lib/dpkg"))
            .args([
                "-W",
                "-f",
                "${Package}:${Architecture} ${Version} ${db:Status-Status}\n",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut theirs: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        theirs.sort();
        let mut ours: Vec<String> = m
            .packages
            .iter()
            .map(|p| format!("{} {} {}", p.key(), p.version, p.state))
            .collect();
        ours.sort();
        assert_eq!(ours, theirs);
    }
}
