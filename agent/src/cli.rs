//! Command-line interface of `driftwatch-agent`: argument definitions and the glue that runs
//! each command. Kept in the library so that man pages and completions can be generated from
//! the same definitions.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;

use crate::baseline::{self, BaselineError};
use crate::check::{self, CheckOptions, PolicySource};
use crate::create::{self, CreateOptions, Progress};
use crate::diff;
use crate::escape::{self, JsonBytes};
use crate::keys;
use crate::policy::Policy;
use crate::report::hex;

/// Exit status: no drift / baseline valid.
pub const EXIT_CLEAN: u8 = 0;
/// Exit status: drift found / baseline refused.
pub const EXIT_DRIFT: u8 = 1;
/// Exit status: the tool failed.
pub const EXIT_ERROR: u8 = 2;
/// Exit status of `run` on a configuration error (EX_CONFIG is 78, but 64 is what the
/// project's systemd unit lists in `RestartPreventExitStatus=`, as the contract fixes).
pub const EXIT_CONFIG: u8 = 64;

const ABOUT: &str =
    "Detect drift of a server from the signed baseline of the image it was built from";

const LONG_ABOUT: &str = "\
driftwatch-agent fingerprints an image's root filesystem at build time (a signed baseline) and
later tells exactly how a live root differs from it: files added, removed or modified (content,
mode, owner, capabilities and other extended attributes, symlink targets, device numbers), with
before and after values.";

const EXAMPLES: &str = "\
Image pipeline:
  driftwatch-agent keygen --out /secure/pipeline
  driftwatch-agent baseline create --root / --image-id web --image-version 2026.11.1 \\
      --expires 180d --sign-key /secure/pipeline.key --out /etc/driftwatch/baseline.dwb
  driftwatch-agent check --baseline /etc/driftwatch/baseline.dwb \\
      --trusted-key /etc/driftwatch/pipeline.pub

Exit status of check: 0 clean, 1 drift found, 2 error (like diff(1)).";

#[derive(Debug, Parser)]
#[command(name = "driftwatch-agent", version, about = ABOUT, long_about = LONG_ABOUT, after_help = EXAMPLES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate an Ed25519 key pair for signing baselines (PREFIX.key, mode 0600, and PREFIX.pub)
    Keygen(KeygenArgs),
    /// Create, verify and inspect signed baselines
    #[command(subcommand)]
    Baseline(BaselineCommand),
    /// Compare a root filesystem with its baseline; exit 0 clean, 1 drift, 2 error
    Check(CheckArgs),
    /// Verify every package-owned file against the package manager's own checksums and
    /// attributes, with no baseline (like `debsums -s` and `rpm -Va`); exit 0 clean, 1 drift, 2 error
    VerifyPackages(VerifyPackagesArgs),
    /// Show the policy in force
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Enroll this host with a collector: make a key, trade a token and a CSR for a client
    /// certificate, store the identity in STATE_DIR/identity
    Enroll(EnrollArgs),
    /// Run the agent daemon: scan on a schedule and stream drift to the collector (SIGHUP or
    /// SIGUSR1: scan now; SIGTERM/SIGINT: stop). Exit 64 on a configuration error
    Run(RunArgs),
    /// Show what the agent daemon last saw (STATE_DIR/status.json): last scan and its counts,
    /// spool depth, collector connection, certificate expiry. Exit 0 clean, 1 drift or a failed
    /// or unfinished scan, 2 error, 3 the agent never ran
    #[command(after_help = STATUS_EXIT)]
    Status(StatusArgs),
}

const STATUS_EXIT: &str = "\
Exit status:
  0  the last scan was complete and found no drift
  1  the last scan found drift or failed, or no scan has finished yet
  2  status.json could not be read (permissions, a damaged file)
  3  no status.json: the agent never ran with this state directory

Needs no root when the state directory is readable (the packaged service keeps it 0755 with
its identity and spool private).";

/// Exit status of `status` when the agent never ran (like LSB's \"program is not running\").
pub const EXIT_NEVER_RAN: u8 = 3;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's state directory [default: state_dir of --config, else /var/lib/driftwatch]
    #[arg(long, value_name = "DIR", env = "DRIFTWATCH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// The daemon configuration whose state_dir to read (with its drop-ins)
    #[arg(long, value_name = "FILE", default_value = crate::daemon::config::DEFAULT_PATH)]
    pub config: PathBuf,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("ca").required(true).args(["ca_file", "ca_fingerprint"]))]
pub struct EnrollArgs {
    /// The collector's gRPC address, e.g. https://collector.example.com:7443
    #[arg(long, value_name = "URL")]
    pub collector: String,
    /// Trust the collector CA certificate(s) in this PEM file
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// Trust the collector CA with this SHA-256 fingerprint (hex, ':' allowed), found in the
    /// server's certificate chain and pinned as STATE_DIR/identity/ca.pem
    #[arg(long, value_name = "SHA256")]
    pub ca_fingerprint: Option<String>,
    /// The enrollment token (dwt_...) from `driftwatch-collector token create`
    #[arg(
        long,
        value_name = "TOKEN",
        env = "DRIFTWATCH_ENROLL_TOKEN",
        hide_env_values = true
    )]
    pub token: String,
    /// Host id to ask for [default: the hostname]
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// Label stored with the host (repeatable)
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    #[arg(long, value_name = "DIR", env = "DRIFTWATCH_STATE_DIR", default_value = crate::daemon::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Replace an existing identity
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Daemon configuration (see packaging/examples/agent.toml)
    #[arg(long, value_name = "FILE", default_value = crate::daemon::config::DEFAULT_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyPackagesArgs {
    /// Root filesystem whose package database and files are verified
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Policy file (its [packages] verify_conffiles decides whether configuration files are
    /// checked; on by default)
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Threads [default: number of CPUs]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum BaselineCommand {
    /// Scan an image root and write its signed baseline (run at image build time)
    Create(CreateArgs),
    /// Check a baseline's signature, integrity, expiry and format version; exit 0 valid, 1 refused
    Verify(VerifyArgs),
    /// Print a baseline's header, counts by file type and Merkle root
    Show(ShowArgs),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Print the effective policy (built-in defaults merged with --policy) as TOML
    Show(PolicyShowArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Write PREFIX.key (private, 0600) and PREFIX.pub; refuses to overwrite either
    #[arg(long, value_name = "PREFIX")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The image's root directory (`/` inside the build VM, or a mounted image)
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Image identifier, e.g. "web"
    #[arg(long, value_name = "ID")]
    pub image_id: String,
    /// Image version, e.g. "2026.11.1"
    #[arg(long, value_name = "V")]
    pub image_version: String,
    /// Expiry: a duration from now ("180d") or a date ("2027-06-30"); default: never
    #[arg(long, value_name = "DURATION|DATE")]
    pub expires: Option<String>,
    /// Policy file merged over the built-in policy; embedded in the baseline
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// PKCS#8 PEM Ed25519 private key (from `keygen`)
    #[arg(long, value_name = "KEY")]
    pub sign_key: PathBuf,
    /// Where to write the baseline (replaced atomically)
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Hashing threads [default: number of CPUs]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The baseline file
    pub file: PathBuf,
    /// Trusted public key(s) (PEM); the baseline must be signed by one of them
    #[arg(long = "trusted-key", value_name = "PUB", required = true, num_args = 1..)]
    pub trusted_keys: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The baseline file
    pub file: PathBuf,
    /// Also list every entry
    #[arg(long)]
    pub entries: bool,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Verify the signature against these keys too (without them, integrity is checked and the
    /// signer is shown but not trusted)
    #[arg(long = "trusted-key", value_name = "PUB", num_args = 1..)]
    pub trusted_keys: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The signed baseline of the image this root was built from
    #[arg(long, value_name = "FILE")]
    pub baseline: PathBuf,
    /// Trusted public key(s) (PEM); the baseline must be signed by one of them
    #[arg(long = "trusted-key", value_name = "PUB", required = true, num_args = 1..)]
    pub trusted_keys: Vec<PathBuf>,
    /// Root filesystem to check
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Policy file to use instead of the policy embedded in the baseline
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Hash every file, ignoring the scan cache (the cache is still refreshed)
    #[arg(long)]
    pub full: bool,
    /// Directory for the scan cache; without it every check hashes every file
    #[arg(long, value_name = "DIR", env = "DRIFTWATCH_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "text")]
    pub format: Format,
    /// Hashing threads [default: number of CPUs]
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
}

#[derive(Debug, Args)]
pub struct PolicyShowArgs {
    /// Policy file merged over the built-in policy
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// Explain what applies to these paths instead of printing the policy
    #[arg(long, value_name = "PATH", num_args = 1..)]
    pub path: Vec<String>,
}

fn threads(n: Option<usize>) -> usize {
    n.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1)
}

fn load_policy(path: &Path) -> Result<Policy> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read policy {}", path.display()))?;
    Policy::from_toml(&text).with_context(|| format!("invalid policy {}", path.display()))
}

fn load_trusted(paths: &[PathBuf]) -> Result<Vec<[u8; 32]>> {
    paths
        .iter()
        .map(|p| keys::load_public(p).map_err(anyhow::Error::from))
        .collect()
}

/// A spinner on stderr when it is a terminal; nothing otherwise.
struct ProgressLine {
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressLine {
    fn new(what: &'static str) -> ProgressLine {
        if !std::io::stderr().is_terminal() {
            return ProgressLine { bar: None };
        }
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) =
            indicatif::ProgressStyle::with_template("{spinner} {prefix} {msg} [{elapsed}]")
        {
            bar.set_style(style);
        }
        bar.set_prefix(what);
        bar.enable_steady_tick(Duration::from_millis(120));
        ProgressLine { bar: Some(bar) }
    }

    fn update(&self, p: Progress) {
        if let Some(bar) = &self.bar
            && p.entries.is_multiple_of(1024)
        {
            bar.set_message(format!(
                "{} entries, {:.0} MiB hashed",
                p.entries,
                p.bytes_hashed as f64 / 1048576.0
            ));
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Runs the parsed command line and returns the process exit status.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Keygen(a) => keygen(a),
        Command::Baseline(BaselineCommand::Create(a)) => baseline_create(a),
        Command::Baseline(BaselineCommand::Verify(a)) => baseline_verify(a),
        Command::Baseline(BaselineCommand::Show(a)) => baseline_show(a),
        Command::Check(a) => run_check(a),
        Command::VerifyPackages(a) => verify_packages(a),
        Command::Policy(PolicyCommand::Show(a)) => policy_show(a),
        Command::Enroll(a) => enroll(a),
        Command::Run(a) => run_daemon(a),
        Command::Status(a) => status(a),
    }
}

fn status(a: StatusArgs) -> Result<ExitCode> {
    use crate::daemon::config::{DEFAULT_STATE_DIR, RawConfig};
    use crate::daemon::status::{self, Outcome, ReadError};
    let state_dir = match a.state_dir {
        Some(d) => d,
        // Only state_dir is wanted: a configuration that is otherwise incomplete still names it.
        None if a.config.exists() => RawConfig::load(&a.config)?
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        None => PathBuf::from(DEFAULT_STATE_DIR),
    };
    let (view, value) = match status::read(&state_dir) {
        Ok(v) => v,
        Err(e @ ReadError::NeverRan { .. }) => {
            eprintln!("driftwatch-agent: {e}");
            return Ok(ExitCode::from(EXIT_NEVER_RAN));
        }
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &value)?;
            writeln!(out)?;
        }
        Format::Text => out.write_all(view.render_text(crate::time::now_unix()).as_bytes())?,
    }
    out.flush()?;
    Ok(ExitCode::from(match view.outcome() {
        Outcome::Clean => EXIT_CLEAN,
        Outcome::Attention => EXIT_DRIFT,
    }))
}

/// Logging for the long-running commands: journald when started by systemd with its output
/// connected to the journal (`JOURNAL_STREAM`), stderr otherwise. `RUST_LOG` filters (default
/// `info`).
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(tracing_journald::layer)
        .and_then(Result::ok);
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match journald {
        Some(j) => registry.with(j).try_init(),
        None => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(false),
            )
            .try_init(),
    };
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // Two workers are plenty for one stream and a few timers; scanning has its own threads.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(8)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn enroll(a: EnrollArgs) -> Result<ExitCode> {
    use crate::enroll::{CaTrust, EnrollOptions};
    let collector = crate::transport::CollectorUrl::parse(&a.collector)?;
    let trust = match (a.ca_file, a.ca_fingerprint) {
        (Some(f), None) => CaTrust::File(f),
        (None, Some(fp)) => CaTrust::Fingerprint(
            crate::transport::parse_fingerprint(&fp).map_err(anyhow::Error::msg)?,
        ),
        _ => anyhow::bail!("give exactly one of --ca-file and --ca-fingerprint"),
    };
    let opts = EnrollOptions {
        collector,
        trust,
        token: a.token,
        host_id: a.host_id,
        labels: a.labels,
        state_dir: a.state_dir.clone(),
        force: a.force,
    };
    let id = runtime()?.block_on(crate::enroll::enroll(&opts))?;
    println!(
        "enrolled as {} with {}; certificate valid until {}; identity in {}",
        id.host_id,
        opts.collector,
        crate::time::format_unix(id.not_after_unix),
        crate::identity::dir(&a.state_dir).display()
    );
    Ok(ExitCode::from(EXIT_CLEAN))
}

fn run_daemon(a: RunArgs) -> Result<ExitCode> {
    use crate::daemon::{self, DaemonError};
    init_logging();
    let (settings, inputs) = match daemon::load(&a.config) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("driftwatch-agent: {e}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let rt = runtime()?;
    let result = rt.block_on(daemon::run(settings, inputs));
    // A scan abandoned at shutdown may still occupy a blocking thread: do not wait for it.
    rt.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(()) => Ok(ExitCode::from(EXIT_CLEAN)),
        Err(
            e @ (DaemonError::Config(_)
            | DaemonError::Enrollment(_)
            | DaemonError::Identity(crate::identity::IdentityError::NotEnrolled { .. })),
        ) => {
            tracing::error!("{e}");
            eprintln!("driftwatch-agent: {e}");
            Ok(ExitCode::from(EXIT_CONFIG))
        }
        Err(e) => {
            tracing::error!("{e}");
            Err(e.into())
        }
    }
}

fn keygen(a: KeygenArgs) -> Result<ExitCode> {
    let (private, public, fp) = keys::generate(&a.out)?;
    println!("private key: {} (keep it off the fleet)", private.display());
    println!(
        "public key:  {} (give it to agents and the collector)",
        public.display()
    );
    println!("fingerprint: {fp}");
    Ok(ExitCode::from(EXIT_CLEAN))
}

fn baseline_create(a: CreateArgs) -> Result<ExitCode> {
    let policy = match &a.policy {
        Some(p) => load_policy(p)?,
        None => Policy::builtin(),
    };
    let key = keys::load_private(&a.sign_key)?;
    let now = crate::time::now_unix();
    let expires_unix = a
        .expires
        .as_deref()
        .map(|e| crate::time::parse_expiry(e, now))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    if let Some(e) = expires_unix
        && e <= now
    {
        anyhow::bail!("--expires {} is in the past", crate::time::format_unix(e));
    }
    let opts = CreateOptions {
        root: a.root.clone(),
        out: a.out.clone(),
        image_id: a.image_id,
        image_version: a.image_version,
        created_unix: now,
        expires_unix,
        threads: threads(a.threads),
    };
    let progress = ProgressLine::new("baseline");
    let outcome = create::create(&opts, &policy, &key, &mut |p| progress.update(p));
    progress.finish();
    let outcome = outcome?;
    for w in &outcome.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "wrote {}: {} entries, Merkle root {}, {} files hashed ({:.1} MiB) in {:.2} s",
        a.out.display(),
        outcome.entries,
        hex(&outcome.merkle_root),
        outcome.stats.files_hashed,
        outcome.stats.bytes_hashed as f64 / 1048576.0,
        outcome.stats.duration.as_secs_f64()
    );
    Ok(ExitCode::from(EXIT_CLEAN))
}

fn baseline_verify(a: VerifyArgs) -> Result<ExitCode> {
    let trusted = load_trusted(&a.trusted_keys)?;
    match baseline::read(&a.file, &trusted, crate::time::now_unix()) {
        Ok(b) => {
            println!(
                "OK: {} is a valid baseline of image {} {}: {} entries, Merkle root {}, signed by trusted key {}{}",
                a.file.display(),
                escape::bytes(b.header.image_id.as_bytes()),
                escape::bytes(b.header.image_version.as_bytes()),
                b.entries.len(),
                hex(&b.merkle_root),
                b.signer,
                b.header
                    .expires_unix
                    .map(|e| format!(", expires {}", crate::time::format_unix(e)))
                    .unwrap_or_default()
            );
            Ok(ExitCode::from(EXIT_CLEAN))
        }
        Err(e @ BaselineError::Read { .. }) => Err(e.into()),
        Err(e) => {
            eprintln!("REFUSED: {e}");
            Ok(ExitCode::from(EXIT_DRIFT))
        }
    }
}

#[derive(Serialize)]
struct ShowJson<'a> {
    file: String,
    format_version: u32,
    image_id: &'a str,
    image_version: &'a str,
    created: String,
    expires: Option<String>,
    created_by: &'a str,
    hash_algorithm: &'a str,
    merkle_root: String,
    signer: &'a str,
    signature_verified: bool,
    policy_digest: String,
    entries: usize,
    counts_by_type: std::collections::BTreeMap<&'static str, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    entry_list: Option<Vec<ShowEntry>>,
}

#[derive(Serialize)]
struct ShowEntry {
    path: JsonBytes,
    #[serde(flatten)]
    summary: diff::ObjectSummary,
    xattrs: Vec<String>,
}

fn baseline_show(a: ShowArgs) -> Result<ExitCode> {
    let verified = !a.trusted_keys.is_empty();
    let b = if verified {
        baseline::read(
            &a.file,
            &load_trusted(&a.trusted_keys)?,
            crate::time::now_unix(),
        )?
    } else {
        baseline::read_unauthenticated(&a.file)?
    };
    let mut counts = std::collections::BTreeMap::new();
    for e in &b.entries {
        *counts.entry(diff::type_name(e.file_type)).or_insert(0u64) += 1;
    }
    let h = &b.header;
    let show = ShowJson {
        file: a.file.display().to_string(),
        format_version: h.format_version,
        image_id: &h.image_id,
        image_version: &h.image_version,
        created: crate::time::format_unix(h.created_unix),
        expires: h.expires_unix.map(crate::time::format_unix),
        created_by: &h.created_by,
        hash_algorithm: &h.hash_algorithm,
        merkle_root: hex(&b.merkle_root),
        signer: &b.signer,
        signature_verified: verified,
        policy_digest: hex(&h.policy_digest),
        entries: b.entries.len(),
        counts_by_type: counts,
        entry_list: a.entries.then(|| {
            b.entries
                .iter()
                .map(|e| ShowEntry {
                    path: JsonBytes(e.path.clone()),
                    summary: diff::summarize(e),
                    xattrs: e.xattrs.iter().map(|x| escape::bytes(&x.name)).collect(),
                })
                .collect()
        }),
    };
    let mut out = std::io::stdout().lock();
    match a.format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, &show)?;
            writeln!(out)?;
        }
        Format::Text => {
            writeln!(out, "baseline:       {}", show.file)?;
            writeln!(
                out,
                "image:          {} {}",
                escape::bytes(h.image_id.as_bytes()),
                escape::bytes(h.image_version.as_bytes())
            )?;
            writeln!(
                out,
                "created:        {} by {}",
                show.created,
                escape::bytes(h.created_by.as_bytes())
            )?;
            writeln!(
                out,
                "expires:        {}",
                show.expires.as_deref().unwrap_or("never")
            )?;
            writeln!(
                out,
                "format:         version {}, content hash {}",
                h.format_version,
                escape::bytes(h.hash_algorithm.as_bytes())
            )?;
            writeln!(out, "merkle root:    {}", show.merkle_root)?;
            writeln!(
                out,
                "signed by:      {} ({})",
                b.signer,
                if verified {
                    "verified against a trusted key"
                } else {
                    "NOT verified: pass --trusted-key"
                }
            )?;
            writeln!(out, "policy digest:  blake3:{}", show.policy_digest)?;
            writeln!(out, "entries:        {}", show.entries)?;
            for (t, n) in &show.counts_by_type {
                writeln!(out, "  {t:<14}{n}")?;
            }
            if let Some(list) = &show.entry_list {
                for e in list {
                    let s = &e.summary;
                    let mut line = format!(
                        "{:<12} {} {:>5}:{:<5} {:>10} {}",
                        s.file_type,
                        s.mode,
                        s.uid,
                        s.gid,
                        s.size,
                        escape::bytes(&e.path.0)
                    );
                    if let Some(t) = &s.target {
                        line.push_str(&format!(" -> {}", escape::bytes(&t.0)));
                    }
                    if let Some(c) = &s.content {
                        line.push_str(&format!("  {c}"));
                    }
                    if !e.xattrs.is_empty() {
                        line.push_str(&format!("  xattrs: {}", e.xattrs.join(",")));
                    }
                    writeln!(out, "{line}")?;
                }
            }
        }
    }
    Ok(ExitCode::from(EXIT_CLEAN))
}

fn run_check(a: CheckArgs) -> Result<ExitCode> {
    let trusted = load_trusted(&a.trusted_keys)?;
    let policy = match &a.policy {
        Some(p) => PolicySource::File(p.display().to_string(), Box::new(load_policy(p)?)),
        None => PolicySource::Baseline,
    };
    let opts = CheckOptions {
        root: a.root,
        baseline: a.baseline,
        trusted_keys: trusted,
        policy,
        full: a.full,
        state_dir: a.state_dir,
        threads: threads(a.threads),
        now_unix: crate::time::now_unix(),
    };
    let progress = ProgressLine::new("check");
    let report = check::check(&opts, &mut |p| progress.update(p));
    progress.finish();
    let report = report?;
    emit(a.format, &report, || report.render_text(), report.clean)
}

/// Prints a report as JSON or text and maps it to the exit status (0 clean, 1 drift).
fn emit<T: Serialize>(
    format: Format,
    report: &T,
    text: impl FnOnce() -> String,
    clean: bool,
) -> Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, report)?;
            writeln!(out)?;
        }
        Format::Text => out.write_all(text().as_bytes())?,
    }
    out.flush()?;
    Ok(ExitCode::from(if clean { EXIT_CLEAN } else { EXIT_DRIFT }))
}

fn verify_packages(a: VerifyPackagesArgs) -> Result<ExitCode> {
    let policy = match &a.policy {
        Some(p) => load_policy(p)?,
        None => Policy::builtin(),
    };
    let manifest = crate::packages::read_manifest(&a.root)?.ok_or_else(|| {
        anyhow::anyhow!("no dpkg or rpm database found under {}", a.root.display())
    })?;
    let report = crate::packages::verify::verify(
        &a.root,
        &manifest,
        policy.packages.verify_conffiles,
        threads(a.threads),
    )?;
    emit(a.format, &report, || report.render_text(), report.clean)
}

fn policy_show(a: PolicyShowArgs) -> Result<ExitCode> {
    let policy = match &a.policy {
        Some(p) => load_policy(p)?,
        None => Policy::builtin(),
    };
    if a.path.is_empty() {
        println!(
            "# effective driftwatch policy ({}); digest blake3:{}",
            a.policy
                .as_ref()
                .map_or("built-in".to_string(), |p| format!(
                    "built-in merged with {}",
                    p.display()
                )),
            hex(&policy.digest())
        );
        print!("{}", policy.to_toml());
        return Ok(ExitCode::from(EXIT_CLEAN));
    }
    for p in &a.path {
        let path = p.as_bytes();
        if driftwatch_proto::path::validate(path).is_err() {
            anyhow::bail!("{p:?} is not an absolute path inside the root");
        }
        if policy.is_excluded_or_below(path) {
            println!("{p}: excluded (not scanned)");
            continue;
        }
        if !policy.is_included(path) {
            println!("{p}: not included (not recorded)");
            continue;
        }
        let pp = policy.for_path(path);
        println!(
            "{p}: severity {}, checks {:?}{}{}, matched rules {:?}",
            pp.severity,
            pp.attributes,
            if pp.mutable {
                ", mutable (may change and come and go)"
            } else {
                ""
            },
            if pp.growing { ", growing only" } else { "" },
            policy.matching_rules(path)
        );
    }
    Ok(ExitCode::from(EXIT_CLEAN))
}
