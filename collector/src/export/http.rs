//! `GET /api/v1/export?format=jsonl|csv|cef&since=…&until=…&kind=…`: the events of a window,
//! streamed in export order a page at a time (memory stays at one page whatever the window).
//!
//! The first page is read before the response starts, so a database that is down is a 503
//! like on every other endpoint; a failure later cuts the stream without its final chunk,
//! which every HTTP client reports as an error (a truncated export never looks complete).

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{EventReader, ExportEvent, Kinds, Position, cef, csv, host_infos, jsonl};
use crate::http::params::{Pairs, ParamError, parse_time_param};
use crate::http::{ApiError, AppState, now_ms, pairs};

/// Events per page read from storage and per chunk written.
const CHUNK: usize = 500;

/// The export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
    Cef,
}

impl Format {
    pub const NAMES: [&'static str; 3] = ["jsonl", "csv", "cef"];

    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "jsonl" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            "cef" => Some(Format::Cef),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Jsonl => "application/x-ndjson",
            Format::Csv => "text/csv; charset=utf-8; header=present",
            Format::Cef => "text/plain; charset=utf-8",
        }
    }

    /// Text before the first event (the CSV header).
    pub fn preamble(self) -> String {
        match self {
            Format::Csv => csv::header(),
            Format::Jsonl | Format::Cef => String::new(),
        }
    }

    pub fn render(self, out: &mut Vec<u8>, e: &ExportEvent) {
        match self {
            Format::Jsonl => jsonl::write_line(out, e),
            Format::Csv => out.extend_from_slice(csv::record(e).as_bytes()),
            Format::Cef => {
                out.extend_from_slice(cef::line(e).as_bytes());
                out.push(b'\n');
            }
        }
    }
}

/// The parameters of `GET /api/v1/export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportParams {
    pub format: Format,
    pub since_ms: i64,
    pub until_ms: i64,
    pub kinds: Kinds,
}

impl ExportParams {
    pub const PARAMS: [&'static str; 4] = ["format", "since", "until", "kind"];
    /// Without `since`, the last 7 days (like the security events).
    pub const DEFAULT_SINCE_MS: i64 = 7 * 86_400_000;

    pub fn parse(raw: &[(String, String)], now_ms: i64) -> Result<ExportParams, ParamError> {
        let p = Pairs::new(raw, &Self::PARAMS)?;
        let format = match p.text("format")? {
            None => {
                return Err(ParamError::new(
                    "format",
                    format!("required: one of {}", Format::NAMES.join(", ")),
                ));
            }
            Some(f) => Format::parse(f).ok_or_else(|| {
                ParamError::new(
                    "format",
                    format!("{f:?} is not one of {}", Format::NAMES.join(", ")),
                )
            })?,
        };
        let since_ms = parse_time_param("since", p.text("since")?, now_ms)?
            .unwrap_or_else(|| now_ms.saturating_sub(Self::DEFAULT_SINCE_MS));
        // Never past now: an export is a snapshot of what has happened.
        let until_ms = parse_time_param("until", p.text("until")?, now_ms)?
            .unwrap_or(now_ms)
            .min(now_ms);
        if since_ms > until_ms {
            return Err(ParamError::new("until", "is earlier than since"));
        }
        let kinds = match p.text("kind")? {
            None => Kinds::ALL,
            Some(k) => k.parse().map_err(|m| ParamError::new("kind", m))?,
        };
        Ok(ExportParams {
            format,
            since_ms,
            until_ms,
            kinds,
        })
    }
}

/// Routes for the auditor role (read-only): the lead adds the role layer in `http::router`.
pub(crate) fn auditor_routes() -> Router<AppState> {
    Router::new().route("/api/v1/export", get(export))
}

struct Streaming {
    st: AppState,
    reader: EventReader,
    format: Format,
    first: Option<Vec<ExportEvent>>,
    preamble: Option<String>,
    done: bool,
}

async fn export(
    State(st): State<AppState>,
    q: Result<Query<crate::http::Pairs>, QueryRejection>,
) -> Result<Response, ApiError> {
    let p = ExportParams::parse(&pairs(q)?, now_ms())?;
    let hosts = host_infos(st.store.as_ref()).await?;
    let mut reader = EventReader::new(
        Position::before(p.since_ms),
        p.until_ms,
        p.kinds,
        CHUNK as u32,
        hosts,
    );
    let first = reader.next_batch(st.store.as_ref(), CHUNK).await?;
    let state = Streaming {
        st,
        reader,
        format: p.format,
        first: Some(first),
        preamble: Some(p.format.preamble()),
        done: false,
    };
    let stream = futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let mut out = Vec::new();
        if let Some(pre) = s.preamble.take() {
            out.extend_from_slice(pre.as_bytes());
        }
        let batch = match s.first.take() {
            Some(b) => b,
            None => match s.reader.next_batch(s.st.store.as_ref(), CHUNK).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "export stream cut: storage failed");
                    s.done = true;
                    return Some((Err(std::io::Error::other(e.to_string())), s));
                }
            },
        };
        if batch.len() < CHUNK {
            s.done = true;
        }
        for e in &batch {
            s.format.render(&mut out, e);
        }
        if out.is_empty() {
            return None;
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(out)), s))
    });
    Ok((
        [(CONTENT_TYPE, p.format.content_type())],
        Body::from_stream(stream),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn parameters() {
        let p = ExportParams::parse(&q(&[("format", "csv")]), NOW).unwrap();
        assert_eq!(
            p,
            ExportParams {
                format: Format::Csv,
                since_ms: NOW - 7 * 86_400_000,
                until_ms: NOW,
                kinds: Kinds::ALL
            }
        );
        let p = ExportParams::parse(
            &q(&[
                ("format", "cef"),
                ("since", "1h"),
                ("until", "2100-01-01"),
                ("kind", "security"),
            ]),
            NOW,
        )
        .unwrap();
        assert_eq!((p.since_ms, p.until_ms), (NOW - 3_600_000, NOW));
        assert!(!p.kinds.opened && p.kinds.security);
        let err =
            |pairs: &[(&str, &str)]| ExportParams::parse(&q(pairs), NOW).unwrap_err().parameter;
        assert_eq!(err(&[]), "format");
        assert_eq!(err(&[("format", "xml")]), "format");
        assert_eq!(err(&[("format", "csv"), ("since", "soon")]), "since");
        assert_eq!(
            err(&[("format", "csv"), ("since", "1h"), ("until", "2h")]),
            "until"
        );
        assert_eq!(err(&[("format", "csv"), ("kind", "audits")]), "kind");
        assert_eq!(err(&[("format", "csv"), ("limit", "3")]), "limit");
        assert_eq!(err(&[("format", "csv"), ("format", "cef")]), "format");
    }
}
