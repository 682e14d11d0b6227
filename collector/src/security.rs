//! Who is calling, and what the collector refused: the one function that turns a request's
//! connection info into an authenticated host ([`authenticated_client`]) and the recording of
//! refusals as security events.

use std::sync::Arc;
use std::time::SystemTime;

use crate::ca::{ClientIdentity, unix_ms};
use crate::revocation::Revocations;
use crate::rpc_error::RpcError;
use crate::storage::{AuditEntry, SecurityEvent, Storage};
use crate::tls::PeerInfo;

/// The peer of a request, as the TLS layer saw it (absent only for in-memory transports).
pub fn peer(extensions: &tonic::Extensions) -> Option<&PeerInfo> {
    extensions.get::<PeerInfo>()
}

/// The host a request comes from: the verified client certificate's host id, provided the
/// certificate is not revoked. This is the only way a handler learns a host id.
pub fn authenticated_client(
    peer: Option<&PeerInfo>,
    revocations: &Revocations,
) -> Result<ClientIdentity, RpcError> {
    let identity = match peer.and_then(|p| p.client.clone()) {
        None => return Err(RpcError::NoClientCertificate),
        Some(Err(e)) => return Err(RpcError::PeerCertificate(e)),
        Some(Ok(id)) => id,
    };
    if revocations.is_revoked(&identity.serial) {
        return Err(RpcError::Revoked);
    }
    Ok(identity)
}

/// The audit action of a refusal of `kind`: `security.<kind>_refused` in the audit log's
/// dotted lower-case style (`impersonation` → `security.impersonation_refused`,
/// `enrollment-token-refused` → `security.enrollment_token_refused`).
pub fn audit_action(kind: &str) -> String {
    let base = kind
        .strip_suffix("-refused")
        .unwrap_or(kind)
        .replace('-', "_");
    format!("security.{base}_refused")
}

/// Records a security event (with its `security.*` audit record, in one transaction); a failure to record is logged, never turned into the caller's
/// error (the refusal itself already happened).
pub async fn record(
    store: &Arc<dyn Storage>,
    kind: &str,
    peer: Option<&PeerInfo>,
    peer_host_id: Option<&str>,
    detail: String,
) {
    let addr = peer.map(|p| p.remote_addr.to_string()).unwrap_or_default();
    let host = peer_host_id.map(str::to_string).or_else(|| {
        peer.and_then(|p| p.client.as_ref())
            .and_then(|c| c.as_ref().ok())
            .map(|c| c.host_id.clone())
    });
    tracing::warn!(kind, peer = %addr, host = host.as_deref().unwrap_or("-"), "{detail}");
    let at_ms = unix_ms(SystemTime::now());
    let audit = AuditEntry::new(
        at_ms,
        "collector",
        audit_action(kind),
        host.clone().unwrap_or_default(),
        serde_json::json!({ "kind": kind, "peer": addr, "detail": detail }),
    );
    let event = SecurityEvent {
        at_ms,
        kind: kind.to_string(),
        peer_host_id: host,
        detail: if addr.is_empty() {
            detail
        } else {
            format!("{detail} (from {addr})")
        },
    };
    if let Err(e) = store.record_security_event(event, audit).await {
        tracing::error!(error = %e, "recording a security event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::audit_action;

    #[test]
    fn refusal_kinds_become_audit_actions() {
        for (kind, action) in [
            ("impersonation", "security.impersonation_refused"),
            (
                "enrollment-token-refused",
                "security.enrollment_token_refused",
            ),
            ("enrollment-refused", "security.enrollment_refused"),
            ("renewal-refused", "security.renewal_refused"),
            (
                "unauthenticated-report",
                "security.unauthenticated_report_refused",
            ),
            (
                "revoked-certificate",
                "security.revoked_certificate_refused",
            ),
        ] {
            assert_eq!(audit_action(kind), action);
        }
    }
}
