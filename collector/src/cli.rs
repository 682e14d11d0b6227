//! The `driftwatch-collector` command line: argument definitions and one function per command.
//! The binary only parses, sets up logging, runs [`run`] and maps its outcome to an exit code.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::ca::{CertificateAuthority, unix_ms};
use crate::config::{ConfigError, DEFAULT_CONFIG_PATH, Database, Settings};
use crate::storage::audit::{ChainError, ChainHead, ChainVerifier};
use crate::storage::{
    ApiToken, AuditEntry, EnrollmentToken, PgStore, RevokeOutcome, Role, SqliteStore, Storage,
};
use crate::token::{Token, TokenKind};

/// The driftwatch collector: enrollment CA and report ingest for a fleet of driftwatch agents.
#[derive(Debug, Parser)]
#[command(name = "driftwatch-collector", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file (TOML). Default: /etc/driftwatch/collector.toml if it exists, else
    /// built-in defaults (state in /var/lib/driftwatch-collector).
    #[arg(
        long,
        short = 'c',
        value_name = "FILE",
        env = "DRIFTWATCH_COLLECTOR_CONFIG",
        global = true
    )]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the collector: the gRPC port for agents (enrollment, report streams, health) and the
    /// HTTP API for people (bearer tokens; TLS beyond loopback).
    Serve {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled hosts.
    #[command(subcommand)]
    Host(HostCommand),
    /// The collector's certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Bearer tokens for the HTTP API (and the `driftwatch` CLI), each with a role.
    ///
    /// Roles: auditor (reads everything, the audit log included), operator (also acknowledges
    /// violations, approves or rejects rebuilds, retires hosts), admin (also manages tokens,
    /// enrollment tokens, baselines and policy). Made here, on the collector's machine, for
    /// the first admin; admins then manage tokens over the API. Works while the collector is
    /// serving.
    #[command(subcommand, name = "api-token")]
    ApiToken(ApiTokenCommand),
    /// The audit log (hash-chained records of every state-changing action).
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Debug, Subcommand)]
pub enum ApiTokenCommand {
    /// Create an API token and print it (only this once: the collector keeps a hash).
    ///
    /// Example: driftwatch-collector api-token create --role admin --name alice --ttl 90d
    ///          > ~/.config/driftwatch/token; driftwatch --token-file ~/.config/driftwatch/token hosts
    Create {
        /// auditor, operator or admin.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Who or what the token is for (shown in listings and the audit log).
        #[arg(long)]
        name: String,
        /// How long it stays valid (e.g. 30d, 12h). Default: until revoked.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List API tokens: id, name, role, state, last use (never the secrets).
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke an API token: requests with it are refused from now on.
    Revoke {
        /// The token's id (the 8 hex digits after dwa_).
        id: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the audit log's hash chain, reading the database directly (for when the API is
    /// down; otherwise prefer `driftwatch audit verify`, which verifies on the client).
    ///
    /// Prints the chain's head (<seq>:<hash>): note it somewhere the collector cannot write
    /// and pass it to --expect-head later, which also catches records removed from the end.
    /// Exit status: 0 intact, 1 broken (the first bad record is named), 2 error.
    Verify {
        /// A head noted earlier (<seq>:<64 hex digits>) that the chain must still contain.
        #[arg(long, value_name = "SEQ:HASH")]
        expect_head: Option<ChainHead>,
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    s.parse::<Role>().map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an enrollment token and print it (only this once: the collector keeps a hash).
    ///
    /// Give it to `driftwatch-agent enroll --token`. Works while the collector is serving.
    Create {
        /// How long the token stays valid (e.g. 30m, 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many hosts may enroll with it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
        /// Only host ids matching this glob may enroll with it (e.g. 'web-*.prod').
        #[arg(long, value_name = "GLOB")]
        host_pattern: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List enrollment tokens (ids, expiry, uses left; never the secrets).
    List {
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Revoke every certificate of a host; its open report streams are closed within 30 s.
    Revoke {
        /// The host id.
        host: String,
        #[command(flatten)]
        config: ConfigArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate's SHA-256 fingerprint (for `driftwatch-agent enroll
    /// --ca-fingerprint`) and the certificate itself (PEM, for `--ca-file`).
    Show {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// A failed command: a configuration error (exit 64), a broken audit chain (exit 1) or
/// anything else (exit 1; `audit verify`: 2).
#[derive(Debug)]
pub enum Failure {
    Config(ConfigError),
    /// `audit verify` found the chain broken (the message names the first bad record).
    ChainBroken(ChainError),
    /// `audit verify` could not verify (database unreachable): exit 2, not 1.
    VerifyTrouble(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure::Other(e)
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Failure {
        Failure::Config(e)
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve { config } => serve(&settings(&config)?).await,
        Command::Token(TokenCommand::Create {
            ttl,
            uses,
            host_pattern,
            config,
        }) => token_create(&settings(&config)?, ttl, uses, host_pattern).await,
        Command::Token(TokenCommand::List { config }) => token_list(&settings(&config)?).await,
        Command::Host(HostCommand::Revoke { host, config }) => {
            host_revoke(&settings(&config)?, &host).await
        }
        Command::Ca(CaCommand::Show { config }) => ca_show(&settings(&config)?),
        Command::ApiToken(ApiTokenCommand::Create {
            role,
            name,
            ttl,
            config,
        }) => api_token_create(&settings(&config)?, role, name, ttl).await,
        Command::ApiToken(ApiTokenCommand::List { config }) => {
            api_token_list(&settings(&config)?).await
        }
        Command::ApiToken(ApiTokenCommand::Revoke { id, config }) => {
            api_token_revoke(&settings(&config)?, &id).await
        }
        Command::Audit(AuditCommand::Verify {
            expect_head,
            config,
        }) => audit_verify(&settings(&config)?, expect_head).await,
    }
}

/// The audit actor of a command run on the collector's machine: `local:<user>`, the user
/// from the process's real uid (not `$USER`, which the caller sets).
pub fn local_actor() -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = match std::fs::metadata("/proc/self") {
        Ok(m) => m.uid(),
        Err(_) => return "local:unknown".into(),
    };
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?;
            (id.parse::<u32>().ok()? == uid).then(|| name.to_string())
        })
    });
    format!("local:{}", name.unwrap_or_else(|| format!("uid{uid}")))
}

fn settings(arg: &ConfigArg) -> Result<Settings, ConfigError> {
    match &arg.config {
        Some(path) => Settings::load(Some(path)),
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            Settings::load(Some(Path::new(DEFAULT_CONFIG_PATH)))
        }
        None => Settings::load(None),
    }
}

/// Opens the configured database (creating the state directory and SQLite file if needed).
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Storage>> {
    match &settings.database {
        Database::Sqlite(path) => {
            let path = path.clone();
            let dir = settings.state_dir.clone();
            let store = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                SqliteStore::open(&path).with_context(|| format!("opening {}", path.display()))
            })
            .await??;
            Ok(Arc::new(store))
        }
        Database::Postgres(url) => {
            let store = PgStore::connect(url)
                .await
                .context("connecting to PostgreSQL")?;
            Ok(Arc::new(store))
        }
    }
}

async fn serve(settings: &Settings) -> Result<(), Failure> {
    // The [actions] secret and CA files: a bad one is a configuration error (exit 64).
    if let Some(actions) = &settings.actions {
        crate::actions::executor::Executor::load(actions)?;
    }
    let store = open_store(settings).await?;
    crate::server::serve(settings.clone(), store, shutdown_signal())
        .await
        .context("serving")?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}

async fn token_create(
    settings: &Settings,
    ttl: Duration,
    uses: u32,
    host_pattern: Option<String>,
) -> Result<(), Failure> {
    let store = open_store(settings).await?;
    let token = Token::generate(TokenKind::Enrollment).context("generating a token")?;
    let now = unix_ms(SystemTime::now());
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let record = token.record(now, now.saturating_add(ttl_ms), uses, host_pattern);
    let audit = enrollment_token_audit(&record, local_actor());
    store
        .create_enrollment_token(record, audit)
        .await
        .context("storing the token")?;
    eprintln!(
        "token {} valid for {}, {} use(s); it is shown only once:",
        token.id(),
        humantime::format_duration(ttl),
        uses
    );
    println!("{}", token.reveal());
    Ok(())
}

async fn token_list(settings: &Settings) -> Result<(), Failure> {
    let store = open_store(settings).await?;
    let tokens = store
        .list_enrollment_tokens()
        .await
        .context("listing tokens")?;
    let now = unix_ms(SystemTime::now());
    println!(
        "{:<8}  {:<20}  {:>9}  HOST PATTERN",
        "ID", "EXPIRES", "USES LEFT"
    );
    for t in tokens {
        let expires = if t.expires_ms <= now {
            "expired".to_string()
        } else {
            let left = Duration::from_secs(u64::try_from((t.expires_ms - now) / 1000).unwrap_or(0));
            format!("in {}", humantime::format_duration(left))
        };
        println!(
            "{:<8}  {:<20}  {:>9}  {}",
            t.id,
            expires,
            t.uses_left,
            t.host_pattern.as_deref().unwrap_or("*")
        );
    }
    Ok(())
}

async fn host_revoke(settings: &Settings, host: &str) -> Result<(), Failure> {
    let store = open_store(settings).await?;
    let now = unix_ms(SystemTime::now());
    let audit = AuditEntry::new(
        now,
        local_actor(),
        "host.revoked",
        host,
        serde_json::json!({}),
    );
    let n = store
        .revoke_host(host, now, audit)
        .await
        .with_context(|| format!("revoking {host}"))?;
    println!("revoked {n} certificate(s) of {host}; its streams close within 30 s");
    Ok(())
}

fn ca_show(settings: &Settings) -> Result<(), Failure> {
    let ca = CertificateAuthority::open_existing(&settings.ca)
        .context("no CA yet (it is created when the collector first starts)")?;
    println!("sha256 fingerprint: {}", ca.fingerprint());
    print!("{}", ca.cert_pem());
    Ok(())
}

/// The `token.created` audit record of an enrollment token (never its secret).
pub fn enrollment_token_audit(t: &EnrollmentToken, actor: String) -> AuditEntry {
    AuditEntry::new(
        t.created_ms,
        actor,
        "token.created",
        t.id.clone(),
        serde_json::json!({
            "expires_at": crate::api::rfc3339_ms(t.expires_ms),
            "uses": t.uses_left,
            "host_pattern": t.host_pattern,
        }),
    )
}

/// A new API token and its row; `created_by` is the audit actor.
pub fn new_api_token(
    role: Role,
    name: String,
    ttl: Option<Duration>,
    created_by: String,
    now_ms: i64,
) -> anyhow::Result<(Token, ApiToken, AuditEntry)> {
    crate::storage::access::check_token_name(&name)?;
    let token = Token::generate(TokenKind::Api).context("generating a token")?;
    let expires_ms =
        ttl.map(|t| now_ms.saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX)));
    let record = ApiToken {
        id: token.id().to_string(),
        name,
        role,
        secret_sha256: token.sha256(),
        created_ms: now_ms,
        expires_ms,
        revoked_ms: None,
        last_used_ms: None,
        created_by: created_by.clone(),
    };
    let audit = AuditEntry::new(
        now_ms,
        created_by,
        "api_token.created",
        record.id.clone(),
        serde_json::json!({
            "name": record.name,
            "role": role.name(),
            "expires_at": expires_ms.map(crate::api::rfc3339_ms),
        }),
    );
    Ok((token, record, audit))
}

/// The `api_token.revoked` audit record.
pub fn api_token_revoke_audit(id: &str, actor: String, now_ms: i64) -> AuditEntry {
    AuditEntry::new(
        now_ms,
        actor,
        "api_token.revoked",
        id,
        serde_json::json!({}),
    )
}

async fn api_token_create(
    settings: &Settings,
    role: Role,
    name: String,
    ttl: Option<Duration>,
) -> Result<(), Failure> {
    let store = open_store(settings).await?;
    let now = unix_ms(SystemTime::now());
    let (token, record, audit) = new_api_token(role, name, ttl, local_actor(), now)?;
    store
        .create_api_token(record, audit)
        .await
        .context("storing the token")?;
    let validity = match ttl {
        Some(t) => format!("valid for {}", humantime::format_duration(t)),
        None => "valid until revoked".into(),
    };
    eprintln!(
        "API token {} ({role}) {validity}; it is shown only once:",
        token.id()
    );
    println!("{}", token.reveal());
    Ok(())
}

async fn api_token_list(settings: &Settings) -> Result<(), Failure> {
    let store = open_store(settings).await?;
    let tokens = store.list_api_tokens().await.context("listing tokens")?;
    let now = unix_ms(SystemTime::now());
    println!(
        "{:<8}  {:<8}  {:<8}  {:<24}  {:<24}  NAME",
        "ID", "ROLE", "STATE", "EXPIRES", "LAST USED"
    );
    for t in tokens {
        let state = if t.revoked_ms.is_some() {
            "revoked"
        } else if !t.active_at(now) {
            "expired"
        } else {
            "active"
        };
        println!(
            "{:<8}  {:<8}  {:<8}  {:<24}  {:<24}  {}",
            t.id,
            t.role,
            state,
            t.expires_ms.map_or("never".into(), crate::api::rfc3339_ms),
            t.last_used_ms
                .map_or("never".into(), crate::api::rfc3339_ms),
            driftwatch_proto::escape::text(&t.name),
        );
    }
    Ok(())
}

async fn api_token_revoke(settings: &Settings, id: &str) -> Result<(), Failure> {
    let store = open_store(settings).await?;
    let now = unix_ms(SystemTime::now());
    let audit = api_token_revoke_audit(id, local_actor(), now);
    match store
        .revoke_api_token(id, now, audit)
        .await
        .with_context(|| format!("revoking {id}"))?
    {
        RevokeOutcome::Revoked => {
            println!("API token {id} revoked");
            Ok(())
        }
        RevokeOutcome::AlreadyRevoked(at) => {
            println!(
                "API token {id} was already revoked at {}",
                crate::api::rfc3339_ms(at)
            );
            Ok(())
        }
        RevokeOutcome::NotFound => Err(anyhow::anyhow!("no API token with id {id:?}").into()),
    }
}

/// Records per page when verifying.
const AUDIT_PAGE: u32 = 1000;

async fn audit_verify(settings: &Settings, expect: Option<ChainHead>) -> Result<(), Failure> {
    let store = open_store(settings).await.map_err(Failure::VerifyTrouble)?;
    let mut v = match expect {
        Some(h) => ChainVerifier::expecting(h),
        None => ChainVerifier::new(),
    };
    let mut after = 0;
    loop {
        let page = store
            .audit_records(after, AUDIT_PAGE)
            .await
            .context("reading the audit log")
            .map_err(Failure::VerifyTrouble)?;
        for r in &page {
            v.push(r).map_err(Failure::ChainBroken)?;
        }
        match page.last() {
            // seq strictly increases (the verifier checked), so this loop ends.
            Some(last) if page.len() == AUDIT_PAGE as usize => after = last.seq,
            _ => break,
        }
    }
    match v.finish().map_err(Failure::ChainBroken)? {
        Some(head) => println!(
            "audit log intact: {} records; head {head} (note it, and pass it to --expect-head next time)",
            v.count()
        ),
        None => println!("audit log intact: empty"),
    }
    Ok(())
}
