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
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {position}: {what}")]
    Parse { path: PathBuf, position: String, what: String },
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
