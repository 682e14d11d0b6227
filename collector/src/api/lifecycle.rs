//! Response and request bodies of the lifecycle, flagging and image registry endpoints
//! (documented in `docs/api.md`): transitions, `explain`, acknowledgements, retirement,
//! baseline pushes and the image views.

use serde::{Deserialize, Serialize};

use super::RawBytes;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `GET /api/v1/hosts/{host_id}/transitions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionList {
    pub schema: String,
    pub generated_at: String,
    pub host_id: String,
    /// The host's current lifecycle state and since when.
    pub lifecycle: String,
    pub since: String,
    pub limit: u32,
    /// Newest first.
    pub transitions: Vec<Transition>,
}

/// One lifecycle transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub from: String,
    pub to: String,
    pub at: String,
    pub cause: String,
    pub actor: String,
}

/// `GET /api/v1/hosts/{host_id}/explain`: why a host is or is not flagged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub schema: String,
    pub generated_at: String,
    pub host_id: String,
    pub lifecycle: String,
    pub since: String,
    /// Whether the flagging policy flags it now.
    pub flagged: bool,
    /// The reconciler's verdict now (`clean`, `drifted`, `flagged`, `silent`); absent when the
    /// host is not assessed (revoked, awaiting its rebuild, replaced, retired, never heard from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// One sentence.
    pub summary: String,
    pub reasons: Vec<FlagReason>,
    /// Open items that do not count toward flagging, and why.
    pub not_counted: Vec<NotCounted>,
    pub open_items: u64,
    pub silent_for_seconds: u64,
    /// For a host awaiting its rebuild: the host that will replace it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub successor: Option<String>,
}

/// One reason the policy flags a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagReason {
    /// `severity`, `package_drift`, `unexplained_change`, `persistent_drift`, `silent`,
    /// `baseline_root_mismatch`, `image_unregistered`, `agent_outdated`.
    pub code: String,
    pub text: String,
    pub evidence: Evidence,
}

/// What a reason rests on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<RawBytes>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// How many items the reason covers (the lists hold at most 50).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub items: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
}

/// An open item left out of flagging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotCounted {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<RawBytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
    pub kind: String,
    /// `acknowledged` or `image_defect`.
    pub why: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// `POST /api/v1/hosts/{host_id}/violations/ack` request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AckRequest {
    #[serde(default)]
    pub paths: Vec<RawBytes>,
    #[serde(default)]
    pub packages: Vec<String>,
    /// Every open violation of the host.
    #[serde(default)]
    pub all: bool,
    pub reason: String,
    /// A duration from now (`"7d"`); or `expires_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// `POST /api/v1/hosts/{host_id}/violations/ack` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckResult {
    pub schema: String,
    pub host_id: String,
    pub expires_at: String,
    pub acknowledged: Vec<AckedItem>,
}

/// One acknowledged open violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckedItem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<RawBytes>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
}

/// `POST /api/v1/hosts/{host_id}/retire` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetireRequest {
    pub reason: String,
}

/// `POST /api/v1/hosts/{host_id}/retire` response: the transition recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetireResult {
    pub schema: String,
    pub host_id: String,
    pub transition: Transition,
}

/// `POST /api/v1/baselines` request: the baseline file's signed header, base64.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselinePush {
    pub signed_header: String,
}

/// `POST /api/v1/baselines` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselinePushed {
    pub schema: String,
    pub baseline: Baseline,
}

/// A registered baseline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Baseline {
    pub image_id: String,
    pub version: String,
    /// Merkle root, hex.
    pub root: String,
    /// Fingerprint of the trusted key that signed it.
    pub signer: String,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    pub entries: u64,
    pub pushed_at: String,
    pub pushed_by: String,
}

/// `GET /api/v1/images`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageList {
    pub schema: String,
    pub generated_at: String,
    pub image_defect_ratio: f64,
    pub images: Vec<ImageSummary>,
}

/// One image id: registered or reported by a host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    pub image_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered: Option<Baseline>,
    /// Live hosts on the image.
    pub hosts: u64,
    pub consensus: u64,
    pub outliers: u64,
    pub likely_defects: u64,
}

/// `GET /api/v1/images/{image_id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageDetail {
    pub schema: String,
    pub generated_at: String,
    pub image_defect_ratio: f64,
    pub image_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered: Option<Baseline>,
    /// Every registered version, newest first.
    pub versions: Vec<Baseline>,
    pub hosts: u64,
    /// Hosts on the registered root with no drift beyond the likely defects.
    pub consensus: Vec<String>,
    pub outliers: Vec<OutlierHost>,
    pub likely_defects: Vec<LikelyDefect>,
}

/// A host that departs from its image's consensus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutlierHost {
    pub host_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_root: Option<String>,
    /// Its root is not the registered one (or nothing is registered).
    pub other_root: bool,
    /// Open drift beyond the likely defects.
    pub drift: bool,
    pub lifecycle: String,
}

/// A path drifted on most of an image's hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LikelyDefect {
    pub path: RawBytes,
    pub hosts: u64,
}
