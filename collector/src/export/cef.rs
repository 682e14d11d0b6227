//! ArcSight Common Event Format: `CEF:0|driftwatch|driftwatch|VERSION|signatureId|name|
//! severity|extension`, one line per event (the file export) or one syslog message per event
//! (`super::syslog`).
//!
//! Escaping follows "Implementing ArcSight Common Event Format (CEF)", version 23 (HPE, 2016),
//! section "Character Encoding":
//! - the prefix (header) escapes a pipe as `\|` and a backslash as `\\`; it may not span lines;
//! - extension values escape an equal sign as `\=` and a backslash as `\\`; pipes need no
//!   escaping there; a multi-line value encodes its line breaks as `\n` / `\r`;
//! - keys are from the CEF extension dictionary (`rt`, `dhost`, `filePath`, `fileHash`,
//!   `oldFileHash`, `act`, `cat`, `msg`, `externalId`) or custom string pairs
//!   `csN`/`csNLabel`; the text is UTF-8.
//!
//! Before CEF escaping, every value from a host is display-escaped
//! (`driftwatch_proto::escape`), so no control character, invalid UTF-8 or bidi override
//! reaches a SIEM console: a CEF value carries the same text the `driftwatch` CLI shows.

use super::{Detail, ExportEvent, severity_0_to_10};
use driftwatch_proto::escape;

/// CEF header fields: pipe and backslash escaped (spec: "Character Encoding", prefix rules).
pub fn escape_header(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in escape::text(s).chars() {
        match c {
            '|' => out.push_str("\\|"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out
}

/// An extension value: equal sign, backslash and line breaks escaped (spec: "Character
/// Encoding", extension rules), after display escaping.
pub fn escape_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in escape::text(s).chars() {
        match c {
            '=' => out.push_str("\\="),
            '\\' => out.push_str("\\\\"),
            // Display escaping already turned these into `\n`/`\r` text; kept for the rule's
            // sake should the display rules ever change.
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
    out
}

/// `signatureId`: the action, with the drift kind for violations (`violation.opened.modified`),
/// so a SIEM rule can match one kind of drift.
pub fn signature_id(e: &ExportEvent) -> String {
    match (&e.detail, e.drift_kind()) {
        (_, Some(k)) => format!("{}.{k}", e.action),
        // Audit actions are dotted verbs of their own (`host.retired`): prefixed, so no audit
        // action can look like another kind of event.
        (Detail::Audit(a), None) => format!("audit.{}", a.action),
        (_, None) => e.action.clone(),
    }
}

/// `name`: fixed per signature (hosts' strings go into the extension, never here).
pub fn name(e: &ExportEvent) -> String {
    match &e.detail {
        Detail::Violation { resolved, .. } => {
            let r = e.rule_name();
            if *resolved {
                format!("{r} (resolved)")
            } else {
                r
            }
        }
        Detail::Security(s) => format!("security event {}", s.kind),
        Detail::Audit(a) => format!("audit {}", a.action),
    }
}

/// The header, through the severity and the `|` before the extension.
pub fn header(e: &ExportEvent) -> String {
    format!(
        "CEF:0|driftwatch|driftwatch|{}|{}|{}|{}|",
        escape_header(env!("CARGO_PKG_VERSION")),
        escape_header(&signature_id(e)),
        escape_header(&name(e)),
        match &e.detail {
            // A refusal: someone tried something; worth a look, not an emergency.
            Detail::Security(_) => 5,
            // A record that a refusal happened is as notable as the refusal; the rest is
            // routine administration.
            Detail::Audit(a) if a.action.starts_with("security.") => 5,
            Detail::Audit(_) => 3,
            Detail::Violation { .. } => severity_0_to_10(e.severity()),
        },
    )
}

/// The extension's key/value pairs, most important first, values escaped.
pub fn extension(e: &ExportEvent) -> Vec<(&'static str, String)> {
    let mut f: Vec<(&'static str, String)> = vec![
        ("rt", e.at_ms.to_string()),
        ("externalId", e.id.clone()),
        ("act", escape_value(&e.action)),
        ("cat", e.ecs_category().to_string()),
    ];
    if let Some(h) = &e.host {
        f.push(("dhost", escape_value(h)));
    }
    if let Some(p) = e.path() {
        // Display form: escape::bytes for non-UTF-8, then the CEF rules (escape_value's own
        // display pass leaves the already escaped text alone apart from the backslashes).
        f.push(("filePath", escape_cef_only(&escape::bytes(p))));
    }
    let (before, after) = e.content_hashes();
    if let Some(h) = after {
        f.push(("fileHash", escape_value(h)));
    }
    if let Some(h) = before {
        f.push(("oldFileHash", escape_value(h)));
    }
    if let Some((name, version, arch)) = e.package() {
        f.push(("cs1Label", "packageName".into()));
        f.push(("cs1", escape_value(&name)));
        if let Some(v) = version {
            f.push(("cs2Label", "packageVersion".into()));
            f.push(("cs2", escape_value(&v)));
        }
        if let Some(a) = arch {
            f.push(("cs3Label", "packageArchitecture".into()));
            f.push(("cs3", escape_value(&a)));
        }
    }
    if !e.host_info.image_id.is_empty() {
        f.push(("cs4Label", "image".into()));
        f.push((
            "cs4",
            escape_value(&format!(
                "{} {}",
                e.host_info.image_id, e.host_info.image_version
            )),
        ));
    }
    if !e.host_info.labels.is_empty() {
        let labels: Vec<String> = e
            .host_info
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        f.push(("cs5Label", "labels".into()));
        f.push(("cs5", escape_value(&labels.join(","))));
    }
    if let Detail::Audit(a) = &e.detail {
        f.push(("suser", escape_value(&a.actor)));
        f.push(("cn2Label", "auditSeq".into()));
        f.push(("cn2", a.seq.to_string()));
        if !a.target.is_empty() {
            f.push(("cs1Label", "auditTarget".into()));
            f.push(("cs1", escape_value(&a.target)));
        }
    }
    f.push(("msg", escape_value(&e.message())));
    if let Detail::Audit(a) = &e.detail {
        f.push(("cs2Label", "auditDetail".into()));
        f.push(("cs2", escape_value(&a.detail)));
    }
    let changes = e.changes_line();
    if !changes.is_empty() {
        f.push(("cs6Label", "changes".into()));
        f.push(("cs6", escape_value(&changes)));
    }
    f
}

/// CEF escaping of text that is already display-escaped.
fn escape_cef_only(s: &str) -> String {
    s.replace('\\', "\\\\").replace('=', "\\=")
}

/// The whole CEF line (no line end).
pub fn line(e: &ExportEvent) -> String {
    let mut s = header(e);
    push_fields(&mut s, &extension(e));
    s
}

fn push_fields(s: &mut String, fields: &[(&'static str, String)]) {
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(k);
        s.push('=');
        s.push_str(v);
    }
}

/// The marker appended to a shortened line: `cn1Label=truncatedFrom cn1=<full length>`.
fn marker(full_len: usize) -> String {
    format!(" cn1Label=truncatedFrom cn1={full_len}")
}

/// The CEF line in at most `max` bytes: whole extension pairs are dropped from the end (the
/// least important first) and the last one kept may be cut at a character boundary (never
/// inside an escape sequence); a shortened line ends with the marker
/// `cn1Label=truncatedFrom cn1=<bytes of the full line>`. Returns the line and whether it was
/// shortened. `max` below the header's length plus about 60 bytes cannot be honoured; the
/// header and marker are then returned alone.
pub fn line_capped(e: &ExportEvent, max: usize) -> (String, bool) {
    let full = line(e);
    if full.len() <= max {
        return (full, false);
    }
    let mark = marker(full.len());
    let budget = max.saturating_sub(mark.len());
    let mut s = header(e);
    let mut first = true;
    for (k, v) in extension(e) {
        // A csNLabel without its value is useless; keep pairs whole or cut the value.
        let sep = if first { "" } else { " " };
        let pair_len = sep.len() + k.len() + 1 + v.len();
        if s.len() + pair_len <= budget {
            s.push_str(sep);
            s.push_str(k);
            s.push('=');
            s.push_str(&v);
            first = false;
            continue;
        }
        let room = budget.saturating_sub(s.len() + sep.len() + k.len() + 1);
        if room >= 8 && !k.ends_with("Label") {
            s.push_str(sep);
            s.push_str(k);
            s.push('=');
            s.push_str(cut_escaped(&v, room));
        }
        break;
    }
    s.push_str(&mark);
    (s, true)
}

/// The longest prefix of an escaped value within `room` bytes that ends on a character
/// boundary and not in the middle of a `\` escape.
fn cut_escaped(v: &str, room: usize) -> &str {
    let mut end = room.min(v.len());
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    // An odd run of trailing backslashes would leave an escape open.
    let trailing = v[..end].bytes().rev().take_while(|b| *b == b'\\').count();
    if trailing % 2 == 1 {
        end -= 1;
    }
    &v[..end]
}

/// A parsed CEF line: the seven header fields and the extension's key/value pairs.
pub type Parsed = (Vec<String>, Vec<(String, String)>);

/// Splits a CEF line into its seven header fields and extension pairs, undoing the escapes:
/// a reference parser for the tests (and for anyone checking an export by hand).
pub fn parse(line: &str) -> Option<Parsed> {
    let rest = line.strip_prefix("CEF:")?;
    let mut header = Vec::new();
    let mut cur = String::new();
    let mut chars = rest.char_indices();
    let mut ext_start = None;
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => match chars.next()? {
                (_, c @ ('\\' | '|')) => cur.push(c),
                _ => return None,
            },
            '|' => {
                header.push(std::mem::take(&mut cur));
                if header.len() == 7 {
                    ext_start = Some(i + 1);
                    break;
                }
            }
            '\n' | '\r' => return None,
            c => cur.push(c),
        }
    }
    let ext = &rest[ext_start?..];
    // Keys are the words before unescaped `=`; a value runs to the space before the next key.
    let mut pairs: Vec<(String, String)> = Vec::new();
    let mut value = String::new();
    let mut word = String::new();
    let mut key: Option<String> = None;
    let mut it = ext.chars();
    while let Some(c) = it.next() {
        match c {
            '\\' => {
                let d = match it.next()? {
                    '=' => '=',
                    '\\' => '\\',
                    'n' => '\n',
                    'r' => '\r',
                    _ => return None,
                };
                // An escaped character is value text: it can never be part of a key.
                value.push_str(&word);
                word.clear();
                value.push(d);
            }
            '=' => {
                // `word` is the new key; the text before it (minus the space) ends the value.
                let k = std::mem::take(&mut word);
                if let Some(prev) = key.take() {
                    let v = value.strip_suffix(' ')?.to_string();
                    pairs.push((prev, v));
                } else if !value.is_empty() {
                    return None;
                }
                value.clear();
                if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric()) {
                    return None;
                }
                key = Some(k);
            }
            ' ' => {
                value.push_str(&word);
                word.clear();
                value.push(' ');
            }
            '\n' | '\r' => return None,
            c => word.push(c),
        }
    }
    value.push_str(&word);
    if let Some(k) = key {
        pairs.push((k, value));
    }
    Some((header, pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_follow_the_spec() {
        // The display form doubles a backslash; CEF doubles each again.
        assert_eq!(escape_header("a|b\\c"), "a\\|b\\\\\\\\c");
        assert_eq!(escape_header("v1|x"), "v1\\|x");
        assert_eq!(escape_value("a=b\\c|d"), "a\\=b\\\\\\\\c|d");
        assert_eq!(escape_value("a=b|c"), "a\\=b|c");
        // Raw line breaks become display escapes first, whose backslash CEF then doubles.
        assert_eq!(escape_value("a\nb"), "a\\\\nb");
        assert_eq!(escape_value("x\u{1b}[2J"), "x\\\\x1b[2J");
        assert_eq!(cut_escaped("ab\\\\cd", 3), "ab");
        assert_eq!(cut_escaped("ab\\\\cd", 4), "ab\\\\");
        assert_eq!(cut_escaped("aé", 2), "a");
    }

    #[test]
    fn the_reference_parser_round_trips() {
        let line = "CEF:0|v|p|1|sig\\|x|n|5|rt=1 msg=a b\\=c \\\\ d filePath=/x|y";
        let (h, ext) = parse(line).unwrap();
        assert_eq!(h, ["0", "v", "p", "1", "sig|x", "n", "5"]);
        assert_eq!(
            ext,
            [
                ("rt".to_string(), "1".to_string()),
                ("msg".into(), "a b=c \\ d".into()),
                ("filePath".into(), "/x|y".into())
            ]
        );
        assert!(parse("CEF:0|a|b\nc|d|e|f|g|x=1").is_none());
        assert!(parse("CEF:0|a|b|c|d|e|f|x=1=2").is_none());
    }
}
