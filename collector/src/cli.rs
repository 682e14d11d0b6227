//! The `driftwatch-collector` command line: argument definitions and one function per command.
//! The binary only parses, sets up logging, runs [`run`] and maps its outcome to an exit code.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::ca::{CertificateAuthority, unix_ms};
use crate::config::{ConfigError, DEFAULT_CONFIG_PATH, Database, Settings};
use crate::storage::{PgStore, SqliteStore, Storage};
use crate::token::Token;

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
    /// Run the collector: the gRPC port for agents (enrollment, report streams, health).
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

/// A failed command: a configuration error (exit 64) or anything else (exit 1).
#[derive(Debug)]
pub enum Failure {
    Config(ConfigError),
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
    }
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
    let token = Token::generate().context("generating a token")?;
    let now = unix_ms(SystemTime::now());
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let record = token.record(now, now.saturating_add(ttl_ms), uses, host_pattern);
    store
        .create_enrollment_token(record)
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
    let n = store
        .revoke_host(host, unix_ms(SystemTime::now()))
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
