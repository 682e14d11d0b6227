//! The host lifecycle: where a host stands between its enrollment and its end, as a pure state
//! machine.
//!
//! ```text
//!             ┌──────────── assessments (reconciler) ────────────┐
//! enrolled ──▶│ clean ◀──▶ drifted ◀──▶ flagged ◀──▶ silent      │
//!             └──────────────────────────┬───────────────────────┘
//!                                        │ rebuild requested (dispatcher, from flagged only)
//!                                        ▼
//!                               rebuild_requested ──▶ replaced (a successor enrolled)
//!                                        │ rebuild failed ──▶ flagged
//! any live state ──▶ retired (an operator)
//! ```
//!
//! What this module owns: the states, the events that move a host, and which moves are
//! allowed ([`next`]). What it must never do: look at a clock, a database or a host's drift —
//! the reconciler (`crate::reconcile`) turns facts into an [`Assessment`], the storage
//! (`crate::storage::lifecycle`) records a transition only if the host is still in the state
//! it was computed from.
//!
//! `replaced` and `retired` are terminal for that life of the host: only a re-enrollment of the
//! same host id (a new certificate, e.g. a re-imaged server keeping its name) starts a new one,
//! at `enrolled`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a host stands. Names in JSON and storage: [`Lifecycle::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Enrolled; no verdict yet (no report, or the reconciler has not run).
    Enrolled,
    /// Reporting, no open drift that counts.
    Clean,
    /// Open drift that counts, but nothing the flagging policy flags.
    Drifted,
    /// The flagging policy says: a snowflake, replace it.
    Flagged,
    /// Not heard from for longer than the silence threshold (and not flagged).
    Silent,
    /// A rebuild was triggered for it; waiting for its successor.
    RebuildRequested,
    /// A successor with the same role and image enrolled. Terminal.
    Replaced,
    /// An operator retired it. Terminal.
    Retired,
}

impl Lifecycle {
    /// Every state.
    pub const ALL: [Lifecycle; 8] = [
        Lifecycle::Enrolled,
        Lifecycle::Clean,
        Lifecycle::Drifted,
        Lifecycle::Flagged,
        Lifecycle::Silent,
        Lifecycle::RebuildRequested,
        Lifecycle::Replaced,
        Lifecycle::Retired,
    ];

    /// The name in JSON, storage and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Lifecycle::Enrolled => "enrolled",
            Lifecycle::Clean => "clean",
            Lifecycle::Drifted => "drifted",
            Lifecycle::Flagged => "flagged",
            Lifecycle::Silent => "silent",
            Lifecycle::RebuildRequested => "rebuild_requested",
            Lifecycle::Replaced => "replaced",
            Lifecycle::Retired => "retired",
        }
    }

    /// `replaced` and `retired`: nothing but a re-enrollment moves the host again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Lifecycle::Replaced | Lifecycle::Retired)
    }

    /// The states the reconciler re-assesses (everything but a pending rebuild and the ends).
    pub fn is_assessed(self) -> bool {
        matches!(
            self,
            Lifecycle::Enrolled
                | Lifecycle::Clean
                | Lifecycle::Drifted
                | Lifecycle::Flagged
                | Lifecycle::Silent
        )
    }
}

impl fmt::Display for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown lifecycle state name (a corrupt row, a bad parameter).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown lifecycle state {0:?} (expected one of: enrolled, clean, drifted, flagged, silent, \
     rebuild_requested, replaced, retired)"
)]
pub struct UnknownLifecycle(pub String);

impl FromStr for Lifecycle {
    type Err = UnknownLifecycle;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Lifecycle::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| UnknownLifecycle(s.to_string()))
    }
}

/// The reconciler's verdict on a live host from its current facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Assessment {
    Clean,
    Drifted,
    Flagged,
    Silent,
}

impl Assessment {
    /// The state this verdict puts an assessed host in.
    pub fn state(self) -> Lifecycle {
        match self {
            Assessment::Clean => Lifecycle::Clean,
            Assessment::Drifted => Lifecycle::Drifted,
            Assessment::Flagged => Lifecycle::Flagged,
            Assessment::Silent => Lifecycle::Silent,
        }
    }
}

/// What can happen to a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// The reconciler assessed the host.
    Assessed(Assessment),
    /// The rebuild dispatcher triggered a rebuild (webhook or command).
    RebuildRequested,
    /// The rebuild action gave up (timed out or failed for good): the host is flagged again.
    RebuildFailed,
    /// A successor with the same role label and image enrolled.
    Replaced,
    /// An operator retired the host.
    Retired,
    /// The host id enrolled again (a new certificate): a new life.
    Reenrolled,
}

/// A move the state machine does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a host in state {from} cannot take event {event:?}")]
pub struct InvalidTransition {
    pub from: Lifecycle,
    pub event: Event,
}

/// The state after `event` in `state`. `Ok(state)` (no change) when the event does not move
/// the host: an assessment of a host awaiting its rebuild is not news. `Err` for moves that
/// must not happen: anything out of a terminal state but a re-enrollment, a rebuild of a host
/// that is not flagged, a replacement of a host nobody asked to rebuild.
pub fn next(state: Lifecycle, event: Event) -> Result<Lifecycle, InvalidTransition> {
    use Lifecycle as L;
    let refused = Err(InvalidTransition { from: state, event });
    match event {
        Event::Reenrolled => Ok(L::Enrolled),
        _ if state.is_terminal() => refused,
        Event::Assessed(a) => Ok(if state.is_assessed() {
            a.state()
        } else {
            state
        }),
        Event::RebuildRequested => match state {
            L::Flagged => Ok(L::RebuildRequested),
            _ => refused,
        },
        Event::RebuildFailed => match state {
            L::RebuildRequested => Ok(L::Flagged),
            _ => refused,
        },
        Event::Replaced => match state {
            L::RebuildRequested => Ok(L::Replaced),
            _ => refused,
        },
        Event::Retired => Ok(L::Retired),
    }
}

/// Whether some event moves a host from `from` to `to` (`from != to`): the check storage
/// makes before it records a transition, so no caller can write a move the machine refuses.
pub fn allowed(from: Lifecycle, to: Lifecycle) -> bool {
    from != to && all_events().any(|e| next(from, e) == Ok(to))
}

/// Every event, for [`allowed`] and the tests.
fn all_events() -> impl Iterator<Item = Event> {
    [
        Event::Assessed(Assessment::Clean),
        Event::Assessed(Assessment::Drifted),
        Event::Assessed(Assessment::Flagged),
        Event::Assessed(Assessment::Silent),
        Event::RebuildRequested,
        Event::RebuildFailed,
        Event::Replaced,
        Event::Retired,
        Event::Reenrolled,
    ]
    .into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Lifecycle as L;

    #[test]
    fn names_round_trip() {
        for s in L::ALL {
            assert_eq!(s.name().parse::<L>(), Ok(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.name())
            );
        }
        assert!("Flagged".parse::<L>().is_err());
        assert!("".parse::<L>().is_err());
    }

    /// The whole table: every (state, event) pair and its outcome, so a change to the machine
    /// is a change to this test.
    #[test]
    fn every_state_and_event() {
        use Assessment as A;
        let assess = |a| Event::Assessed(a);
        let ok = Ok::<L, ()>;
        let no = Err::<L, ()>(());
        let table: &[(L, Event, Result<L, ()>)] = &[
            // Assessments move every assessed state to the verdict's state.
            (L::Enrolled, assess(A::Clean), ok(L::Clean)),
            (L::Enrolled, assess(A::Drifted), ok(L::Drifted)),
            (L::Enrolled, assess(A::Flagged), ok(L::Flagged)),
            (L::Enrolled, assess(A::Silent), ok(L::Silent)),
            (L::Clean, assess(A::Clean), ok(L::Clean)),
            (L::Clean, assess(A::Drifted), ok(L::Drifted)),
            (L::Clean, assess(A::Flagged), ok(L::Flagged)),
            (L::Clean, assess(A::Silent), ok(L::Silent)),
            (L::Drifted, assess(A::Clean), ok(L::Clean)),
            (L::Drifted, assess(A::Drifted), ok(L::Drifted)),
            (L::Drifted, assess(A::Flagged), ok(L::Flagged)),
            (L::Drifted, assess(A::Silent), ok(L::Silent)),
            (L::Flagged, assess(A::Clean), ok(L::Clean)),
            (L::Flagged, assess(A::Drifted), ok(L::Drifted)),
            (L::Flagged, assess(A::Flagged), ok(L::Flagged)),
            (L::Flagged, assess(A::Silent), ok(L::Silent)),
            (L::Silent, assess(A::Clean), ok(L::Clean)),
            (L::Silent, assess(A::Drifted), ok(L::Drifted)),
            (L::Silent, assess(A::Flagged), ok(L::Flagged)),
            (L::Silent, assess(A::Silent), ok(L::Silent)),
            // A host awaiting its rebuild stays there whatever it reports.
            (
                L::RebuildRequested,
                assess(A::Clean),
                ok(L::RebuildRequested),
            ),
            (
                L::RebuildRequested,
                assess(A::Drifted),
                ok(L::RebuildRequested),
            ),
            (
                L::RebuildRequested,
                assess(A::Flagged),
                ok(L::RebuildRequested),
            ),
            (
                L::RebuildRequested,
                assess(A::Silent),
                ok(L::RebuildRequested),
            ),
            // Terminal states take no assessment.
            (L::Replaced, assess(A::Clean), no),
            (L::Replaced, assess(A::Flagged), no),
            (L::Retired, assess(A::Drifted), no),
            (L::Retired, assess(A::Silent), no),
            // Rebuilds: only of flagged hosts.
            (L::Flagged, Event::RebuildRequested, ok(L::RebuildRequested)),
            (L::Enrolled, Event::RebuildRequested, no),
            (L::Clean, Event::RebuildRequested, no),
            (L::Drifted, Event::RebuildRequested, no),
            (L::Silent, Event::RebuildRequested, no),
            (L::RebuildRequested, Event::RebuildRequested, no),
            (L::Replaced, Event::RebuildRequested, no),
            (L::Retired, Event::RebuildRequested, no),
            (L::RebuildRequested, Event::RebuildFailed, ok(L::Flagged)),
            (L::Enrolled, Event::RebuildFailed, no),
            (L::Clean, Event::RebuildFailed, no),
            (L::Drifted, Event::RebuildFailed, no),
            (L::Flagged, Event::RebuildFailed, no),
            (L::Silent, Event::RebuildFailed, no),
            (L::Replaced, Event::RebuildFailed, no),
            (L::Retired, Event::RebuildFailed, no),
            // Replacement: only of a host whose rebuild was requested.
            (L::RebuildRequested, Event::Replaced, ok(L::Replaced)),
            (L::Enrolled, Event::Replaced, no),
            (L::Clean, Event::Replaced, no),
            (L::Drifted, Event::Replaced, no),
            (L::Flagged, Event::Replaced, no),
            (L::Silent, Event::Replaced, no),
            (L::Replaced, Event::Replaced, no),
            (L::Retired, Event::Replaced, no),
            // Retirement: from every live state.
            (L::Enrolled, Event::Retired, ok(L::Retired)),
            (L::Clean, Event::Retired, ok(L::Retired)),
            (L::Drifted, Event::Retired, ok(L::Retired)),
            (L::Flagged, Event::Retired, ok(L::Retired)),
            (L::Silent, Event::Retired, ok(L::Retired)),
            (L::RebuildRequested, Event::Retired, ok(L::Retired)),
            (L::Replaced, Event::Retired, no),
            (L::Retired, Event::Retired, no),
        ];
        for (from, event, want) in table {
            let got = next(*from, *event).map_err(|e| {
                assert_eq!((e.from, e.event), (*from, *event));
            });
            assert_eq!(got, *want, "{from} + {event:?}");
        }
        // Re-enrollment starts a new life from anywhere.
        for s in L::ALL {
            assert_eq!(next(s, Event::Reenrolled), Ok(L::Enrolled), "{s}");
        }
        // The table above covers every (state, event) pair but re-enrollment's.
        let listed: std::collections::HashSet<(L, Event)> =
            table.iter().map(|(s, e, _)| (*s, *e)).collect();
        for s in L::ALL {
            for e in all_events().filter(|e| *e != Event::Reenrolled) {
                let covered = listed.contains(&(s, e))
                    // Terminal states: two assessments listed stand for all four.
                    || (s.is_terminal() && matches!(e, Event::Assessed(_)));
                assert!(covered, "({s}, {e:?}) not in the table");
            }
        }
    }

    #[test]
    fn allowed_moves() {
        assert!(allowed(L::Clean, L::Drifted));
        assert!(allowed(L::Drifted, L::Clean));
        assert!(allowed(L::Flagged, L::RebuildRequested));
        assert!(allowed(L::RebuildRequested, L::Replaced));
        assert!(allowed(L::RebuildRequested, L::Flagged));
        assert!(allowed(L::Silent, L::Retired));
        assert!(allowed(L::Retired, L::Enrolled));
        assert!(!allowed(L::Clean, L::Clean));
        assert!(!allowed(L::Clean, L::RebuildRequested));
        assert!(!allowed(L::Clean, L::Replaced));
        assert!(!allowed(L::Drifted, L::Replaced));
        assert!(!allowed(L::Replaced, L::Clean));
        assert!(!allowed(L::Retired, L::Flagged));
        assert!(!allowed(L::RebuildRequested, L::Clean));
        assert!(!allowed(L::Enrolled, L::RebuildRequested));
        for s in L::ALL {
            assert_eq!(allowed(s, L::Retired), !s.is_terminal(), "{s}");
        }
    }
}
