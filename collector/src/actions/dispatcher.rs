//! The rebuild dispatcher: every `interval` it takes one round — under the store's dispatch
//! lock, so of several collectors on one PostgreSQL database only one acts — in which it
//!
//! 1. reads the hosts' lifecycle states and the actions that matter ([`ActionStore::dispatch_view`]),
//! 2. decides with the pure [`decide`] what to do (create, cancel, trigger, deliver, complete,
//!    time out),
//! 3. does it: storage changes one by one (each with its audit record), then every due
//!    delivery concurrently (at most `max_in_flight` of them, each bounded by the timeout).
//!
//! Crash safety: the host moves to `rebuild_requested` *before* its action is marked
//! `triggered`, and a `pending` action whose host is already `rebuild_requested` is resumed, so
//! a crash between the two writes loses nothing and sends nothing twice; a delivery attempt
//! interrupted by a crash is repeated (the receiver deduplicates by `webhook-id` /
//! the idempotency key).
//!
//! What this module must never do: trigger a host that is not `flagged`, exceed the limits,
//! or send anything in dry-run mode.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::sync::watch;

use super::config::ActionSettings;
use super::executor::{self, AttemptOutcome, DeliveryRequest, Executor};
use super::payload::{self, PayloadInput};
use crate::lifecycle::Lifecycle;
use crate::storage::actions::{
    ActionState, AttemptRecord, DispatchLock, RebuildAction, action_id, idempotency_key,
};
use crate::storage::audit::AuditEntry;
use crate::storage::lifecycle::TransitionRecord;
use crate::storage::{Storage, StorageError, ViolationQuery};

/// The audit actor of the dispatcher's own decisions.
pub const ACTOR: &str = "collector";

/// Open items read for a request's violation summary.
const SUMMARY_ITEMS: u32 = 5000;

/// The limits and modes [`decide`] applies (from [`ActionSettings`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub approval: bool,
    pub dry_run: bool,
    pub max_in_flight: u32,
    pub max_percent_per_image: u8,
    pub cooldown_ms: i64,
    pub rebuild_timeout_ms: i64,
}

impl Policy {
    pub fn from_settings(s: &ActionSettings) -> Policy {
        Policy {
            approval: s.approval,
            dry_run: s.dry_run,
            max_in_flight: s.max_in_flight.get(),
            max_percent_per_image: s.max_percent_per_image,
            cooldown_ms: millis(s.cooldown),
            rebuild_timeout_ms: millis(s.rebuild_timeout),
        }
    }

    /// How many of an image's `live_hosts` may be in flight at once: `P %` rounded down, but
    /// at least one (otherwise an image with few hosts could never be rebuilt).
    pub fn per_image_limit(&self, live_hosts: usize) -> usize {
        (live_hosts * usize::from(self.max_percent_per_image) / 100).max(1)
    }
}

/// What the dispatcher knows of a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    pub host_id: String,
    pub state: Lifecycle,
    /// When it entered `state`.
    pub since_ms: i64,
    pub role: Option<String>,
    /// "" when the host never said.
    pub image_id: String,
}

/// One thing to do, in the order [`decide`] returns them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A flagged host has no action for its flagging yet.
    Create {
        host_id: String,
        flagged_ms: i64,
        image_id: String,
        role: Option<String>,
        /// Approval mode: created `pending_approval`.
        awaiting_approval: bool,
    },
    /// A pending action whose host left `flagged` (or that flagging).
    Cancel { id: String, reason: String },
    /// A pending action whose host is already `rebuild_requested`: the trigger was interrupted
    /// after the host moved; finish it (mark it triggered, deliver).
    Resume { id: String },
    /// The host's request resolved: it was replaced, retired or re-enrolled (or is gone).
    Complete { id: String, note: String },
    /// Triggered longer than `rebuild_timeout` ago and the host is still waiting.
    TimeOut { id: String },
    /// A pending action gets a slot now (dry run: is recorded as what would have triggered).
    Trigger { id: String, dry_run: bool },
    /// A triggered action's next attempt is due.
    Deliver { id: String },
}

/// Why an action waits (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    InFlightLimit,
    ImageLimit,
    Cooldown,
}

/// The pure decision of one round. `actions` is what [`ActionStore::dispatch_view`] returned
/// for the keys of the flagged hosts and the cool-down window.
///
/// [`ActionStore::dispatch_view`]: crate::storage::actions::ActionStore::dispatch_view
pub fn decide(
    now_ms: i64,
    policy: &Policy,
    hosts: &[HostView],
    actions: &[RebuildAction],
) -> (Vec<Step>, Vec<(String, Held)>) {
    let by_host: HashMap<&str, &HostView> = hosts.iter().map(|h| (h.host_id.as_str(), h)).collect();
    let keys: HashSet<&str> = actions.iter().map(|a| a.idempotency_key.as_str()).collect();
    let mut live_per_image: HashMap<&str, usize> = HashMap::new();
    for h in hosts.iter().filter(|h| !h.state.is_terminal()) {
        *live_per_image.entry(h.image_id.as_str()).or_default() += 1;
    }
    // Last real trigger per host (dry runs send nothing, so they start no cool-down).
    let mut last_trigger: HashMap<&str, i64> = HashMap::new();
    for a in actions.iter().filter(|a| a.state != ActionState::DryRun) {
        if let Some(t) = a.triggered_ms {
            let e = last_trigger.entry(a.host_id.as_str()).or_insert(t);
            *e = (*e).max(t);
        }
    }

    let mut steps = Vec::new();
    let mut in_flight_total = 0usize;
    let mut in_flight_image: HashMap<&str, usize> = HashMap::new();
    let mut candidates: Vec<&RebuildAction> = Vec::new();
    let mut deliveries = Vec::new();

    for a in actions {
        let host = by_host.get(a.host_id.as_str());
        match a.state {
            ActionState::Triggered | ActionState::Delivered => match host {
                Some(h) if h.state == Lifecycle::RebuildRequested => {
                    let since = a.triggered_ms.unwrap_or(a.created_ms);
                    if now_ms >= since.saturating_add(policy.rebuild_timeout_ms) {
                        steps.push(Step::TimeOut { id: a.id.clone() });
                    } else {
                        in_flight_total += 1;
                        *in_flight_image.entry(a.image_id.as_str()).or_default() += 1;
                        let due = a.next_attempt_ms.is_some_and(|t| t <= now_ms);
                        if a.state == ActionState::Triggered && due {
                            deliveries.push(Step::Deliver { id: a.id.clone() });
                        }
                    }
                }
                Some(h) => steps.push(Step::Complete {
                    id: a.id.clone(),
                    note: format!("host is {}", h.state),
                }),
                None => steps.push(Step::Complete {
                    id: a.id.clone(),
                    note: "host is no longer known".into(),
                }),
            },
            ActionState::Pending | ActionState::PendingApproval => match host {
                Some(h) if h.state == Lifecycle::Flagged && h.since_ms == a.flagged_ms => {
                    if a.state == ActionState::Pending {
                        candidates.push(a);
                    }
                }
                Some(h)
                    if a.state == ActionState::Pending
                        && h.state == Lifecycle::RebuildRequested
                        && h.since_ms >= a.created_ms =>
                {
                    // Our own interrupted trigger (only the dispatcher requests rebuilds, and
                    // a host has one open action per flagging).
                    in_flight_total += 1;
                    *in_flight_image.entry(a.image_id.as_str()).or_default() += 1;
                    steps.push(Step::Resume { id: a.id.clone() });
                }
                Some(h) => steps.push(Step::Cancel {
                    id: a.id.clone(),
                    reason: if h.state == Lifecycle::Flagged {
                        "the host was flagged again since".into()
                    } else {
                        format!("the host is {} now", h.state)
                    },
                }),
                None => steps.push(Step::Cancel {
                    id: a.id.clone(),
                    reason: "the host is no longer known".into(),
                }),
            },
            _ => {}
        }
    }

    for h in hosts.iter().filter(|h| h.state == Lifecycle::Flagged) {
        let key = idempotency_key(&h.host_id, h.since_ms);
        if !keys.contains(key.as_str()) {
            steps.push(Step::Create {
                host_id: h.host_id.clone(),
                flagged_ms: h.since_ms,
                image_id: h.image_id.clone(),
                role: h.role.clone(),
                awaiting_approval: policy.approval,
            });
        }
    }

    // Oldest first; ties by host id, so the order is the same on every replica.
    candidates
        .sort_by(|a, b| (a.created_ms, &a.host_id, &a.id).cmp(&(b.created_ms, &b.host_id, &b.id)));
    let mut held = Vec::new();
    let max_total = usize::try_from(policy.max_in_flight).unwrap_or(usize::MAX);
    for a in candidates {
        if in_flight_total >= max_total {
            held.push((a.id.clone(), Held::InFlightLimit));
            continue;
        }
        let image = a.image_id.as_str();
        let live = live_per_image.get(image).copied().unwrap_or(1);
        let busy = in_flight_image.get(image).copied().unwrap_or(0);
        if busy >= policy.per_image_limit(live) {
            held.push((a.id.clone(), Held::ImageLimit));
            continue;
        }
        if let Some(t) = last_trigger.get(a.host_id.as_str())
            && now_ms < t.saturating_add(policy.cooldown_ms)
        {
            held.push((a.id.clone(), Held::Cooldown));
            continue;
        }
        // A dry-run trigger holds its slot for this round only, so one round never "triggers"
        // more than the limits would allow.
        in_flight_total += 1;
        *in_flight_image.entry(image).or_default() += 1;
        steps.push(Step::Trigger {
            id: a.id.clone(),
            dry_run: policy.dry_run,
        });
    }
    steps.extend(deliveries);
    (steps, held)
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn audit(at_ms: i64, action: &str, a: &RebuildAction, detail: serde_json::Value) -> AuditEntry {
    let mut d = json!({
        "action_id": a.id,
        "idempotency_key": a.idempotency_key,
        "state": a.state.name(),
        "dry_run": a.dry_run,
    });
    if let (Some(obj), serde_json::Value::Object(extra)) = (d.as_object_mut(), detail) {
        obj.extend(extra);
    }
    AuditEntry {
        at_ms,
        actor: ACTOR.into(),
        action: action.into(),
        target: a.host_id.clone(),
        detail: d,
    }
}

/// The dispatcher task's parts.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    store: Arc<dyn Storage>,
    settings: ActionSettings,
    policy: Policy,
    executor: Executor,
}

/// What one round did (for logs and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundReport {
    /// False when another dispatcher held the lock.
    pub acted: bool,
    pub steps: usize,
    pub held: usize,
    pub deliveries: usize,
}

impl Dispatcher {
    pub fn new(store: Arc<dyn Storage>, settings: ActionSettings, executor: Executor) -> Self {
        Dispatcher {
            policy: Policy::from_settings(&settings),
            store,
            settings,
            executor,
        }
    }

    /// Runs rounds every `interval` until `stop` is set. A round's errors are logged; the next
    /// round starts from the stored state again.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut lock: Option<Box<dyn DispatchLock>> = None;
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::info!(
            interval = ?self.settings.interval,
            approval = self.policy.approval,
            dry_run = self.policy.dry_run,
            max_in_flight = self.policy.max_in_flight,
            "rebuild dispatcher started"
        );
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = crate::server::stop_requested(&mut stop) => break,
            }
            if lock.is_none() {
                match self.store.dispatch_lock().await {
                    Ok(l) => lock = Some(l),
                    Err(e) => {
                        tracing::warn!(error = %e, "rebuild dispatcher: no dispatch lock");
                        continue;
                    }
                }
            }
            let Some(l) = lock.as_mut() else { continue };
            // A round ends on its own (every delivery is bounded by the timeout); stopping
            // waits for it so no attempt is left half-recorded.
            match self.round(l.as_mut(), now_ms()).await {
                Ok(r) if r.steps > 0 => tracing::debug!(?r, "rebuild dispatch round"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "rebuild dispatch round failed"),
            }
        }
        if let Some(mut l) = lock
            && let Err(e) = l.release().await
        {
            tracing::debug!(error = %e, "releasing the dispatch lock");
        }
        tracing::info!("rebuild dispatcher stopped");
    }

    /// One round at `now` (see the module doc).
    pub async fn round(
        &self,
        lock: &mut dyn DispatchLock,
        now: i64,
    ) -> Result<RoundReport, StorageError> {
        if !lock.try_acquire().await? {
            return Ok(RoundReport::default());
        }
        let result = self.round_locked(now).await;
        let released = lock.release().await;
        let report = result?;
        released?;
        Ok(report)
    }

    async fn round_locked(&self, now: i64) -> Result<RoundReport, StorageError> {
        let hosts: Vec<HostView> = self
            .store
            .lifecycle_states()
            .await?
            .into_iter()
            .map(|h| HostView {
                host_id: h.host_id,
                state: h.state,
                since_ms: h.since_ms,
                role: h.role,
                image_id: h.image_id,
            })
            .collect();
        let keys = hosts
            .iter()
            .filter(|h| h.state == Lifecycle::Flagged)
            .map(|h| idempotency_key(&h.host_id, h.since_ms))
            .collect();
        let actions = self
            .store
            .dispatch_view(keys, now.saturating_sub(self.policy.cooldown_ms))
            .await?;
        let (steps, held) = decide(now, &self.policy, &hosts, &actions);
        let mut report = RoundReport {
            acted: true,
            steps: steps.len(),
            held: held.len(),
            deliveries: 0,
        };
        let mut by_id: BTreeMap<String, RebuildAction> =
            actions.into_iter().map(|a| (a.id.clone(), a)).collect();
        let mut due = Vec::new();
        for step in steps {
            match step {
                Step::Create {
                    host_id,
                    flagged_ms,
                    image_id,
                    role,
                    awaiting_approval,
                } => {
                    self.create(now, host_id, flagged_ms, image_id, role, awaiting_approval)
                        .await?;
                }
                Step::Cancel { id, reason } => {
                    if let Some(a) = by_id.remove(&id) {
                        self.finish(now, a, ActionState::Cancelled, "rebuild.cancelled", &reason)
                            .await?;
                    }
                }
                Step::Complete { id, note } => {
                    if let Some(a) = by_id.remove(&id) {
                        self.finish(now, a, ActionState::Completed, "rebuild.completed", &note)
                            .await?;
                    }
                }
                Step::TimeOut { id } => {
                    if let Some(a) = by_id.remove(&id) {
                        self.time_out(now, a).await?;
                    }
                }
                Step::Resume { id } => {
                    if let Some(a) = by_id.remove(&id)
                        && let Some(a) = self.mark_triggered(now, a, true).await?
                    {
                        due.push(a);
                    }
                }
                Step::Trigger { id, dry_run } => {
                    if let Some(a) = by_id.remove(&id)
                        && let Some(a) = self.trigger(now, a, dry_run).await?
                    {
                        due.push(a);
                    }
                }
                Step::Deliver { id } => {
                    if let Some(a) = by_id.remove(&id) {
                        due.push(a);
                    }
                }
            }
        }
        report.deliveries = due.len();
        // Every due delivery at once: they are at most max_in_flight, each bounded by the
        // timeout, and each records its own outcome.
        let results =
            futures_util::future::join_all(due.into_iter().map(|a| self.deliver(a))).await;
        for r in results {
            r?;
        }
        Ok(report)
    }

    async fn create(
        &self,
        now: i64,
        host_id: String,
        flagged_ms: i64,
        image_id: String,
        role: Option<String>,
        awaiting_approval: bool,
    ) -> Result<(), StorageError> {
        let key = idempotency_key(&host_id, flagged_ms);
        let reasons = self.flag_reasons(&host_id, flagged_ms).await?;
        let a = RebuildAction {
            id: action_id(&key),
            idempotency_key: key,
            host_id,
            image_id,
            role,
            flagged_ms,
            reasons,
            state: if awaiting_approval {
                ActionState::PendingApproval
            } else {
                ActionState::Pending
            },
            dry_run: self.policy.dry_run,
            created_ms: now,
            updated_ms: now,
            triggered_ms: None,
            finished_ms: None,
            attempts: 0,
            next_attempt_ms: None,
            last_error: None,
            decided_by: None,
            decision_reason: None,
            note: None,
            payload: None,
        };
        let entry = audit(
            now,
            "rebuild.requested",
            &a,
            json!({ "reasons": a.reasons, "awaiting_approval": awaiting_approval }),
        );
        let (id, host) = (a.id.clone(), a.host_id.clone());
        if self.store.create_action(a, entry).await? {
            tracing::info!(action = %id, %host, awaiting_approval, "rebuild action created");
        }
        Ok(())
    }

    /// Why the host was flagged: the cause of its transition into `flagged` at `flagged_ms`.
    async fn flag_reasons(
        &self,
        host_id: &str,
        flagged_ms: i64,
    ) -> Result<Vec<String>, StorageError> {
        let transitions = self.store.transitions(host_id, 20).await?;
        Ok(transitions
            .into_iter()
            .find(|t| t.to == Lifecycle::Flagged && t.at_ms == flagged_ms)
            .map(|t| {
                t.cause
                    .split("; ")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Moves a non-final action to a final state with a note.
    async fn finish(
        &self,
        now: i64,
        a: RebuildAction,
        to: ActionState,
        audit_action: &str,
        note: &str,
    ) -> Result<bool, StorageError> {
        let from = a.state;
        let mut b = a;
        b.state = to;
        b.updated_ms = now;
        b.finished_ms = Some(now);
        b.next_attempt_ms = None;
        b.note = Some(note.to_string());
        let entry = audit(
            now,
            audit_action,
            &b,
            json!({ "from": from.name(), "note": note }),
        );
        self.store.update_action(from, b, None, entry).await
    }

    async fn time_out(&self, now: i64, a: RebuildAction) -> Result<(), StorageError> {
        let note = format!(
            "the host was not replaced within {}",
            humantime::format_duration(self.settings.rebuild_timeout)
        );
        let host_id = a.host_id.clone();
        let id = a.id.clone();
        if self
            .finish(now, a, ActionState::TimedOut, "rebuild.timed_out", &note)
            .await?
        {
            self.reflag(now, &host_id, &format!("rebuild {id} timed out"))
                .await?;
        }
        Ok(())
    }

    /// The rebuild gave up: the host goes back to `flagged` (a new flagging, so a new action
    /// after the cool-down).
    async fn reflag(&self, now: i64, host_id: &str, cause: &str) -> Result<(), StorageError> {
        let t = TransitionRecord {
            host_id: host_id.to_string(),
            from: Lifecycle::RebuildRequested,
            to: Lifecycle::Flagged,
            at_ms: now,
            cause: cause.to_string(),
            actor: ACTOR.into(),
        };
        let entry = AuditEntry {
            at_ms: now,
            actor: ACTOR.into(),
            action: "host.flagged".into(),
            target: host_id.to_string(),
            detail: json!({ "from": "rebuild_requested", "cause": cause }),
        };
        self.store.record_transition(t, entry).await?;
        Ok(())
    }

    /// Trigger: build the body, move the host to `rebuild_requested`, mark the action
    /// triggered. Returns the action when a delivery is due.
    async fn trigger(
        &self,
        now: i64,
        a: RebuildAction,
        dry_run: bool,
    ) -> Result<Option<RebuildAction>, StorageError> {
        let body = self.build_body(now, &a, dry_run).await?;
        let mut a = a;
        a.payload = Some(body);
        if dry_run {
            let mut b = a.clone();
            b.state = ActionState::DryRun;
            b.dry_run = true;
            b.triggered_ms = Some(now);
            b.finished_ms = Some(now);
            b.updated_ms = now;
            b.note = Some("dry run: would have triggered now; nothing was sent".into());
            let entry = audit(
                now,
                "rebuild.triggered",
                &b,
                json!({ "sent": false, "note": b.note }),
            );
            self.store.update_action(a.state, b, None, entry).await?;
            return Ok(None);
        }
        let t = TransitionRecord {
            host_id: a.host_id.clone(),
            from: Lifecycle::Flagged,
            to: Lifecycle::RebuildRequested,
            at_ms: now,
            cause: format!("rebuild {} triggered", a.id),
            actor: ACTOR.into(),
        };
        let entry = AuditEntry {
            at_ms: now,
            actor: ACTOR.into(),
            action: "host.rebuild_requested".into(),
            target: a.host_id.clone(),
            detail: json!({ "action_id": a.id, "idempotency_key": a.idempotency_key }),
        };
        if !self.store.record_transition(t, entry).await? {
            self.finish(
                now,
                a,
                ActionState::Cancelled,
                "rebuild.cancelled",
                "the host left flagged before the trigger",
            )
            .await?;
            return Ok(None);
        }
        self.mark_triggered(now, a, false).await
    }

    /// `pending` → `triggered`, due for its first attempt now.
    async fn mark_triggered(
        &self,
        now: i64,
        a: RebuildAction,
        resumed: bool,
    ) -> Result<Option<RebuildAction>, StorageError> {
        let from = a.state;
        let mut b = a;
        if b.payload.is_none() {
            b.payload = Some(self.build_body(now, &b, false).await?);
        }
        b.state = ActionState::Triggered;
        b.dry_run = false;
        b.triggered_ms = Some(now);
        b.updated_ms = now;
        b.next_attempt_ms = Some(now);
        let entry = audit(
            now,
            "rebuild.triggered",
            &b,
            json!({ "sent": true, "resumed": resumed, "executor": self.executor.describe() }),
        );
        if self
            .store
            .update_action(from, b.clone(), None, entry)
            .await?
        {
            Ok(Some(b))
        } else {
            Ok(None)
        }
    }

    async fn build_body(
        &self,
        now: i64,
        a: &RebuildAction,
        dry_run: bool,
    ) -> Result<Vec<u8>, StorageError> {
        let host = self.store.host(&a.host_id).await?;
        let items = self
            .store
            .search_violations(ViolationQuery {
                host_id: Some(a.host_id.clone()),
                limit: SUMMARY_ITEMS + 1,
                ..Default::default()
            })
            .await?;
        let truncated = items.len() > SUMMARY_ITEMS as usize;
        let items: Vec<_> = items
            .into_iter()
            .take(SUMMARY_ITEMS as usize)
            .map(|v| v.item)
            .collect();
        let (version, root) = host
            .as_ref()
            .map(|h| (h.hello.image_version.clone(), h.hello.baseline_root.clone()))
            .unwrap_or_default();
        Ok(payload::body(&PayloadInput {
            action_id: &a.id,
            idempotency_key: &a.idempotency_key,
            dry_run,
            triggered_ms: now,
            host_id: &a.host_id,
            role: a.role.as_deref(),
            image_id: &a.image_id,
            image_version: &version,
            baseline_root: &root,
            reasons: &a.reasons,
            items: &items,
            items_truncated: truncated,
        }))
    }

    /// One delivery attempt and its record.
    async fn deliver(&self, a: RebuildAction) -> Result<(), StorageError> {
        let body = a.payload.clone().unwrap_or_default();
        let started = now_ms();
        let outcome: AttemptOutcome = self
            .executor
            .deliver(DeliveryRequest {
                action_id: &a.id,
                idempotency_key: &a.idempotency_key,
                host_id: &a.host_id,
                body: &body,
                now_s: started / 1000,
            })
            .await;
        let end = now_ms();
        let n = a.attempts.saturating_add(1);
        let record = AttemptRecord {
            action_id: a.id.clone(),
            attempt: n,
            at_ms: started,
            duration_ms: millis(outcome.duration),
            delivered: outcome.delivered,
            status: outcome.status,
            detail: outcome.detail.clone(),
        };
        let mut b = a.clone();
        b.attempts = n;
        b.updated_ms = end;
        let detail = json!({
            "attempt": n,
            "status": outcome.status,
            "detail": outcome.detail,
            "duration_ms": record.duration_ms,
        });
        if outcome.delivered {
            b.state = ActionState::Delivered;
            b.next_attempt_ms = None;
            b.last_error = None;
            let entry = audit(end, "rebuild.succeeded", &b, detail);
            self.store
                .update_action(ActionState::Triggered, b, Some(record), entry)
                .await?;
            tracing::info!(action = %a.id, attempt = n, "rebuild request delivered");
        } else if n >= self.settings.retry.max_attempts.get() {
            b.state = ActionState::Failed;
            b.next_attempt_ms = None;
            b.finished_ms = Some(end);
            b.last_error = Some(outcome.detail.clone());
            b.note = Some(format!("gave up after {n} attempts"));
            let entry = audit(end, "rebuild.failed", &b, detail);
            if self
                .store
                .update_action(ActionState::Triggered, b, Some(record), entry)
                .await?
            {
                tracing::warn!(action = %a.id, attempts = n, error = %outcome.detail, "rebuild request failed for good");
                self.reflag(end, &a.host_id, &format!("rebuild {} failed", a.id))
                    .await?;
            }
        } else {
            let delay = executor::backoff(
                n,
                self.settings.retry.initial_backoff,
                self.settings.retry.max_backoff,
                executor::jitter(),
            );
            b.next_attempt_ms = Some(end.saturating_add(millis(delay)));
            b.last_error = Some(outcome.detail.clone());
            let mut detail = detail;
            if let Some(o) = detail.as_object_mut() {
                o.insert("retry_in_ms".into(), json!(millis(delay)));
            }
            let entry = audit(end, "rebuild.attempt_failed", &b, detail);
            self.store
                .update_action(ActionState::Triggered, b, Some(record), entry)
                .await?;
            tracing::info!(action = %a.id, attempt = n, retry_in = ?delay, error = %outcome.detail, "rebuild request attempt failed");
        }
        Ok(())
    }
}

#[cfg(test)]
// One-element slices of clones read more plainly in these tables of cases.
#[allow(clippy::cloned_ref_to_slice_refs)]
mod tests {
    use super::*;

    const NOW: i64 = 10_000_000;
    const MIN: i64 = 60_000;

    fn policy() -> Policy {
        Policy {
            approval: false,
            dry_run: false,
            max_in_flight: 2,
            max_percent_per_image: 100,
            cooldown_ms: 60 * MIN,
            rebuild_timeout_ms: 60 * MIN,
        }
    }

    fn host(id: &str, state: Lifecycle, since: i64, image: &str) -> HostView {
        HostView {
            host_id: id.into(),
            state,
            since_ms: since,
            role: Some("web".into()),
            image_id: image.into(),
        }
    }

    fn action(h: &HostView, state: ActionState, created: i64) -> RebuildAction {
        let key = idempotency_key(&h.host_id, h.since_ms);
        RebuildAction {
            id: action_id(&key),
            idempotency_key: key,
            host_id: h.host_id.clone(),
            image_id: h.image_id.clone(),
            role: h.role.clone(),
            flagged_ms: h.since_ms,
            reasons: vec![],
            state,
            dry_run: false,
            created_ms: created,
            updated_ms: created,
            triggered_ms: None,
            finished_ms: None,
            attempts: 0,
            next_attempt_ms: None,
            last_error: None,
            decided_by: None,
            decision_reason: None,
            note: None,
            payload: None,
        }
    }

    fn triggers(steps: &[Step]) -> Vec<String> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Trigger { id, .. } => Some(id.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn flagged_hosts_get_one_action_each_held_in_approval_mode() {
        let hosts = vec![
            host("web-1", Lifecycle::Flagged, NOW - 5, "web"),
            host("web-2", Lifecycle::Clean, NOW - 5, "web"),
        ];
        let (steps, _) = decide(
            NOW,
            &Policy {
                approval: true,
                ..policy()
            },
            &hosts,
            &[],
        );
        assert_eq!(
            steps,
            vec![Step::Create {
                host_id: "web-1".into(),
                flagged_ms: NOW - 5,
                image_id: "web".into(),
                role: Some("web".into()),
                awaiting_approval: true,
            }]
        );
        // Once it exists (in any state), the same flagging gets no second action.
        for state in ActionState::ALL {
            let a = action(&hosts[0], state, NOW - 1);
            let (steps, _) = decide(NOW, &policy(), &hosts, &[a]);
            assert!(
                !steps.iter().any(|s| matches!(s, Step::Create { .. })),
                "{state}: {steps:?}"
            );
        }
        // Pending approval is never triggered.
        let a = action(&hosts[0], ActionState::PendingApproval, NOW - 1);
        let (steps, _) = decide(NOW, &policy(), &hosts, &[a]);
        assert!(steps.is_empty(), "{steps:?}");
    }

    #[test]
    fn at_most_n_in_flight_oldest_first() {
        let hosts: Vec<HostView> = (0..10)
            .map(|i| host(&format!("web-{i:02}"), Lifecycle::Flagged, NOW - 100, "web"))
            .collect();
        let actions: Vec<RebuildAction> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| action(h, ActionState::Pending, NOW - 50 + i as i64))
            .collect();
        let (steps, held) = decide(NOW, &policy(), &hosts, &actions);
        assert_eq!(
            triggers(&steps),
            vec![actions[0].id.clone(), actions[1].id.clone()]
        );
        assert_eq!(held.len(), 8);
        assert!(held.iter().all(|(_, h)| *h == Held::InFlightLimit));

        // Two in flight (hosts waiting for their rebuild): nothing more triggers.
        let mut hosts2 = hosts.clone();
        let mut actions2 = actions.clone();
        for i in 0..2 {
            hosts2[i].state = Lifecycle::RebuildRequested;
            actions2[i].state = if i == 0 {
                ActionState::Triggered
            } else {
                ActionState::Delivered
            };
            actions2[i].triggered_ms = Some(NOW - 10);
        }
        let (steps, held) = decide(NOW, &policy(), &hosts2, &actions2);
        assert!(triggers(&steps).is_empty(), "{steps:?}");
        assert_eq!(held.len(), 8);

        // One replaced: its action completes and exactly one more triggers, in the same round.
        hosts2[0].state = Lifecycle::Replaced;
        let (steps, _) = decide(NOW, &policy(), &hosts2, &actions2);
        assert!(steps.contains(&Step::Complete {
            id: actions2[0].id.clone(),
            note: "host is replaced".into()
        }));
        assert_eq!(triggers(&steps), vec![actions2[2].id.clone()]);
    }

    #[test]
    fn per_image_percentage_with_at_least_one() {
        let p = Policy {
            max_in_flight: 100,
            max_percent_per_image: 25,
            ..policy()
        };
        assert_eq!(p.per_image_limit(1), 1);
        assert_eq!(p.per_image_limit(4), 1);
        assert_eq!(p.per_image_limit(8), 2);
        assert_eq!(p.per_image_limit(10), 2);
        // 8 web hosts (all flagged) and 2 db hosts (flagged): 2 web + 1 db at once.
        let mut hosts: Vec<HostView> = (0..8)
            .map(|i| host(&format!("web-{i}"), Lifecycle::Flagged, NOW - 100, "web"))
            .collect();
        hosts.push(host("db-0", Lifecycle::Flagged, NOW - 100, "db"));
        hosts.push(host("db-1", Lifecycle::Flagged, NOW - 100, "db"));
        let actions: Vec<RebuildAction> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| action(h, ActionState::Pending, NOW - 50 + i as i64))
            .collect();
        let (steps, held) = decide(NOW, &p, &hosts, &actions);
        let t = triggers(&steps);
        assert_eq!(
            t,
            vec![
                actions[0].id.clone(),
                actions[1].id.clone(),
                actions[8].id.clone()
            ]
        );
        assert_eq!(
            held.iter().filter(|(_, h)| *h == Held::ImageLimit).count(),
            7
        );
    }

    #[test]
    fn cooldown_holds_a_recently_triggered_host() {
        let h = host("web-1", Lifecycle::Flagged, NOW - 100, "web");
        let mut earlier = action(
            &host("web-1", Lifecycle::Flagged, NOW - 30 * MIN, "web"),
            ActionState::Failed,
            NOW - 30 * MIN,
        );
        earlier.triggered_ms = Some(NOW - 20 * MIN);
        let now_pending = action(&h, ActionState::Pending, NOW - 50);
        let (steps, held) = decide(
            NOW,
            &policy(),
            &[h.clone()],
            &[earlier.clone(), now_pending.clone()],
        );
        assert!(triggers(&steps).is_empty());
        assert_eq!(held, vec![(now_pending.id.clone(), Held::Cooldown)]);
        // After the cool-down it goes.
        let later = NOW + 41 * MIN;
        let (steps, _) = decide(later, &policy(), &[h], &[earlier, now_pending.clone()]);
        assert_eq!(triggers(&steps), vec![now_pending.id]);
    }

    #[test]
    fn dry_run_triggers_without_holding_slots_or_cooldown() {
        let h = host("web-1", Lifecycle::Flagged, NOW - 100, "web");
        let a = action(&h, ActionState::Pending, NOW - 50);
        let p = Policy {
            dry_run: true,
            ..policy()
        };
        let (steps, _) = decide(NOW, &p, &[h.clone()], &[a.clone()]);
        assert_eq!(
            steps,
            vec![Step::Trigger {
                id: a.id.clone(),
                dry_run: true
            }]
        );
        // A dry-run record neither holds a slot nor starts a cool-down.
        let mut d = a.clone();
        d.state = ActionState::DryRun;
        d.triggered_ms = Some(NOW - 10);
        let h2 = host("web-1", Lifecycle::Flagged, NOW - 5, "web");
        let b = action(&h2, ActionState::Pending, NOW - 4);
        let (steps, _) = decide(NOW, &policy(), &[h2], &[d, b.clone()]);
        assert_eq!(triggers(&steps), vec![b.id]);
    }

    #[test]
    fn lifecycle_changes_cancel_resume_complete_and_time_out() {
        let flagged = host("web-1", Lifecycle::Flagged, NOW - 100, "web");
        let a = action(&flagged, ActionState::Pending, NOW - 50);
        // The host was repaired before the trigger.
        let clean = HostView {
            state: Lifecycle::Clean,
            ..flagged.clone()
        };
        let (steps, _) = decide(NOW, &policy(), &[clean], &[a.clone()]);
        assert_eq!(
            steps,
            vec![Step::Cancel {
                id: a.id.clone(),
                reason: "the host is clean now".into()
            }]
        );
        // Flagged again later: the old action is cancelled, a new one created.
        let again = HostView {
            since_ms: NOW - 10,
            ..flagged.clone()
        };
        let (steps, _) = decide(NOW, &policy(), &[again], &[a.clone()]);
        assert!(matches!(&steps[0], Step::Cancel { .. }));
        assert!(matches!(&steps[1], Step::Create { flagged_ms, .. } if *flagged_ms == NOW - 10));
        // Already rebuild_requested while the action is pending: an interrupted trigger.
        let requested = HostView {
            state: Lifecycle::RebuildRequested,
            since_ms: NOW - 40,
            ..flagged.clone()
        };
        let (steps, _) = decide(NOW, &policy(), &[requested.clone()], &[a.clone()]);
        assert_eq!(steps, vec![Step::Resume { id: a.id.clone() }]);
        // Triggered and due: delivered this round; not due: nothing.
        let mut t = a.clone();
        t.state = ActionState::Triggered;
        t.triggered_ms = Some(NOW - 40);
        t.next_attempt_ms = Some(NOW - 1);
        let (steps, _) = decide(NOW, &policy(), &[requested.clone()], &[t.clone()]);
        assert_eq!(steps, vec![Step::Deliver { id: t.id.clone() }]);
        t.next_attempt_ms = Some(NOW + 1);
        let (steps, _) = decide(NOW, &policy(), &[requested.clone()], &[t.clone()]);
        assert!(steps.is_empty());
        // Past rebuild_timeout.
        let (steps, _) = decide(NOW + 61 * MIN, &policy(), &[requested], &[t.clone()]);
        assert_eq!(steps, vec![Step::TimeOut { id: t.id.clone() }]);
        // Retired, or gone.
        let retired = HostView {
            state: Lifecycle::Retired,
            ..flagged.clone()
        };
        let (steps, _) = decide(NOW, &policy(), &[retired], &[t.clone()]);
        assert_eq!(
            steps,
            vec![Step::Complete {
                id: t.id.clone(),
                note: "host is retired".into()
            }]
        );
        let (steps, _) = decide(NOW, &policy(), &[], &[t.clone()]);
        assert!(matches!(&steps[0], Step::Complete { .. }));
    }
}
