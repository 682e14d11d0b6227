//! The signature envelope of a baseline header: Ed25519 over a domain-separated header.

use ring::signature::{self, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::v1::SignedHeader;

/// Prefix of the signed message, so a baseline signature can never be replayed as a signature
/// over anything else made with the same key.
pub const HEADER_SIGNING_CONTEXT: &[u8] = b"driftwatch baseline header v1\x00";

/// Length of a raw Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;

/// Why a signed header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the baseline is not signed")]
    Unsigned,
    #[error(
        "the baseline is signed by key {0}, which is not among the trusted keys (pass its public key with --trusted-key)"
    )]
    UntrustedKey(String),
    #[error("the baseline signature is invalid: the header was altered or signed by another key")]
    BadSignature,
}

/// A short, stable name for a public key: `ed25519:` and the first 16 bytes of its BLAKE3, hex.
pub fn key_fingerprint(public_key: &[u8]) -> String {
    let h = blake3::hash(public_key);
    let hex: String = h.as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("ed25519:{hex}")
}

fn signed_message(header: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER_SIGNING_CONTEXT.len() + header.len());
    m.extend_from_slice(HEADER_SIGNING_CONTEXT);
    m.extend_from_slice(header);
    m
}

/// Signs encoded header bytes.
pub fn sign(header: Vec<u8>, key: &Ed25519KeyPair) -> SignedHeader {
    let sig = key.sign(&signed_message(&header));
    SignedHeader {
        header,
        public_key: key.public_key().as_ref().to_vec(),
        signature: sig.as_ref().to_vec(),
    }
}

/// Verifies a signed header against a set of trusted raw Ed25519 public keys and returns the
/// trusted key that signed it.
pub fn verify<'k>(
    signed: &SignedHeader,
    trusted: &'k [[u8; PUBLIC_KEY_LEN]],
) -> Result<&'k [u8; PUBLIC_KEY_LEN], EnvelopeError> {
    if signed.signature.is_empty() && signed.public_key.is_empty() {
        return Err(EnvelopeError::Unsigned);
    }
    let key = trusted
        .iter()
        .find(|k| k[..] == signed.public_key[..])
        .ok_or_else(|| EnvelopeError::UntrustedKey(key_fingerprint(&signed.public_key)))?;
    UnparsedPublicKey::new(&signature::ED25519, key)
        .verify(&signed_message(&signed.header), &signed.signature)
        .map_err(|_| EnvelopeError::BadSignature)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn keypair() -> Ed25519KeyPair {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap()
    }

    fn raw(k: &Ed25519KeyPair) -> [u8; 32] {
        k.public_key().as_ref().try_into().unwrap()
    }

    #[test]
    fn signature_round_trip_and_tamper_detection() {
        let k = keypair();
        let trusted = [raw(&k)];
        let mut s = sign(b"header bytes".to_vec(), &k);
        assert!(verify(&s, &trusted).is_ok());
        s.header[0] ^= 1;
        assert_eq!(verify(&s, &trusted), Err(EnvelopeError::BadSignature));
    }

    #[test]
    fn unknown_and_missing_keys_are_named() {
        let k = keypair();
        let other = keypair();
        let s = sign(b"h".to_vec(), &k);
        match verify(&s, &[raw(&other)]) {
            Err(EnvelopeError::UntrustedKey(fp)) => assert_eq!(fp, key_fingerprint(&raw(&k))),
            r => panic!("unexpected {r:?}"),
        }
        let unsigned = SignedHeader {
            header: b"h".to_vec(),
            ..Default::default()
        };
        assert_eq!(verify(&unsigned, &[raw(&k)]), Err(EnvelopeError::Unsigned));
    }

    #[test]
    fn a_signature_from_a_trusted_key_cannot_be_moved_to_another_key_slot() {
        let k = keypair();
        let other = keypair();
        let mut s = sign(b"h".to_vec(), &k);
        s.public_key = raw(&other).to_vec();
        assert_eq!(
            verify(&s, &[raw(&k), raw(&other)]),
            Err(EnvelopeError::BadSignature)
        );
    }
}
