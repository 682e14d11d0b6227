//! Walking a root filesystem and observing every object in scope.
//!
//! Threads: the walk (walkdir; metadata, symlink targets, xattrs) runs on one thread; content
//! hashing runs as jobs on a rayon pool; the caller's `sink` runs on the calling thread and
//! receives every [`Event`] in completion order. At most [`MAX_IN_FLIGHT`] hash jobs are
//! queued, so memory stays bounded however large the tree.
//!
//! Walking rules: symlinks are never followed; only regular files are ever opened, and only
//! with `O_NOFOLLOW | O_NONBLOCK` (see [`crate::hash`]); FIFOs, sockets and devices are only
//! `lstat`ed. One object's error never aborts the scan: it becomes a finding.

use std::fs;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, bounded};
use driftwatch_proto::v1::{Entry, FileType, Xattr};
use walkdir::WalkDir;

use crate::hash::{self, StatKey};
use crate::policy::{Attribute, PathPolicy, Policy};

/// Hash jobs queued or running at once.
pub const MAX_IN_FLIGHT: usize = 1024;

/// Why a scan could not run at all (per-object problems are findings, not errors).
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot scan root {path}: {source}")]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("root {0} is not a directory")]
    RootNotDirectory(PathBuf),
    #[error("cannot start the hashing thread pool: {0}")]
    Pool(String),
}

/// What a scan is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Record everything: every regular file in scope is hashed.
    Baseline,
    /// Verify: files whose content the policy does not check are not hashed.
    Check,
}

/// What an earlier scan established about a regular file that still has exactly the same
/// stat key (dev, inode, size, mtime, ctime). The kernel sets ctime whenever content or xattrs
/// change, so neither can have changed since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The content hash under this key.
    pub hash: [u8; 32],
    /// The extended attributes under this key, if known.
    pub xattrs: Option<Vec<Xattr>>,
}

/// Where a scan may take known hashes and xattrs from instead of reading files.
pub trait HashSource: Sync {
    /// What is known about the regular file at `path` if it was hashed under exactly this
    /// stat key.
    fn lookup(&self, path: &[u8], key: &StatKey) -> Option<Known>;
}

/// One object seen on the host.
#[derive(Debug, Clone)]
pub struct Observed {
    pub entry: Entry,
    /// Stat key of a regular file (for the scan cache); for a hashed file, the one it was
    /// hashed under.
    pub key: Option<StatKey>,
    /// The policy in force for this path.
    pub policy: PathPolicy,
    /// Why part of the object (content, xattrs, target) could not be verified.
    pub problem: Option<String>,
    /// The content was hashed in this scan (not taken from the cache).
    pub hashed: bool,
    /// The content hash came from the cache.
    pub cached: bool,
    /// The xattrs came from the cache (they were not read in this scan).
    pub xattrs_cached: bool,
}

/// Something the scan reports.
#[derive(Debug)]
pub enum Event {
    Object(Box<Observed>),
    /// The contents of this directory (or this object) could not be examined; nothing below
    /// it can be judged.
    Incomplete {
        path: Vec<u8>,
        reason: String,
    },
    /// A mount point of another filesystem that the policy keeps out of the scan.
    OtherFilesystem {
        path: Vec<u8>,
    },
}

/// Scan settings that are not policy.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    pub root: PathBuf,
    /// Threads of the hashing pool (>= 1).
    pub threads: usize,
    pub purpose: Purpose,
}

/// Counters of a finished scan.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ScanStats {
    pub entries: u64,
    pub files_hashed: u64,
    pub bytes_hashed: u64,
    pub cache_hits: u64,
    pub incomplete: u64,
    pub other_filesystems: u64,
    #[serde(rename = "duration_ms", serialize_with = "ser_ms")]
    pub duration: Duration,
}

fn ser_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

/// Path of `p` inside `root`, as a baseline path.
fn inside_path(root: &Path, p: &Path) -> Vec<u8> {
    // The walk builds every path by joining names onto `root` as given, so a byte prefix test
    // is enough (and much cheaper than comparing components); anything else takes the general
    // route.
    let (r, b) = (root.as_os_str().as_bytes(), p.as_os_str().as_bytes());
    let rel = match b.strip_prefix(r) {
        Some(rest) if r.ends_with(b"/") || rest.is_empty() || rest.starts_with(b"/") => {
            let rest = rest.strip_prefix(b"/").unwrap_or(rest);
            (!rest.starts_with(b"/") && !rest.ends_with(b"/")).then_some(rest)
        }
        _ => None,
    };
    let rel = rel.unwrap_or_else(|| p.strip_prefix(root).unwrap_or(p).as_os_str().as_bytes());
    let mut v = Vec::with_capacity(rel.len() + 1);
    v.push(b'/');
    v.extend_from_slice(rel);
    v
}

pub(crate) fn file_type_of(ft: fs::FileType) -> FileType {
    if ft.is_file() {
        FileType::Regular
    } else if ft.is_dir() {
        FileType::Directory
    } else if ft.is_symlink() {
        FileType::Symlink
    } else if ft.is_fifo() {
        FileType::Fifo
    } else if ft.is_socket() {
        FileType::Socket
    } else if ft.is_block_device() {
        FileType::BlockDevice
    } else if ft.is_char_device() {
        FileType::CharDevice
    } else {
        FileType::Unspecified
    }
}

/// Reads every extended attribute of `path` without following a symlink, sorted by name.
fn read_xattrs(path: &Path) -> Result<Vec<Xattr>, String> {
    collect_xattrs(xattr::list(path), |name| xattr::get(path, name))
}

/// Gathers the attributes `names` lists with `get`, sorted by name. A filesystem without
/// xattr support has none; an attribute removed between list and get is gone.
pub(crate) fn collect_xattrs<I: IntoIterator<Item = std::ffi::OsString>>(
    names: std::io::Result<I>,
    get: impl Fn(&std::ffi::OsStr) -> std::io::Result<Option<Vec<u8>>>,
) -> Result<Vec<Xattr>, String> {
    let names = match names {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot list extended attributes: {e}")),
    };
    let mut out = Vec::new();
    for name in names {
        match get(&name) {
            Ok(Some(value)) => out.push(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            }),
            Ok(None) => {}
            Err(e) => {
                return Err(format!(
                    "cannot read extended attribute {}: {e}",
                    String::from_utf8_lossy(name.as_bytes())
                ));
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn mtime_ns(m: &fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

/// Events the walker sends at once.
const BATCH: usize = 256;

struct Batch<'a> {
    tx: &'a Sender<Vec<Event>>,
    events: Vec<Event>,
}

/// The consumer hung up: the scan is being abandoned.
struct Abandoned;

impl Batch<'_> {
    fn push(&mut self, ev: Event) -> Result<(), Abandoned> {
        self.events.push(ev);
        if self.events.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Abandoned> {
        if self.events.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.events, Vec::with_capacity(BATCH));
        self.tx.send(full).map_err(|_| Abandoned)
    }
}

/// Walks `opts.root` under `policy` and hands every event to `sink`.
pub fn scan(
    opts: &ScanOptions,
    policy: &Policy,
    cache: Option<&dyn HashSource>,
    mut sink: impl FnMut(Event),
) -> Result<ScanStats, ScanError> {
    let started = Instant::now();
    let root_meta = fs::metadata(&opts.root).map_err(|source| ScanError::Root {
        path: opts.root.clone(),
        source,
    })?;
    if !root_meta.is_dir() {
        return Err(ScanError::RootNotDirectory(opts.root.clone()));
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.threads.max(1))
        .thread_name(|i| format!("dw-hash-{i}"))
        .build()
        .map_err(|e| ScanError::Pool(e.to_string()))?;

    let mut stats = ScanStats::default();
    // Results from the walker and the hash jobs. Bounded so a slow sink slows the walk instead
    // of growing memory.
    let (tx, rx) = bounded::<Vec<Event>>(64);
    std::thread::scope(|s| {
        let walker_tx = tx;
        s.spawn(|| walk(opts, policy, cache, root_meta.dev(), &pool, walker_tx));
        for ev in rx.into_iter().flatten() {
            match &ev {
                Event::Object(o) => {
                    stats.entries += 1;
                    if o.hashed {
                        stats.files_hashed += 1;
                        stats.bytes_hashed += o.entry.size;
                    }
                    if o.cached {
                        stats.cache_hits += 1;
                    }
                }
                Event::Incomplete { .. } => stats.incomplete += 1,
                Event::OtherFilesystem { .. } => stats.other_filesystems += 1,
            }
            sink(ev);
        }
    });
    stats.duration = started.elapsed();
    Ok(stats)
}

fn walk(
    opts: &ScanOptions,
    policy: &Policy,
    cache: Option<&dyn HashSource>,
    root_dev: u64,
    pool: &rayon::ThreadPool,
    tx: Sender<Vec<Event>>,
) {
    // The walk's own events travel in batches: one channel operation per event made the walker
    // and the consumer hand the two cores back and forth (thousands of sched_yield calls).
    let mut batch = Batch {
        tx: &tx,
        events: Vec::with_capacity(BATCH),
    };
    // Permits bound the hash jobs in flight: the walker takes one before spawning a job and
    // the job gives it back when done.
    let (permit_tx, permit_rx) = bounded::<()>(MAX_IN_FLIGHT);
    let mut it = WalkDir::new(&opts.root).follow_links(false).into_iter();
    while let Some(next) = it.next() {
        let dent = match next {
            Ok(d) => d,
            Err(e) => {
                let path = e
                    .path()
                    .map(|p| inside_path(&opts.root, p))
                    .unwrap_or_else(|| b"/".to_vec());
                let reason = match e.io_error() {
                    Some(io) if io.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                        "path too long to examine (longer than PATH_MAX)".to_string()
                    }
                    Some(io) => format!("cannot list directory: {io}"),
                    None => e.to_string(),
                };
                if batch.push(Event::Incomplete { path, reason }).is_err() {
                    return;
                }
                continue;
            }
        };
        let path = inside_path(&opts.root, dent.path());
        let is_dir = dent.file_type().is_dir();
        let class = policy.classify(&path);
        if dent.depth() > 0 && class.excluded {
            if is_dir {
                it.skip_current_dir();
            }
            continue;
        }
        let meta = match dent.metadata() {
            Ok(m) => m,
            Err(e) => {
                let io = e.io_error();
                if io.is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound) {
                    // Gone between readdir and lstat: it does not exist.
                    continue;
                }
                if is_dir {
                    it.skip_current_dir();
                }
                let reason = match io {
                    Some(io) if io.raw_os_error() == Some(libc::ENAMETOOLONG) => {
                        "path too long to examine (longer than PATH_MAX)".to_string()
                    }
                    Some(io) => format!("cannot stat: {io}"),
                    None => e.to_string(),
                };
                if batch.push(Event::Incomplete { path, reason }).is_err() {
                    return;
                }
                continue;
            }
        };
        if meta.is_dir()
            && dent.depth() > 0
            && policy.one_file_system
            && meta.dev() != root_dev
            && !policy.cross_filesystems.iter().any(|c| c[..] == path[..])
        {
            it.skip_current_dir();
            if batch.push(Event::OtherFilesystem { path }).is_err() {
                return;
            }
            continue;
        }
        if !class.included {
            continue;
        }
        let pp = class.policy;
        let ft = file_type_of(meta.file_type());
        let mut problems: Vec<String> = Vec::new();
        let mut entry = Entry {
            file_type: ft as i32,
            mode: meta.mode() & 0o7777,
            uid: meta.uid(),
            gid: meta.gid(),
            size: meta.size(),
            mtime_ns: mtime_ns(&meta),
            ..Default::default()
        };
        match ft {
            FileType::Symlink => match fs::read_link(dent.path()) {
                Ok(t) => entry.symlink_target = t.into_os_string().into_vec(),
                Err(e) => problems.push(format!("cannot read link target: {e}")),
            },
            FileType::BlockDevice | FileType::CharDevice => {
                let rdev = meta.rdev();
                entry.rdev_major = libc::major(rdev);
                entry.rdev_minor = libc::minor(rdev);
            }
            _ => {}
        }
        let key = (ft == FileType::Regular).then(|| StatKey::from_metadata(&meta));
        let known = match (cache, &key) {
            (Some(c), Some(k)) => c.lookup(&path, k),
            _ => None,
        };
        let wants_content = ft == FileType::Regular
            && (opts.purpose == Purpose::Baseline || pp.attributes.contains(Attribute::Content));
        let hash_job = wants_content && meta.size() <= policy.max_hash_size && known.is_none();
        let (known_hash, known_xattrs) = match known {
            Some(k) => (Some(k.hash), k.xattrs),
            None => (None, None),
        };
        let xattrs_cached = known_xattrs.is_some();
        match known_xattrs {
            Some(x) => entry.xattrs = x,
            // Files that will be hashed read their xattrs through the open descriptor in the
            // hash job (off this thread, and from the very inode that is hashed).
            None if hash_job => {}
            None => match read_xattrs(dent.path()) {
                Ok(x) => entry.xattrs = x,
                Err(e) => problems.push(e),
            },
        }
        entry.path = path;
        let mut obs = Observed {
            entry,
            key,
            policy: pp,
            problem: None,
            hashed: false,
            cached: false,
            xattrs_cached,
        };
        if let Some(key) = key {
            if meta.size() > policy.max_hash_size {
                let reason = format!(
                    "content not hashed: size {} is above the policy's max_hash_size {}",
                    meta.size(),
                    crate::policy::ByteSize(policy.max_hash_size)
                );
                obs.entry.unhashed_reason = reason.clone();
                if wants_content {
                    problems.push(reason);
                }
            } else if wants_content {
                if let Some(h) = known_hash {
                    obs.entry.content_hash = h.to_vec();
                    obs.cached = true;
                } else {
                    if !problems.is_empty() {
                        obs.problem = Some(problems.join("; "));
                    }
                    // Hand over what is batched before possibly waiting for a permit.
                    if batch.flush().is_err() || permit_tx.send(()).is_err() {
                        return;
                    }
                    let full = dent.path().to_path_buf();
                    let tx = tx.clone();
                    let permit_rx = permit_rx.clone();
                    pool.spawn(move || {
                        match hash::hash_file_with_xattrs(&full, &key) {
                            Ok((h, xattrs)) => {
                                obs.entry.content_hash = h.hash.to_vec();
                                obs.key = Some(h.key);
                                obs.hashed = true;
                                obs.xattrs_cached = false;
                                match xattrs {
                                    Ok(x) => obs.entry.xattrs = x,
                                    Err(e) => {
                                        obs.problem = Some(match obs.problem.take() {
                                            Some(p) => format!("{p}; {e}"),
                                            None => e,
                                        })
                                    }
                                }
                            }
                            Err(e) => {
                                let msg = e.to_string();
                                obs.problem = Some(match obs.problem.take() {
                                    Some(p) => format!("{p}; {msg}"),
                                    None => msg,
                                });
                            }
                        }
                        // The receiver only goes away when the scan is abandoned.
                        let _ = tx.send(vec![Event::Object(Box::new(obs))]);
                        let _ = permit_rx.recv();
                    });
                    continue;
                }
            }
        }
        if !problems.is_empty() {
            obs.problem = Some(problems.join("; "));
        }
        if batch.push(Event::Object(Box::new(obs))).is_err() {
            return;
        }
    }
    let _ = batch.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_path_agrees_with_component_wise_stripping() {
        let slow = |root: &str, p: &str| {
            let rel = Path::new(p)
                .strip_prefix(root)
                .unwrap_or(Path::new(p))
                .as_os_str()
                .as_bytes();
            [b"/", rel].concat()
        };
        for (root, p) in [
            ("/", "/"),
            ("/", "/etc"),
            ("/", "/etc/passwd"),
            ("/srv/img", "/srv/img"),
            ("/srv/img", "/srv/img/etc/passwd"),
            ("/srv/img/", "/srv/img/etc"),
            (".", "."),
            (".", "./etc/passwd"),
            ("img", "img/a"),
            ("/srv/./img", "/srv/./img/a/b"),
            ("/srv//img", "/srv//img/a"),
        ] {
            assert_eq!(
                inside_path(Path::new(root), Path::new(p)),
                slow(root, p),
                "{root} {p}"
            );
        }
        assert_eq!(
            inside_path(
                Path::new("/r"),
                Path::new(std::ffi::OsStr::from_bytes(b"/r/\xff\n"))
            ),
            b"/\xff\n".to_vec()
        );
    }
}
