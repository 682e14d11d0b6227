//! CSV (RFC 4180): a header row, then one record per event, CRLF line ends.
//!
//! For spreadsheets and people, so every cell is made safe in three steps:
//! 1. text from hosts is display-escaped (`driftwatch_proto::escape`: control characters,
//!    newlines, invalid UTF-8 and bidi overrides become `\n`, `\x1b`, `\xff`, `\u{202e}`), so
//!    a record is always exactly one line and nothing reorders or recolours what is shown; the
//!    exact bytes are in the JSON Lines export;
//! 2. a cell that begins with `=`, `+`, `-`, `@`, a tab or a carriage return — what Excel,
//!    LibreOffice and Google Sheets read as a formula — is prefixed with `'` (the OWASP
//!    "CSV injection" advice), which those programs show as text and never evaluate;
//! 3. RFC 4180 quoting: a cell containing `,`, `"`, CR, LF or a leading/trailing space is put in
//!    double quotes, with `"` doubled.

use super::ExportEvent;
use crate::api::rfc3339_ms;
use driftwatch_proto::escape;

/// The columns, named like the JSON Lines fields they carry (`timestamp` is `@timestamp`: a
/// header cell starting with `@` would be a formula to a spreadsheet).
pub const COLUMNS: [&str; 16] = [
    "timestamp",
    "event.id",
    "event.kind",
    "event.category",
    "event.action",
    "event.severity",
    "driftwatch.severity",
    "host.name",
    "labels",
    "file.path",
    "file.hash.blake3",
    "package.name",
    "package.version",
    "rule.name",
    "driftwatch.changes",
    "message",
];

/// The header line.
pub fn header() -> String {
    let cells: Vec<String> = COLUMNS.iter().map(|c| cell(c)).collect();
    let mut s = cells.join(",");
    s.push_str("\r\n");
    s
}

/// One event as a CSV record (with its CRLF).
pub fn record(e: &ExportEvent) -> String {
    let text = |s: &str| escape::text(s);
    let opt = |s: Option<String>| s.unwrap_or_default();
    let labels: Vec<String> = e
        .host_info
        .labels
        .iter()
        .map(|(k, v)| format!("{}={}", text(k), text(v)))
        .collect();
    let (_, hash) = e.content_hashes();
    let package = e.package();
    let cells = [
        rfc3339_ms(e.at_ms),
        e.id.clone(),
        e.ecs_kind().to_string(),
        e.ecs_category().to_string(),
        text(&e.action),
        e.severity().map(|s| s.to_string()).unwrap_or_default(),
        opt(e.severity_name().map(str::to_string)),
        opt(e.host.as_deref().map(text)),
        labels.join(";"),
        opt(e.path().map(escape::bytes)),
        opt(hash.map(text)),
        opt(package.as_ref().map(|p| text(&p.0))),
        opt(package.as_ref().and_then(|p| p.1.as_deref().map(text))),
        text(&e.rule_name()),
        text(&e.changes_line()),
        text(&e.message()),
    ];
    let cells: Vec<String> = cells.iter().map(|c| cell(c)).collect();
    let mut s = cells.join(",");
    s.push_str("\r\n");
    s
}

/// Formula neutralisation, then RFC 4180 quoting (module doc, steps 2 and 3).
pub fn cell(value: &str) -> String {
    let neutral = if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{value}")
    } else {
        value.to_string()
    };
    let quote = neutral.contains([',', '"', '\r', '\n'])
        || neutral.starts_with(' ')
        || neutral.ends_with(' ');
    if quote {
        format!("\"{}\"", neutral.replace('"', "\"\""))
    } else {
        neutral
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formulas_are_neutralised_and_quoting_is_rfc4180() {
        assert_eq!(cell("=cmd|' /C calc'!A0"), "'=cmd|' /C calc'!A0");
        assert_eq!(cell("+1"), "'+1");
        assert_eq!(cell("-2+3"), "'-2+3");
        assert_eq!(cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(cell("\tx"), "'\tx");
        assert_eq!(cell("\r=1"), "\"'\r=1\"");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("=a,\"b\""), "\"'=a,\"\"b\"\"\"");
        assert_eq!(cell(" padded"), "\" padded\"");
        assert_eq!(cell("/etc/passwd"), "/etc/passwd");
        assert_eq!(cell(""), "");
        assert_eq!(header().matches(',').count(), COLUMNS.len() - 1);
    }
}
