//! API tokens: who may use the HTTP API, and with which role.
//!
//! A token is `dwa_<8 hex id>_<secret>` (`crate::token`); only the SHA-256 of the whole string
//! is stored, with a name, a role, when it was made, when it expires, when it was revoked and
//! when it was last used. A token is looked up by that hash only, never by its id, so a
//! request's timing says nothing about which ids exist.
//!
//! What this module owns: the value types and [`AccessStore`]. What it must never do: store or
//! return a secret, or change a token without appending its audit record in the same
//! transaction.

use std::fmt;
use std::str::FromStr;

use super::StoreFuture;
use super::audit::AuditEntry;

/// What a caller of the HTTP API may do. Ordered: a higher role may do everything a lower
/// one may.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads everything, the audit log included; changes nothing.
    Auditor,
    /// Also acknowledges violations, approves or rejects rebuilds, retires hosts.
    Operator,
    /// Also manages API tokens, enrollment tokens, baselines and policy.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Auditor, Role::Operator, Role::Admin];

    /// The name in JSON, the database and the command line.
    pub fn name(self) -> &'static str {
        match self {
            Role::Auditor => "auditor",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether a caller with this role may do what `needed` allows.
    pub fn includes(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A role name that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (auditor, operator or admin)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// Longest token name, in bytes.
pub const MAX_TOKEN_NAME: usize = 128;

/// An API token as stored (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// The public id (8 hex digits), unique.
    pub id: String,
    /// Who or what it is for ("ci-export", "alice"); shown in listings and audit records.
    pub name: String,
    pub role: Role,
    /// SHA-256 of the whole token string.
    pub secret_sha256: [u8; 32],
    pub created_ms: i64,
    /// `None`: does not expire.
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
    /// Updated at most once a minute ([`LAST_USED_GRANULARITY_MS`]).
    pub last_used_ms: Option<i64>,
    /// The audit actor that made it (`local:root`, `token:0123abcd`).
    pub created_by: String,
}

/// `last_used_ms` is written at most this often per token.
pub const LAST_USED_GRANULARITY_MS: i64 = 60_000;

impl ApiToken {
    /// Whether the token is usable at `now_ms` (not revoked, not expired).
    pub fn active_at(&self, now_ms: i64) -> bool {
        self.revoked_ms.is_none() && self.expires_ms.is_none_or(|e| e > now_ms)
    }
}

/// A token name: 1–128 bytes, no control characters (it is shown in tables and logs).
pub fn check_token_name(name: &str) -> Result<(), super::StorageError> {
    if name.trim().is_empty() || name.len() > MAX_TOKEN_NAME || name.chars().any(char::is_control) {
        return Err(super::StorageError::InvalidArgument(format!(
            "token name must be 1–{MAX_TOKEN_NAME} bytes without control characters"
        )));
    }
    Ok(())
}

/// What revoking a token did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeOutcome {
    Revoked,
    /// It was revoked before (at that time); nothing changed and nothing was audited.
    AlreadyRevoked(i64),
    NotFound,
}

/// API tokens in storage.
pub trait AccessStore {
    /// Stores a new token and appends `audit` (`api_token.created`) in the same transaction.
    /// The id and the hash must be unique ([`super::StorageError::InvalidArgument`] otherwise).
    fn create_api_token(&self, token: ApiToken, audit: AuditEntry) -> StoreFuture<'_, ()>;
    /// Every token, oldest first (revoked and expired ones included).
    fn list_api_tokens(&self) -> StoreFuture<'_, Vec<ApiToken>>;
    /// The token whose whole string hashes to `secret_sha256`, whatever its state.
    fn api_token_by_hash(&self, secret_sha256: [u8; 32]) -> StoreFuture<'_, Option<ApiToken>>;
    /// Revokes a token and appends `audit` (`api_token.revoked`) in the same transaction.
    fn revoke_api_token(
        &self,
        id: &str,
        now_ms: i64,
        audit: AuditEntry,
    ) -> StoreFuture<'_, RevokeOutcome>;
    /// Sets `last_used_ms` to `now_ms` unless it was set less than
    /// [`LAST_USED_GRANULARITY_MS`] before (one cheap conditional UPDATE; no audit record:
    /// use is not a change).
    fn touch_api_token(&self, id: &str, now_ms: i64) -> StoreFuture<'_, ()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered_and_named() {
        assert!(Role::Admin.includes(Role::Operator));
        assert!(Role::Admin.includes(Role::Auditor));
        assert!(Role::Operator.includes(Role::Auditor));
        assert!(!Role::Auditor.includes(Role::Operator));
        assert!(!Role::Operator.includes(Role::Admin));
        for r in Role::ALL {
            assert!(r.includes(r));
            assert_eq!(r.name().parse::<Role>().unwrap(), r);
        }
        assert!("Admin".parse::<Role>().is_err());
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn names_and_activity() {
        assert!(check_token_name("ci export").is_ok());
        assert!(check_token_name("").is_err());
        assert!(check_token_name("  ").is_err());
        assert!(check_token_name("a\x1b[31m").is_err());
        assert!(check_token_name(&"x".repeat(129)).is_err());
        let mut t = ApiToken {
            id: "0123abcd".into(),
            name: "n".into(),
            role: Role::Auditor,
            secret_sha256: [0; 32],
            created_ms: 0,
            expires_ms: Some(100),
            revoked_ms: None,
            last_used_ms: None,
            created_by: "local:root".into(),
        };
        assert!(t.active_at(99));
        assert!(!t.active_at(100));
        t.expires_ms = None;
        assert!(t.active_at(i64::MAX));
        t.revoked_ms = Some(5);
        assert!(!t.active_at(0));
    }
}
