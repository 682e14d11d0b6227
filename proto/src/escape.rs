//! Safe display of untrusted strings and raw bytes (paths, link targets, xattr values, anything
//! an agent sent) on a terminal or in a log line.
//!
//! One set of rules for every part, so a path looks the same in `driftwatch-agent check` and in
//! `driftwatch host show`: terminal control characters, invalid UTF-8 and Unicode bidirectional
//! overrides are never printed as they are, so a hostile file name cannot move the cursor,
//! recolour the terminal, fake a report line or table row, or reorder what is shown. Backslash
//! is doubled so escapes are unambiguous. JSON output carries the raw bytes instead (the agent's
//! `escape::JsonBytes`).

/// Escapes `b` for display on a terminal or in a log line.
pub fn bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        push_escaped(&mut out, chunk.valid());
        for byte in chunk.invalid() {
            out.push_str(&format!("\\x{byte:02x}"));
        }
    }
    out
}

/// Escapes a string for display (see [`bytes`]).
pub fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    push_escaped(&mut out, s);
    out
}

fn push_escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\x7f' => out.push_str(&format!("\\x{:02x}", c as u32)),
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
    fn text_uses_the_same_rules() {
        assert_eq!(
            text("a\tb\rc\u{7f}\u{85}\u{2028}"),
            "a\\tb\\rc\\x7f\\u{85}\\u{2028}"
        );
        assert_eq!(text("pipe|ok"), "pipe|ok");
    }

    #[test]
    fn nothing_escaped_contains_a_control_character() {
        let all: Vec<u8> = (0..=255u8).collect();
        let shown = bytes(&all);
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
    }
}
