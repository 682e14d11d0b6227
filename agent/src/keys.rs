//! Ed25519 signing keys for baselines, as standard PEM files: the private key is PKCS#8
//! ("PRIVATE KEY", as `openssl genpkey -algorithm ed25519` writes it), the public key is
//! SubjectPublicKeyInfo ("PUBLIC KEY", as `openssl pkey -pubout` writes it).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the raw key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("refusing to overwrite existing {0}")]
    Exists(PathBuf),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read key {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} is not an Ed25519 {what}")]
    NotEd25519 { path: PathBuf, what: &'static str },
    #[error("key generation failed")]
    Generate,
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(line));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

fn create_new(path: &Path, mode: u32, data: &str) -> Result<(), KeyError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => KeyError::Exists(path.to_path_buf()),
            _ => KeyError::Write {
                path: path.to_path_buf(),
                source,
            },
        })?;
    // The umask may have narrowed the mode; never widen it beyond what was asked.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|_| f.write_all(data.as_bytes()))
        .and_then(|_| f.sync_all())
        .map_err(|source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        })
}

/// Paths of a key pair made with `--out PREFIX`.
pub fn key_paths(prefix: &Path) -> (PathBuf, PathBuf) {
    let mut private = prefix.as_os_str().to_owned();
    private.push(".key");
    let mut public = prefix.as_os_str().to_owned();
    public.push(".pub");
    (PathBuf::from(private), PathBuf::from(public))
}

/// Generates a key pair at `PREFIX.key` (0600) and `PREFIX.pub`; refuses to overwrite either.
/// Returns the public key's fingerprint.
pub fn generate(prefix: &Path) -> Result<(PathBuf, PathBuf, String), KeyError> {
    let (private, public) = key_paths(prefix);
    for p in [&private, &public] {
        if p.symlink_metadata().is_ok() {
            return Err(KeyError::Exists(p.clone()));
        }
    }
    let doc =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Generate)?;
    let pair = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|_| KeyError::Generate)?;
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(pair.public_key().as_ref());
    create_new(&private, 0o600, &pem("PRIVATE KEY", doc.as_ref()))?;
    if let Err(e) = create_new(&public, 0o644, &pem("PUBLIC KEY", &spki)) {
        let _ = std::fs::remove_file(&private);
        return Err(e);
    }
    Ok((
        private,
        public,
        driftwatch_proto::envelope::key_fingerprint(pair.public_key().as_ref()),
    ))
}

/// Loads a PKCS#8 PEM Ed25519 private key.
pub fn load_private(path: &Path) -> Result<Ed25519KeyPair, KeyError> {
    let der = PrivatePkcs8KeyDer::from_pem_file(path).map_err(|e| KeyError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der()).map_err(|_| {
        KeyError::NotEd25519 {
            path: path.to_path_buf(),
            what: "private key (PKCS#8)",
        }
    })
}

/// Loads an SPKI PEM Ed25519 public key as its raw 32 bytes.
pub fn load_public(path: &Path) -> Result<[u8; 32], KeyError> {
    let der = SubjectPublicKeyInfoDer::from_pem_file(path).map_err(|e| KeyError::Read {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let bytes: &[u8] = der.as_ref();
    if bytes.len() != 44 || bytes[..12] != ED25519_SPKI_PREFIX {
        return Err(KeyError::NotEd25519 {
            path: path.to_path_buf(),
            what: "public key (SubjectPublicKeyInfo)",
        });
    }
    let mut raw = [0u8; 32];
    raw.copy_from_slice(&bytes[12..]);
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_load_and_refuse_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("signing");
        let (private, public, fp) = generate(&prefix).unwrap();
        let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pair = load_private(&private).unwrap();
        let raw = load_public(&public).unwrap();
        assert_eq!(pair.public_key().as_ref(), raw);
        assert_eq!(fp, driftwatch_proto::envelope::key_fingerprint(&raw));
        assert!(matches!(generate(&prefix), Err(KeyError::Exists(_))));
        assert!(load_public(&private).is_err());
        assert!(load_private(&public).is_err());
    }
}
