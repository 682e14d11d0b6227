//! The Merkle root of a baseline.
//!
//! Every entry contributes a *leaf*: the BLAKE3 (derive-key mode, context [`LEAF_CONTEXT`]) of
//! its canonical encoding, i.e. the exact record bytes stored in the baseline file. Every
//! directory is a *node* whose hash (context [`NODE_CONTEXT`]) covers, in order:
//!
//! - one byte `1` and its own leaf, or one byte `0` if the directory has no entry of its own
//!   (an ancestor of included paths that the policy itself excludes);
//! - for each child in ascending raw-name order: the name length as u32 little-endian, the
//!   name, and the child's hash (its node hash if it has children, else its leaf hash is wrapped
//!   as a node with no children).
//!
//! The root is the node hash of `/`. Two parties compare one root; when roots differ, node
//! hashes narrow the difference to subtrees.

use std::sync::OnceLock;

use blake3::hazmat::{self, HasherExt};

use crate::Hash;
use crate::path::{self, PathError};

/// BLAKE3 derive-key context for entry leaves.
pub const LEAF_CONTEXT: &str = "driftwatch 2026-11 baseline entry leaf v1";
/// BLAKE3 derive-key context for directory nodes.
pub const NODE_CONTEXT: &str = "driftwatch 2026-11 baseline tree node v1";

/// Why a set of leaves has no Merkle root.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MerkleError {
    #[error("invalid path {path:?}: {source}")]
    BadPath { path: String, source: PathError },
    #[error("duplicate path {0:?}")]
    Duplicate(String),
}

/// A derive-key hasher for `context` whose context key is computed once per process
/// (`new_derive_key` hashes the context string on every call: a third of a leaf's cost).
fn derive_key_hasher(
    context: &'static str,
    key: &'static OnceLock<hazmat::ContextKey>,
) -> blake3::Hasher {
    blake3::Hasher::new_from_context_key(
        key.get_or_init(|| hazmat::hash_derive_key_context(context)),
    )
}

static LEAF_KEY: OnceLock<hazmat::ContextKey> = OnceLock::new();
static NODE_KEY: OnceLock<hazmat::ContextKey> = OnceLock::new();

/// The leaf hash of one entry, from its canonical (record) encoding.
pub fn leaf_hash(encoded_entry: &[u8]) -> Hash {
    let mut h = derive_key_hasher(LEAF_CONTEXT, &LEAF_KEY);
    h.update(encoded_entry);
    *h.finalize().as_bytes()
}

struct Frame {
    path: Vec<u8>,
    hasher: blake3::Hasher,
}

impl Frame {
    fn new(path: &[u8], leaf: Option<&Hash>) -> Self {
        let mut hasher = derive_key_hasher(NODE_CONTEXT, &NODE_KEY);
        match leaf {
            Some(l) => {
                hasher.update(&[1]);
                hasher.update(l);
            }
            None => {
                hasher.update(&[0]);
            }
        }
        Frame {
            path: path.to_vec(),
            hasher,
        }
    }
}

/// Computes the Merkle root of `(path, leaf)` pairs given in any order.
///
/// An empty set has the root of an empty, entry-less `/`.
pub fn root<'a>(leaves: impl IntoIterator<Item = (&'a [u8], Hash)>) -> Result<Hash, MerkleError> {
    let given: Vec<(&[u8], Hash)> = leaves.into_iter().collect();
    for (p, _) in &given {
        path::validate(p).map_err(|source| MerkleError::BadPath {
            path: String::from_utf8_lossy(p).into_owned(),
            source,
        })?;
    }
    // Baselines give their entries in byte order, which is tree order except around names with
    // bytes below '/': a stable sort merges such presorted runs cheaply (a quarter of the
    // comparisons of an unstable one here), and sorting references keeps its scratch small.
    let mut items: Vec<&(&[u8], Hash)> = given.iter().collect();
    items.sort_by(|a, b| path::tree_order(a.0, b.0));
    if let Some(w) = items.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(MerkleError::Duplicate(
            String::from_utf8_lossy(w[0].0).into_owned(),
        ));
    }

    let mut stack: Vec<Frame> = Vec::new();
    let mut iter = items.iter().peekable();
    match iter.peek() {
        Some((p, leaf)) if *p == b"/" => {
            stack.push(Frame::new(b"/", Some(leaf)));
            iter.next();
        }
        _ => stack.push(Frame::new(b"/", None)),
    }
    for (p, leaf) in iter {
        // Close every open directory that is not an ancestor of this path.
        while let Some(top) = stack.last() {
            if path::is_ancestor(&top.path, p) {
                break;
            }
            close_top(&mut stack);
        }
        // Open the implicit directories between the deepest open ancestor and this path.
        let open_len = stack.last().map_or(0, |f| f.path.len());
        let mut cut = open_len;
        while let Some(i) = p[cut + 1..].iter().position(|&b| b == b'/') {
            cut += 1 + i;
            stack.push(Frame::new(&p[..cut], None));
        }
        stack.push(Frame::new(p, Some(leaf)));
    }
    while stack.len() > 1 {
        close_top(&mut stack);
    }
    // The loop leaves the root frame; it always exists.
    Ok(stack
        .pop()
        .map(|f| *f.hasher.finalize().as_bytes())
        .unwrap_or([0; 32]))
}

fn close_top(stack: &mut Vec<Frame>) {
    if stack.len() < 2 {
        return;
    }
    if let Some(done) = stack.pop() {
        let hash = done.hasher.finalize();
        let name = path::file_name(&done.path);
        if let Some(parent) = stack.last_mut() {
            parent.hasher.update(&(name.len() as u32).to_le_bytes());
            parent.hasher.update(name);
            parent.hasher.update(hash.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(s: &str) -> Hash {
        leaf_hash(s.as_bytes())
    }

    fn node(own: Option<Hash>, children: &[(&[u8], Hash)]) -> Hash {
        let mut h = blake3::Hasher::new_derive_key(NODE_CONTEXT);
        match own {
            Some(l) => {
                h.update(&[1]);
                h.update(&l);
            }
            None => {
                h.update(&[0]);
            }
        }
        for (name, hash) in children {
            h.update(&(name.len() as u32).to_le_bytes());
            h.update(name);
            h.update(hash);
        }
        *h.finalize().as_bytes()
    }

    #[test]
    fn leaf_hash_is_blake3_derive_key_of_the_record() {
        for record in [&b""[..], b"x", &[7u8; 3000]] {
            let mut h = blake3::Hasher::new_derive_key(LEAF_CONTEXT);
            h.update(record);
            assert_eq!(leaf_hash(record), *h.finalize().as_bytes());
        }
    }

    #[test]
    fn root_matches_a_hand_built_tree() {
        let entries: Vec<(&[u8], Hash)> = vec![
            (b"/etc/passwd", leaf("passwd")),
            (b"/", leaf("root")),
            (b"/etc", leaf("etc")),
            (b"/etc.d", leaf("etc.d")),
            (b"/usr/bin/ls", leaf("ls")), // /usr and /usr/bin are implicit
        ];
        let got = root(entries).unwrap();
        let etc = node(
            Some(leaf("etc")),
            &[(b"passwd", node(Some(leaf("passwd")), &[]))],
        );
        let bin = node(None, &[(b"ls", node(Some(leaf("ls")), &[]))]);
        let usr = node(None, &[(b"bin", bin)]);
        let want = node(
            Some(leaf("root")),
            &[
                (b"etc", etc),
                (b"etc.d", node(Some(leaf("etc.d")), &[])),
                (b"usr", usr),
            ],
        );
        assert_eq!(got, want);
    }

    #[test]
    fn root_is_independent_of_input_order_and_sensitive_to_every_leaf() {
        let a: Vec<(&[u8], Hash)> =
            vec![(b"/a", leaf("1")), (b"/a/x", leaf("2")), (b"/b", leaf("3"))];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(root(a.clone()).unwrap(), root(b).unwrap());
        let mut c = a.clone();
        c[1].1 = leaf("changed");
        assert_ne!(root(a.clone()).unwrap(), root(c).unwrap());
        // Moving a leaf to another directory changes the root even with the same name.
        let d: Vec<(&[u8], Hash)> =
            vec![(b"/a", leaf("1")), (b"/b/x", leaf("2")), (b"/b", leaf("3"))];
        assert_ne!(root(a).unwrap(), root(d).unwrap());
    }

    #[test]
    fn duplicates_and_bad_paths_are_refused() {
        let dup: Vec<(&[u8], Hash)> = vec![(b"/a", leaf("1")), (b"/a", leaf("2"))];
        assert!(matches!(root(dup), Err(MerkleError::Duplicate(_))));
        let bad: Vec<(&[u8], Hash)> = vec![(b"a/b", leaf("1"))];
        assert!(matches!(root(bad), Err(MerkleError::BadPath { .. })));
    }
}
