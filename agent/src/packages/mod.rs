//! Package manifests: what the package manager of a root says is installed, and which files
//! each package owns with the attributes and checksums the package manager recorded.
//!
//! Two readers fill the same [`Manifest`]: [`dpkg`] (Debian family, `var/lib/dpkg`) and
//! [`rpm`] (RHEL family: the SQLite rpmdb read directly, or the root's own `rpm` program for
//! database formats this crate does not parse). Parsers take bytes and return values or
//! errors naming the file and position; they never panic on any input.

use std::path::{Path, PathBuf};

use serde::Serialize;

pub mod dpkg;
pub mod rpm;
pub mod verify;

/// Which package manager a manifest comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Manager {
    Dpkg,
    Rpm,
}

impl Manager {
    pub fn as_str(self) -> &'static str {
        match self {
            Manager::Dpkg => "dpkg",
            Manager::Rpm => "rpm",
        }
    }
}

/// A checksum the package manager recorded for a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digest {
    Md5([u8; 16]),
    Sha1([u8; 20]),
    Sha256([u8; 32]),
    Sha384([u8; 48]),
    Sha512([u8; 64]),
}

impl Digest {
    /// The algorithm's name as reports show it.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Digest::Md5(_) => "md5",
            Digest::Sha1(_) => "sha1",
            Digest::Sha256(_) => "sha256",
            Digest::Sha384(_) => "sha384",
            Digest::Sha512(_) => "sha512",
        }
    }

    pub fn bytes(&self) -> &[u8] {
        match self {
            Digest::Md5(b) => b,
            Digest::Sha1(b) => b,
            Digest::Sha256(b) => b,
            Digest::Sha384(b) => b,
            Digest::Sha512(b) => b,
        }
    }

    /// `algorithm:hex`.
    pub fn display(&self) -> String {
        let hex: String = self.bytes().iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:{hex}", self.algorithm())
    }
}

/// One file (or directory, or symlink) a package owns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackageFile {
    /// Absolute path inside the root, raw bytes (as in baselines).
    pub path: Vec<u8>,
    /// Content checksum, when the package manager has one (regular files).
    pub digest: Option<Digest>,
    /// Expected permission bits incl. setuid/setgid/sticky (rpm; dpkg statoverride).
    pub mode: Option<u32>,
    /// Expected file type bits (`mode & S_IFMT`), when known (rpm).
    pub file_type: Option<u32>,
    /// Expected owner and group names (rpm; dpkg statoverride).
    pub user: Option<String>,
    pub group: Option<String>,
    /// Expected size (rpm).
    pub size: Option<u64>,
    /// Expected symlink target (rpm).
    pub link_target: Option<Vec<u8>>,
    /// A configuration file (dpkg conffile, rpm `%config`): local changes may be intended.
    pub config: bool,
    /// rpm `%ghost` and similar: owned but not shipped, so content is not verifiable.
    pub ghost: bool,
}

/// One package in the database.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Package {
    pub name: String,
    /// The full version: dpkg `[epoch:]upstream[-revision]`, rpm `[epoch:]version-release`.
    pub version: String,
    pub arch: String,
    /// The package manager's state: dpkg's third `Status` word (`installed`, `config-files`,
    /// `half-installed`, `unpacked`, `half-configured`, `triggers-awaited`,
    /// `triggers-pending`); always `installed` for rpm.
    pub state: String,
    pub files: Vec<PackageFile>,
}

impl Package {
    /// `name:arch`, the identity of a package across versions.
    pub fn key(&self) -> String {
        format!("{}:{}", self.name, self.arch)
    }
}

/// A dpkg diversion: `from` is shipped by `package` (or was) but lives at `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diversion {
    pub from: Vec<u8>,
    pub to: Vec<u8>,
    /// The diverting package; `None` for a local diversion (`:`).
    pub package: Option<String>,
}

/// A dpkg statoverride: `path` must have this owner, group and mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatOverride {
    pub path: Vec<u8>,
    pub user: String,
    pub group: String,
    pub mode: u32,
}

/// Everything a root's package database says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub manager: Manager,
    /// Sorted by (name, arch).
    pub packages: Vec<Package>,
    pub diversions: Vec<Diversion>,
    pub stat_overrides: Vec<StatOverride>,
    /// How the database was read when that matters to the reader of a report, e.g. "rpmdb in
    /// Berkeley DB format: read with the root's rpm program".
    pub notes: Vec<String>,
}

/// Why a package database could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {position}: {what}")]
    Parse {
        path: PathBuf,
        position: String,
        what: String,
    },
    #[error("{0}")]
    Other(String),
}

/// Reads the package database of `root`: dpkg if `var/lib/dpkg/status` exists, else rpm if an
/// rpm database exists, else `None` (a root without a package manager).
pub fn read_manifest(root: &Path) -> Result<Option<Manifest>, PackageError> {
    if root.join("var/lib/dpkg/status").is_file() {
        return dpkg::read(root).map(Some);
    }
    if rpm::database_present(root) {
        return rpm::read(root).map(Some);
    }
    Ok(None)
}

/// A root's package database, its packages read and their files read only when asked (see
/// [`read_lazily`]).
#[derive(Debug)]
pub struct LazyManifest {
    /// Until the files are read: the packages without files. Then: everything.
    manifest: Manifest,
    /// What is left to read (dpkg's file lists); `None` once everything is read.
    pending: Option<dpkg::Status>,
}

impl LazyManifest {
    /// The packages, in the order and with the versions and states of the full manifest; their
    /// files, diversions, stat overrides and notes about files are empty until
    /// [`LazyManifest::with_files`].
    pub fn packages(&self) -> &Manifest {
        &self.manifest
    }

    /// The full manifest, as [`read_manifest`] reads it.
    pub fn with_files(self) -> Result<Manifest, PackageError> {
        match self.pending {
            Some(status) => status.with_files(),
            None => Ok(self.manifest),
        }
    }
}

/// Like [`read_manifest`], but for dpkg only `status` and the journal are read now: the file
/// lists (hundreds of files) wait until [`LazyManifest::with_files`], which a check calls only
/// when a file violation needs its owner. An rpm database is read at once (its packages and
/// files come from the same header blobs).
pub fn read_lazily(root: &Path) -> Result<Option<LazyManifest>, PackageError> {
    if root.join("var/lib/dpkg/status").is_file() {
        let status = dpkg::read_status(root)?;
        return Ok(Some(LazyManifest {
            manifest: status.packages_only(),
            pending: Some(status),
        }));
    }
    if rpm::database_present(root) {
        return Ok(Some(LazyManifest {
            manifest: rpm::read(root)?,
            pending: None,
        }));
    }
    Ok(None)
}

/// The inventory of a manifest as baselines store it, sorted by (name, arch, version).
pub fn inventory(m: &Manifest) -> Vec<driftwatch_proto::v1::Package> {
    inventory_with_positions(m).0
}

/// The inventory, and for each package of `m` (in manifest order) its index in that
/// inventory. `name:arch` is not unique (rpm installonly kernels, `gpg-pubkey`), so positions
/// come from the sort itself, never from a search by name.
pub fn inventory_with_positions(m: &Manifest) -> (Vec<driftwatch_proto::v1::Package>, Vec<u32>) {
    let mut order: Vec<usize> = (0..m.packages.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&m.packages[a], &m.packages[b]);
        (&a.name, &a.arch, &a.version).cmp(&(&b.name, &b.arch, &b.version))
    });
    let mut positions = vec![0u32; m.packages.len()];
    let inventory = order
        .iter()
        .enumerate()
        .map(|(rank, &i)| {
            positions[i] = rank as u32;
            let p = &m.packages[i];
            driftwatch_proto::v1::Package {
                name: p.name.clone(),
                version: p.version.clone(),
                arch: p.arch.clone(),
                state: p.state.clone(),
            }
        })
        .collect();
    (inventory, positions)
}

/// Resolves the directories of package paths through the root's own symlinks, so that a
/// package's `/bin/ls` is found at `/usr/bin/ls` when `/bin -> usr/bin` (merged /usr). Symlinks
/// are resolved inside the root (absolute targets are re-rooted), never on the host; the last
/// component is kept as it is.
#[derive(Debug)]
pub struct RootResolver<'r> {
    root: &'r Path,
    dirs: std::collections::HashMap<Vec<u8>, Vec<u8>>,
}

fn normalize(path: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let mut out = Vec::with_capacity(path.len() + 1);
    for p in &parts {
        out.push(b'/');
        out.extend_from_slice(p);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = dir.to_vec();
    if v != b"/" {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

impl<'r> RootResolver<'r> {
    pub fn new(root: &'r Path) -> Self {
        RootResolver {
            root,
            dirs: std::collections::HashMap::new(),
        }
    }

    fn host_path(&self, p: &[u8]) -> PathBuf {
        use std::os::unix::ffi::OsStrExt;
        self.root.join(std::ffi::OsStr::from_bytes(&p[1..]))
    }

    /// The canonical form of directory `dir` (absolute inside the root).
    fn dir(&mut self, dir: &[u8], hops: u32) -> Vec<u8> {
        if dir == b"/" || hops > 40 {
            return dir.to_vec();
        }
        if let Some(c) = self.dirs.get(dir) {
            return c.clone();
        }
        let parent = driftwatch_proto::path::parent(dir).unwrap_or(b"/");
        let parent = self.dir(parent, hops);
        let name = driftwatch_proto::path::file_name(dir);
        let candidate = join(&parent, name);
        let resolved = match std::fs::read_link(self.host_path(&candidate)) {
            Ok(target) => {
                use std::os::unix::ffi::OsStrExt;
                let t = target.as_os_str().as_bytes();
                let next = if t.starts_with(b"/") {
                    normalize(t)
                } else {
                    normalize(&join(&parent, t))
                };
                self.dir(&next, hops + 1)
            }
            Err(_) => candidate,
        };
        self.dirs.insert(dir.to_vec(), resolved.clone());
        resolved
    }

    /// The canonical path of `path`: its directory resolved, its last component kept.
    pub fn resolve(&mut self, path: &[u8]) -> Vec<u8> {
        let normal = normalize(path);
        match driftwatch_proto::path::parent(&normal) {
            None => normal,
            Some(parent) => {
                let name = driftwatch_proto::path::file_name(&normal).to_vec();
                let dir = self.dir(parent, 0);
                join(&dir, &name)
            }
        }
    }
}

/// Which packages own which canonical paths.
#[derive(Debug, Default)]
pub struct Owners {
    /// (canonical path, owner indices into the manifest's packages, is a config file), sorted.
    entries: Vec<(Vec<u8>, Vec<u32>, bool)>,
}

impl Owners {
    /// Builds the owner table of `manifest`, resolving paths inside `root`.
    pub fn build(root: &Path, manifest: &Manifest) -> Owners {
        let mut resolver = RootResolver::new(root);
        let mut flat: Vec<(Vec<u8>, u32, bool)> = Vec::new();
        for (i, p) in manifest.packages.iter().enumerate() {
            for f in &p.files {
                flat.push((resolver.resolve(&f.path), i as u32, f.config));
            }
        }
        flat.sort_unstable();
        let mut entries: Vec<(Vec<u8>, Vec<u32>, bool)> = Vec::new();
        for (path, idx, config) in flat {
            match entries.last_mut() {
                Some(last) if last.0 == path => {
                    if last.1.last() != Some(&idx) {
                        last.1.push(idx);
                    }
                    last.2 |= config;
                }
                _ => entries.push((path, vec![idx], config)),
            }
        }
        Owners { entries }
    }

    /// Owners of a canonical path, and whether it is a config file.
    pub fn get(&self, path: &[u8]) -> Option<(&[u32], bool)> {
        let i = self
            .entries
            .binary_search_by(|e| e.0.as_slice().cmp(path))
            .ok()?;
        Some((&self.entries[i].1, self.entries[i].2))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_through_the_roots_own_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        std::fs::create_dir_all(r.join("usr/bin")).unwrap();
        std::fs::create_dir_all(r.join("usr/lib/x")).unwrap();
        std::os::unix::fs::symlink("usr/bin", r.join("bin")).unwrap();
        // An absolute target is re-rooted, never followed on the host.
        std::os::unix::fs::symlink("/usr/lib", r.join("lib")).unwrap();
        std::os::unix::fs::symlink("../../../etc", r.join("usr/lib/x/up")).unwrap();
        std::os::unix::fs::symlink("loop2", r.join("loop1")).unwrap();
        std::os::unix::fs::symlink("loop1", r.join("loop2")).unwrap();
        let mut res = RootResolver::new(r);
        assert_eq!(res.resolve(b"/bin/ls"), b"/usr/bin/ls");
        assert_eq!(res.resolve(b"/bin"), b"/bin", "the last component is kept");
        assert_eq!(res.resolve(b"/lib/x/file"), b"/usr/lib/x/file");
        assert_eq!(res.resolve(b"/lib/x/up/passwd"), b"/etc/passwd");
        assert_eq!(res.resolve(b"/usr/./bin/../bin/cat"), b"/usr/bin/cat");
        // A symlink loop ends, unresolved, instead of hanging.
        let _ = res.resolve(b"/loop1/x");
    }

    #[test]
    fn inventory_positions_follow_the_sort_even_for_repeated_names() {
        let pkg = |name: &str, version: &str| Package {
            name: name.into(),
            version: version.into(),
            arch: "x86_64".into(),
            state: "installed".into(),
            files: vec![],
        };
        // Two installonly kernels share name and arch.
        let m = Manifest {
            manager: Manager::Rpm,
            packages: vec![pkg("kernel", "6.2"), pkg("bash", "5"), pkg("kernel", "6.1")],
            diversions: vec![],
            stat_overrides: vec![],
            notes: vec![],
        };
        let (inv, pos) = inventory_with_positions(&m);
        let names: Vec<_> = inv
            .iter()
            .map(|p| format!("{}-{}", p.name, p.version))
            .collect();
        assert_eq!(names, ["bash-5", "kernel-6.1", "kernel-6.2"]);
        assert_eq!(pos, [2, 0, 1]);
    }

    #[test]
    fn owners_merge_packages_sharing_a_path() {
        let t = tempfile::tempdir().unwrap();
        let pkg = |name: &str, files: &[&str]| Package {
            name: name.into(),
            version: "1".into(),
            arch: "amd64".into(),
            state: "installed".into(),
            files: files
                .iter()
                .map(|f| PackageFile {
                    path: f.as_bytes().to_vec(),
                    ..Default::default()
                })
                .collect(),
        };
        let m = Manifest {
            manager: Manager::Dpkg,
            packages: vec![
                pkg("a", &["/usr", "/usr/bin/a"]),
                pkg("b", &["/usr", "/usr/bin/b"]),
            ],
            diversions: vec![],
            stat_overrides: vec![],
            notes: vec![],
        };
        let o = Owners::build(t.path(), &m);
        assert_eq!(o.get(b"/usr").unwrap().0, &[0, 1]);
        assert_eq!(o.get(b"/usr/bin/b").unwrap().0, &[1]);
        assert!(o.get(b"/etc").is_none());
    }
}
