//! `driftwatch hosts explain`, `host retire`, `host ack`, `images`, `image show`,
//! `baseline push`, and the lifecycle part of `host show`.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use driftwatch_proto::escape;

use super::client::{self, ApiBase, Response};
use super::table::Table;
use super::{Format, fetch, parse, percent_encode_segment, render, when};
use crate::api::RawBytes;
use crate::api::lifecycle as lapi;

/// POST a JSON body, a non-2xx answer turned into an error carrying the API's message.
async fn send(
    base: &ApiBase,
    path: &str,
    body: &impl serde::Serialize,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let target = base.target(path, &[]);
    let resp = client::post(base, &target, serde_json::to_vec(body)?, timeout).await?;
    if !resp.status.is_success() {
        bail!("collector refused POST {target}: {}", resp.error_message());
    }
    Ok(resp)
}

fn raw(p: &RawBytes) -> String {
    escape::bytes(&p.0)
}

fn age(seconds: u64) -> String {
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}

/// `driftwatch hosts explain HOST`.
pub(super) async fn explain(
    base: &ApiBase,
    host: &str,
    format: Format,
    timeout: Duration,
) -> anyhow::Result<String> {
    let target = base.target(
        &format!("/api/v1/hosts/{}/explain", percent_encode_segment(host)),
        &[],
    );
    let resp = fetch(base, &target, timeout).await?;
    render(format, &resp, |e: lapi::Explanation| explain_text(&e))
}

fn explain_text(e: &lapi::Explanation) -> String {
    let mut out = format!(
        "{}: {} since {}\n{}\n",
        escape::text(&e.host_id),
        escape::text(&e.lifecycle),
        when(&e.since),
        escape::text(&e.summary)
    );
    for r in &e.reasons {
        out.push_str(&format!(
            "\n  FLAGGED {}: {}\n",
            escape::text(&r.code),
            escape::text(&r.text)
        ));
        let ev = &r.evidence;
        for p in &ev.paths {
            out.push_str(&format!("    path     {}\n", raw(p)));
        }
        for p in &ev.packages {
            out.push_str(&format!("    package  {}\n", escape::text(p)));
        }
        let listed = (ev.paths.len() + ev.packages.len()) as u64;
        if ev.items > listed {
            out.push_str(&format!("    … and {} more\n", ev.items - listed));
        }
        if let Some(a) = ev.age_seconds {
            out.push_str(&format!("    age      {}\n", age(a)));
        }
        if let Some(o) = &ev.observed {
            out.push_str(&format!("    observed {}\n", escape::text(o)));
        }
        if let Some(x) = &ev.expected {
            out.push_str(&format!("    expected {}\n", escape::text(x)));
        }
    }
    if !e.not_counted.is_empty() {
        out.push_str("\n  not counted:\n");
        for n in &e.not_counted {
            let what = n
                .path
                .as_ref()
                .map(raw)
                .or_else(|| n.package.as_deref().map(escape::text))
                .unwrap_or_default();
            let why = match n.why.as_str() {
                "acknowledged" => format!(
                    "acknowledged by {} until {}: {}",
                    escape::text(n.acknowledged_by.as_deref().unwrap_or("?")),
                    n.until.as_deref().map_or_else(|| "?".into(), when),
                    escape::text(n.reason.as_deref().unwrap_or(""))
                ),
                "image_defect" => "likely image defect (drifted on most hosts of the image)".into(),
                other => escape::text(other),
            };
            out.push_str(&format!("    {what} ({}): {why}\n", escape::text(&n.kind)));
        }
    }
    out
}

/// `driftwatch host retire HOST --reason R`.
pub(super) async fn retire(
    base: &ApiBase,
    host: &str,
    reason: &str,
    format: Format,
    timeout: Duration,
) -> anyhow::Result<String> {
    let path = format!("/api/v1/hosts/{}/retire", percent_encode_segment(host));
    let resp = send(
        base,
        &path,
        &lapi::RetireRequest {
            reason: reason.into(),
        },
        timeout,
    )
    .await?;
    render(format, &resp, |r: lapi::RetireResult| {
        format!(
            "{}: {} → {} at {}\n",
            escape::text(&r.host_id),
            escape::text(&r.transition.from),
            escape::text(&r.transition.to),
            when(&r.transition.at)
        )
    })
}

/// `driftwatch host ack HOST …`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn acknowledge(
    base: &ApiBase,
    host: &str,
    paths: &[String],
    packages: &[String],
    all: bool,
    reason: &str,
    expires: &str,
    format: Format,
    timeout: Duration,
) -> anyhow::Result<String> {
    let path = format!(
        "/api/v1/hosts/{}/violations/ack",
        percent_encode_segment(host)
    );
    let req = lapi::AckRequest {
        paths: paths
            .iter()
            .map(|p| RawBytes(p.as_bytes().to_vec()))
            .collect(),
        packages: packages.to_vec(),
        all,
        reason: reason.into(),
        expires_in: Some(expires.into()),
        expires_at: None,
    };
    let resp = send(base, &path, &req, timeout).await?;
    render(format, &resp, |r: lapi::AckResult| {
        let mut out = format!(
            "{}: {} item(s) acknowledged until {}\n",
            escape::text(&r.host_id),
            r.acknowledged.len(),
            when(&r.expires_at)
        );
        for a in &r.acknowledged {
            let what = a
                .path
                .as_ref()
                .map(raw)
                .or_else(|| a.package.as_deref().map(escape::text))
                .unwrap_or_default();
            out.push_str(&format!("  {what}\n"));
        }
        out
    })
}

/// The lifecycle section of `host show`.
pub(super) fn transitions_text(l: &lapi::TransitionList) -> String {
    let mut out = format!(
        "\nlifecycle: {} since {}\n",
        escape::text(&l.lifecycle),
        when(&l.since)
    );
    if l.transitions.is_empty() {
        return out;
    }
    let mut t = Table::new(vec!["AT", "FROM", "TO", "ACTOR", "CAUSE"]);
    for x in &l.transitions {
        t.row(vec![
            when(&x.at),
            escape::text(&x.from),
            escape::text(&x.to),
            escape::text(&x.actor),
            escape::text(&x.cause),
        ]);
    }
    out.push_str(&t.render());
    out
}

/// The transitions of a host (for `host show`).
pub(super) async fn transitions(
    base: &ApiBase,
    host: &str,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let target = base.target(
        &format!("/api/v1/hosts/{}/transitions", percent_encode_segment(host)),
        &[("limit", Some("20".into()))],
    );
    fetch(base, &target, timeout).await
}

/// `driftwatch images`.
pub(super) async fn images(
    base: &ApiBase,
    format: Format,
    timeout: Duration,
) -> anyhow::Result<String> {
    let resp = fetch(base, &base.target("/api/v1/images", &[]), timeout).await?;
    render(format, &resp, |l: lapi::ImageList| {
        let mut t = Table::new(vec![
            "IMAGE",
            "REGISTERED",
            "HOSTS",
            "CONSENSUS",
            "OUTLIERS",
            "LIKELY DEFECTS",
        ]);
        for i in &l.images {
            t.row(vec![
                escape::text(&i.image_id),
                i.registered
                    .as_ref()
                    .map_or_else(|| "-".into(), |b| escape::text(&b.version)),
                i.hosts.to_string(),
                i.consensus.to_string(),
                i.outliers.to_string(),
                i.likely_defects.to_string(),
            ]);
        }
        t.render()
    })
}

/// `driftwatch image show ID`.
pub(super) async fn image_show(
    base: &ApiBase,
    id: &str,
    format: Format,
    timeout: Duration,
) -> anyhow::Result<String> {
    let target = base.target(
        &format!("/api/v1/images/{}", percent_encode_segment(id)),
        &[],
    );
    let resp = fetch(base, &target, timeout).await?;
    render(format, &resp, |d: lapi::ImageDetail| {
        let mut out = format!("image {}\n", escape::text(&d.image_id));
        match &d.registered {
            Some(b) => out.push_str(&format!(
                "registered: version {} root {} signed by {} (pushed {} by {})\n",
                escape::text(&b.version),
                escape::text(&b.root),
                escape::text(&b.signer),
                when(&b.pushed_at),
                escape::text(&b.pushed_by)
            )),
            None => {
                out.push_str("registered: none (push its baseline with driftwatch baseline push)\n")
            }
        }
        out.push_str(&format!(
            "hosts: {}, consensus: {}, outliers: {}\n",
            d.hosts,
            d.consensus.len(),
            d.outliers.len()
        ));
        if !d.consensus.is_empty() {
            out.push_str(&format!(
                "consensus: {}\n",
                d.consensus
                    .iter()
                    .map(|h| escape::text(h))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if !d.outliers.is_empty() {
            let mut t = Table::new(vec!["OUTLIER", "LIFECYCLE", "WHY", "ROOT"]);
            for o in &d.outliers {
                let why = [(o.other_root, "other root"), (o.drift, "drift")]
                    .iter()
                    .filter(|(b, _)| *b)
                    .map(|(_, w)| *w)
                    .collect::<Vec<_>>()
                    .join(", ");
                t.row(vec![
                    escape::text(&o.host_id),
                    escape::text(&o.lifecycle),
                    why,
                    o.baseline_root
                        .as_deref()
                        .map_or_else(|| "-".into(), escape::text),
                ]);
            }
            out.push('\n');
            out.push_str(&t.render());
        }
        if !d.likely_defects.is_empty() {
            out.push_str(&format!(
                "\nlikely image defects (drifted on more than {:.0} % of its hosts):\n",
                d.image_defect_ratio * 100.0
            ));
            for x in &d.likely_defects {
                out.push_str(&format!("  {} on {} host(s)\n", raw(&x.path), x.hosts));
            }
        }
        out
    })
}

/// The signed header record of a baseline file: the magic, then one length-delimited
/// `SignedHeader` (`agent/src/baseline.rs`). Only this is sent: it is what the signature covers.
pub fn read_signed_header(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut magic = [0u8; 8];
    f.read_exact(&mut magic)
        .ok()
        .filter(|()| magic == driftwatch_proto::BASELINE_MAGIC)
        .with_context(|| format!("{} is not a driftwatch baseline", path.display()))?;
    // A varint of at most 10 bytes.
    let mut len: u64 = 0;
    for i in 0..10 {
        let mut b = [0u8; 1];
        f.read_exact(&mut b)
            .with_context(|| format!("{}: truncated header", path.display()))?;
        len |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            break;
        }
        if i == 9 {
            bail!("{}: malformed header length", path.display());
        }
    }
    if len > crate::registry::MAX_SIGNED_HEADER_BYTES as u64 {
        bail!(
            "{}: the header is larger than a baseline header may be",
            path.display()
        );
    }
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf)
        .with_context(|| format!("{}: truncated header", path.display()))?;
    Ok(buf)
}

/// `driftwatch baseline push FILE`.
pub(super) async fn baseline_push(
    base: &ApiBase,
    file: &Path,
    format: Format,
    timeout: Duration,
) -> anyhow::Result<String> {
    let header = read_signed_header(file)?;
    let req = lapi::BaselinePush {
        signed_header: base64::engine::general_purpose::STANDARD.encode(header),
    };
    let resp = send(base, "/api/v1/baselines", &req, timeout).await?;
    render(format, &resp, |r: lapi::BaselinePushed| {
        let b = &r.baseline;
        format!(
            "registered image {} version {}\nroot   {}\nsigner {}\n",
            escape::text(&b.image_id),
            escape::text(&b.version),
            escape::text(&b.root),
            escape::text(&b.signer)
        )
    })
}

/// Parses the transitions response for `host show`.
pub(super) fn parse_transitions(resp: &Response) -> anyhow::Result<lapi::TransitionList> {
    parse(resp)
}
