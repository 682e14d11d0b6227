//! Safe display of raw bytes (paths, link targets, xattr values).
//!
//! Terminal control characters, invalid UTF-8 and Unicode bidirectional overrides are never
//! printed as they are: a hostile file name cannot move the cursor, recolour the terminal,
//! fake a line of the report or reorder what is shown. Backslash is doubled so escapes are
//! unambiguous. JSON output carries the raw bytes instead (see [`JsonBytes`]).

use base64::Engine;
use serde::Serialize;
use serde::ser::SerializeMap;

/// Escapes `b` for display on a terminal or in a log line.
pub fn bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                '\r' => out.push_str("\\r"),
                c if (c as u32) < 0x20 || c == '\x7f' => {
                    out.push_str(&format!("\\x{:02x}", c as u32))
                }
                // C1 controls, bidi embeddings/overrides/isolates, zero-width and line separators.
                c if ('\u{80}'..='\u{9f}').contains(&c)
                    || ('\u{202a}'..='\u{202e}').contains(&c)
                    || ('\u{2066}'..='\u{2069}').contains(&c)
                    || ('\u{200b}'..='\u{200f}').contains(&c)
                    || c == '\u{2028}'
                    || c == '\u{2029}'
                    || c == '\u{feff}' =>
                {
                    out.push_str(&format!("\\u{{{:x}}}", c as u32))
                }
                c => out.push(c),
            }
        }
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// Raw bytes in JSON: `{"text": "..."}` when they are valid UTF-8 (JSON escaping keeps control
/// characters safe), `{"bytes": "<base64>"}` otherwise. Nothing is lost either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonBytes(pub Vec<u8>);

impl Serialize for JsonBytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_are_neutralised() {
        assert_eq!(bytes(b"/etc/passwd"), "/etc/passwd");
        assert_eq!(bytes(b"/tmp/a\nFAKE LINE"), "/tmp/a\\nFAKE LINE");
        assert_eq!(bytes(b"/x\x1b[31mred"), "/x\\x1b[31mred");
        assert_eq!(bytes(b"/bad\xff\xfe"), "/bad\\xff\\xfe");
        assert_eq!(
            bytes("/evil\u{202e}txt.exe".as_bytes()),
            "/evil\\u{202e}txt.exe"
        );
        assert_eq!(bytes(b"/back\\slash"), "/back\\\\slash");
        assert_eq!(bytes("/caf\u{e9}".as_bytes()), "/caf\u{e9}");
    }

    #[test]
    fn json_keeps_raw_bytes() {
        let t = serde_json::to_string(&JsonBytes(b"/a\nb".to_vec())).unwrap();
        assert_eq!(t, r#"{"text":"/a\nb"}"#);
        let b = serde_json::to_string(&JsonBytes(b"/\xff".to_vec())).unwrap();
        assert_eq!(b, r#"{"bytes":"L/8="}"#);
    }
}
