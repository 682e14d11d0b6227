//! The HTTP JSON API's response bodies, schema `driftwatch.api.v1` (documented field by field
//! in `docs/api.md`).
//!
//! One module for both ends: the server (`crate::http`) serialises these types and the
//! `driftwatch` CLI (`crate::cli_client`) deserialises them, so the two cannot drift apart.
//! Optional fields are absent rather than `null`, as in the agent's `driftwatch.check.v1`
//! report; a client must ignore fields it does not know (additions do not bump the schema).

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub mod lifecycle;

/// The version of this schema, in every successful response's `schema` field.
pub const SCHEMA: &str = "driftwatch.api.v1";

/// Raw bytes in JSON, the convention of `docs/report-schema.md`: `{"text": "..."}` when they
/// are valid UTF-8 (JSON escaping keeps control characters safe), `{"bytes": "<base64>"}`
/// otherwise. Nothing is lost either way.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct RawBytes(pub Vec<u8>);

impl Serialize for RawBytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        match std::str::from_utf8(&self.0) {
            Ok(t) => m.serialize_entry("text", t)?,
            Err(_) => m.serialize_entry(
                "bytes",
                &base64::engine::general_purpose::STANDARD.encode(&self.0),
            )?,
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for RawBytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = RawBytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(r#"an object {"text": string} or {"bytes": base64 string}"#)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawBytes, A::Error> {
                let mut out = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    let bytes = match key.as_str() {
                        "text" => value.into_bytes(),
                        "bytes" => base64::engine::general_purpose::STANDARD
                            .decode(value)
                            .map_err(de::Error::custom)?,
                        other => return Err(de::Error::unknown_field(other, &["text", "bytes"])),
                    };
                    if out.replace(bytes).is_some() {
                        return Err(de::Error::custom("raw bytes object with two keys"));
                    }
                }
                out.map(RawBytes)
                    .ok_or_else(|| de::Error::custom("raw bytes object without a key"))
            }
        }
        d.deserialize_map(RawVisitor)
    }
}

/// RFC 3339 UTC with milliseconds for Unix milliseconds. Values outside year 1970..=9999 (a
/// clock or a row gone wrong) are clamped to that range rather than failing the response.
pub fn rfc3339_ms(ms: i64) -> String {
    const MAX_MS: i64 = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    let ms = ms.clamp(0, MAX_MS) as u64;
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `GET /api/v1/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostList {
    pub schema: String,
    pub generated_at: String,
    pub silent_after_seconds: u64,
    pub hosts: Vec<Host>,
}

/// `GET /api/v1/hosts/{host_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDetail {
    pub schema: String,
    pub generated_at: String,
    pub silent_after_seconds: u64,
    pub host: Host,
}

/// One host with its derived state and drift counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub host_id: String,
    /// `clean`, `drifted`, `incomplete`, `silent`, `revoked` or `never-reported`
    /// (`crate::host_state`).
    pub state: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub enrolled_at: String,
    pub image: Image,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_root: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scan: Option<String>,
    /// `complete` or `incomplete`; absent before the first scan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scan_status: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report: Option<String>,
    pub incomplete: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incomplete_reason: Option<String>,
    pub lost_reports: u64,
    pub open: OpenCounts,
    pub package_drift: u64,
    pub revoked: bool,
    pub stream: Stream,
    /// Lifecycle state (`crate::lifecycle`): `enrolled`, `clean`, `drifted`, `flagged`,
    /// `silent`, `rebuild_requested`, `replaced`, `retired`.
    #[serde(default)]
    pub lifecycle: String,
}

/// The image a host said it runs (its last `Hello`); empty strings before the first one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub version: String,
}

/// Open (unresolved) drift items of a host: file violations and package drift together.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenCounts {
    pub total: u64,
    pub critical: u64,
    pub high: u64,
    pub medium: u64,
    pub low: u64,
    pub info: u64,
    /// Items without a severity (an agent bug); absent when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unspecified: u64,
}

/// Where the host's report stream stands in the collector's durable state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stream {
    pub epoch: u64,
    pub last_seq: u64,
    pub set_digest: String,
}

/// `GET /api/v1/violations` and `GET /api/v1/hosts/{host_id}/violations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationList {
    pub schema: String,
    pub generated_at: String,
    pub limit: u32,
    /// More matches exist than were returned (narrow the search or raise `limit`).
    pub truncated: bool,
    pub violations: Vec<Violation>,
}

/// One occurrence of a drift item on a host (a file violation or a package drift).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    pub host_id: String,
    /// `file` or `package`.
    pub item: String,
    /// Files: `added`, `removed`, `modified`, `type_changed`, `unverifiable`; packages:
    /// `package_installed`, `package_removed`, `package_changed`.
    pub kind: String,
    pub severity: String,
    pub first_seen: String,
    pub last_seen: String,
    pub resolved: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<RawBytes>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_type: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub config: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<PackageDrift>,
}

/// One attribute that differs, both values as the agent rendered them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub attribute: String,
    pub before: String,
    pub after: String,
}

/// A package installed, removed or changed since the image was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageDrift {
    pub name: String,
    pub arch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<PackageVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<PackageVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageVersion {
    pub version: String,
    pub state: String,
}

/// `GET /api/v1/security-events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityEventList {
    pub schema: String,
    pub generated_at: String,
    pub limit: u32,
    pub truncated: bool,
    pub events: Vec<SecurityEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityEvent {
    pub at: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_host_id: Option<String>,
    pub detail: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: String,
    pub storage: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One API token (never its secret): `GET /api/v1/tokens`, and inside the answers of
/// `POST` and `DELETE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenInfo {
    pub id: String,
    pub name: String,
    /// `auditor`, `operator` or `admin`.
    pub role: String,
    /// `active`, `expired` or `revoked`.
    pub state: String,
    pub created_at: String,
    /// The audit actor that made it.
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// Precise to a minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<String>,
}

/// `GET /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenList {
    pub schema: String,
    pub generated_at: String,
    pub tokens: Vec<ApiTokenInfo>,
}

/// `POST /api/v1/tokens` (201) and `DELETE /api/v1/tokens/{id}` (200; no `secret`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenAnswer {
    pub schema: String,
    pub token: ApiTokenInfo,
    /// The whole token, `dwa_<id>_<secret>`: shown in this answer only, never again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// One enrollment token (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentTokenInfo {
    pub id: String,
    /// `active`, `expired` or `used_up`.
    pub state: String,
    pub created_at: String,
    pub expires_at: String,
    pub uses_left: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_pattern: Option<String>,
}

/// `GET /api/v1/enrollment-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentTokenList {
    pub schema: String,
    pub generated_at: String,
    pub tokens: Vec<EnrollmentTokenInfo>,
}

/// `POST /api/v1/enrollment-tokens` (201).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentTokenAnswer {
    pub schema: String,
    pub token: EnrollmentTokenInfo,
    /// The whole token, `dwt_<id>_<secret>`, for `driftwatch-agent enroll --token`: shown in
    /// this answer only.
    pub secret: String,
}

/// `GET /api/v1/audit`: records in seq order, exactly as stored, so that a client can
/// recompute every hash (`driftwatch audit verify`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditList {
    pub schema: String,
    pub generated_at: String,
    pub limit: u32,
    /// More records follow: ask again with `after` = the last `seq`.
    pub truncated: bool,
    pub records: Vec<AuditRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: String,
    /// `at` in Unix milliseconds, as hashed.
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub target: String,
    /// The detail object as stored and hashed: a JSON text, not an object.
    pub detail: String,
    /// Hex SHA-256 of the previous record (zeros for record 1).
    pub prev_hash: String,
    /// Hex SHA-256 of this record (see docs/api.md for what it covers).
    pub hash: String,
}

/// The body of every error response (4xx, 5xx).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The HTTP status code again, for logs that keep only the body.
    pub status: u16,
    /// `bad_parameter`, `unauthenticated`, `forbidden`, `not_found`, `conflict`, `invalid`,
    /// `storage_unavailable`, `internal` or `timeout`.
    pub code: String,
    pub message: String,
    /// For `bad_parameter`: the query or path parameter at fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
}

/// `GET /api/v1/rebuilds`: rebuild actions, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildList {
    pub schema: String,
    pub generated_at: String,
    pub limit: u32,
    pub truncated: bool,
    pub rebuilds: Vec<Rebuild>,
}

/// `GET /api/v1/rebuilds/{id}` and the answer of approve and reject.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildDetail {
    pub schema: String,
    pub generated_at: String,
    pub rebuild: Rebuild,
    /// Every delivery attempt, oldest first.
    pub attempts: Vec<RebuildAttempt>,
}

/// One rebuild action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebuild {
    /// `rb_…`; also the webhook's `webhook-id`.
    pub id: String,
    /// `<host_id>:<flagged Unix ms>`.
    pub idempotency_key: String,
    pub host_id: String,
    /// "" when the host never reported an image.
    pub image_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// `pending_approval`, `pending`, `triggered`, `delivered`, `completed`, `failed`,
    /// `timed_out`, `rejected`, `cancelled` or `dry_run`.
    pub state: String,
    /// Decided in dry-run mode: nothing was (or will be) sent.
    pub dry_run: bool,
    pub reasons: Vec<String>,
    pub flagged_at: String,
    pub created_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub triggered_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Delivery attempts made.
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Who approved or rejected it (`token:<id>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision_reason: Option<String>,
    /// How it ended or why it waits no more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One delivery attempt of a rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildAttempt {
    pub attempt: u32,
    pub at: String,
    pub duration_ms: i64,
    pub delivered: bool,
    /// HTTP status (webhook) or exit code (command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i32>,
    pub detail: String,
}

/// The body of `POST /api/v1/rebuilds/{id}/approve` and `/reject`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildDecision {
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_bytes_round_trip() {
        for raw in [&b"/etc/a\nb\x1b|"[..], b"/\xff\xfe", b""] {
            let json = serde_json::to_string(&RawBytes(raw.to_vec())).unwrap();
            let back: RawBytes = serde_json::from_str(&json).unwrap();
            assert_eq!(back.0, raw);
        }
        assert_eq!(
            serde_json::to_string(&RawBytes(b"/a\nb".to_vec())).unwrap(),
            r#"{"text":"/a\nb"}"#
        );
        assert_eq!(
            serde_json::to_string(&RawBytes(b"/\xff".to_vec())).unwrap(),
            r#"{"bytes":"L/8="}"#
        );
        assert!(serde_json::from_str::<RawBytes>(r#"{"text":"a","bytes":"YQ=="}"#).is_err());
        assert!(serde_json::from_str::<RawBytes>(r#"{}"#).is_err());
        assert!(serde_json::from_str::<RawBytes>(r#"{"path":"a"}"#).is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_798_761_600_123), "2027-01-01T00:00:00.123Z");
        assert_eq!(rfc3339_ms(-5), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(i64::MAX), "9999-12-31T23:59:59.999Z");
    }
}
