//! rpm database reader: which packages an RPM-based root has installed, and the files each one
//! owns with the type, mode, owner, size, link target, flags and digest rpm recorded.
//!
//! The database is looked for in `usr/lib/sysimage/rpm/` (Fedora ≥ 36, openSUSE) and then
//! `var/lib/rpm/`, with symlinks resolved *inside* the root (Fedora's `var/lib/rpm` is one).
//!
//! - `rpmdb.sqlite` (rpm ≥ 4.16, every current distribution) is read directly: each row of its
//!   `Packages` table is one header blob, decoded by [`parse_header`].
//! - `Packages` (Berkeley DB) and `Packages.db` (ndb) are read by this host's `rpm` program
//!   (`rpm --root ROOT --dbpath DIR -qa --queryformat ...`), and the manifest notes that.
//!
//! What this module must never do: write into the root (SQLite is opened `immutable`, or on a
//! private copy when a write-ahead log holds committed transactions, see [`read`]), follow a
//! symlink out of the root, execute a program from the root (it may have been tampered with),
//! or panic on any database content.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};

use rusqlite::{Connection, OpenFlags};

use super::{Digest, Manager, Manifest, Package, PackageError, PackageFile};
use crate::hash::StatKey;

/// rpm tag numbers (`include/rpm/rpmtag.h`).
mod tag {
    pub const HEADERIMAGE: u32 = 61;
    pub const HEADERIMMUTABLE: u32 = 63;
    /// Tags below this are reserved for regions; rpm refuses them anywhere else.
    pub const HEADERI18NTABLE: u32 = 100;
    pub const NAME: u32 = 1000;
    pub const VERSION: u32 = 1001;
    pub const RELEASE: u32 = 1002;
    pub const EPOCH: u32 = 1003;
    pub const ARCH: u32 = 1022;
    pub const OLDFILENAMES: u32 = 1027;
    pub const FILESIZES: u32 = 1028;
    pub const FILEMODES: u32 = 1030;
    pub const FILEMTIMES: u32 = 1034;
    pub const FILEDIGESTS: u32 = 1035;
    pub const FILELINKTOS: u32 = 1036;
    pub const FILEFLAGS: u32 = 1037;
    pub const FILEUSERNAME: u32 = 1039;
    pub const FILEGROUPNAME: u32 = 1040;
    pub const DIRINDEXES: u32 = 1116;
    pub const BASENAMES: u32 = 1117;
    pub const DIRNAMES: u32 = 1118;
    pub const LONGFILESIZES: u32 = 5008;
    pub const FILEDIGESTALGO: u32 = 5011;

    pub fn name(tag: u32) -> &'static str {
        match tag {
            NAME => "NAME",
            VERSION => "VERSION",
            RELEASE => "RELEASE",
            EPOCH => "EPOCH",
            ARCH => "ARCH",
            OLDFILENAMES => "OLDFILENAMES",
            FILESIZES => "FILESIZES",
            FILEMODES => "FILEMODES",
            FILEMTIMES => "FILEMTIMES",
            FILEDIGESTS => "FILEDIGESTS",
            FILELINKTOS => "FILELINKTOS",
            FILEFLAGS => "FILEFLAGS",
            FILEUSERNAME => "FILEUSERNAME",
            FILEGROUPNAME => "FILEGROUPNAME",
            DIRINDEXES => "DIRINDEXES",
            BASENAMES => "BASENAMES",
            DIRNAMES => "DIRNAMES",
            LONGFILESIZES => "LONGFILESIZES",
            FILEDIGESTALGO => "FILEDIGESTALGO",
            _ => "tag",
        }
    }
}

/// rpm header data types (`rpmTagType_e`).
mod ty {
    pub const CHAR: u32 = 1;
    pub const INT8: u32 = 2;
    pub const INT16: u32 = 3;
    pub const INT32: u32 = 4;
    pub const INT64: u32 = 5;
    pub const STRING: u32 = 6;
    pub const BIN: u32 = 7;
    pub const STRING_ARRAY: u32 = 8;
    pub const I18NSTRING: u32 = 9;

    pub fn name(ty: u32) -> &'static str {
        match ty {
            CHAR => "CHAR",
            INT8 => "INT8",
            INT16 => "INT16",
            INT32 => "INT32",
            INT64 => "INT64",
            STRING => "STRING",
            BIN => "BIN",
            STRING_ARRAY => "STRING_ARRAY",
            I18NSTRING => "I18NSTRING",
            _ => "unknown",
        }
    }
}

/// `RPMFILE_CONFIG`: `%config`.
const RPMFILE_CONFIG: u32 = 1 << 0;
/// `RPMFILE_GHOST`: `%ghost`, owned but not shipped.
const RPMFILE_GHOST: u32 = 1 << 6;
/// `PGPHASHALGO_MD5`, what FILEDIGESTS hold when FILEDIGESTALGO is absent.
const PGPHASHALGO_MD5: u32 = 1;

/// rpm's own limits on a header (`lib/header.c`): at most 0xffff index entries and 256 MiB of
/// data. Checking them first bounds everything a hostile blob can make us allocate.
const HEADER_TAGS_MAX: u32 = 0xffff;
const HEADER_DATA_MAX: u32 = 0x0fff_ffff;
const INTRO_LEN: usize = 8;
/// The largest header blob rpm accepts (`headerMaxbytes`, 256 MiB).
const HEADER_MAX_BYTES: usize = 256 << 20;
/// File paths (shared DIRNAMES + BASENAMES) may take at most this many times the header's
/// size once expanded; real headers stay far below (every file also carries a digest, mode,
/// sizes, owners...), a crafted one could otherwise expand a few MiB into many GiB.
const PATH_EXPANSION: usize = 16;
const ENTRY_LEN: usize = 16;

/// One installed package as its rpm header describes it: the fields driftwatch uses, decoded
/// and checked for consistency, before they become a [`Package`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpmHeader {
    pub name: String,
    pub epoch: Option<u32>,
    pub version: String,
    pub release: String,
    /// `None` when the header has no ARCH tag (the `gpg-pubkey` pseudo-packages).
    pub arch: Option<String>,
    /// PGPHASHALGO of the file digests (MD5 = 1, SHA1 = 2, SHA256 = 8, SHA384 = 9,
    /// SHA512 = 10); MD5 when the header has no FILEDIGESTALGO.
    pub digest_algo: u32,
    pub files: Vec<RpmFile>,
}

/// One file entry of a header. Per-file tags the header lacks are `None`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RpmFile {
    /// `dirnames[dirindexes[i]] + basenames[i]`, raw bytes.
    pub path: Vec<u8>,
    /// The digest as rpm stores it: lowercase hex, empty for anything but regular files.
    pub digest: Vec<u8>,
    /// Full `st_mode` (type and permission bits).
    pub mode: Option<u16>,
    pub flags: u32,
    pub user: Option<String>,
    pub group: Option<String>,
    pub size: Option<u64>,
    pub mtime: Option<u32>,
    /// Symlink target; empty for anything but symlinks.
    pub link_to: Vec<u8>,
}

/// Why a header blob was refused, and where: `byte` is an offset into the blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError {
    pub byte: usize,
    pub what: String,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "header byte {}: {}", self.byte, self.what)
    }
}

impl std::error::Error for HeaderError {}

fn header_err(byte: usize, what: impl Into<String>) -> HeaderError {
    HeaderError {
        byte,
        what: what.into(),
    }
}

/// One validated index entry; `offset..offset + len` lies inside the data store.
#[derive(Debug, Clone, Copy)]
struct Entry {
    ty: u32,
    offset: usize,
    len: usize,
    /// Byte position of the index entry in the blob.
    pos: usize,
}

/// The values of a tag and its index entry, if the header has the tag.
type Found<T> = Option<(Vec<T>, Entry)>;

/// A header whose index has been checked against its data store.
struct Header<'a> {
    data: &'a [u8],
    data_start: usize,
    entries: Vec<Entry>,
    /// tag → the entry that counts (see [`parse_header`] on dribbles).
    by_tag: HashMap<u32, usize>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_be_bytes(w)
}

/// Decodes one rpm header in the form the rpm database stores it: no lead and no magic, a
/// big-endian index count `il` and data length `dl`, `il` 16-byte index entries (tag, type,
/// offset, count), then `dl` bytes of data.
///
/// Every entry is checked the way rpm's `hdrblobVerifyInfo` does (known type, count ≥ 1, data
/// inside the data store, integers aligned, strings NUL-terminated) and the blob must be
/// exactly `8 + 16·il + dl` bytes. A first entry with tag 61–63 is a region: its trailer is
/// checked, and entries after the region ("dribbles", added by rpm at install time) replace
/// region entries with the same tag, as rpm's `hdrblobImport` does. The tags driftwatch uses
/// must have their documented types, and the per-file arrays must agree in length.
///
/// Pure; never panics.
pub fn parse_header(blob: &[u8]) -> Result<RpmHeader, HeaderError> {
    let header = Header::parse(blob)?;
    header.decode()
}

impl<'a> Header<'a> {
    fn parse(blob: &'a [u8]) -> Result<Header<'a>, HeaderError> {
        if blob.len() < INTRO_LEN {
            return Err(header_err(
                0,
                format!(
                    "{} bytes is shorter than a header's 8-byte intro",
                    blob.len()
                ),
            ));
        }
        let il = be32(blob, 0);
        let dl = be32(blob, 4);
        if il == 0 || il > HEADER_TAGS_MAX {
            return Err(header_err(
                0,
                format!("index count {il} is not in 1..={HEADER_TAGS_MAX}"),
            ));
        }
        if dl > HEADER_DATA_MAX {
            return Err(header_err(
                4,
                format!("data length {dl} exceeds rpm's limit {HEADER_DATA_MAX}"),
            ));
        }
        let (il, dl) = (il as usize, dl as usize);
        let data_start = INTRO_LEN + il * ENTRY_LEN;
        let total = data_start + dl;
        if total > blob.len() {
            return Err(header_err(
                blob.len(),
                format!(
                    "truncated: il {il} and dl {dl} need {total} bytes, the blob has {}",
                    blob.len()
                ),
            ));
        }
        if total >= HEADER_MAX_BYTES {
            return Err(header_err(
                0,
                format!("a {total}-byte header exceeds rpm's limit of {HEADER_MAX_BYTES}"),
            ));
        }
        if total < blob.len() {
            return Err(header_err(
                total,
                format!(
                    "{} unexpected bytes after the header's data",
                    blob.len() - total
                ),
            ));
        }
        let data = &blob[data_start..total];

        let raw = |i: usize| {
            let pos = INTRO_LEN + i * ENTRY_LEN;
            (
                pos,
                be32(blob, pos),
                be32(blob, pos + 4),
                be32(blob, pos + 8),
                be32(blob, pos + 12),
            )
        };

        // The region: the first entry, tag 61..=63, pointing at a 16-byte trailer whose
        // negative offset gives the number of index entries the region covers (`ril`).
        let (_, first_tag, ..) = raw(0);
        let mut first = 0;
        let mut ril = il;
        if (tag::HEADERIMAGE..=tag::HEADERIMMUTABLE).contains(&first_tag) {
            ril = Self::check_region(blob, data, data_start, il)?;
            first = 1;
        }

        let mut entries = Vec::with_capacity(il - first);
        let mut by_tag: HashMap<u32, usize> = HashMap::new();
        let mut end = 0;
        for i in first..il {
            let (pos, tag, ty, offset, count) = raw(i);
            if tag < tag::HEADERI18NTABLE {
                return Err(header_err(
                    pos,
                    format!("index entry {i}: tag {tag} is reserved for regions"),
                ));
            }
            // rpm requires the entries' data in index order, without overlap; it also keeps
            // the cost of checking strings linear in the data's size.
            if (offset as usize) < end {
                return Err(header_err(
                    pos + 8,
                    format!("index entry {i}: data at {offset} overlaps the previous entry's data"),
                ));
            }
            let entry =
                Self::check_entry(data, data_start, pos, ty, offset, count).map_err(|e| {
                    HeaderError {
                        what: format!("index entry {i} (tag {tag}): {}", e.what),
                        ..e
                    }
                })?;
            end = entry.offset + entry.len;
            let in_region = i < ril;
            if let Some(&prev) = by_tag.get(&tag) {
                let prev_in_region = prev + first < ril;
                // A dribble replaces a region entry; anything else is ambiguous.
                if prev_in_region == in_region {
                    return Err(header_err(
                        pos,
                        format!("index entry {i}: tag {tag} appears twice"),
                    ));
                }
            }
            by_tag.insert(tag, entries.len());
            entries.push(entry);
        }
        Ok(Header {
            data,
            data_start,
            entries,
            by_tag,
        })
    }

    /// Checks the region entry and its trailer like rpm's `hdrblobVerifyRegion`; returns `ril`.
    fn check_region(
        blob: &[u8],
        data: &[u8],
        data_start: usize,
        il: usize,
    ) -> Result<usize, HeaderError> {
        let (rtag, rty, roff, rcount) = (
            be32(blob, 8),
            be32(blob, 12),
            be32(blob, 16),
            be32(blob, 20),
        );
        if rty != ty::BIN || rcount != ENTRY_LEN as u32 {
            return Err(header_err(
                INTRO_LEN,
                format!("region tag {rtag}: type {rty} count {rcount}, expected BIN with count 16"),
            ));
        }
        let roff = roff as usize;
        let Some(trailer) = data.get(roff..roff.saturating_add(ENTRY_LEN)) else {
            return Err(header_err(
                INTRO_LEN + 8,
                format!(
                    "region trailer at data offset {roff} is outside the {}-byte data store",
                    data.len()
                ),
            ));
        };
        let (ttag, tty, toff, tcount) = (
            be32(trailer, 0),
            be32(trailer, 4),
            be32(trailer, 8),
            be32(trailer, 12),
        );
        let at = data_start + roff;
        if ttag != rtag || tty != ty::BIN || tcount != ENTRY_LEN as u32 {
            return Err(header_err(
                at,
                format!(
                    "region trailer: tag {ttag} type {tty} count {tcount}, expected {rtag} BIN 16"
                ),
            ));
        }
        // The trailer's offset is the negated size of the region's index.
        let rsize = -i64::from(toff as i32);
        let ril = rsize / ENTRY_LEN as i64;
        if rsize <= 0 || rsize % ENTRY_LEN as i64 != 0 || ril > il as i64 {
            return Err(header_err(
                at + 8,
                format!(
                    "region trailer offset {} does not describe 1..={il} index entries",
                    toff as i32
                ),
            ));
        }
        Ok(ril as usize)
    }

    fn check_entry(
        data: &[u8],
        data_start: usize,
        pos: usize,
        ty: u32,
        offset: u32,
        count: u32,
    ) -> Result<Entry, HeaderError> {
        if !(ty::CHAR..=ty::I18NSTRING).contains(&ty) {
            return Err(header_err(pos + 4, format!("unknown type {ty}")));
        }
        if count == 0 {
            return Err(header_err(pos + 12, "count 0"));
        }
        let (offset, count) = (offset as usize, count as usize);
        let at = data_start.saturating_add(offset);
        if offset >= data.len() {
            return Err(header_err(
                pos + 8,
                format!(
                    "data offset {offset} is outside the {}-byte data store",
                    data.len()
                ),
            ));
        }
        let width = match ty {
            ty::INT16 => 2,
            ty::INT32 => 4,
            ty::INT64 => 8,
            _ => 1,
        };
        if !offset.is_multiple_of(width) {
            return Err(header_err(
                at,
                format!(
                    "{} data at offset {offset} is not {width}-byte aligned",
                    ty::name(ty)
                ),
            ));
        }
        let rest = &data[offset..];
        let len = match ty {
            ty::STRING | ty::STRING_ARRAY | ty::I18NSTRING => {
                if ty == ty::STRING && count != 1 {
                    return Err(header_err(pos + 12, format!("STRING with count {count}")));
                }
                // Each string takes at least one byte, so this loop is bounded by the data.
                let mut end = 0;
                for n in 0..count {
                    match rest[end..].iter().position(|&b| b == 0) {
                        Some(nul) => end += nul + 1,
                        None => {
                            return Err(header_err(
                                at + end,
                                format!(
                                    "string {n} of {count} has no NUL before the end of the data"
                                ),
                            ));
                        }
                    }
                }
                end
            }
            _ => match count.checked_mul(width) {
                Some(len) if len <= rest.len() => len,
                _ => {
                    return Err(header_err(
                        pos + 12,
                        format!(
                            "{count} {} values at offset {offset} do not fit in the {}-byte data",
                            ty::name(ty),
                            data.len()
                        ),
                    ));
                }
            },
        };
        Ok(Entry {
            ty,
            offset,
            len,
            pos,
        })
    }

    fn entry(&self, tag: u32, want: u32) -> Result<Option<&Entry>, HeaderError> {
        let Some(e) = self.by_tag.get(&tag).and_then(|&i| self.entries.get(i)) else {
            return Ok(None);
        };
        if e.ty != want {
            return Err(header_err(
                e.pos + 4,
                format!(
                    "{} ({tag}) has type {} ({}), expected {} ({want})",
                    tag::name(tag),
                    ty::name(e.ty),
                    e.ty,
                    ty::name(want)
                ),
            ));
        }
        Ok(Some(e))
    }

    fn bytes(&self, e: &Entry) -> &'a [u8] {
        self.data
            .get(e.offset..e.offset + e.len)
            .unwrap_or_default()
    }

    fn string(&self, tag: u32) -> Result<Option<&'a [u8]>, HeaderError> {
        Ok(self.entry(tag, ty::STRING)?.map(|e| {
            let b = self.bytes(e);
            &b[..b.len().saturating_sub(1)]
        }))
    }

    fn required_string(&self, tag: u32) -> Result<String, HeaderError> {
        match self.string(tag)? {
            Some(s) => Ok(String::from_utf8_lossy(s).into_owned()),
            None => Err(header_err(0, format!("no {} tag", tag::name(tag)))),
        }
    }

    fn strings(&self, tag: u32) -> Result<Found<&'a [u8]>, HeaderError> {
        Ok(self.entry(tag, ty::STRING_ARRAY)?.map(|e| {
            let b = self.bytes(e);
            // Exactly `count` NULs, the last one at the end (checked in `check_entry`).
            let v = b[..b.len().saturating_sub(1)].split(|&c| c == 0).collect();
            (v, *e)
        }))
    }

    fn ints<T>(&self, tag: u32, want: u32, conv: fn(&[u8]) -> T) -> Result<Found<T>, HeaderError> {
        let width = match want {
            ty::INT16 => 2,
            ty::INT32 => 4,
            _ => 8,
        };
        Ok(self
            .entry(tag, want)?
            .map(|e| (self.bytes(e).chunks_exact(width).map(conv).collect(), *e)))
    }

    fn u16s(&self, tag: u32) -> Result<Found<u16>, HeaderError> {
        self.ints(tag, ty::INT16, |c| u16::from_be_bytes([c[0], c[1]]))
    }

    fn u32s(&self, tag: u32) -> Result<Found<u32>, HeaderError> {
        self.ints(tag, ty::INT32, |c| {
            u32::from_be_bytes([c[0], c[1], c[2], c[3]])
        })
    }

    fn u64s(&self, tag: u32) -> Result<Found<u64>, HeaderError> {
        self.ints(tag, ty::INT64, |c| {
            u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
        })
    }

    /// A per-file array must have one value per file.
    fn per_file<T>(
        &self,
        found: Found<T>,
        tag: u32,
        n: usize,
    ) -> Result<Option<Vec<T>>, HeaderError> {
        match found {
            None => Ok(None),
            Some((v, _)) if v.len() == n => Ok(Some(v)),
            Some((v, e)) => Err(header_err(
                e.pos + 12,
                format!("{} has {} values for {n} files", tag::name(tag), v.len()),
            )),
        }
    }

    fn decode(&self) -> Result<RpmHeader, HeaderError> {
        let name = self.required_string(tag::NAME)?;
        let version = self.required_string(tag::VERSION)?;
        let release = self.required_string(tag::RELEASE)?;
        let arch = self
            .string(tag::ARCH)?
            .map(|s| String::from_utf8_lossy(s).into_owned());
        let epoch = self.u32s(tag::EPOCH)?.and_then(|(v, _)| v.first().copied());
        let digest_algo = self
            .u32s(tag::FILEDIGESTALGO)?
            .and_then(|(v, _)| v.first().copied())
            .unwrap_or(PGPHASHALGO_MD5);

        let paths = self.paths()?;
        let n = paths.len();
        let digests = self.per_file(self.strings(tag::FILEDIGESTS)?, tag::FILEDIGESTS, n)?;
        let links = self.per_file(self.strings(tag::FILELINKTOS)?, tag::FILELINKTOS, n)?;
        let users = self.per_file(self.strings(tag::FILEUSERNAME)?, tag::FILEUSERNAME, n)?;
        let groups = self.per_file(self.strings(tag::FILEGROUPNAME)?, tag::FILEGROUPNAME, n)?;
        let modes = self.per_file(self.u16s(tag::FILEMODES)?, tag::FILEMODES, n)?;
        let flags = self.per_file(self.u32s(tag::FILEFLAGS)?, tag::FILEFLAGS, n)?;
        let mtimes = self.per_file(self.u32s(tag::FILEMTIMES)?, tag::FILEMTIMES, n)?;
        let sizes = match self.per_file(self.u64s(tag::LONGFILESIZES)?, tag::LONGFILESIZES, n)? {
            Some(v) => Some(v),
            None => self
                .per_file(self.u32s(tag::FILESIZES)?, tag::FILESIZES, n)?
                .map(|v| v.into_iter().map(u64::from).collect()),
        };

        let text = |v: &Option<Vec<&[u8]>>, i: usize| {
            v.as_ref()
                .and_then(|v| v.get(i))
                .map(|s| String::from_utf8_lossy(s).into_owned())
        };
        let raw = |v: &Option<Vec<&[u8]>>, i: usize| {
            v.as_ref().and_then(|v| v.get(i)).map(|s| s.to_vec())
        };
        let files = paths
            .into_iter()
            .enumerate()
            .map(|(i, path)| RpmFile {
                path,
                digest: raw(&digests, i).unwrap_or_default(),
                mode: modes.as_ref().and_then(|v| v.get(i)).copied(),
                flags: flags.as_ref().and_then(|v| v.get(i)).copied().unwrap_or(0),
                user: text(&users, i),
                group: text(&groups, i),
                size: sizes.as_ref().and_then(|v| v.get(i)).copied(),
                mtime: mtimes.as_ref().and_then(|v| v.get(i)).copied(),
                link_to: raw(&links, i).unwrap_or_default(),
            })
            .collect();
        Ok(RpmHeader {
            name,
            epoch,
            version,
            release,
            arch,
            digest_algo,
            files,
        })
    }

    /// File paths from BASENAMES/DIRNAMES/DIRINDEXES, or from OLDFILENAMES in headers that
    /// predate compressed file lists.
    fn paths(&self) -> Result<Vec<Vec<u8>>, HeaderError> {
        let Some((basenames, bentry)) = self.strings(tag::BASENAMES)? else {
            return Ok(match self.strings(tag::OLDFILENAMES)? {
                Some((v, _)) => v.into_iter().map(<[u8]>::to_vec).collect(),
                None => Vec::new(),
            });
        };
        let n = basenames.len();
        let (Some((dirnames, _)), Some((dirindexes, ientry))) =
            (self.strings(tag::DIRNAMES)?, self.u32s(tag::DIRINDEXES)?)
        else {
            return Err(header_err(
                bentry.pos,
                "BASENAMES without DIRNAMES and DIRINDEXES",
            ));
        };
        if dirindexes.len() != n {
            return Err(header_err(
                ientry.pos + 12,
                format!(
                    "DIRINDEXES has {} values for {n} BASENAMES",
                    dirindexes.len()
                ),
            ));
        }
        // Every file may name the same long directory: cap what the paths may expand to.
        let total: usize = basenames
            .iter()
            .zip(&dirindexes)
            .map(|(b, &d)| b.len() + dirnames.get(d as usize).map_or(0, |d| d.len()))
            .sum();
        let limit = PATH_EXPANSION * (self.data_start + self.data.len());
        if total > limit {
            return Err(header_err(
                ientry.pos,
                format!(
                    "{n} paths expand to {total} bytes, over {PATH_EXPANSION} times the header"
                ),
            ));
        }
        basenames
            .iter()
            .zip(&dirindexes)
            .enumerate()
            .map(|(i, (base, &d))| match dirnames.get(d as usize) {
                Some(dir) => Ok([*dir, *base].concat()),
                None => Err(header_err(
                    self.data_start + ientry.offset + 4 * i,
                    format!(
                        "DIRINDEXES[{i}] = {d}, but there are {} DIRNAMES",
                        dirnames.len()
                    ),
                )),
            })
            .collect()
    }
}

impl RpmHeader {
    /// `[epoch:]version-release`, as rpm's `%{EVR}` prints it (an explicit epoch 0 included).
    pub fn evr(&self) -> String {
        match self.epoch {
            Some(e) => format!("{e}:{}-{}", self.version, self.release),
            None => format!("{}-{}", self.version, self.release),
        }
    }

    /// The package as the manifest holds it, plus a note when its file digests use an
    /// algorithm driftwatch cannot check (they are left out, so its files' content is not
    /// verified). Paths must follow the baseline path rules (a trailing `/` is dropped); a
    /// relative path or one with `..` is an error, never a path to look at. `gpg-pubkey`
    /// pseudo-packages are kept, with arch `(none)` as `rpm -qa` shows them: an imported
    /// signing key changes what the system trusts.
    pub fn to_package(&self) -> Result<(Package, Option<String>), String> {
        let label = crate::escape::bytes(
            format!(
                "{}-{}.{}",
                self.name,
                self.evr(),
                self.arch.as_deref().unwrap_or("(none)")
            )
            .as_bytes(),
        );
        let supported = digest_len(self.digest_algo).is_some();
        let mut note = None;
        let mut files = Vec::with_capacity(self.files.len());
        for (i, f) in self.files.iter().enumerate() {
            let digest = if f.digest.is_empty() {
                None
            } else if supported {
                Some(decode_digest(self.digest_algo, &f.digest).map_err(|what| {
                    format!(
                        "{label}: file {i} ({}): {what}",
                        crate::escape::bytes(&f.path)
                    )
                })?)
            } else {
                note = Some(format!(
                    "{label}: file digest algorithm {} is not supported: \
                     its files' content is not verified",
                    self.digest_algo
                ));
                None
            };
            let mut path = f.path.as_slice();
            while path.len() > 1 && path.ends_with(b"/") {
                path = &path[..path.len() - 1];
            }
            driftwatch_proto::path::validate(path).map_err(|e| {
                format!("{label}: file {i} ({}): {e}", crate::escape::bytes(&f.path))
            })?;
            files.push(PackageFile {
                path: path.to_vec(),
                digest,
                mode: f.mode.map(|m| u32::from(m) & 0o7777),
                file_type: f.mode.map(|m| u32::from(m) & 0o170000),
                user: f.user.clone(),
                group: f.group.clone(),
                size: f.size,
                link_target: (!f.link_to.is_empty()).then(|| f.link_to.clone()),
                config: f.flags & RPMFILE_CONFIG != 0,
                ghost: f.flags & RPMFILE_GHOST != 0,
            });
        }
        let package = Package {
            name: self.name.clone(),
            version: self.evr(),
            arch: self.arch.clone().unwrap_or_else(|| "(none)".to_string()),
            state: "installed".to_string(),
            files,
        };
        Ok((package, note))
    }
}

fn digest_len(algo: u32) -> Option<usize> {
    match algo {
        1 => Some(16),
        2 => Some(20),
        8 => Some(32),
        9 => Some(48),
        10 => Some(64),
        _ => None,
    }
}

/// Hex digest text of a supported PGPHASHALGO → [`Digest`].
fn decode_digest(algo: u32, hex: &[u8]) -> Result<Digest, String> {
    let bad = || {
        format!(
            "digest {:?} is not a valid {}-hex-digit digest",
            String::from_utf8_lossy(hex),
            2 * digest_len(algo).unwrap_or(0)
        )
    };
    let want = digest_len(algo).ok_or_else(bad)?;
    if hex.len() != 2 * want {
        return Err(bad());
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let bytes = hex
        .chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    fn arr<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
        b.try_into().ok()
    }
    match algo {
        1 => arr(&bytes).map(Digest::Md5),
        2 => arr(&bytes).map(Digest::Sha1),
        8 => arr(&bytes).map(Digest::Sha256),
        9 => arr(&bytes).map(Digest::Sha384),
        _ => arr(&bytes).map(Digest::Sha512),
    }
    .ok_or_else(bad)
}

// ---------------------------------------------------------------------------------------------
// Finding the database

/// Database directories relative to the root, newest layout first.
const DB_DIRS: [&str; 2] = ["usr/lib/sysimage/rpm", "var/lib/rpm"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Sqlite,
    BerkeleyDb,
    Ndb,
}

impl Format {
    const ALL: [Format; 3] = [Format::Sqlite, Format::BerkeleyDb, Format::Ndb];

    fn file_name(self) -> &'static str {
        match self {
            Format::Sqlite => "rpmdb.sqlite",
            Format::BerkeleyDb => "Packages",
            Format::Ndb => "Packages.db",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Format::Sqlite => "SQLite",
            Format::BerkeleyDb => "Berkeley DB",
            Format::Ndb => "ndb",
        }
    }
}

/// The rpm database of a root.
#[derive(Debug, Clone)]
pub(crate) struct Database {
    format: Format,
    /// The database directory relative to the root, free of symlinks (resolved in the root).
    dir: PathBuf,
    /// The database file on this host.
    file: PathBuf,
    /// Other database files found and ignored, relative to the root.
    others: Vec<PathBuf>,
}

/// Resolves `rel` inside `root` the way a chroot would: absolute symlink targets restart at
/// the root and `..` never climbs above it. Returns the resolved path relative to the root
/// (no symlink in it when this returns), or `None` if some component does not exist.
fn resolve_in_root(root: &Path, rel: &Path) -> io::Result<Option<PathBuf>> {
    let mut resolved: Vec<OsString> = Vec::new();
    let mut pending: Vec<OsString> = Vec::new(); // reversed: next component last
    let push_components = |pending: &mut Vec<OsString>, resolved: &mut Vec<OsString>, p: &Path| {
        let mut comps: Vec<OsString> = Vec::new();
        for c in p.components() {
            match c {
                Component::RootDir => {
                    resolved.clear();
                    comps.clear();
                }
                Component::Normal(n) => comps.push(n.to_os_string()),
                Component::ParentDir => comps.push(OsString::from("..")),
                Component::CurDir | Component::Prefix(_) => {}
            }
        }
        pending.extend(comps.into_iter().rev());
    };
    push_components(&mut pending, &mut resolved, rel);
    let mut links = 0;
    while let Some(c) = pending.pop() {
        if c == ".." {
            resolved.pop();
            continue;
        }
        let mut here: PathBuf = root.to_path_buf();
        here.extend(&resolved);
        here.push(&c);
        let meta = match fs::symlink_metadata(&here) {
            Ok(m) => m,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return Err(io::Error::other(format!(
                    "{}: too many levels of symbolic links",
                    here.display()
                )));
            }
            let target = fs::read_link(&here)?;
            push_components(&mut pending, &mut resolved, &target);
        } else {
            resolved.push(c);
        }
    }
    Ok(Some(resolved.iter().collect()))
}

/// Finds the rpm database of `root`: the first database file in the first directory of
/// [`DB_DIRS`] that has one, SQLite before Berkeley DB before ndb.
fn locate(root: &Path) -> io::Result<Option<Database>> {
    let mut found: Vec<(Format, PathBuf)> = Vec::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for dir in DB_DIRS {
        let Some(dir) = resolve_in_root(root, Path::new(dir))? else {
            continue;
        };
        if dirs.contains(&dir) || !fs::symlink_metadata(root.join(&dir))?.is_dir() {
            continue;
        }
        for format in Format::ALL {
            let rel = dir.join(format.file_name());
            match fs::symlink_metadata(root.join(&rel)) {
                // A symlinked database file counts as found; reading it refuses to follow it.
                Ok(m) if m.is_file() || m.file_type().is_symlink() => found.push((format, rel)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        dirs.push(dir);
    }
    let mut found = found.into_iter();
    let Some((format, rel)) = found.next() else {
        return Ok(None);
    };
    Ok(Some(Database {
        format,
        dir: rel.parent().map(Path::to_path_buf).unwrap_or_default(),
        file: root.join(&rel),
        others: found.map(|(_, p)| p).collect(),
    }))
}

/// Whether `root` has an rpm database: `rpmdb.sqlite`, `Packages` or `Packages.db` in
/// `usr/lib/sysimage/rpm/` or `var/lib/rpm/` (symlinks resolved inside the root). A location
/// that cannot be examined counts as present, so that [`read`] reports why.
pub fn database_present(root: &Path) -> bool {
    !matches!(locate(root), Ok(None))
}

/// Reads the rpm database of `root`.
///
/// `rpmdb.sqlite` is read directly with SQLite, which must not write into the root. rpm keeps
/// it in WAL mode: after rpm exits normally the `-wal` file is empty (checkpointed) and
/// everything is in the main file, so it is opened `mode=ro&immutable=1` (no locks, no `-shm`
/// created). `immutable` alone would be wrong when the `-wal` (or a rollback `-journal`) holds
/// committed transactions — rpm running or interrupted — because SQLite then ignores them,
/// while plain `mode=ro` would create a `-shm` file in the root. In that case the database and
/// its log are copied into a private temporary directory and the copy is read. The files'
/// identity, size, mtime and ctime must be the same before and after reading (else it is
/// retried, then refused as "changed while being read").
///
/// Other formats are read by this host's `rpm` program (`rpm --root ROOT --dbpath DIR -qa`).
pub fn read(root: &Path) -> Result<Manifest, PackageError> {
    let db = match locate(root) {
        Ok(Some(db)) => db,
        Ok(None) => {
            return Err(PackageError::Other(format!(
                "no rpm database (rpmdb.sqlite, Packages or Packages.db) under {}/{{{}}}",
                root.display(),
                DB_DIRS.join(",")
            )));
        }
        Err(source) => {
            return Err(PackageError::Io {
                path: root.to_path_buf(),
                source,
            });
        }
    };
    let mut manifest = match db.format {
        Format::Sqlite => read_sqlite(&db)?,
        Format::BerkeleyDb | Format::Ndb => read_with_program(root, &db, Path::new("rpm"))?,
    };
    let mut notes: Vec<String> = db
        .others
        .iter()
        .map(|other| {
            format!(
                "{} also exists and was ignored: {} is the database read",
                other.display(),
                db.dir.join(db.format.file_name()).display()
            )
        })
        .collect();
    notes.append(&mut manifest.notes);
    manifest.notes = notes;
    Ok(manifest)
}

fn manifest(mut packages: Vec<Package>, notes: Vec<String>) -> Manifest {
    packages.sort_by(|a, b| (&a.name, &a.arch, &a.version).cmp(&(&b.name, &b.arch, &b.version)));
    Manifest {
        manager: Manager::Rpm,
        packages,
        diversions: Vec::new(),
        stat_overrides: Vec::new(),
        notes,
    }
}

// ---------------------------------------------------------------------------------------------
// SQLite

/// The state of the database file and its logs; reading is trusted only if it is unchanged.
#[derive(Debug, PartialEq, Eq)]
struct DbState {
    db: StatKey,
    /// `-wal` and `-journal`, when present.
    logs: [Option<StatKey>; 2],
}

const LOG_SUFFIXES: [&str; 2] = ["-wal", "-journal"];

fn sibling(file: &Path, suffix: &str) -> PathBuf {
    let mut s = file.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

impl DbState {
    fn of(file: &Path) -> io::Result<DbState> {
        let db = fs::symlink_metadata(file)?;
        if !db.is_file() {
            return Err(io::Error::other(
                "not a regular file (symlinks are not followed)",
            ));
        }
        let log = |suffix| match fs::symlink_metadata(sibling(file, suffix)) {
            Ok(m) => Ok(Some(StatKey::from_metadata(&m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        };
        Ok(DbState {
            db: StatKey::from_metadata(&db),
            logs: [log(LOG_SUFFIXES[0])?, log(LOG_SUFFIXES[1])?],
        })
    }

    /// Whether a log holds content SQLite would have to apply.
    fn has_log_content(&self) -> bool {
        self.logs.iter().flatten().any(|k| k.size > 0)
    }
}

fn read_sqlite(db: &Database) -> Result<Manifest, PackageError> {
    let io_err = |source| PackageError::Io {
        path: db.file.clone(),
        source,
    };
    for _ in 0..3 {
        let before = DbState::of(&db.file).map_err(io_err)?;
        let result = if before.has_log_content() {
            read_sqlite_copy(db)
        } else {
            read_sqlite_file(&db.file, &sqlite_uri(&db.file, true), db, Vec::new())
        };
        if DbState::of(&db.file).map_err(io_err)? == before {
            return result;
        }
    }
    Err(PackageError::Other(format!(
        "{}: the rpm database changed while being read, three times (is rpm running?)",
        db.file.display()
    )))
}

/// `file:` URI for SQLite with every byte outside the unreserved set percent-encoded.
fn sqlite_uri(file: &Path, immutable: bool) -> String {
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let mut uri = String::from("file:");
    for &b in abs.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            uri.push(char::from(b));
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str(if immutable {
        "?mode=ro&immutable=1"
    } else {
        "?mode=ro"
    });
    uri
}

/// Copies the database and its non-empty logs into a private directory and reads the copy.
fn read_sqlite_copy(db: &Database) -> Result<Manifest, PackageError> {
    let tmp = PrivateDir::create().map_err(|source| PackageError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let copy = tmp.0.join("rpmdb.sqlite");
    copy_no_follow(&db.file, &copy)?;
    for suffix in LOG_SUFFIXES {
        let log = sibling(&db.file, suffix);
        if fs::symlink_metadata(&log).is_ok_and(|m| m.len() > 0) {
            copy_no_follow(&log, &sibling(&copy, suffix))?;
        }
    }
    let note = format!(
        "{} has a non-empty write-ahead log or journal (rpm running or interrupted): \
         read from a private copy",
        db.dir.join(Format::Sqlite.file_name()).display()
    );
    read_sqlite_file(&copy, &sqlite_uri(&copy, false), db, vec![note])
}

fn copy_no_follow(from: &Path, to: &Path) -> Result<(), PackageError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PackageError::Io { path, source }
    };
    let mut src = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(from)
        .map_err(err(from))?;
    if !src.metadata().map_err(err(from))?.is_file() {
        return Err(PackageError::Other(format!(
            "{}: not a regular file",
            from.display()
        )));
    }
    let mut dst = File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(err(to))?;
    io::copy(&mut src, &mut dst).map_err(err(to))?;
    Ok(())
}

/// A directory only this process uses, removed on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> io::Result<PrivateDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        for attempt in 0..100 {
            let dir = std::env::temp_dir().join(format!(
                "driftwatch-rpmdb-{}-{nanos}-{attempt}",
                std::process::id()
            ));
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(PrivateDir(dir)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(
            "cannot create a private temporary directory",
        ))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Reads every header of the `Packages` table of the SQLite database at `uri`; errors name
/// the root's database file `db.file`.
fn read_sqlite_file(
    file: &Path,
    uri: &str,
    db: &Database,
    mut notes: Vec<String>,
) -> Result<Manifest, PackageError> {
    let parse_err = |position: String, what: String| PackageError::Parse {
        path: db.file.clone(),
        position,
        what,
    };
    let sql_err =
        |e: rusqlite::Error| parse_err("SQLite table Packages".to_string(), e.to_string());
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(uri, flags)
        .map_err(|e| parse_err("opening".to_string(), format!("{e} ({})", file.display())))?;
    // A blob larger than rpm accepts is refused without loading it.
    let mut stmt = conn
        .prepare(
            "SELECT hnum, length(blob), CASE WHEN length(blob) < ?1 THEN blob END \
             FROM Packages ORDER BY hnum",
        )
        .map_err(sql_err)?;
    let mut rows = stmt.query([HEADER_MAX_BYTES as i64]).map_err(sql_err)?;
    let mut packages = Vec::new();
    while let Some(row) = rows.next().map_err(sql_err)? {
        let hnum: i64 = row.get(0).map_err(sql_err)?;
        let position = format!("package hnum {hnum}");
        let len: i64 = row.get(1).map_err(sql_err)?;
        if len >= HEADER_MAX_BYTES as i64 {
            return Err(parse_err(
                position,
                format!("a {len}-byte header exceeds rpm's limit of {HEADER_MAX_BYTES}"),
            ));
        }
        let blob = row
            .get_ref(2)
            .map_err(sql_err)?
            .as_blob()
            .map_err(|e| parse_err(position.clone(), format!("blob column: {e}")))?;
        let header = parse_header(blob)
            .map_err(|e| parse_err(format!("{position}, header byte {}", e.byte), e.what))?;
        let (package, note) = header
            .to_package()
            .map_err(|what| parse_err(position, what))?;
        packages.push(package);
        notes.extend(note);
    }
    Ok(manifest(packages, notes))
}

// ---------------------------------------------------------------------------------------------
// The rpm program, for Berkeley DB and ndb

/// One line per package, then one per file. Strings are `:shescape`d (single-quoted, a `'`
/// inside written `'\''`), so a tab or newline in a file name stays inside quotes and only
/// unquoted tabs and newlines frame fields and records. rpm prints `(none)` unquoted for an
/// absent tag. Numbers are decimal.
const QUERYFORMAT: &str = "@\t%{DBINSTANCE}\t%{NAME:shescape}\t%{EPOCH}\t%{VERSION:shescape}\t\
%{RELEASE:shescape}\t%{ARCH:shescape}\t%{FILEDIGESTALGO}\n\
[F\t%{FILENAMES:shescape}\t%{FILEDIGESTS:shescape}\t%{FILEMODES}\t%{FILEFLAGS}\t\
%{FILEUSERNAME:shescape}\t%{FILEGROUPNAME:shescape}\t%{LONGFILESIZES}\t%{FILELINKTOS:shescape}\t\
%{FILEMTIMES}\n]";

/// Reads the database with `program` (`rpm`): `PROGRAM --root ROOT --dbpath /DIR -qa
/// --queryformat ...`. The program is this host's, never one inside the root (which may be
/// tampered with); for a check of `/` that is the root's own. `DIR` is the database directory
/// with symlinks already resolved inside the root, so rpm cannot be led outside it. rpm ≥ 4.16
/// detects the backend from the files present (Debian's rpm reads Berkeley DB with its
/// read-only `bdb_ro` backend; it has no ndb). Any `error:` line from rpm fails the read, since
/// rpm skips damaged headers with only a message.
pub(crate) fn read_with_program(
    root: &Path,
    db: &Database,
    program: &Path,
) -> Result<Manifest, PackageError> {
    let root_abs = std::path::absolute(root).map_err(|source| PackageError::Io {
        path: root.to_path_buf(),
        source,
    })?;
    // The main file only: rpm itself touches an SQLite database's -wal and -shm even to query.
    let state = || {
        DbState::of(&db.file)
            .map(|s| s.db)
            .map_err(|source| PackageError::Io {
                path: db.file.clone(),
                source,
            })
    };
    let before = state()?;
    let output = Command::new(program)
        .arg("--root")
        .arg(&root_abs)
        .arg("--dbpath")
        .arg(Path::new("/").join(&db.dir))
        .args(["-qa", "--queryformat", QUERYFORMAT])
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                PackageError::Other(format!(
                    "{}: the rpm database is in {} format, which driftwatch reads with the `{}` \
                     program, and it is not installed",
                    db.file.display(),
                    db.format.describe(),
                    program.display()
                ))
            } else {
                PackageError::Other(format!("cannot run {}: {e}", program.display()))
            }
        })?;
    if state()? != before {
        return Err(PackageError::Other(format!(
            "{}: the rpm database changed while being read (is rpm running?)",
            db.file.display()
        )));
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    if !output.status.success() || !errors.is_empty() {
        let shown = if errors.is_empty() {
            stderr.lines().rev().take(5).collect::<Vec<_>>()
        } else {
            errors
        };
        return Err(PackageError::Other(format!(
            "{} -qa on {} ({}): {}: {}",
            program.display(),
            db.file.display(),
            db.format.describe(),
            output.status,
            shown.join("; ")
        )));
    }
    let headers =
        parse_query_output(&output.stdout).map_err(|(byte, what)| PackageError::Parse {
            path: db.file.clone(),
            position: format!("byte {byte} of the output of {} -qa", program.display()),
            what,
        })?;
    let mut notes = vec![format!(
        "rpm database in {} format ({}): read with this host's rpm program ({}), \
         not parsed by driftwatch",
        db.format.describe(),
        db.dir.join(db.format.file_name()).display(),
        program.display()
    )];
    let mut packages = Vec::with_capacity(headers.len());
    for (instance, header) in headers {
        let (package, note) = header.to_package().map_err(|what| PackageError::Parse {
            path: db.file.clone(),
            position: format!("package hnum {instance}"),
            what,
        })?;
        packages.push(package);
        notes.extend(note);
    }
    Ok(manifest(packages, notes))
}

/// One field of the query output; `quoted` tells a string (even empty) from rpm's `(none)`.
#[derive(Debug, Default, PartialEq, Eq)]
struct Field {
    bytes: Vec<u8>,
    quoted: bool,
}

/// A line of the query output: its byte offset and its fields.
type Record = (usize, Vec<Field>);
/// A byte offset into the query output and what is wrong there.
type OutputError = (usize, String);

/// Splits the output into records of fields, undoing `:shescape`. Errors carry a byte offset.
fn split_records(out: &[u8]) -> Result<Vec<Record>, OutputError> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = Field::default();
    let mut start = 0;
    let mut i = 0;
    while i < out.len() {
        match out[i] {
            b'\'' => {
                let Some(len) = out[i + 1..].iter().position(|&b| b == b'\'') else {
                    return Err((i, "quoted string without its closing quote".to_string()));
                };
                field.bytes.extend_from_slice(&out[i + 1..i + 1 + len]);
                field.quoted = true;
                i += len + 2;
            }
            b'\\' => {
                let Some(&c) = out.get(i + 1) else {
                    return Err((i, "backslash at the end of the output".to_string()));
                };
                field.bytes.push(c);
                field.quoted = true;
                i += 2;
            }
            b'\t' => {
                fields.push(std::mem::take(&mut field));
                i += 1;
            }
            b'\n' => {
                fields.push(std::mem::take(&mut field));
                records.push((start, std::mem::take(&mut fields)));
                i += 1;
                start = i;
            }
            b => {
                field.bytes.push(b);
                i += 1;
            }
        }
    }
    if !fields.is_empty() || field != Field::default() {
        return Err((start, "the output ends inside a record".to_string()));
    }
    Ok(records)
}

/// Parses [`QUERYFORMAT`] output into (DBINSTANCE, header) pairs.
fn parse_query_output(out: &[u8]) -> Result<Vec<(String, RpmHeader)>, OutputError> {
    fn text(f: &Field) -> Option<String> {
        (f.quoted || f.bytes != b"(none)").then(|| String::from_utf8_lossy(&f.bytes).into_owned())
    }
    fn number<T: std::str::FromStr>(f: &Field, what: &str) -> Result<Option<T>, String> {
        if !f.quoted && f.bytes == b"(none)" {
            return Ok(None);
        }
        std::str::from_utf8(&f.bytes)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "{what} {:?} is not a number",
                    String::from_utf8_lossy(&f.bytes)
                )
            })
    }
    let mut headers: Vec<(String, RpmHeader)> = Vec::new();
    for (at, fields) in split_records(out)? {
        let err = |what: String| (at, what);
        match fields.first().map(|f| f.bytes.as_slice()) {
            Some(b"@") if fields.len() == 8 => {
                let required = |f: &Field, what: &str| {
                    text(f).ok_or_else(|| err(format!("package without {what}")))
                };
                let header = RpmHeader {
                    name: required(&fields[2], "NAME")?,
                    epoch: number(&fields[3], "EPOCH").map_err(err)?,
                    version: required(&fields[4], "VERSION")?,
                    release: required(&fields[5], "RELEASE")?,
                    arch: text(&fields[6]),
                    digest_algo: number(&fields[7], "FILEDIGESTALGO")
                        .map_err(err)?
                        .unwrap_or(PGPHASHALGO_MD5),
                    files: Vec::new(),
                };
                headers.push((
                    String::from_utf8_lossy(&fields[1].bytes).into_owned(),
                    header,
                ));
            }
            Some(b"F") if fields.len() == 10 => {
                let Some((_, header)) = headers.last_mut() else {
                    return Err(err("a file line before any package line".to_string()));
                };
                // FILEMODES is an int16: accept rpm printing it signed or unsigned.
                let mode = number::<i32>(&fields[3], "FILEMODES").map_err(err)?;
                let mode = mode
                    .map(|m| u16::try_from(m).or_else(|_| i16::try_from(m).map(|m| m as u16)))
                    .transpose()
                    .map_err(|_| err(format!("FILEMODES {mode:?} is out of range")))?;
                header.files.push(RpmFile {
                    path: fields[1].bytes.clone(),
                    digest: if fields[2].quoted {
                        fields[2].bytes.clone()
                    } else {
                        Vec::new()
                    },
                    mode,
                    flags: number(&fields[4], "FILEFLAGS").map_err(err)?.unwrap_or(0),
                    user: text(&fields[5]),
                    group: text(&fields[6]),
                    size: number(&fields[7], "LONGFILESIZES").map_err(err)?,
                    link_to: if fields[8].quoted {
                        fields[8].bytes.clone()
                    } else {
                        Vec::new()
                    },
                    mtime: number(&fields[9], "FILEMTIMES").map_err(err)?,
                });
            }
            _ => return Err(err(format!("unexpected line with {} fields", fields.len()))),
        }
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tag value for [`build`]: the variant is the rpm type, `Raw` any (type, count, bytes).
    #[derive(Debug, Clone)]
    enum V {
        Str(&'static str),
        Strs(Vec<Vec<u8>>),
        I16(Vec<u16>),
        I32(Vec<u32>),
        I64(Vec<u64>),
        Raw(u32, u32, Vec<u8>),
    }

    fn strs<const N: usize>(v: [&str; N]) -> V {
        V::Strs(v.iter().map(|s| s.as_bytes().to_vec()).collect())
    }

    impl V {
        fn ty_count_bytes(&self) -> (u32, u32, Vec<u8>) {
            match self {
                V::Str(s) => (ty::STRING, 1, [s.as_bytes(), b"\0"].concat()),
                V::Strs(v) => {
                    let bytes = v
                        .iter()
                        .flat_map(|s| s.iter().copied().chain([0]))
                        .collect();
                    (ty::STRING_ARRAY, v.len() as u32, bytes)
                }
                V::I16(v) => (
                    ty::INT16,
                    v.len() as u32,
                    v.iter().flat_map(|x| x.to_be_bytes()).collect(),
                ),
                V::I32(v) => (
                    ty::INT32,
                    v.len() as u32,
                    v.iter().flat_map(|x| x.to_be_bytes()).collect(),
                ),
                V::I64(v) => (
                    ty::INT64,
                    v.len() as u32,
                    v.iter().flat_map(|x| x.to_be_bytes()).collect(),
                ),
                V::Raw(t, c, b) => (*t, *c, b.clone()),
            }
        }
    }

    /// Builds a header blob as the rpm database stores it: `entries` inside a HEADERIMMUTABLE
    /// region (when `region`), then `dribbles` after the region trailer, each value aligned
    /// for its type.
    fn build_with(region: bool, entries: &[(u32, V)], dribbles: &[(u32, V)]) -> Vec<u8> {
        let mut index: Vec<[u32; 4]> = Vec::new();
        let mut data: Vec<u8> = Vec::new();
        let add = |index: &mut Vec<[u32; 4]>, data: &mut Vec<u8>, tag: u32, v: &V| {
            let (t, count, bytes) = v.ty_count_bytes();
            let align = match t {
                ty::INT16 => 2,
                ty::INT32 => 4,
                ty::INT64 => 8,
                _ => 1,
            };
            while !data.len().is_multiple_of(align) {
                data.push(0);
            }
            index.push([tag, t, data.len() as u32, count]);
            data.extend_from_slice(&bytes);
        };
        if region {
            index.push([0; 4]);
        }
        for (tag, v) in entries {
            add(&mut index, &mut data, *tag, v);
        }
        if region {
            let ril = index.len() as i32;
            index[0] = [tag::HEADERIMMUTABLE, ty::BIN, data.len() as u32, 16];
            for w in [tag::HEADERIMMUTABLE, ty::BIN, (-ril * 16) as u32, 16] {
                data.extend_from_slice(&w.to_be_bytes());
            }
        }
        for (tag, v) in dribbles {
            add(&mut index, &mut data, *tag, v);
        }
        let mut blob = Vec::new();
        blob.extend_from_slice(&(index.len() as u32).to_be_bytes());
        blob.extend_from_slice(&(data.len() as u32).to_be_bytes());
        for e in &index {
            for w in e {
                blob.extend_from_slice(&w.to_be_bytes());
            }
        }
        blob.extend_from_slice(&data);
        blob
    }

    fn build(entries: &[(u32, V)]) -> Vec<u8> {
        build_with(true, entries, &[])
    }

    /// Byte position of field `field` (0 tag, 1 type, 2 offset, 3 count) of index entry `i`.
    fn field(i: usize, field: usize) -> usize {
        8 + 16 * i + 4 * field
    }

    fn set32(blob: &mut [u8], at: usize, v: u32) {
        blob[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }

    const SHA256_HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn sample() -> Vec<(u32, V)> {
        vec![
            (tag::NAME, V::Str("hello")),
            (tag::VERSION, V::Str("2.12")),
            (tag::RELEASE, V::Str("1.el9")),
            (tag::EPOCH, V::I32(vec![1])),
            (tag::ARCH, V::Str("x86_64")),
            (tag::FILESIZES, V::I32(vec![4096, 10, 5])),
            (tag::FILEMODES, V::I16(vec![0o40755, 0o104755, 0o120777])),
            (tag::FILEMTIMES, V::I32(vec![1, 2, 3])),
            (tag::FILEDIGESTS, strs(["", SHA256_HEX, ""])),
            (tag::FILELINKTOS, strs(["", "", "hello"])),
            (
                tag::FILEFLAGS,
                V::I32(vec![0, RPMFILE_CONFIG, RPMFILE_GHOST]),
            ),
            (tag::FILEUSERNAME, strs(["root", "root", "bin"])),
            (tag::FILEGROUPNAME, strs(["root", "wheel", "bin"])),
            (tag::DIRINDEXES, V::I32(vec![0, 1, 1])),
            (tag::BASENAMES, strs(["hello", "hello", "hi"])),
            (tag::DIRNAMES, strs(["/usr/share/", "/usr/bin/"])),
            (tag::FILEDIGESTALGO, V::I32(vec![8])),
        ]
    }

    fn without(entries: &[(u32, V)], tags: &[u32]) -> Vec<(u32, V)> {
        entries
            .iter()
            .filter(|(t, _)| !tags.contains(t))
            .cloned()
            .collect()
    }

    fn replaced(entries: &[(u32, V)], tag: u32, v: V) -> Vec<(u32, V)> {
        entries
            .iter()
            .map(|(t, old)| (*t, if *t == tag { v.clone() } else { old.clone() }))
            .collect()
    }

    fn package(blob: &[u8]) -> (Package, Option<String>) {
        parse_header(blob).unwrap().to_package().unwrap()
    }

    fn refused(blob: &[u8], byte: usize, what: &str) {
        let e = parse_header(blob).unwrap_err();
        assert!(e.what.contains(what), "{e} does not say {what:?}");
        assert_eq!(e.byte, byte, "{e}");
    }

    #[test]
    fn parses_a_package_and_its_files() {
        let h = parse_header(&build(&sample())).unwrap();
        assert_eq!(
            (h.name.as_str(), h.epoch, h.arch.as_deref()),
            ("hello", Some(1), Some("x86_64"))
        );
        assert_eq!(h.files[0].mtime, Some(1));
        let (p, note) = h.to_package().unwrap();
        assert_eq!(note, None);
        assert_eq!(
            (p.name.as_str(), p.version.as_str(), p.arch.as_str()),
            ("hello", "1:2.12-1.el9", "x86_64")
        );
        assert_eq!(p.state, "installed");
        let paths: Vec<&[u8]> = p.files.iter().map(|f| f.path.as_slice()).collect();
        assert_eq!(
            paths,
            [&b"/usr/share/hello"[..], b"/usr/bin/hello", b"/usr/bin/hi"]
        );
        let [dir, bin, link] = &p.files[..] else {
            panic!()
        };
        assert_eq!(
            (dir.file_type, dir.mode, dir.digest.as_ref(), dir.size),
            (Some(0o40000), Some(0o755), None, Some(4096))
        );
        assert_eq!(
            (bin.file_type, bin.mode, bin.config, bin.ghost),
            (Some(0o100000), Some(0o4755), true, false)
        );
        assert_eq!(
            bin.digest.as_ref().map(Digest::display),
            Some(format!("sha256:{SHA256_HEX}"))
        );
        assert_eq!(
            (bin.user.as_deref(), bin.group.as_deref(), bin.size),
            (Some("root"), Some("wheel"), Some(10))
        );
        assert_eq!(bin.link_target, None);
        assert_eq!(
            (link.file_type, link.link_target.as_deref(), link.ghost),
            (Some(0o120000), Some(&b"hello"[..]), true)
        );
    }

    #[test]
    fn no_epoch_and_no_digest_algorithm_mean_plain_version_and_md5() {
        let entries = replaced(
            &without(&sample(), &[tag::EPOCH, tag::FILEDIGESTALGO]),
            tag::FILEDIGESTS,
            strs(["", "d41d8cd98f00b204e9800998ecf8427e", ""]),
        );
        let (p, _) = package(&build(&entries));
        assert_eq!(p.version, "2.12-1.el9");
        assert_eq!(
            p.files[1].digest,
            Some(Digest::Md5([
                0xd4, 0x1d, 0x8c, 0xd9, 0x8f, 0x00, 0xb2, 0x04, 0xe9, 0x80, 0x09, 0x98, 0xec, 0xf8,
                0x42, 0x7e
            ]))
        );
        let (p, _) = package(&build(&replaced(&sample(), tag::EPOCH, V::I32(vec![0]))));
        assert_eq!(
            p.version, "0:2.12-1.el9",
            "an explicit epoch 0 is shown, as rpm's %{{EVR}} does"
        );
    }

    #[test]
    fn gpg_pubkey_pseudo_packages_are_kept_with_arch_none() {
        let blob = build(&[
            (tag::NAME, V::Str("gpg-pubkey")),
            (tag::VERSION, V::Str("fd431d51")),
            (tag::RELEASE, V::Str("4ae0493b")),
        ]);
        let (p, note) = package(&blob);
        assert_eq!(
            (p.key().as_str(), p.version.as_str(), p.files.len(), note),
            ("gpg-pubkey:(none)", "fd431d51-4ae0493b", 0, None)
        );
    }

    #[test]
    fn dribbles_replace_region_entries_and_long_sizes_win() {
        let blob = build_with(
            true,
            &replaced(&sample(), tag::NAME, V::Str("old")),
            &[
                (tag::NAME, V::Str("new")),
                (tag::LONGFILESIZES, V::I64(vec![1 << 40, 11, 5])),
            ],
        );
        let (p, _) = package(&blob);
        assert_eq!(p.name, "new");
        assert_eq!(p.files[0].size, Some(1 << 40));
        assert_eq!(p.files[1].size, Some(11));
    }

    #[test]
    fn a_tag_twice_in_the_region_or_in_the_dribbles_is_refused() {
        let mut entries = sample();
        entries.push((tag::NAME, V::Str("again")));
        refused(&build(&entries), field(entries.len(), 0), "appears twice");
        let blob = build_with(
            true,
            &sample(),
            &[(tag::NAME, V::Str("a")), (tag::NAME, V::Str("b"))],
        );
        refused(&blob, field(sample().len() + 2, 0), "appears twice");
    }

    #[test]
    fn headers_without_a_region_and_with_old_file_names_parse() {
        let entries = without(&sample(), &[tag::BASENAMES, tag::DIRNAMES, tag::DIRINDEXES]);
        let mut entries = entries;
        entries.push((tag::OLDFILENAMES, strs(["/a", "/b", "/c"])));
        let (p, _) = package(&build_with(false, &entries, &[]));
        let paths: Vec<&[u8]> = p.files.iter().map(|f| f.path.as_slice()).collect();
        assert_eq!(paths, [&b"/a"[..], b"/b", b"/c"]);
    }

    #[test]
    fn an_unsupported_digest_algorithm_is_a_note_not_a_digest() {
        let (p, note) = package(&build(&replaced(
            &sample(),
            tag::FILEDIGESTALGO,
            V::I32(vec![11]),
        )));
        assert!(p.files.iter().all(|f| f.digest.is_none()));
        assert!(
            note.unwrap()
                .contains("hello-1:2.12-1.el9.x86_64: file digest algorithm 11 is not supported")
        );
    }

    #[test]
    fn a_digest_that_does_not_fit_its_algorithm_is_an_error() {
        for bad in [
            "abc",
            "zz86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "d41d8cd98f00b204e9800998ecf8427e",
        ] {
            let h = parse_header(&build(&replaced(
                &sample(),
                tag::FILEDIGESTS,
                strs(["", bad, ""]),
            )))
            .unwrap();
            let e = h.to_package().unwrap_err();
            assert!(
                e.contains("file 1 (/usr/bin/hello)") && e.contains("64-hex-digit"),
                "{e}"
            );
        }
    }

    #[test]
    fn short_truncated_and_oversized_blobs_are_refused() {
        refused(b"\0\0\0", 0, "shorter than");
        let blob = build(&sample());
        for n in 0..blob.len() {
            assert!(
                parse_header(&blob[..n]).is_err(),
                "a {n}-byte prefix was accepted"
            );
        }
        refused(
            &[&blob[..], b"x"].concat(),
            blob.len(),
            "1 unexpected bytes",
        );
        for il in [0, 0x1_0000, u32::MAX] {
            let mut b = blob.clone();
            set32(&mut b, 0, il);
            refused(&b, 0, "index count");
        }
        let mut b = blob.clone();
        set32(&mut b, 0, 1000);
        refused(&b, b.len(), "truncated");
        let mut b = blob.clone();
        set32(&mut b, 4, 0x1000_0000);
        refused(&b, 4, "data length");
    }

    #[test]
    fn bad_offsets_counts_and_types_are_refused() {
        let entries = sample();
        let blob = build(&entries);
        let dl = be32(&blob, 4);
        let i_name = 1; // entry 0 is the region
        let i_sizes = 6;
        let i_modes = 7;
        let i_digests = 9;
        let at = |b: &[u8], i: usize| 8 + 16 * be32(b, 0) as usize + be32(b, field(i, 2)) as usize;

        let mut b = blob.clone();
        set32(&mut b, field(i_name, 2), dl);
        refused(&b, field(i_name, 2), "outside");

        let mut b = blob.clone();
        set32(&mut b, field(i_sizes, 3), 0x4000_0001);
        refused(&b, field(i_sizes, 3), "do not fit");
        let mut b = blob.clone();
        set32(&mut b, field(i_digests, 3), u32::MAX);
        // The strings run on through the following data; the one after the last NUL has none.
        let last_nul = blob.iter().rposition(|&c| c == 0).unwrap();
        refused(&b, last_nul + 1, "has no NUL");

        let mut b = blob.clone();
        set32(
            &mut b,
            field(i_sizes, 2),
            be32(&blob, field(i_sizes, 2)) + 2,
        );
        refused(&b, at(&b, i_sizes), "not 4-byte aligned");
        let mut b = blob.clone();
        set32(
            &mut b,
            field(i_modes, 2),
            be32(&blob, field(i_modes, 2)) + 1,
        );
        refused(&b, at(&b, i_modes), "not 2-byte aligned");

        for t in [0, 10, 0xffff_ffff] {
            let mut b = blob.clone();
            set32(&mut b, field(i_name, 1), t);
            refused(&b, field(i_name, 1), "unknown type");
        }
        let mut b = blob.clone();
        set32(&mut b, field(i_name, 3), 0);
        refused(&b, field(i_name, 3), "count 0");
        let mut b = blob.clone();
        set32(&mut b, field(i_name, 3), 2);
        refused(&b, field(i_name, 3), "STRING with count 2");
        let mut b = blob.clone();
        set32(&mut b, field(i_name, 0), 50);
        refused(&b, field(i_name, 0), "reserved for regions");

        // Data must follow index order without overlap (rpm's rule; keeps checking linear).
        let mut b = blob.clone();
        set32(&mut b, field(i_name + 1, 2), be32(&blob, field(i_name, 2)));
        refused(
            &b,
            field(i_name + 1, 2),
            "overlaps the previous entry's data",
        );

        // A STRING that runs to the end of the data store without its NUL.
        let mut b = build_with(
            false,
            &[
                (tag::VERSION, V::Str("1")),
                (tag::RELEASE, V::Str("1")),
                (tag::NAME, V::Str("x")),
            ],
            &[],
        );
        let last = b.len() - 1;
        b[last] = b'y';
        refused(&b, last - 1, "has no NUL");

        // INT64 alignment, and a big-count INT64 that must not overflow.
        let b = build_with(
            false,
            &[
                (tag::NAME, V::Str("abc")),
                (tag::LONGFILESIZES, V::I64(vec![1])),
            ],
            &[],
        );
        let mut m = b.clone();
        set32(&mut m, field(1, 2), 4);
        refused(&m, 8 + 32 + 4, "not 8-byte aligned");
        let mut m = b.clone();
        set32(&mut m, field(1, 3), u32::MAX);
        refused(&m, field(1, 3), "do not fit");
    }

    #[test]
    fn bad_region_entries_and_trailers_are_refused() {
        let blob = build(&sample());
        let il = be32(&blob, 0) as usize;
        let trailer = 8 + 16 * il + be32(&blob, field(0, 2)) as usize;
        let mut b = blob.clone();
        set32(&mut b, field(0, 3), 15);
        refused(&b, 8, "expected BIN with count 16");
        let mut b = blob.clone();
        set32(&mut b, field(0, 2), be32(&blob, 4) - 8);
        refused(&b, field(0, 2), "outside");
        let mut b = blob.clone();
        set32(&mut b, trailer, tag::HEADERIMAGE);
        refused(&b, trailer, "region trailer");
        for off in [-8i32, 0, 16, -16 * (il as i32 + 1), i32::MIN] {
            let mut b = blob.clone();
            set32(&mut b, trailer + 8, off as u32);
            refused(&b, trailer + 8, "does not describe");
        }
    }

    #[test]
    fn known_tags_must_have_their_types_and_file_arrays_must_agree() {
        refused(
            &build(&replaced(&sample(), tag::EPOCH, V::I16(vec![1]))),
            field(4, 1),
            "EPOCH (1003) has type INT16",
        );
        refused(
            &build(&replaced(&sample(), tag::NAME, strs(["a"]))),
            field(1, 1),
            "expected STRING",
        );
        refused(&build(&without(&sample(), &[tag::NAME])), 0, "no NAME tag");
        refused(
            &build(&replaced(&sample(), tag::FILEMODES, V::I16(vec![1, 2]))),
            field(7, 3),
            "FILEMODES has 2 values for 3 files",
        );
        refused(
            &build(&replaced(&sample(), tag::DIRINDEXES, V::I32(vec![0, 1]))),
            field(14, 3),
            "DIRINDEXES has 2 values",
        );
        let blob = build(&replaced(&sample(), tag::DIRINDEXES, V::I32(vec![0, 2, 1])));
        let at = 8 + 16 * be32(&blob, 0) as usize + be32(&blob, field(14, 2)) as usize + 4;
        refused(&blob, at, "DIRINDEXES[1] = 2, but there are 2 DIRNAMES");
        refused(
            &build(&without(&sample(), &[tag::DIRNAMES])),
            field(15, 0),
            "without DIRNAMES",
        );
        let raw = replaced(&sample(), tag::ARCH, V::Raw(ty::BIN, 3, b"abc".to_vec()));
        refused(&build(&raw), field(5, 1), "ARCH (1022) has type BIN");
    }

    #[test]
    fn paths_must_be_baseline_paths() {
        for (dir, base, ok) in [
            ("/", "", Some("/")),
            ("/usr/", "lib/", Some("/usr/lib")),
            ("usr/", "x", None),
            ("/usr/../", "x", None),
            ("/usr//", "x", None),
        ] {
            let entries = replaced(
                &replaced(
                    &replaced(&sample(), tag::DIRNAMES, strs([dir])),
                    tag::DIRINDEXES,
                    V::I32(vec![0, 0, 0]),
                ),
                tag::BASENAMES,
                strs([base, "a", "b"]),
            );
            let result = parse_header(&build(&entries)).unwrap().to_package();
            match ok {
                Some(p) => assert_eq!(result.unwrap().0.files[0].path, p.as_bytes()),
                None => assert!(result.unwrap_err().contains("file 0"), "{dir}{base}"),
            }
        }
    }

    #[test]
    fn file_paths_cannot_expand_without_bound() {
        let long = "/d".repeat(2500);
        let n = 1000;
        let entries = [
            (tag::NAME, V::Str("a")),
            (tag::VERSION, V::Str("1")),
            (tag::RELEASE, V::Str("1")),
            (tag::DIRINDEXES, V::I32(vec![0; n])),
            (tag::BASENAMES, V::Strs(vec![b"f".to_vec(); n])),
            (tag::DIRNAMES, V::Strs(vec![long.into_bytes()])),
        ];
        refused(&build(&entries), field(4, 0), "over 16 times the header");
    }

    /// A deterministic mini-fuzz: mutated real-shaped headers never panic (cargo-fuzz runs the
    /// real thing, see `fuzz/fuzz_targets/rpm_header.rs`).
    #[test]
    fn mutated_headers_never_panic() {
        let blob = build_with(
            true,
            &sample(),
            &[(tag::LONGFILESIZES, V::I64(vec![1, 2, 3]))],
        );
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let specials = [
            0,
            1,
            2,
            3,
            15,
            16,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_fff0,
            u32::MAX,
        ];
        for _ in 0..30_000 {
            let mut b = blob.clone();
            for _ in 0..1 + next() % 3 {
                let at = (next() as usize) % b.len();
                if next() % 2 == 0 && at + 4 <= b.len() {
                    let w = at & !3;
                    set32(&mut b, w, specials[(next() as usize) % specials.len()]);
                } else {
                    b[at] = next() as u8;
                }
            }
            if let Ok(h) = parse_header(&b) {
                let _ = h.to_package();
            }
        }
    }

    // -- the rpm program's output -----------------------------------------------------------

    #[test]
    fn shescaped_output_splits_into_fields_and_records() {
        let out = b"@\t'a'\\''b'\t(none)\t''\nF\t'tab\there\nnl'\t12\n";
        let r = split_records(out).unwrap();
        let f = |b: &[u8], quoted| Field {
            bytes: b.to_vec(),
            quoted,
        };
        assert_eq!(
            r[0],
            (
                0,
                vec![
                    f(b"@", false),
                    f(b"a'b", true),
                    f(b"(none)", false),
                    f(b"", true)
                ]
            )
        );
        assert_eq!(
            r[1].1,
            vec![f(b"F", false), f(b"tab\there\nnl", true), f(b"12", false)]
        );
        assert_eq!(split_records(b"@\t'abc\n").unwrap_err().0, 2);
        assert!(
            split_records(b"@\tabc")
                .unwrap_err()
                .1
                .contains("ends inside a record")
        );
        assert!(split_records(b"x\\").is_err());
    }

    #[test]
    fn query_output_becomes_headers() {
        let out = b"@\t7\t'hello'\t(none)\t'2.12'\t'1'\t(none)\t(none)\n\
F\t'/usr/bin/it'\\''s'\t'd41d8cd98f00b204e9800998ecf8427e'\t-32348\t17\t'root'\t'wheel'\t0\t''\t5\n\
F\t'/l'\t''\t41471\t0\t'root'\t'root'\t2\t'/x'\t(none)\n";
        let h = parse_query_output(out).unwrap();
        assert_eq!(h.len(), 1);
        let (instance, h) = &h[0];
        assert_eq!(
            (instance.as_str(), h.epoch, h.arch.clone(), h.digest_algo),
            ("7", None, None, 1)
        );
        assert_eq!(h.files[0].path, b"/usr/bin/it's");
        assert_eq!(
            h.files[0].mode,
            Some(0o100644),
            "a negative int16 mode is taken as unsigned"
        );
        assert_eq!(
            (h.files[0].flags, h.files[0].mtime, h.files[1].mtime),
            (17, Some(5), None)
        );
        assert_eq!(
            (h.files[1].link_to.as_slice(), h.files[1].digest.is_empty()),
            (&b"/x"[..], true)
        );
        let (p, _) = h.to_package().unwrap();
        assert_eq!((p.version.as_str(), p.arch.as_str()), ("2.12-1", "(none)"));
        assert!(matches!(p.files[0].digest, Some(Digest::Md5(_))));

        assert!(parse_query_output(b"F\t'/a'\t''\t1\t0\t'r'\t'r'\t0\t''\t0\n").is_err());
        assert!(parse_query_output(b"@\t1\t'a'\n").is_err());
        assert!(
            parse_query_output(b"@\t1\t'a'\tX\t'1'\t'1'\t'n'\t8\n")
                .unwrap_err()
                .1
                .contains("EPOCH")
        );
        assert!(
            parse_query_output(b"@\t1\t(none)\t1\t'1'\t'1'\t'n'\t8\n")
                .unwrap_err()
                .1
                .contains("NAME")
        );
    }

    // -- finding the database ---------------------------------------------------------------

    fn touch(p: &Path) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, b"x").unwrap();
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        fs::create_dir_all(root.join("usr/lib/sysimage/rpm")).unwrap();
        fs::create_dir_all(root.join("var/lib")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/sysimage/rpm", root.join("var/lib/rpm")).unwrap();
        std::os::unix::fs::symlink("../../../../../../../../usr", root.join("var/up")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        let r = |p: &str| resolve_in_root(root, Path::new(p));
        assert_eq!(
            r("var/lib/rpm").unwrap(),
            Some(PathBuf::from("usr/lib/sysimage/rpm"))
        );
        assert_eq!(
            r("/var/up/lib/../lib/sysimage").unwrap(),
            Some(PathBuf::from("usr/lib/sysimage"))
        );
        assert_eq!(r("var/lib/nothing").unwrap(), None);
        assert!(r("loop/x").is_err());
    }

    #[test]
    fn locates_the_database_and_prefers_sqlite() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        assert!(!database_present(root));
        assert!(matches!(read(root), Err(PackageError::Other(m)) if m.contains("no rpm database")));

        // Fedora's layout with an absolute symlink: it must resolve inside the root.
        fs::create_dir_all(root.join("var/lib")).unwrap();
        std::os::unix::fs::symlink("/srv/rpm", root.join("var/lib/rpm")).unwrap();
        touch(&root.join("srv/rpm/Packages"));
        let db = locate(root).unwrap().unwrap();
        assert_eq!(
            (db.format, db.dir.as_path()),
            (Format::BerkeleyDb, Path::new("srv/rpm"))
        );
        assert!(database_present(root));

        touch(&root.join("srv/rpm/rpmdb.sqlite"));
        touch(&root.join("usr/lib/sysimage/rpm/Packages.db"));
        let db = locate(root).unwrap().unwrap();
        assert_eq!(
            (db.format, db.file.clone()),
            (Format::Ndb, root.join("usr/lib/sysimage/rpm/Packages.db"))
        );
        assert_eq!(
            db.others,
            [
                PathBuf::from("srv/rpm/rpmdb.sqlite"),
                PathBuf::from("srv/rpm/Packages")
            ]
        );
    }

    #[test]
    fn a_missing_rpm_program_is_a_clear_error() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("var/lib/rpm/Packages"));
        let db = locate(t.path()).unwrap().unwrap();
        let e = read_with_program(t.path(), &db, Path::new("/nonexistent/rpm")).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("Berkeley DB format")
                && e.contains("/nonexistent/rpm")
                && e.contains("not installed"),
            "{e}"
        );
    }

    // -- SQLite without rpm ------------------------------------------------------------------

    fn create_rpmdb(file: &Path, blobs: &[Vec<u8>]) -> Connection {
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        let conn = Connection::open(file).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.execute_batch(
            "CREATE TABLE Packages (hnum INTEGER PRIMARY KEY AUTOINCREMENT, blob BLOB NOT NULL)",
        )
        .unwrap();
        for b in blobs {
            conn.execute("INSERT INTO Packages (blob) VALUES (?1)", [b])
                .unwrap();
        }
        conn
    }

    /// Name, size, inode, mtime and ctime of everything in `dir`: reading must change none.
    fn dir_state(dir: &Path) -> Vec<(OsString, StatKey)> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name(),
                    StatKey::from_metadata(&e.metadata().unwrap()),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn named(name: &'static str) -> Vec<u8> {
        build(&replaced(&sample(), tag::NAME, V::Str(name)))
    }

    #[test]
    fn sqlite_is_read_without_writing_into_the_root() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("var/lib/rpm/rpmdb.sqlite");
        drop(create_rpmdb(&file, &[named("b"), named("a")]));
        let before = dir_state(file.parent().unwrap());
        let m = read(t.path()).unwrap();
        assert_eq!(dir_state(file.parent().unwrap()), before);
        assert_eq!(m.manager, Manager::Rpm);
        let names: Vec<&str> = m.packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert!(m.notes.is_empty());
    }

    #[test]
    fn committed_transactions_in_the_write_ahead_log_are_seen() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("usr/lib/sysimage/rpm/rpmdb.sqlite");
        let writer = create_rpmdb(&file, &[named("kept"), named("erased")]);
        writer
            .execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
            .unwrap();
        // What a running (or killed) rpm leaves: a committed change only in the -wal.
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer
            .execute("DELETE FROM Packages WHERE hnum = 2", [])
            .unwrap();
        writer
            .execute("INSERT INTO Packages (blob) VALUES (?1)", [named("added")])
            .unwrap();
        assert!(fs::metadata(sibling(&file, "-wal")).unwrap().len() > 0);
        let before = dir_state(file.parent().unwrap());

        let m = read(t.path()).unwrap();
        let names: Vec<&str> = m.packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["added", "kept"]);
        assert!(m.notes[0].contains("write-ahead log"), "{:?}", m.notes);
        assert_eq!(
            dir_state(file.parent().unwrap()),
            before,
            "reading wrote into the root"
        );

        // Why the copy: `immutable` alone would silently miss both changes.
        let db = locate(t.path()).unwrap().unwrap();
        let stale = read_sqlite_file(&file, &sqlite_uri(&file, true), &db, Vec::new()).unwrap();
        let names: Vec<&str> = stale.packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["erased", "kept"]);
        drop(writer);
    }

    #[test]
    fn a_bad_header_or_database_names_the_file_and_position() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("var/lib/rpm/rpmdb.sqlite");
        let mut bad = named("bad");
        set32(&mut bad, field(1, 1), 10);
        drop(create_rpmdb(&file, &[named("good"), bad]));
        match read(t.path()) {
            Err(PackageError::Parse {
                path,
                position,
                what,
            }) => {
                assert_eq!(path, file);
                assert_eq!(
                    position,
                    format!("package hnum 2, header byte {}", field(1, 1))
                );
                assert!(what.contains("unknown type 10"), "{what}");
            }
            other => panic!("{other:?}"),
        }
        fs::write(
            &file,
            b"not a database at all, just some bytes in a file that is long enough",
        )
        .unwrap();
        let e = read(t.path()).unwrap_err();
        assert!(
            matches!(&e, PackageError::Parse { path, .. } if *path == file),
            "{e:?}"
        );
    }

    #[test]
    fn sqlite_uris_escape_every_special_byte() {
        let uri = sqlite_uri(Path::new("/r o?t#%/\u{e9}/rpmdb.sqlite"), true);
        assert_eq!(
            uri,
            "file:/r%20o%3Ft%23%25/%C3%A9/rpmdb.sqlite?mode=ro&immutable=1"
        );
    }

    // -- real rpm ----------------------------------------------------------------------------

    /// Tests with the real `rpm` and `rpmbuild` (Debian's `rpm` package), installing into
    /// temporary roots, which needs root (rpm chroots). When something is missing they skip
    /// with the reason printed, except under `CI=true`, where skipping is a failure.
    mod real_rpm {
        use std::collections::BTreeMap;
        use std::process::Command;

        use super::*;

        fn require(what: &str, ok: bool) -> bool {
            if !ok {
                let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
                assert!(
                    !ci,
                    "this test needs {what} and CI=true forbids skipping it"
                );
                eprintln!("skipping: this test needs {what}");
            }
            ok
        }

        fn found(program: &str) -> bool {
            Command::new(program)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok()
        }

        fn run(cmd: &mut Command) -> String {
            let out = cmd.stdin(Stdio::null()).output().unwrap();
            assert!(
                out.status.success(),
                "{cmd:?}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }

        const ALPHA_SPEC: &str = r#"Name: dwtest-alpha
Epoch: 2
Version: 1.2
Release: 3
Summary: driftwatch rpm reader test package
License: MIT
BuildArch: noarch
%description
Test package for driftwatch.
%install
mkdir -p %{buildroot}/usr/bin %{buildroot}/etc/dwtest %{buildroot}/usr/share/dwtest/dir
printf '#!/bin/sh\necho alpha\n' > %{buildroot}/usr/bin/dwalpha
printf 'key=value\n' > %{buildroot}/etc/dwtest/alpha.conf
ln -s ../../bin/dwalpha %{buildroot}/usr/share/dwtest/link
printf 'odd name\n' > "%{buildroot}/usr/share/dwtest/it's \ é"
printf 'secret\n' > %{buildroot}/usr/share/dwtest/owned
%files
%defattr(-,root,root,-)
%attr(4755,root,root) /usr/bin/dwalpha
%config(noreplace) /etc/dwtest/alpha.conf
%dir /usr/share/dwtest
%dir /usr/share/dwtest/dir
/usr/share/dwtest/link
"/usr/share/dwtest/it's \ é"
%attr(0640,daemon,adm) /usr/share/dwtest/owned
%ghost /var/log/dwtest-alpha.log
"#;

        const BETA_SPEC: &str = r#"Name: dwtest-beta
Version: 0.9
Release: 1
Summary: driftwatch rpm reader test package
License: MIT
%description
Test package for driftwatch.
%install
mkdir -p %{buildroot}/usr/lib/dwbeta %{buildroot}/etc
seq 1 20000 > %{buildroot}/usr/lib/dwbeta/data.txt
printf 'beta=1\n' > %{buildroot}/etc/dwbeta.conf
%files
%defattr(-,root,root,-)
/usr/lib/dwbeta
%config /etc/dwbeta.conf
"#;

        struct Built {
            _dir: tempfile::TempDir,
            alpha: PathBuf,
            beta: PathBuf,
            beta_arch: String,
        }

        /// Builds dwtest-alpha (noarch, SHA-256 file digests) and dwtest-beta (this machine's
        /// arch, SHA-512 file digests) with rpmbuild.
        fn build_packages() -> Built {
            let dir = tempfile::tempdir().unwrap();
            let top = dir.path().join("top");
            let mut rpms = Vec::new();
            for (name, spec, algo) in [("alpha", ALPHA_SPEC, 8), ("beta", BETA_SPEC, 10)] {
                let spec_file = dir.path().join(format!("{name}.spec"));
                fs::write(&spec_file, spec).unwrap();
                run(Command::new("rpmbuild")
                    .args(["-bb", "--nodeps", "--define"])
                    .arg(format!("_topdir {}", top.display()))
                    .arg("--define")
                    .arg(format!("_binary_filedigest_algorithm {algo}"))
                    .args([
                        "--define",
                        "debug_package %{nil}",
                        "--define",
                        "__os_install_post %{nil}",
                    ])
                    .args(["--define", "_build_id_links none"])
                    .arg(&spec_file));
                let rpm = walkdir::WalkDir::new(top.join("RPMS"))
                    .into_iter()
                    .map(|e| e.unwrap().into_path())
                    .find(|p| {
                        p.file_name()
                            .unwrap()
                            .to_string_lossy()
                            .starts_with(&format!("dwtest-{name}-"))
                    })
                    .unwrap();
                rpms.push(rpm);
            }
            let beta_arch = run(Command::new("rpm")
                .args(["-qp", "--qf", "%{ARCH}"])
                .arg(&rpms[1]));
            let beta = rpms.pop().unwrap();
            let alpha = rpms.pop().unwrap();
            Built {
                _dir: dir,
                alpha,
                beta,
                beta_arch,
            }
        }

        fn rpm_in(root: &Path, dbpath: &str) -> Command {
            let mut c = Command::new("rpm");
            c.arg("--root")
                .arg(root)
                .args(["--dbpath", dbpath, "--define", "_db_backend sqlite"]);
            c
        }

        fn digest_of(algo: &Digest, content: &[u8]) -> Digest {
            let alg = match algo {
                Digest::Sha256(_) => &ring::digest::SHA256,
                Digest::Sha512(_) => &ring::digest::SHA512,
                other => panic!("unexpected algorithm {}", other.algorithm()),
            };
            let d = ring::digest::digest(alg, content);
            match algo {
                Digest::Sha256(_) => Digest::Sha256(d.as_ref().try_into().unwrap()),
                _ => Digest::Sha512(d.as_ref().try_into().unwrap()),
            }
        }

        fn files(m: &Manifest, name: &str) -> BTreeMap<String, PackageFile> {
            let p = m
                .packages
                .iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("{name} missing"));
            p.files
                .iter()
                .map(|f| (String::from_utf8(f.path.clone()).unwrap(), f.clone()))
                .collect()
        }

        fn in_root(root: &Path, path: &str) -> PathBuf {
            root.join(path.trim_start_matches('/'))
        }

        fn tools_present(extra: &[&str]) -> bool {
            require(
                "root privileges (rpm --root installs in a chroot)",
                nix::unistd::geteuid().is_root(),
            ) && ["rpm", "rpmbuild"]
                .iter()
                .chain(extra)
                .all(|p| require(&format!("the `{p}` program"), found(p)))
        }

        #[test]
        fn sqlite_rpmdb_written_by_rpm_is_read_directly() {
            if !tools_present(&[]) {
                return;
            }
            let built = build_packages();
            let t = tempfile::tempdir().unwrap();
            let root = t.path();
            run(rpm_in(root, "/var/lib/rpm")
                .args(["--nodeps", "--ignorearch", "-i"])
                .arg(&built.alpha)
                .arg(&built.beta));
            let dbdir = root.join("var/lib/rpm");
            assert!(
                dbdir.join("rpmdb.sqlite").is_file(),
                "rpm did not write an SQLite database"
            );
            assert!(database_present(root));

            let before = dir_state(&dbdir);
            let m = read(root).unwrap();
            assert_eq!(dir_state(&dbdir), before, "reading wrote into the root");
            assert!(m.notes.is_empty(), "{:?}", m.notes);
            let names: Vec<(&str, &str, &str)> = m
                .packages
                .iter()
                .map(|p| (p.name.as_str(), p.version.as_str(), p.arch.as_str()))
                .collect();
            assert_eq!(
                names,
                [
                    ("dwtest-alpha", "2:1.2-3", "noarch"),
                    ("dwtest-beta", "0.9-1", built.beta_arch.as_str())
                ]
            );
            assert!(m.packages.iter().all(|p| p.state == "installed"));

            let alpha = files(&m, "dwtest-alpha");
            let paths: Vec<&str> = alpha.keys().map(String::as_str).collect();
            assert_eq!(
                paths,
                [
                    "/etc/dwtest/alpha.conf",
                    "/usr/bin/dwalpha",
                    "/usr/share/dwtest",
                    "/usr/share/dwtest/dir",
                    "/usr/share/dwtest/it's \\ é",
                    "/usr/share/dwtest/link",
                    "/usr/share/dwtest/owned",
                    "/var/log/dwtest-alpha.log",
                ]
            );
            let f = &alpha["/usr/bin/dwalpha"];
            assert_eq!(
                (f.file_type, f.mode, f.config, f.ghost),
                (Some(0o100000), Some(0o4755), false, false)
            );
            assert_eq!(
                (f.user.as_deref(), f.group.as_deref()),
                (Some("root"), Some("root"))
            );
            let f = &alpha["/etc/dwtest/alpha.conf"];
            assert_eq!((f.mode, f.config, f.size), (Some(0o644), true, Some(10)));
            let f = &alpha["/usr/share/dwtest/dir"];
            assert_eq!(
                (
                    f.file_type,
                    f.mode,
                    f.digest.as_ref(),
                    f.link_target.as_ref()
                ),
                (Some(0o40000), Some(0o755), None, None)
            );
            let f = &alpha["/usr/share/dwtest/link"];
            assert_eq!((f.file_type, f.mode), (Some(0o120000), Some(0o777)));
            assert_eq!(
                (f.link_target.as_deref(), f.size, f.digest.as_ref()),
                (Some(&b"../../bin/dwalpha"[..]), Some(17), None)
            );
            let f = &alpha["/usr/share/dwtest/owned"];
            assert_eq!(
                (f.user.as_deref(), f.group.as_deref(), f.mode),
                (Some("daemon"), Some("adm"), Some(0o640))
            );
            let f = &alpha["/var/log/dwtest-alpha.log"];
            assert_eq!((f.ghost, f.digest.as_ref()), (true, None));
            let beta = files(&m, "dwtest-beta");
            assert!(beta["/etc/dwbeta.conf"].config);
            assert_eq!(beta["/usr/lib/dwbeta/data.txt"].size, Some(108_894));

            // Every regular file: digest (SHA-256 for alpha, SHA-512 for beta) and size equal
            // what is on disk.
            let mut checked = 0;
            for (algo, list) in [("sha256", &alpha), ("sha512", &beta)] {
                for (path, f) in list
                    .iter()
                    .filter(|(_, f)| f.file_type == Some(0o100000) && !f.ghost)
                {
                    let content = fs::read(in_root(root, path)).unwrap();
                    let digest = f
                        .digest
                        .as_ref()
                        .unwrap_or_else(|| panic!("{path} has no digest"));
                    assert_eq!(digest.algorithm(), algo, "{path}");
                    assert_eq!(*digest, digest_of(digest, &content), "{path}");
                    assert_eq!(f.size, Some(content.len() as u64), "{path}");
                    checked += 1;
                }
            }
            assert_eq!(checked, 6);

            // rpm itself, given the same database, says exactly the same.
            let db = locate(root).unwrap().unwrap();
            let by_rpm = read_with_program(root, &db, Path::new("rpm")).unwrap();
            assert_eq!(by_rpm.packages, m.packages);
            assert!(
                by_rpm.notes[0].contains("SQLite format"),
                "{:?}",
                by_rpm.notes
            );

            if let Some(seeds) = std::env::var_os("DRIFTWATCH_RPM_HEADER_SEEDS") {
                let conn = Connection::open_with_flags(
                    sqlite_uri(&db.file, true),
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
                )
                .unwrap();
                let mut stmt = conn.prepare("SELECT blob FROM Packages").unwrap();
                for blob in stmt.query_map([], |r| r.get::<_, Vec<u8>>(0)).unwrap() {
                    let blob = blob.unwrap();
                    let name = parse_header(&blob).unwrap().name;
                    fs::write(Path::new(&seeds).join(format!("{name}.hdr")), &blob).unwrap();
                }
            }

            // Erase one package, tamper with a file of the other.
            run(rpm_in(root, "/var/lib/rpm").args(["--nodeps", "-e", "dwtest-beta"]));
            let conf = in_root(root, "/etc/dwtest/alpha.conf");
            fs::write(&conf, "key=tampered\n").unwrap();
            let m = read(root).unwrap();
            let names: Vec<&str> = m.packages.iter().map(|p| p.name.as_str()).collect();
            assert_eq!(names, ["dwtest-alpha"]);
            let recorded = files(&m, "dwtest-alpha")["/etc/dwtest/alpha.conf"]
                .digest
                .clone()
                .unwrap();
            assert_ne!(recorded, digest_of(&recorded, &fs::read(&conf).unwrap()));
            assert_eq!(recorded, digest_of(&recorded, b"key=value\n"));
        }

        /// Debian's rpm reads Berkeley DB (`bdb_ro`) but cannot write it, and has no ndb: the
        /// Packages file is made with Berkeley DB's own db5.3_load (Debian's `db5.3-util`)
        /// from the headers rpm wrote to SQLite, keyed by hnum in host byte order with rpm's
        /// record 0 (the next hnum).
        #[test]
        fn berkeley_db_rpmdb_is_read_with_the_rpm_program() {
            if !tools_present(&["db5.3_load"]) {
                return;
            }
            let built = build_packages();
            let t = tempfile::tempdir().unwrap();
            let sqlite_root = t.path().join("sqlite");
            run(rpm_in(&sqlite_root, "/var/lib/rpm")
                .args(["--nodeps", "--ignorearch", "-i"])
                .arg(&built.alpha)
                .arg(&built.beta));
            let expected = read(&sqlite_root).unwrap();

            let conn = Connection::open_with_flags(
                sqlite_uri(&sqlite_root.join("var/lib/rpm/rpmdb.sqlite"), true),
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
            )
            .unwrap();
            let mut stmt = conn.prepare("SELECT hnum, blob FROM Packages").unwrap();
            let rows: Vec<(u32, Vec<u8>)> = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
            let mut dump = String::from(
                "VERSION=3\nformat=bytevalue\ntype=hash\ndb_pagesize=4096\nHEADER=END\n",
            );
            let next = rows.iter().map(|r| r.0).max().unwrap() + 1;
            dump += &format!(
                " {}\n {}\n",
                hex(&0u32.to_ne_bytes()),
                hex(&next.to_ne_bytes())
            );
            for (hnum, blob) in &rows {
                dump += &format!(" {}\n {}\n", hex(&hnum.to_ne_bytes()), hex(blob));
            }
            dump += "DATA=END\n";
            let bdb_root = t.path().join("bdb");
            let dbdir = bdb_root.join("var/lib/rpm");
            fs::create_dir_all(&dbdir).unwrap();
            let dump_file = t.path().join("dump.txt");
            fs::write(&dump_file, dump).unwrap();
            run(Command::new("db5.3_load")
                .arg("-f")
                .arg(&dump_file)
                .arg(dbdir.join("Packages")));

            assert!(database_present(&bdb_root));
            let before = dir_state(&dbdir);
            let m = read(&bdb_root).unwrap();
            assert_eq!(dir_state(&dbdir), before, "reading wrote into the root");
            assert_eq!(m.packages, expected.packages);
            assert_eq!(m.notes.len(), 1);
            assert!(
                m.notes[0].starts_with(
                    "rpm database in Berkeley DB format (var/lib/rpm/Packages): read with"
                ),
                "{:?}",
                m.notes
            );

            // A damaged Berkeley DB is an error, not an empty package list.
            fs::write(dbdir.join("Packages"), vec![0x5a; 8192]).unwrap();
            let e = read(&bdb_root).unwrap_err().to_string();
            assert!(e.contains("not a berkeley db"), "{e}");
        }
    }
}
