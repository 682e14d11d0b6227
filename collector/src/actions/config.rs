//! The `[actions]` section of the collector's configuration, in the two stages of
//! `crate::config`: [`RawActions`] as written (every key optional, unknown keys refused by name)
//! and [`ActionSettings`], validated with defaults filled in. Without an `[actions]` section the
//! collector triggers no rebuilds.
//!
//! Pure: the secret and CA files are named here and read when the dispatcher starts
//! (`crate::actions::executor::Executor::load`), so a bad one is still a configuration error
//! (exit 64) that names its key.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use hyper::Uri;
use serde::Deserialize;

use crate::config::{ConfigError, invalid, parse_duration};

/// `[actions]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawActions {
    /// `"webhook"` or `"command"`.
    pub kind: Option<String>,
    pub url: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub argv: Option<Vec<String>>,
    pub timeout: Option<String>,
    pub max_in_flight: Option<u64>,
    pub max_percent_per_image: Option<u64>,
    pub cooldown: Option<String>,
    pub approval: Option<bool>,
    pub dry_run: Option<bool>,
    pub rebuild_timeout: Option<String>,
    pub retry: Option<RawRetry>,
}

/// `[actions.retry]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub max_attempts: Option<u64>,
    pub initial_backoff: Option<String>,
    pub max_backoff: Option<String>,
}

/// How a rebuild is requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorSettings {
    /// An HTTP(S) POST signed per Standard Webhooks.
    Webhook {
        url: Uri,
        /// A file holding `whsec_<base64 key>`.
        secret_file: PathBuf,
        /// PEM certificates trusted for an `https` URL (required for https).
        ca_file: Option<PathBuf>,
    },
    /// A program run without a shell; the request body on stdin.
    Command { argv: Vec<String> },
}

/// Retries of a failed delivery: exponential backoff from `initial_backoff`, doubled per
/// attempt up to `max_backoff`, with ±20 % jitter; after `max_attempts` attempts the action is
/// `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub max_attempts: NonZeroU32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

/// The validated `[actions]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionSettings {
    pub executor: ExecutorSettings,
    /// One delivery attempt (connect, send, answer; or the command's run) at most this long.
    pub timeout: Duration,
    /// Rebuilds in flight at once, fleet-wide.
    pub max_in_flight: NonZeroU32,
    /// Rebuilds in flight at once per image, in percent of the image's live hosts (at least one
    /// is always allowed, so a small image is not stuck).
    pub max_percent_per_image: u8,
    /// A host is not triggered again for this long after its last trigger.
    pub cooldown: Duration,
    /// New rebuilds wait for an operator's approval.
    pub approval: bool,
    /// Decide and record, send nothing.
    pub dry_run: bool,
    pub retry: RetryPolicy,
    /// A triggered rebuild whose host is neither replaced nor retired after this long is given
    /// up (`timed_out`) and the host is flagged again.
    pub rebuild_timeout: Duration,
    /// How often the dispatcher runs a round (not a file key; tests shorten it).
    pub interval: Duration,
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_TIMEOUT: Duration = Duration::from_secs(600);
const DEFAULT_MAX_IN_FLIGHT: u64 = 1;
const DEFAULT_MAX_PERCENT: u64 = 25;
const DEFAULT_COOLDOWN: Duration = Duration::from_secs(3600);
const DEFAULT_REBUILD_TIMEOUT: Duration = Duration::from_secs(3600);
const DEFAULT_MAX_ATTEMPTS: u64 = 5;
const MAX_ATTEMPTS: u64 = 100;
const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(10);
const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How often the dispatcher looks at the fleet.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

impl ActionSettings {
    /// Validates `[actions]`; every error names its key (`actions.…`).
    pub fn from_raw(raw: RawActions) -> Result<ActionSettings, ConfigError> {
        let kind = raw
            .kind
            .as_deref()
            .ok_or_else(|| invalid("actions.kind", "is required: \"webhook\" or \"command\""))?;
        let executor = match kind {
            "webhook" => {
                if raw.argv.is_some() {
                    return Err(invalid("actions.argv", "is only for kind = \"command\""));
                }
                let text = raw
                    .url
                    .ok_or_else(|| invalid("actions.url", "is required for kind = \"webhook\""))?;
                let url = parse_url(&text)?;
                let https = url.scheme_str() == Some("https");
                if https && raw.ca_file.is_none() {
                    return Err(invalid(
                        "actions.ca_file",
                        "is required for an https url (the PEM certificates that sign the \
                         receiver's certificate)",
                    ));
                }
                if !https && raw.ca_file.is_some() {
                    return Err(invalid("actions.ca_file", "is only for an https url"));
                }
                let secret_file = raw.secret_file.ok_or_else(|| {
                    invalid(
                        "actions.secret_file",
                        "is required for kind = \"webhook\" (a file holding whsec_<base64>)",
                    )
                })?;
                ExecutorSettings::Webhook {
                    url,
                    secret_file,
                    ca_file: raw.ca_file,
                }
            }
            "command" => {
                for (set, key) in [
                    (raw.url.is_some(), "actions.url"),
                    (raw.secret_file.is_some(), "actions.secret_file"),
                    (raw.ca_file.is_some(), "actions.ca_file"),
                ] {
                    if set {
                        return Err(invalid(key, "is only for kind = \"webhook\""));
                    }
                }
                let argv = raw
                    .argv
                    .ok_or_else(|| invalid("actions.argv", "is required for kind = \"command\""))?;
                let Some(program) = argv.first() else {
                    return Err(invalid("actions.argv", "must name a program"));
                };
                if !program.starts_with('/') {
                    return Err(invalid(
                        "actions.argv",
                        format!("the program {program:?} must be an absolute path"),
                    ));
                }
                if argv.iter().any(|a| a.contains('\0')) {
                    return Err(invalid("actions.argv", "must not contain NUL characters"));
                }
                ExecutorSettings::Command { argv }
            }
            other => {
                return Err(invalid(
                    "actions.kind",
                    format!("{other:?}: expected \"webhook\" or \"command\""),
                ));
            }
        };
        let timeout = duration("actions.timeout", raw.timeout, DEFAULT_TIMEOUT)?;
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(invalid(
                "actions.timeout",
                "must be more than 0 and at most 10m",
            ));
        }
        let max_in_flight = raw.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
        let max_in_flight = u32::try_from(max_in_flight)
            .ok()
            .and_then(NonZeroU32::new)
            .ok_or_else(|| invalid("actions.max_in_flight", "must be at least 1"))?;
        let max_percent = raw.max_percent_per_image.unwrap_or(DEFAULT_MAX_PERCENT);
        let max_percent_per_image = u8::try_from(max_percent)
            .ok()
            .filter(|p| (1..=100).contains(p))
            .ok_or_else(|| invalid("actions.max_percent_per_image", "must be 1 to 100"))?;
        let cooldown = duration("actions.cooldown", raw.cooldown, DEFAULT_COOLDOWN)?;
        let rebuild_timeout = duration(
            "actions.rebuild_timeout",
            raw.rebuild_timeout,
            DEFAULT_REBUILD_TIMEOUT,
        )?;
        if rebuild_timeout < Duration::from_secs(1) {
            return Err(invalid("actions.rebuild_timeout", "must be at least 1s"));
        }
        let retry = raw.retry.unwrap_or_default();
        let max_attempts = retry.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
        let max_attempts = u32::try_from(max_attempts)
            .ok()
            .filter(|n| u64::from(*n) <= MAX_ATTEMPTS)
            .and_then(NonZeroU32::new)
            .ok_or_else(|| invalid("actions.retry.max_attempts", "must be 1 to 100"))?;
        let initial_backoff = duration(
            "actions.retry.initial_backoff",
            retry.initial_backoff,
            DEFAULT_INITIAL_BACKOFF,
        )?;
        if initial_backoff.is_zero() {
            return Err(invalid(
                "actions.retry.initial_backoff",
                "must be more than 0",
            ));
        }
        let max_backoff = duration(
            "actions.retry.max_backoff",
            retry.max_backoff,
            DEFAULT_MAX_BACKOFF.max(initial_backoff),
        )?;
        if max_backoff < initial_backoff {
            return Err(invalid(
                "actions.retry.max_backoff",
                "must not be less than initial_backoff",
            ));
        }
        Ok(ActionSettings {
            executor,
            timeout,
            max_in_flight,
            max_percent_per_image,
            cooldown,
            approval: raw.approval.unwrap_or(true),
            dry_run: raw.dry_run.unwrap_or(false),
            retry: RetryPolicy {
                max_attempts,
                initial_backoff,
                max_backoff,
            },
            rebuild_timeout,
            interval: DEFAULT_INTERVAL,
        })
    }
}

fn duration(
    key: &'static str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    value.map_or(Ok(default), |s| parse_duration(key, &s))
}

fn parse_url(text: &str) -> Result<Uri, ConfigError> {
    let url: Uri = text
        .parse()
        .map_err(|e| invalid("actions.url", format!("{text:?}: {e}")))?;
    match url.scheme_str() {
        Some("http" | "https") => {}
        _ => {
            return Err(invalid(
                "actions.url",
                format!("{text:?} must start with http:// or https://"),
            ));
        }
    }
    if url.host().is_none_or(str::is_empty) {
        return Err(invalid("actions.url", format!("{text:?} has no host")));
    }
    if url.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err(invalid(
            "actions.url",
            "must not carry credentials (user@host); the signature authenticates the collector",
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> Result<ActionSettings, ConfigError> {
        let raw: RawActions = toml::from_str(toml).map_err(|e| ConfigError::Parse {
            path: "test.toml".into(),
            message: e.to_string(),
        })?;
        ActionSettings::from_raw(raw)
    }

    #[test]
    fn webhook_with_defaults() {
        let s = parse(
            "kind = \"webhook\"\nurl = \"http://127.0.0.1:9000/rebuild\"\n\
             secret_file = \"/etc/dw/secret\"",
        )
        .unwrap();
        assert!(matches!(s.executor, ExecutorSettings::Webhook { .. }));
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        assert_eq!(s.max_in_flight.get(), 1);
        assert_eq!(s.max_percent_per_image, 25);
        assert_eq!(s.cooldown, Duration::from_secs(3600));
        assert!(s.approval, "approval is the safe default");
        assert!(!s.dry_run);
        assert_eq!(s.retry.max_attempts.get(), 5);
        assert_eq!(s.retry.initial_backoff, Duration::from_secs(10));
        assert_eq!(s.rebuild_timeout, Duration::from_secs(3600));
    }

    #[test]
    fn command_with_everything() {
        let s = parse(
            "kind = \"command\"\nargv = [\"/usr/local/bin/rebuild\", \"--now\"]\n\
             timeout = \"2m\"\nmax_in_flight = 3\nmax_percent_per_image = 50\n\
             cooldown = \"30m\"\napproval = false\ndry_run = true\nrebuild_timeout = \"2h\"\n\
             [retry]\nmax_attempts = 7\ninitial_backoff = \"1s\"\nmax_backoff = \"1m\"",
        )
        .unwrap();
        assert_eq!(
            s.executor,
            ExecutorSettings::Command {
                argv: vec!["/usr/local/bin/rebuild".into(), "--now".into()]
            }
        );
        assert_eq!(s.max_in_flight.get(), 3);
        assert_eq!(s.max_percent_per_image, 50);
        assert!(!s.approval);
        assert!(s.dry_run);
        assert_eq!(s.retry.max_attempts.get(), 7);
        assert_eq!(s.retry.max_backoff, Duration::from_secs(60));
    }

    #[test]
    fn bad_values_name_their_key() {
        let hook = "kind = \"webhook\"\nsecret_file = \"/s\"\n";
        for (toml, key) in [
            ("url = \"http://x\"".to_string(), "actions.kind"),
            ("kind = \"email\"".into(), "actions.kind"),
            (
                "kind = \"webhook\"\nsecret_file = \"/s\"".into(),
                "actions.url",
            ),
            (format!("{hook}url = \"ftp://x/\""), "actions.url"),
            (format!("{hook}url = \"http://u:p@x/\""), "actions.url"),
            (format!("{hook}url = \"https://x/\""), "actions.ca_file"),
            (
                format!("{hook}url = \"http://x/\"\nca_file = \"/ca.pem\""),
                "actions.ca_file",
            ),
            (
                "kind = \"webhook\"\nurl = \"http://x/\"".into(),
                "actions.secret_file",
            ),
            (
                format!("{hook}url = \"http://x/\"\nargv = [\"/x\"]"),
                "actions.argv",
            ),
            ("kind = \"command\"".into(), "actions.argv"),
            ("kind = \"command\"\nargv = []".into(), "actions.argv"),
            (
                "kind = \"command\"\nargv = [\"rebuild\"]".into(),
                "actions.argv",
            ),
            (
                "kind = \"command\"\nargv = [\"/x\"]\nurl = \"http://x/\"".into(),
                "actions.url",
            ),
            (
                format!("{hook}url = \"http://x/\"\ntimeout = \"0s\""),
                "actions.timeout",
            ),
            (
                format!("{hook}url = \"http://x/\"\ntimeout = \"1h\""),
                "actions.timeout",
            ),
            (
                format!("{hook}url = \"http://x/\"\ntimeout = \"soon\""),
                "actions.timeout",
            ),
            (
                format!("{hook}url = \"http://x/\"\nmax_in_flight = 0"),
                "actions.max_in_flight",
            ),
            (
                format!("{hook}url = \"http://x/\"\nmax_percent_per_image = 0"),
                "actions.max_percent_per_image",
            ),
            (
                format!("{hook}url = \"http://x/\"\nmax_percent_per_image = 101"),
                "actions.max_percent_per_image",
            ),
            (
                format!("{hook}url = \"http://x/\"\nrebuild_timeout = \"10ms\""),
                "actions.rebuild_timeout",
            ),
            (
                format!("{hook}url = \"http://x/\"\n[retry]\nmax_attempts = 0"),
                "actions.retry.max_attempts",
            ),
            (
                format!("{hook}url = \"http://x/\"\n[retry]\ninitial_backoff = \"0s\""),
                "actions.retry.initial_backoff",
            ),
            (
                format!(
                    "{hook}url = \"http://x/\"\n[retry]\ninitial_backoff = \"1m\"\nmax_backoff = \"1s\""
                ),
                "actions.retry.max_backoff",
            ),
        ] {
            let e = parse(&toml).unwrap_err().to_string();
            assert!(e.starts_with(key), "{toml}: {e}");
        }
        let e = parse(&format!("{hook}url = \"http://x/\"\nmax_inflight = 2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_inflight"), "{e}");
    }
}
