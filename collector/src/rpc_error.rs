//! Every reason an enrollment or ingest call ends in an error, and the one place that maps each
//! to a gRPC status ([`From<RpcError> for tonic::Status`], an exhaustive `match`: a new variant
//! does not compile until it has a status).
//!
//! Status messages are for the agent's operator; they never contain secrets (no token text)
//! and name the field or rule that was broken.

use driftwatch_proto::host_id::HostIdError;
use tonic::{Code, Status};

use crate::ca::{CaError, CsrError, PeerCertError};
use crate::storage::{StorageError, TokenError};
use crate::token::MalformedToken;

/// Why a call was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("this call requires a client certificate")]
    NoClientCertificate,
    #[error("client certificate: {0}")]
    PeerCertificate(#[from] PeerCertError),
    #[error("the client certificate has been revoked")]
    Revoked,
    #[error(transparent)]
    MalformedToken(#[from] MalformedToken),
    #[error("host id: {0}")]
    InvalidHostId(#[from] HostIdError),
    #[error("csr: {0}")]
    InvalidCsr(#[from] CsrError),
    #[error("labels: {0}")]
    InvalidLabels(String),
    #[error("the stream must start with Hello")]
    HelloMissing,
    #[error("no Hello within {0:?}")]
    HelloTimeout(std::time::Duration),
    #[error("no message for {0:?} (3 heartbeat intervals)")]
    Silent(std::time::Duration),
    #[error("Hello says host {claimed:?} but the client certificate is for {certified:?}")]
    Impersonation { certified: String, claimed: String },
    #[error("report epoch {got} differs from the stream's epoch {stream}")]
    EpochMismatch { stream: u64, got: u64 },
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    #[error("the collector is shutting down")]
    ShuttingDown,
    /// The agent closed the connection while the collector still had something to say.
    #[error("the agent went away")]
    AgentGone,
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    /// A storage failure shared by every report of one group commit.
    #[error("storage: {0}")]
    CommitFailed(std::sync::Arc<StorageError>),
    #[error("certificate authority: {0}")]
    Ca(#[from] CaError),
}

impl From<RpcError> for Status {
    fn from(e: RpcError) -> Status {
        let code = match &e {
            RpcError::NoClientCertificate
            | RpcError::PeerCertificate(_)
            | RpcError::Revoked
            | RpcError::MalformedToken(_) => Code::Unauthenticated,
            RpcError::InvalidHostId(_)
            | RpcError::InvalidCsr(_)
            | RpcError::InvalidLabels(_)
            | RpcError::HelloMissing
            | RpcError::EpochMismatch { .. }
            | RpcError::InvalidMessage(_) => Code::InvalidArgument,
            RpcError::HelloTimeout(_) | RpcError::Silent(_) => Code::DeadlineExceeded,
            RpcError::Impersonation { .. } => Code::PermissionDenied,
            RpcError::ShuttingDown => Code::Unavailable,
            RpcError::AgentGone => Code::Cancelled,
            RpcError::Storage(s) => storage_code(s),
            RpcError::CommitFailed(s) => storage_code(s),
            RpcError::Ca(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

fn storage_code(e: &StorageError) -> Code {
    match e {
        // The agent retries with backoff; the database may be back by then.
        StorageError::Backend(_) => Code::Unavailable,
        StorageError::SchemaTooNew { .. } | StorageError::Corrupt { .. } => Code::Internal,
        // A certificate for a host the database does not know (e.g. a restored backup).
        StorageError::UnknownHost(_) => Code::FailedPrecondition,
        StorageError::InvalidArgument(_) => Code::InvalidArgument,
        StorageError::Conflict(_) => Code::FailedPrecondition,
        StorageError::Token(t) => match t {
            TokenError::Unknown | TokenError::Expired | TokenError::Exhausted => {
                Code::Unauthenticated
            }
            TokenError::HostPatternMismatch { .. } => Code::PermissionDenied,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let code = |e: RpcError| Status::from(e).code();
        assert_eq!(code(TokenError::Expired.into_rpc()), Code::Unauthenticated);
        assert_eq!(
            code(TokenError::Exhausted.into_rpc()),
            Code::Unauthenticated
        );
        assert_eq!(
            code(
                TokenError::HostPatternMismatch {
                    host_id: "a".into(),
                    pattern: "b*".into()
                }
                .into_rpc()
            ),
            Code::PermissionDenied
        );
        assert_eq!(
            code(RpcError::InvalidCsr(CsrError::Malformed)),
            Code::InvalidArgument
        );
        assert_eq!(
            code(RpcError::Impersonation {
                certified: "a".into(),
                claimed: "b".into()
            }),
            Code::PermissionDenied
        );
        assert_eq!(
            code(RpcError::Storage(StorageError::Backend("down".into()))),
            Code::Unavailable
        );
    }

    trait IntoRpc {
        fn into_rpc(self) -> RpcError;
    }
    impl IntoRpc for TokenError {
        fn into_rpc(self) -> RpcError {
            RpcError::Storage(StorageError::Token(self))
        }
    }
}
