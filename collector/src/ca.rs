//! The collector's certificate authority: it issues the server certificate and signs the client
//! certificates agents enroll and renew with, and it reads peer certificates back.
//!
//! What it owns: the CA key (ECDSA P-256, created once in `<state_dir>/ca/`, mode 0600, never
//! overwritten) and the shape of every certificate it issues. A client certificate carries
//! exactly one identity — the URI SAN `spiffe://driftwatch/host/<host-id>` (and CN = host id) —
//! that the collector chose from a validated host id; nothing a CSR asks for (names,
//! extensions, CA bits) is ever copied into a certificate. What it must never do: decide *who*
//! may have a certificate (enrollment does that) or do network I/O.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use driftwatch_proto::host_id;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use ring::rand::SecureRandom;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509CertificationRequest};

use crate::config::CaSource;
use crate::storage::IssuedCertificate;

/// File name of the CA certificate (PEM) in a managed CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA key (PKCS#8 PEM, mode 0600) in a managed CA directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";

const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const SERVER_CERT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Certificates start this long in the past, so a peer whose clock is a little behind accepts
/// them.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Why the CA could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: refusing to overwrite an existing file", .0.display())]
    Exists(PathBuf),
    #[error("{}: {detail}", path.display())]
    Invalid { path: PathBuf, detail: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Why a CSR was refused (the agent's fault: INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("the CSR is not a DER PKCS#10 certification request")]
    Malformed,
    #[error("the CSR's signature does not verify with its own public key")]
    BadSignature,
    #[error("the CSR's key is not an ECDSA P-256 key")]
    UnsupportedKey,
}

/// Why a peer certificate names no host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerCertError {
    #[error("the client certificate does not parse")]
    Malformed,
    #[error("the client certificate has no driftwatch host URI SAN")]
    NoHostId,
    #[error("the client certificate names more than one driftwatch host")]
    SeveralHostIds,
}

/// The identity of a verified client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientIdentity {
    pub host_id: String,
    /// Serial number, big-endian bytes as in the certificate.
    pub serial: Vec<u8>,
    pub not_after_ms: i64,
}

/// A client certificate just issued.
#[derive(Debug, Clone)]
pub struct IssuedClient {
    pub der: Vec<u8>,
    /// What to record in storage.
    pub record: IssuedCertificate,
}

/// The server's TLS identity: chain [server certificate, CA certificate] and key.
#[derive(Debug)]
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_after_ms: i64,
}

/// The collector CA.
pub struct CertificateAuthority {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after_ms: i64,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Opens the configured CA: a given one is loaded; a managed one is loaded from its
    /// directory, or created there on first start.
    pub fn open(source: &CaSource) -> Result<CertificateAuthority, CaError> {
        match source {
            CaSource::Given { cert, key } => CertificateAuthority::load(cert, key),
            CaSource::Managed { dir } => {
                let cert = dir.join(CA_CERT_FILE);
                let key = dir.join(CA_KEY_FILE);
                match (cert.exists(), key.exists()) {
                    (true, true) => CertificateAuthority::load(&cert, &key),
                    (false, false) => CertificateAuthority::create_in(dir),
                    (true, false) | (false, true) => Err(CaError::Invalid {
                        path: dir.clone(),
                        detail: format!(
                            "holds only one of {CA_CERT_FILE} and {CA_KEY_FILE}; restore the \
                             other or remove both to create a new CA (every agent then \
                             enrolls again)"
                        ),
                    }),
                }
            }
        }
    }

    /// Opens the configured CA without ever creating one (operator commands).
    pub fn open_existing(source: &CaSource) -> Result<CertificateAuthority, CaError> {
        let (cert, key) = match source {
            CaSource::Given { cert, key } => (cert.clone(), key.clone()),
            CaSource::Managed { dir } => (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE)),
        };
        CertificateAuthority::load(&cert, &key)
    }

    /// A new CA in memory (tests; the caller decides where, if anywhere, it is stored).
    pub fn generate(common_name: &str) -> Result<CertificateAuthority, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "driftwatch");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = to_offset(now + CA_LIFETIME);
        let not_after_ms = unix_ms(now + CA_LIFETIME);
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            not_after_ms,
        })
    }

    /// Creates a CA and stores it in `dir` (created 0700 if missing). Existing files are never
    /// overwritten.
    pub fn create_in(dir: &Path) -> Result<CertificateAuthority, CaError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| CaError::Io { path, source }
        };
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let ca = CertificateAuthority::generate("driftwatch collector CA")?;
        write_new(
            &dir.join(CA_KEY_FILE),
            ca.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new(&dir.join(CA_CERT_FILE), ca.cert_pem.as_bytes(), 0o644)?;
        Ok(ca)
    }

    /// Loads a CA from a PEM certificate and a PKCS#8 PEM key, checking that they belong
    /// together and that the certificate is a CA.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<CertificateAuthority, CaError> {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| CaError::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        let invalid = |path: &Path, detail: String| CaError::Invalid {
            path: path.to_path_buf(),
            detail,
        };
        let cert_pem = read(cert_path)?;
        let key = KeyPair::from_pem(&read(key_path)?)
            .map_err(|e| invalid(key_path, format!("not a PKCS#8 PEM private key: {e}")))?;
        let cert_der = rustls_pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(cert_path, format!("not a PEM certificate: {e}")))?;
        let cert_der: CertificateDer<'static> = cert_der;
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| invalid(cert_path, format!("not an X.509 certificate: {e}")))?;
        if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(invalid(
                key_path,
                "is not the key of the CA certificate".into(),
            ));
        }
        let is_ca = matches!(parsed.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        if !is_ca {
            return Err(invalid(cert_path, "is not a CA certificate".into()));
        }
        let not_after_ms = parsed.validity().not_after.timestamp().saturating_mul(1000);
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| invalid(cert_path, e.to_string()))?;
        Ok(CertificateAuthority {
            cert_der,
            cert_pem,
            issuer,
            not_after_ms,
        })
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// SHA-256 of the CA certificate DER, lowercase hex pairs joined by `:` (what agents pin
    /// with `--ca-fingerprint`).
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert_der)
    }

    pub fn not_after_ms(&self) -> i64 {
        self.not_after_ms
    }

    /// Issues the server certificate (a fresh key; SANs = `names`, DNS names or IP addresses).
    pub fn issue_server(&self, names: &[String]) -> Result<ServerIdentity, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let now = SystemTime::now();
        let not_after = self.clamp(now + SERVER_CERT_LIFETIME);
        let mut params = CertificateParams::new(names.to_vec())?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "driftwatch collector");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        params.not_before = to_offset(now - BACKDATE);
        params.not_after = to_offset(not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerIdentity {
            chain: vec![cert.der().clone(), self.cert_der.clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_after_ms: unix_ms(not_after),
        })
    }

    /// Signs a client certificate for `host_id` (already validated by the caller) with the
    /// public key of `csr_der`. The CSR's signature must verify; everything else it asks for
    /// is ignored.
    pub fn sign_client_csr(
        &self,
        host_id: &str,
        csr_der: &[u8],
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Result<IssuedClient, CsrError>, CaError> {
        let public_key = match csr_public_key(csr_der) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        let not_after = self.clamp(now + lifetime);
        let not_before = now - BACKDATE;
        let serial = random_serial_bytes()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host_id);
        let uri = host_id::to_uri(host_id).try_into()?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = to_offset(not_before);
        params.not_after = to_offset(not_after);
        let cert = params.signed_by(&public_key, &self.issuer)?;
        Ok(Ok(IssuedClient {
            der: cert.der().to_vec(),
            record: IssuedCertificate {
                host_id: host_id.to_string(),
                serial,
                not_before_ms: unix_ms(not_before),
                not_after_ms: unix_ms(not_after),
                issued_ms: unix_ms(now),
            },
        }))
    }

    /// The CA signing key (tests make certificates with odd properties with it).
    pub fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// No certificate outlives the CA.
    fn clamp(&self, t: SystemTime) -> SystemTime {
        let ca_end =
            UNIX_EPOCH + Duration::from_millis(u64::try_from(self.not_after_ms).unwrap_or(0));
        t.min(ca_end)
    }
}

/// SHA-256 of DER bytes as lowercase hex pairs joined by `:`.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Reads the identity of a client certificate that the TLS layer has already verified against
/// the CA: the host id from its single driftwatch URI SAN, and its serial.
pub fn client_identity(der: &[u8]) -> Result<ClientIdentity, PeerCertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|_| PeerCertError::Malformed)?;
    let san = cert
        .subject_alternative_name()
        .map_err(|_| PeerCertError::Malformed)?
        .ok_or(PeerCertError::NoHostId)?;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => host_id::from_uri(uri),
        _ => None,
    });
    let host_id = ids.next().ok_or(PeerCertError::NoHostId)?;
    if ids.next().is_some() {
        return Err(PeerCertError::SeveralHostIds);
    }
    Ok(ClientIdentity {
        host_id: host_id.to_string(),
        serial: cert.tbs_certificate.raw_serial().to_vec(),
        not_after_ms: cert.validity().not_after.timestamp().saturating_mul(1000),
    })
}

/// Parses a CSR, verifies its self-signature and returns its public key (P-256 only).
fn csr_public_key(csr_der: &[u8]) -> Result<SubjectPublicKeyInfo, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(csr_der).map_err(|_| CsrError::Malformed)?;
    if !rest.is_empty() {
        return Err(CsrError::Malformed);
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let spki = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|_| CsrError::UnsupportedKey)?;
    if spki.algorithm() != &rcgen::PKCS_ECDSA_P256_SHA256 {
        return Err(CsrError::UnsupportedKey);
    }
    Ok(spki)
}

/// 16 random bytes, first byte in 0x40..=0x7f: a positive INTEGER with no leading zero, so the
/// bytes in the certificate are exactly these.
fn random_serial_bytes() -> Result<Vec<u8>, CaError> {
    let mut serial = vec![0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    serial[0] = (serial[0] & 0x3f) | 0x40;
    Ok(serial)
}

fn random_serial() -> Result<SerialNumber, CaError> {
    Ok(SerialNumber::from_slice(&random_serial_bytes()?))
}

fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// Unix milliseconds of `t` (0 before the epoch).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Writes a new file atomically without ever replacing one: a temporary file is written and
/// synced, then hard-linked to its name (which fails if the name exists), then the directory
/// is synced.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        return Err(CaError::Exists(path.to_path_buf()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::hard_link(&tmp, path)
    })();
    let _ = fs::remove_file(&tmp);
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(CaError::Exists(path.to_path_buf()));
        }
        Err(e) => return Err(io(e)),
    }
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr(names: Vec<String>) -> (KeyPair, Vec<u8>) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let csr = params.serialize_request(&key).unwrap();
        (key, csr.der().to_vec())
    }

    #[test]
    fn managed_ca_is_created_once_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let source = CaSource::Managed {
            dir: ca_dir.clone(),
        };
        let first = CertificateAuthority::open(&source).unwrap();
        let mode = fs::metadata(ca_dir.join(CA_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = CertificateAuthority::open(&source).unwrap();
        assert_eq!(first.fingerprint(), again.fingerprint());
        assert_eq!(first.fingerprint().len(), 32 * 3 - 1);
        assert!(matches!(
            CertificateAuthority::create_in(&ca_dir),
            Err(CaError::Exists(_))
        ));
        fs::remove_file(ca_dir.join(CA_CERT_FILE)).unwrap();
        assert!(matches!(
            CertificateAuthority::open(&source),
            Err(CaError::Invalid { .. })
        ));
    }

    #[test]
    fn a_key_of_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        CertificateAuthority::create_in(&dir.path().join("a")).unwrap();
        CertificateAuthority::create_in(&dir.path().join("b")).unwrap();
        let e = CertificateAuthority::load(
            &dir.path().join("a").join(CA_CERT_FILE),
            &dir.path().join("b").join(CA_KEY_FILE),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not the key"), "{e}");
    }

    #[test]
    fn client_certificate_carries_only_the_collectors_identity() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (_key, csr) = csr(vec!["evil.example.com".into()]);
        let now = SystemTime::now();
        let issued = ca
            .sign_client_csr("web-01", &csr, Duration::from_secs(3600), now)
            .unwrap()
            .unwrap();
        let id = client_identity(&issued.der).unwrap();
        assert_eq!(id.host_id, "web-01");
        assert_eq!(id.serial, issued.record.serial);
        assert_eq!(id.serial.len(), 16);
        assert_eq!(id.not_after_ms / 1000, issued.record.not_after_ms / 1000);
        let (_, cert) = x509_parser::parse_x509_certificate(&issued.der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1);
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.client_auth && !eku.value.server_auth);
    }

    #[test]
    fn bad_csrs_are_refused() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let now = SystemTime::now();
        let sign = |der: &[u8]| {
            ca.sign_client_csr("h", der, Duration::from_secs(60), now)
                .unwrap()
                .map(|_| ())
        };
        assert_eq!(sign(b"not a csr"), Err(CsrError::Malformed));
        let (_k, mut der) = csr(vec![]);
        let last = der.len() - 1;
        der[last] ^= 1;
        assert!(matches!(
            sign(&der),
            Err(CsrError::BadSignature | CsrError::Malformed)
        ));
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ed_csr = CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&ed)
            .unwrap();
        assert_eq!(sign(ed_csr.der()), Err(CsrError::UnsupportedKey));
    }

    #[test]
    fn certificates_never_outlive_the_ca() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let (_k, der) = csr(vec![]);
        let issued = ca
            .sign_client_csr(
                "h",
                &der,
                Duration::from_secs(20 * 365 * 86400),
                SystemTime::now(),
            )
            .unwrap()
            .unwrap();
        assert!(issued.record.not_after_ms <= ca.not_after_ms());
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        assert_eq!(server.chain.len(), 2);
        assert_eq!(
            client_identity(&server.chain[0]),
            Err(PeerCertError::NoHostId)
        );
    }
}
