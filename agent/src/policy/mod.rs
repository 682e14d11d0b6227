//! The scan policy: what is in scope, which attributes are checked where, how severe a finding
//! is, and which paths are expected to change.
//!
//! Configuration comes in stages (zincati-style): TOML text is parsed into [`RawPolicy`]
//! (every field optional, unknown keys refused by name), merged over the built-in default
//! unless the file says `base = "empty"`, and validated into a [`Policy`] whose globs are
//! compiled and whose values are typed. The merged raw form is what a baseline embeds and what
//! `policy show` prints, so a policy always round-trips through text.
//!
//! This module does no I/O: callers read files and hand over text.

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{Candidate, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

/// The built-in policy text.
pub const DEFAULT_POLICY_TOML: &str = include_str!("default.toml");

/// Why a policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid glob {glob:?}: {reason}")]
    Glob { glob: String, reason: String },
    #[error("invalid path {path:?} in {field}: it must be absolute, without '.', '..' or '//'")]
    Path { field: &'static str, path: String },
    #[error("invalid size {0:?}: use a number of bytes or a number with a unit, like \"512 MiB\"")]
    Size(String),
    #[error("rule {0} has no paths")]
    EmptyRule(usize),
}

/// How bad a finding is. Ordered: `Info < Low < Medium < High < Critical`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Low,
    #[default]
    Medium,
    High,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An attribute of a filesystem object that a rule can check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attribute {
    /// File type (regular, directory, symlink, ...). Always reported as "type changed".
    Type,
    /// Permission bits including setuid, setgid and sticky.
    Mode,
    Uid,
    Gid,
    /// Size of regular files (never of directories: that depends on the filesystem).
    Size,
    /// BLAKE3 of a regular file's content.
    Content,
    /// Target of a symbolic link.
    Target,
    /// Device numbers of device nodes.
    Rdev,
    /// Every extended attribute (capabilities, SELinux labels, ACLs, IMA, user.*).
    Xattrs,
    /// Modification time; off by default, as images are often built with varying times.
    Mtime,
}

impl Attribute {
    pub const ALL: [Attribute; 10] = [
        Attribute::Type,
        Attribute::Mode,
        Attribute::Uid,
        Attribute::Gid,
        Attribute::Size,
        Attribute::Content,
        Attribute::Target,
        Attribute::Rdev,
        Attribute::Xattrs,
        Attribute::Mtime,
    ];

    fn bit(self) -> u16 {
        1 << (self as u16)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Attribute::Type => "type",
            Attribute::Mode => "mode",
            Attribute::Uid => "uid",
            Attribute::Gid => "gid",
            Attribute::Size => "size",
            Attribute::Content => "content",
            Attribute::Target => "target",
            Attribute::Rdev => "rdev",
            Attribute::Xattrs => "xattrs",
            Attribute::Mtime => "mtime",
        }
    }
}

/// A set of attributes.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct AttrSet(u16);

impl AttrSet {
    /// What is checked when no rule says otherwise: everything but mtime.
    pub const DEFAULT: AttrSet = AttrSet(0b01_1111_1111);

    pub fn contains(self, a: Attribute) -> bool {
        self.0 & a.bit() != 0
    }
    pub fn insert(&mut self, a: Attribute) {
        self.0 |= a.bit();
    }
    pub fn remove(&mut self, a: Attribute) {
        self.0 &= !a.bit();
    }
    pub fn iter(self) -> impl Iterator<Item = Attribute> {
        Attribute::ALL
            .into_iter()
            .filter(move |a| self.contains(*a))
    }
    fn from_list(list: &[Attribute]) -> AttrSet {
        let mut s = AttrSet(0);
        for a in list {
            s.insert(*a);
        }
        s
    }
}

impl fmt::Debug for AttrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(Attribute::as_str))
            .finish()
    }
}

/// Where the merged policy starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Base {
    /// The built-in policy; this file's settings are merged over it.
    #[default]
    Default,
    /// Nothing: this file is the whole policy.
    Empty,
}

/// A policy file as written: every field optional, unknown keys refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<Base>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scan: Option<RawScan>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packages: Option<RawPackages>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paths: Option<RawPaths>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule: Vec<RawRule>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawPackages {
    /// Severity of a package installed, removed or changed since the image was built.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<Severity>,
    /// Severity of a file violation whose owning package changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explained: Option<Severity>,
    /// Severity of a file violation of a package that did not change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unexplained_owned: Option<Severity>,
    /// `verify-packages` checks configuration files too.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify_conffiles: Option<bool>,
}

/// What the policy says about packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackagePolicy {
    pub drift: Severity,
    pub explained: Severity,
    pub unexplained_owned: Severity,
    pub verify_conffiles: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawScan {
    /// Stay on the filesystem of the scanned root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_file_system: Option<bool>,
    /// Mount points to descend into although `one_file_system` is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_filesystems: Option<Vec<String>>,
    /// Regular files larger than this are not hashed (and reported as unverifiable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_hash_size: Option<ByteSize>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawPaths {
    /// Globs of what is in scope. Replaces the base's list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include: Option<Vec<String>>,
    /// Globs of what is out of scope; a matching directory is not descended. Appended to the
    /// base's list.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exclude: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub paths: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    /// The attributes checked (replaces the set in force).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributes: Option<Vec<Attribute>>,
    /// Attributes taken out of the set in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore: Option<Vec<Attribute>>,
    /// Content may change and the path may come and go; type, owner and mode of what the
    /// baseline has are still checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mutable: Option<bool>,
    /// The file may only grow (logs): a smaller size is drift even where content is ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub growing: Option<bool>,
}

/// A byte count, written as a number or as a string with a unit ("4 GiB", "100MB", "512k").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Option<ByteSize> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            "t" | "tb" => 1000u64.pow(4),
            "tib" => 1 << 40,
            _ => return None,
        };
        n.checked_mul(mult).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (size, unit) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{} {unit}", self.0 / size);
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            N(u64),
            S(String),
        }
        match Either::deserialize(d)? {
            Either::N(n) => Ok(ByteSize(n)),
            Either::S(s) => ByteSize::parse(&s).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "invalid size {s:?}: use a number of bytes or a number with a unit, like \"512 MiB\""
                ))
            }),
        }
    }
}

/// What the policy says about one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathPolicy {
    pub severity: Severity,
    pub attributes: AttrSet,
    pub mutable: bool,
    pub growing: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    severity: Option<Severity>,
    attributes: Option<AttrSet>,
    ignore: AttrSet,
    mutable: Option<bool>,
    growing: Option<bool>,
}

/// Where one path stands under the policy, from a single match against every glob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// The path itself matches an exclude glob (ancestors are not considered).
    pub excluded: bool,
    /// The path matches an include glob.
    pub included: bool,
    /// The settings in force for the path (see [`Policy::for_path`]).
    pub policy: PathPolicy,
}

/// A validated, compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    effective: RawPolicy,
    pub one_file_system: bool,
    pub cross_filesystems: Vec<Vec<u8>>,
    pub max_hash_size: u64,
    pub packages: PackagePolicy,
    /// Every glob in one set, so a path is matched once: the exclude globs, then the include
    /// globs, then the rules' globs.
    globs: GlobSet,
    /// How many globs of `globs` are exclude globs, and how many include globs follow them.
    exclude_count: usize,
    include_count: usize,
    /// The rule of each rule glob.
    glob_rule: Vec<usize>,
    rules: Vec<Rule>,
}

/// What matched one path: the exclude and include verdicts and the matching rules in order.
struct Matches {
    excluded: bool,
    included: bool,
    rules: Vec<usize>,
}

fn compile_globs(globs: &[String], into: &mut GlobSetBuilder) -> Result<(), PolicyError> {
    for g in globs {
        if !(g.starts_with('/') || g.starts_with("**")) {
            return Err(PolicyError::Glob {
                glob: g.clone(),
                reason: "a glob must start with '/' or '**' (paths are absolute inside the root)"
                    .into(),
            });
        }
        let glob = GlobBuilder::new(g)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| PolicyError::Glob {
                glob: g.clone(),
                reason: e.kind().to_string(),
            })?;
        into.add(glob);
    }
    Ok(())
}

fn candidate(path: &[u8]) -> Candidate<'_> {
    Candidate::new(Path::new(OsStr::from_bytes(path)))
}

impl RawPolicy {
    /// Parses policy text. Unknown keys are an error that names the key.
    pub fn parse(text: &str) -> Result<RawPolicy, PolicyError> {
        Ok(toml::from_str(text)?)
    }

    /// Merges `self` over `base`: scan settings and `include` replace, `exclude` and rules
    /// append.
    fn merge_over(self, mut base: RawPolicy) -> RawPolicy {
        if let Some(scan) = self.scan {
            let b = base.scan.get_or_insert_with(RawScan::default);
            if scan.one_file_system.is_some() {
                b.one_file_system = scan.one_file_system;
            }
            if scan.cross_filesystems.is_some() {
                b.cross_filesystems = scan.cross_filesystems;
            }
            if scan.max_hash_size.is_some() {
                b.max_hash_size = scan.max_hash_size;
            }
        }
        if let Some(pk) = self.packages {
            let b = base.packages.get_or_insert_with(RawPackages::default);
            if pk.drift.is_some() {
                b.drift = pk.drift;
            }
            if pk.explained.is_some() {
                b.explained = pk.explained;
            }
            if pk.unexplained_owned.is_some() {
                b.unexplained_owned = pk.unexplained_owned;
            }
            if pk.verify_conffiles.is_some() {
                b.verify_conffiles = pk.verify_conffiles;
            }
        }
        if let Some(paths) = self.paths {
            let b = base.paths.get_or_insert_with(RawPaths::default);
            if paths.include.is_some() {
                b.include = paths.include;
            }
            if let Some(ex) = paths.exclude {
                b.exclude.get_or_insert_with(Vec::new).extend(ex);
            }
        }
        base.rule.extend(self.rule);
        base.base = Some(Base::Empty);
        base
    }
}

impl Policy {
    /// The built-in policy.
    pub fn builtin() -> Policy {
        // The built-in text is part of the binary and covered by tests; failing to parse it is
        // a build defect, not a runtime condition.
        #[allow(clippy::expect_used)]
        Policy::from_toml(DEFAULT_POLICY_TOML).expect("the built-in policy is valid")
    }

    /// Parses, merges (unless `base = "empty"`) and validates policy text.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let raw = RawPolicy::parse(text)?;
        let effective = match raw.base.unwrap_or_default() {
            Base::Empty => RawPolicy {
                base: Some(Base::Empty),
                ..raw
            },
            Base::Default => {
                let builtin = RawPolicy::parse(DEFAULT_POLICY_TOML)?;
                raw.merge_over(RawPolicy {
                    base: Some(Base::Empty),
                    ..builtin
                })
            }
        };
        Policy::validate(effective)
    }

    fn validate(effective: RawPolicy) -> Result<Policy, PolicyError> {
        let scan = effective.scan.clone().unwrap_or_default();
        let paths = effective.paths.clone().unwrap_or_default();
        let pk = effective.packages.clone().unwrap_or_default();
        let packages = PackagePolicy {
            drift: pk.drift.unwrap_or(Severity::High),
            explained: pk.explained.unwrap_or(Severity::Low),
            unexplained_owned: pk.unexplained_owned.unwrap_or(Severity::Critical),
            verify_conffiles: pk.verify_conffiles.unwrap_or(true),
        };
        let mut cross = Vec::new();
        for p in scan.cross_filesystems.iter().flatten() {
            if driftwatch_proto::path::validate(p.as_bytes()).is_err() {
                return Err(PolicyError::Path {
                    field: "scan.cross_filesystems",
                    path: p.clone(),
                });
            }
            cross.push(p.as_bytes().to_vec());
        }
        let default_include = ["/".to_string(), "/**".to_string()];
        let include = paths.include.as_deref().unwrap_or(&default_include);
        let exclude = paths.exclude.as_deref().unwrap_or(&[]);
        let mut all_globs = Vec::new();
        let mut glob_rule = Vec::new();
        let mut rules = Vec::new();
        for (i, r) in effective.rule.iter().enumerate() {
            if r.paths.is_empty() {
                return Err(PolicyError::EmptyRule(i + 1));
            }
            for g in &r.paths {
                all_globs.push(g.clone());
                glob_rule.push(i);
            }
            rules.push(Rule {
                severity: r.severity,
                attributes: r.attributes.as_deref().map(AttrSet::from_list),
                ignore: AttrSet::from_list(r.ignore.as_deref().unwrap_or(&[])),
                mutable: r.mutable,
                growing: r.growing,
            });
        }
        let mut builder = GlobSetBuilder::new();
        compile_globs(exclude, &mut builder)?;
        compile_globs(include, &mut builder)?;
        compile_globs(&all_globs, &mut builder)?;
        let globs = builder.build().map_err(|e| PolicyError::Glob {
            glob: [exclude, include, &all_globs[..]].concat().join(", "),
            reason: e.to_string(),
        })?;
        Ok(Policy {
            one_file_system: scan.one_file_system.unwrap_or(true),
            cross_filesystems: cross,
            max_hash_size: scan.max_hash_size.map_or(4 << 30, |b| b.0),
            packages,
            globs,
            exclude_count: exclude.len(),
            include_count: include.len(),
            glob_rule,
            rules,
            effective,
        })
    }

    /// The effective policy as canonical TOML (defaults merged in, `base = "empty"`), so that
    /// parsing it yields this same policy.
    pub fn to_toml(&self) -> String {
        // Serializing plain strings, numbers and tables cannot fail.
        toml::to_string(&self.effective).unwrap_or_default()
    }

    /// BLAKE3 of [`Policy::to_toml`].
    pub fn digest(&self) -> [u8; 32] {
        *blake3::hash(self.to_toml().as_bytes()).as_bytes()
    }

    /// Matches `path` against every glob at once.
    fn matches(&self, path: &[u8]) -> Matches {
        let mut hits = Vec::new();
        self.globs
            .matches_candidate_into(&candidate(path), &mut hits);
        let mut m = Matches {
            excluded: false,
            included: false,
            rules: Vec::new(),
        };
        let rules_from = self.exclude_count + self.include_count;
        for g in hits {
            if g < self.exclude_count {
                m.excluded = true;
            } else if g < rules_from {
                m.included = true;
            } else {
                m.rules.push(self.glob_rule[g - rules_from]);
            }
        }
        m.rules.sort_unstable();
        m.rules.dedup();
        m
    }

    /// Exclusion, inclusion and the settings in force for `path`, from one glob match (what
    /// [`Policy::is_excluded`], [`Policy::is_included`] and [`Policy::for_path`] say).
    pub fn classify(&self, path: &[u8]) -> Classification {
        let m = self.matches(path);
        Classification {
            excluded: m.excluded,
            included: m.included,
            policy: self.apply_rules(&m.rules),
        }
    }

    /// True when `path` itself matches an exclude glob.
    pub fn is_excluded(&self, path: &[u8]) -> bool {
        self.matches(path).excluded
    }

    /// True when `path` or one of its ancestors is excluded.
    pub fn is_excluded_or_below(&self, path: &[u8]) -> bool {
        let mut p = Some(path);
        while let Some(cur) = p {
            if self.is_excluded(cur) {
                return true;
            }
            p = driftwatch_proto::path::parent(cur);
        }
        false
    }

    /// True when `path` matches an include glob.
    pub fn is_included(&self, path: &[u8]) -> bool {
        self.matches(path).included
    }

    /// True when the object at `path` is in scope: included and not excluded (nor below an
    /// excluded directory).
    pub fn in_scope(&self, path: &[u8]) -> bool {
        self.is_included(path) && !self.is_excluded_or_below(path)
    }

    /// The settings in force for `path`: every matching rule applied in order.
    pub fn for_path(&self, path: &[u8]) -> PathPolicy {
        self.apply_rules(&self.matches(path).rules)
    }

    /// The settings that `rules` (indices, ascending) give.
    fn apply_rules(&self, rules: &[usize]) -> PathPolicy {
        let mut pp = PathPolicy {
            severity: Severity::Medium,
            attributes: AttrSet::DEFAULT,
            mutable: false,
            growing: false,
        };
        for &i in rules {
            let r = &self.rules[i];
            if let Some(s) = r.severity {
                pp.severity = s;
            }
            if let Some(a) = r.attributes {
                pp.attributes = a;
            }
            for a in r.ignore.iter() {
                pp.attributes.remove(a);
            }
            if let Some(m) = r.mutable {
                pp.mutable = m;
            }
            if let Some(g) = r.growing {
                pp.growing = g;
            }
        }
        if pp.mutable {
            pp.attributes.remove(Attribute::Content);
            pp.attributes.remove(Attribute::Size);
            pp.attributes.remove(Attribute::Mtime);
        }
        pp
    }

    /// Indices (1-based) of the rules that match `path`, for explanations.
    pub fn matching_rules(&self, path: &[u8]) -> Vec<usize> {
        self.matches(path).rules.iter().map(|i| i + 1).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_policy_parses_and_round_trips_through_its_canonical_text() {
        let p = Policy::builtin();
        let again = Policy::from_toml(&p.to_toml()).unwrap();
        assert_eq!(p.to_toml(), again.to_toml());
        assert_eq!(p.digest(), again.digest());
        assert!(p.one_file_system);
        assert_eq!(p.max_hash_size, 4 << 30);
    }

    #[test]
    fn builtin_policy_scopes_a_debian_server() {
        let p = Policy::builtin();
        for out in [
            &b"/proc"[..],
            b"/sys",
            b"/dev",
            b"/run",
            b"/tmp",
            b"/var/cache/apt",
        ] {
            assert!(p.is_excluded(out), "{}", String::from_utf8_lossy(out));
        }
        assert!(p.is_excluded_or_below(b"/proc/1/status"));
        for inside in [
            &b"/"[..],
            b"/etc/passwd",
            b"/usr/bin/ls",
            b"/var/cache",
            b"/boot/vmlinuz",
        ] {
            assert!(p.in_scope(inside), "{}", String::from_utf8_lossy(inside));
        }
        let etc = p.for_path(b"/usr/bin/ls");
        assert_eq!(etc.severity, Severity::High);
        assert!(etc.attributes.contains(Attribute::Content));
        assert!(!etc.attributes.contains(Attribute::Mtime));
        assert_eq!(p.for_path(b"/etc/cron.d/job").severity, Severity::Critical);
        assert_eq!(p.for_path(b"/etc/sudoers").severity, Severity::Critical);
        assert_eq!(p.for_path(b"/").severity, Severity::Medium);
    }

    #[test]
    fn mutable_relaxes_content_but_keeps_owner_and_mode() {
        let p = Policy::builtin();
        let r = p.for_path(b"/etc/resolv.conf");
        assert!(r.mutable);
        assert!(!r.attributes.contains(Attribute::Content));
        assert!(!r.attributes.contains(Attribute::Size));
        for a in [
            Attribute::Type,
            Attribute::Mode,
            Attribute::Uid,
            Attribute::Gid,
        ] {
            assert!(r.attributes.contains(a));
        }
        assert!(p.for_path(b"/var/lib/dpkg/status").mutable);
        // Later rules override earlier ones.
        let cron = p.for_path(b"/var/spool/cron/crontabs/root");
        assert!(!cron.mutable);
        assert_eq!(cron.severity, Severity::Critical);
        assert!(!p.for_path(b"/home/alice/.ssh/authorized_keys").mutable);
        assert!(p.for_path(b"/home/alice/notes.txt").mutable);
    }

    #[test]
    fn user_policy_merges_over_the_default() {
        let p = Policy::from_toml(
            r#"
            [scan]
            max_hash_size = "1 MiB"
            [paths]
            exclude = ["/opt/data/**"]
            [[rule]]
            paths = ["/var/log/**"]
            growing = true
            attributes = ["type", "mode", "uid", "gid", "size"]
            "#,
        )
        .unwrap();
        assert_eq!(p.max_hash_size, 1 << 20);
        assert_eq!(
            p.packages.unexplained_owned,
            Severity::Critical,
            "kept from the default"
        );
        assert!(p.is_excluded(b"/opt/data/x"));
        assert!(p.is_excluded(b"/proc"), "the default's excludes are kept");
        let log = p.for_path(b"/var/log/syslog");
        assert!(log.growing && log.mutable);
        assert!(
            !log.attributes.contains(Attribute::Size),
            "mutable drops size"
        );
    }

    #[test]
    fn empty_base_starts_from_nothing() {
        let p = Policy::from_toml("base = \"empty\"\n").unwrap();
        assert!(!p.is_excluded(b"/proc"));
        assert_eq!(p.for_path(b"/etc/passwd").severity, Severity::Medium);
        assert!(p.in_scope(b"/"));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = Policy::from_toml("[scan]\none_filesystem = true\n").unwrap_err();
        assert!(e.to_string().contains("one_filesystem"), "{e}");
        let e = Policy::from_toml("[[rule]]\npaths=['/x']\nseverty='low'\n").unwrap_err();
        assert!(e.to_string().contains("severty"), "{e}");
        let e = Policy::from_toml("[[rule]]\npaths=['/x']\nattributes=['colour']\n").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_clearly() {
        let e = Policy::from_toml("[paths]\nexclude=['etc/**']\n").unwrap_err();
        assert!(e.to_string().contains("must start with '/'"), "{e}");
        let e = Policy::from_toml("[scan]\nmax_hash_size='lots'\n").unwrap_err();
        assert!(e.to_string().contains("invalid size"), "{e}");
        let e = Policy::from_toml("[paths]\nexclude=['/a/[']\n").unwrap_err();
        assert!(e.to_string().contains("invalid glob"), "{e}");
        assert!(Policy::from_toml("[[rule]]\npaths=[]\n").is_err());
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("4 GiB"), Some(ByteSize(4 << 30)));
        assert_eq!(ByteSize::parse("100MB"), Some(ByteSize(100_000_000)));
        assert_eq!(ByteSize::parse("12"), Some(ByteSize(12)));
        assert_eq!(ByteSize::parse("1 parsec"), None);
        assert_eq!(ByteSize::parse("99999999999 TiB"), None);
        assert_eq!(ByteSize(4 << 30).to_string(), "4 GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000 B");
    }

    #[test]
    fn globs_do_not_cross_separators_and_handle_non_utf8() {
        let p = Policy::from_toml("base='empty'\n[paths]\nexclude=['/a/*']\n").unwrap();
        assert!(p.is_excluded(b"/a/b"));
        assert!(!p.is_excluded(b"/a/b/c"));
        assert!(p.is_excluded(b"/a/\xff\xfe"));
    }

    #[test]
    fn one_match_against_every_glob_equals_matching_each_list_on_its_own() {
        let p = Policy::from_toml(
            r#"
            [paths]
            include = ["/etc/**", "/usr/**", "/var/**", "/home/**", "/"]
            exclude = ["/var/log/**", "**/*.tmp"]
            [[rule]]
            paths = ["/etc/**", "**/*.tmp"]
            severity = "low"
            [[rule]]
            paths = ["/etc/cron*", "/home/*/.ssh/**", "/etc/**"]
            severity = "critical"
            "#,
        )
        .unwrap();
        let set = |globs: &[String]| {
            let mut b = GlobSetBuilder::new();
            compile_globs(globs, &mut b).unwrap();
            b.build().unwrap()
        };
        let raw = p.effective.clone();
        let paths = raw.paths.unwrap();
        let (include, exclude) = (set(&paths.include.unwrap()), set(&paths.exclude.unwrap()));
        let rule_sets: Vec<GlobSet> = raw.rule.iter().map(|r| set(&r.paths)).collect();
        for path in [
            &b"/"[..],
            b"/etc",
            b"/etc/cron.d",
            b"/etc/cron.d/x.tmp",
            b"/etc/passwd",
            b"/var/log/syslog",
            b"/var/log",
            b"/var/lib/dpkg/status",
            b"/home/alice/.ssh/authorized_keys",
            b"/home/alice/a.tmp",
            b"/usr/bin/ls",
            b"/proc/1/status",
            b"/tmp/x",
            b"/srv/\xff\xfe.tmp",
        ] {
            let c = candidate(path);
            let rules: Vec<usize> = (0..rule_sets.len())
                .filter(|&i| rule_sets[i].is_match_candidate(&c))
                .collect();
            let want = Classification {
                excluded: exclude.is_match_candidate(&c),
                included: include.is_match_candidate(&c),
                policy: p.apply_rules(&rules),
            };
            let shown = String::from_utf8_lossy(path);
            assert_eq!(p.classify(path), want, "{shown}");
            assert_eq!(p.is_excluded(path), want.excluded, "{shown}");
            assert_eq!(p.is_included(path), want.included, "{shown}");
            assert_eq!(p.for_path(path), want.policy, "{shown}");
            let one_based: Vec<usize> = rules.iter().map(|i| i + 1).collect();
            assert_eq!(p.matching_rules(path), one_based, "{shown}");
        }
    }
}
