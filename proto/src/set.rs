//! A host's violation set as both ends of the report stream see it: the key of each item and
//! the digest of the whole set.
//!
//! The agent sends changes to its set with the digest of the set after the change; the
//! collector applies them and recomputes the digest from what it stored. Both must agree byte
//! for byte, so the digest is defined here, over values only:
//!
//! - each item contributes `item_hash` = BLAKE3 (derive-key [`ITEM_CONTEXT`]) of its protobuf
//!   encoding (prost encodes a message deterministically: fields in number order, no maps in
//!   [`DriftItem`]);
//! - the set digest is BLAKE3 (derive-key [`SET_CONTEXT`]) over the items in ascending key
//!   order, each as key length (u32 little-endian), key, item hash.
//!
//! The empty set has a digest too (of no items), so "clean" is a digest like any other.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use prost::Message;

use crate::Hash;
use crate::v1::{DriftItem, Violation};

/// BLAKE3 derive-key context for one item's hash.
pub const ITEM_CONTEXT: &str = "driftwatch 2026-11 drift item v1";
/// BLAKE3 derive-key context for the set digest.
pub const SET_CONTEXT: &str = "driftwatch 2026-11 drift set v1";

/// Key of a file violation: `f\0` + the raw path.
pub fn file_key(path: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(path.len() + 2);
    k.extend_from_slice(b"f\0");
    k.extend_from_slice(path);
    k
}

/// Key of a package drift item: `p\0` + name + `\0` + arch.
pub fn package_key(name: &str, arch: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + arch.len() + 3);
    k.extend_from_slice(b"p\0");
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(arch.as_bytes());
    k
}

/// The hash an item contributes to its set's digest.
pub fn item_hash(item: &DriftItem) -> Hash {
    item_hash_of_encoded(&item.encode_to_vec())
}

/// The item hasher right after keying with [`ITEM_CONTEXT`]: deriving the key hashes the
/// context string, which for a small item cost as much as hashing the item itself, so it is
/// done once and the keyed state cloned per item (same bytes out).
static ITEM_HASHER: LazyLock<blake3::Hasher> =
    LazyLock::new(|| blake3::Hasher::new_derive_key(ITEM_CONTEXT));

/// [`item_hash`] of an already encoded item (the collector stores items encoded).
pub fn item_hash_of_encoded(encoded: &[u8]) -> Hash {
    let mut h = ITEM_HASHER.clone();
    h.update(encoded);
    *h.finalize().as_bytes()
}

/// Incremental set digest: feed (key, item hash) pairs in strictly ascending key order.
#[derive(Debug, Clone)]
pub struct SetDigest {
    hasher: blake3::Hasher,
    /// The previous key (its buffer reused), `None` before the first push.
    last_key: Option<Vec<u8>>,
}

/// A key arrived out of order (or twice): the caller's iteration is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("set digest keys must be strictly ascending")]
pub struct KeyOrderError;

impl Default for SetDigest {
    fn default() -> Self {
        Self::new()
    }
}

impl SetDigest {
    pub fn new() -> Self {
        SetDigest {
            hasher: blake3::Hasher::new_derive_key(SET_CONTEXT),
            last_key: None,
        }
    }

    /// Add one item. Keys must be strictly ascending (bytewise).
    pub fn push(&mut self, key: &[u8], item_hash: &Hash) -> Result<(), KeyOrderError> {
        if let Some(last) = &self.last_key
            && last.as_slice() >= key
        {
            return Err(KeyOrderError);
        }
        let len = u32::try_from(key.len()).map_err(|_| KeyOrderError)?;
        self.hasher.update(&len.to_le_bytes());
        self.hasher.update(key);
        self.hasher.update(item_hash);
        match &mut self.last_key {
            Some(last) => {
                last.clear();
                last.extend_from_slice(key);
            }
            None => self.last_key = Some(key.to_vec()),
        }
        Ok(())
    }

    pub fn finish(&self) -> Hash {
        *self.hasher.finalize().as_bytes()
    }
}

/// Digest of a set given as key → item hash (a BTreeMap iterates in key order).
pub fn set_digest(items: &BTreeMap<Vec<u8>, Hash>) -> Hash {
    let mut d = SetDigest::new();
    for (k, h) in items {
        // BTreeMap keys are unique and ascending: push cannot fail.
        let _ = d.push(k, h);
    }
    d.finish()
}

/// Checks a received item: its key must be the one its content implies (a peer cannot file a
/// violation of one path under the key of another).
pub fn key_matches(item: &DriftItem) -> bool {
    use crate::v1::drift_item::Item;
    match &item.item {
        Some(Item::File(Violation { path, .. })) => item.key == file_key(path),
        Some(Item::Package(p)) => item.key == package_key(&p.name, &p.arch),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{PackageDrift, drift_item::Item};

    fn file(path: &[u8]) -> DriftItem {
        DriftItem {
            key: file_key(path),
            item: Some(Item::File(Violation {
                path: path.to_vec(),
                kind: 3,
                ..Default::default()
            })),
        }
    }

    #[test]
    fn digest_depends_on_content_not_insertion_order() {
        let a = file(b"/etc/passwd");
        let b = file(b"/usr/bin/\xff\n");
        let mut m1 = BTreeMap::new();
        m1.insert(a.key.clone(), item_hash(&a));
        m1.insert(b.key.clone(), item_hash(&b));
        let mut m2 = BTreeMap::new();
        m2.insert(b.key.clone(), item_hash(&b));
        m2.insert(a.key.clone(), item_hash(&a));
        assert_eq!(set_digest(&m1), set_digest(&m2));

        let mut changed = b.clone();
        if let Some(Item::File(v)) = &mut changed.item {
            v.kind = 1;
        }
        m2.insert(changed.key.clone(), item_hash(&changed));
        assert_ne!(set_digest(&m1), set_digest(&m2));
        assert_ne!(set_digest(&BTreeMap::new()), set_digest(&m1));
    }

    #[test]
    fn item_hash_is_the_derive_key_hash_of_the_encoding() {
        // The cached keyed state must give exactly what deriving the key afresh gives.
        for item in [file(b"/etc/passwd"), file(b""), file(&[0xff; 300])] {
            let encoded = item.encode_to_vec();
            let fresh = blake3::Hasher::new_derive_key(ITEM_CONTEXT)
                .update(&encoded)
                .finalize();
            assert_eq!(item_hash(&item), *fresh.as_bytes());
        }
    }

    #[test]
    fn pushes_after_a_long_key_compare_against_the_last_key_only() {
        let mut d = SetDigest::new();
        d.push(b"a-long-first-key", &[0; 32]).unwrap();
        d.push(b"b", &[0; 32]).unwrap();
        d.push(b"ba", &[0; 32]).unwrap();
        assert_eq!(d.push(b"b", &[0; 32]), Err(KeyOrderError));
        let mut m = BTreeMap::new();
        for k in [&b"a-long-first-key"[..], b"b", b"ba"] {
            m.insert(k.to_vec(), [0; 32]);
        }
        assert_eq!(d.finish(), set_digest(&m));
    }

    #[test]
    fn keys_must_ascend() {
        let mut d = SetDigest::new();
        d.push(b"b", &[0; 32]).unwrap();
        assert_eq!(d.push(b"a", &[0; 32]), Err(KeyOrderError));
        assert_eq!(d.push(b"b", &[0; 32]), Err(KeyOrderError));
    }

    #[test]
    fn key_must_match_content() {
        let mut f = file(b"/etc/shadow");
        assert!(key_matches(&f));
        f.key = file_key(b"/etc/other");
        assert!(!key_matches(&f));
        let p = DriftItem {
            key: package_key("openssl", "amd64"),
            item: Some(Item::Package(PackageDrift {
                name: "openssl".into(),
                arch: "amd64".into(),
                ..Default::default()
            })),
        };
        assert!(key_matches(&p));
        // A package key can never collide with a file key: paths start with '/', and the
        // prefixes differ.
        assert_ne!(file_key(b"p"), package_key("", ""));
    }
}
