//! `driftwatch audit list` and `driftwatch audit verify`. Verification happens here, on the
//! client, with the same [`ChainVerifier`] the collector has: the collector serves the
//! records exactly as stored and is not asked for its opinion of them.

use std::process::ExitCode;

use anyhow::bail;
use clap::Subcommand;

use super::client::Client;
use super::table::Table;
use super::{EXIT_OK, Format, parse, when};
use crate::api;
use crate::storage::audit::{AuditRecord, ChainHead, ChainVerifier};
use driftwatch_proto::escape;

/// Exit status of `audit verify` when the chain is broken.
pub const EXIT_BROKEN: u8 = 1;

/// Records per request (the API's maximum).
const PAGE: u32 = 10_000;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit records, oldest first: when, who (actor), what (action), to what (target),
    /// and the detail.
    List {
        /// Records at or after this time: RFC 3339, a date, or a duration back from now (24h).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Records after this record number.
        #[arg(long, value_name = "SEQ", default_value_t = 0)]
        after: u64,
    },
    /// Fetch every record and verify the hash chain here, on this machine.
    ///
    /// Prints the chain's head (<seq>:<hash>): note it somewhere the collector cannot write,
    /// and pass it with --expect-head next time, which also catches records removed from the
    /// end. Exit status: 0 intact, 1 broken (the first bad record is named), 2 error.
    Verify {
        /// A head noted earlier (<seq>:<64 hex digits>) that the chain must still contain.
        #[arg(long, value_name = "SEQ:HASH")]
        expect_head: Option<ChainHead>,
    },
}

pub async fn run(client: &Client, format: Format, cmd: &AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::List { since, after } => {
            let since_ms = match since {
                Some(s) => Some(
                    crate::http::params::parse_time(s, now_ms())
                        .map_err(|e| anyhow::anyhow!("--since: {e}"))?,
                ),
                None => None,
            };
            let mut records = Vec::new();
            for_each_page(client, *after, |page| {
                records.extend(
                    page.records
                        .into_iter()
                        .filter(|r| since_ms.is_none_or(|s| r.at_ms >= s)),
                );
                Ok(true)
            })
            .await?;
            match format {
                Format::Json => {
                    let mut s = serde_json::to_string_pretty(&serde_json::json!({
                        "schema": api::SCHEMA,
                        "records": records,
                    }))?;
                    s.push('\n');
                    print!("{s}");
                }
                Format::Table => print!("{}", list_table(&records)),
            }
            Ok(ExitCode::from(EXIT_OK))
        }
        AuditCommand::Verify { expect_head } => {
            let mut v = match expect_head {
                Some(h) => ChainVerifier::expecting(*h),
                None => ChainVerifier::new(),
            };
            let mut broken = None;
            for_each_page(client, 0, |page| {
                for r in &page.records {
                    if let Err(e) = v.push(&stored(r)) {
                        broken = Some(e);
                        return Ok(false);
                    }
                }
                Ok(true)
            })
            .await?;
            let outcome = match broken {
                Some(e) => Err(e),
                None => v.finish(),
            };
            match outcome {
                Ok(Some(head)) => {
                    println!(
                        "audit log intact: {} records verified here; head {head}",
                        v.count()
                    );
                    println!("note the head and pass it to --expect-head next time");
                    Ok(ExitCode::from(EXIT_OK))
                }
                Ok(None) => {
                    println!("audit log intact: empty");
                    Ok(ExitCode::from(EXIT_OK))
                }
                Err(e) => {
                    println!("audit log BROKEN: {e}");
                    Ok(ExitCode::from(EXIT_BROKEN))
                }
            }
        }
    }
}

/// Fetches the log page by page from `after`; `f` returns whether to go on. Bounded: every
/// page must start after the previous one's last seq (or the walk stops with an error), so
/// each request makes progress, and each request has the client's timeout.
async fn for_each_page(
    client: &Client,
    mut after: u64,
    mut f: impl FnMut(api::AuditList) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    loop {
        let target = client.base().target(
            "/api/v1/audit",
            &[
                ("after", Some(after.to_string())),
                ("limit", Some(PAGE.to_string())),
            ],
        );
        let resp = super::fetch(client, &target).await?;
        let page: api::AuditList = parse(&resp)?;
        let truncated = page.truncated;
        let Some(last) = page.records.last().map(|r| r.seq) else {
            return Ok(());
        };
        if last <= after {
            bail!("the collector answered records up to {last} when asked for those after {after}");
        }
        if !f(page)? || !truncated {
            return Ok(());
        }
        after = last;
    }
}

/// A served record as the verifier takes it. Hex that does not decode becomes bytes that
/// cannot match, so the record fails verification rather than the command.
fn stored(r: &api::AuditRecord) -> AuditRecord {
    AuditRecord {
        seq: r.seq,
        at_ms: r.at_ms,
        actor: r.actor.clone(),
        action: r.action.clone(),
        target: r.target.clone(),
        detail: r.detail.clone(),
        prev_hash: unhex(&r.prev_hash),
        hash: unhex(&r.hash),
    }
}

fn unhex(s: &str) -> Vec<u8> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Vec::new();
    }
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok())
        .collect()
}

fn list_table(records: &[api::AuditRecord]) -> String {
    if records.is_empty() {
        return "no audit records\n".into();
    }
    let mut t = Table::new(vec!["SEQ", "AT", "ACTOR", "ACTION", "TARGET", "DETAIL"]);
    for r in records {
        t.row(vec![
            r.seq.to_string(),
            when(&r.at),
            escape::text(&r.actor),
            escape::text(&r.action),
            escape::text(&r.target),
            escape::text(&r.detail),
        ]);
    }
    t.render()
}

fn now_ms() -> i64 {
    crate::ca::unix_ms(std::time::SystemTime::now())
}
