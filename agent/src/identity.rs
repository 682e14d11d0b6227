//! The host's identity towards the collector, kept in `<state-dir>/identity/`: `key.pem`
//! (PKCS#8 ECDSA P-256, mode 0600), `cert.pem` (the client certificate the collector CA
//! issued), `ca.pem` (the collector CA: the only trust anchor for the collector's server
//! certificate) and `host-id`.
//!
//! Every file is replaced atomically. A renewal stages the new key and certificate in
//! `identity/renew/` and then renames them into place; [`Identity::load`] finishes a renewal that
//! was interrupted between the two renames, so a crash never leaves a key that does not match
//! its certificate.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::fsutil::write_atomic;
use crate::transport::{ClientAuth, ServerTrust};

/// The URI SAN prefix of client certificates (the host id follows).
pub use driftwatch_proto::host_id::SPIFFE_PREFIX;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("this host is not enrolled ({path} missing): run `driftwatch-agent enroll` first")]
    NotEnrolled { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// The enrolled identity.
#[derive(Debug, Clone)]
pub struct Identity {
    pub host_id: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<Vec<u8>>,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

/// `identity/` of a state directory.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("identity")
}

/// PEM armour of DER bytes.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(&String::from_utf8_lossy(chunk));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// Every certificate in a PEM file.
pub fn parse_certs(path: &Path, text: &[u8]) -> Result<Vec<Vec<u8>>, IdentityError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(text)
        .map(|c| c.map(|c| c.as_ref().to_vec()))
        .collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(c),
        Ok(_) => Err(IdentityError::Invalid {
            path: path.to_path_buf(),
            reason: "no PEM certificate in the file".into(),
        }),
        Err(e) => Err(IdentityError::Invalid {
            path: path.to_path_buf(),
            reason: format!("not a PEM certificate file: {e}"),
        }),
    }
}

/// Validity (not before, not after) and the host id of the SPIFFE URI SAN, if any (and valid).
pub fn certificate_facts(der: &[u8]) -> Result<(i64, i64, Option<String>), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let v = cert.validity();
    let mut host = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = n
                && let Some(h) = driftwatch_proto::host_id::from_uri(u)
            {
                host = Some(h.to_string());
            }
        }
    }
    Ok((v.not_before.timestamp(), v.not_after.timestamp(), host))
}

/// When a certificate valid from `not_before` to `not_after` is due for renewal: half-way.
pub fn renew_at(not_before: i64, not_after: i64) -> i64 {
    not_before + (not_after - not_before).max(0) / 2
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            IdentityError::NotEnrolled {
                path: path.to_path_buf(),
            }
        } else {
            IdentityError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    write_atomic(path, data, mode).map_err(|source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates `path` (mode 0700) if it does not exist.
pub fn make_private_dir(path: &Path) -> Result<(), IdentityError> {
    let res = fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .and_then(|_| fs::set_permissions(path, fs::Permissions::from_mode(0o700)));
    res.map_err(|source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn rename(from: &Path, to: &Path) -> Result<(), IdentityError> {
    fs::rename(from, to).map_err(|source| IdentityError::Write {
        path: to.to_path_buf(),
        source,
    })
}

/// Completes a renewal staged in `identity/renew/` (see the module doc).
fn finish_renewal(id_dir: &Path) -> Result<(), IdentityError> {
    let staged = id_dir.join("renew");
    let cert = staged.join("cert.pem");
    if !cert.exists() {
        return Ok(());
    }
    // cert.pem is written last: when it exists, the staged key is complete (or already moved).
    let key = staged.join("key.pem");
    if key.exists() {
        rename(&key, &id_dir.join("key.pem"))?;
    }
    rename(&cert, &id_dir.join("cert.pem"))?;
    if let Ok(d) = fs::File::open(id_dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl Identity {
    /// Loads the identity of a state directory.
    pub fn load(state_dir: &Path) -> Result<Identity, IdentityError> {
        let d = dir(state_dir);
        if d.join("renew").exists() {
            finish_renewal(&d)?;
        }
        let invalid = |p: &Path, reason: String| IdentityError::Invalid {
            path: p.to_path_buf(),
            reason,
        };
        let host_path = d.join("host-id");
        let host_id = String::from_utf8_lossy(&read(&host_path)?)
            .trim()
            .to_string();
        driftwatch_proto::host_id::validate(&host_id)
            .map_err(|e| invalid(&host_path, e.to_string()))?;
        let key_path = d.join("key.pem");
        let key_pem = String::from_utf8(read(&key_path)?)
            .map_err(|_| invalid(&key_path, "not a PEM file".into()))?;
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| invalid(&key_path, format!("not a PEM private key: {e}")))?;
        let cert_path = d.join("cert.pem");
        let cert_der = parse_certs(&cert_path, &read(&cert_path)?)?.remove(0);
        let (not_before_unix, not_after_unix, cert_host) =
            certificate_facts(&cert_der).map_err(|e| invalid(&cert_path, e))?;
        if cert_host.as_deref() != Some(host_id.as_str()) {
            return Err(invalid(
                &cert_path,
                format!(
                    "the certificate is for {:?}, but host-id says {host_id:?}",
                    cert_host.unwrap_or_default()
                ),
            ));
        }
        let ca_path = d.join("ca.pem");
        let ca_der = parse_certs(&ca_path, &read(&ca_path)?)?;
        Ok(Identity {
            host_id,
            key_pem,
            cert_der,
            ca_der,
            not_before_unix,
            not_after_unix,
        })
    }

    /// Stores a fresh identity (enrollment), replacing any previous one file by file; the key is
    /// written first and only ever with mode 0600.
    pub fn store(&self, state_dir: &Path) -> Result<(), IdentityError> {
        let d = dir(state_dir);
        make_private_dir(&d)?;
        let _ = fs::remove_dir_all(d.join("renew"));
        write(&d.join("key.pem"), self.key_pem.as_bytes(), 0o600)?;
        write(
            &d.join("cert.pem"),
            pem("CERTIFICATE", &self.cert_der).as_bytes(),
            0o644,
        )?;
        let ca: String = self.ca_der.iter().map(|c| pem("CERTIFICATE", c)).collect();
        write(&d.join("ca.pem"), ca.as_bytes(), 0o644)?;
        write(
            &d.join("host-id"),
            format!("{}\n", self.host_id).as_bytes(),
            0o644,
        )
    }

    /// Replaces key and certificate after a renewal (staged, then renamed; see the module doc).
    pub fn store_renewed(
        &mut self,
        state_dir: &Path,
        key_pem: String,
        cert_der: Vec<u8>,
    ) -> Result<(), IdentityError> {
        let d = dir(state_dir);
        let staged = d.join("renew");
        make_private_dir(&staged)?;
        write(&staged.join("key.pem"), key_pem.as_bytes(), 0o600)?;
        write(
            &staged.join("cert.pem"),
            pem("CERTIFICATE", &cert_der).as_bytes(),
            0o644,
        )?;
        finish_renewal(&d)?;
        let _ = fs::remove_dir(&staged);
        let (nb, na, _) =
            certificate_facts(&cert_der).map_err(|reason| IdentityError::Invalid {
                path: d.join("cert.pem"),
                reason,
            })?;
        self.key_pem = key_pem;
        self.cert_der = cert_der;
        self.not_before_unix = nb;
        self.not_after_unix = na;
        Ok(())
    }

    /// Unix time at which the certificate is due for renewal.
    pub fn renew_at(&self) -> i64 {
        renew_at(self.not_before_unix, self.not_after_unix)
    }

    /// Trust anchors for the collector's server certificate.
    pub fn server_trust(&self) -> ServerTrust {
        ServerTrust::Roots(
            self.ca_der
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect(),
        )
    }

    /// The client certificate and key for TLS.
    pub fn client_auth(&self) -> Result<ClientAuth, IdentityError> {
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(|e| {
            IdentityError::Invalid {
                path: PathBuf::from("identity/key.pem"),
                reason: e.to_string(),
            }
        })?;
        Ok(ClientAuth {
            chain: vec![CertificateDer::from(self.cert_der.clone())],
            key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_half_way() {
        assert_eq!(renew_at(1000, 3000), 2000);
        assert_eq!(renew_at(1000, 500), 1000);
    }

    #[test]
    fn pem_round_trip() {
        let der: Vec<u8> = (0..200u8).collect();
        let p = pem("CERTIFICATE", &der);
        assert!(p.lines().all(|l| l.len() <= 64));
        assert_eq!(parse_certs(Path::new("x"), p.as_bytes()).unwrap(), [der]);
        assert!(parse_certs(Path::new("x"), b"nothing").is_err());
    }

    #[test]
    fn interrupted_renewal_is_finished_on_load() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("identity");
        fs::create_dir_all(d.join("renew")).unwrap();
        fs::write(d.join("key.pem"), "old key").unwrap();
        fs::write(d.join("cert.pem"), "old cert").unwrap();
        // Crash after the key was moved, before the certificate was.
        fs::write(d.join("key.pem"), "new key").unwrap();
        fs::write(d.join("renew/cert.pem"), "new cert").unwrap();
        finish_renewal(&d).unwrap();
        assert_eq!(fs::read_to_string(d.join("key.pem")).unwrap(), "new key");
        assert_eq!(fs::read_to_string(d.join("cert.pem")).unwrap(), "new cert");
        // Nothing staged: nothing happens.
        finish_renewal(&d).unwrap();
        assert_eq!(fs::read_to_string(d.join("cert.pem")).unwrap(), "new cert");
    }
}
