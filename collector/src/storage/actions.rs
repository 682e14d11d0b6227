//! Rebuild actions as stored: one row per (host, flagging) — the idempotency key — with its
//! state, the body it sends (fixed when it triggers), its attempts, and who approved or rejected
//! it. Every change is compare-and-set on the action's state and carries its audit record in
//! the same transaction.
//!
//! What this module must never do: decide (the dispatcher, `crate::actions::dispatcher`, does);
//! it stores what it is given, refusing only a change of an action that is no longer in the
//! state the caller computed from.

use std::str::FromStr;

use super::audit::AuditEntry;
use super::{StorageError, StoreFuture};

/// Where a rebuild action stands.
///
/// ```text
/// pending_approval ──approve──▶ pending ──trigger──▶ triggered ──2xx / exit 0──▶ delivered
///        │ reject                  │ host left flagged      │ attempts used up      │
///        ▼                         ▼                        ▼                       │
///     rejected                 cancelled                  failed                    │
///                       (dry run: pending ──▶ dry_run)                               │
/// triggered / delivered ──host replaced, retired or re-enrolled──▶ completed ◀───────┘
/// triggered / delivered ──rebuild_timeout──▶ timed_out
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ActionState {
    /// Waiting for an operator (approval mode).
    PendingApproval,
    /// Approved (or no approval needed); waiting for a free slot and the host's cool-down.
    Pending,
    /// Sent (or being retried); the host is `rebuild_requested`. In flight.
    Triggered,
    /// The receiver accepted it; waiting for the host's replacement. In flight.
    Delivered,
    /// The host was replaced, retired or re-enrolled. Final.
    Completed,
    /// Every delivery attempt failed. Final; the host is flagged again.
    Failed,
    /// The host was not replaced within `rebuild_timeout`. Final; the host is flagged again.
    TimedOut,
    /// An operator refused it. Final.
    Rejected,
    /// The host left `flagged` before the action triggered. Final.
    Cancelled,
    /// Dry-run mode: it would have triggered now; nothing was sent. Final.
    DryRun,
}

impl ActionState {
    pub const ALL: [ActionState; 10] = [
        ActionState::PendingApproval,
        ActionState::Pending,
        ActionState::Triggered,
        ActionState::Delivered,
        ActionState::Completed,
        ActionState::Failed,
        ActionState::TimedOut,
        ActionState::Rejected,
        ActionState::Cancelled,
        ActionState::DryRun,
    ];

    /// The name in storage, JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ActionState::PendingApproval => "pending_approval",
            ActionState::Pending => "pending",
            ActionState::Triggered => "triggered",
            ActionState::Delivered => "delivered",
            ActionState::Completed => "completed",
            ActionState::Failed => "failed",
            ActionState::TimedOut => "timed_out",
            ActionState::Rejected => "rejected",
            ActionState::Cancelled => "cancelled",
            ActionState::DryRun => "dry_run",
        }
    }

    /// Nothing moves the action any more.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            ActionState::PendingApproval
                | ActionState::Pending
                | ActionState::Triggered
                | ActionState::Delivered
        )
    }

    /// Counts against `max_in_flight` and the per-image limit.
    pub fn is_in_flight(self) -> bool {
        matches!(self, ActionState::Triggered | ActionState::Delivered)
    }
}

impl std::fmt::Display for ActionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown action state name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown rebuild state {0:?} (expected one of: pending_approval, pending, triggered, \
     delivered, completed, failed, timed_out, rejected, cancelled, dry_run)"
)]
pub struct UnknownActionState(pub String);

impl FromStr for ActionState {
    type Err = UnknownActionState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ActionState::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| UnknownActionState(s.to_string()))
    }
}

/// One rebuild action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RebuildAction {
    /// `rb_` + 20 hex digits derived from the idempotency key; the `webhook-id`.
    pub id: String,
    /// `<host_id>:<flagged_ms>`; unique.
    pub idempotency_key: String,
    pub host_id: String,
    /// The host's image id when the action was created ("" when it never said).
    pub image_id: String,
    pub role: Option<String>,
    /// When the host entered `flagged` (the key's time).
    pub flagged_ms: i64,
    /// Why it was flagged.
    pub reasons: Vec<String>,
    pub state: ActionState,
    /// Created while the collector ran in dry-run mode.
    pub dry_run: bool,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub triggered_ms: Option<i64>,
    /// When it reached a final state.
    pub finished_ms: Option<i64>,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// When the next delivery attempt is due (triggered actions).
    pub next_attempt_ms: Option<i64>,
    /// The last failed attempt's detail.
    pub last_error: Option<String>,
    /// Audit actor of the approval or rejection.
    pub decided_by: Option<String>,
    pub decision_reason: Option<String>,
    /// How it ended, for people (the cancel cause, the state the host reached, …).
    pub note: Option<String>,
    /// The request body, fixed when it triggered.
    pub payload: Option<Vec<u8>>,
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptRecord {
    pub action_id: String,
    /// 1-based.
    pub attempt: u32,
    pub at_ms: i64,
    pub duration_ms: i64,
    pub delivered: bool,
    /// HTTP status or exit code.
    pub status: Option<i32>,
    /// Bounded and escaped.
    pub detail: String,
}

/// A listing. Newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActionFilter {
    pub state: Option<ActionState>,
    pub host_id: Option<String>,
    /// At most this many; 0 = 1000.
    pub limit: u32,
}

/// Mutual exclusion of dispatchers sharing one database.
pub trait DispatchLock: Send + Sync + std::fmt::Debug {
    /// Tries to become the only dispatcher until [`DispatchLock::release`]; false when another
    /// holds it.
    fn try_acquire(&mut self) -> StoreFuture<'_, bool>;
    fn release(&mut self) -> StoreFuture<'_, ()>;
}

/// Stored rebuild actions.
pub trait ActionStore {
    /// Inserts a new action with its audit record; false (and nothing written) when an action
    /// with the same idempotency key exists.
    fn create_action(&self, action: RebuildAction, audit: AuditEntry) -> StoreFuture<'_, bool>;
    /// Replaces the stored action `action.id` with `action` if it is still in `expected`,
    /// adds `attempt` if given and the audit record, in one transaction; false (nothing
    /// written) when its state moved meanwhile or it does not exist.
    fn update_action(
        &self,
        expected: ActionState,
        action: RebuildAction,
        attempt: Option<AttemptRecord>,
        audit: AuditEntry,
    ) -> StoreFuture<'_, bool>;
    fn action(&self, id: &str) -> StoreFuture<'_, Option<RebuildAction>>;
    fn list_actions(&self, filter: ActionFilter) -> StoreFuture<'_, Vec<RebuildAction>>;
    /// The attempts of one action, oldest first.
    fn action_attempts(&self, id: &str) -> StoreFuture<'_, Vec<AttemptRecord>>;
    /// What the dispatcher decides from: every action not in a final state, every action whose
    /// key is in `keys`, and every action triggered at or after `triggered_since_ms`.
    fn dispatch_view(
        &self,
        keys: Vec<String>,
        triggered_since_ms: i64,
    ) -> StoreFuture<'_, Vec<RebuildAction>>;
    /// The lock a dispatcher holds for each round: PostgreSQL takes a session-level
    /// `pg_try_advisory_lock` on its own connection; SQLite (one collector process per
    /// database file) always grants it.
    fn dispatch_lock(&self) -> StoreFuture<'_, Box<dyn DispatchLock>>;
}

/// The action id of an idempotency key: stable, so a re-created action has the same id.
pub fn action_id(idempotency_key: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, idempotency_key.as_bytes());
    format!("rb_{}", crate::api::hex(&d.as_ref()[..10]))
}

/// The idempotency key of a flagging.
pub fn idempotency_key(host_id: &str, flagged_ms: i64) -> String {
    format!("{host_id}:{flagged_ms}")
}

/// Reasons as stored (a JSON array of strings).
pub(crate) fn reasons_to_json(reasons: &[String]) -> String {
    serde_json::to_string(reasons).unwrap_or_else(|_| "[]".into())
}

pub(crate) fn reasons_from_json(text: &str) -> Result<Vec<String>, StorageError> {
    serde_json::from_str(text).map_err(|e| StorageError::Corrupt {
        table: "rebuild_actions",
        detail: format!("reasons: {e}"),
    })
}

pub(crate) fn state_from_name(name: &str) -> Result<ActionState, StorageError> {
    name.parse()
        .map_err(|e: UnknownActionState| StorageError::Corrupt {
            table: "rebuild_actions",
            detail: e.to_string(),
        })
}

/// Names of the states that are not final (what a dispatcher still moves).
pub(crate) fn open_state_names() -> Vec<&'static str> {
    ActionState::ALL
        .into_iter()
        .filter(|s| !s.is_final())
        .map(ActionState::name)
        .collect()
}

/// The default and maximum of [`ActionFilter::limit`].
pub const DEFAULT_ACTION_LIMIT: u32 = 1000;

pub(crate) fn effective_limit(limit: u32) -> i64 {
    i64::from(if limit == 0 {
        DEFAULT_ACTION_LIMIT
    } else {
        limit
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_classes() {
        for s in ActionState::ALL {
            assert_eq!(s.name().parse::<ActionState>(), Ok(s));
            assert!(!(s.is_final() && s.is_in_flight()), "{s}");
        }
        assert!("Pending".parse::<ActionState>().is_err());
        assert_eq!(ActionState::ALL.iter().filter(|s| !s.is_final()).count(), 4);
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        let a = action_id(&idempotency_key("web-1", 1000));
        assert_eq!(a, action_id("web-1:1000"));
        assert_eq!(a.len(), 23);
        assert!(a.starts_with("rb_"));
        assert_ne!(a, action_id("web-1:1001"));
    }
}
