//! `verify-packages`: every package-owned file against the package manager's own checksums and
//! attributes, with no baseline — like `debsums -s` (dpkg) and `rpm -Va` (rpm).
//!
//! Files are opened with `openat2(RESOLVE_IN_ROOT)`: the root's own symlinks are followed (a
//! package's `/bin/ls` is `/usr/bin/ls` on merged /usr) but resolution can never leave the
//! root, and the last component is never a symlink (`O_NOFOLLOW`). Files are checked in
//! parallel on a rayon pool.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use rayon::prelude::*;
use serde::Serialize;

use super::{Digest, Manifest, PackageError, PackageFile};
use crate::diff::Change;
use crate::escape::JsonBytes;

/// Identifies the JSON format of [`VerifyReport`].
pub const SCHEMA: &str = "driftwatch.verify-packages.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// The file is not there.
    Missing,
    /// Content, type, mode, owner, size or link target differ from what the package recorded.
    Modified,
    /// The file could not be checked (with the reason).
    Unverifiable,
}

/// A package file that does not match its package.
#[derive(Debug, Clone, Serialize)]
pub struct PackageFinding {
    pub path: JsonBytes,
    /// `name:arch` of the owning package.
    pub package: String,
    pub kind: FindingKind,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub config: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub schema: &'static str,
    pub root: String,
    pub package_manager: &'static str,
    pub packages: usize,
    pub files_checked: usize,
    pub conffiles_checked: bool,
    pub duration_ms: u64,
    pub clean: bool,
    pub notes: Vec<String>,
    /// Sorted by path.
    pub findings: Vec<PackageFinding>,
}

fn digest_of(file: &mut File, expected: &Digest) -> std::io::Result<Digest> {
    let mut buf = vec![0u8; 1 << 16];
    macro_rules! run {
        ($update:expr, $finish:expr) => {{
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                $update(&buf[..n]);
            }
            $finish
        }};
    }
    Ok(match expected {
        Digest::Md5(_) => {
            use md5::Digest as _;
            let mut h = md5::Md5::new();
            run!(|b: &[u8]| h.update(b), {
                let mut out = [0u8; 16];
                out.copy_from_slice(&h.finalize());
                Digest::Md5(out)
            })
        }
        other => {
            let alg = match other {
                Digest::Sha1(_) => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                Digest::Sha256(_) => &ring::digest::SHA256,
                Digest::Sha384(_) => &ring::digest::SHA384,
                _ => &ring::digest::SHA512,
            };
            let mut ctx = ring::digest::Context::new(alg);
            run!(|b: &[u8]| ctx.update(b), {
                let d = ctx.finish();
                let b = d.as_ref();
                match other {
                    Digest::Sha1(_) => Digest::Sha1(b.try_into().unwrap_or([0; 20])),
                    Digest::Sha256(_) => Digest::Sha256(b.try_into().unwrap_or([0; 32])),
                    Digest::Sha384(_) => Digest::Sha384(b.try_into().unwrap_or([0; 48])),
                    _ => Digest::Sha512(b.try_into().unwrap_or([0; 64])),
                }
            })
        }
    })
}

/// Names of users and groups as the root's own /etc/passwd and /etc/group define them.
#[derive(Debug, Default)]
struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn read(root: &Path) -> Names {
        let parse = |file: &str| {
            let mut m = HashMap::new();
            if let Ok(text) = std::fs::read_to_string(root.join(file)) {
                for line in text.lines() {
                    let mut f = line.split(':');
                    if let (Some(name), Some(_), Some(id)) = (f.next(), f.next(), f.next())
                        && let Ok(id) = id.parse::<u32>()
                    {
                        m.entry(id).or_insert_with(|| name.to_string());
                    }
                }
            }
            m
        };
        let (mut users, mut groups) = (parse("etc/passwd"), parse("etc/group"));
        // rpm and dpkg both treat "root" as id 0 whatever the databases say.
        users.entry(0).or_insert_with(|| "root".to_string());
        groups.entry(0).or_insert_with(|| "root".to_string());
        Names { users, groups }
    }
}

struct Checker<'a> {
    root_fd: std::os::fd::OwnedFd,
    names: &'a Names,
}

impl Checker<'_> {
    fn check(&self, f: &PackageFile, package: &str) -> Option<PackageFinding> {
        let finding = |kind, changes, reason| PackageFinding {
            path: JsonBytes(f.path.clone()),
            package: package.to_string(),
            kind,
            config: f.config,
            changes,
            reason,
        };
        let rel = f.path.strip_prefix(b"/").unwrap_or(&f.path);
        let rel = if rel.is_empty() { &b"."[..] } else { rel };
        let how = OpenHow::new()
            // openat2 accepts only these flags together with O_PATH.
            .flags(OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
        // O_PATH first: it opens symlinks, FIFOs and devices without side effects, so the
        // type can be checked before anything is read.
        let pfd = match nix::fcntl::openat2(
            self.root_fd.as_fd(),
            std::ffi::OsStr::from_bytes(rel),
            how,
        ) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {
                return Some(finding(FindingKind::Missing, vec![], None));
            }
            Err(e) => {
                return Some(finding(
                    FindingKind::Unverifiable,
                    vec![],
                    Some(format!("cannot open: {}", e.desc())),
                ));
            }
        };
        let st = match nix::sys::stat::fstat(&pfd) {
            Ok(m) => m,
            Err(e) => {
                return Some(finding(
                    FindingKind::Unverifiable,
                    vec![],
                    Some(format!("cannot stat: {}", e.desc())),
                ));
            }
        };
        let mut changes = Vec::new();
        let actual_type = st.st_mode & 0o170000;
        let (is_file, is_symlink) = (actual_type == 0o100000, actual_type == 0o120000);
        let actual_mode = st.st_mode & 0o7777;
        let type_name = |t: u32| match t {
            0o100000 => "file",
            0o040000 => "directory",
            0o120000 => "symlink",
            0o010000 => "fifo",
            0o140000 => "socket",
            0o060000 => "block_device",
            0o020000 => "char_device",
            _ => "unknown",
        };
        let expected_type = f.file_type.or_else(|| f.digest.as_ref().map(|_| 0o100000));
        if let Some(t) = expected_type
            && t != actual_type
        {
            changes.push(Change {
                attribute: "type".into(),
                before: type_name(t).into(),
                after: type_name(actual_type).into(),
            });
            return Some(finding(FindingKind::Modified, changes, None));
        }
        if let Some(m) = f.mode
            && m != actual_mode
            && !is_symlink
        {
            changes.push(Change {
                attribute: "mode".into(),
                before: format!("{m:04o}"),
                after: format!("{actual_mode:04o}"),
            });
        }
        let name_of = |map: &HashMap<u32, String>, id: u32| {
            map.get(&id).cloned().unwrap_or_else(|| id.to_string())
        };
        if let Some(u) = &f.user {
            let actual = name_of(&self.names.users, st.st_uid);
            if *u != actual {
                changes.push(Change {
                    attribute: "user".into(),
                    before: u.clone(),
                    after: actual,
                });
            }
        }
        if let Some(g) = &f.group {
            let actual = name_of(&self.names.groups, st.st_gid);
            if *g != actual {
                changes.push(Change {
                    attribute: "group".into(),
                    before: g.clone(),
                    after: actual,
                });
            }
        }
        if let Some(target) = &f.link_target
            && is_symlink
        {
            // The O_PATH descriptor is the link itself: reading it resolves nothing.
            match nix::fcntl::readlinkat(pfd.as_fd(), "") {
                Ok(t) if t.as_bytes() == target.as_slice() => {}
                Ok(t) => changes.push(Change {
                    attribute: "target".into(),
                    before: crate::escape::bytes(target),
                    after: crate::escape::bytes(t.as_bytes()),
                }),
                Err(e) => {
                    return Some(finding(
                        FindingKind::Unverifiable,
                        changes,
                        Some(format!("cannot read link: {}", e.desc())),
                    ));
                }
            }
        }
        if let Some(size) = f.size
            && is_file
            && size != st.st_size as u64
        {
            changes.push(Change {
                attribute: "size".into(),
                before: size.to_string(),
                after: st.st_size.to_string(),
            });
        }
        if let Some(expected) = &f.digest
            && is_file
            && !f.ghost
        {
            let how = OpenHow::new()
                .flags(
                    OFlag::O_RDONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_NONBLOCK
                        | OFlag::O_CLOEXEC
                        | OFlag::O_NOCTTY,
                )
                .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
            let got =
                nix::fcntl::openat2(self.root_fd.as_fd(), std::ffi::OsStr::from_bytes(rel), how)
                    .map_err(|e| e.desc().to_string())
                    .and_then(|fd| {
                        let mut file = File::from(fd);
                        let before = file.metadata().map_err(|e| e.to_string())?;
                        if before.ino() != st.st_ino || before.dev() != st.st_dev {
                            return Err("replaced while being checked".to_string());
                        }
                        digest_of(&mut file, expected).map_err(|e| e.to_string())
                    });
            match got {
                Ok(d) if d == *expected => {}
                Ok(d) => changes.push(Change {
                    attribute: "content".into(),
                    before: expected.display(),
                    after: d.display(),
                }),
                Err(reason) => {
                    return Some(finding(FindingKind::Unverifiable, changes, Some(reason)));
                }
            }
        }
        if changes.is_empty() {
            None
        } else {
            Some(finding(FindingKind::Modified, changes, None))
        }
    }
}

/// Checks every file of every package in `manifest` under `root`. Conffiles are checked only
/// when `conffiles` is set.
pub fn verify(
    root: &Path,
    manifest: &Manifest,
    conffiles: bool,
    threads: usize,
) -> Result<VerifyReport, PackageError> {
    let started = Instant::now();
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| PackageError::Io {
        path: root.to_path_buf(),
        source: e.into(),
    })?;
    let names = Names::read(root);
    let checker = Checker {
        root_fd,
        names: &names,
    };
    let mut work: Vec<(&PackageFile, String)> = Vec::new();
    for p in &manifest.packages {
        let key = p.key();
        for f in &p.files {
            let verifiable = f.digest.is_some()
                || f.mode.is_some()
                || f.user.is_some()
                || f.link_target.is_some();
            if !verifiable || (f.config && !conffiles) || f.ghost {
                continue;
            }
            work.push((f, key.clone()));
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| PackageError::Other(format!("cannot start the thread pool: {e}")))?;
    let mut findings: Vec<PackageFinding> = pool.install(|| {
        work.par_iter()
            .filter_map(|(f, key)| checker.check(f, key))
            .collect()
    });
    findings.sort_by(|a, b| a.path.0.cmp(&b.path.0).then(a.package.cmp(&b.package)));
    Ok(VerifyReport {
        schema: SCHEMA,
        root: root.display().to_string(),
        package_manager: manifest.manager.as_str(),
        packages: manifest.packages.len(),
        files_checked: work.len(),
        conffiles_checked: conffiles,
        duration_ms: started.elapsed().as_millis() as u64,
        clean: findings.is_empty(),
        notes: manifest.notes.clone(),
        findings,
    })
}

impl VerifyReport {
    pub fn render_text(&self) -> String {
        use std::fmt::Write as _;
        let mut s = String::new();
        for f in &self.findings {
            let kind = match f.kind {
                FindingKind::Missing => "missing",
                FindingKind::Modified => "modified",
                FindingKind::Unverifiable => "unverifiable",
            };
            let conf = if f.config {
                " (configuration file)"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "{kind:<13} {}  [{}]{conf}",
                crate::escape::bytes(&f.path.0),
                crate::escape::bytes(f.package.as_bytes())
            );
            crate::report::write_details(&mut s, &f.changes, f.reason.as_deref());
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        let _ = writeln!(
            s,
            "{}: {} package(s), {} file(s) checked{} in {:.2} s; {} finding(s)",
            if self.clean { "clean" } else { "DRIFT" },
            self.packages,
            self.files_checked,
            if self.conffiles_checked {
                " including configuration files"
            } else {
                ""
            },
            self.duration_ms as f64 / 1000.0,
            self.findings.len()
        );
        s
    }
}
