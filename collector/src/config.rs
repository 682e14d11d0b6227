//! The collector's configuration, in two stages: [`RawConfig`] is the TOML file as written (every
//! key optional, unknown keys refused by name) and [`Settings`] is what the server runs with
//! (addresses parsed, durations typed, limits non-zero, defaults filled in). Only
//! [`Settings::from_raw`] turns one into the other, so a `Settings` value is always valid.
//!
//! This module reads the configuration file, its drop-ins and the public keys it names
//! (`trusted_keys`, so a bad key is a configuration error) and does nothing else: no
//! directories are created, no database is opened.
//!
//! Drop-ins: every `*.toml` in the directory named after the file (`collector.toml` →
//! `collector.d/`) is merged over it in lexical order of file names; a later file's key
//! replaces an earlier one's, tables merge key by key. Each file is parsed on its own first,
//! so an unknown key is named with its file.
//!
//! Key material: when systemd passes credentials (`LoadCredential=`, `$CREDENTIALS_DIRECTORY`),
//! `ca_cert`, `ca_key`, `http_tls_cert` and `http_tls_key` are read from the credential named
//! like the configured file (`ca-key.pem`) instead of its path, so a key can stay readable by
//! root only.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use driftwatch_proto::layered::LayerError;
use serde::Deserialize;

/// Default configuration file of the packaged service.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/driftwatch/collector.toml";
/// Default state directory (CA, SQLite database).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/driftwatch-collector";

/// The configuration file as written. Every key is optional; unknown keys are an error that
/// names the key.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub state_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub grpc_listen: Option<String>,
    pub http_listen: Option<String>,
    pub http_tls: Option<bool>,
    pub http_tls_cert: Option<PathBuf>,
    pub http_tls_key: Option<PathBuf>,
    pub server_names: Option<Vec<String>>,
    pub client_cert_lifetime: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub max_connections: Option<u64>,
    pub max_message_bytes: Option<u64>,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    /// `[export]` (SIEM exports: the syslog forwarder).
    pub export: Option<crate::export::config::RawExport>,
    /// `[actions]`: rebuild triggers (see `crate::actions::config`).
    pub actions: Option<crate::actions::config::RawActions>,
    /// Public keys (SPKI PEM, as `driftwatch-agent keygen` writes them) a pushed baseline must
    /// be signed with.
    pub trusted_keys: Option<Vec<PathBuf>>,
    /// How often the reconciler assesses every host.
    pub reconcile_interval: Option<String>,
    /// A path drifted on more than this share of an image's hosts is a likely image defect.
    pub image_defect_ratio: Option<f64>,
    pub flagging: Option<crate::flagging::RawFlagging>,
}

/// Why a configuration was refused. The binary exits 64 on any of these.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type or an unknown key (toml names the key and its line).
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
}

pub(crate) fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Where the collector's state lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// The embedded default: one SQLite file (WAL).
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` connection URL.
    Postgres(String),
}

/// Where the CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Created on first start in `<state_dir>/ca/`, loaded afterwards.
    Managed { dir: PathBuf },
    /// An operator-provided CA (PEM certificate and PKCS#8 PEM key), e.g. shared by replicas.
    Given { cert: PathBuf, key: PathBuf },
}

/// How the HTTP API is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpTls {
    /// Plain HTTP: only allowed on a loopback address.
    Off,
    /// TLS with a server certificate the collector CA issues at every start for
    /// `server_names` (clients trust the CA: `driftwatch --ca-file`).
    CollectorCa,
    /// TLS with an operator-provided certificate chain and key (PEM files).
    Given { cert: PathBuf, key: PathBuf },
}

impl HttpTls {
    pub fn enabled(&self) -> bool {
        !matches!(self, HttpTls::Off)
    }
}

/// Timing and batching knobs that are not configuration-file keys: their defaults are the
/// contract with the agents, and tests (and load generators) shorten them in-process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// Time for the first message (`Hello`) of a report stream.
    pub hello_timeout: Duration,
    /// Time for a TLS handshake.
    pub handshake_timeout: Duration,
    /// How often the revoked-serial cache is refreshed (at most 30 s).
    pub revocation_refresh: Duration,
    /// How often batched heartbeats are written.
    pub heartbeat_flush: Duration,
    /// Most reports committed in one transaction.
    pub commit_batch_max: NonZeroUsize,
    /// How long the writer waits for more reports after taking the ones already queued. 0 (the
    /// default): none — reports that arrive during a commit form the next batch anyway, and a
    /// wait only delays every commit when arrivals are spread out (measured: a 2 ms linger
    /// cost ~5 ms per single-report batch on a loaded 2-core machine).
    pub commit_linger: Duration,
    /// How long shutdown waits for streams to drain.
    pub shutdown_grace: Duration,
    /// Reports of one stream waiting for their commit; the stream stops reading beyond it.
    pub max_reports_in_flight: NonZeroUsize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            hello_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            revocation_refresh: Duration::from_secs(30),
            heartbeat_flush: Duration::from_secs(5),
            commit_batch_max: NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN),
            commit_linger: Duration::ZERO,
            shutdown_grace: Duration::from_secs(10),
            max_reports_in_flight: NonZeroUsize::new(16).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// The validated configuration the collector runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub database: Database,
    pub grpc_listen: SocketAddr,
    /// The HTTP JSON API's address.
    pub http_listen: SocketAddr,
    /// TLS for the HTTP API (required beyond loopback).
    pub http_tls: HttpTls,
    /// DNS names and IP addresses in the server certificate.
    pub server_names: Vec<String>,
    pub client_cert_lifetime: Duration,
    /// Told to agents in `Welcome`; 3 silent intervals end a stream.
    pub heartbeat_interval: NonZeroU32Seconds,
    pub max_connections: NonZeroUsize,
    /// gRPC message limit, both directions.
    pub max_message_bytes: NonZeroUsize,
    pub ca: CaSource,
    pub tuning: Tuning,
    /// `[export]`: the syslog forwarder, when configured.
    pub export: crate::export::config::ExportSettings,
    /// Rebuild actions; `None` (no `[actions]` section): the collector triggers no rebuilds.
    pub actions: Option<crate::actions::config::ActionSettings>,
    /// Raw Ed25519 public keys from `trusted_keys`.
    pub trusted_keys: Vec<[u8; 32]>,
    pub reconcile_interval: Duration,
    pub image_defect_ratio: DefectRatio,
    pub flagging: crate::flagging::FlaggingPolicy,
}

/// A share of an image's hosts, strictly between 0 and 1.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DefectRatio(pub f64);

// Only finite values in (0, 1) are ever constructed, so equality is total.
impl Eq for DefectRatio {}

/// A whole number of seconds, at least one (the unit of `Welcome.heartbeat_interval_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NonZeroU32Seconds(pub NonZeroU32);

impl NonZeroU32Seconds {
    pub fn as_duration(self) -> Duration {
        Duration::from_secs(u64::from(self.0.get()))
    }
    pub fn seconds(self) -> u32 {
        self.0.get()
    }
}

const DEFAULT_GRPC_LISTEN: &str = "0.0.0.0:7443";
const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:7480";
const DEFAULT_CLIENT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
const DEFAULT_HEARTBEAT_SECONDS: u32 = 30;
const DEFAULT_MAX_CONNECTIONS: u64 = 16_384;
const DEFAULT_MAX_MESSAGE_BYTES: u64 = 4 * 1024 * 1024;
/// A client certificate shorter-lived than this would have agents renewing constantly.
const MIN_CLIENT_CERT_LIFETIME: Duration = Duration::from_secs(60);
/// The CA itself lives 10 years; a client certificate must not outlive it by design.
const MAX_CLIENT_CERT_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
const MIN_MESSAGE_BYTES: u64 = 64 * 1024;
const MAX_MESSAGE_BYTES: u64 = 256 * 1024 * 1024;

impl RawConfig {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &Path) -> Result<RawConfig, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Reads and parses a configuration file and its drop-ins ([`drop_in_dir`]).
    pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
        // Each file on its own first: an unknown key or a wrong type is reported with its file.
        let merged =
            driftwatch_proto::layered::load(path, |f, text| RawConfig::parse(text, f).map(|_| ()))?;
        toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("with its drop-ins: {}", e.to_string().trim_end()),
            })
    }
}

impl From<LayerError> for ConfigError {
    fn from(e: LayerError) -> ConfigError {
        match e {
            LayerError::List { path, source } | LayerError::Read { path, source } => {
                ConfigError::Read { path, source }
            }
            LayerError::Parse { path, error } => ConfigError::Parse {
                path,
                message: error.to_string().trim_end().to_string(),
            },
        }
    }
}

pub use driftwatch_proto::layered::{credential_or, credentials_dir, drop_in_dir, merge_tables};

impl Settings {
    /// Validates a raw configuration and fills in the defaults.
    pub fn from_raw(raw: RawConfig) -> Result<Settings, ConfigError> {
        let state_dir = raw
            .state_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        let database = match raw.database_url {
            None => Database::Sqlite(state_dir.join("collector.db")),
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Database::Postgres(url)
            }
            Some(_) => {
                return Err(invalid(
                    "database_url",
                    "must be a postgres:// or postgresql:// URL (leave it out for SQLite in state_dir)",
                ));
            }
        };
        let grpc_listen = parse_addr("grpc_listen", raw.grpc_listen, DEFAULT_GRPC_LISTEN)?;
        let http_listen = parse_addr("http_listen", raw.http_listen, DEFAULT_HTTP_LISTEN)?;
        // Bearer tokens never cross a network in the clear: TLS by default beyond loopback,
        // and plain HTTP there is refused.
        let tls_on = raw
            .http_tls
            .unwrap_or(!crate::http::is_loopback(http_listen));
        crate::http::check_listen_addr(http_listen, tls_on)
            .map_err(|e| invalid("http_tls", e.to_string()))?;
        let http_tls = match (tls_on, raw.http_tls_cert, raw.http_tls_key) {
            (false, None, None) => HttpTls::Off,
            (false, _, _) => {
                return Err(invalid(
                    "http_tls",
                    "is false, but http_tls_cert/http_tls_key are set (remove them or set \
                     http_tls = true)",
                ));
            }
            (true, None, None) => HttpTls::CollectorCa,
            (true, Some(cert), Some(key)) => HttpTls::Given { cert, key },
            (true, Some(_), None) => {
                return Err(invalid("http_tls_key", "is required with http_tls_cert"));
            }
            (true, None, Some(_)) => {
                return Err(invalid("http_tls_cert", "is required with http_tls_key"));
            }
        };
        let server_names = match raw.server_names {
            Some(names) => {
                if names.is_empty() {
                    return Err(invalid(
                        "server_names",
                        "must name at least one DNS name or IP",
                    ));
                }
                for n in &names {
                    check_server_name(n)?;
                }
                names
            }
            None => default_server_names(),
        };
        let client_cert_lifetime = match raw.client_cert_lifetime {
            Some(s) => parse_duration("client_cert_lifetime", &s)?,
            None => DEFAULT_CLIENT_CERT_LIFETIME,
        };
        if !(MIN_CLIENT_CERT_LIFETIME..=MAX_CLIENT_CERT_LIFETIME).contains(&client_cert_lifetime) {
            return Err(invalid(
                "client_cert_lifetime",
                "must be between 1 minute and 5 years",
            ));
        }
        let heartbeat_interval = match raw.heartbeat_interval {
            Some(s) => {
                let d = parse_duration("heartbeat_interval", &s)?;
                if d.subsec_nanos() != 0 {
                    return Err(invalid("heartbeat_interval", "must be whole seconds"));
                }
                u32::try_from(d.as_secs())
                    .ok()
                    .filter(|s| *s <= 24 * 3600)
                    .and_then(NonZeroU32::new)
                    .ok_or_else(|| invalid("heartbeat_interval", "must be 1 s to 24 h"))?
            }
            None => NonZeroU32::new(DEFAULT_HEARTBEAT_SECONDS).unwrap_or(NonZeroU32::MIN),
        };
        let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        let max_connections = usize::try_from(max_connections)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| invalid("max_connections", "must be at least 1"))?;
        let max_message_bytes = raw.max_message_bytes.unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        if !(MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&max_message_bytes) {
            return Err(invalid(
                "max_message_bytes",
                format!("must be between {MIN_MESSAGE_BYTES} and {MAX_MESSAGE_BYTES}"),
            ));
        }
        let max_message_bytes = usize::try_from(max_message_bytes)
            .ok()
            .and_then(NonZeroUsize::new)
            .ok_or_else(|| invalid("max_message_bytes", "out of range"))?;
        let ca = match (raw.ca_cert, raw.ca_key) {
            (None, None) => CaSource::Managed {
                dir: state_dir.join("ca"),
            },
            (Some(cert), Some(key)) => CaSource::Given { cert, key },
            (Some(_), None) => return Err(invalid("ca_key", "is required with ca_cert")),
            (None, Some(_)) => return Err(invalid("ca_cert", "is required with ca_key")),
        };
        let actions = raw
            .actions
            .map(crate::actions::config::ActionSettings::from_raw)
            .transpose()?;
        let trusted_keys = raw
            .trusted_keys
            .unwrap_or_default()
            .iter()
            .map(|p| load_public_key(p))
            .collect::<Result<Vec<_>, _>>()?;
        let reconcile_interval = match raw.reconcile_interval {
            Some(s) => {
                let d = parse_duration("reconcile_interval", &s)?;
                if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&d) {
                    return Err(invalid("reconcile_interval", "must be 100ms to 1h"));
                }
                d
            }
            None => crate::reconcile::DEFAULT_INTERVAL,
        };
        let image_defect_ratio = match raw.image_defect_ratio {
            Some(r) if r.is_finite() && r > 0.0 && r < 1.0 => r,
            Some(r) => {
                return Err(invalid(
                    "image_defect_ratio",
                    format!("{r} must be between 0 and 1 (e.g. 0.5: more than half)"),
                ));
            }
            None => crate::registry::DEFAULT_IMAGE_DEFECT_RATIO,
        };
        let flagging = crate::flagging::FlaggingPolicy::from_raw(raw.flagging.unwrap_or_default())
            .map_err(|e| invalid(e.key, e.message))?;
        Ok(Settings {
            trusted_keys,
            reconcile_interval,
            image_defect_ratio: DefectRatio(image_defect_ratio),
            flagging,
            state_dir,
            database,
            grpc_listen,
            http_listen,
            http_tls,
            server_names,
            client_cert_lifetime,
            heartbeat_interval: NonZeroU32Seconds(heartbeat_interval),
            max_connections,
            max_message_bytes,
            ca,
            tuning: Tuning::default(),
            export: crate::export::config::ExportSettings::from_raw(raw.export)?,
            actions,
        })
    }

    /// Reads, parses and validates a configuration file and its drop-ins; `None` = every
    /// default. Key files come from systemd credentials when there are ([`credential_or`]).
    pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
        let raw = match path {
            Some(p) => RawConfig::load(p)?,
            None => RawConfig::default(),
        };
        Ok(Settings::from_raw(raw)?.with_credentials(credentials_dir().as_deref()))
    }

    /// Points the key files at the credentials of the same names in `credentials`, where
    /// there are such credentials.
    pub fn with_credentials(mut self, credentials: Option<&Path>) -> Settings {
        if let CaSource::Given { cert, key } = &mut self.ca {
            *cert = credential_or(cert, credentials);
            *key = credential_or(key, credentials);
        }
        if let HttpTls::Given { cert, key } = &mut self.http_tls {
            *cert = credential_or(cert, credentials);
            *key = credential_or(key, credentials);
        }
        self
    }

    /// Settings for an in-process collector (tests, load generators): state in `state_dir`,
    /// gRPC on an ephemeral loopback port, server names for loopback.
    pub fn for_local(state_dir: &Path) -> Settings {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        Settings {
            state_dir: state_dir.to_path_buf(),
            database: Database::Sqlite(state_dir.join("collector.db")),
            grpc_listen: loopback,
            http_listen: loopback,
            http_tls: HttpTls::Off,
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            client_cert_lifetime: DEFAULT_CLIENT_CERT_LIFETIME,
            heartbeat_interval: NonZeroU32Seconds(
                NonZeroU32::new(DEFAULT_HEARTBEAT_SECONDS).unwrap_or(NonZeroU32::MIN),
            ),
            max_connections: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
            max_message_bytes: NonZeroUsize::new(4 << 20).unwrap_or(NonZeroUsize::MIN),
            ca: CaSource::Managed {
                dir: state_dir.join("ca"),
            },
            tuning: Tuning::default(),
            export: crate::export::config::ExportSettings::default(),
            actions: None,
            trusted_keys: Vec::new(),
            reconcile_interval: crate::reconcile::DEFAULT_INTERVAL,
            image_defect_ratio: DefectRatio(crate::registry::DEFAULT_IMAGE_DEFECT_RATIO),
            flagging: crate::flagging::FlaggingPolicy::default(),
        }
    }
}

/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410); the raw key follows.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Reads an Ed25519 public key in SPKI PEM ("PUBLIC KEY", as `driftwatch-agent keygen` and
/// `openssl pkey -pubout` write it) as its raw 32 bytes.
fn load_public_key(path: &Path) -> Result<[u8; 32], ConfigError> {
    use rustls_pki_types::SubjectPublicKeyInfoDer;
    use rustls_pki_types::pem::PemObject;
    if !path.is_absolute() {
        return Err(invalid(
            "trusted_keys",
            format!("{} must be an absolute path", path.display()),
        ));
    }
    let der = SubjectPublicKeyInfoDer::from_pem_file(path).map_err(|e| {
        invalid(
            "trusted_keys",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    der.as_ref()
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| {
            invalid(
                "trusted_keys",
                format!("{} is not an Ed25519 public key", path.display()),
            )
        })
}

fn parse_addr(
    key: &'static str,
    value: Option<String>,
    default: &str,
) -> Result<SocketAddr, ConfigError> {
    let s = value.as_deref().unwrap_or(default);
    s.parse().map_err(|_| {
        invalid(
            key,
            format!("{s:?} is not an address:port (e.g. {default})"),
        )
    })
}

pub(crate) fn parse_duration(key: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| invalid(key, format!("{s:?}: {e} (e.g. \"30d\")")))
}

fn check_server_name(name: &str) -> Result<(), ConfigError> {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let dns_ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if dns_ok {
        Ok(())
    } else {
        Err(invalid(
            "server_names",
            format!("{name:?} is neither a DNS name nor an IP address"),
        ))
    }
}

/// `localhost`, the loopback addresses and this machine's hostname.
fn default_server_names() -> Vec<String> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if check_server_name(h).is_ok() && !names.iter().any(|n| n == h) {
            names.push(h.to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml: &str) -> Result<Settings, ConfigError> {
        Settings::from_raw(RawConfig::parse(toml, Path::new("test.toml"))?)
    }

    #[test]
    fn defaults() {
        let s = settings("").unwrap();
        assert_eq!(s.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(
            s.database,
            Database::Sqlite(Path::new(DEFAULT_STATE_DIR).join("collector.db"))
        );
        assert_eq!(s.grpc_listen.to_string(), "0.0.0.0:7443");
        assert_eq!(s.http_listen.to_string(), "127.0.0.1:7480");
        assert_eq!(s.http_tls, HttpTls::Off);
        assert!(s.server_names.starts_with(&[
            "localhost".into(),
            "127.0.0.1".into(),
            "::1".into()
        ]));
        assert_eq!(s.client_cert_lifetime, Duration::from_secs(30 * 86400));
        assert_eq!(s.heartbeat_interval.seconds(), 30);
        assert_eq!(s.max_message_bytes.get(), 4 << 20);
        assert_eq!(
            s.ca,
            CaSource::Managed {
                dir: Path::new(DEFAULT_STATE_DIR).join("ca")
            }
        );
    }

    #[test]
    fn every_key() {
        let s = settings(
            r#"
            state_dir = "/srv/dw"
            database_url = "postgres://dw@db/dw"
            grpc_listen = "[::]:9443"
            http_listen = "127.0.0.1:9480"
            server_names = ["collector.example.com", "10.0.0.5"]
            client_cert_lifetime = "7d"
            heartbeat_interval = "1m"
            max_connections = 20000
            max_message_bytes = 1048576
            ca_cert = "/etc/dw/ca.pem"
            ca_key = "/etc/dw/ca-key.pem"
            "#,
        )
        .unwrap();
        assert_eq!(s.database, Database::Postgres("postgres://dw@db/dw".into()));
        assert_eq!(s.grpc_listen.to_string(), "[::]:9443");
        assert_eq!(s.server_names.len(), 2);
        assert_eq!(s.client_cert_lifetime, Duration::from_secs(7 * 86400));
        assert_eq!(s.heartbeat_interval.seconds(), 60);
        assert_eq!(s.max_connections.get(), 20000);
        assert_eq!(
            s.ca,
            CaSource::Given {
                cert: "/etc/dw/ca.pem".into(),
                key: "/etc/dw/ca-key.pem".into()
            }
        );
    }

    #[test]
    fn http_tls_defaults_on_beyond_loopback() {
        let s = settings("http_listen = \"0.0.0.0:7480\"").unwrap();
        assert_eq!(s.http_tls, HttpTls::CollectorCa);
        let s = settings("http_listen = \"[::1]:7480\"\nhttp_tls = true").unwrap();
        assert_eq!(s.http_tls, HttpTls::CollectorCa);
        let s = settings(
            "http_listen = \"10.0.0.5:443\"\nhttp_tls_cert = \"/c.pem\"\nhttp_tls_key = \"/k.pem\"",
        )
        .unwrap();
        assert_eq!(
            s.http_tls,
            HttpTls::Given {
                cert: "/c.pem".into(),
                key: "/k.pem".into()
            }
        );
        let e = settings("http_listen = \"10.0.0.5:80\"\nhttp_tls = false")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must use TLS"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = settings("grpc_listn = \"0.0.0.0:1\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("grpc_listn"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (toml, key) in [
            ("grpc_listen = \"nowhere\"", "grpc_listen"),
            ("database_url = \"mysql://x\"", "database_url"),
            ("client_cert_lifetime = \"forever\"", "client_cert_lifetime"),
            ("client_cert_lifetime = \"1s\"", "client_cert_lifetime"),
            ("heartbeat_interval = \"1500ms\"", "heartbeat_interval"),
            ("heartbeat_interval = \"0s\"", "heartbeat_interval"),
            ("max_connections = 0", "max_connections"),
            ("max_message_bytes = 10", "max_message_bytes"),
            ("server_names = []", "server_names"),
            ("server_names = [\"bad name\"]", "server_names"),
            ("ca_cert = \"/x.pem\"", "ca_key"),
            ("state_dir = \"relative\"", "state_dir"),
            (
                "http_listen = \"0.0.0.0:7480\"\nhttp_tls = false",
                "http_tls",
            ),
            ("http_tls = false\nhttp_tls_cert = \"/c\"", "http_tls"),
            ("http_tls = true\nhttp_tls_cert = \"/c\"", "http_tls_key"),
            (
                "http_tls_key = \"/k\"\nhttp_listen = \"[::]:1\"",
                "http_tls_cert",
            ),
        ] {
            let e = settings(toml).unwrap_err().to_string();
            assert!(e.starts_with(key), "{toml}: {e}");
        }
        let e = settings("max_connections = \"many\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_connections"), "{e}");
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../packaging/examples/collector.toml");
        let s = settings(text).unwrap();
        assert_eq!(s.server_names, ["collector.example.com", "10.0.0.5"]);
        assert_eq!(s.heartbeat_interval.seconds(), 30);
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn drop_ins_merge_in_lexical_order() {
        let t = tempfile::tempdir().unwrap();
        let main = t.path().join("collector.toml");
        write(&main, "heartbeat_interval = \"10s\"\nmax_connections = 5\n");
        let d = t.path().join("collector.d");
        write(&d.join("20-b.toml"), "heartbeat_interval = \"40s\"\n");
        write(
            &d.join("10-a.toml"),
            "heartbeat_interval = \"20s\"\nserver_names = [\"a.example\"]\n",
        );
        write(&d.join("30-c.toml.dpkg-dist"), "bogus = 1\n");
        write(&d.join(".hidden.toml"), "bogus = 1\n");
        let s = Settings::from_raw(RawConfig::load(&main).unwrap()).unwrap();
        assert_eq!(s.heartbeat_interval.seconds(), 40);
        assert_eq!(s.max_connections.get(), 5);
        assert_eq!(s.server_names, ["a.example"]);
    }

    #[test]
    fn drop_in_unknown_key_names_its_file() {
        let t = tempfile::tempdir().unwrap();
        let main = t.path().join("collector.toml");
        write(&main, "");
        write(
            &t.path().join("collector.d/50-x.toml"),
            "grpc_listn = \"x\"\n",
        );
        let e = RawConfig::load(&main).unwrap_err().to_string();
        assert!(e.contains("collector.d/50-x.toml"), "{e}");
        assert!(e.contains("grpc_listn"), "{e}");
    }

    #[test]
    fn key_files_come_from_credentials_when_passed() {
        let t = tempfile::tempdir().unwrap();
        write(&t.path().join("ca-key.pem"), "key");
        let s = settings("ca_cert = \"/etc/dw/ca.pem\"\nca_key = \"/etc/dw/ca-key.pem\"\n")
            .unwrap()
            .with_credentials(Some(t.path()));
        assert_eq!(
            s.ca,
            CaSource::Given {
                cert: "/etc/dw/ca.pem".into(),
                key: t.path().join("ca-key.pem"),
            }
        );
        let s = settings("").unwrap().with_credentials(Some(t.path()));
        assert!(matches!(s.ca, CaSource::Managed { .. }));
        write(&t.path().join("api-key.pem"), "key");
        let s = settings(
            "http_listen = \"10.0.0.5:443\"\nhttp_tls_cert = \"/etc/dw/api-chain.pem\"\n\
             http_tls_key = \"/etc/dw/api-key.pem\"\n",
        )
        .unwrap()
        .with_credentials(Some(t.path()));
        assert_eq!(
            s.http_tls,
            HttpTls::Given {
                cert: "/etc/dw/api-chain.pem".into(),
                key: t.path().join("api-key.pem"),
            }
        );
    }

    #[test]
    fn packaged_default_parses() {
        let text = include_str!("../../packaging/config/collector.toml");
        let s = settings(text).unwrap();
        assert_eq!(s, settings("").unwrap());
    }

    #[test]
    fn flagging_registry_and_reconciler_keys() {
        let dir = tempfile::tempdir().unwrap();
        // A real key as `driftwatch-agent keygen` writes it (SPKI PEM).
        let key = [7u8; 32];
        let mut der = ED25519_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&key);
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der)
        );
        let pub_path = dir.path().join("pipeline.pub");
        std::fs::write(&pub_path, pem).unwrap();
        let s = settings(&format!(
            "trusted_keys = [{:?}]\nreconcile_interval = \"200ms\"\nimage_defect_ratio = 0.6\n\
             [flagging]\nseverity_at_least = \"high\"\npackage_drift = true\n\
             unexplained_under = [\"/etc/**\"]\ndrift_older_than = \"1h\"\n\
             silent_longer_than = \"10m\"\nregistered_root = true\nmin_agent_version = \"0.2.0\"\n",
            pub_path.display().to_string()
        ))
        .unwrap();
        assert_eq!(s.trusted_keys, [key]);
        assert_eq!(s.reconcile_interval, Duration::from_millis(200));
        assert_eq!(s.image_defect_ratio, DefectRatio(0.6));
        assert_eq!(s.flagging.severity_at_least, Some(4));
        assert!(s.flagging.package_drift && s.flagging.registered_root);
        assert_eq!(s.flagging.min_agent_version.as_deref(), Some("0.2.0"));
        let d = settings("").unwrap();
        assert!(d.trusted_keys.is_empty());
        assert_eq!(d.flagging, crate::flagging::FlaggingPolicy::default());

        let not_a_key = dir.path().join("ca.pem");
        std::fs::write(
            &not_a_key,
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        for (toml, key) in [
            (
                "trusted_keys = [\"/nonexistent/k.pub\"]".to_string(),
                "trusted_keys",
            ),
            (
                "trusted_keys = [\"relative.pub\"]".to_string(),
                "trusted_keys",
            ),
            (
                format!("trusted_keys = [{:?}]", not_a_key.display().to_string()),
                "trusted_keys",
            ),
            (
                "reconcile_interval = \"1ms\"".to_string(),
                "reconcile_interval",
            ),
            ("image_defect_ratio = 1.5".to_string(), "image_defect_ratio"),
            ("image_defect_ratio = 0.0".to_string(), "image_defect_ratio"),
            (
                "[flagging]\nseverity_at_least = \"loud\"".to_string(),
                "flagging.severity_at_least",
            ),
            (
                "[flagging]\ndrift_older_than = \"later\"".to_string(),
                "flagging.drift_older_than",
            ),
        ] {
            let e = settings(&toml).unwrap_err().to_string();
            assert!(e.starts_with(key), "{toml}: {e}");
        }
        let e = settings("[flagging]\nseverity = \"high\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("severity"), "{e}");
    }

    #[test]
    fn local_settings_are_valid() {
        let s = Settings::for_local(Path::new("/tmp/x"));
        assert_eq!(s.grpc_listen.port(), 0);
        assert_eq!(s.database, Database::Sqlite("/tmp/x/collector.db".into()));
    }
}
