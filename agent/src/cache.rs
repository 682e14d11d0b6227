//! The scan cache: path → (dev, inode, size, mtime, ctime, hash) from the last scan, so a
//! re-check of an unchanged tree costs about a metadata walk.
//!
//! Trust rules:
//! - an entry is used only when every field of the stat key is unchanged; ctime is set by the
//!   kernel, so content rewritten behind a restored mtime still misses the cache;
//! - an entry whose ctime is within [`RACY_WINDOW`] of the scan that hashed it is not kept
//!   (git's "racily clean" problem: a write in the same clock tick leaves ctime unchanged);
//! - the file is checksummed (BLAKE3) and replaced atomically (temp file, fsync, rename, fsync
//!   of the directory); a file that fails any check is discarded with a warning, never trusted;
//! - the cache belongs to one root; a cache of another root is ignored.
//!
//! Format: magic, header (root path, root dev, scan start), sorted records, BLAKE3 trailer;
//! every integer little-endian.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::hash::StatKey;
use crate::scan::HashSource;

const MAGIC: &[u8; 8] = b"DWCACHE\x01";
/// File name inside the state directory.
pub const FILE_NAME: &str = "scan-cache.v1";
/// Entries changed this close to the scan start are re-hashed next time.
pub const RACY_WINDOW_NS: i64 = 2_000_000_000;
const RECORD_FIXED: usize = 4 + 8 * 5 + 32;

/// One cached hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheEntry {
    pub path: Box<[u8]>,
    pub key: StatKey,
    pub hash: [u8; 32],
}

/// Why a cache file was discarded.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is corrupt ({what}); it is discarded and every file is hashed again")]
    Corrupt { path: PathBuf, what: &'static str },
}

/// A loaded cache, sorted by path for binary search.
#[derive(Debug, Default)]
pub struct ScanCache {
    entries: Vec<CacheEntry>,
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
        let canon = fs::canonicalize(root)?;
        let m = fs::metadata(&canon)?;
        Ok(RootId {
            path: canon.as_os_str().as_bytes().to_vec(),
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn i64(&mut self) -> Option<i64> {
        self.u64().map(|v| v as i64)
    }
}

impl ScanCache {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Loads the cache in `state_dir` for `root`. A missing file or one for another root is an
    /// empty cache; an unreadable or corrupt one is an error the caller warns about (and then
    /// proceeds without a cache).
    pub fn load(state_dir: &Path, root: &RootId) -> Result<ScanCache, CacheError> {
        let path = state_dir.join(FILE_NAME);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ScanCache::default()),
            Err(source) => return Err(CacheError::Io { path, source }),
        };
        let corrupt = |what| CacheError::Corrupt {
            path: path.clone(),
            what,
        };
        if data.len() < MAGIC.len() + 32 || &data[..8] != MAGIC {
            return Err(corrupt("bad magic or too short"));
        }
        let (body, trailer) = data.split_at(data.len() - 32);
        if blake3::hash(body).as_bytes() != trailer {
            return Err(corrupt("checksum mismatch"));
        }
        let mut r = Reader { buf: body, pos: 8 };
        let root_len = r.u32().ok_or_else(|| corrupt("truncated header"))? as usize;
        let root_path = r
            .take(root_len)
            .ok_or_else(|| corrupt("truncated header"))?
            .to_vec();
        let dev = r.u64().ok_or_else(|| corrupt("truncated header"))?;
        let ino = r.u64().ok_or_else(|| corrupt("truncated header"))?;
        let count = r.u64().ok_or_else(|| corrupt("truncated header"))?;
        if root_path != root.path || dev != root.dev || ino != root.ino {
            return Ok(ScanCache::default());
        }
        let remaining = body.len() - r.pos;
        if count > (remaining / RECORD_FIXED) as u64 {
            return Err(corrupt("record count larger than the file"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let plen = r.u32().ok_or_else(|| corrupt("truncated record"))? as usize;
            let p: Box<[u8]> = r
                .take(plen)
                .ok_or_else(|| corrupt("truncated record"))?
                .into();
            let key = StatKey {
                dev: r.u64().ok_or_else(|| corrupt("truncated record"))?,
                ino: r.u64().ok_or_else(|| corrupt("truncated record"))?,
                size: r.u64().ok_or_else(|| corrupt("truncated record"))?,
                mtime_ns: r.i64().ok_or_else(|| corrupt("truncated record"))?,
                ctime_ns: r.i64().ok_or_else(|| corrupt("truncated record"))?,
            };
            let hash: [u8; 32] = r
                .take(32)
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| corrupt("truncated record"))?;
            entries.push(CacheEntry { path: p, key, hash });
        }
        if r.pos != body.len() {
            return Err(corrupt("trailing bytes"));
        }
        if entries.windows(2).any(|w| w[0].path >= w[1].path) {
            return Err(corrupt("records out of order"));
        }
        Ok(ScanCache { entries })
    }

    /// Writes `entries` as the cache of `root` for a scan that started at `scan_start_ns`
    /// (wall clock), atomically replacing any previous cache.
    pub fn save(
        state_dir: &Path,
        root: &RootId,
        scan_start_ns: i64,
        mut entries: Vec<CacheEntry>,
    ) -> io::Result<usize> {
        entries.retain(|e| e.key.ctime_ns < scan_start_ns.saturating_sub(RACY_WINDOW_NS));
        entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
        entries.dedup_by(|a, b| a.path == b.path);
        let mut body = Vec::with_capacity(64 + entries.len() * (RECORD_FIXED + 48));
        body.extend_from_slice(MAGIC);
        body.extend_from_slice(&(root.path.len() as u32).to_le_bytes());
        body.extend_from_slice(&root.path);
        body.extend_from_slice(&root.dev.to_le_bytes());
        body.extend_from_slice(&root.ino.to_le_bytes());
        body.extend_from_slice(&(entries.len() as u64).to_le_bytes());
        for e in &entries {
            body.extend_from_slice(&(e.path.len() as u32).to_le_bytes());
            body.extend_from_slice(&e.path);
            for v in [
                e.key.dev,
                e.key.ino,
                e.key.size,
                e.key.mtime_ns as u64,
                e.key.ctime_ns as u64,
            ] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body.extend_from_slice(&e.hash);
        }
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        crate::fsutil::write_atomic(&state_dir.join(FILE_NAME), &body, 0o600)?;
        Ok(entries.len())
    }
}

impl HashSource for ScanCache {
    fn lookup(&self, path: &[u8], key: &StatKey) -> Option<[u8; 32]> {
        let i = self
            .entries
            .binary_search_by(|e| (*e.path).cmp(path))
            .ok()?;
        let e = &self.entries[i];
        (e.key == *key).then_some(e.hash)
    }
}

/// Path of the cache file in `state_dir`.
pub fn cache_path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> StatKey {
        StatKey {
            dev: 1,
            ino: n,
            size: n * 10,
            mtime_ns: 5,
            ctime_ns: 1_000,
        }
    }

    fn sample() -> Vec<CacheEntry> {
        (1..=3)
            .map(|n| CacheEntry {
                path: format!("/f{n}").into_bytes().into(),
                key: key(n),
                hash: [n as u8; 32],
            })
            .collect()
    }

    #[test]
    fn round_trip_and_lookup_needs_the_exact_key() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootId::of(dir.path()).unwrap();
        ScanCache::save(dir.path(), &root, 10_000_000_000, sample()).unwrap();
        let c = ScanCache::load(dir.path(), &root).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c.lookup(b"/f2", &key(2)), Some([2; 32]));
        let mut k = key(2);
        k.ctime_ns += 1;
        assert_eq!(c.lookup(b"/f2", &k), None, "a changed ctime misses");
        assert_eq!(c.lookup(b"/nope", &key(2)), None);
    }

    #[test]
    fn racily_clean_entries_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootId::of(dir.path()).unwrap();
        // Scan started 1 s after the files' ctime: inside the racy window.
        let n = ScanCache::save(dir.path(), &root, 1_000 + 1_000_000_000, sample()).unwrap();
        assert_eq!(n, 0);
    }

    #[test]
    fn every_corruption_is_detected_and_another_root_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootId::of(dir.path()).unwrap();
        ScanCache::save(dir.path(), &root, 10_000_000_000, sample()).unwrap();
        let p = cache_path(dir.path());
        let good = fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            fs::write(&p, &bad).unwrap();
            assert!(
                matches!(
                    ScanCache::load(dir.path(), &root),
                    Err(CacheError::Corrupt { .. })
                ),
                "flip at byte {i} not detected"
            );
        }
        for cut in [0, 5, good.len() / 2, good.len() - 1] {
            fs::write(&p, &good[..cut]).unwrap();
            assert!(
                ScanCache::load(dir.path(), &root).is_err(),
                "truncation at {cut}"
            );
        }
        fs::write(&p, &good).unwrap();
        let other = RootId {
            path: b"/elsewhere".to_vec(),
            ..root
        };
        assert!(ScanCache::load(dir.path(), &other).unwrap().is_empty());
    }
}
