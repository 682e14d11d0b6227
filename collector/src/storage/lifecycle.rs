//! Storage of the host lifecycle (`crate::lifecycle`): each host's current state, every
//! transition with its cause and actor, and operators' acknowledgements of violations.
//!
//! A host without a stored state is `enrolled` since its enrollment. A transition is recorded
//! only if the host is still in the state it was computed from (compare-and-set) and the move
//! is one the state machine allows; it is stored with its audit record in one transaction.

use driftwatch_proto::v1::{DriftItem, drift_item};

use super::audit::AuditEntry;
use super::{StorageError, StoreFuture};
use crate::lifecycle::Lifecycle;

/// A host's lifecycle state and what replacement matching needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLifecycle {
    pub host_id: String,
    pub state: Lifecycle,
    /// When it entered `state` (its enrollment for a host never moved).
    pub since_ms: i64,
    /// Its enrollment label `role`, if any.
    pub role: Option<String>,
    /// The image id of its last `Hello` (empty before the first).
    pub image_id: String,
    pub enrolled_ms: i64,
}

/// One move of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionRecord {
    pub host_id: String,
    pub from: Lifecycle,
    pub to: Lifecycle,
    pub at_ms: i64,
    /// Why, for people: the flagging reasons, the successor's id, the operator's reason.
    pub cause: String,
    /// `collector`, `token:<id>`, `host:<id>`, `local:<user>` (as in the audit log).
    pub actor: String,
}

/// What an operator acknowledges on one host: open violations at these paths, of these
/// packages, or all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRequest {
    pub host_id: String,
    pub paths: Vec<Vec<u8>>,
    /// Package names (`name` or `name:arch`).
    pub packages: Vec<String>,
    /// Every open violation of the host.
    pub all: bool,
    pub reason: String,
    pub actor: String,
    pub at_ms: i64,
    pub expires_ms: i64,
}

/// An acknowledgement of one open violation: it stops counting toward flagging until
/// `expires_ms`, and only while the violation is exactly what was acknowledged (`item_hash`):
/// a further change of the same path counts again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acknowledgement {
    pub host_id: String,
    pub key: Vec<u8>,
    pub item_hash: [u8; 32],
    pub path: Option<Vec<u8>>,
    pub package: Option<String>,
    pub reason: String,
    pub actor: String,
    pub at_ms: i64,
    pub expires_ms: i64,
}

/// The lifecycle part of the collector's storage.
pub trait LifecycleStore: Send + Sync {
    /// Every host's state, role label and image id, by host id.
    fn lifecycle_states(&self) -> StoreFuture<'_, Vec<HostLifecycle>>;
    /// Records `t` if the host is still in `t.from` and the move is allowed
    /// (`crate::lifecycle::allowed`; otherwise `InvalidArgument`), with `audit` in the same
    /// transaction. `false` when the host was no longer in `t.from` (nothing written).
    fn record_transition(&self, t: TransitionRecord, audit: AuditEntry) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let recorded = self.record_transitions(vec![(t, audit)]).await?;
            Ok(recorded.first().copied().unwrap_or(false))
        })
    }
    /// [`record_transition`](Self::record_transition) for many moves in one transaction (one
    /// commit), in order: each is compare-and-set on its own, so a move whose host is no longer
    /// in its `from` state is skipped (`false` at its index) and the others are recorded, each
    /// with its audit record, chained in order. A move the state machine does not allow or an
    /// unknown host fails the whole call and nothing is written.
    fn record_transitions(
        &self,
        moves: Vec<(TransitionRecord, AuditEntry)>,
    ) -> StoreFuture<'_, Vec<bool>>;
    /// A host's transitions, newest first; `limit` 0 = 1000.
    fn transitions(&self, host_id: &str, limit: u32) -> StoreFuture<'_, Vec<TransitionRecord>>;
    /// Acknowledges the host's open violations the request names, with `audit` in the same
    /// transaction. `InvalidArgument` when a named path or package has no open violation
    /// (nothing is written then).
    fn acknowledge(
        &self,
        req: AckRequest,
        audit: AuditEntry,
    ) -> StoreFuture<'_, Vec<Acknowledgement>>;
    /// Acknowledgements not expired at `now_ms` (of one host, or all), oldest first.
    fn acknowledgements(
        &self,
        host_id: Option<&str>,
        now_ms: i64,
    ) -> StoreFuture<'_, Vec<Acknowledgement>>;
}

/// An open violation as `acknowledge` sees it: key, item hash and the decoded item.
pub(crate) struct OpenForAck {
    pub key: Vec<u8>,
    pub item_hash: [u8; 32],
    pub item: DriftItem,
}

/// The acknowledgements `req` asks for among the host's open violations, shared by both
/// backends. Every named path and package must match at least one open violation.
pub(crate) fn match_acks(
    req: &AckRequest,
    open: &[OpenForAck],
) -> Result<Vec<Acknowledgement>, StorageError> {
    if req.reason.trim().is_empty() {
        return Err(StorageError::InvalidArgument(
            "an acknowledgement needs a reason".into(),
        ));
    }
    if req.expires_ms <= req.at_ms {
        return Err(StorageError::InvalidArgument(
            "an acknowledgement must expire in the future".into(),
        ));
    }
    if !req.all && req.paths.is_empty() && req.packages.is_empty() {
        return Err(StorageError::InvalidArgument(
            "name the paths or packages to acknowledge, or all".into(),
        ));
    }
    let described: Vec<(Option<Vec<u8>>, Option<String>)> = open
        .iter()
        .map(|o| match &o.item.item {
            Some(drift_item::Item::File(f)) => (Some(f.path.clone()), None),
            Some(drift_item::Item::Package(p)) => (
                None,
                Some(if p.arch.is_empty() {
                    p.name.clone()
                } else {
                    format!("{}:{}", p.name, p.arch)
                }),
            ),
            None => (None, None),
        })
        .collect();
    let package_matches = |want: &str, have: &str| {
        have == want || have.split_once(':').is_some_and(|(name, _)| name == want)
    };
    for p in &req.paths {
        if !described.iter().any(|(path, _)| path.as_deref() == Some(p)) {
            return Err(StorageError::InvalidArgument(format!(
                "no open violation at path {}",
                driftwatch_proto::escape::bytes(p)
            )));
        }
    }
    for want in &req.packages {
        if !described
            .iter()
            .any(|(_, pkg)| pkg.as_deref().is_some_and(|h| package_matches(want, h)))
        {
            return Err(StorageError::InvalidArgument(format!(
                "no open drift of package {}",
                driftwatch_proto::escape::text(want)
            )));
        }
    }
    Ok(open
        .iter()
        .zip(described)
        .filter(|(_, (path, pkg))| {
            req.all
                || path.as_ref().is_some_and(|p| req.paths.contains(p))
                || pkg
                    .as_deref()
                    .is_some_and(|h| req.packages.iter().any(|w| package_matches(w, h)))
        })
        .map(|(o, (path, package))| Acknowledgement {
            host_id: req.host_id.clone(),
            key: o.key.clone(),
            item_hash: o.item_hash,
            path,
            package,
            reason: req.reason.clone(),
            actor: req.actor.clone(),
            at_ms: req.at_ms,
            expires_ms: req.expires_ms,
        })
        .collect())
}

/// Refuses a transition the state machine does not allow.
pub(crate) fn check_transition(t: &TransitionRecord) -> Result<(), StorageError> {
    if crate::lifecycle::allowed(t.from, t.to) {
        Ok(())
    } else {
        Err(StorageError::InvalidArgument(format!(
            "host {:?}: {} → {} is not an allowed lifecycle transition",
            t.host_id, t.from, t.to
        )))
    }
}

/// A stored state name back to the enum.
pub(crate) fn parse_state(table: &'static str, s: &str) -> Result<Lifecycle, StorageError> {
    s.parse().map_err(
        |e: crate::lifecycle::UnknownLifecycle| StorageError::Corrupt {
            table,
            detail: e.to_string(),
        },
    )
}
