//! Rules for paths inside a baseline.
//!
//! A baseline path is the absolute path of an object *inside the scanned root*, as raw bytes:
//! `/` is the root itself, every other path starts with `/`, has no empty, `.` or `..`
//! components, no trailing `/` and no NUL byte. Paths are bytes, not strings: anything else a
//! filesystem allows (invalid UTF-8, newlines, escape characters) is kept as it is.

use std::cmp::Ordering;

/// Why a byte string is not a valid baseline path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path is empty")]
    Empty,
    #[error("path does not start with '/'")]
    NotAbsolute,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path has an empty, '.' or '..' component, or a trailing '/'")]
    BadComponent,
}

/// Checks that `path` follows the baseline path rules.
pub fn validate(path: &[u8]) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if path[0] != b'/' {
        return Err(PathError::NotAbsolute);
    }
    if path.contains(&0) {
        return Err(PathError::Nul);
    }
    if path == b"/" {
        return Ok(());
    }
    for component in path[1..].split(|&b| b == b'/') {
        if component.is_empty() || component == b"." || component == b".." {
            return Err(PathError::BadComponent);
        }
    }
    Ok(())
}

/// The order of a depth-first, pre-order walk in which siblings are sorted by raw name bytes:
/// a directory comes right before its descendants. It differs from plain byte order only where
/// a name holds a byte below `/` (e.g. `/a/b` sorts before `/a.b` here, after it in byte order).
pub fn tree_order(a: &[u8], b: &[u8]) -> Ordering {
    // Equal to comparing the byte strings with '/' mapped to 0, but only the first differing
    // byte needs the mapping: find it 8 bytes at a time (sorted paths share long prefixes).
    let n = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= n && a[i..i + 8] == b[i..i + 8] {
        i += 8;
    }
    while i < n && a[i] == b[i] {
        i += 1;
    }
    if i == n {
        return a.len().cmp(&b.len());
    }
    let key = |c: u8| if c == b'/' { 0u8 } else { c };
    key(a[i]).cmp(&key(b[i]))
}

/// True when `ancestor` is a proper ancestor directory of `path` (both valid paths).
pub fn is_ancestor(ancestor: &[u8], path: &[u8]) -> bool {
    if ancestor == b"/" {
        return path != b"/";
    }
    path.len() > ancestor.len() && path.starts_with(ancestor) && path[ancestor.len()] == b'/'
}

/// The last component of a valid path (empty for the root).
pub fn file_name(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

/// The parent of a valid path other than the root.
pub fn parent(path: &[u8]) -> Option<&[u8]> {
    if path == b"/" {
        return None;
    }
    match path.iter().rposition(|&b| b == b'/') {
        Some(0) => Some(b"/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_accepts_hostile_but_legal_names() {
        assert_eq!(validate(b"/"), Ok(()));
        assert_eq!(validate(b"/etc/passwd"), Ok(()));
        assert_eq!(validate(b"/tmp/new\nline/\x1b[31m/\xff\xfe"), Ok(()));
        assert_eq!(validate(b"/..."), Ok(()));
    }

    #[test]
    fn validation_refuses_malformed_paths() {
        assert_eq!(validate(b""), Err(PathError::Empty));
        assert_eq!(validate(b"etc"), Err(PathError::NotAbsolute));
        assert_eq!(validate(b"/etc/"), Err(PathError::BadComponent));
        assert_eq!(validate(b"//etc"), Err(PathError::BadComponent));
        assert_eq!(validate(b"/etc/../x"), Err(PathError::BadComponent));
        assert_eq!(validate(b"/./x"), Err(PathError::BadComponent));
        assert_eq!(validate(b"/a\0b"), Err(PathError::Nul));
    }

    #[test]
    fn tree_order_puts_children_right_after_their_directory() {
        let mut v: Vec<&[u8]> = vec![b"/a.b", b"/a/b", b"/a", b"/", b"/a-z", b"/a/b/c", b"/b"];
        v.sort_by(|a, b| tree_order(a, b));
        let want: Vec<&[u8]> = vec![b"/", b"/a", b"/a/b", b"/a/b/c", b"/a-z", b"/a.b", b"/b"];
        assert_eq!(v, want);
    }

    #[test]
    fn tree_order_is_byte_order_with_the_separator_lowest() {
        let key =
            |p: &[u8]| -> Vec<u8> { p.iter().map(|&c| if c == b'/' { 0 } else { c }).collect() };
        let names: [&[u8]; 9] = [
            b"",
            b"a",
            b"a/",
            b"a.b",
            b"a/b",
            b"/",
            b"\xff",
            b"a-",
            b"abcdefgh/",
        ];
        let mut paths: Vec<Vec<u8>> = Vec::new();
        for x in names {
            for y in names {
                for z in [&b""[..], b"/x", b"0123456789/abcdef", b"0123456789.abcdef"] {
                    paths.push([b"/usr/share/doc/", x, y, z].concat());
                }
            }
        }
        for a in &paths {
            for b in &paths {
                assert_eq!(tree_order(a, b), key(a).cmp(&key(b)), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn ancestry_and_names() {
        assert!(is_ancestor(b"/", b"/a"));
        assert!(is_ancestor(b"/a", b"/a/b/c"));
        assert!(!is_ancestor(b"/a", b"/ab"));
        assert!(!is_ancestor(b"/a", b"/a"));
        assert_eq!(file_name(b"/a/bc"), b"bc");
        assert_eq!(parent(b"/a/bc"), Some(&b"/a"[..]));
        assert_eq!(parent(b"/a"), Some(&b"/"[..]));
        assert_eq!(parent(b"/"), None);
    }
}
