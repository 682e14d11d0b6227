//! The scan cache: for each entry of one baseline, the stat key and content hash of the file
//! at that path when it was last hashed, and whether the extended attributes read through the
//! hashed descriptor equalled the baseline's. A re-check of an unchanged tree then costs about
//! a metadata walk (no reads, no xattr calls for those files).
//!
//! Trust rules:
//! - a slot is used only when every field of the stat key (dev, inode, size, mtime, ctime) is
//!   unchanged; ctime is set by the kernel on every change of content, xattrs, mode or owner,
//!   so content rewritten behind a restored mtime misses, and so does a changed xattr;
//! - a slot whose ctime is within [`RACY_WINDOW_NS`] of the scan that hashed it is not kept
//!   (git's "racily clean" problem: a write in the same clock tick leaves ctime unchanged);
//! - the file is checksummed (BLAKE3) and replaced atomically (temp file, fsync, rename, fsync
//!   of the directory); a file that fails any check is discarded with a warning, never trusted;
//! - the cache belongs to one root and one baseline (its Merkle root); any other is ignored.
//!
//! Slots are indexed by baseline entry, so the cache holds no paths: it costs a fixed 80 bytes
//! per entry in memory and 73 on disk. Objects that are not in the baseline are never cached
//! (they are violations anyway). Xattrs are only remembered as "equal to the baseline's", and
//! only when read through the descriptor that was hashed and `fstat`ed before and after (never
//! by path, which a swap after the walk's `lstat` could point at another object).
//!
//! Format: magic (its last byte is the format version), header (root path, root dev and
//! inode, baseline root, slot count), one fixed-size record per slot (flags, stat key, hash),
//! BLAKE3 trailer over everything before it; integers little-endian.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::baseline::Baseline;
use crate::hash::StatKey;
use crate::scan::{HashSource, Known};

const MAGIC: &[u8; 8] = b"DWCACHE\x03";
/// File name inside the state directory. It stays the same across format versions (the magic
/// carries the version), so a cache of an older format is found, discarded with a warning and
/// replaced, not left behind.
pub const FILE_NAME: &str = "scan-cache.v2";
/// Slots changed this close to the scan start are re-hashed next time.
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;
const RECORD_LEN: usize = 1 + 8 * 5 + 32;
/// Record flag: the slot is filled.
const FILLED: u8 = 1;
/// Record flag: the xattrs equalled the baseline entry's.
const XATTRS_AS_BASELINE: u8 = 2;

/// A cached hash: the file had this stat key when its content hashed to `hash`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub key: StatKey,
    pub hash: [u8; 32],
    /// The xattrs read through the hashed descriptor were exactly the baseline entry's.
    pub xattrs_as_baseline: bool,
}

/// Why a cache file was discarded.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is corrupt ({what}); it is discarded and every file is hashed again")]
    Corrupt { path: PathBuf, what: &'static str },
    #[error(
        "{path} has format version {found}, this driftwatch uses {supported}; it is discarded and every file is hashed again"
    )]
    Version {
        path: PathBuf,
        found: u8,
        supported: u8,
    },
}

/// Identity of the scanned root a cache belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootId {
    pub path: Vec<u8>,
    pub dev: u64,
    pub ino: u64,
}

impl RootId {
    pub fn of(root: &Path) -> io::Result<RootId> {
        let canon = std::fs::canonicalize(root)?;
        let m = std::fs::metadata(&canon)?;
        Ok(RootId {
            path: canon.as_os_str().as_bytes().to_vec(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// The cache of one root against one baseline.
#[derive(Debug)]
pub struct ScanCache {
    slots: Vec<Option<Slot>>,
}

/// Reads through a BLAKE3 hasher, so the checksum is verified without holding the file.
struct Hashing<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> Hashing<R> {
    fn exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact(buf)?;
        self.hasher.update(buf);
        Ok(())
    }
    fn u64(&mut self) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

fn header(root: &RootId, baseline_root: &[u8; 32], n: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(64 + root.path.len());
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&(root.path.len() as u64).to_le_bytes());
    h.extend_from_slice(&root.path);
    h.extend_from_slice(&root.dev.to_le_bytes());
    h.extend_from_slice(&root.ino.to_le_bytes());
    h.extend_from_slice(baseline_root);
    h.extend_from_slice(&n.to_le_bytes());
    h
}

impl ScanCache {
    /// An empty cache for a baseline of `n` entries.
    pub fn empty(n: usize) -> ScanCache {
        ScanCache {
            slots: vec![None; n],
        }
    }

    /// Number of filled slots.
    pub fn filled(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// The slot of baseline entry `index`.
    pub fn slot(&self, index: usize) -> Option<&Slot> {
        self.slots.get(index).and_then(Option::as_ref)
    }

    /// Replaces the slot of baseline entry `index`.
    pub fn set(&mut self, index: usize, slot: Option<Slot>) {
        if let Some(s) = self.slots.get_mut(index) {
            *s = slot;
        }
    }

    /// Loads the cache in `state_dir` for `root` and `baseline`. A missing file, or one for
    /// another root or baseline, is an empty cache; an unreadable or corrupt one is an error the
    /// caller warns about (and then proceeds with an empty cache).
    pub fn load(
        state_dir: &Path,
        root: &RootId,
        baseline: &Baseline,
    ) -> Result<ScanCache, CacheError> {
        let path = state_dir.join(FILE_NAME);
        let n = baseline.entries.len();
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ScanCache::empty(n)),
            Err(source) => return Err(CacheError::Io { path, source }),
        };
        let len = file
            .metadata()
            .map_err(|source| CacheError::Io {
                path: path.clone(),
                source,
            })?
            .len();
        let corrupt = |what| CacheError::Corrupt {
            path: path.clone(),
            what,
        };
        let mut r = Hashing {
            inner: BufReader::with_capacity(1 << 16, file),
            hasher: blake3::Hasher::new(),
        };
        let mut magic = [0u8; 8];
        r.exact(&mut magic).map_err(|_| corrupt("too short"))?;
        if magic[..7] != MAGIC[..7] {
            return Err(corrupt("bad magic"));
        }
        if magic[7] != MAGIC[7] {
            return Err(CacheError::Version {
                path,
                found: magic[7],
                supported: MAGIC[7],
            });
        }
        let root_len = r.u64().map_err(|_| corrupt("truncated header"))?;
        if root_len > 4096 {
            return Err(corrupt("root path too long"));
        }
        let mut root_path = vec![0u8; root_len as usize];
        r.exact(&mut root_path)
            .map_err(|_| corrupt("truncated header"))?;
        let dev = r.u64().map_err(|_| corrupt("truncated header"))?;
        let ino = r.u64().map_err(|_| corrupt("truncated header"))?;
        let mut broot = [0u8; 32];
        r.exact(&mut broot)
            .map_err(|_| corrupt("truncated header"))?;
        let count = r.u64().map_err(|_| corrupt("truncated header"))?;
        let header_len = 8 + 8 + root_len + 8 + 8 + 32 + 8;
        if count
            .checked_mul(RECORD_LEN as u64)
            .and_then(|b| b.checked_add(header_len + 32))
            != Some(len)
        {
            return Err(corrupt("size does not match the slot count"));
        }
        let mut slots: Vec<Option<Slot>> = Vec::with_capacity(count as usize);
        let mut rec = [0u8; RECORD_LEN];
        for _ in 0..count {
            r.exact(&mut rec).map_err(|_| corrupt("truncated record"))?;
            let word = |i: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&rec[1 + 8 * i..9 + 8 * i]);
                u64::from_le_bytes(b)
            };
            let flags = rec[0];
            if flags & !(FILLED | XATTRS_AS_BASELINE) != 0 || flags == XATTRS_AS_BASELINE {
                return Err(corrupt("bad slot flag"));
            }
            slots.push((flags != 0).then(|| Slot {
                key: StatKey {
                    dev: word(0),
                    ino: word(1),
                    size: word(2),
                    mtime_ns: word(3) as i64,
                    ctime_ns: word(4) as i64,
                },
                hash: {
                    let mut hash = [0u8; 32];
                    hash.copy_from_slice(&rec[41..]);
                    hash
                },
                xattrs_as_baseline: flags & XATTRS_AS_BASELINE != 0,
            }));
        }
        let sum = *r.hasher.finalize().as_bytes();
        let mut trailer = [0u8; 32];
        r.inner
            .read_exact(&mut trailer)
            .map_err(|_| corrupt("truncated checksum"))?;
        if sum != trailer {
            return Err(corrupt("checksum mismatch"));
        }
        if root_path != root.path
            || dev != root.dev
            || ino != root.ino
            || broot != baseline.merkle_root
            || count != n as u64
        {
            return Ok(ScanCache::empty(n));
        }
        Ok(ScanCache { slots })
    }

    /// Writes the cache atomically, dropping racily clean slots (ctime within the racy window
    /// of `scan_start_ns`, wall clock). Returns the number of slots kept.
    pub fn save(
        &self,
        state_dir: &Path,
        root: &RootId,
        baseline_root: &[u8; 32],
        scan_start_ns: i64,
    ) -> io::Result<usize> {
        let cutoff = scan_start_ns.saturating_sub(RACY_WINDOW_NS);
        let mut kept = 0;
        crate::fsutil::write_atomic_with(&state_dir.join(FILE_NAME), 0o600, |f| {
            let mut w = BufWriter::with_capacity(1 << 16, f);
            let mut hasher = blake3::Hasher::new();
            let h = header(root, baseline_root, self.slots.len() as u64);
            hasher.update(&h);
            w.write_all(&h)?;
            let mut rec = [0u8; RECORD_LEN];
            for s in &self.slots {
                rec.fill(0);
                if let Some(s) = s.filter(|s| s.key.ctime_ns < cutoff) {
                    rec[0] = FILLED;
                    if s.xattrs_as_baseline {
                        rec[0] |= XATTRS_AS_BASELINE;
                    }
                    let k = s.key;
                    for (i, v) in [k.dev, k.ino, k.size, k.mtime_ns as u64, k.ctime_ns as u64]
                        .into_iter()
                        .enumerate()
                    {
                        rec[1 + 8 * i..9 + 8 * i].copy_from_slice(&v.to_le_bytes());
                    }
                    rec[41..].copy_from_slice(&s.hash);
                    kept += 1;
                }
                hasher.update(&rec);
                w.write_all(&rec)?;
            }
            w.write_all(hasher.finalize().as_bytes())?;
            w.flush()
        })?;
        Ok(kept)
    }
}

/// A cache looked up by path through its baseline.
#[derive(Debug)]
pub struct CacheLookup<'a> {
    pub baseline: &'a Baseline,
    pub cache: &'a ScanCache,
}

impl HashSource for CacheLookup<'_> {
    fn lookup(&self, path: &[u8], key: &StatKey) -> Option<Known> {
        let i = self.baseline.find(path)?;
        let s = self.cache.slot(i)?;
        (s.key == *key).then(|| Known {
            hash: s.hash,
            xattrs: s
                .xattrs_as_baseline
                .then(|| self.baseline.entries[i].xattrs.clone()),
        })
    }
}

/// Path of the cache file in `state_dir`.
pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftwatch_proto::v1::{Entry, Header, Xattr};

    fn baseline(n: usize) -> Baseline {
        Baseline {
            header: Header::default(),
            entries: (0..n)
                .map(|i| Entry {
                    path: format!("/f{i}").into_bytes(),
                    xattrs: vec![Xattr {
                        name: b"user.i".to_vec(),
                        value: vec![i as u8],
                    }],
                    ..Default::default()
                })
                .collect(),
            signer: String::new(),
            merkle_root: [7; 32],
        }
    }

    fn key(n: u64) -> StatKey {
        StatKey {
            dev: 1,
            ino: n,
            size: n * 10,
            mtime_ns: 5,
            ctime_ns: 1_000,
        }
    }

    fn filled(n: usize) -> ScanCache {
        let mut c = ScanCache::empty(n);
        for i in 0..n {
            c.set(
                i,
                Some(Slot {
                    key: key(i as u64),
                    hash: [i as u8; 32],
                    // Even slots saw the baseline's xattrs, odd ones did not.
                    xattrs_as_baseline: i % 2 == 0,
                }),
            );
        }
        c
    }

    #[test]
    fn round_trip_and_lookup_needs_the_exact_key() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootId::of(dir.path()).unwrap();
        let b = baseline(3);
        assert_eq!(
            filled(3)
                .save(dir.path(), &root, &b.merkle_root, 10_000_000_000)
                .unwrap(),
            3
        );
        let c = ScanCache::load(dir.path(), &root, &b).unwrap();
        let l = CacheLookup {
            baseline: &b,
            cache: &c,
        };
        assert_eq!(
            l.lookup(b"/f2", &key(2)),
            Some(Known {
                hash: [2; 32],
                xattrs: Some(b.entries[2].xattrs.clone())
            })
        );
        assert_eq!(
            l.lookup(b"/f1", &key(1)),
            Some(Known {
                hash: [1; 32],
                xattrs: None
            }),
            "xattrs that differed from the baseline's are read again"
        );
        let mut k = key(2);
        k.ctime_ns += 1;
        assert_eq!(
            l.lookup(b"/f2", &k),
            None,
            "a changed ctime (content or xattrs changed) misses"
        );
        assert_eq!(l.lookup(b"/nope", &key(2)), None);
    }

    #[test]
    fn racily_clean_slots_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootId::of(dir.path()).unwrap();
        let b = baseline(3);
        assert_eq!(
            filled(3)
                .save(dir.path(), &root, &b.merkle_root, 1_000 + 1_000_000_000)
                .unwrap(),
            0
        );
        assert_eq!(ScanCache::load(dir.path(), &root, &b).unwrap().filled(), 0);
    }

    #[test]
    fn every_corruption_is_detected_and_another_root_or_baseline_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootId::of(dir.path()).unwrap();
        let b = baseline(3);
        filled(3)
            .save(dir.path(), &root, &b.merkle_root, 10_000_000_000)
            .unwrap();
        let p = cache_path(dir.path());
        let good = std::fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            std::fs::write(&p, &bad).unwrap();
            let r = ScanCache::load(dir.path(), &root, &b);
            assert!(
                if i == 7 {
                    matches!(r, Err(CacheError::Version { found: 0x43, .. }))
                } else {
                    matches!(r, Err(CacheError::Corrupt { .. }))
                },
                "flip at byte {i} not detected"
            );
        }
        for cut in [0, 5, good.len() / 2, good.len() - 1] {
            std::fs::write(&p, &good[..cut]).unwrap();
            assert!(
                ScanCache::load(dir.path(), &root, &b).is_err(),
                "truncation at {cut}"
            );
        }
        std::fs::write(&p, &good).unwrap();
        let other = RootId {
            path: b"/elsewhere".to_vec(),
            ..root.clone()
        };
        assert_eq!(ScanCache::load(dir.path(), &other, &b).unwrap().filled(), 0);
        let mut newer = baseline(3);
        newer.merkle_root = [8; 32];
        assert_eq!(
            ScanCache::load(dir.path(), &root, &newer).unwrap().filled(),
            0
        );
        assert_eq!(ScanCache::load(dir.path(), &root, &b).unwrap().filled(), 3);
    }

    #[test]
    fn a_cache_of_the_previous_format_is_discarded_as_another_version() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootId::of(dir.path()).unwrap();
        let b = baseline(3);
        filled(3)
            .save(dir.path(), &root, &b.merkle_root, 10_000_000_000)
            .unwrap();
        let p = cache_path(dir.path());
        let mut old = std::fs::read(&p).unwrap();
        old[..8].copy_from_slice(b"DWCACHE\x02");
        std::fs::write(&p, &old).unwrap();
        let e = ScanCache::load(dir.path(), &root, &b).unwrap_err();
        assert!(
            matches!(
                e,
                CacheError::Version {
                    found: 2,
                    supported: 3,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_slot_costs_no_more_memory_than_before_the_xattr_flag() {
        assert_eq!(std::mem::size_of::<Option<Slot>>(), 80);
    }
}
