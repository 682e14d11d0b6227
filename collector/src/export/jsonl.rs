//! JSON Lines with ECS-style field names: one JSON object per event and line
//! (`docs/exports.md` maps every field).
//!
//! Exact and safe at once: strings keep every character (a path that is not UTF-8 is carried
//! as the API's raw-bytes object under `driftwatch.violation.path`), and the writer escapes,
//! beyond what JSON requires, everything that could hurt a reader that is not a JSON parser —
//! DEL and C1 controls, bidi overrides and isolates, zero-width characters, line and paragraph
//! separators, and `<`, `>`, `&` (a SIEM page that forgets to escape cannot be scripted) — as
//! `\uXXXX`. A line therefore never contains a raw control character or a newline.

use std::io;

use serde::Serialize;
use serde_json::{Map, Value, json};

use super::{Detail, ExportEvent, Object};
use crate::api::rfc3339_ms;
use crate::http::convert;
use driftwatch_proto::escape;

/// The schema named in every event's `driftwatch.schema`.
pub const SCHEMA: &str = "driftwatch.export.v1";

/// The event as a JSON value (ECS-style nesting: `event.kind` is `{"event": {"kind": …}}`).
pub fn to_value(e: &ExportEvent) -> Value {
    let mut doc = Map::new();
    doc.insert("@timestamp".into(), rfc3339_ms(e.at_ms).into());
    let mut event = Map::new();
    event.insert("id".into(), e.id.clone().into());
    event.insert("kind".into(), e.ecs_kind().into());
    event.insert("category".into(), json!([e.ecs_category()]));
    event.insert("type".into(), json!([e.ecs_type()]));
    event.insert("action".into(), e.action.clone().into());
    event.insert("module".into(), "driftwatch".into());
    if let Some(s) = e.severity() {
        event.insert("severity".into(), s.into());
    }
    doc.insert("event".into(), event.into());
    doc.insert(
        "observer".into(),
        json!({"vendor": "driftwatch", "product": "driftwatch",
               "version": env!("CARGO_PKG_VERSION")}),
    );
    if let Some(h) = &e.host {
        doc.insert("host".into(), json!({ "name": h }));
    }
    if !e.host_info.labels.is_empty() {
        let labels: Map<String, Value> = e
            .host_info
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        doc.insert("labels".into(), labels.into());
    }
    if let Some(path) = e.path() {
        let mut file = Map::new();
        // ECS file.path is a string: exact when the path is UTF-8, the display escaping
        // otherwise (the exact bytes are in driftwatch.violation.path).
        let shown = match std::str::from_utf8(path) {
            Ok(s) => s.to_string(),
            Err(_) => escape::bytes(path),
        };
        file.insert("path".into(), shown.into());
        let (_, after) = e.content_hashes();
        if let Some(h) = after {
            file.insert("hash".into(), json!({ "blake3": h }));
        }
        doc.insert("file".into(), file.into());
    }
    if let Some((name, version, arch)) = e.package() {
        let mut p = Map::new();
        p.insert("name".into(), name.into());
        if let Some(v) = version {
            p.insert("version".into(), v.into());
        }
        if let Some(a) = arch {
            p.insert("architecture".into(), a.into());
        }
        doc.insert("package".into(), p.into());
    }
    doc.insert("rule".into(), json!({ "name": e.rule_name() }));
    doc.insert("message".into(), e.message().into());

    let mut dw = Map::new();
    dw.insert("schema".into(), SCHEMA.into());
    if let Some(s) = e.severity_name() {
        dw.insert("severity".into(), s.into());
    }
    if !e.host_info.image_id.is_empty() {
        dw.insert(
            "image".into(),
            json!({"id": e.host_info.image_id, "version": e.host_info.image_version}),
        );
    }
    match &e.detail {
        Detail::Violation { record, .. } => {
            let v = convert::violation(record);
            dw.insert("violation".into(), to_json(&v));
            if let Some(Object::File(f)) = e.object() {
                let (before, _) = e.content_hashes();
                if let Some(b) = before {
                    dw.insert("baseline_hash".into(), json!({ "blake3": b }));
                }
                if std::str::from_utf8(&f.path).is_err() {
                    // Say plainly that file.path is a rendering, not the name.
                    dw.insert("path_not_utf8".into(), true.into());
                }
            }
        }
        Detail::Security(s) => {
            let mut sec = Map::new();
            sec.insert("kind".into(), s.kind.clone().into());
            sec.insert("detail".into(), s.detail.clone().into());
            if let Some(p) = &s.peer_host_id {
                sec.insert("peer_host_id".into(), p.clone().into());
            }
            dw.insert("security".into(), sec.into());
        }
        Detail::Audit(a) => {
            doc.insert("user".into(), json!({ "name": a.actor }));
            // The stored detail is JSON text; a row that is not (a tampered one) travels as
            // the string it is.
            let detail = serde_json::from_str::<Value>(&a.detail)
                .unwrap_or_else(|_| Value::String(a.detail.clone()));
            dw.insert(
                "audit".into(),
                json!({
                    "seq": a.seq,
                    "actor": a.actor,
                    "action": a.action,
                    "target": a.target,
                    "detail": detail,
                    "hash": crate::api::hex(&a.hash),
                }),
            );
        }
    }
    doc.insert("driftwatch".into(), dw.into());
    Value::Object(doc)
}

fn to_json(v: &impl Serialize) -> Value {
    // Serialising the API's own types cannot fail (string keys, no non-finite floats).
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// Appends the event as one line (with its `\n`).
pub fn write_line(out: &mut Vec<u8>, e: &ExportEvent) {
    write_value(out, &to_value(e));
    out.push(b'\n');
}

/// Writes `v` as compact JSON with the extra escaping of the module doc.
pub fn write_value(out: &mut Vec<u8>, v: &Value) {
    let mut ser = serde_json::Serializer::with_formatter(&mut *out, SafeFormatter);
    // Writing a `Value` into a Vec cannot fail.
    let _ = v.serialize(&mut ser);
}

/// Compact JSON that also escapes characters JSON allows raw but a terminal, a log viewer or
/// a careless web page would act on.
struct SafeFormatter;

fn needs_escape(c: char) -> bool {
    matches!(c, '<' | '>' | '&' | '\u{7f}'..='\u{9f}' | '\u{200b}'..='\u{200f}'
        | '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        | '\u{feff}')
}

impl serde_json::ser::Formatter for SafeFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if needs_escape(c) {
                writer.write_all(&fragment.as_bytes()[start..i])?;
                // Every such character is in the Basic Multilingual Plane: one \u escape.
                write!(writer, "\\u{:04x}", c as u32)?;
                start = i + c.len_utf8();
            }
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_escapes_stay_exact_json() {
        let hostile = "a\u{1b}[31m\n\r<script>alert(1)</script>|=\\\u{202e}gnp.exe\u{85}\u{7f}&";
        let mut out = Vec::new();
        write_value(&mut out, &json!({ "p": hostile }));
        let text = std::str::from_utf8(&out).unwrap();
        assert!(!text.chars().any(|c| c.is_control()), "{text}");
        for bad in ["<", ">", "&", "\u{202e}", "\u{85}"] {
            assert!(!text.contains(bad), "{bad:?} in {text}");
        }
        assert!(text.contains("\\u003cscript\\u003e"), "{text}");
        assert!(text.contains("\\u202e"), "{text}");
        let back: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(back["p"], hostile);
    }
}
