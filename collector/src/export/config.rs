//! `[export.syslog]` of the collector's configuration: the raw TOML table (every key optional,
//! unknown keys refused by name) and the validated [`SyslogSettings`] the forwarder runs with.
//!
//! ```toml
//! [export.syslog]
//! address = "siem.example.com:6514"   # host:port; required
//! transport = "tls"                   # "udp", "tcp" or "tls" (default "tls")
//! ca_file = "/etc/driftwatch/siem-ca.pem"  # tls: the CA that signed the receiver's certificate
//! server_name = "siem.example.com"    # tls: name to verify (default: the address's host)
//! facility = "authpriv"               # name or 0..=23 (default "authpriv")
//! app_name = "driftwatch"             # RFC 5424 APP-NAME (default "driftwatch")
//! max_message_bytes = 2048            # per message; default 2048 (udp) or 8192 (tcp, tls)
//! delay = "10s"                       # forward an event this long after its time
//! max_backlog = "24h"                 # skip (and count) events older than this
//! ```

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;

/// `[export]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExport {
    pub syslog: Option<RawSyslog>,
}

/// `[export.syslog]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSyslog {
    pub address: Option<String>,
    pub transport: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub facility: Option<RawFacility>,
    pub app_name: Option<String>,
    pub max_message_bytes: Option<u64>,
    pub delay: Option<String>,
    pub max_backlog: Option<String>,
}

/// `facility`: a name or a code.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum RawFacility {
    Code(i64),
    Name(String),
}

/// How messages travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// RFC 5426: one message per datagram.
    Udp,
    /// RFC 6587 octet counting over plain TCP.
    Tcp,
    /// RFC 5425: octet counting over TLS (rustls, ring, TLS 1.3), the receiver's certificate
    /// verified against `ca_file` for `server_name`.
    Tls {
        ca_file: PathBuf,
        server_name: String,
    },
}

/// The validated forwarder configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogSettings {
    /// `host:port`, resolved at every connection attempt.
    pub address: String,
    pub transport: Transport,
    /// 0..=23 (RFC 5424 facility codes).
    pub facility: u8,
    /// 1..=48 printable US-ASCII characters.
    pub app_name: String,
    pub max_message_bytes: usize,
    /// An event is forwarded once it is this old (commit latency, replica clock skew).
    pub delay: Duration,
    /// Events older than this when read are skipped and counted as dropped.
    pub max_backlog: Duration,
    /// How often the forwarder looks for new events when it is caught up (not a file key).
    pub poll_interval: Duration,
}

/// RFC 5424 section 6.2.1 facility names, in code order.
const FACILITIES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];

const KEY_ADDRESS: &str = "export.syslog.address";
const KEY_TRANSPORT: &str = "export.syslog.transport";
const KEY_CA_FILE: &str = "export.syslog.ca_file";
const KEY_SERVER_NAME: &str = "export.syslog.server_name";
const KEY_FACILITY: &str = "export.syslog.facility";
const KEY_APP_NAME: &str = "export.syslog.app_name";
const KEY_MAX_MESSAGE: &str = "export.syslog.max_message_bytes";
const KEY_DELAY: &str = "export.syslog.delay";
const KEY_MAX_BACKLOG: &str = "export.syslog.max_backlog";

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

fn duration(key: &'static str, s: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(s).map_err(|e| {
        invalid(
            key,
            format!("{s:?} is not a duration like \"10s\" or \"24h\": {e}"),
        )
    })
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn host_of(address: &str) -> Option<&str> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

impl SyslogSettings {
    pub fn from_raw(raw: RawSyslog) -> Result<SyslogSettings, ConfigError> {
        let address = raw
            .address
            .ok_or_else(|| invalid(KEY_ADDRESS, "is required (host:port of the receiver)"))?;
        let host = host_of(&address)
            .ok_or_else(|| {
                invalid(
                    KEY_ADDRESS,
                    format!("{address:?} is not host:port (e.g. siem.example.com:6514)"),
                )
            })?
            .to_string();
        let transport_name = raw.transport.as_deref().unwrap_or("tls");
        let transport = match transport_name {
            "udp" | "tcp" => {
                if raw.ca_file.is_some() {
                    return Err(invalid(KEY_CA_FILE, "is only for transport = \"tls\""));
                }
                if raw.server_name.is_some() {
                    return Err(invalid(KEY_SERVER_NAME, "is only for transport = \"tls\""));
                }
                if transport_name == "udp" {
                    Transport::Udp
                } else {
                    Transport::Tcp
                }
            }
            "tls" => {
                let ca_file = raw.ca_file.ok_or_else(|| {
                    invalid(
                        KEY_CA_FILE,
                        "is required with transport = \"tls\" (the PEM CA certificate that \
                         signed the receiver's certificate)",
                    )
                })?;
                let server_name = raw.server_name.unwrap_or(host);
                rustls_pki_types::ServerName::try_from(server_name.clone()).map_err(|_| {
                    invalid(
                        KEY_SERVER_NAME,
                        format!("{server_name:?} is not a DNS name or IP address"),
                    )
                })?;
                Transport::Tls {
                    ca_file,
                    server_name,
                }
            }
            other => {
                return Err(invalid(
                    KEY_TRANSPORT,
                    format!("{other:?} is not one of \"udp\", \"tcp\", \"tls\""),
                ));
            }
        };
        let facility = match raw.facility {
            None => 10, // authpriv: security/authorization messages
            Some(RawFacility::Code(n)) => u8::try_from(n)
                .ok()
                .filter(|n| *n <= 23)
                .ok_or_else(|| invalid(KEY_FACILITY, "must be 0..=23 or a facility name"))?,
            Some(RawFacility::Name(s)) => FACILITIES
                .iter()
                .position(|f| *f == s)
                .and_then(|i| u8::try_from(i).ok())
                .ok_or_else(|| {
                    invalid(
                        KEY_FACILITY,
                        format!("{s:?} is not one of: {}", FACILITIES.join(", ")),
                    )
                })?,
        };
        let app_name = raw.app_name.unwrap_or_else(|| "driftwatch".into());
        if app_name.is_empty()
            || app_name.len() > 48
            || !app_name.bytes().all(|b| (33..=126).contains(&b))
        {
            return Err(invalid(
                KEY_APP_NAME,
                "must be 1 to 48 printable ASCII characters without spaces (RFC 5424 APP-NAME)",
            ));
        }
        let (default_max, ceiling) = match transport {
            // RFC 5426 section 3.2: receivers should take 2048 octets; an IPv4 datagram cannot
            // carry more than 65507.
            Transport::Udp => (2048, 65_507),
            Transport::Tcp | Transport::Tls { .. } => (8192, 1 << 20),
        };
        let max = raw.max_message_bytes.unwrap_or(default_max);
        // RFC 5424 section 6.1: every receiver must take 480 octets.
        if !(480..=ceiling).contains(&max) {
            return Err(invalid(
                KEY_MAX_MESSAGE,
                format!("must be between 480 and {ceiling} for transport {transport_name:?}"),
            ));
        }
        let delay = match raw.delay {
            Some(s) => duration(KEY_DELAY, &s)?,
            None => Duration::from_secs(10),
        };
        if delay > Duration::from_secs(3600) {
            return Err(invalid(KEY_DELAY, "must be at most 1h"));
        }
        let max_backlog = match raw.max_backlog {
            Some(s) => duration(KEY_MAX_BACKLOG, &s)?,
            None => Duration::from_secs(24 * 3600),
        };
        if max_backlog < Duration::from_secs(60) || max_backlog <= delay {
            return Err(invalid(
                KEY_MAX_BACKLOG,
                "must be at least 1m and longer than delay",
            ));
        }
        Ok(SyslogSettings {
            address,
            transport,
            facility,
            app_name,
            max_message_bytes: max as usize,
            delay,
            max_backlog,
            poll_interval: Duration::from_secs(1),
        })
    }
}

/// The validated `[export]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportSettings {
    pub syslog: Option<SyslogSettings>,
}

impl ExportSettings {
    pub fn from_raw(raw: Option<RawExport>) -> Result<ExportSettings, ConfigError> {
        Ok(ExportSettings {
            syslog: raw
                .and_then(|r| r.syslog)
                .map(SyslogSettings::from_raw)
                .transpose()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<ExportSettings, ConfigError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Doc {
            export: Option<RawExport>,
        }
        let doc: Doc = toml::from_str(toml_text).map_err(|e| ConfigError::Parse {
            path: "test".into(),
            message: e.to_string(),
        })?;
        ExportSettings::from_raw(doc.export)
    }

    fn key_of(r: Result<ExportSettings, ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { key, .. }) => key.to_string(),
            Err(ConfigError::Parse { message, .. }) => format!("parse: {message}"),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn a_full_tls_table() {
        let s = parse(
            r#"[export.syslog]
address = "siem.example.com:6514"
transport = "tls"
ca_file = "/etc/driftwatch/siem-ca.pem"
facility = "local4"
app_name = "dw-prod"
max_message_bytes = 16384
delay = "5s"
max_backlog = "2d"
"#,
        )
        .unwrap()
        .syslog
        .unwrap();
        assert_eq!(
            s.transport,
            Transport::Tls {
                ca_file: "/etc/driftwatch/siem-ca.pem".into(),
                server_name: "siem.example.com".into()
            }
        );
        assert_eq!(s.facility, 20);
        assert_eq!(s.app_name, "dw-prod");
        assert_eq!(s.max_message_bytes, 16384);
        assert_eq!(s.delay, Duration::from_secs(5));
        assert_eq!(s.max_backlog, Duration::from_secs(2 * 86_400));
    }

    #[test]
    fn defaults_and_absence() {
        assert_eq!(parse("").unwrap(), ExportSettings::default());
        let s = parse("[export.syslog]\naddress = \"[::1]:514\"\ntransport = \"udp\"\n")
            .unwrap()
            .syslog
            .unwrap();
        assert_eq!(s.transport, Transport::Udp);
        assert_eq!((s.facility, s.max_message_bytes), (10, 2048));
        assert_eq!(s.app_name, "driftwatch");
        let s = parse("[export.syslog]\naddress = \"h:1\"\ntransport = \"tcp\"\nfacility = 3\n")
            .unwrap()
            .syslog
            .unwrap();
        assert_eq!((s.facility, s.max_message_bytes), (3, 8192));
    }

    #[test]
    fn the_shipped_example_parses() {
        let example = include_str!("../../../packaging/examples/collector.toml");
        let table: String = example
            .lines()
            .skip_while(|l| *l != "# [export.syslog]")
            .map_while(|l| l.strip_prefix("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(table.contains("address"), "{table}");
        let s = parse(&table).unwrap().syslog.unwrap();
        assert_eq!(s.address, "siem.example.com:6514");
        assert_eq!(s.max_message_bytes, 8192);
    }

    #[test]
    fn bad_values_name_their_key() {
        let t = |body: &str| key_of(parse(&format!("[export.syslog]\n{body}")));
        assert_eq!(t("transport = \"udp\""), KEY_ADDRESS);
        assert_eq!(t("address = \"nohost\"\ntransport = \"udp\""), KEY_ADDRESS);
        assert_eq!(t("address = \"h:0\"\ntransport = \"udp\""), KEY_ADDRESS);
        assert_eq!(t("address = \"h:1\"\ntransport = \"smoke\""), KEY_TRANSPORT);
        assert_eq!(t("address = \"h:1\""), KEY_CA_FILE);
        assert_eq!(
            t("address = \"h:1\"\ntransport = \"udp\"\nca_file = \"/x\""),
            KEY_CA_FILE
        );
        assert_eq!(
            t("address = \"h:1\"\nca_file = \"/x\"\nserver_name = \"bad name\""),
            KEY_SERVER_NAME
        );
        assert_eq!(
            t("address = \"h:1\"\ntransport = \"udp\"\nfacility = \"local9\""),
            KEY_FACILITY
        );
        assert_eq!(
            t("address = \"h:1\"\ntransport = \"udp\"\nfacility = 24"),
            KEY_FACILITY
        );
        assert_eq!(
            t("address = \"h:1\"\ntransport = \"udp\"\napp_name = \"a b\""),
            KEY_APP_NAME
        );
        assert_eq!(
            t("address = \"h:1\"\ntransport = \"udp\"\nmax_message_bytes = 70000"),
            KEY_MAX_MESSAGE
        );
        assert_eq!(
            t("address = \"h:1\"\ntransport = \"tcp\"\nmax_message_bytes = 100"),
            KEY_MAX_MESSAGE
        );
        assert_eq!(
            t("address = \"h:1\"\ntransport = \"udp\"\ndelay = \"soon\""),
            KEY_DELAY
        );
        assert_eq!(
            t("address = \"h:1\"\ntransport = \"udp\"\nmax_backlog = \"5s\""),
            KEY_MAX_BACKLOG
        );
        assert!(t("address = \"h:1\"\nport = 3").starts_with("parse:"));
    }
}
