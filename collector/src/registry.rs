//! The image registry's pure parts: checking a pushed baseline header, the version order of an
//! image's baselines, and the per-image view of the fleet (consensus, outliers, likely image
//! defects).
//!
//! What a push records is exactly what the image pipeline's signature covers: the baseline's
//! `SignedHeader` (image id, version, Merkle root, expiry). The entries are not needed — the
//! root commits to them, and agents verify them against it — so `driftwatch baseline push`
//! sends the signed header only, and [`verify_push`] checks the signature against the
//! collector's trusted keys before anything of it is believed.
//!
//! **Version order** ([`compare_versions`]): versions are split at `.` and `-`; parts are
//! compared left to right, two all-digit parts as numbers (`2026.11.10` > `2026.11.9`), any
//! other pair as bytes, a numeric part before a non-numeric one; when one version is a prefix
//! of the other, the shorter is older (`1.2` < `1.2.0` < `1.2.0-rc1`). A push is refused unless
//! its version is newer than the newest registered one for the image id.
//!
//! No I/O here: the trusted keys are loaded by the configuration (`crate::config`).

use std::cmp::Ordering;
use std::collections::BTreeSet;

use driftwatch_proto::v1::{Header, SignedHeader};
use driftwatch_proto::{BASELINE_FORMAT_VERSION, HASH_ALGORITHM, envelope};
use prost::Message;

/// Largest signed header accepted in a push (the agent's own limit).
pub const MAX_SIGNED_HEADER_BYTES: usize = 16 << 20;

/// A path drifted on more than this share of an image's hosts is a likely image defect.
pub const DEFAULT_IMAGE_DEFECT_RATIO: f64 = 0.5;

/// …and on at least this many of them.
pub const MIN_DEFECT_HOSTS: usize = 3;

/// Compares two versions in the registry's order (module doc).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let parts = |s: &str| -> Vec<String> { s.split(['.', '-']).map(str::to_owned).collect() };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let num = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        let o = match (num(x), num(y)) {
            (true, true) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (false, false) => x.as_bytes().cmp(y.as_bytes()),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Why a pushed baseline was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    #[error("the signed header is larger than {MAX_SIGNED_HEADER_BYTES} bytes")]
    TooLarge,
    #[error("not a baseline signed header: {0}")]
    Malformed(String),
    #[error(transparent)]
    Signature(#[from] envelope::EnvelopeError),
    #[error("the collector has no trusted keys (set trusted_keys in its configuration)")]
    NoTrustedKeys,
    #[error(
        "baseline format version {0} is not supported (this collector reads {BASELINE_FORMAT_VERSION})"
    )]
    UnsupportedVersion(u32),
    #[error("content hash algorithm {0:?} is not supported")]
    UnsupportedAlgorithm(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the baseline expired at Unix time {0}")]
    Expired(i64),
}

/// A pushed baseline whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedBaseline {
    pub image_id: String,
    pub image_version: String,
    pub merkle_root: [u8; 32],
    /// Fingerprint of the trusted key that signed it.
    pub signer: String,
    pub created_unix: i64,
    pub expires_unix: Option<i64>,
    pub entry_count: u64,
}

fn check_name(what: &str, s: &str) -> Result<(), PushError> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'+' | b':'));
    if ok {
        Ok(())
    } else {
        Err(PushError::Invalid(format!(
            "{what} must be 1–128 characters of [A-Za-z0-9._+:-]"
        )))
    }
}

/// Checks an encoded `SignedHeader`: signature by a trusted key first, then the header's
/// format, algorithm, names, root and expiry at `now_unix`.
pub fn verify_push(
    signed_header: &[u8],
    trusted: &[[u8; 32]],
    now_unix: i64,
) -> Result<VerifiedBaseline, PushError> {
    if signed_header.len() > MAX_SIGNED_HEADER_BYTES {
        return Err(PushError::TooLarge);
    }
    if trusted.is_empty() {
        return Err(PushError::NoTrustedKeys);
    }
    let signed =
        SignedHeader::decode(signed_header).map_err(|e| PushError::Malformed(e.to_string()))?;
    let key = envelope::verify(&signed, trusted)?;
    let header = Header::decode(signed.header.as_slice())
        .map_err(|e| PushError::Malformed(e.to_string()))?;
    if header.format_version != BASELINE_FORMAT_VERSION {
        return Err(PushError::UnsupportedVersion(header.format_version));
    }
    if header.hash_algorithm != HASH_ALGORITHM {
        return Err(PushError::UnsupportedAlgorithm(header.hash_algorithm));
    }
    check_name("the image id", &header.image_id)?;
    check_name("the image version", &header.image_version)?;
    let merkle_root: [u8; 32] = header
        .merkle_root
        .as_slice()
        .try_into()
        .map_err(|_| PushError::Invalid("the Merkle root is not 32 bytes".into()))?;
    if let Some(exp) = header.expires_unix
        && now_unix > exp
    {
        return Err(PushError::Expired(exp));
    }
    Ok(VerifiedBaseline {
        image_id: header.image_id,
        image_version: header.image_version,
        merkle_root,
        signer: envelope::key_fingerprint(key),
        created_unix: header.created_unix,
        expires_unix: header.expires_unix,
        entry_count: header.entry_count,
    })
}

/// A live host as the image view sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMember {
    pub host_id: String,
    pub baseline_root: Vec<u8>,
    /// Paths of its open file drift (acknowledged or not).
    pub drifted_paths: BTreeSet<Vec<u8>>,
    /// Whether it has any open drift (files or packages).
    pub drifted: bool,
}

/// Why a host is an outlier of its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    pub host_id: String,
    /// The host's root is not the registered one (or nothing is registered).
    pub other_root: bool,
    /// Open drift beyond the image's likely defects.
    pub drift: bool,
}

/// A path drifted on most hosts of an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDefect {
    pub path: Vec<u8>,
    pub hosts: usize,
}

/// One image's hosts split into consensus and outliers, and its likely defects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageAnalysis {
    /// Hosts on the registered root with no drift beyond the defects.
    pub consensus: Vec<String>,
    pub outliers: Vec<Outlier>,
    pub defects: Vec<ImageDefect>,
}

/// Whether a path drifted on `hosts` of an image's `members` is a likely defect: on more than
/// `ratio` of them and on at least [`MIN_DEFECT_HOSTS`].
pub fn is_defect(hosts: usize, members: usize, ratio: f64) -> bool {
    hosts >= MIN_DEFECT_HOSTS && (hosts as f64) > ratio * members as f64
}

/// Paths drifted on more than `ratio` of `members` and on at least [`MIN_DEFECT_HOSTS`].
pub fn image_defects(members: &[ImageMember], ratio: f64) -> Vec<ImageDefect> {
    defects_of(
        members
            .iter()
            .map(|m| m.drifted_paths.iter().map(Vec::as_slice)),
        ratio,
    )
}

/// [`image_defects`] of members given as each one's drifted paths (each path once per member),
/// borrowed: copying each path was a large part of counting a whole image's (the reconciler
/// confirms its candidate paths with it, `reconcile::RoundMemo`). Sorted by path.
pub fn defects_of<'a, M, P>(members: M, ratio: f64) -> Vec<ImageDefect>
where
    M: IntoIterator<Item = P>,
    P: IntoIterator<Item = &'a [u8]>,
{
    // foldhash, not SipHash: with a whole image's paths, hashing them was most of the count.
    // The paths come from enrolled agents only, and the seed is random per process.
    let mut counts: foldhash::HashMap<&[u8], usize> = foldhash::HashMap::default();
    let mut total = 0usize;
    for m in members {
        total += 1;
        for p in m {
            *counts.entry(p).or_default() += 1;
        }
    }
    let mut out: Vec<ImageDefect> = counts
        .into_iter()
        .filter(|(_, n)| is_defect(*n, total, ratio))
        .map(|(p, n)| ImageDefect {
            path: p.to_vec(),
            hosts: n,
        })
        .collect();
    out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Splits an image's live hosts into consensus and outliers against the registered root.
pub fn analyse_image(
    members: &[ImageMember],
    registered_root: Option<&[u8]>,
    ratio: f64,
) -> ImageAnalysis {
    let defects = image_defects(members, ratio);
    let defect_paths: BTreeSet<&[u8]> = defects.iter().map(|d| d.path.as_slice()).collect();
    let mut consensus = Vec::new();
    let mut outliers = Vec::new();
    for m in members {
        let other_root = registered_root != Some(m.baseline_root.as_slice());
        // Drift that is only the image's defects does not make a host an outlier; package
        // drift (not in `drifted_paths`) always does.
        let beyond_defects = m
            .drifted_paths
            .iter()
            .any(|p| !defect_paths.contains(p.as_slice()));
        let drift = m.drifted && (beyond_defects || m.drifted_paths.is_empty());
        if other_root || drift {
            outliers.push(Outlier {
                host_id: m.host_id.clone(),
                other_root,
                drift,
            });
        } else {
            consensus.push(m.host_id.clone());
        }
    }
    ImageAnalysis {
        consensus,
        outliers,
        defects,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    #[test]
    fn version_order() {
        use Ordering::*;
        for (a, b, want) in [
            ("2026.11.10", "2026.11.9", Greater),
            ("2026.11.1", "2026.11.1", Equal),
            ("1.2", "1.2.0", Less),
            ("1.2.0", "1.2.0-rc1", Less),
            ("1.10", "1.9", Greater),
            ("01.2", "1.2", Equal),
            ("1.a", "1.b", Less),
            ("1.2", "1.a", Less),
            ("2", "10", Less),
            ("v2", "v10", Greater), // non-numeric parts compare as bytes
            ("99999999999999999999999999999999999999999", "1", Greater),
        ] {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), want.reverse(), "{b} vs {a}");
        }
    }

    fn keypair() -> Ed25519KeyPair {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn header(image: &str, version: &str) -> Header {
        Header {
            format_version: BASELINE_FORMAT_VERSION,
            image_id: image.into(),
            image_version: version.into(),
            created_unix: 1_700_000_000,
            merkle_root: vec![7; 32],
            hash_algorithm: HASH_ALGORITHM.into(),
            entry_count: 3,
            ..Default::default()
        }
    }

    fn signed(h: &Header, k: &Ed25519KeyPair) -> Vec<u8> {
        envelope::sign(h.encode_to_vec(), k).encode_to_vec()
    }

    #[test]
    fn push_is_verified_against_trusted_keys() {
        let k = keypair();
        let trusted = [<[u8; 32]>::try_from(k.public_key().as_ref()).unwrap()];
        let ok = verify_push(&signed(&header("web", "1.0"), &k), &trusted, 0).unwrap();
        assert_eq!(ok.image_id, "web");
        assert_eq!(ok.image_version, "1.0");
        assert_eq!(ok.merkle_root, [7; 32]);
        assert_eq!(ok.signer, envelope::key_fingerprint(&trusted[0]));

        let other = keypair();
        assert!(matches!(
            verify_push(&signed(&header("web", "1.0"), &other), &trusted, 0),
            Err(PushError::Signature(envelope::EnvelopeError::UntrustedKey(
                _
            )))
        ));
        let mut tampered = envelope::sign(header("web", "1.0").encode_to_vec(), &k);
        tampered.header[3] ^= 1;
        assert!(matches!(
            verify_push(&tampered.encode_to_vec(), &trusted, 0),
            Err(PushError::Signature(_) | PushError::Malformed(_))
        ));
        assert_eq!(
            verify_push(&signed(&header("web", "1.0"), &k), &[], 0),
            Err(PushError::NoTrustedKeys)
        );
        assert!(matches!(
            verify_push(b"\xff\xff\xff", &trusted, 0),
            Err(PushError::Malformed(_))
        ));
        let mut h = header("web", "1.0");
        h.expires_unix = Some(100);
        assert_eq!(
            verify_push(&signed(&h, &k), &trusted, 101),
            Err(PushError::Expired(100))
        );
        let mut h = header("web", "1.0");
        h.merkle_root = vec![1; 5];
        assert!(matches!(
            verify_push(&signed(&h, &k), &trusted, 0),
            Err(PushError::Invalid(_))
        ));
        assert!(matches!(
            verify_push(&signed(&header("we b\n", "1"), &k), &trusted, 0),
            Err(PushError::Invalid(_))
        ));
        let mut h = header("web", "1.0");
        h.format_version = 9;
        assert_eq!(
            verify_push(&signed(&h, &k), &trusted, 0),
            Err(PushError::UnsupportedVersion(9))
        );
    }

    fn member(id: &str, root: u8, paths: &[&str]) -> ImageMember {
        ImageMember {
            host_id: id.into(),
            baseline_root: vec![root; 32],
            drifted_paths: paths.iter().map(|p| p.as_bytes().to_vec()).collect(),
            drifted: !paths.is_empty(),
        }
    }

    #[test]
    fn a_path_drifted_on_most_hosts_is_an_image_defect() {
        let members = vec![
            member("a", 1, &["/etc/motd"]),
            member("b", 1, &["/etc/motd"]),
            member("c", 1, &["/etc/motd", "/etc/passwd"]),
            member("d", 1, &[]),
            member("e", 2, &[]),
        ];
        let a = analyse_image(&members, Some(&[1; 32]), 0.5);
        assert_eq!(
            a.defects,
            [ImageDefect {
                path: b"/etc/motd".to_vec(),
                hosts: 3
            }]
        );
        assert_eq!(a.consensus, ["a", "b", "d"]);
        assert_eq!(
            a.outliers,
            [
                Outlier {
                    host_id: "c".into(),
                    other_root: false,
                    drift: true
                },
                Outlier {
                    host_id: "e".into(),
                    other_root: true,
                    drift: false
                }
            ]
        );
        // 3 of 6 is not more than half.
        let mut six = members.clone();
        six.push(member("f", 1, &[]));
        assert!(image_defects(&six, 0.5).is_empty());
        // 2 of 3 is most, but fewer than three hosts never make a defect.
        let three = vec![
            member("a", 1, &["/x"]),
            member("b", 1, &["/x"]),
            member("c", 1, &[]),
        ];
        assert!(image_defects(&three, 0.5).is_empty());
        // Nothing registered: everyone is an outlier by root.
        let a = analyse_image(&members, None, 0.5);
        assert!(a.consensus.is_empty());
        assert!(a.outliers.iter().all(|o| o.other_root));
    }

    #[test]
    fn package_drift_alone_makes_an_outlier() {
        let mut m = member("p", 1, &[]);
        m.drifted = true;
        let a = analyse_image(&[m], Some(&[1; 32]), 0.5);
        assert!(a.outliers[0].drift);
    }
}
