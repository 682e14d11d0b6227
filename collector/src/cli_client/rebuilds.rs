//! `driftwatch rebuilds`, `rebuilds show`, `rebuilds approve` and `rebuilds reject`.

use anyhow::bail;
use clap::Subcommand;
use clap::builder::PossibleValuesParser;
use driftwatch_proto::escape;

use super::client::{Client, Response};
use super::table::Table;
use super::{Format, fetch, percent_encode_segment, render, when, when_opt};
use crate::api;
use crate::storage::actions::ActionState;

#[derive(Debug, Subcommand)]
pub enum RebuildsCommand {
    /// One action with every delivery attempt.
    Show {
        /// The action id (rb_…).
        id: String,
    },
    /// Approve a rebuild that waits for approval (operator); it triggers when the limits allow.
    Approve {
        id: String,
        /// Why (kept in the action and the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Reject a rebuild that waits for approval (operator); that flagging is not rebuilt.
    Reject {
        id: String,
        /// Why (kept in the action and the audit log).
        #[arg(long)]
        reason: String,
    },
}

/// The `--state` values.
pub fn state_parser() -> PossibleValuesParser {
    PossibleValuesParser::new(ActionState::ALL.map(ActionState::name))
}

/// `driftwatch rebuilds [--state S] [--host H] [--limit N]`.
pub(super) async fn list(
    client: &Client,
    state: &Option<String>,
    host: &Option<String>,
    limit: Option<u32>,
    format: Format,
) -> anyhow::Result<String> {
    let target = client.base().target(
        "/api/v1/rebuilds",
        &[
            ("state", state.clone()),
            ("host", host.clone()),
            ("limit", limit.map(|n| n.to_string())),
        ],
    );
    let resp = fetch(client, &target).await?;
    render(format, &resp, |l: api::RebuildList| table(&l))
}

fn table(l: &api::RebuildList) -> String {
    let mut t = Table::new(vec![
        "ID",
        "HOST",
        "IMAGE",
        "STATE",
        "CREATED",
        "TRIGGERED",
        "ATTEMPTS",
        "NOTE",
    ]);
    for r in &l.rebuilds {
        let state = if r.dry_run && r.state != "dry_run" {
            format!("{} (dry run)", r.state)
        } else {
            r.state.clone()
        };
        let note = r
            .last_error
            .as_deref()
            .or(r.note.as_deref())
            .or(r.decision_reason.as_deref())
            .unwrap_or("");
        let mut details = Vec::new();
        if !r.reasons.is_empty() {
            details.push(format!(
                "reasons: {}",
                r.reasons
                    .iter()
                    .map(|s| escape::text(s))
                    .collect::<Vec<_>>()
                    .join("; ")
            ));
        }
        if let (Some(by), Some(why)) = (&r.decided_by, &r.decision_reason) {
            details.push(format!(
                "decided by {}: {}",
                escape::text(by),
                escape::text(why)
            ));
        }
        t.row_with_details(
            vec![
                escape::text(&r.id),
                escape::text(&r.host_id),
                escape::text(&r.image_id),
                escape::text(&state),
                when(&r.created_at),
                when_opt(&r.triggered_at),
                r.attempts.to_string(),
                escape::text(note),
            ],
            details,
        );
    }
    let mut out = t.render();
    if l.truncated {
        out.push_str(&format!("(first {} shown; use --limit)\n", l.limit));
    }
    out
}

fn detail(d: &api::RebuildDetail) -> String {
    let r = &d.rebuild;
    let mut out = table(&api::RebuildList {
        schema: d.schema.clone(),
        generated_at: d.generated_at.clone(),
        limit: 1,
        truncated: false,
        rebuilds: vec![r.clone()],
    });
    if let Some(next) = &r.next_attempt_at {
        out.push_str(&format!("next attempt at {}\n", when(next)));
    }
    if d.attempts.is_empty() {
        out.push_str("no delivery attempts\n");
    } else {
        let mut t = Table::new(vec!["ATTEMPT", "AT", "MS", "DELIVERED", "STATUS", "DETAIL"]);
        for a in &d.attempts {
            t.row(vec![
                a.attempt.to_string(),
                when(&a.at),
                a.duration_ms.to_string(),
                if a.delivered { "yes" } else { "no" }.into(),
                a.status.map_or_else(|| "-".into(), |s| s.to_string()),
                escape::text(&a.detail),
            ]);
        }
        out.push('\n');
        out.push_str(&t.render());
    }
    out
}

/// `driftwatch rebuilds show|approve|reject`.
pub(super) async fn run(
    client: &Client,
    command: &RebuildsCommand,
    format: Format,
) -> anyhow::Result<String> {
    let (id, decision) = match command {
        RebuildsCommand::Show { id } => (id, None),
        RebuildsCommand::Approve { id, reason } => (id, Some(("approve", reason))),
        RebuildsCommand::Reject { id, reason } => (id, Some(("reject", reason))),
    };
    let path = format!("/api/v1/rebuilds/{}", percent_encode_segment(id));
    let resp: Response = match decision {
        None => fetch(client, &client.base().target(&path, &[])).await?,
        Some((verb, reason)) => {
            let target = client.base().target(&format!("{path}/{verb}"), &[]);
            let body = serde_json::to_vec(&api::RebuildDecision {
                reason: reason.clone(),
            })?;
            let resp = client
                .send(hyper::Method::POST, &target, Some(body))
                .await?;
            if !resp.status.is_success() {
                bail!("collector refused POST {target}: {}", resp.error_message());
            }
            resp
        }
    };
    render(format, &resp, |d: api::RebuildDetail| detail(&d))
}
