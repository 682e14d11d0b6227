//! Raw bytes (paths, link targets, xattr values) in reports: escaped for display by
//! [`bytes`] (the rules of `driftwatch_proto::escape`, shared with the collector's CLI).
//!
//! Terminal control characters, invalid UTF-8 and Unicode bidirectional overrides are never
//! printed as they are: a hostile file name cannot move the cursor, recolour the terminal,
//! fake a line of the report or reorder what is shown. Backslash is doubled so escapes are
//! unambiguous. JSON output carries the raw bytes instead (see [`JsonBytes`]).

use base64::Engine;
use serde::Serialize;
use serde::ser::SerializeMap;

pub use driftwatch_proto::escape::bytes;

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
    fn json_keeps_raw_bytes() {
        let t = serde_json::to_string(&JsonBytes(b"/a\nb".to_vec())).unwrap();
        assert_eq!(t, r#"{"text":"/a\nb"}"#);
        let b = serde_json::to_string(&JsonBytes(b"/\xff".to_vec())).unwrap();
        assert_eq!(b, r#"{"bytes":"L/8="}"#);
    }
}
