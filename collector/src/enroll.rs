//! The `driftwatch.v1.Enrollment` service: an agent trades a single-use token and a CSR for a
//! client certificate (`Enroll`), and later a valid certificate for a new one (`Renew`).
//!
//! What it owns: the order of checks — token syntax, host id, labels and CSR are checked before
//! the token is consumed (a typo does not burn a token); the certificate is returned only after
//! the token was consumed and the host recorded. Every refusal is a security event. What it
//! must never do: put anything from the CSR into a certificate (the CA takes only its key), or
//! renew for a revoked certificate.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use driftwatch_proto::host_id;
use driftwatch_proto::v1::enrollment_server::Enrollment;
use driftwatch_proto::v1::{EnrollRequest, EnrollResponse, Label, RenewRequest, RenewResponse};
use tonic::{Request, Response, Status};

use crate::ca::{CertificateAuthority, unix_ms};
use crate::revocation::Revocations;
use crate::rpc_error::RpcError;
use crate::security;
use crate::storage::{Storage, StorageError};
use crate::token::Token;

/// Most labels per host.
const MAX_LABELS: usize = 64;
const MAX_LABEL_KEY: usize = 63;
const MAX_LABEL_VALUE: usize = 255;

/// The `driftwatch.v1.Enrollment` service.
#[derive(Debug, Clone)]
pub struct EnrollmentService {
    ca: Arc<CertificateAuthority>,
    store: Arc<dyn Storage>,
    revocations: Revocations,
    client_cert_lifetime: Duration,
}

impl EnrollmentService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        store: Arc<dyn Storage>,
        revocations: Revocations,
        client_cert_lifetime: Duration,
    ) -> EnrollmentService {
        EnrollmentService {
            ca,
            store,
            revocations,
            client_cert_lifetime,
        }
    }

    async fn enroll_checked(&self, r: EnrollRequest) -> Result<EnrollResponse, RpcError> {
        let token = Token::parse(&r.token)?;
        host_id::validate(&r.host_id)?;
        let labels = check_labels(r.labels)?;
        let now = SystemTime::now();
        // Signed first (cheap, and it checks the CSR) but handed out only after the token
        // was consumed and the host recorded.
        let issued =
            self.ca
                .sign_client_csr(&r.host_id, &r.csr_der, self.client_cert_lifetime, now)??;
        let used = self
            .store
            .consume_enrollment_token(token.sha256(), &r.host_id, unix_ms(now))
            .await?;
        self.store
            .enroll_host(labels, issued.record.clone())
            .await?;
        tracing::info!(host = r.host_id, token = used.id, "host enrolled");
        // A host id enrolling again starts a new lifecycle; the enrollment itself stands even
        // if recording that fails (the next enrollment or an operator can fix the state).
        if let Err(e) =
            crate::reconcile::after_enrollment(&*self.store, &r.host_id, unix_ms(now)).await
        {
            tracing::warn!(host = r.host_id, error = %e, "recording the re-enrollment failed");
        }
        Ok(EnrollResponse {
            host_id: r.host_id,
            certificate_der: issued.der,
            ca_certificate_der: self.ca.cert_der().to_vec(),
            not_after_unix: issued.record.not_after_ms / 1000,
        })
    }

    async fn renew_checked(
        &self,
        peer: Option<&crate::tls::PeerInfo>,
        r: RenewRequest,
    ) -> Result<RenewResponse, RpcError> {
        let identity = security::authenticated_client(peer, &self.revocations)?;
        let now = SystemTime::now();
        // The cache may be up to one refresh old; a renewal must not outrun a revocation, so
        // storage is asked directly (renewals are rare).
        let revoked = self.store.revoked_serials(unix_ms(now)).await?;
        if revoked.contains(&identity.serial) {
            return Err(RpcError::Revoked);
        }
        let issued = self.ca.sign_client_csr(
            &identity.host_id,
            &r.csr_der,
            self.client_cert_lifetime,
            now,
        )??;
        self.store.record_certificate(issued.record.clone()).await?;
        tracing::info!(host = identity.host_id, "certificate renewed");
        Ok(RenewResponse {
            certificate_der: issued.der,
            not_after_unix: issued.record.not_after_ms / 1000,
        })
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let peer = security::peer(request.extensions()).cloned();
        let r = request.into_inner();
        let claimed = r.host_id.clone();
        match self.enroll_checked(r).await {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                let kind = match &e {
                    RpcError::MalformedToken(_) | RpcError::Storage(StorageError::Token(_)) => {
                        "enrollment-token-refused"
                    }
                    _ => "enrollment-refused",
                };
                let detail = format!("enrollment of {claimed:?} refused: {e}");
                security::record(&self.store, kind, peer.as_ref(), None, detail).await;
                Err(e.into())
            }
        }
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let peer = security::peer(request.extensions()).cloned();
        match self
            .renew_checked(peer.as_ref(), request.into_inner())
            .await
        {
            Ok(resp) => Ok(Response::new(resp)),
            Err(e) => {
                let detail = format!("certificate renewal refused: {e}");
                security::record(&self.store, "renewal-refused", peer.as_ref(), None, detail).await;
                Err(e.into())
            }
        }
    }
}

/// Labels sorted by key, keys unique and well-formed, values printable and bounded.
fn check_labels(labels: Vec<Label>) -> Result<Vec<(String, String)>, RpcError> {
    if labels.len() > MAX_LABELS {
        return Err(RpcError::InvalidLabels(format!(
            "at most {MAX_LABELS} labels"
        )));
    }
    let mut out: Vec<(String, String)> = labels.into_iter().map(|l| (l.key, l.value)).collect();
    out.sort();
    for (i, (k, v)) in out.iter().enumerate() {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_LABEL_KEY
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
        if !key_ok {
            return Err(RpcError::InvalidLabels(format!(
                "key {k:?}: 1–{MAX_LABEL_KEY} characters of [A-Za-z0-9._/-]"
            )));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(RpcError::InvalidLabels(format!(
                "value of {k:?}: at most {MAX_LABEL_VALUE} bytes, no control characters"
            )));
        }
        if i > 0 && out[i - 1].0 == *k {
            return Err(RpcError::InvalidLabels(format!("key {k:?} given twice")));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(k: &str, v: &str) -> Label {
        Label {
            key: k.into(),
            value: v.into(),
        }
    }

    #[test]
    fn labels_are_sorted_and_checked() {
        let l = check_labels(vec![label("role", "web"), label("dc", "fra1")]).unwrap();
        assert_eq!(
            l,
            vec![("dc".into(), "fra1".into()), ("role".into(), "web".into())]
        );
        assert!(check_labels(vec![label("a", "1"), label("a", "2")]).is_err());
        assert!(check_labels(vec![label("", "1")]).is_err());
        assert!(check_labels(vec![label("a b", "1")]).is_err());
        assert!(check_labels(vec![label("a", "x\ny")]).is_err());
        assert!(check_labels((0..65).map(|i| label(&format!("k{i}"), "")).collect()).is_err());
    }
}
