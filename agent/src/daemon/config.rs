//! The daemon's configuration (`/etc/driftwatch/agent.toml`), in stages: [`RawConfig`] is the
//! TOML as written (every key optional, unknown keys refused by name) → [`Settings`], validated
//! and typed (a parsed URL, `Duration`s, non-zero counts) → [`Inputs`], the files the settings
//! name, read and checked once at start. Any failure is a [`ConfigError`]: the daemon exits 64
//! so that systemd does not restart-loop on a bad configuration.
//!
//! Drop-ins: every `*.toml` in the directory next to the main file named after it
//! (`agent.toml` → `agent.d/`) is merged over the main file in lexical order of file names
//! ([`load_layered`]): a later file's key replaces an earlier one's, tables merge key by key.
//! Each file is checked on its own first, so an unknown key is named with the file it is in.
//!
//! Key material: when systemd passes credentials (`LoadCredential=`, `$CREDENTIALS_DIRECTORY`),
//! a trusted key file is read from the credential named like the file (`pipeline.pub`) instead
//! of its configured path ([`credential_or`]).
//!
//! Enrollment at first start: an `[enrollment]` table ([`RawEnrollment`] → [`Enrollment`])
//! lets the service enroll itself when it has no identity yet (a host booted from an image):
//! the single-use token from a file or, under systemd, the credential named like that file
//! (`enrollment-token`); the collector CA by fingerprint or file; the host id (default: the
//! hostname) and labels. The token is read only when it is needed, never at validation.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use driftwatch_proto::layered::LayerError;
use serde::Deserialize;

use crate::check::PolicySource;
use crate::policy::Policy;
use crate::report_set::Limits;
use crate::spool::SpoolLimits;
use crate::transport::CollectorUrl;

/// Where `run` reads its configuration unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/driftwatch/agent.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/driftwatch";
pub const DEFAULT_BASELINE: &str = "/etc/driftwatch/baseline.dwb";
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(15 * 60);
pub const DEFAULT_FULL_REHASH_INTERVAL: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 256 << 20;
/// The smallest spool that still holds a few reports.
pub const MIN_SPOOL_MAX_BYTES: u64 = 64 << 10;
/// Where the enrollment token is read from unless `[enrollment] token_file` says otherwise
/// (or a systemd credential of the same file name, `enrollment-token`, is passed).
pub const DEFAULT_ENROLLMENT_TOKEN: &str = "/etc/driftwatch/enrollment-token";

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("configuration {path}: {message}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

/// A size: bytes as an integer, or a string with a unit ("64MiB", "512KiB", "1GiB").
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

/// The TOML as written. Every key is optional; defaults are applied in [`Settings::validate`].
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub collector: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub baseline: Option<PathBuf>,
    pub trusted_keys: Option<Vec<PathBuf>>,
    pub root: Option<PathBuf>,
    pub policy: Option<PathBuf>,
    pub scan_interval: Option<String>,
    pub full_rehash_interval: Option<String>,
    pub threads: Option<usize>,
    pub spool_max_bytes: Option<RawSize>,
    pub enrollment: Option<RawEnrollment>,
}

/// `[enrollment]` as written: how the daemon enrolls itself when the host has no identity.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawEnrollment {
    pub token_file: Option<PathBuf>,
    pub ca_fingerprint: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub host_id: Option<String>,
    pub labels: Option<Vec<String>>,
}

/// Validated `[enrollment]`: everything `driftwatch-agent enroll` would take on its command
/// line, except the token, which stays in its file (or credential) until it is used.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The token file; under systemd the credential of the same file name replaces it.
    pub token_file: PathBuf,
    pub trust: crate::enroll::CaTrust,
    /// `None`: the hostname at enrollment time.
    pub host_id: Option<String>,
    /// `KEY=VALUE`, checked.
    pub labels: Vec<String>,
}

impl Enrollment {
    fn validate(raw: RawEnrollment) -> Result<Enrollment, String> {
        use crate::enroll::CaTrust;
        let trust = match (raw.ca_fingerprint, raw.ca_file) {
            (Some(fp), None) => CaTrust::Fingerprint(
                crate::transport::parse_fingerprint(&fp)
                    .map_err(|e| format!("enrollment.ca_fingerprint: {e}"))?,
            ),
            (None, Some(f)) => CaTrust::File(f),
            _ => {
                return Err(
                    "[enrollment] needs exactly one of ca_fingerprint and ca_file".to_string(),
                );
            }
        };
        if let Some(h) = &raw.host_id {
            driftwatch_proto::host_id::validate(h)
                .map_err(|e| format!("enrollment.host_id = {h:?}: {e}"))?;
        }
        let labels = raw.labels.unwrap_or_default();
        crate::enroll::parse_labels(&labels).map_err(|e| format!("enrollment.labels: {e}"))?;
        Ok(Enrollment {
            token_file: raw
                .token_file
                .unwrap_or_else(|| PathBuf::from(DEFAULT_ENROLLMENT_TOKEN)),
            trust,
            host_id: raw.host_id,
            labels,
        })
    }

    /// Reads the token: from the credential named like the token file when systemd passed one
    /// ([`credential_or`]), else from the file. Surrounding whitespace is dropped.
    pub fn token(&self, credentials: Option<&Path>) -> Result<String, String> {
        let path = credential_or(&self.token_file, credentials);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "the enrollment token {}: {e} (pass it as the credential {:?} or write it there)",
                path.display(),
                self.token_file
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )
        })?;
        let token = text.trim();
        if token.is_empty() || token.contains(char::is_whitespace) {
            return Err(format!(
                "the enrollment token {} is empty or not one word",
                path.display()
            ));
        }
        Ok(token.to_string())
    }
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub collector: CollectorUrl,
    pub state_dir: PathBuf,
    pub baseline: PathBuf,
    pub trusted_keys: Vec<PathBuf>,
    pub root: PathBuf,
    /// A policy file overriding the one embedded in the baseline.
    pub policy: Option<PathBuf>,
    /// Time between scan starts (±10 % jitter).
    pub scan_interval: Duration,
    /// How often a scan ignores the scan cache and hashes everything.
    pub full_rehash_interval: Duration,
    pub threads: NonZeroUsize,
    pub spool: SpoolLimits,
    /// Report size limits, within what one spool record may hold.
    pub report_limits: Limits,
    /// How to enroll at start when the host has no identity; `None`: not enrolled is an error.
    pub enrollment: Option<Enrollment>,
}

/// The files the settings name, read once at start.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub trusted_keys: Vec<[u8; 32]>,
    pub policy: PolicySource,
}

fn parse_duration(key: &str, text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("{key} = {text:?} is not a duration like \"15m\" or \"24h\": {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{key} = {text:?} must be at least one second"));
    }
    Ok(d)
}

fn parse_size(key: &str, raw: &RawSize) -> Result<u64, String> {
    let text = match raw {
        RawSize::Bytes(n) => return Ok(*n),
        RawSize::Text(t) => t.trim(),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => {
            return Err(format!(
                "{key} = {text:?}: give bytes, or a number with KiB, MiB or GiB"
            ));
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{key} = {text:?} is not a size"))
}

impl RawConfig {
    pub fn parse(text: &str) -> Result<RawConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads `path` and its drop-in directory ([`load_layered`]).
    pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
        let table = load_layered(path, |p, text| {
            RawConfig::parse(text).map(|_| ()).map_err(|e| ConfigError {
                path: p.to_path_buf(),
                message: e,
            })
        })?;
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError {
                path: path.to_path_buf(),
                message: format!("with its drop-ins: {e}"),
            })
    }
}

pub use driftwatch_proto::layered::{credential_or, credentials_dir, drop_in_dir, merge_tables};

/// Reads the TOML file `path`, then every `*.toml` of [`drop_in_dir`] in lexical order of
/// their names, and merges each over what came before ([`merge_tables`]). `check` sees each
/// file's text first (to refuse unknown keys naming the file). A missing drop-in directory is
/// no error; a missing main file is.
pub fn load_layered(
    path: &Path,
    check: impl Fn(&Path, &str) -> Result<(), ConfigError>,
) -> Result<toml::Table, ConfigError> {
    driftwatch_proto::layered::load(path, check)
}

impl From<LayerError> for ConfigError {
    fn from(e: LayerError) -> ConfigError {
        let (path, message) = match e {
            LayerError::List { path, source } => (path, format!("cannot list: {source}")),
            LayerError::Read { path, source } => (path, format!("cannot read: {source}")),
            LayerError::Parse { path, error } => (path, error.to_string()),
        };
        ConfigError { path, message }
    }
}

impl Settings {
    /// Applies defaults and checks every value.
    pub fn validate(raw: RawConfig) -> Result<Settings, String> {
        let collector = raw
            .collector
            .ok_or("collector is required (e.g. collector = \"https://collector.example:7443\")")?;
        let collector = CollectorUrl::parse(&collector).map_err(|e| format!("collector: {e}"))?;
        let trusted_keys = raw.trusted_keys.unwrap_or_default();
        if trusted_keys.is_empty() {
            return Err("trusted_keys must name at least one public key file".into());
        }
        let scan_interval = match &raw.scan_interval {
            Some(t) => parse_duration("scan_interval", t)?,
            None => DEFAULT_SCAN_INTERVAL,
        };
        let full_rehash_interval = match &raw.full_rehash_interval {
            Some(t) => parse_duration("full_rehash_interval", t)?,
            None => DEFAULT_FULL_REHASH_INTERVAL,
        };
        let threads =
            NonZeroUsize::new(raw.threads.unwrap_or(1)).ok_or("threads must be at least 1")?;
        let spool_max = match &raw.spool_max_bytes {
            Some(s) => parse_size("spool_max_bytes", s)?,
            None => DEFAULT_SPOOL_MAX_BYTES,
        };
        if spool_max < MIN_SPOOL_MAX_BYTES {
            return Err(format!(
                "spool_max_bytes = {spool_max} is below the minimum of {MIN_SPOOL_MAX_BYTES}"
            ));
        }
        // One record holds at most a quarter of the spool (and never more than gRPC's 4 MiB);
        // reports are cut to half a record, so a report always fits with room to spare.
        let max_payload = (spool_max / 4).min(4 << 20) as u32;
        let spool = SpoolLimits::new(spool_max, max_payload, (spool_max / 8).clamp(4096, 4 << 20))
            .map_err(|e| format!("spool_max_bytes: {e}"))?;
        let report_limits = Limits {
            max_bytes: (max_payload as usize / 2).min(Limits::default().max_bytes),
            ..Limits::default()
        };
        let enrollment = raw.enrollment.map(Enrollment::validate).transpose()?;
        Ok(Settings {
            collector,
            state_dir: raw
                .state_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            baseline: raw
                .baseline
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BASELINE)),
            trusted_keys,
            root: raw.root.unwrap_or_else(|| PathBuf::from("/")),
            policy: raw.policy,
            scan_interval,
            full_rehash_interval,
            threads,
            spool,
            report_limits,
            enrollment,
        })
    }

    /// Reads and validates a configuration file and its drop-ins.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        Settings::validate(RawConfig::load(path)?).map_err(|message| ConfigError {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Reads the trusted keys (from systemd credentials when there are: [`credential_or`])
    /// and the policy file.
    pub fn inputs(&self, config_path: &Path) -> Result<Inputs, ConfigError> {
        self.inputs_with(config_path, credentials_dir().as_deref())
    }

    /// [`Settings::inputs`] with the credentials directory given.
    pub fn inputs_with(
        &self,
        config_path: &Path,
        credentials: Option<&Path>,
    ) -> Result<Inputs, ConfigError> {
        let err = |message: String| ConfigError {
            path: config_path.to_path_buf(),
            message,
        };
        let trusted_keys = self
            .trusted_keys
            .iter()
            .map(|p| {
                crate::keys::load_public(&credential_or(p, credentials))
                    .map_err(|e| err(format!("trusted_keys: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let policy = match &self.policy {
            None => PolicySource::Baseline,
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| err(format!("policy {}: {e}", p.display())))?;
                let parsed = Policy::from_toml(&text)
                    .map_err(|e| err(format!("policy {}: {e}", p.display())))?;
                PolicySource::File(p.display().to_string(), Box::new(parsed))
            }
        };
        Ok(Inputs {
            trusted_keys,
            policy,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> &'static str {
        "collector = \"https://collector.example:7443\"\ntrusted_keys = [\"/etc/driftwatch/pipeline.pub\"]\n"
    }

    fn settings(text: &str) -> Result<Settings, String> {
        Settings::validate(RawConfig::parse(text)?)
    }

    #[test]
    fn defaults() {
        let s = settings(minimal()).unwrap();
        assert_eq!(s.scan_interval, DEFAULT_SCAN_INTERVAL);
        assert_eq!(s.full_rehash_interval, DEFAULT_FULL_REHASH_INTERVAL);
        assert_eq!(s.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(s.baseline, Path::new(DEFAULT_BASELINE));
        assert_eq!(s.root, Path::new("/"));
        assert_eq!(s.threads.get(), 1);
        assert_eq!(s.spool.max_total_bytes(), DEFAULT_SPOOL_MAX_BYTES);
        assert_eq!(s.report_limits, Limits::default());
        assert!(s.policy.is_none());
    }

    #[test]
    fn unknown_key_is_named() {
        let e = settings(&format!("{}scan_intervall = \"2s\"\n", minimal())).unwrap_err();
        assert!(e.contains("scan_intervall"), "{e}");
    }

    #[test]
    fn durations() {
        let s = settings(&format!(
            "{}scan_interval = \"2s\"\nfull_rehash_interval = \"1h 30m\"\n",
            minimal()
        ))
        .unwrap();
        assert_eq!(s.scan_interval, Duration::from_secs(2));
        assert_eq!(s.full_rehash_interval, Duration::from_secs(5400));
        let e = settings(&format!("{}scan_interval = \"soon\"\n", minimal())).unwrap_err();
        assert!(e.contains("scan_interval") && e.contains("soon"), "{e}");
        let e = settings(&format!("{}scan_interval = \"0s\"\n", minimal())).unwrap_err();
        assert!(e.contains("at least one second"), "{e}");
        let e = settings(&format!("{}scan_interval = 15\n", minimal())).unwrap_err();
        assert!(e.contains("scan_interval"), "{e}");
    }

    #[test]
    fn sizes() {
        let s = settings(&format!("{}spool_max_bytes = \"64MiB\"\n", minimal())).unwrap();
        assert_eq!(s.spool.max_total_bytes(), 64 << 20);
        let s = settings(&format!("{}spool_max_bytes = 1048576\n", minimal())).unwrap();
        assert_eq!(s.spool.max_total_bytes(), 1 << 20);
        assert_eq!(s.spool.max_payload_bytes(), 256 << 10);
        assert_eq!(s.report_limits.max_bytes, 128 << 10);
        for bad in ["\"64MB\"", "\"lots\"", "1024", "\"99999999999GiB\""] {
            let e = settings(&format!("{}spool_max_bytes = {bad}\n", minimal())).unwrap_err();
            assert!(e.contains("spool_max_bytes"), "{bad}: {e}");
        }
    }

    #[test]
    fn required_keys() {
        let e = settings("trusted_keys = [\"/k.pub\"]\n").unwrap_err();
        assert!(e.contains("collector is required"), "{e}");
        let e = settings("collector = \"https://c:1\"\n").unwrap_err();
        assert!(e.contains("trusted_keys"), "{e}");
        let e = settings("collector = \"http://c:1\"\ntrusted_keys = [\"/k\"]\n").unwrap_err();
        assert!(e.contains("https"), "{e}");
        let e = settings(&format!("{}threads = 0\n", minimal())).unwrap_err();
        assert!(e.contains("threads"), "{e}");
    }

    #[test]
    fn enrollment_table() {
        use crate::enroll::CaTrust;
        assert!(settings(minimal()).unwrap().enrollment.is_none());
        let fp = "ab".repeat(32);
        let s = settings(&format!(
            "{}[enrollment]\nca_fingerprint = \"{fp}\"\nlabels = [\"role=web\", \"dc=fra1\"]\n",
            minimal()
        ))
        .unwrap();
        let e = s.enrollment.unwrap();
        assert_eq!(e.token_file, Path::new(DEFAULT_ENROLLMENT_TOKEN));
        assert!(matches!(e.trust, CaTrust::Fingerprint(f) if f == [0xab; 32]));
        assert_eq!(e.host_id, None);
        assert_eq!(e.labels, ["role=web", "dc=fra1"]);
        let s = settings(&format!(
            "{}[enrollment]\nca_file = \"/etc/driftwatch/ca.pem\"\nhost_id = \"web-01\"\n\
             token_file = \"/run/token\"\n",
            minimal()
        ))
        .unwrap();
        let e = s.enrollment.unwrap();
        assert!(matches!(&e.trust, CaTrust::File(f) if f == Path::new("/etc/driftwatch/ca.pem")));
        assert_eq!(e.host_id.as_deref(), Some("web-01"));
        assert_eq!(e.token_file, Path::new("/run/token"));
        for (bad, want) in [
            ("labels = [\"x\"]\nca_file = \"/c\"", "enrollment.labels"),
            (
                "labels = [\"a=1\", \"a=2\"]\nca_file = \"/c\"",
                "enrollment.labels",
            ),
            ("host_id = \"-bad\"\nca_file = \"/c\"", "enrollment.host_id"),
            ("ca_fingerprint = \"abcd\"", "enrollment.ca_fingerprint"),
            ("token_file = \"/t\"", "exactly one of"),
            (
                &format!("ca_file = \"/c\"\nca_fingerprint = \"{fp}\""),
                "exactly one of",
            ),
            ("ca_file = \"/c\"\ntoken = \"dwt_x\"", "token"),
        ] {
            let e = settings(&format!("{}[enrollment]\n{bad}\n", minimal())).unwrap_err();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn enrollment_token_from_credential_or_file() {
        let t = tempfile::tempdir().unwrap();
        let file = t.path().join("enrollment-token");
        let e = settings(&format!(
            "{}[enrollment]\nca_file = \"/c\"\ntoken_file = {file:?}\n",
            minimal()
        ))
        .unwrap()
        .enrollment
        .unwrap();
        let missing = e.token(None).unwrap_err();
        assert!(missing.contains("enrollment-token"), "{missing}");
        std::fs::write(&file, "dwt_fromfile\n").unwrap();
        assert_eq!(e.token(None).unwrap(), "dwt_fromfile");
        let creds = t.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        // A credentials directory without this credential: the file.
        assert_eq!(e.token(Some(&creds)).unwrap(), "dwt_fromfile");
        std::fs::write(creds.join("enrollment-token"), "dwt_fromcred").unwrap();
        assert_eq!(e.token(Some(&creds)).unwrap(), "dwt_fromcred");
        std::fs::write(&file, "  \n").unwrap();
        assert!(e.token(None).unwrap_err().contains("empty"));
        std::fs::write(&file, "dwt_a dwt_b\n").unwrap();
        assert!(e.token(None).unwrap_err().contains("one word"));
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn drop_ins_merge_in_lexical_order() {
        let t = tempfile::tempdir().unwrap();
        let main = t.path().join("agent.toml");
        write(
            &main,
            &format!("{}scan_interval = \"1h\"\nthreads = 2\n", minimal()),
        );
        let d = t.path().join("agent.d");
        write(&d.join("20-late.toml"), "scan_interval = \"5m\"\n");
        write(
            &d.join("10-early.toml"),
            "scan_interval = \"30m\"\nthreads = 3\n",
        );
        // Not drop-ins: other extensions, hidden files, leftovers of package upgrades.
        write(&d.join("30-x.toml.dpkg-old"), "bogus = 1\n");
        write(&d.join(".40-hidden.toml"), "bogus = 1\n");
        write(&d.join("README"), "bogus = 1\n");
        let s = Settings::load(&main).unwrap();
        assert_eq!(s.scan_interval, Duration::from_secs(300));
        assert_eq!(s.threads.get(), 3);
        assert_eq!(s.collector.host(), "collector.example");
    }

    #[test]
    fn drop_in_unknown_key_names_its_file() {
        let t = tempfile::tempdir().unwrap();
        let main = t.path().join("agent.toml");
        write(&main, minimal());
        write(
            &t.path().join("agent.d/50-site.toml"),
            "scan_intervall = \"5m\"\n",
        );
        let e = Settings::load(&main).unwrap_err();
        assert!(e.path.ends_with("agent.d/50-site.toml"), "{e}");
        assert!(e.message.contains("scan_intervall"), "{e}");
    }

    #[test]
    fn drop_in_may_supply_required_keys() {
        let t = tempfile::tempdir().unwrap();
        let main = t.path().join("agent.toml");
        write(&main, "# everything in agent.d\n");
        write(&t.path().join("agent.d/00-fleet.toml"), minimal());
        assert!(Settings::load(&main).is_ok());
        std::fs::remove_file(t.path().join("agent.d/00-fleet.toml")).unwrap();
        let e = Settings::load(&main).unwrap_err();
        assert!(e.message.contains("collector is required"), "{e}");
    }

    #[test]
    fn tables_merge_and_arrays_replace() {
        let mut base: toml::Table = "a = [1, 2]\n[t]\nx = 1\ny = 2\n".parse().unwrap();
        let over: toml::Table = "a = [3]\n[t]\ny = 5\nz = 6\n".parse().unwrap();
        merge_tables(&mut base, over);
        let want: toml::Table = "a = [3]\n[t]\nx = 1\ny = 5\nz = 6\n".parse().unwrap();
        assert_eq!(base, want);
    }

    #[test]
    fn trusted_keys_come_from_credentials_when_passed() {
        let t = tempfile::tempdir().unwrap();
        let (_, public, _) = crate::keys::generate(&t.path().join("k")).unwrap();
        let creds = t.path().join("creds");
        std::fs::create_dir(&creds).unwrap();
        std::fs::copy(&public, creds.join("pipeline.pub")).unwrap();
        let s = settings(minimal()).unwrap();
        // The configured /etc/driftwatch/pipeline.pub does not exist here: only the
        // credential of the same name makes this work.
        let cfg = t.path().join("agent.toml");
        let inputs = s.inputs_with(&cfg, Some(&creds)).unwrap();
        assert_eq!(inputs.trusted_keys.len(), 1);
        let e = s.inputs_with(&cfg, None).unwrap_err();
        assert!(e.message.contains("trusted_keys"), "{e}");
        let other = t.path().join("empty");
        std::fs::create_dir(&other).unwrap();
        assert!(s.inputs_with(&cfg, Some(&other)).is_err());
        assert_eq!(
            credential_or(Path::new("/etc/x/pipeline.pub"), Some(&creds)),
            creds.join("pipeline.pub")
        );
        assert_eq!(
            credential_or(Path::new("/etc/x/other.pub"), Some(&creds)),
            Path::new("/etc/x/other.pub")
        );
    }

    #[test]
    fn packaged_default_needs_only_the_collector() {
        let text = include_str!("../../../packaging/config/agent.toml");
        let e = settings(text).unwrap_err();
        assert!(e.contains("collector is required"), "{e}");
        let s = settings(&format!("{text}collector = \"https://c.example:7443\"\n")).unwrap();
        assert_eq!(s.trusted_keys, [Path::new("/etc/driftwatch/pipeline.pub")]);
        assert_eq!(s.state_dir, Path::new(DEFAULT_STATE_DIR));
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../../../packaging/examples/agent.toml");
        let s = settings(text).unwrap();
        assert_eq!(s.collector.host(), "collector.example.com");
        assert_eq!(s.scan_interval, DEFAULT_SCAN_INTERVAL);
        assert_eq!(s.full_rehash_interval, DEFAULT_FULL_REHASH_INTERVAL);
        let e = s.enrollment.expect("the example has [enrollment]");
        assert_eq!(e.token_file, Path::new(DEFAULT_ENROLLMENT_TOKEN));
        assert_eq!(e.labels, ["role=web"]);
        assert!(matches!(e.trust, crate::enroll::CaTrust::Fingerprint(_)));
    }
}
