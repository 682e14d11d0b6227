//! Enrollment and renewal: trading a token (or the current certificate) and a CSR for a client
//! certificate from the collector CA.
//!
//! Keys are ECDSA P-256, made here (rcgen with ring) and never leave the host. Enrollment
//! trusts the collector either through a CA file or through the SHA-256 fingerprint of the CA
//! certificate, which is then found in the server's chain, checked, and pinned as `ca.pem`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use driftwatch_proto::v1::enrollment_client::EnrollmentClient;
use driftwatch_proto::v1::{EnrollRequest, Label, RenewRequest};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

use crate::identity::{self, Identity, IdentityError, SPIFFE_PREFIX};
use crate::transport::{self, CollectorUrl, FingerprintVerifier, ServerTrust, TransportError};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("token refused: {0}")]
    TokenRefused(String),
    #[error("the collector refused the request ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("invalid host id {id:?}: {source}")]
    HostId {
        id: String,
        source: driftwatch_proto::host_id::HostIdError,
    },
    #[error("invalid label {0:?}: expected KEY=VALUE with a non-empty key")]
    Label(String),
    #[error("label {0:?} given twice")]
    DuplicateLabel(String),
    #[error("this host is already enrolled as {0:?} (pass --force to replace its identity)")]
    AlreadyEnrolled(String),
    #[error("cannot determine the hostname (pass --host-id): {0}")]
    Hostname(std::io::Error),
    #[error("cannot read the CA file {path}: {source}")]
    CaFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the collector's answer is unusable: {0}")]
    BadResponse(String),
    #[error("key or CSR generation failed: {0}")]
    Key(#[from] rcgen::Error),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// How the agent recognises the collector while enrolling.
#[derive(Debug, Clone)]
pub enum CaTrust {
    File(PathBuf),
    Fingerprint([u8; 32]),
}

#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub collector: CollectorUrl,
    pub trust: CaTrust,
    pub token: String,
    pub host_id: Option<String>,
    /// `KEY=VALUE` strings.
    pub labels: Vec<String>,
    pub state_dir: PathBuf,
    /// Replace an existing identity.
    pub force: bool,
}

/// The machine's hostname, the default host id.
pub fn hostname() -> std::io::Result<String> {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))?;
    Ok(raw.trim().to_string())
}

/// Parses `KEY=VALUE` labels into the sorted, unique list the protocol wants.
pub fn parse_labels(labels: &[String]) -> Result<Vec<Label>, EnrollError> {
    let mut out: Vec<Label> = Vec::new();
    for l in labels {
        let (k, v) = l
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| EnrollError::Label(l.clone()))?;
        out.push(Label {
            key: k.trim().to_string(),
            value: v.to_string(),
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    if let Some(w) = out.windows(2).find(|w| w[0].key == w[1].key) {
        return Err(EnrollError::DuplicateLabel(w[0].key.clone()));
    }
    Ok(out)
}

/// A new P-256 key and a CSR for `host_id` (CN and SPIFFE URI SAN; the CA decides the final
/// certificate anyway).
pub fn key_and_csr(host_id: &str) -> Result<(KeyPair, Vec<u8>), rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, host_id);
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(
        driftwatch_proto::host_id::to_uri(host_id).try_into()?,
    )];
    let csr = params.serialize_request(&key)?;
    Ok((key, csr.der().to_vec()))
}

fn status_error(s: tonic::Status) -> EnrollError {
    match s.code() {
        tonic::Code::Unauthenticated => EnrollError::TokenRefused(s.message().to_string()),
        code => EnrollError::Refused {
            code,
            message: s.message().to_string(),
        },
    }
}

/// Enrolls this host and stores its identity. Returns the stored identity.
pub async fn enroll(opts: &EnrollOptions) -> Result<Identity, EnrollError> {
    let host_id = match &opts.host_id {
        Some(h) => h.clone(),
        None => hostname().map_err(EnrollError::Hostname)?,
    };
    driftwatch_proto::host_id::validate(&host_id).map_err(|source| EnrollError::HostId {
        id: host_id.clone(),
        source,
    })?;
    let labels = parse_labels(&opts.labels)?;
    if !opts.force
        && let Ok(existing) = Identity::load(&opts.state_dir)
    {
        return Err(EnrollError::AlreadyEnrolled(existing.host_id));
    }

    let (trust, verifier, file_cas) = match &opts.trust {
        CaTrust::File(path) => {
            let text = std::fs::read(path).map_err(|source| EnrollError::CaFile {
                path: path.clone(),
                source,
            })?;
            let cas = identity::parse_certs(path, &text)?;
            let roots = cas.iter().map(|c| c.clone().into()).collect();
            (ServerTrust::Roots(roots), None, cas)
        }
        CaTrust::Fingerprint(fp) => {
            let v = Arc::new(FingerprintVerifier::new(*fp));
            (ServerTrust::Fingerprint(v.clone()), Some(v), Vec::new())
        }
    };
    let config = transport::client_config(trust, None)?;
    let channel = transport::connect(&opts.collector, config).await?;

    // The key exists before the request is sent, and only ever in memory until the collector
    // has answered; it reaches the disk (0600) with the certificate.
    let (key, csr_der) = key_and_csr(&host_id)?;
    let resp = EnrollmentClient::new(channel)
        .enroll(EnrollRequest {
            token: opts.token.clone(),
            host_id: host_id.clone(),
            csr_der,
            labels,
        })
        .await
        .map_err(status_error)?
        .into_inner();

    if resp.host_id != host_id {
        return Err(EnrollError::BadResponse(format!(
            "asked for host id {host_id:?}, got a certificate for {:?}",
            resp.host_id
        )));
    }
    let (not_before_unix, not_after_unix, cert_host) =
        identity::certificate_facts(&resp.certificate_der).map_err(EnrollError::BadResponse)?;
    if cert_host.as_deref() != Some(host_id.as_str()) {
        return Err(EnrollError::BadResponse(format!(
            "the certificate does not name {host_id:?} in its {SPIFFE_PREFIX} URI"
        )));
    }
    let ca_der = match verifier {
        Some(v) => {
            let pinned = v.pinned().ok_or_else(|| {
                EnrollError::BadResponse("no CA certificate was pinned in the handshake".into())
            })?;
            if pinned.as_ref() != resp.ca_certificate_der.as_slice() {
                return Err(EnrollError::BadResponse(
                    "the CA certificate in the answer is not the one the fingerprint matched"
                        .into(),
                ));
            }
            vec![pinned.as_ref().to_vec()]
        }
        None => file_cas,
    };
    let id = Identity {
        host_id,
        key_pem: key.serialize_pem(),
        cert_der: resp.certificate_der,
        ca_der,
        not_before_unix,
        not_after_unix,
    };
    id.store(&opts.state_dir)?;
    Ok(id)
}

/// Renews the client certificate (authenticated by the current one) and stores the new key and
/// certificate.
pub async fn renew(
    collector: &CollectorUrl,
    state_dir: &Path,
    id: &mut Identity,
) -> Result<(), EnrollError> {
    let config = transport::client_config(id.server_trust(), Some(id.client_auth()?))?;
    let channel = transport::connect(collector, config).await?;
    let (key, csr_der) = key_and_csr(&id.host_id)?;
    let resp = EnrollmentClient::new(channel)
        .renew(RenewRequest { csr_der })
        .await
        .map_err(status_error)?
        .into_inner();
    let (_, _, cert_host) =
        identity::certificate_facts(&resp.certificate_der).map_err(EnrollError::BadResponse)?;
    if cert_host.as_deref() != Some(id.host_id.as_str()) {
        return Err(EnrollError::BadResponse(
            "the renewed certificate names another host".into(),
        ));
    }
    id.store_renewed(state_dir, key.serialize_pem(), resp.certificate_der)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_sorted_and_unique() {
        let l = parse_labels(&["role=web".into(), "dc=fra1".into(), "empty=".into()]).unwrap();
        let keys: Vec<_> = l
            .iter()
            .map(|l| (l.key.as_str(), l.value.as_str()))
            .collect();
        assert_eq!(keys, [("dc", "fra1"), ("empty", ""), ("role", "web")]);
        assert!(matches!(
            parse_labels(&["a=1".into(), "a=2".into()]),
            Err(EnrollError::DuplicateLabel(_))
        ));
        assert!(matches!(
            parse_labels(&["novalue".into()]),
            Err(EnrollError::Label(_))
        ));
        assert!(matches!(
            parse_labels(&["=x".into()]),
            Err(EnrollError::Label(_))
        ));
    }

    #[test]
    fn csr_names_the_host() {
        let (key, csr) = key_and_csr("web-01").unwrap();
        assert!(
            key.serialize_pem()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        let parsed = rcgen::CertificateSigningRequestParams::from_der(&csr.into()).unwrap();
        assert!(parsed.params.subject_alt_names.iter().any(
            |s| matches!(s, SanType::URI(u) if u.as_str() == "spiffe://driftwatch/host/web-01")
        ));
    }
}
