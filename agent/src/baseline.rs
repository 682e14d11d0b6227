//! Baseline files: writing a signed baseline and reading one back, refusing anything that is
//! not exactly what a trusted key signed.
//!
//! Layout (see `proto/proto/driftwatch/v1/baseline.proto`): magic, one length-delimited
//! `SignedHeader`, then `entry_count` length-delimited `Entry` records in ascending raw path
//! order. The reader checks, in this order: magic, header size, signature by a trusted key,
//! format version, hash algorithm, expiry, then while streaming the entries: record sizes,
//! path rules, strict ordering, count, and finally the Merkle root against the signed one. Only
//! then are entries returned.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use driftwatch_proto::v1::{Entry, Header, SignedHeader};
use driftwatch_proto::{
    BASELINE_FORMAT_VERSION, BASELINE_MAGIC, HASH_ALGORITHM, envelope, merkle, path as bpath,
};
use prost::Message;
use ring::signature::Ed25519KeyPair;

/// Largest header record accepted (policy text included).
pub const MAX_HEADER_BYTES: u64 = 16 << 20;
/// Largest entry record accepted (path, target and xattr values included).
pub const MAX_ENTRY_BYTES: u64 = 4 << 20;

/// Why a baseline was refused or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum BaselineError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{0} is not a driftwatch baseline (bad magic bytes)")]
    NotABaseline(PathBuf),
    #[error("{path}: truncated: {what}")]
    Truncated { path: PathBuf, what: String },
    #[error("{path}: malformed at byte {offset}: {what}")]
    Malformed {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("{path}: {source}")]
    Signature {
        path: PathBuf,
        source: envelope::EnvelopeError,
    },
    #[error(
        "{path}: format version {found} is not supported (this driftwatch reads version {supported})"
    )]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path}: content hash algorithm {0:?} is not supported", .algorithm)]
    UnsupportedAlgorithm { path: PathBuf, algorithm: String },
    #[error("{path}: the baseline expired at {at}")]
    Expired { path: PathBuf, at: String },
    #[error(
        "{path}: the entries do not match the signed Merkle root: the file was altered after signing"
    )]
    RootMismatch { path: PathBuf },
    #[error("{path}: the header says {expected} entries but the file has {found}")]
    CountMismatch {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("invalid baseline content: {0}")]
    Invalid(String),
}

/// A verified baseline.
#[derive(Debug, Clone)]
pub struct Baseline {
    pub header: Header,
    /// Sorted by raw path bytes.
    pub entries: Vec<Entry>,
    /// Fingerprint of the key that signed it.
    pub signer: String,
    pub merkle_root: [u8; 32],
}

impl Baseline {
    /// Index of the entry for `path`.
    pub fn find(&self, path: &[u8]) -> Option<usize> {
        self.entries
            .binary_search_by(|e| e.path.as_slice().cmp(path))
            .ok()
    }
}

/// What a new baseline describes, besides its entries.
#[derive(Debug, Clone)]
pub struct BaselineMeta {
    pub image_id: String,
    pub image_version: String,
    pub created_unix: i64,
    pub expires_unix: Option<i64>,
    pub policy_toml: String,
    /// "dpkg", "rpm" or empty.
    pub package_manager: String,
    /// Sorted by (name, arch); `Entry::packages` index into it.
    pub packages: Vec<driftwatch_proto::v1::Package>,
    pub package_notes: Vec<String>,
}

/// Sorts and checks entries, computes the root, signs the header and writes the file
/// atomically. Returns the Merkle root.
pub fn write(
    out: &Path,
    meta: &BaselineMeta,
    entries: &mut [Entry],
    key: &Ed25519KeyPair,
) -> Result<[u8; 32], BaselineError> {
    entries.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    if let Some(w) = entries.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(BaselineError::Invalid(format!(
            "duplicate path {}",
            crate::escape::bytes(&w[0].path)
        )));
    }
    let leaves: Vec<[u8; 32]> = entries
        .iter()
        .map(|e| merkle::leaf_hash(&e.encode_to_vec()))
        .collect();
    let root = merkle::root(
        entries
            .iter()
            .map(|e| e.path.as_slice())
            .zip(leaves.iter().copied()),
    )
    .map_err(|e| BaselineError::Invalid(e.to_string()))?;
    let header = Header {
        format_version: BASELINE_FORMAT_VERSION,
        image_id: meta.image_id.clone(),
        image_version: meta.image_version.clone(),
        created_unix: meta.created_unix,
        expires_unix: meta.expires_unix,
        policy_digest: blake3::hash(meta.policy_toml.as_bytes())
            .as_bytes()
            .to_vec(),
        policy_toml: meta.policy_toml.clone(),
        entry_count: entries.len() as u64,
        merkle_root: root.to_vec(),
        created_by: concat!("driftwatch-agent ", env!("CARGO_PKG_VERSION")).to_string(),
        hash_algorithm: HASH_ALGORITHM.to_string(),
        package_manager: meta.package_manager.clone(),
        packages: meta.packages.clone(),
        package_notes: meta.package_notes.clone(),
    };
    let signed = envelope::sign(header.encode_to_vec(), key);
    crate::fsutil::write_atomic_with(out, 0o644, |f| {
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&BASELINE_MAGIC)?;
        w.write_all(&signed.encode_length_delimited_to_vec())?;
        let mut buf = Vec::with_capacity(512);
        for e in entries.iter() {
            buf.clear();
            e.encode_length_delimited(&mut buf)
                .map_err(io::Error::other)?;
            w.write_all(&buf)?;
        }
        w.flush()
    })
    .map_err(|source| BaselineError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(root)
}

struct RecordReader<R> {
    inner: R,
    offset: u64,
}

impl<R: BufRead> RecordReader<R> {
    /// Reads one varint-length-delimited record; `None` at a clean end of file.
    fn next(&mut self, max: u64, buf: &mut Vec<u8>) -> Result<Option<()>, (u64, String)> {
        let start = self.offset;
        let mut len: u64 = 0;
        let mut shift = 0;
        loop {
            let mut byte = [0u8; 1];
            match self.inner.read(&mut byte) {
                Ok(0) if shift == 0 => return Ok(None),
                Ok(0) => return Err((start, "end of file inside a record length".into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err((start, e.to_string())),
            }
            self.offset += 1;
            len |= u64::from(byte[0] & 0x7f) << shift;
            if byte[0] & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return Err((start, "record length is not a valid varint".into()));
            }
        }
        if len > max {
            return Err((
                start,
                format!("record of {len} bytes exceeds the limit of {max}"),
            ));
        }
        buf.clear();
        buf.resize(len as usize, 0);
        self.inner
            .read_exact(buf)
            .map_err(|_| (start, format!("end of file inside a record of {len} bytes")))?;
        self.offset += len;
        Ok(Some(()))
    }
}

/// Reads and fully verifies a baseline. `now_unix` decides expiry.
pub fn read(path: &Path, trusted: &[[u8; 32]], now_unix: i64) -> Result<Baseline, BaselineError> {
    read_inner(path, Some(trusted), now_unix)
}

/// Reads a baseline and checks its integrity (format, Merkle root) but not who signed it; for
/// `baseline show` without trusted keys. The signer is reported, not trusted.
pub fn read_unauthenticated(path: &Path) -> Result<Baseline, BaselineError> {
    read_inner(path, None, i64::MIN)
}

fn read_inner(
    path: &Path,
    trusted: Option<&[[u8; 32]]>,
    now_unix: i64,
) -> Result<Baseline, BaselineError> {
    let file = File::open(path).map_err(|source| BaselineError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    decode(
        BufReader::with_capacity(1 << 20, file),
        path,
        trusted,
        now_unix,
    )
}

/// Decodes and verifies a baseline from any reader; `name` is used in error messages. With
/// `trusted: None` the signature is not checked (integrity still is). Never panics on any
/// input: every malformation is an error naming the byte offset.
pub fn decode<R: BufRead>(
    mut r: R,
    name: &Path,
    trusted: Option<&[[u8; 32]]>,
    now_unix: i64,
) -> Result<Baseline, BaselineError> {
    let p = || name.to_path_buf();
    let mut magic = [0u8; 8];
    if r.read_exact(&mut magic).is_err() || magic != BASELINE_MAGIC {
        return Err(BaselineError::NotABaseline(p()));
    }
    let mut rr = RecordReader {
        inner: r,
        offset: 8,
    };
    let mut buf = Vec::new();
    let malformed = |offset: u64, what: String| BaselineError::Malformed {
        path: p(),
        offset,
        what,
    };
    match rr.next(MAX_HEADER_BYTES, &mut buf) {
        Ok(Some(())) => {}
        Ok(None) => {
            return Err(BaselineError::Truncated {
                path: p(),
                what: "no header".into(),
            });
        }
        Err((o, w)) => return Err(malformed(o, w)),
    }
    let signed = SignedHeader::decode(buf.as_slice())
        .map_err(|e| malformed(8, format!("signed header: {e}")))?;
    let signer = envelope::key_fingerprint(&signed.public_key);
    if let Some(trusted) = trusted {
        envelope::verify(&signed, trusted)
            .map_err(|source| BaselineError::Signature { path: p(), source })?;
    }
    let header = Header::decode(signed.header.as_slice())
        .map_err(|e| malformed(8, format!("header: {e}")))?;
    if header.format_version != BASELINE_FORMAT_VERSION {
        return Err(BaselineError::UnsupportedVersion {
            path: p(),
            found: header.format_version,
            supported: BASELINE_FORMAT_VERSION,
        });
    }
    if header.hash_algorithm != HASH_ALGORITHM {
        return Err(BaselineError::UnsupportedAlgorithm {
            path: p(),
            algorithm: header.hash_algorithm,
        });
    }
    if let Some(exp) = header.expires_unix
        && now_unix > exp
    {
        return Err(BaselineError::Expired {
            path: p(),
            at: crate::time::format_unix(exp),
        });
    }
    let signed_root: [u8; 32] = header
        .merkle_root
        .as_slice()
        .try_into()
        .map_err(|_| malformed(8, "Merkle root is not 32 bytes".into()))?;

    // The count is only signed when a trusted key was given (`baseline show` reads unsigned
    // files too), so it never sizes an allocation beyond what records actually arrive.
    let mut entries: Vec<Entry> = Vec::with_capacity(header.entry_count.min(4096) as usize);
    let mut leaves: Vec<[u8; 32]> = Vec::with_capacity(entries.capacity());
    loop {
        let at = rr.offset;
        match rr.next(MAX_ENTRY_BYTES, &mut buf) {
            Ok(Some(())) => {}
            Ok(None) => break,
            Err((o, w)) => return Err(malformed(o, w)),
        }
        if entries.len() as u64 >= header.entry_count {
            return Err(BaselineError::CountMismatch {
                path: p(),
                expected: header.entry_count,
                found: entries.len() as u64 + 1,
            });
        }
        let e = Entry::decode(buf.as_slice()).map_err(|e| malformed(at, format!("entry: {e}")))?;
        bpath::validate(&e.path).map_err(|err| {
            malformed(
                at,
                format!("entry path {}: {err}", crate::escape::bytes(&e.path)),
            )
        })?;
        if let Some(prev) = entries.last()
            && prev.path >= e.path
        {
            return Err(malformed(
                at,
                format!("entry {} is out of order", crate::escape::bytes(&e.path)),
            ));
        }
        if !e.content_hash.is_empty() && e.content_hash.len() != 32 {
            return Err(malformed(at, "content hash is not 32 bytes".into()));
        }
        if e.packages
            .iter()
            .any(|&i| i as usize >= header.packages.len())
        {
            return Err(malformed(
                at,
                "entry names a package the header does not list".into(),
            ));
        }
        leaves.push(merkle::leaf_hash(&buf));
        entries.push(e);
    }
    if entries.len() as u64 != header.entry_count {
        return Err(BaselineError::Truncated {
            path: p(),
            what: format!(
                "the header says {} entries but the file ends after {}",
                header.entry_count,
                entries.len()
            ),
        });
    }
    let root = merkle::root(
        entries
            .iter()
            .map(|e| e.path.as_slice())
            .zip(leaves.iter().copied()),
    )
    .map_err(|e| BaselineError::Invalid(e.to_string()))?;
    if root != signed_root {
        return Err(BaselineError::RootMismatch { path: p() });
    }
    Ok(Baseline {
        header,
        entries,
        signer,
        merkle_root: root,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use driftwatch_proto::v1::FileType;
    use ring::rand::SystemRandom;

    fn key() -> (Ed25519KeyPair, [u8; 32]) {
        use ring::signature::KeyPair;
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        let k = Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
        let raw = k.public_key().as_ref().try_into().unwrap();
        (k, raw)
    }

    fn meta() -> BaselineMeta {
        BaselineMeta {
            image_id: "web".into(),
            image_version: "1".into(),
            created_unix: 1_700_000_000,
            expires_unix: Some(1_800_000_000),
            policy_toml: "base = \"empty\"\n".into(),
            package_manager: String::new(),
            packages: Vec::new(),
            package_notes: Vec::new(),
        }
    }

    fn entries() -> Vec<Entry> {
        let mut v = vec![
            Entry {
                path: b"/".to_vec(),
                file_type: FileType::Directory as i32,
                mode: 0o755,
                ..Default::default()
            },
            Entry {
                path: b"/etc".to_vec(),
                file_type: FileType::Directory as i32,
                mode: 0o755,
                ..Default::default()
            },
            Entry {
                path: b"/etc/passwd".to_vec(),
                file_type: FileType::Regular as i32,
                mode: 0o644,
                size: 5,
                content_hash: blake3::hash(b"root\n").as_bytes().to_vec(),
                ..Default::default()
            },
        ];
        v.reverse();
        v
    }

    #[test]
    fn round_trip_is_deterministic_and_verified() {
        let dir = tempfile::tempdir().unwrap();
        let (k, pk) = key();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let ra = write(&a, &meta(), &mut entries(), &k).unwrap();
        let rb = write(&b, &meta(), &mut entries(), &k).unwrap();
        assert_eq!(ra, rb);
        let bl = read(&a, &[pk], 1_750_000_000).unwrap();
        assert_eq!(bl.entries.len(), 3);
        assert_eq!(bl.merkle_root, ra);
        assert_eq!(bl.entries[0].path, b"/");
        assert!(bl.find(b"/etc/passwd").is_some());
    }

    #[test]
    fn regression_unauthenticated_entry_count_of_2_pow_40_is_refused_without_preallocating() {
        // Found by fuzzing: `baseline show` without keys read an unsigned entry count and
        // reserved memory for it. Now the count only bounds what is read.
        let (k, _) = key();
        let header = Header {
            format_version: BASELINE_FORMAT_VERSION,
            hash_algorithm: HASH_ALGORITHM.into(),
            entry_count: 1 << 40,
            merkle_root: vec![0; 32],
            ..Default::default()
        };
        let signed = envelope::sign(header.encode_to_vec(), &k);
        let mut file = BASELINE_MAGIC.to_vec();
        file.extend(signed.encode_length_delimited_to_vec());
        let e = decode(file.as_slice(), Path::new("x"), None, 0).unwrap_err();
        assert!(
            e.to_string()
                .contains("says 1099511627776 entries but the file ends after 0"),
            "{e}"
        );
    }

    #[test]
    fn every_single_byte_flip_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (k, pk) = key();
        let f = dir.path().join("bl");
        write(&f, &meta(), &mut entries(), &k).unwrap();
        let good = std::fs::read(&f).unwrap();
        for i in 0..good.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                std::fs::write(&f, &bad).unwrap();
                assert!(
                    read(&f, &[pk], 1_750_000_000).is_err(),
                    "flip of bit {bit:#x} at byte {i} accepted"
                );
            }
        }
        for cut in 0..good.len() {
            std::fs::write(&f, &good[..cut]).unwrap();
            assert!(
                read(&f, &[pk], 1_750_000_000).is_err(),
                "truncation at {cut} accepted"
            );
        }
        let mut longer = good.clone();
        longer.extend_from_slice(&[0x02, 0x0a, 0x00]);
        std::fs::write(&f, &longer).unwrap();
        assert!(
            read(&f, &[pk], 1_750_000_000).is_err(),
            "appended record accepted"
        );
    }

    #[test]
    fn wrong_key_and_expiry_are_refused_with_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let (k, pk) = key();
        let (_, other) = key();
        let f = dir.path().join("bl");
        write(&f, &meta(), &mut entries(), &k).unwrap();
        let e = read(&f, &[other], 1_750_000_000).unwrap_err();
        assert!(e.to_string().contains("not among the trusted keys"), "{e}");
        let e = read(&f, &[pk], 1_900_000_000).unwrap_err();
        assert!(matches!(e, BaselineError::Expired { .. }), "{e}");
        assert!(e.to_string().contains("expired at 2027-01-15"), "{e}");
        std::fs::write(&f, b"hello").unwrap();
        assert!(matches!(
            read(&f, &[pk], 0),
            Err(BaselineError::NotABaseline(_))
        ));
    }
}
