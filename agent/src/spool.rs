//! The agent's durable outbox: every report is appended here (and synced) before it is sent,
//! and leaves only when the collector acknowledges its sequence number after its own durable
//! commit.
//!
//! The spool owns one directory and assigns sequence numbers; payloads are opaque bytes (encoded
//! reports). It must never lose a record silently, never reuse a sequence number, never trust
//! its own files (they are checksummed and re-validated), never follow a symlink or block on a
//! FIFO in its directory, and never allocate from a length it read before checking it against
//! [`SpoolLimits::max_payload_bytes`]. All calls block on disk I/O: the daemon calls them from a
//! blocking thread, never from an async worker.
//!
//! # Directory
//! - `lock`: held with an exclusive `flock` for the lifetime of a [`Spool`] (one writer).
//! - `meta`: epoch, high-water mark (no seq below it is ever assigned again) and the highest
//!   acknowledged seq; replaced atomically (temp file, fsync, rename, directory fsync).
//! - `<first seq, 20 digits>.seg`: segment files of records, appended in seq order. A segment is
//!   closed once it reaches [`SpoolLimits::segment_bytes`]; acknowledging deletes whole segments,
//!   and records of a partially acknowledged head segment are skipped by seq.
//! - anything else is ignored (stale `.meta.tmp.*`/`.*.seg.tmp.*` temp files are removed).
//!
//! # Record format
//! ```text
//! offset size
//!  0      4   magic "DWSR"
//!  4      1   format version (1)
//!  5      1   flags (bit 0: this record replaces every earlier record, see `replace_all`)
//!  6      2   zero
//!  8      4   payload length, u32 LE (<= max_payload_bytes)
//! 12      8   seq, u64 LE (>= 1)
//! 20      8   epoch, u64 LE (the spool's epoch when the record was written)
//! 28     16   record sum: BLAKE3 (derive_key "driftwatch spool v1 record") over bytes 0..28 and
//!             the payload, first 16 bytes
//! 44      8   header sum: BLAKE3 (derive_key "driftwatch spool v1 header") over bytes 0..44,
//!             first 8 bytes
//! 52          payload
//! ```
//! Why BLAKE3 and not a CRC: BLAKE3 is already a dependency and hashes at memory speed, and
//! recovery tests checksums at *arbitrary* positions of damaged files while it resynchronises;
//! a 32-bit CRC would accept one garbage position in four billion, which across a fleet's
//! lifetime happens. A 64-bit header sum makes a false header negligible and lets a damaged
//! payload be skipped by its (then trustworthy) length without reading further garbage; the
//! 128-bit record sum covers header and payload. These are integrity checks, not a MAC: anyone
//! who can write the spool directory is root on the host anyway.
//!
//! # Crash safety and sequence numbers
//! - `append` writes the record at the end of the newest segment and `fdatasync`s it; creating a
//!   segment also fsyncs the directory. Only then is the seq returned.
//! - `ack` writes `meta` (high-water mark, acked seq) before deleting any segment, so a seq can
//!   never be forgotten while something may still refer to it.
//! - `replace_all` writes its record, flagged "replaces earlier", into a new segment: once that
//!   record is durable, every earlier record is gone (also after a crash: recovery honours the
//!   flag), so the swap is atomic. Deleting the old segments is clean-up.
//! - Every record carries its epoch, so records written before a lost `meta` forced a new epoch
//!   are still sent under the (epoch, seq) the collector may already have seen.
//!
//! # Recovery
//! [`Spool::open`] validates every segment. A record whose header is intact but whose payload
//! fails its sum is skipped by its length; bytes that are no valid header are scanned for the
//! next valid header (magic, sums, plausible length), so records after damage survive. A record
//! cut short by the end of its file (a crash mid-append) is dropped. A valid record whose seq is
//! not above the previous one is rejected. Damaged segments are then rewritten with only their
//! valid records, so a loss is reported once, not at every start.
//!
//! [`Recovery::records_lost`] counts records *known* to be gone:
//! - damage between two surviving records A and B: `B.seq - A.seq - 1` (exact: seqs are
//!   consecutive in the files, except after a skip described below);
//! - damage before the first surviving record: `B.seq - acked - 1` (only with a valid `meta`);
//! - damage after the last surviving record: records whose header survived (their seq is known)
//!   and records below the `meta` high-water mark that are gone;
//! - never less than the number of damaged records whose header survived.
//!
//! A record cut short at the end of the spool is a torn write whose `append` never returned: its
//! bytes count in [`Recovery::bytes_discarded`], not as a lost record. Unidentifiable bytes at the
//! end of the spool could have held at most `bytes / 52 + 1` records, so `next_seq` skips that
//! many seqs; no seq that might have been handed out is ever reused. (Damage next to such a skip
//! may later be over-counted by the number skipped.)

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use ring::rand::{SecureRandom, SystemRandom};

/// Length of a record header; a record takes `HEADER_LEN + payload length` bytes.
pub const HEADER_LEN: usize = 52;
const MAGIC: [u8; 4] = *b"DWSR";
const VERSION: u8 = 1;
const FLAG_REPLACES: u8 = 1;
const RECORD_CONTEXT: &str = "driftwatch spool v1 record";
const HEADER_CONTEXT: &str = "driftwatch spool v1 header";

const META_NAME: &str = "meta";
const META_MAGIC: [u8; 8] = *b"DWSPMETA";
const META_VERSION: u32 = 1;
const META_LEN: usize = 72;
const META_CONTEXT: &str = "driftwatch spool v1 meta";
const LOCK_NAME: &str = "lock";
const SEGMENT_SUFFIX: &str = ".seg";
const SEQ_DIGITS: usize = 20;
/// Read window of recovery: it never holds more of a file than this.
const WINDOW: usize = 64 * 1024;

/// Size bounds of a spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    max_total_bytes: u64,
    max_payload_bytes: u32,
    segment_bytes: u64,
}

impl SpoolLimits {
    /// The largest `max_payload_bytes` accepted (a report is far smaller).
    pub const HARD_MAX_PAYLOAD: u32 = 64 << 20;

    /// `max_total_bytes` bounds the encoded size (headers included) of the pending records;
    /// `max_payload_bytes` one payload; `segment_bytes` is the size at which a segment file is
    /// closed and a new one started (disk use can exceed `max_total_bytes` by about one segment
    /// of acknowledged records). One record of the largest payload must fit the total.
    pub fn new(
        max_total_bytes: u64,
        max_payload_bytes: u32,
        segment_bytes: u64,
    ) -> Result<SpoolLimits, SpoolError> {
        if max_payload_bytes > Self::HARD_MAX_PAYLOAD {
            return Err(SpoolError::InvalidLimits(
                "max_payload_bytes is above the hard maximum of 64 MiB",
            ));
        }
        if segment_bytes < 4096 {
            return Err(SpoolError::InvalidLimits(
                "segment_bytes must be at least 4 KiB",
            ));
        }
        if max_total_bytes < record_len(max_payload_bytes as usize) {
            return Err(SpoolError::InvalidLimits(
                "max_total_bytes must hold at least one record of max_payload_bytes",
            ));
        }
        Ok(SpoolLimits {
            max_total_bytes,
            max_payload_bytes,
            segment_bytes,
        })
    }
    pub fn max_total_bytes(&self) -> u64 {
        self.max_total_bytes
    }
    pub fn max_payload_bytes(&self) -> u32 {
        self.max_payload_bytes
    }
    pub fn segment_bytes(&self) -> u64 {
        self.segment_bytes
    }
}

impl Default for SpoolLimits {
    /// 256 MiB pending, 8 MiB per payload, 4 MiB segments.
    fn default() -> Self {
        SpoolLimits {
            max_total_bytes: 256 << 20,
            max_payload_bytes: 8 << 20,
            segment_bytes: 4 << 20,
        }
    }
}

/// Errors of the spool. [`SpoolError::Full`] is the one the daemon handles (with
/// [`Spool::replace_all`]); the rest are failures to log.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {dir} is in use by another process (its lock file is held)")]
    Locked { dir: PathBuf },
    #[error("spool: cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "spool is full: {pending_records} records ({pending_bytes} bytes) pending, \
         a record of {record_bytes} bytes would exceed the limit of {max_total_bytes} bytes"
    )]
    Full {
        pending_records: u64,
        pending_bytes: u64,
        record_bytes: u64,
        max_total_bytes: u64,
    },
    #[error("payload of {len} bytes exceeds the spool's maximum of {max} bytes")]
    PayloadTooLarge { len: usize, max: u32 },
    #[error("acknowledgement of seq {through}, but the last seq assigned is {last}")]
    AckBeyondLast { through: u64, last: u64 },
    #[error("invalid spool limits: {0}")]
    InvalidLimits(&'static str),
    #[error("spool {path} at offset {offset}: {what} (changed since the spool was opened?)")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: &'static str,
    },
    #[error("spool {dir} refuses writes after a failed write or sync; reopen it")]
    Poisoned { dir: PathBuf },
    #[error("spool sequence numbers are exhausted")]
    SeqExhausted,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// One pending record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// The epoch the record was written in: send it under this epoch, not the spool's current
    /// one (they differ only for records written before a lost `meta` started a new epoch).
    pub epoch: u64,
    pub payload: Vec<u8>,
}

/// What [`Spool::replace_all`] dropped. `bytes` are encoded bytes, headers included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Dropped {
    pub records: u64,
    pub bytes: u64,
}

/// Pending records, as [`Spool::stats`] reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub records: u64,
    /// Encoded bytes of the pending records (headers included): what the bound applies to.
    pub bytes: u64,
    pub oldest_seq: Option<u64>,
    pub segments: usize,
    /// Bytes of segment files on disk (pending and not yet deleted acknowledged records).
    pub disk_bytes: u64,
}

/// What [`Spool::open`] found in `meta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaState {
    /// Valid: epoch and high-water mark carried on.
    Loaded,
    /// A new spool: nothing was there.
    Created,
    /// Segments but no `meta`: a new epoch was started.
    Lost,
    /// `meta` failed validation: a new epoch was started.
    Corrupt { reason: &'static str },
}

/// Why bytes of a spool file were discarded (or a file skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemKind {
    /// A record cut short by the end of its file (a torn write); `seq` if the header survived.
    TornRecord { seq: Option<u64> },
    /// Bytes that are not a valid record header; scanning resumed at the next valid one.
    Unrecognised,
    /// The header is intact, the payload does not match the record sum.
    ChecksumMismatch { seq: u64 },
    /// The header is intact, the payload is longer than `max_payload_bytes`.
    TooLarge { seq: u64, len: u32 },
    /// A valid record whose seq is not above the previous record's.
    OutOfOrder { seq: u64, after: u64 },
    /// A segment name that is not a regular file (symlink, FIFO, directory…): skipped, left in
    /// place, never opened.
    NotARegularFile,
    /// Records below the high-water mark of `meta` that no segment holds any more.
    Missing { first: u64, last: u64 },
}

/// One discarded range of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub offset: u64,
    pub bytes: u64,
    pub kind: ProblemKind,
}

/// What [`Spool::open`] recovered and what it could not. The daemon logs it and reports
/// `records_lost` (and a new epoch) to the collector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    pub meta: MetaState,
    /// Pending records after recovery.
    pub records_recovered: u64,
    /// Records known to be lost; see the module documentation for how they are counted.
    pub records_lost: u64,
    /// Records dropped by a `replace_all` whose clean-up a crash interrupted: the replacing
    /// record survived, so they were already superseded (not lost).
    pub records_superseded: u64,
    pub bytes_discarded: u64,
    pub problems: Vec<Problem>,
}

impl Recovery {
    /// A new epoch was started because `meta` was lost or corrupt.
    pub fn epoch_restarted(&self) -> bool {
        matches!(self.meta, MetaState::Lost | MetaState::Corrupt { .. })
    }
    /// Nothing was lost, discarded or restarted.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.records_lost == 0 && !self.epoch_restarted()
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProblemKind::TornRecord { seq: Some(s) } => write!(f, "record {s} cut short"),
            ProblemKind::TornRecord { seq: None } => write!(f, "partial record header"),
            ProblemKind::Unrecognised => write!(f, "not a valid record"),
            ProblemKind::ChecksumMismatch { seq } => write!(f, "record {seq}: checksum mismatch"),
            ProblemKind::TooLarge { seq, len } => {
                write!(f, "record {seq}: payload of {len} bytes above the limit")
            }
            ProblemKind::OutOfOrder { seq, after } => {
                write!(f, "record {seq} out of order after {after}")
            }
            ProblemKind::NotARegularFile => write!(f, "not a regular file, skipped"),
            ProblemKind::Missing { first, last } => write!(f, "records {first}..={last} missing"),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at offset {}: {} ({} bytes discarded)",
            self.file.display(),
            self.offset,
            self.kind,
            self.bytes
        )
    }
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records recovered, {} lost, {} superseded, {} bytes discarded",
            self.records_recovered,
            self.records_lost,
            self.records_superseded,
            self.bytes_discarded
        )?;
        match &self.meta {
            MetaState::Loaded | MetaState::Created => {}
            MetaState::Lost => write!(f, "; meta missing, new epoch")?,
            MetaState::Corrupt { reason } => write!(f, "; meta corrupt ({reason}), new epoch")?,
        }
        for p in &self.problems {
            write!(f, "; {p}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Encoded size of a record with a payload of `payload_len` bytes.
fn record_len(payload_len: usize) -> u64 {
    HEADER_LEN as u64 + payload_len as u64
}

#[derive(Debug, Clone, Copy)]
struct Header {
    flags: u8,
    len: u32,
    seq: u64,
    epoch: u64,
    sum: [u8; 16],
}

fn header_fields(flags: u8, len: u32, seq: u64, epoch: u64) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[..4].copy_from_slice(&MAGIC);
    b[4] = VERSION;
    b[5] = flags;
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..20].copy_from_slice(&seq.to_le_bytes());
    b[20..28].copy_from_slice(&epoch.to_le_bytes());
    b
}

fn record_hasher(fields: &[u8; 28]) -> blake3::Hasher {
    let mut h = blake3::Hasher::new_derive_key(RECORD_CONTEXT);
    h.update(fields);
    h
}

fn sum16(h: &blake3::Hasher) -> [u8; 16] {
    let mut s = [0u8; 16];
    s.copy_from_slice(&h.finalize().as_bytes()[..16]);
    s
}

fn header_sum(first44: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new_derive_key(HEADER_CONTEXT);
    h.update(first44);
    let mut s = [0u8; 8];
    s.copy_from_slice(&h.finalize().as_bytes()[..8]);
    s
}

fn encode_header(flags: u8, seq: u64, epoch: u64, payload: &[u8]) -> [u8; HEADER_LEN] {
    // Callers have checked the payload against max_payload_bytes (<= 64 MiB).
    let len = payload.len() as u32;
    let fields = header_fields(flags, len, seq, epoch);
    let mut h = record_hasher(&fields);
    h.update(payload);
    let mut b = [0u8; HEADER_LEN];
    b[..28].copy_from_slice(&fields);
    b[28..44].copy_from_slice(&sum16(&h));
    let hs = header_sum(&b[..44]);
    b[44..].copy_from_slice(&hs);
    b
}

/// Encodes one record as [`Spool::append`] writes it (for tests and the fuzz target's checks).
pub fn encode_record(seq: u64, epoch: u64, replaces_earlier: bool, payload: &[u8]) -> Vec<u8> {
    let flags = if replaces_earlier { FLAG_REPLACES } else { 0 };
    let mut v = Vec::with_capacity(HEADER_LEN + payload.len());
    v.extend_from_slice(&encode_header(flags, seq, epoch, payload));
    v.extend_from_slice(payload);
    v
}

/// A header whose header sum, magic, version, reserved bits and seq are valid. The length is
/// then trustworthy, but not yet checked against any limit.
fn decode_header(b: &[u8]) -> Option<Header> {
    if b.len() < HEADER_LEN
        || b[..4] != MAGIC
        || b[4] != VERSION
        || b[5] & !FLAG_REPLACES != 0
        || b[6..8] != [0, 0]
        || b[44..52] != header_sum(&b[..44])
    {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let seq = u64_at(12);
    if seq == 0 {
        return None;
    }
    let mut sum = [0u8; 16];
    sum.copy_from_slice(&b[28..44]);
    Some(Header {
        flags: b[5],
        len: u32_at(8),
        seq,
        epoch: u64_at(20),
        sum,
    })
}

impl Header {
    fn fields(&self) -> [u8; 28] {
        header_fields(self.flags, self.len, self.seq, self.epoch)
    }
    fn record_len(&self) -> u64 {
        record_len(self.len as usize)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    epoch: u64,
    /// No seq below this is ever assigned again.
    next_seq: u64,
    acked_through: u64,
}

fn encode_meta(m: &Meta) -> [u8; META_LEN] {
    let mut b = [0u8; META_LEN];
    b[..8].copy_from_slice(&META_MAGIC);
    b[8..12].copy_from_slice(&META_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&m.epoch.to_le_bytes());
    b[24..32].copy_from_slice(&m.next_seq.to_le_bytes());
    b[32..40].copy_from_slice(&m.acked_through.to_le_bytes());
    let mut h = blake3::Hasher::new_derive_key(META_CONTEXT);
    h.update(&b[..40]);
    b[40..].copy_from_slice(h.finalize().as_bytes());
    b
}

fn decode_meta(b: &[u8]) -> Result<Meta, &'static str> {
    if b.len() != META_LEN {
        return Err("wrong size");
    }
    if b[..8] != META_MAGIC {
        return Err("bad magic");
    }
    let mut h = blake3::Hasher::new_derive_key(META_CONTEXT);
    h.update(&b[..40]);
    if b[40..] != h.finalize().as_bytes()[..] {
        return Err("checksum mismatch");
    }
    if b[8..12] != META_VERSION.to_le_bytes() || b[12..16] != [0; 4] {
        return Err("unknown version");
    }
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    let m = Meta {
        epoch: u64_at(16),
        next_seq: u64_at(24),
        acked_through: u64_at(32),
    };
    if m.next_seq == 0 || m.acked_through >= m.next_seq {
        return Err("inconsistent seqs");
    }
    Ok(m)
}

fn new_epoch(dir: &Path) -> Result<u64, SpoolError> {
    let rng = SystemRandom::new();
    loop {
        let mut b = [0u8; 8];
        rng.fill(&mut b).map_err(|_| SpoolError::Io {
            op: "get random bytes for a new epoch of",
            path: dir.to_path_buf(),
            source: io::Error::other("system random number generator failed"),
        })?;
        let e = u64::from_le_bytes(b);
        if e != 0 {
            return Ok(e);
        }
    }
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:0SEQ_DIGITS$}{SEGMENT_SUFFIX}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn is_stale_temp(name: &str) -> bool {
    // Temp names of fsutil::write_atomic: ".<name>.tmp.<pid>".
    name.strip_prefix('.')
        .and_then(|n| n.split_once(".tmp."))
        .is_some_and(|(base, _)| base == META_NAME || parse_segment_name(base).is_some())
}

/// Opens a spool file for reading: never follows a symlink, never blocks on a FIFO, and
/// refuses anything but a regular file.
fn open_read(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(f)
}

fn open_write(path: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(f)
}

// ---------------------------------------------------------------------------------------------
// Recovery scan

/// A bounded read window over one file (recovery never holds more than [`WINDOW`] bytes).
struct Window<'f> {
    file: &'f File,
    file_len: u64,
    buf: Vec<u8>,
    start: u64,
    filled: usize,
}

impl<'f> Window<'f> {
    fn new(file: &'f File, file_len: u64) -> Self {
        Window {
            file,
            file_len,
            buf: vec![0u8; WINDOW],
            start: 0,
            filled: 0,
        }
    }

    /// Up to `want` (<= WINDOW) bytes at `pos`; fewer only at the end of the file.
    fn at(&mut self, pos: u64, want: usize) -> io::Result<&[u8]> {
        let want = want.min(WINDOW);
        let avail = self.file_len.saturating_sub(pos).min(want as u64) as usize;
        let in_window = pos >= self.start && pos + avail as u64 <= self.start + self.filled as u64;
        if !in_window {
            let n = self.file_len.saturating_sub(pos).min(WINDOW as u64) as usize;
            self.file.read_exact_at(&mut self.buf[..n], pos)?;
            self.start = pos;
            self.filled = n;
        }
        let off = (pos - self.start) as usize;
        Ok(&self.buf[off..off + avail])
    }

    /// The next offset at or after `from` where the record magic starts.
    fn find_magic(&mut self, from: u64) -> io::Result<Option<u64>> {
        let mut pos = from;
        while pos + MAGIC.len() as u64 <= self.file_len {
            let chunk = self.at(pos, WINDOW)?;
            if let Some(i) = chunk.windows(MAGIC.len()).position(|w| w == MAGIC) {
                return Ok(Some(pos + i as u64));
            }
            pos += (chunk.len() - (MAGIC.len() - 1)) as u64;
        }
        Ok(None)
    }

    fn payload_matches(&mut self, h: &Header, pos: u64) -> io::Result<bool> {
        let mut hasher = record_hasher(&h.fields());
        let mut p = pos;
        let end = pos + u64::from(h.len);
        while p < end {
            let chunk = self.at(p, (end - p).min(WINDOW as u64) as usize)?;
            if chunk.is_empty() {
                return Ok(false);
            }
            hasher.update(chunk);
            p += chunk.len() as u64;
        }
        Ok(sum16(&hasher) == h.sum)
    }
}

/// The damage since the last valid record (it may span segments).
#[derive(Debug, Default)]
struct Gap {
    /// Damaged records above the acked seq whose header (hence seq) survived.
    known: u64,
    known_max: u64,
    /// Bytes in which no record could be identified.
    unknown_bytes: u64,
}

/// Running state of the recovery scan over all segments, in order.
struct Scan {
    max_payload: u32,
    acked: u64,
    meta_known: bool,
    prev: Option<u64>,
    seen_max: u64,
    gap: Option<Gap>,
    lost: u64,
    discarded: u64,
    problems: Vec<Problem>,
}

/// One segment as the scan found it.
struct SegmentScan {
    path: PathBuf,
    file: File,
    /// Byte ranges of the valid, in-order records, adjacent ones merged.
    runs: Vec<(u64, u64)>,
    damaged: bool,
    records: u64,
    bytes: u64,
    first_seq: u64,
    last_seq: u64,
    /// Valid records above the acked seq of `meta`.
    above_acked: u64,
    /// Seq of the last valid record flagged "replaces every earlier record" (0: none).
    max_marker: u64,
}

impl Scan {
    /// The seq below which no loss is counted: the previous record, else the acked seq.
    fn base(&self) -> Option<u64> {
        match self.prev {
            Some(p) => Some(p.max(self.acked)),
            None => self.meta_known.then_some(self.acked),
        }
    }

    fn problem(&mut self, file: &Path, offset: u64, bytes: u64, kind: ProblemKind) {
        self.discarded += bytes;
        match kind {
            ProblemKind::ChecksumMismatch { seq } | ProblemKind::TooLarge { seq, .. } => {
                self.seen_max = self.seen_max.max(seq);
                let g = self.gap.get_or_insert_with(Gap::default);
                if seq > self.acked {
                    g.known += 1;
                    g.known_max = g.known_max.max(seq);
                }
            }
            ProblemKind::TornRecord { seq } => {
                let g = self.gap.get_or_insert_with(Gap::default);
                match seq {
                    Some(s) => self.seen_max = self.seen_max.max(s),
                    None => g.unknown_bytes += bytes,
                }
            }
            ProblemKind::Unrecognised => {
                self.gap.get_or_insert_with(Gap::default).unknown_bytes += bytes;
            }
            ProblemKind::OutOfOrder { .. }
            | ProblemKind::NotARegularFile
            | ProblemKind::Missing { .. } => {}
        }
        self.problems.push(Problem {
            file: file.to_path_buf(),
            offset,
            bytes,
            kind,
        });
    }

    fn valid(&mut self, seq: u64) {
        if let Some(g) = self.gap.take() {
            let by_seq = self
                .base()
                .map_or(0, |b| seq.saturating_sub(b).saturating_sub(1));
            self.lost += by_seq.max(g.known);
        }
        self.prev = Some(seq);
        self.seen_max = self.seen_max.max(seq);
    }

    fn segment(&mut self, path: PathBuf, file: File) -> io::Result<SegmentScan> {
        let file_len = file.metadata()?.len();
        let mut s = SegmentScan {
            path,
            runs: Vec::new(),
            damaged: false,
            records: 0,
            bytes: 0,
            first_seq: 0,
            last_seq: 0,
            above_acked: 0,
            max_marker: 0,
            file,
        };
        let path = s.path.clone();
        let mut w = Window::new(&s.file, file_len);
        let mut pos = 0u64;
        let mut garbage_from: Option<u64> = None;
        while pos < file_len {
            let hb = w.at(pos, HEADER_LEN)?;
            let header = decode_header(hb);
            let Some(h) = header else {
                let torn_header = hb.len() < HEADER_LEN
                    && garbage_from.is_none()
                    && hb[..hb.len().min(MAGIC.len())] == MAGIC[..hb.len().min(MAGIC.len())];
                if torn_header {
                    self.problem(
                        &path,
                        pos,
                        file_len - pos,
                        ProblemKind::TornRecord { seq: None },
                    );
                    s.damaged = true;
                    break;
                }
                garbage_from.get_or_insert(pos);
                pos = w.find_magic(pos + 1)?.unwrap_or(file_len);
                continue;
            };
            if let Some(g) = garbage_from.take() {
                self.problem(&path, g, pos - g, ProblemKind::Unrecognised);
                s.damaged = true;
            }
            let end = pos + h.record_len();
            if end > file_len {
                self.problem(
                    &path,
                    pos,
                    file_len - pos,
                    ProblemKind::TornRecord { seq: Some(h.seq) },
                );
                s.damaged = true;
                break;
            }
            let kind = if h.len > self.max_payload {
                Some(ProblemKind::TooLarge {
                    seq: h.seq,
                    len: h.len,
                })
            } else if !w.payload_matches(&h, pos + HEADER_LEN as u64)? {
                Some(ProblemKind::ChecksumMismatch { seq: h.seq })
            } else {
                match self.prev {
                    Some(p) if h.seq <= p => Some(ProblemKind::OutOfOrder {
                        seq: h.seq,
                        after: p,
                    }),
                    _ => None,
                }
            };
            if let Some(kind) = kind {
                self.problem(&path, pos, end - pos, kind);
                s.damaged = true;
            } else {
                self.valid(h.seq);
                match s.runs.last_mut() {
                    Some(r) if r.1 == pos => r.1 = end,
                    _ => s.runs.push((pos, end)),
                }
                if s.records == 0 {
                    s.first_seq = h.seq;
                }
                s.records += 1;
                s.bytes += end - pos;
                s.last_seq = h.seq;
                if h.seq > self.acked {
                    s.above_acked += 1;
                }
                if h.flags & FLAG_REPLACES != 0 {
                    s.max_marker = h.seq;
                }
            }
            pos = end;
        }
        if let Some(g) = garbage_from {
            self.problem(&path, g, file_len - g, ProblemKind::Unrecognised);
            s.damaged = true;
        }
        Ok(s)
    }

    /// Closes the scan: losses at the end of the spool and the lowest safe next seq.
    fn finish(&mut self, meta: Option<&Meta>, dir: &Path) -> Result<u64, SpoolError> {
        let base = self.base();
        let below_hw = meta.map_or(0, |m| m.next_seq - 1);
        let mut skip = 0;
        if let Some(g) = self.gap.take() {
            let top = g.known_max.max(below_hw);
            let by_seq = base.map_or(0, |b| top.saturating_sub(b));
            self.lost += by_seq.max(g.known);
            if g.unknown_bytes > 0 {
                skip = g.unknown_bytes / HEADER_LEN as u64 + 1;
            }
        } else if let Some(b) = base
            && below_hw > b
        {
            self.lost += below_hw - b;
            self.problem(
                dir,
                0,
                0,
                ProblemKind::Missing {
                    first: b + 1,
                    last: below_hw,
                },
            );
        }
        self.prev
            .unwrap_or(0)
            .max(self.acked)
            .max(self.seen_max)
            .checked_add(1)
            .and_then(|n| n.checked_add(skip))
            .ok_or(SpoolError::SeqExhausted)
    }
}

/// Copies the valid runs of a damaged segment into a replacement file, atomically.
fn rewrite_segment(s: &SegmentScan) -> io::Result<()> {
    crate::fsutil::write_atomic_with(&s.path, 0o600, |out| {
        let mut buf = vec![0u8; WINDOW];
        for &(start, end) in &s.runs {
            let mut p = start;
            while p < end {
                let n = (end - p).min(WINDOW as u64) as usize;
                s.file.read_exact_at(&mut buf[..n], p)?;
                out.write_all(&buf[..n])?;
                p += n as u64;
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// The spool

/// One segment file in memory: never empty, records in increasing seq order.
#[derive(Debug)]
struct Segment {
    path: PathBuf,
    /// Bytes of records (the file's size).
    len: u64,
    last_seq: u64,
    /// Offset and seq of the first pending record (`len` and `None` when all are acked).
    head_offset: u64,
    head_seq: Option<u64>,
    pending_records: u64,
    pending_bytes: u64,
}

/// The durable outbox. See the module documentation.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limits: SpoolLimits,
    /// Held for the spool's lifetime: one writer per directory.
    _lock: Flock<File>,
    dir_handle: File,
    epoch: u64,
    next_seq: u64,
    acked_through: u64,
    segments: VecDeque<Segment>,
    /// Write handle of the last segment, while it has room.
    active: Option<File>,
    pending_records: u64,
    pending_bytes: u64,
    /// A write or sync failed in a way that leaves the file's state unknown (after a failed
    /// fsync the page cache may claim data the disk does not hold): refuse further writes.
    poisoned: bool,
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir`, takes its lock, and recovers it.
    pub fn open(dir: &Path, limits: SpoolLimits) -> Result<(Spool, Recovery), SpoolError> {
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("create", dir))?;
            // The new directory's own entry must be durable, or synced records could vanish
            // with it.
            let parent = match dir.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            File::open(parent)
                .and_then(|p| p.sync_all())
                .map_err(io_err("sync", parent))?;
        }
        let dir_handle = File::open(dir).map_err(io_err("open", dir))?;
        let lock = take_lock(dir)?;

        let meta_path = dir.join(META_NAME);
        let meta = read_meta(&meta_path)?;

        // Segment files in name (= seq) order; non-regular ones reported and skipped.
        let mut names = Vec::new();
        let mut skipped = Vec::new();
        let mut name_max = 0u64;
        for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
            let entry = entry.map_err(io_err("list", dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            let file_type = entry.file_type().map_err(io_err("stat", &path))?;
            if is_stale_temp(name) && file_type.is_file() {
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                continue;
            }
            let Some(first) = parse_segment_name(name) else {
                continue;
            };
            name_max = name_max.max(first);
            if file_type.is_file() {
                names.push((first, path));
            } else {
                skipped.push(path);
            }
        }
        names.sort();

        let meta_state = match &meta {
            Ok(_) => MetaState::Loaded,
            Err(None) if names.is_empty() && skipped.is_empty() => MetaState::Created,
            Err(None) => MetaState::Lost,
            Err(Some(reason)) => MetaState::Corrupt { reason },
        };
        let meta = meta.ok();
        let mut scan = Scan {
            max_payload: limits.max_payload_bytes,
            acked: meta.map_or(0, |m| m.acked_through),
            meta_known: meta.is_some(),
            prev: None,
            seen_max: 0,
            gap: None,
            lost: 0,
            discarded: 0,
            problems: Vec::new(),
        };
        for path in skipped {
            scan.problem(&path, 0, 0, ProblemKind::NotARegularFile);
        }
        let mut scans = Vec::with_capacity(names.len());
        for (_, path) in names {
            let file = open_read(&path).map_err(io_err("open", &path))?;
            scans.push(
                scan.segment(path.clone(), file)
                    .map_err(io_err("read", &path))?,
            );
        }
        let min_next = scan.finish(meta.as_ref(), dir)?;
        let next_seq = min_next
            .max(meta.map_or(1, |m| m.next_seq))
            .max(name_max.checked_add(1).ok_or(SpoolError::SeqExhausted)?);
        let max_marker = scans.iter().map(|s| s.max_marker).max().unwrap_or(0);
        let acked = scan.acked.max(max_marker.saturating_sub(1));
        let epoch = match meta {
            Some(m) => m.epoch,
            None => new_epoch(dir)?,
        };
        // Durable before any file is rewritten or deleted: the high-water mark covers every
        // seq the scan saw, so none of them is ever assigned again.
        write_meta(
            dir,
            &Meta {
                epoch,
                next_seq,
                acked_through: acked,
            },
        )?;

        let above_acked: u64 = scans.iter().map(|s| s.above_acked).sum();
        let mut segments = VecDeque::with_capacity(scans.len());
        let mut removed = false;
        for s in scans {
            if s.records == 0 || s.last_seq <= acked {
                remove_if_present(&s.path)?;
                removed = true;
                continue;
            }
            if s.damaged {
                rewrite_segment(&s).map_err(io_err("rewrite", &s.path))?;
            }
            segments.push_back(Segment {
                path: s.path,
                len: s.bytes,
                last_seq: s.last_seq,
                head_offset: 0,
                head_seq: Some(s.first_seq),
                pending_records: s.records,
                pending_bytes: s.bytes,
            });
        }
        if removed {
            dir_handle.sync_all().map_err(io_err("sync", dir))?;
        }
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            limits,
            _lock: lock,
            dir_handle,
            epoch,
            next_seq,
            acked_through: acked,
            pending_records: segments.iter().map(|s| s.pending_records).sum(),
            pending_bytes: segments.iter().map(|s| s.pending_bytes).sum(),
            segments,
            active: None,
            poisoned: false,
        };
        spool.skip_acked()?;
        if let Some(last) = spool.segments.back()
            && last.len < limits.segment_bytes
        {
            let f = open_write(&last.path).map_err(io_err("open", &last.path))?;
            let size = f.metadata().map_err(io_err("stat", &last.path))?.len();
            if size != last.len {
                return Err(SpoolError::Corrupt {
                    path: last.path.clone(),
                    offset: size,
                    what: "segment size changed during recovery",
                });
            }
            spool.active = Some(f);
        }
        let recovery = Recovery {
            meta: meta_state,
            records_recovered: spool.pending_records,
            records_lost: scan.lost,
            records_superseded: above_acked.saturating_sub(spool.pending_records),
            bytes_discarded: scan.discarded,
            problems: scan.problems,
        };
        Ok((spool, recovery))
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The epoch: random, made with the spool, kept for its lifetime (a new one only when
    /// `meta` was lost). The collector deduplicates by (host, epoch, seq).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The seq the next `append` (or `replace_all`) will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Pending records, bytes and the oldest pending seq.
    pub fn stats(&self) -> Stats {
        Stats {
            records: self.pending_records,
            bytes: self.pending_bytes,
            oldest_seq: self.segments.iter().find_map(|s| s.head_seq),
            segments: self.segments.len(),
            disk_bytes: self.segments.iter().map(|s| s.len).sum(),
        }
    }

    /// Appends `payload` as a new record and returns its seq once the record is durable.
    ///
    /// Fails with [`SpoolError::Full`] when the pending records plus this one would exceed
    /// `max_total_bytes`: the caller then calls [`Spool::replace_all`] with a snapshot that
    /// supersedes everything pending. Nothing is ever dropped here.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, SpoolError> {
        self.writable()?;
        let len = self.check_payload(payload)?;
        if self.pending_bytes + len > self.limits.max_total_bytes {
            return Err(SpoolError::Full {
                pending_records: self.pending_records,
                pending_bytes: self.pending_bytes,
                record_bytes: len,
                max_total_bytes: self.limits.max_total_bytes,
            });
        }
        self.write_record(payload, 0)
    }

    /// Atomically drops every pending record and appends `payload` (the daemon's full-state
    /// snapshot that supersedes them). Returns its seq and what was dropped, so the daemon can
    /// report that its state was incomplete.
    ///
    /// The new record is written, flagged "replaces every earlier record", into a new segment;
    /// once it is durable the swap has happened, also for a crash right after (recovery honours
    /// the flag). Deleting the superseded segments follows; if that fails the replacement still
    /// stands, and the next `ack` retries the clean-up (and reports its error).
    pub fn replace_all(&mut self, payload: &[u8]) -> Result<(u64, Dropped), SpoolError> {
        self.writable()?;
        self.check_payload(payload)?;
        let dropped = Dropped {
            records: self.pending_records,
            bytes: self.pending_bytes,
        };
        self.active = None; // the replacing record starts a segment of its own
        let seq = self.write_record(payload, FLAG_REPLACES)?;
        self.acked_through = seq - 1;
        self.skip_acked()?;
        // Clean-up only: the durable flagged record already superseded the old segments, so
        // an error here loses nothing and is reported by the next ack.
        if self.write_meta().is_ok() {
            let _ = self.remove_acked_segments();
        }
        Ok((seq, dropped))
    }

    /// Removes every record with seq <= `through` (the collector committed them). Returns how
    /// many pending records that released. `meta` is written first, so the released seqs are
    /// never assigned again. Acknowledging a seq that was never assigned is an error.
    pub fn ack(&mut self, through: u64) -> Result<u64, SpoolError> {
        self.writable()?;
        let last = self.next_seq - 1;
        if through > last {
            return Err(SpoolError::AckBeyondLast { through, last });
        }
        if through <= self.acked_through {
            self.remove_acked_segments()?;
            return Ok(0);
        }
        let before = self.pending_records;
        let saved = self.acked_through;
        self.acked_through = through;
        if let Err(e) = self.write_meta() {
            self.acked_through = saved;
            return Err(e);
        }
        self.skip_acked()?;
        self.remove_acked_segments()?;
        Ok(before - self.pending_records)
    }

    /// The pending records in seq order, read lazily from disk. Every record is checked again
    /// (sums, order); an error ends the iteration.
    pub fn pending(&self) -> Pending<'_> {
        Pending {
            spool: self,
            segment: 0,
            reader: None,
            last_seq: self.acked_through,
            failed: false,
        }
    }

    fn writable(&self) -> Result<(), SpoolError> {
        if self.poisoned {
            return Err(SpoolError::Poisoned {
                dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    fn check_payload(&self, payload: &[u8]) -> Result<u64, SpoolError> {
        if payload.len() > self.limits.max_payload_bytes as usize {
            return Err(SpoolError::PayloadTooLarge {
                len: payload.len(),
                max: self.limits.max_payload_bytes,
            });
        }
        Ok(record_len(payload.len()))
    }

    fn write_meta(&self) -> Result<(), SpoolError> {
        write_meta(
            &self.dir,
            &Meta {
                epoch: self.epoch,
                next_seq: self.next_seq,
                acked_through: self.acked_through,
            },
        )
    }

    /// Writes one record (into the active segment, or a new one) and syncs it.
    fn write_record(&mut self, payload: &[u8], flags: u8) -> Result<u64, SpoolError> {
        let seq = self.next_seq;
        let next = seq.checked_add(1).ok_or(SpoolError::SeqExhausted)?;
        let header = encode_header(flags, seq, self.epoch, payload);
        let len = record_len(payload.len());
        let room = match (self.active.as_ref(), self.segments.back()) {
            (Some(_), Some(last)) => last.len + len <= self.limits.segment_bytes,
            _ => false,
        };
        if let (true, Some(file), Some(last)) =
            (room, self.active.as_ref(), self.segments.back_mut())
        {
            let at = last.len;
            let written = file
                .write_all_at(&header, at)
                .and_then(|()| file.write_all_at(payload, at + HEADER_LEN as u64));
            if let Err(e) = written {
                // Leave no partial record behind; if even that fails, stop writing.
                if file.set_len(at).is_err() {
                    self.poisoned = true;
                }
                return Err(io_err("write", &last.path)(e));
            }
            if let Err(e) = file.sync_data() {
                self.poisoned = true;
                return Err(io_err("sync", &last.path)(e));
            }
            last.len += len;
            last.last_seq = seq;
            if last.head_seq.is_none() {
                last.head_seq = Some(seq);
                last.head_offset = at;
            }
            last.pending_records += 1;
            last.pending_bytes += len;
        } else {
            self.create_segment(seq, &header, payload)?;
        }
        if self
            .segments
            .back()
            .is_some_and(|s| s.len >= self.limits.segment_bytes)
        {
            self.active = None;
        }
        self.next_seq = next;
        self.pending_records += 1;
        self.pending_bytes += len;
        Ok(seq)
    }

    fn create_segment(
        &mut self,
        seq: u64,
        header: &[u8; HEADER_LEN],
        payload: &[u8],
    ) -> Result<(), SpoolError> {
        let path = self.dir.join(segment_name(seq));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err("create", &path))?;
        if let Err(e) = file
            .write_all(header)
            .and_then(|()| file.write_all(payload))
        {
            drop(file);
            // A file left behind would take this name again at the next roll.
            if fs::remove_file(&path).is_err() {
                self.poisoned = true;
            }
            return Err(io_err("write", &path)(e));
        }
        if let Err(e) = file.sync_data() {
            self.poisoned = true;
            return Err(io_err("sync", &path)(e));
        }
        if let Err(e) = self.dir_handle.sync_all() {
            self.poisoned = true;
            return Err(io_err("sync", &self.dir)(e));
        }
        let len = record_len(payload.len());
        self.segments.push_back(Segment {
            path,
            len,
            last_seq: seq,
            head_offset: 0,
            head_seq: Some(seq),
            pending_records: 1,
            pending_bytes: len,
        });
        self.active = Some(file);
        Ok(())
    }

    /// Drops the records with seq <= `acked_through` from the pending counts: whole segments
    /// at once, the head of the first partly acknowledged one by walking its headers.
    fn skip_acked(&mut self) -> Result<(), SpoolError> {
        let acked = self.acked_through;
        for seg in self.segments.iter_mut() {
            if seg.last_seq <= acked {
                self.pending_records -= seg.pending_records;
                self.pending_bytes -= seg.pending_bytes;
                seg.pending_records = 0;
                seg.pending_bytes = 0;
                seg.head_offset = seg.len;
                seg.head_seq = None;
                continue;
            }
            if seg.head_seq.is_some_and(|s| s <= acked) {
                let file = open_read(&seg.path).map_err(io_err("open", &seg.path))?;
                let mut hb = [0u8; HEADER_LEN];
                loop {
                    let corrupt = |what| SpoolError::Corrupt {
                        path: seg.path.clone(),
                        offset: seg.head_offset,
                        what,
                    };
                    if seg.head_offset >= seg.len {
                        return Err(corrupt("segment ends before its last record"));
                    }
                    file.read_exact_at(&mut hb, seg.head_offset)
                        .map_err(io_err("read", &seg.path))?;
                    let h = decode_header(&hb).ok_or_else(|| corrupt("invalid record header"))?;
                    if h.seq > acked {
                        seg.head_seq = Some(h.seq);
                        break;
                    }
                    let n = h.record_len();
                    if seg.head_offset + n > seg.len || seg.pending_records == 0 {
                        return Err(corrupt("record runs past the end of the segment"));
                    }
                    seg.head_offset += n;
                    seg.pending_records -= 1;
                    seg.pending_bytes = seg.pending_bytes.saturating_sub(n);
                    self.pending_records -= 1;
                    self.pending_bytes = self.pending_bytes.saturating_sub(n);
                }
            }
            break;
        }
        Ok(())
    }

    /// Deletes the leading segments whose records are all acknowledged (the caller has made
    /// `acked_through` durable, in `meta` or by a flagged replacing record).
    fn remove_acked_segments(&mut self) -> Result<(), SpoolError> {
        let mut removed = false;
        while let Some(seg) = self.segments.front() {
            if seg.last_seq > self.acked_through {
                break;
            }
            remove_if_present(&seg.path)?;
            removed = true;
            self.segments.pop_front();
            if self.segments.is_empty() {
                self.active = None;
            }
        }
        if removed {
            self.dir_handle
                .sync_all()
                .map_err(io_err("sync", &self.dir))?;
        }
        Ok(())
    }
}

/// Iterator over the pending records, from [`Spool::pending`].
#[derive(Debug)]
pub struct Pending<'a> {
    spool: &'a Spool,
    segment: usize,
    reader: Option<(BufReader<File>, u64)>,
    last_seq: u64,
    failed: bool,
}

impl Pending<'_> {
    fn advance(&mut self) -> Result<Option<Record>, SpoolError> {
        let spool = self.spool;
        loop {
            let Some(seg) = spool.segments.get(self.segment) else {
                return Ok(None);
            };
            let (reader, pos) = match &mut self.reader {
                Some(r) => r,
                None => {
                    if seg.head_seq.is_none() {
                        self.segment += 1;
                        continue;
                    }
                    let mut f = open_read(&seg.path).map_err(io_err("open", &seg.path))?;
                    f.seek(SeekFrom::Start(seg.head_offset))
                        .map_err(io_err("read", &seg.path))?;
                    self.reader
                        .insert((BufReader::with_capacity(WINDOW, f), seg.head_offset))
                }
            };
            if *pos >= seg.len {
                self.reader = None;
                self.segment += 1;
                continue;
            }
            let corrupt = |what| SpoolError::Corrupt {
                path: seg.path.clone(),
                offset: *pos,
                what,
            };
            let mut hb = [0u8; HEADER_LEN];
            reader
                .read_exact(&mut hb)
                .map_err(io_err("read", &seg.path))?;
            let h = decode_header(&hb).ok_or_else(|| corrupt("invalid record header"))?;
            if h.len > spool.limits.max_payload_bytes {
                return Err(corrupt("payload above the limit"));
            }
            if *pos + h.record_len() > seg.len {
                return Err(corrupt("record runs past the end of the segment"));
            }
            let mut payload = vec![0u8; h.len as usize];
            reader
                .read_exact(&mut payload)
                .map_err(io_err("read", &seg.path))?;
            let mut hasher = record_hasher(&h.fields());
            hasher.update(&payload);
            if sum16(&hasher) != h.sum {
                return Err(corrupt("checksum mismatch"));
            }
            if h.seq <= self.last_seq {
                return Err(corrupt("record out of order"));
            }
            *pos += h.record_len();
            self.last_seq = h.seq;
            return Ok(Some(Record {
                seq: h.seq,
                epoch: h.epoch,
                payload,
            }));
        }
    }
}

impl Iterator for Pending<'_> {
    type Item = Result<Record, SpoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.advance() {
            Ok(r) => r.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

fn write_meta(dir: &Path, m: &Meta) -> Result<(), SpoolError> {
    let path = dir.join(META_NAME);
    crate::fsutil::write_atomic(&path, &encode_meta(m), 0o600).map_err(io_err("write", &path))
}

fn remove_if_present(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", path)(e)),
        _ => Ok(()),
    }
}

fn take_lock(dir: &Path) -> Result<Flock<File>, SpoolError> {
    let path = dir.join(LOCK_NAME);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&path)
        .map_err(io_err("open the lock file", &path))?;
    if !file.metadata().map_err(io_err("stat", &path))?.is_file() {
        return Err(SpoolError::Io {
            op: "lock",
            path,
            source: io::Error::other("not a regular file"),
        });
    }
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            SpoolError::Locked {
                dir: dir.to_path_buf(),
            }
        } else {
            SpoolError::Io {
                op: "lock",
                path: path.clone(),
                source: errno.into(),
            }
        }
    })
}

/// `Err(None)`: no meta; `Err(Some(reason))`: corrupt; I/O errors fail the open.
fn read_meta(path: &Path) -> Result<Result<Meta, Option<&'static str>>, SpoolError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Err(None)),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(Err(Some("a symlink")));
        }
        Err(e) => return Err(io_err("open", path)(e)),
    };
    if !file.metadata().map_err(io_err("stat", path))?.is_file() {
        return Ok(Err(Some("not a regular file")));
    }
    let mut buf = Vec::with_capacity(META_LEN + 1);
    file.take(META_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(io_err("read", path))?;
    Ok(decode_meta(&buf).map_err(Some))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Everything in one segment (64 KiB) unless a test asks for small segments.
    fn limits() -> SpoolLimits {
        SpoolLimits::new(1 << 20, 16 << 10, 64 << 10).unwrap()
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("report number {i}; ").repeat(6).into_bytes()
    }

    fn open(dir: &Path) -> (Spool, Recovery) {
        Spool::open(dir, limits()).unwrap()
    }

    fn all(s: &Spool) -> Vec<(u64, Vec<u8>)> {
        s.pending()
            .map(|r| r.map(|r| (r.seq, r.payload)))
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn seqs(s: &Spool) -> Vec<u64> {
        all(s).into_iter().map(|(q, _)| q).collect()
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_str().unwrap().ends_with(SEGMENT_SUFFIX))
            .collect();
        v.sort();
        v
    }

    /// A spool with records 1..=n in one segment; returns the segment and record offsets.
    fn filled(dir: &Path, n: u64) -> (PathBuf, Vec<u64>) {
        let (mut s, _) = open(dir);
        let mut offsets = Vec::new();
        let mut off = 0;
        for i in 1..=n {
            offsets.push(off);
            assert_eq!(s.append(&payload(i)).unwrap(), i);
            off += record_len(payload(i).len());
        }
        let files = segment_files(dir);
        assert_eq!(files.len(), 1);
        (files[0].clone(), offsets)
    }

    fn edit(path: &Path, f: impl FnOnce(&mut Vec<u8>)) {
        let mut b = fs::read(path).unwrap();
        f(&mut b);
        fs::write(path, b).unwrap();
    }

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        let (mut s, r) = open(d.path());
        assert_eq!(r.meta, MetaState::Created);
        assert!(r.is_clean());
        assert_eq!(s.next_seq(), 1);
        for i in 1..=3 {
            assert_eq!(s.append(&payload(i)).unwrap(), i);
        }
        assert_eq!(
            s.append(b"").unwrap(),
            4,
            "an empty payload is a record too"
        );
        let got = all(&s);
        assert_eq!(got.len(), 4);
        for (i, (seq, p)) in got.iter().take(3).enumerate() {
            assert_eq!(*seq, i as u64 + 1);
            assert_eq!(*p, payload(*seq));
        }
        let st = s.stats();
        assert_eq!((st.records, st.oldest_seq, st.segments), (4, Some(1), 1));
        assert_eq!(
            st.bytes,
            (1..=3).map(|i| record_len(payload(i).len())).sum::<u64>() + HEADER_LEN as u64
        );
        let rec = s.pending().next().unwrap().unwrap();
        assert_eq!(rec.epoch, s.epoch());
    }

    #[test]
    fn seq_is_monotonic_across_reopen() {
        let d = tempfile::tempdir().unwrap();
        let epoch = {
            let (mut s, _) = open(d.path());
            for i in 1..=3 {
                s.append(&payload(i)).unwrap();
            }
            s.epoch()
        };
        let (mut s, r) = open(d.path());
        assert!(r.is_clean(), "{r}");
        assert_eq!((r.meta, r.records_recovered), (MetaState::Loaded, 3));
        assert_eq!(
            s.epoch(),
            epoch,
            "the epoch is kept for the spool's lifetime"
        );
        assert_eq!(s.next_seq(), 4);
        assert_eq!(s.append(&payload(4)).unwrap(), 4);
        assert_eq!(seqs(&s), [1, 2, 3, 4]);
    }

    #[test]
    fn seq_is_monotonic_after_everything_was_acked() {
        let d = tempfile::tempdir().unwrap();
        {
            let (mut s, _) = open(d.path());
            for i in 1..=3 {
                s.append(&payload(i)).unwrap();
            }
            assert_eq!(s.ack(3).unwrap(), 3);
            assert!(segment_files(d.path()).is_empty());
            assert_eq!(s.stats().oldest_seq, None);
        }
        let (mut s, r) = open(d.path());
        assert!(r.is_clean(), "{r}");
        assert!(all(&s).is_empty());
        assert_eq!(s.append(&payload(9)).unwrap(), 4);
    }

    #[test]
    fn ack_deletes_whole_segments_and_skips_a_partly_acked_head() {
        let d = tempfile::tempdir().unwrap();
        let small = SpoolLimits::new(1 << 20, 4096, 4096).unwrap();
        let (mut s, _) = Spool::open(d.path(), small).unwrap();
        let big = vec![7u8; 960]; // 4 records per 4 KiB segment
        for _ in 0..10 {
            s.append(&big).unwrap();
        }
        assert_eq!(segment_files(d.path()).len(), 3);
        assert_eq!(s.ack(5).unwrap(), 5);
        // 1..=4 were one segment; 5 is the head of the next one, skipped by seq.
        assert_eq!(segment_files(d.path()).len(), 2);
        assert_eq!(seqs(&s), (6..=10).collect::<Vec<_>>());
        let st = s.stats();
        assert_eq!((st.records, st.oldest_seq), (5, Some(6)));
        assert_eq!(st.bytes, 5 * record_len(960));
        assert_eq!(s.ack(3).unwrap(), 0, "an old ack is a no-op");
        assert!(matches!(
            s.ack(11),
            Err(SpoolError::AckBeyondLast {
                through: 11,
                last: 10
            })
        ));
        drop(s);
        let (mut s, r) = Spool::open(d.path(), small).unwrap();
        assert!(r.is_clean(), "{r}");
        assert_eq!(seqs(&s), (6..=10).collect::<Vec<_>>(), "the ack is durable");
        assert_eq!(s.ack(10).unwrap(), 5);
        assert!(segment_files(d.path()).is_empty());
        assert_eq!(s.append(&big).unwrap(), 11);
    }

    #[test]
    fn full_then_replace_all_drops_everything_pending_atomically() {
        let d = tempfile::tempdir().unwrap();
        let tight = SpoolLimits::new(2048, 1024, 4096).unwrap();
        let (mut s, _) = Spool::open(d.path(), tight).unwrap();
        let p = vec![1u8; 400];
        let mut n = 0;
        let err = loop {
            match s.append(&p) {
                Ok(_) => n += 1,
                Err(e) => break e,
            }
        };
        assert_eq!(n, 4);
        assert!(
            matches!(
                err,
                SpoolError::Full {
                    pending_records: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            s.append(&[0u8; 1025]),
            Err(SpoolError::PayloadTooLarge {
                len: 1025,
                max: 1024
            })
        ));
        let (seq, dropped) = s.replace_all(b"snapshot").unwrap();
        assert_eq!(seq, 5);
        assert_eq!(
            dropped,
            Dropped {
                records: 4,
                bytes: 4 * record_len(400)
            }
        );
        assert_eq!(all(&s), [(5, b"snapshot".to_vec())]);
        assert_eq!(segment_files(d.path()).len(), 1);
        assert_eq!(s.append(&p).unwrap(), 6);
        assert_eq!(
            s.ack(3).unwrap(),
            0,
            "acks of replaced records change nothing"
        );
        drop(s);
        let (s, r) = Spool::open(d.path(), tight).unwrap();
        assert!(r.is_clean(), "{r}");
        assert_eq!(seqs(&s), [5, 6]);
        assert_eq!(s.next_seq(), 7);
    }

    #[test]
    fn epoch_is_stable_and_new_when_meta_is_corrupt_or_lost() {
        let d = tempfile::tempdir().unwrap();
        let (_, offsets) = filled(d.path(), 3);
        assert_eq!(offsets.len(), 3);
        let e1 = open(d.path()).0.epoch();
        assert_eq!(open(d.path()).0.epoch(), e1);

        edit(&d.path().join(META_NAME), |b| b[20] ^= 1);
        let (mut s, r) = open(d.path());
        assert_eq!(
            r.meta,
            MetaState::Corrupt {
                reason: "checksum mismatch"
            }
        );
        assert!(r.epoch_restarted() && !r.is_clean());
        let e2 = s.epoch();
        assert_ne!(e2, e1);
        // Records keep the epoch they were written under; seqs go on.
        let recs: Vec<Record> = s.pending().collect::<Result<_, _>>().unwrap();
        assert!(recs.iter().all(|r| r.epoch == e1));
        assert_eq!(s.append(b"x").unwrap(), 4);
        assert_eq!(s.pending().last().unwrap().unwrap().epoch, e2);
        drop(s);

        fs::remove_file(d.path().join(META_NAME)).unwrap();
        let (s, r) = open(d.path());
        assert_eq!(r.meta, MetaState::Lost);
        assert_ne!(s.epoch(), e2);
        assert_eq!(s.next_seq(), 5);
    }

    /// Reopens after damage: the other records survive, the loss is as documented, new seqs
    /// are fresh, and a second reopen finds a clean spool (the loss is reported once).
    fn check_recovery(dir: &Path, survivors: &[u64], lost: u64, discarded: u64) -> Recovery {
        let (mut s, r) = open(dir);
        assert_eq!(seqs(&s), survivors, "{r}");
        assert_eq!(r.records_recovered, survivors.len() as u64);
        assert_eq!(r.records_lost, lost, "{r}");
        assert_eq!(r.bytes_discarded, discarded, "{r}");
        let fresh = s.append(b"after").unwrap();
        assert!(fresh > 5, "seq {fresh} may have been used before");
        drop(s);
        let (s, again) = open(dir);
        assert!(again.is_clean(), "{again}");
        let mut expect = survivors.to_vec();
        expect.push(fresh);
        assert_eq!(seqs(&s), expect);
        r
    }

    #[test]
    fn a_flipped_payload_bit_loses_only_that_record() {
        let d = tempfile::tempdir().unwrap();
        let (seg, off) = filled(d.path(), 5);
        edit(&seg, |b| b[off[2] as usize + HEADER_LEN + 3] ^= 0x10);
        let r = check_recovery(d.path(), &[1, 2, 4, 5], 1, record_len(payload(3).len()));
        assert_eq!(r.problems.len(), 1);
        assert_eq!(r.problems[0].kind, ProblemKind::ChecksumMismatch { seq: 3 });
        assert_eq!((r.problems[0].offset, &r.problems[0].file), (off[2], &seg));
    }

    #[test]
    fn a_flipped_header_bit_loses_only_that_record() {
        let d = tempfile::tempdir().unwrap();
        let (seg, off) = filled(d.path(), 5);
        edit(&seg, |b| b[off[2] as usize + 13] ^= 0x01); // in the seq
        let r = check_recovery(d.path(), &[1, 2, 4, 5], 1, record_len(payload(3).len()));
        assert_eq!(r.problems[0].kind, ProblemKind::Unrecognised);
    }

    #[test]
    fn a_zeroed_length_loses_only_that_record() {
        let d = tempfile::tempdir().unwrap();
        let (seg, off) = filled(d.path(), 5);
        edit(&seg, |b| {
            b[off[1] as usize + 8..off[1] as usize + 12].fill(0)
        });
        let r = check_recovery(d.path(), &[1, 3, 4, 5], 1, record_len(payload(2).len()));
        assert_eq!(r.problems[0].kind, ProblemKind::Unrecognised);
        assert_eq!(r.problems[0].offset, off[1]);
    }

    #[test]
    fn a_torn_tail_in_the_header_is_truncated_and_not_counted_as_lost() {
        let d = tempfile::tempdir().unwrap();
        let (seg, off) = filled(d.path(), 5);
        edit(&seg, |b| b.truncate(off[4] as usize + 20));
        let r = check_recovery(d.path(), &[1, 2, 3, 4], 0, 20);
        assert_eq!(r.problems[0].kind, ProblemKind::TornRecord { seq: None });
    }

    #[test]
    fn a_torn_tail_in_the_payload_is_truncated_and_not_counted_as_lost() {
        let d = tempfile::tempdir().unwrap();
        let (seg, off) = filled(d.path(), 5);
        edit(&seg, |b| b.truncate(off[4] as usize + HEADER_LEN + 7));
        let r = check_recovery(d.path(), &[1, 2, 3, 4], 0, HEADER_LEN as u64 + 7);
        assert_eq!(r.problems[0].kind, ProblemKind::TornRecord { seq: Some(5) });
    }

    #[test]
    fn damage_at_the_head_counts_from_the_acked_seq() {
        let d = tempfile::tempdir().unwrap();
        let (seg, off) = filled(d.path(), 5);
        edit(&seg, |b| b[..off[2] as usize].fill(0xAA)); // records 1 and 2
        check_recovery(d.path(), &[3, 4, 5], 2, off[2]);
    }

    #[test]
    fn records_out_of_order_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        let (seg, _) = filled(d.path(), 3);
        let epoch = open(d.path()).0.epoch();
        edit(&seg, |b| {
            b.extend(encode_record(2, epoch, false, b"stale copy"))
        });
        let (s, r) = open(d.path());
        assert_eq!(seqs(&s), [1, 2, 3]);
        assert_eq!(
            r.problems[0].kind,
            ProblemKind::OutOfOrder { seq: 2, after: 3 }
        );
        assert_eq!(r.records_lost, 0);
    }

    #[test]
    fn missing_records_below_the_high_water_mark_are_lost() {
        let d = tempfile::tempdir().unwrap();
        let (seg, _) = filled(d.path(), 3);
        drop(open(d.path())); // meta now says next seq 4
        fs::remove_file(seg).unwrap();
        let (s, r) = open(d.path());
        assert_eq!(r.records_lost, 3, "{r}");
        assert_eq!(
            r.problems[0].kind,
            ProblemKind::Missing { first: 1, last: 3 }
        );
        assert_eq!(s.next_seq(), 4);
    }

    #[test]
    fn crash_after_the_ack_meta_before_the_deletes() {
        let d = tempfile::tempdir().unwrap();
        let (seg, _) = filled(d.path(), 3);
        let saved = fs::read(&seg).unwrap();
        let (mut s, _) = open(d.path());
        s.ack(3).unwrap();
        drop(s);
        fs::write(&seg, saved).unwrap(); // the delete never happened
        let (mut s, r) = open(d.path());
        assert!(r.is_clean(), "{r}");
        assert!(all(&s).is_empty());
        assert!(segment_files(d.path()).is_empty(), "acked segment removed");
        assert_eq!(s.append(b"x").unwrap(), 4);
    }

    #[test]
    fn crash_after_the_replacing_record_before_meta_and_deletes() {
        let d = tempfile::tempdir().unwrap();
        let (old_seg, _) = filled(d.path(), 3);
        let saved_seg = fs::read(&old_seg).unwrap();
        let saved_meta = fs::read(d.path().join(META_NAME)).unwrap();
        let (mut s, _) = open(d.path());
        s.replace_all(b"snapshot").unwrap();
        drop(s);
        fs::write(&old_seg, saved_seg).unwrap();
        fs::write(d.path().join(META_NAME), saved_meta).unwrap();
        let (mut s, r) = open(d.path());
        assert_eq!((r.records_superseded, r.records_lost), (3, 0), "{r}");
        assert_eq!(all(&s), [(4, b"snapshot".to_vec())]);
        assert_eq!(segment_files(d.path()).len(), 1);
        assert_eq!(s.append(b"x").unwrap(), 5);
    }

    #[test]
    fn crash_after_creating_a_segment_before_writing_it() {
        let d = tempfile::tempdir().unwrap();
        filled(d.path(), 3);
        fs::write(d.path().join(segment_name(4)), b"").unwrap();
        let (mut s, r) = open(d.path());
        assert!(r.is_clean(), "{r}");
        assert_eq!(seqs(&s), [1, 2, 3]);
        assert_eq!(
            segment_files(d.path()).len(),
            1,
            "the empty segment is removed"
        );
        assert_eq!(s.append(b"x").unwrap(), 5, "seq 4 is not reused");
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (_held, _) = open(d.path());
        let err = Spool::open(d.path(), limits()).unwrap_err();
        assert!(matches!(err, SpoolError::Locked { .. }));
        let msg = err.to_string();
        assert!(msg.contains(d.path().to_str().unwrap()), "{msg}");
    }

    #[test]
    fn hostile_entries_are_skipped_never_followed_or_blocked_on() {
        let d = tempfile::tempdir().unwrap();
        filled(d.path(), 2);
        let outside = d.path().join("outside");
        fs::write(&outside, encode_record(9, 1, false, b"not ours")).unwrap();
        symlink(&outside, d.path().join(segment_name(10))).unwrap();
        nix::unistd::mkfifo(
            &d.path().join(segment_name(20)),
            nix::sys::stat::Mode::S_IRWXU,
        )
        .unwrap();
        fs::create_dir(d.path().join(segment_name(30))).unwrap();
        fs::write(d.path().join("notes.txt"), "unrelated").unwrap();
        let (mut s, r) = open(d.path());
        assert_eq!(seqs(&s), [1, 2]);
        let skipped: Vec<_> = r
            .problems
            .iter()
            .filter(|p| p.kind == ProblemKind::NotARegularFile)
            .collect();
        assert_eq!(skipped.len(), 3, "{r}");
        assert_eq!(r.records_lost, 0);
        assert!(
            s.next_seq() > 30,
            "names of skipped entries are never created"
        );
        s.append(b"x").unwrap();
        assert_eq!(
            fs::read(&outside).unwrap(),
            encode_record(9, 1, false, b"not ours")
        );

        // A symlinked meta is replaced, never followed.
        drop(s);
        let target = d.path().join("target");
        fs::write(&target, "keep").unwrap();
        fs::remove_file(d.path().join(META_NAME)).unwrap();
        symlink(&target, d.path().join(META_NAME)).unwrap();
        let (_, r) = open(d.path());
        assert_eq!(
            r.meta,
            MetaState::Corrupt {
                reason: "a symlink"
            }
        );
        assert_eq!(fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn limits_are_validated() {
        assert!(SpoolLimits::new(100, 1000, 4096).is_err());
        assert!(SpoolLimits::new(1 << 30, SpoolLimits::HARD_MAX_PAYLOAD + 1, 4096).is_err());
        assert!(SpoolLimits::new(1 << 20, 1000, 10).is_err());
        let d = SpoolLimits::default();
        assert!(
            SpoolLimits::new(
                d.max_total_bytes(),
                d.max_payload_bytes(),
                d.segment_bytes()
            )
            .is_ok()
        );
    }

    /// Writes the seeds of the `spool_recover` fuzz target (see `fuzz/README.md`):
    /// `SPOOL_SEEDS_DIR=fuzz/seeds/spool_recover cargo test -p driftwatch-agent
    /// write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore]
    fn write_fuzz_seeds() {
        let Some(out) = std::env::var_os("SPOOL_SEEDS_DIR") else {
            return;
        };
        let out = PathBuf::from(out);
        fs::create_dir_all(&out).unwrap();
        let d = tempfile::tempdir().unwrap();
        let (mut s, _) = open(d.path());
        for i in 1..=4 {
            s.append(&payload(i)).unwrap();
        }
        s.ack(1).unwrap();
        let meta = fs::read(d.path().join(META_NAME)).unwrap();
        let seg = fs::read(&segment_files(d.path())[0]).unwrap();
        // Input layout of the target: flags byte, [meta], segment bytes.
        let with = |flags: u8, meta: Option<&[u8]>, seg: &[u8]| {
            let mut v = vec![flags];
            v.extend_from_slice(meta.unwrap_or_default());
            v.extend_from_slice(seg);
            v
        };
        fs::write(out.join("four_records_meta"), with(1, Some(&meta), &seg)).unwrap();
        fs::write(out.join("four_records_no_meta"), with(0, None, &seg)).unwrap();
        s.replace_all(b"snapshot").unwrap();
        s.append(&payload(6)).unwrap();
        let seg2 = fs::read(&segment_files(d.path())[0]).unwrap();
        let mut both = seg.clone();
        both.extend_from_slice(&seg2);
        fs::write(out.join("replace_marker"), with(0, None, &both)).unwrap();
        let mut torn = seg.clone();
        torn.truncate(seg.len() - 30);
        fs::write(out.join("torn_tail"), with(1, Some(&meta), &torn)).unwrap();
    }
}
