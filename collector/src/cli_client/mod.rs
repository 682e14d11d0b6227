//! `driftwatch`, the operator CLI: reads the fleet's drift state from the collector's HTTP API
//! (`crate::http`) and shows it as tables for people or passes the API's JSON through.
//!
//! What it owns: the command line, the HTTP requests and the rendering. What it must never do:
//! print anything a host reported without escaping it (`driftwatch_proto::escape`): host ids, paths,
//! package names, before/after values and reasons all come from agents, and a compromised one
//! chooses them. Only the token, acknowledgement, retirement and baseline commands change
//! collector state (operator or admin role, audited by the collector).
//!
//! Access: a bearer API token from `--token-file` or `DRIFTWATCH_TOKEN` (never a command-line
//! argument, which other users could read in the process list), sent with every request;
//! `https://` URLs trust only `--ca-file`.

mod audit;
mod client;
mod export;
mod lifecycle;
mod rebuilds;
mod table;
mod tokens;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;

use self::client::{ApiBase, Client, Response};
use self::table::Table;
use crate::api::{self, RawBytes};
use crate::host_state::HostState;
use crate::http::params::KindFilter;
use driftwatch_proto::escape;

/// Exit status: the command did what was asked (finding drift is not a failure: listings
/// report it in their output, not in the exit status).
pub const EXIT_OK: u8 = 0;
/// Exit status: the command failed (collector unreachable, refused a parameter, unknown
/// host, bad usage).
pub const EXIT_ERROR: u8 = 2;

const EXAMPLES: &str = "\
Examples:
  driftwatch hosts                                   every host, its state and open drift
  driftwatch hosts --state drifted                   only hosts with open drift
  driftwatch host show web-1                         one host, its violations with before/after
  driftwatch violations search --path '/etc/ssh/**'  which hosts changed something under /etc/ssh?
  driftwatch violations search --kind package_installed --since 24h
  driftwatch events --since 1h                       refused connections, impersonation attempts
  driftwatch export --since 24h                      the day's events as a table
  driftwatch export --format jsonl --since 7d --out events.jsonl   for the SIEM (ECS fields)
  driftwatch export --format csv --kind violation --out drift.csv  for a spreadsheet
  driftwatch hosts explain web-1                     why web-1 is (or is not) flagged, with evidence
  driftwatch host ack web-1 --path /etc/motd --reason 'banner change CHG-42' --expires 7d
  driftwatch host retire web-1 --reason 'decommissioned'
  driftwatch images                                  hosts by image: consensus, outliers, defects
  driftwatch image show web                          one image: registered root, outliers
  driftwatch baseline push image.dwb                 register a signed baseline (admin)
  driftwatch audit list --since 24h                  who changed what (the audit log)
  driftwatch audit verify --expect-head 812:9f3c…    check the audit log's hash chain here
  driftwatch api-token create --role auditor --name siem --ttl 90d > siem.token
  driftwatch enrollment-token create --uses 10 --host-pattern 'web-*'
  DRIFTWATCH_TOKEN=$(cat ~/.dw-token) driftwatch --api https://collector:7480 \
      --ca-file /etc/driftwatch/collector-ca.pem hosts
  driftwatch rebuilds --state pending_approval       rebuilds waiting for an operator
  driftwatch rebuilds approve rb_5d1c0f9a2e7b44c18a03 --reason 'nc installed by hand'
  driftwatch --format json hosts | jq '.hosts[] | select(.state != \"clean\") | .host_id'

Exit status: 0 success (whether or not drift was found), 2 error; audit verify: 1 when the
chain is broken.";

/// Read the fleet's drift state and audit log from a driftwatch collector, and manage its tokens.
///
/// Talks to the collector's HTTP JSON API (schema driftwatch.api.v1, see docs/api.md) with a
/// bearer API token (made by an admin: driftwatch-collector api-token create). The API serves
/// plain HTTP on loopback, and HTTPS (TLS 1.3) elsewhere: pass the collector CA with
/// --ca-file.
/// Everything a host reported is escaped for the terminal (\n, \x1b, \xff, \u{202e}); use
/// --format json for the exact bytes.
#[derive(Debug, Parser)]
#[command(name = "driftwatch", version, after_help = EXAMPLES)]
pub struct Cli {
    /// Base URL of the collector's HTTP API.
    #[arg(
        long,
        global = true,
        env = "DRIFTWATCH_API",
        default_value = "http://127.0.0.1:7480",
        value_name = "URL"
    )]
    pub api: String,

    /// CA certificate(s) (PEM) to trust for an https:// API URL: the collector CA
    /// (`driftwatch-collector ca show`), or the issuer of the configured http_tls_cert.
    #[arg(long, global = true, env = "DRIFTWATCH_CA_FILE", value_name = "PEM")]
    pub ca_file: Option<std::path::PathBuf>,

    /// File holding the API token (dwa_…). Or set DRIFTWATCH_TOKEN to the token itself.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,

    /// Output: aligned tables for people, or the API's JSON response unchanged; `export` also
    /// takes jsonl, csv and cef.
    #[arg(long, global = true, value_enum, default_value_t = Format::Table)]
    pub format: Format,

    /// Give up when the collector has not answered within this long (e.g. 30s, 2m).
    #[arg(long, global = true, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    /// JSON Lines with ECS-style fields (export only).
    Jsonl,
    /// CSV, formula-safe (export only).
    Csv,
    /// ArcSight CEF, one event per line (export only).
    Cef,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List every host with its state and open drift.
    ///
    /// States: clean; drifted (open violations or package drift: replace it); incomplete (no
    /// known drift, but the host's picture may be missing some: lost reports or a failed scan);
    /// silent (no heartbeat for longer than the collector's threshold); revoked; never-reported
    /// (enrolled, no report yet). When several apply, the first of revoked, never-reported,
    /// silent, drifted, incomplete is shown.
    #[command(args_conflicts_with_subcommands = true)]
    Hosts {
        /// Only hosts in this state.
        #[arg(long, value_parser = PossibleValuesParser::new(HostState::ALL.map(HostState::name)))]
        state: Option<String>,
        #[command(subcommand)]
        command: Option<HostsCommand>,
    },
    /// Images: their registered baselines and their hosts (consensus, outliers, likely image
    /// defects).
    Images,
    /// Rebuild actions, newest first: which flagged hosts the collector asked to replace, and
    /// how that went (states: pending_approval, pending, triggered, delivered, completed,
    /// failed, timed_out, rejected, cancelled, dry_run). See docs/rebuild-actions.md.
    Rebuilds {
        /// Only actions in this state.
        #[arg(long, value_parser = rebuilds::state_parser())]
        state: Option<String>,
        /// Only this host's actions.
        #[arg(long, value_name = "HOST_ID")]
        host: Option<String>,
        /// At most this many (the collector's default 1000, maximum 10000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        #[command(subcommand)]
        command: Option<rebuilds::RebuildsCommand>,
    },
    /// One image.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Signed baselines in the collector's image registry.
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// One host.
    #[command(subcommand)]
    Host(HostCommand),
    /// Violations across the fleet.
    #[command(subcommand)]
    Violations(ViolationsCommand),
    /// Security events the collector recorded: refused tokens, impersonation attempts, revoked
    /// certificates. Oldest first.
    Events {
        /// Events at or after this time: RFC 3339, a date, or a duration back from now (24h).
        /// Default: the last 7 days.
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// At most this many events (the collector's default 1000, maximum 10000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
    /// The audit log: who changed what, and whether the record is intact.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// API tokens (admin role): create, list, revoke.
    #[command(subcommand, name = "api-token")]
    ApiToken(tokens::ApiTokenCommand),
    /// Enrollment tokens for agents (admin role): create, list.
    #[command(subcommand, name = "enrollment-token")]
    EnrollmentToken(tokens::EnrollmentTokenCommand),
    /// Export the fleet's events — violations opened and resolved, security events, audit
    /// records — for a SIEM or a spreadsheet, oldest first.
    ///
    /// --format jsonl: one JSON object per line with ECS-style fields (@timestamp, event.*,
    /// host.name, file.path, package.*, rule.name, labels.*, driftwatch.*); csv: one row per
    /// event, cells safe from spreadsheet formula injection; cef: ArcSight CEF lines. Every
    /// event has a stable event.id, so overlapping exports can be deduplicated. Without
    /// --format: a table for people. Fields: docs/exports.md.
    Export(export::ExportArgs),
}

#[derive(Debug, Subcommand)]
pub enum HostsCommand {
    /// Why a host is or is not flagged by the collector's flagging policy: each reason with
    /// its evidence (paths, packages, roots, ages), and the open items that do not count
    /// (acknowledged, or a likely defect of its image).
    Explain {
        /// The host id.
        host: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// An image's registered baseline and versions, its hosts on the registered root
    /// (consensus), the others (outliers: another root, or drift), and paths drifted on most of
    /// its hosts (likely image defects rather than snowflakes).
    Show {
        /// The image id (as in its baseline).
        image: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BaselineCommand {
    /// Register a signed baseline for its image id (admin). Sends the file's signed header
    /// (image id, version, Merkle root, signature); the collector verifies the signature
    /// against its trusted keys and refuses a version not newer than the registered one.
    Push {
        /// The baseline file (`driftwatch-agent baseline create --out FILE`).
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// A host's state, image, timings and violations, each with every changed attribute
    /// before and after.
    Show {
        /// The host id (as in its certificate).
        host: String,
        /// Also show resolved violations (drift that went away), with when it was resolved.
        #[arg(long)]
        resolved: bool,
    },
    /// Retire a host (operator): it leaves the fleet's lifecycle for good (replaced and retired
    /// hosts are no longer assessed). Its certificate stays valid: revoke it with
    /// `driftwatch-collector host revoke`.
    Retire {
        host: String,
        /// Why (recorded in the transition and the audit log).
        #[arg(long)]
        reason: String,
    },
    /// Acknowledge open violations of a host (operator): they stop counting toward flagging
    /// until the acknowledgement expires, or until the item changes again.
    Ack {
        host: String,
        /// An open violation's exact path (repeatable).
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<String>,
        /// An open package drift's package name (repeatable).
        #[arg(long = "package", value_name = "NAME")]
        packages: Vec<String>,
        /// Every open violation of the host.
        #[arg(long)]
        all: bool,
        /// Why (recorded with the acknowledgement and in the audit log).
        #[arg(long)]
        reason: String,
        /// How long it holds (e.g. 7d, 12h; at most 365d).
        #[arg(long, value_name = "DURATION")]
        expires: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ViolationsCommand {
    /// Search violations across the fleet; every option narrows. Newest first.
    ///
    /// Which hosts changed /etc/ssh/sshd_config?   --path /etc/ssh/sshd_config
    /// Anything under /etc/ssh?                    --path '/etc/ssh/**'
    /// Packages installed by hand today?           --kind package_installed --since 24h
    Search {
        /// Glob over the path (* and ? stay within one directory, ** crosses them; quote it).
        /// File violations only.
        #[arg(long, value_name = "GLOB")]
        path: Option<String>,
        /// Kind of drift.
        #[arg(long, value_parser = PossibleValuesParser::new(KindFilter::NAMES))]
        kind: Option<String>,
        /// Package name: a file owned by it, or the drifted package itself.
        #[arg(long, value_name = "NAME")]
        package: Option<String>,
        /// Hosts running this image id.
        #[arg(long, value_name = "IMAGE_ID")]
        image: Option<String>,
        /// One host.
        #[arg(long, value_name = "HOST_ID")]
        host: Option<String>,
        /// Still present at or after this time: RFC 3339 (2026-11-26T08:00:00Z), a date
        /// (2026-11-26), or a duration back from now (24h, 7d).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// First seen at or before this time (same forms as --since).
        #[arg(long, value_name = "TIME")]
        until: Option<String>,
        /// Include resolved violations (drift that went away).
        #[arg(long)]
        resolved: bool,
        /// At most this many (the collector's default 1000, maximum 10000).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
}

/// Runs one command, printing to stdout; returns the exit status. Errors (the collector
/// unreachable, a refused request) are returned for `main` to print.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let base = ApiBase::parse(&cli.api)?;
    let token = token(cli.token_file.as_deref())?;
    let client = Client::new(base.clone(), cli.ca_file.as_deref(), token, cli.timeout)?;
    if matches!(cli.format, Format::Jsonl | Format::Csv | Format::Cef)
        && !matches!(cli.command, Command::Export(_))
    {
        bail!(
            "--format jsonl, csv and cef are for `driftwatch export`; listings take table or json"
        );
    }
    let out = match &cli.command {
        Command::Export(args) => export::run(&client, cli.format, args).await?,
        Command::Audit(cmd) => return audit::run(&client, cli.format, cmd).await,
        Command::ApiToken(cmd) => return tokens::api_token(&client, cli.format, cmd).await,
        Command::EnrollmentToken(cmd) => {
            return tokens::enrollment_token(&client, cli.format, cmd).await;
        }
        Command::Hosts {
            command: Some(HostsCommand::Explain { host }),
            ..
        } => lifecycle::explain(&client, host, cli.format).await?,
        Command::Images => lifecycle::images(&client, cli.format).await?,
        Command::Rebuilds {
            state,
            host,
            limit,
            command: None,
        } => rebuilds::list(&client, state, host, *limit, cli.format).await?,
        Command::Rebuilds {
            command: Some(c), ..
        } => rebuilds::run(&client, c, cli.format).await?,
        Command::Image(ImageCommand::Show { image }) => {
            lifecycle::image_show(&client, image, cli.format).await?
        }
        Command::Baseline(BaselineCommand::Push { file }) => {
            lifecycle::baseline_push(&client, file, cli.format).await?
        }
        Command::Host(HostCommand::Retire { host, reason }) => {
            lifecycle::retire(&client, host, reason, cli.format).await?
        }
        Command::Host(HostCommand::Ack {
            host,
            paths,
            packages,
            all,
            reason,
            expires,
        }) => {
            lifecycle::acknowledge(
                &client, host, paths, packages, *all, reason, expires, cli.format,
            )
            .await?
        }
        Command::Hosts {
            state,
            command: None,
        } => {
            let target = base.target("/api/v1/hosts", &[("state", state.clone())]);
            let resp = fetch(&client, &target).await?;
            render(cli.format, &resp, |l: api::HostList| hosts_table(&l))?
        }
        Command::Host(HostCommand::Show { host, resolved }) => {
            let id = percent_encode_segment(host);
            let host_target = base.target(&format!("/api/v1/hosts/{id}"), &[]);
            let viol_target = base.target(
                &format!("/api/v1/hosts/{id}/violations"),
                &[("include_resolved", resolved.then(|| "true".to_string()))],
            );
            let h = fetch(&client, &host_target).await?;
            let v = fetch(&client, &viol_target).await?;
            let t = lifecycle::transitions(&client, host).await?;
            match cli.format {
                // One JSON document: the two API responses under their endpoint names. (The
                // export formats were refused above.)
                Format::Json | Format::Jsonl | Format::Csv | Format::Cef => {
                    let host: serde_json::Value = parse(&h)?;
                    let violations: serde_json::Value = parse(&v)?;
                    let transitions: serde_json::Value = parse(&t)?;
                    let mut s = serde_json::to_string_pretty(&serde_json::json!({
                        "host": host,
                        "violations": violations,
                        "transitions": transitions,
                    }))?;
                    s.push('\n');
                    s
                }
                Format::Table => {
                    let h: api::HostDetail = parse(&h)?;
                    let mut v: api::ViolationList = parse(&v)?;
                    // Worst first, resolved last; paths in byte order within a severity.
                    v.violations.sort_by(|a, b| {
                        (a.resolved, severity_rank(&b.severity), &a.path).cmp(&(
                            b.resolved,
                            severity_rank(&a.severity),
                            &b.path,
                        ))
                    });
                    let mut out = host_show(&h.host, &v);
                    out.push_str(&lifecycle::transitions_text(&lifecycle::parse_transitions(
                        &t,
                    )?));
                    out
                }
            }
        }
        Command::Violations(ViolationsCommand::Search {
            path,
            kind,
            package,
            image,
            host,
            since,
            until,
            resolved,
            limit,
        }) => {
            let target = base.target(
                "/api/v1/violations",
                &[
                    ("path", path.clone()),
                    ("kind", kind.clone()),
                    ("package", package.clone()),
                    ("image", image.clone()),
                    ("host", host.clone()),
                    ("since", since.clone()),
                    ("until", until.clone()),
                    ("include_resolved", resolved.then(|| "true".to_string())),
                    ("limit", limit.map(|n| n.to_string())),
                ],
            );
            let resp = fetch(&client, &target).await?;
            render(cli.format, &resp, |l: api::ViolationList| {
                violation_rows(&l, true)
            })?
        }
        Command::Events { since, limit } => {
            let target = base.target(
                "/api/v1/security-events",
                &[
                    ("since", since.clone()),
                    ("limit", limit.map(|n| n.to_string())),
                ],
            );
            let resp = fetch(&client, &target).await?;
            render(cli.format, &resp, |l: api::SecurityEventList| {
                events_table(&l)
            })?
        }
    };
    print!("{out}");
    Ok(ExitCode::from(EXIT_OK))
}

/// The API token: from `--token-file`, else `DRIFTWATCH_TOKEN`, else none (the API then
/// answers 401, and the error says how to get one).
fn token(file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let text = match file {
        Some(f) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the token file {}", f.display()))?,
        None => match std::env::var("DRIFTWATCH_TOKEN") {
            Ok(t) => t,
            Err(std::env::VarError::NotPresent) => return Ok(None),
            Err(e) => bail!("DRIFTWATCH_TOKEN: {e}"),
        },
    };
    let t = text.trim();
    if t.is_empty() {
        bail!("the API token is empty");
    }
    // Checked here so that a typo is not sent to the server, and a header can carry it.
    crate::token::Token::parse(crate::token::TokenKind::Api, t)?;
    Ok(Some(t.to_string()))
}

/// GET, with a non-2xx answer turned into an error carrying the API's message.
async fn fetch(client: &Client, target: &str) -> anyhow::Result<Response> {
    let resp = client.get(target).await?;
    if resp.status == hyper::StatusCode::UNAUTHORIZED {
        bail!(
            "collector refused GET {target}: {} (give a token with --token-file or \
             DRIFTWATCH_TOKEN; an admin makes one with driftwatch-collector api-token create)",
            resp.error_message()
        );
    }
    if !resp.status.is_success() {
        bail!("collector refused GET {target}: {}", resp.error_message());
    }
    Ok(resp)
}

pub(crate) fn parse<T: DeserializeOwned>(resp: &Response) -> anyhow::Result<T> {
    serde_json::from_slice(&resp.body).context("the collector's answer is not driftwatch.api.v1")
}

pub(crate) fn render<T: DeserializeOwned>(
    format: Format,
    resp: &Response,
    table: impl FnOnce(T) -> String,
) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json | Format::Jsonl | Format::Csv | Format::Cef => {
            let mut s = String::from_utf8_lossy(&resp.body).into_owned();
            if !s.ends_with('\n') {
                s.push('\n');
            }
            s
        }
        Format::Table => table(parse(resp)?),
    })
}

/// A host id as one path segment. Valid host ids need no encoding; anything else is encoded
/// so it cannot change the request's path.
pub(crate) fn percent_encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `2026-11-26T08:26:56.123Z` → `2026-11-26 08:26:56Z`: seconds are enough on a screen.
pub(crate) fn when(t: &str) -> String {
    let b = t.as_bytes();
    if t.len() == 24 && b[10] == b'T' && b[19] == b'.' && t.ends_with('Z') {
        format!("{} {}Z", &t[..10], &t[11..19])
    } else {
        escape::text(t)
    }
}

pub(crate) fn when_opt(t: &Option<String>) -> String {
    t.as_deref().map_or_else(|| "-".to_string(), when)
}

fn severity_rank(s: &str) -> u8 {
    match s {
        "critical" => 5,
        "high" => 4,
        "medium" => 3,
        "low" => 2,
        "info" => 1,
        _ => 0,
    }
}

fn count(n: u64) -> String {
    if n == 0 { "-".into() } else { n.to_string() }
}

fn hosts_table(l: &api::HostList) -> String {
    if l.hosts.is_empty() {
        return "no hosts\n".into();
    }
    let mut t = Table::new(vec![
        "HOST",
        "STATE",
        "LIFECYCLE",
        "IMAGE",
        "OPEN",
        "CRIT",
        "HIGH",
        "MED",
        "LOW",
        "INFO",
        "PKGS",
        "LAST SEEN",
    ]);
    for h in &l.hosts {
        t.row(vec![
            escape::text(&h.host_id),
            escape::text(&h.state),
            if h.lifecycle.is_empty() {
                "-".into()
            } else {
                escape::text(&h.lifecycle)
            },
            image(&h.image),
            count(h.open.total),
            count(h.open.critical),
            count(h.open.high),
            count(h.open.medium),
            count(h.open.low),
            count(h.open.info),
            count(h.package_drift),
            when_opt(&h.last_seen),
        ]);
    }
    t.render()
}

fn image(i: &api::Image) -> String {
    match (i.id.is_empty(), i.version.is_empty()) {
        (true, _) => "-".into(),
        (false, true) => escape::text(&i.id),
        (false, false) => format!("{} {}", escape::text(&i.id), escape::text(&i.version)),
    }
}

fn path_or_package(v: &api::Violation) -> String {
    if let Some(RawBytes(p)) = &v.path {
        return escape::bytes(p);
    }
    if let Some(p) = &v.package {
        return format!(
            "package {}:{}",
            escape::text(&p.name),
            escape::text(&p.arch)
        );
    }
    "-".into()
}

/// The lines under a violation: each change before → after, the reason, the packages.
fn details(v: &api::Violation) -> Vec<String> {
    let mut d = Vec::new();
    for c in &v.changes {
        d.push(format!(
            "{}: {} -> {}",
            escape::text(&c.attribute),
            escape::text(&c.before),
            escape::text(&c.after)
        ));
    }
    if let Some(p) = &v.package {
        let side = |s: &Option<api::PackageVersion>| {
            s.as_ref().map_or_else(
                || "(absent)".to_string(),
                |s| format!("{} ({})", escape::text(&s.version), escape::text(&s.state)),
            )
        };
        d.push(format!(
            "version: {} -> {}",
            side(&p.before),
            side(&p.after)
        ));
    }
    if let Some(r) = &v.reason {
        d.push(format!("reason: {}", escape::text(r)));
    }
    if !v.packages.is_empty() {
        let names: Vec<String> = v.packages.iter().map(|p| escape::text(p)).collect();
        let mut line = format!("packages: {}", names.join(", "));
        if let Some(c) = &v.class {
            line.push_str(&format!(" ({})", escape::text(c)));
        }
        if v.config {
            line.push_str(", configuration file");
        }
        d.push(line);
    }
    if let Some(at) = &v.resolved_at {
        d.push(format!("resolved {}", when(at)));
    }
    d
}

fn host_show(h: &api::Host, v: &api::ViolationList) -> String {
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        out.push_str(&format!("{name:<13}{value}\n"));
    };
    field("host", escape::text(&h.host_id));
    field("state", escape::text(&h.state));
    field("image", image(&h.image));
    field(
        "baseline",
        h.baseline_root.as_deref().map_or("-".into(), escape::text),
    );
    field(
        "agent",
        h.agent_version.as_deref().map_or("-".into(), escape::text),
    );
    if !h.labels.is_empty() {
        let labels: Vec<String> = h
            .labels
            .iter()
            .map(|(k, v)| format!("{}={}", escape::text(k), escape::text(v)))
            .collect();
        field("labels", labels.join(", "));
    }
    field("enrolled", when(&h.enrolled_at));
    field("last seen", when_opt(&h.last_seen));
    let scan_status = h
        .last_scan_status
        .as_deref()
        .map(|s| format!(" ({})", escape::text(s)))
        .unwrap_or_default();
    field(
        "last scan",
        format!("{}{scan_status}", when_opt(&h.last_scan)),
    );
    field("last report", when_opt(&h.last_report));
    if h.incomplete {
        field(
            "incomplete",
            h.incomplete_reason
                .as_deref()
                .map_or("yes".into(), |r| format!("yes: {}", escape::text(r))),
        );
    }
    if h.lost_reports > 0 {
        field("lost reports", h.lost_reports.to_string());
    }
    field("open", open_summary(h));
    if h.revoked {
        field("revoked", "yes".into());
    }
    out.push('\n');
    out.push_str(&violation_rows(v, false));
    out
}

fn open_summary(h: &api::Host) -> String {
    if h.open.total == 0 {
        return "nothing".into();
    }
    let o = &h.open;
    let parts: Vec<String> = [
        (o.critical, "critical"),
        (o.high, "high"),
        (o.medium, "medium"),
        (o.low, "low"),
        (o.info, "info"),
        (o.unspecified, "unspecified"),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, s)| format!("{n} {s}"))
    .collect();
    let mut s = format!("{} ({})", o.total, parts.join(", "));
    if h.package_drift > 0 {
        s.push_str(&format!(", of which {} package drift", h.package_drift));
    }
    s
}

fn violation_rows(l: &api::ViolationList, with_host: bool) -> String {
    if l.violations.is_empty() {
        return "no violations\n".into();
    }
    let mut header = vec![];
    if with_host {
        header.push("HOST");
    }
    header.extend(["SEVERITY", "KIND", "PATH", "FIRST SEEN", "LAST SEEN"]);
    let mut t = Table::new(header);
    for v in &l.violations {
        let mut cells = vec![];
        if with_host {
            cells.push(escape::text(&v.host_id));
        }
        let kind = if v.resolved {
            format!("{} (resolved)", escape::text(&v.kind))
        } else {
            escape::text(&v.kind)
        };
        cells.extend([
            escape::text(&v.severity),
            kind,
            path_or_package(v),
            when(&v.first_seen),
            when(&v.last_seen),
        ]);
        t.row_with_details(cells, details(v));
    }
    let mut s = t.render();
    if l.truncated {
        s.push_str(&format!(
            "(only the first {} shown: more match; narrow the search or raise --limit)\n",
            l.limit
        ));
    }
    s
}

fn events_table(l: &api::SecurityEventList) -> String {
    if l.events.is_empty() {
        return "no security events\n".into();
    }
    let mut t = Table::new(vec!["TIME", "KIND", "HOST", "DETAIL"]);
    for e in &l.events {
        t.row(vec![
            when(&e.at),
            escape::text(&e.kind),
            e.peer_host_id.as_deref().map_or("-".into(), escape::text),
            escape::text(&e.detail),
        ]);
    }
    let mut s = t.render();
    if l.truncated {
        s.push_str(&format!(
            "(only the first {} shown: more match; use --since or raise --limit)\n",
            l.limit
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn host_ids_cannot_escape_their_path_segment() {
        assert_eq!(percent_encode_segment("web-1.example"), "web-1.example");
        assert_eq!(percent_encode_segment("../x?y"), "..%2Fx%3Fy");
    }

    #[test]
    fn times_are_shortened_only_when_well_formed() {
        assert_eq!(when("2026-11-26T08:26:56.123Z"), "2026-11-26 08:26:56Z");
        assert_eq!(when("garbage\x1b"), "garbage\\x1b");
    }
}
