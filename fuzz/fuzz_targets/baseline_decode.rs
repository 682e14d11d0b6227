//! Fuzzes `baseline::decode`, the reader of baseline files (untrusted bytes from disk).
//!
//! Every input is decoded twice: without trusted keys (integrity checks only, so mutated
//! headers get past the signature and reach the entry and Merkle code) and with the fixed key
//! that signed the seeds in `fuzz/seeds/baseline_decode/` (so mutations of the entries of a
//! correctly signed header exercise the verified path). Neither may panic, hang or allocate
//! without bound, and whatever is accepted must satisfy the documented invariants.
#![no_main]

use std::path::Path;

use driftwatch_agent::baseline::{self, Baseline};
use libfuzzer_sys::fuzz_target;

/// Raw Ed25519 public key of `fuzz/seeds/fuzz-signing-key.pub`, which signed the seeds.
const SEED_KEY: [u8; 32] = [
    0x7c, 0x67, 0x63, 0xf2, 0x2b, 0x9d, 0xa7, 0xcb, 0xfb, 0xc3, 0xdc, 0x6e, 0xd6, 0xdb, 0x68, 0x6d,
    0xd9, 0x33, 0xd8, 0xd8, 0x71, 0x87, 0xe0, 0x83, 0x77, 0x7a, 0x80, 0x36, 0x08, 0xdd, 0xa3, 0x4e,
];

/// A fixed "now" (2027-01-15) so that expiry is checked, and checked deterministically.
const NOW: i64 = 1_800_000_000;

fn check_invariants(b: &Baseline) {
    assert_eq!(b.entries.len() as u64, b.header.entry_count);
    assert_eq!(b.header.merkle_root.as_slice(), b.merkle_root.as_slice());
    assert!(
        b.entries.windows(2).all(|w| w[0].path < w[1].path),
        "entries are not strictly ascending"
    );
    for (i, e) in b.entries.iter().enumerate() {
        assert_eq!(b.find(&e.path), Some(i));
        assert!(e.content_hash.is_empty() || e.content_hash.len() == 32);
        assert!(
            e.packages
                .iter()
                .all(|&p| (p as usize) < b.header.packages.len()),
            "an entry names a package the header does not list"
        );
    }
    if let Some(exp) = b.header.expires_unix {
        assert!(exp >= NOW, "an expired baseline was accepted");
    }
}

fuzz_target!(|data: &[u8]| {
    let name = Path::new("fuzz.dwb");
    let unauthenticated = baseline::decode(data, name, None, NOW);
    match &unauthenticated {
        Ok(b) => check_invariants(b),
        // Error messages are shown to people: rendering them must not panic either.
        Err(e) => drop(e.to_string()),
    }
    let trusted = [SEED_KEY];
    match baseline::decode(data, name, Some(&trusted), NOW) {
        Ok(b) => {
            check_invariants(&b);
            let u = unauthenticated
                .as_ref()
                .expect("accepted with a trusted key but refused without one");
            assert_eq!(u.merkle_root, b.merkle_root);
            assert_eq!(u.entries, b.entries);
            assert_eq!(u.header, b.header);
            assert_eq!(u.signer, b.signer);
        }
        Err(e) => drop(e.to_string()),
    }
});
