//! Comparing what the baseline recorded with what the host has: pure functions from values to
//! [`Violation`] values. No filesystem, no clock.

use driftwatch_proto::v1::{Entry, FileType, Xattr};
use serde::Serialize;

use crate::escape::{self, JsonBytes};
use crate::policy::{Attribute, PathPolicy, Severity};

/// What kind of drift a violation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    Added,
    Removed,
    Modified,
    TypeChanged,
    Unverifiable,
}

impl ViolationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ViolationKind::Added => "added",
            ViolationKind::Removed => "removed",
            ViolationKind::Modified => "modified",
            ViolationKind::TypeChanged => "type_changed",
            ViolationKind::Unverifiable => "unverifiable",
        }
    }
}

/// One attribute that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub attribute: String,
    pub before: String,
    pub after: String,
}

/// The recorded or observed state of an object, for reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectSummary {
    #[serde(rename = "type")]
    pub file_type: &'static str,
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<JsonBytes>,
}

/// A finding about one path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub path: JsonBytes,
    pub kind: ViolationKind,
    pub severity: Severity,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline: Option<ObjectSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed: Option<ObjectSummary>,
    /// Packages owning the path (`name:arch`), when the root has a package manager.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<String>,
    /// Attribution class, when the root has a package manager.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<crate::attribution::Class>,
    /// The path is a configuration file of an owning package.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub config: bool,
}

/// Short name of a file type, as used in reports.
pub fn type_name(t: i32) -> &'static str {
    match FileType::try_from(t).unwrap_or(FileType::Unspecified) {
        FileType::Regular => "file",
        FileType::Directory => "directory",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::BlockDevice => "block_device",
        FileType::CharDevice => "char_device",
        FileType::Unspecified => "unknown",
    }
}

/// `0755 (rwxr-xr-x)`, with s/S and t/T for the special bits.
pub fn format_mode(mode: u32) -> String {
    let mut s = String::with_capacity(9);
    let bits = [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ];
    for (i, (bit, ch)) in bits.iter().enumerate() {
        let set = mode & bit != 0;
        let special = match i {
            2 => mode & 0o4000 != 0,
            5 => mode & 0o2000 != 0,
            8 => mode & 0o1000 != 0,
            _ => false,
        };
        let c = match (special, set, i) {
            (true, true, 8) => 't',
            (true, false, 8) => 'T',
            (true, true, _) => 's',
            (true, false, _) => 'S',
            (false, true, _) => *ch,
            (false, false, _) => '-',
        };
        s.push(c);
    }
    format!("{mode:04o} ({s})")
}

pub fn format_hash(h: &[u8]) -> String {
    if h.is_empty() {
        return "(not hashed)".into();
    }
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    format!("blake3:{hex}")
}

fn format_xattr_value(v: &[u8]) -> String {
    let printable = v.iter().all(|&b| (0x20..0x7f).contains(&b) || b == 0);
    if v.len() > 64 {
        format!(
            "<{} bytes, blake3:{}>",
            v.len(),
            &format_hash(blake3::hash(v).as_bytes())[7..23]
        )
    } else if printable && !v.is_empty() {
        format!("\"{}\"", escape::bytes(v))
    } else {
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        format!("0x{hex}")
    }
}

fn format_mtime(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let frac = ns.rem_euclid(1_000_000_000);
    let t = crate::time::format_unix(secs);
    format!("{}.{frac:09}Z", t.trim_end_matches('Z'))
}

/// Summary of an entry for reports.
pub fn summarize(e: &Entry) -> ObjectSummary {
    let ft = FileType::try_from(e.file_type).unwrap_or(FileType::Unspecified);
    ObjectSummary {
        file_type: type_name(e.file_type),
        mode: format!("{:04o}", e.mode),
        uid: e.uid,
        gid: e.gid,
        size: e.size,
        content: (ft == FileType::Regular).then(|| format_hash(&e.content_hash)),
        target: (ft == FileType::Symlink).then(|| JsonBytes(e.symlink_target.clone())),
    }
}

fn is_device(t: i32) -> bool {
    t == FileType::BlockDevice as i32 || t == FileType::CharDevice as i32
}

fn xattr_changes(before: &[Xattr], after: &[Xattr], out: &mut Vec<Change>) -> bool {
    let mut capability_touched = false;
    let (mut i, mut j) = (0, 0);
    let absent = "(absent)".to_string();
    while i < before.len() || j < after.len() {
        let ord = match (before.get(i), after.get(j)) {
            (Some(b), Some(a)) => b.name.cmp(&a.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        let (name, b, a) = match ord {
            std::cmp::Ordering::Less => {
                i += 1;
                (&before[i - 1].name, Some(&before[i - 1].value), None)
            }
            std::cmp::Ordering::Greater => {
                j += 1;
                (&after[j - 1].name, None, Some(&after[j - 1].value))
            }
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
                if before[i - 1].value == after[j - 1].value {
                    continue;
                }
                (
                    &before[i - 1].name,
                    Some(&before[i - 1].value),
                    Some(&after[j - 1].value),
                )
            }
        };
        if name.as_slice() == b"security.capability" && a.is_some() {
            capability_touched = true;
        }
        out.push(Change {
            attribute: format!("xattr {}", escape::bytes(name)),
            before: b.map_or_else(|| absent.clone(), |v| format_xattr_value(v)),
            after: a.map_or_else(|| absent.clone(), |v| format_xattr_value(v)),
        });
    }
    capability_touched
}

/// Raises the severity of changes that grant privilege, whatever the path's own severity.
fn escalate(
    sev: Severity,
    before_mode: Option<u32>,
    after: &Entry,
    capability_touched: bool,
) -> Severity {
    let mut s = sev;
    let gained = |bits: u32| after.mode & bits != 0 && before_mode.is_none_or(|m| m & bits == 0);
    let not_symlink = after.file_type != FileType::Symlink as i32;
    if (not_symlink && gained(0o6000)) || capability_touched {
        s = s.max(Severity::Critical);
    }
    if not_symlink && gained(0o002) {
        s = s.max(Severity::High);
    }
    s
}

/// Compares one path. `observed` carries the object on the host and why part of it could not
/// be verified, if so. Returns `None` when the path conforms to the policy.
pub fn compare(
    base: Option<&Entry>,
    observed: Option<(&Entry, Option<&str>)>,
    pp: &PathPolicy,
) -> Option<Violation> {
    let path = base.or(observed.map(|o| o.0)).map(|e| e.path.clone())?;
    let attrs = pp.attributes;
    match (base, observed) {
        (None, None) => None,
        (None, Some((o, _))) => {
            if pp.mutable {
                return None;
            }
            let caps = o
                .xattrs
                .iter()
                .any(|x| x.name.as_slice() == b"security.capability");
            Some(Violation {
                path: JsonBytes(path),
                kind: ViolationKind::Added,
                severity: escalate(pp.severity, None, o, caps),
                changes: Vec::new(),
                reason: None,
                baseline: None,
                observed: Some(summarize(o)),
                packages: Vec::new(),
                class: None,
                config: false,
            })
        }
        (Some(b), None) => {
            if pp.mutable {
                return None;
            }
            Some(Violation {
                path: JsonBytes(path),
                kind: ViolationKind::Removed,
                severity: pp.severity,
                changes: Vec::new(),
                reason: None,
                baseline: Some(summarize(b)),
                observed: None,
                packages: Vec::new(),
                class: None,
                config: false,
            })
        }
        (Some(b), Some((o, problem))) => {
            if b.file_type != o.file_type {
                if !attrs.contains(Attribute::Type) {
                    return None;
                }
                return Some(Violation {
                    path: JsonBytes(path),
                    kind: ViolationKind::TypeChanged,
                    severity: escalate(pp.severity, None, o, false),
                    changes: vec![Change {
                        attribute: "type".into(),
                        before: type_name(b.file_type).into(),
                        after: type_name(o.file_type).into(),
                    }],
                    reason: None,
                    baseline: Some(summarize(b)),
                    observed: Some(summarize(o)),
                    packages: Vec::new(),
                    class: None,
                    config: false,
                });
            }
            let regular = b.file_type == FileType::Regular as i32;
            let mut changes = Vec::new();
            let mut push = |attribute: &str, before: String, after: String| {
                changes.push(Change {
                    attribute: attribute.into(),
                    before,
                    after,
                })
            };
            if attrs.contains(Attribute::Mode) && b.mode != o.mode {
                push("mode", format_mode(b.mode), format_mode(o.mode));
            }
            if attrs.contains(Attribute::Uid) && b.uid != o.uid {
                push("uid", b.uid.to_string(), o.uid.to_string());
            }
            if attrs.contains(Attribute::Gid) && b.gid != o.gid {
                push("gid", b.gid.to_string(), o.gid.to_string());
            }
            if regular
                && ((attrs.contains(Attribute::Size) && b.size != o.size)
                    || (pp.growing && o.size < b.size))
            {
                push("size", b.size.to_string(), o.size.to_string());
            }
            let mut unverifiable = problem.map(str::to_string);
            if regular && attrs.contains(Attribute::Content) && unverifiable.is_none() {
                if b.content_hash.is_empty() {
                    unverifiable = Some(if b.unhashed_reason.is_empty() {
                        "the baseline has no content hash for this file".into()
                    } else {
                        format!(
                            "the baseline has no content hash for this file ({})",
                            b.unhashed_reason
                        )
                    });
                } else if o.content_hash.is_empty() {
                    unverifiable = Some("content was not hashed".into());
                } else if b.content_hash != o.content_hash {
                    push(
                        "content",
                        format_hash(&b.content_hash),
                        format_hash(&o.content_hash),
                    );
                }
            }
            if attrs.contains(Attribute::Target) && b.symlink_target != o.symlink_target {
                push(
                    "target",
                    escape::bytes(&b.symlink_target),
                    escape::bytes(&o.symlink_target),
                );
            }
            if attrs.contains(Attribute::Rdev)
                && is_device(b.file_type)
                && (b.rdev_major, b.rdev_minor) != (o.rdev_major, o.rdev_minor)
            {
                push(
                    "rdev",
                    format!("{}:{}", b.rdev_major, b.rdev_minor),
                    format!("{}:{}", o.rdev_major, o.rdev_minor),
                );
            }
            if attrs.contains(Attribute::Mtime) && b.mtime_ns != o.mtime_ns {
                push("mtime", format_mtime(b.mtime_ns), format_mtime(o.mtime_ns));
            }
            let caps = attrs.contains(Attribute::Xattrs)
                && xattr_changes(&b.xattrs, &o.xattrs, &mut changes);
            let kind = if !changes.is_empty() {
                ViolationKind::Modified
            } else if unverifiable.is_some() {
                ViolationKind::Unverifiable
            } else {
                return None;
            };
            Some(Violation {
                path: JsonBytes(path),
                kind,
                severity: escalate(pp.severity, Some(b.mode), o, caps),
                changes,
                reason: unverifiable,
                baseline: Some(summarize(b)),
                observed: Some(summarize(o)),
                packages: Vec::new(),
                class: None,
                config: false,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;

    fn file(path: &str, content: &[u8], mode: u32) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            file_type: FileType::Regular as i32,
            mode,
            size: content.len() as u64,
            content_hash: blake3::hash(content).as_bytes().to_vec(),
            mtime_ns: 1,
            ..Default::default()
        }
    }

    fn pp(path: &str) -> PathPolicy {
        Policy::builtin().for_path(path.as_bytes())
    }

    #[test]
    fn identical_entries_conform() {
        let a = file("/etc/x", b"1", 0o644);
        assert_eq!(compare(Some(&a), Some((&a, None)), &pp("/etc/x")), None);
        let mut later = a.clone();
        later.mtime_ns = 99;
        assert_eq!(
            compare(Some(&a), Some((&later, None)), &pp("/etc/x")),
            None,
            "mtime is not checked by default"
        );
    }

    #[test]
    fn same_size_content_change_is_reported_with_both_hashes() {
        let a = file("/usr/bin/ls", b"aaaa", 0o755);
        let b = file("/usr/bin/ls", b"bbbb", 0o755);
        let v = compare(Some(&a), Some((&b, None)), &pp("/usr/bin/ls")).unwrap();
        assert_eq!(v.kind, ViolationKind::Modified);
        assert_eq!(v.severity, Severity::High);
        assert_eq!(v.changes.len(), 1);
        assert_eq!(v.changes[0].attribute, "content");
        assert!(v.changes[0].before.starts_with("blake3:"));
        assert_ne!(v.changes[0].before, v.changes[0].after);
    }

    #[test]
    fn setuid_and_capabilities_are_critical_world_writable_is_high() {
        let a = file("/opt/tool", b"x", 0o755);
        let mut s = a.clone();
        s.mode = 0o4755;
        let v = compare(Some(&a), Some((&s, None)), &pp("/opt/tool")).unwrap();
        assert_eq!(v.severity, Severity::Critical);
        assert_eq!(v.changes[0].after, "4755 (rwsr-xr-x)");

        let mut c = a.clone();
        c.xattrs.push(Xattr {
            name: b"security.capability".to_vec(),
            value: vec![1, 0, 0, 2, 0, 0x20, 0, 0],
        });
        let v = compare(Some(&a), Some((&c, None)), &pp("/opt/tool")).unwrap();
        assert_eq!(v.severity, Severity::Critical);
        assert_eq!(v.changes[0].attribute, "xattr security.capability");
        assert_eq!(v.changes[0].before, "(absent)");

        let dir = Entry {
            path: b"/var/www".to_vec(),
            file_type: FileType::Directory as i32,
            mode: 0o755,
            ..Default::default()
        };
        let mut ww = dir.clone();
        ww.mode = 0o777;
        let v = compare(Some(&dir), Some((&ww, None)), &pp("/var/www")).unwrap();
        assert_eq!(v.severity, Severity::High);
    }

    #[test]
    fn mutable_paths_may_change_content_and_come_and_go_but_not_owner() {
        let a = file("/etc/resolv.conf", b"nameserver 1.1.1.1", 0o644);
        let b = file("/etc/resolv.conf", b"nameserver 9.9.9.9 and more", 0o644);
        let p = pp("/etc/resolv.conf");
        assert_eq!(compare(Some(&a), Some((&b, None)), &p), None);
        assert_eq!(compare(Some(&a), None, &p), None);
        assert_eq!(compare(None, Some((&b, None)), &p), None);
        let mut owned = b.clone();
        owned.uid = 1000;
        owned.mode = 0o666;
        let v = compare(Some(&a), Some((&owned, None)), &p).unwrap();
        let attrs: Vec<_> = v.changes.iter().map(|c| c.attribute.as_str()).collect();
        assert_eq!(attrs, ["mode", "uid"]);
    }

    #[test]
    fn growing_files_may_not_shrink() {
        let p = Policy::from_toml("[[rule]]\npaths=['/var/log/**']\ngrowing=true\n").unwrap();
        let pp = p.for_path(b"/var/log/auth.log");
        let a = file("/var/log/auth.log", b"0123456789", 0o640);
        let grown = file("/var/log/auth.log", b"0123456789abc", 0o640);
        let shrunk = file("/var/log/auth.log", b"012", 0o640);
        assert_eq!(compare(Some(&a), Some((&grown, None)), &pp), None);
        let v = compare(Some(&a), Some((&shrunk, None)), &pp).unwrap();
        assert_eq!(v.changes[0].attribute, "size");
    }

    #[test]
    fn type_change_added_removed_and_unverifiable() {
        let a = file("/etc/x", b"1", 0o644);
        let l = Entry {
            path: b"/etc/x".to_vec(),
            file_type: FileType::Symlink as i32,
            mode: 0o777,
            symlink_target: b"/tmp/evil".to_vec(),
            ..Default::default()
        };
        let v = compare(Some(&a), Some((&l, None)), &pp("/etc/x")).unwrap();
        assert_eq!(v.kind, ViolationKind::TypeChanged);
        assert_eq!(
            (v.changes[0].before.as_str(), v.changes[0].after.as_str()),
            ("file", "symlink")
        );
        assert_eq!(
            compare(None, Some((&a, None)), &pp("/etc/x")).unwrap().kind,
            ViolationKind::Added
        );
        assert_eq!(
            compare(Some(&a), None, &pp("/etc/x")).unwrap().kind,
            ViolationKind::Removed
        );
        let v = compare(
            Some(&a),
            Some((&a, Some("changed while being read"))),
            &pp("/etc/x"),
        )
        .unwrap();
        assert_eq!(v.kind, ViolationKind::Unverifiable);
        assert_eq!(v.reason.as_deref(), Some("changed while being read"));
        let mut big = a.clone();
        big.content_hash.clear();
        big.unhashed_reason = "too big".into();
        let v = compare(Some(&big), Some((&big, None)), &pp("/etc/x")).unwrap();
        assert_eq!(v.kind, ViolationKind::Unverifiable);
    }

    #[test]
    fn symlink_retarget_and_device_numbers() {
        let l1 = Entry {
            path: b"/bin".to_vec(),
            file_type: FileType::Symlink as i32,
            mode: 0o777,
            symlink_target: b"usr/bin".to_vec(),
            ..Default::default()
        };
        let mut l2 = l1.clone();
        l2.symlink_target = b"/tmp/\x1b[2J".to_vec();
        let v = compare(Some(&l1), Some((&l2, None)), &pp("/bin")).unwrap();
        assert_eq!(v.changes[0].after, "/tmp/\\x1b[2J");
        let d1 = Entry {
            path: b"/lib/d".to_vec(),
            file_type: FileType::CharDevice as i32,
            rdev_major: 1,
            rdev_minor: 3,
            ..Default::default()
        };
        let mut d2 = d1.clone();
        d2.rdev_minor = 5;
        assert_eq!(
            compare(Some(&d1), Some((&d2, None)), &pp("/lib/d"))
                .unwrap()
                .changes[0]
                .attribute,
            "rdev"
        );
    }

    #[test]
    fn mode_formatting() {
        assert_eq!(format_mode(0o755), "0755 (rwxr-xr-x)");
        assert_eq!(format_mode(0o4755), "4755 (rwsr-xr-x)");
        assert_eq!(format_mode(0o2750), "2750 (rwxr-s---)");
        assert_eq!(format_mode(0o1777), "1777 (rwxrwxrwt)");
        assert_eq!(format_mode(0o4644), "4644 (rwSr--r--)");
    }
}
