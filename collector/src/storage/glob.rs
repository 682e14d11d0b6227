//! Globs the storage evaluates itself: the path glob of a violation search (over raw path bytes)
//! and an enrollment token's host pattern. Both backends use these, so a pattern matches the
//! same paths on SQLite and PostgreSQL.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{Glob, GlobBuilder, GlobMatcher};

use super::StorageError;

/// A compiled violation-search path glob and the byte range of paths it can match.
#[derive(Debug)]
pub(crate) struct PathGlob {
    matcher: GlobMatcher,
    /// Every matching path starts with these bytes (the pattern up to its first
    /// metacharacter): the SQL side narrows to this range with the path index.
    pub prefix: Vec<u8>,
}

impl PathGlob {
    pub fn new(pattern: &str) -> Result<Self, StorageError> {
        let glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| StorageError::InvalidArgument(format!("path glob {pattern:?}: {e}")))?;
        Ok(PathGlob {
            matcher: glob.compile_matcher(),
            prefix: literal_prefix(pattern),
        })
    }

    /// Whether the raw path matches (non-UTF-8 bytes included: globset matches bytes).
    pub fn is_match(&self, path: &[u8]) -> bool {
        self.matcher.is_match(Path::new(OsStr::from_bytes(path)))
    }

    /// The exclusive upper bound of the prefix range: the smallest byte string greater than
    /// every string starting with `prefix`, or `None` when there is none (empty prefix or all
    /// 0xff bytes).
    pub fn prefix_end(&self) -> Option<Vec<u8>> {
        prefix_successor(&self.prefix)
    }
}

/// The pattern's bytes before its first glob metacharacter. A backslash escape stops the
/// prefix too (conservative: a shorter prefix only widens the SQL range).
fn literal_prefix(pattern: &str) -> Vec<u8> {
    let end = pattern
        .find(['*', '?', '[', '{', '\\'])
        .unwrap_or(pattern.len());
    pattern.as_bytes()[..end].to_vec()
}

fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Whether `host_id` matches an enrollment token's host pattern (a glob over the whole id).
pub(crate) fn host_pattern_matches(pattern: &str, host_id: &str) -> Result<bool, StorageError> {
    let glob = Glob::new(pattern)
        .map_err(|e| StorageError::InvalidArgument(format!("host pattern {pattern:?}: {e}")))?;
    Ok(glob.compile_matcher().is_match(host_id))
}

/// Refuses a host pattern that does not compile, before it is stored.
pub(crate) fn check_host_pattern(pattern: &str) -> Result<(), StorageError> {
    host_pattern_matches(pattern, "").map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_stops_at_the_first_metacharacter() {
        assert_eq!(literal_prefix("/etc/ssh/*"), b"/etc/ssh/");
        assert_eq!(literal_prefix("/etc/passwd"), b"/etc/passwd");
        assert_eq!(literal_prefix("**/sshd_config"), b"");
        assert_eq!(literal_prefix("/a\\*b"), b"/a");
        assert_eq!(literal_prefix("/x/{a,b}"), b"/x/");
        assert_eq!(literal_prefix("/x/[ab]"), b"/x/");
    }

    #[test]
    fn successor_bounds_the_prefix_range() {
        assert_eq!(prefix_successor(b"/etc/"), Some(b"/etc0".to_vec()));
        assert_eq!(prefix_successor(b"/a\xff\xff"), Some(b"/b".to_vec()));
        assert_eq!(prefix_successor(b"\xff"), None);
        assert_eq!(prefix_successor(b""), None);
    }

    #[test]
    fn matches_raw_bytes_and_separators() {
        let g = PathGlob::new("/usr/bin/*").unwrap();
        assert!(g.is_match(b"/usr/bin/\xff\xfe"));
        assert!(!g.is_match(b"/usr/bin/x/y"));
        let g = PathGlob::new("/usr/**").unwrap();
        assert!(g.is_match(b"/usr/bin/x/y"));
        assert!(PathGlob::new("/a/[").is_err());
    }
}
