//! Configuration files in layers, as the agent and the collector both read them: the main TOML
//! file, then every `*.toml` of its drop-in directory (`agent.toml` → `agent.d/`) in lexical
//! order of file names, each merged over what came before ([`merge_tables`]: tables key by key,
//! every other value replaced); and key files that systemd may pass as credentials instead
//! ([`credential_or`]). One implementation, so the two daemons can never layer differently.

use std::path::{Path, PathBuf};

/// Why the layers could not be read. Each daemon words it in its own configuration error.
#[derive(Debug)]
pub enum LayerError {
    /// The drop-in directory exists but cannot be listed.
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file cannot be read.
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file is not TOML.
    Parse {
        path: PathBuf,
        error: toml::de::Error,
    },
}

/// The drop-in directory of a configuration file: `agent.toml` → `agent.d`, beside it.
pub fn drop_in_dir(path: &Path) -> PathBuf {
    path.with_extension("d")
}

/// `path`, then every `*.toml` of [`drop_in_dir`] that is not hidden, in lexical order of their
/// names. A missing drop-in directory is no error.
pub fn files(path: &Path) -> Result<Vec<PathBuf>, LayerError> {
    let mut files = vec![path.to_path_buf()];
    let dir = drop_in_dir(path);
    let list_error = |source| LayerError::List {
        path: dir.clone(),
        source,
    };
    match std::fs::read_dir(&dir) {
        Ok(entries) => {
            let mut drop_ins = Vec::new();
            for e in entries {
                let p = e.map_err(list_error)?.path();
                let hidden = p
                    .file_name()
                    .is_some_and(|n| n.as_encoded_bytes().starts_with(b"."));
                if p.extension().is_some_and(|x| x == "toml") && !hidden {
                    drop_ins.push(p);
                }
            }
            drop_ins.sort();
            files.extend(drop_ins);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(list_error(e)),
    }
    Ok(files)
}

/// Reads [`files`] and merges them into one table. `check` sees each file's text first, so a
/// daemon can refuse an unknown key naming the file it is in. A missing main file is an error.
pub fn load<E: From<LayerError>>(
    path: &Path,
    mut check: impl FnMut(&Path, &str) -> Result<(), E>,
) -> Result<toml::Table, E> {
    let mut merged = toml::Table::new();
    for f in files(path)? {
        let text = std::fs::read_to_string(&f).map_err(|source| LayerError::Read {
            path: f.clone(),
            source,
        })?;
        check(&f, &text)?;
        let table: toml::Table = text
            .parse()
            .map_err(|error| LayerError::Parse { path: f, error })?;
        merge_tables(&mut merged, table);
    }
    Ok(merged)
}

/// Merges `over` into `base`: tables merge key by key, every other value (arrays too) is
/// replaced.
pub fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// `<credentials>/<file name of path>` when the service manager passed a credential of that
/// name, else `path` itself.
pub fn credential_or(path: &Path, credentials: Option<&Path>) -> PathBuf {
    if let (Some(dir), Some(name)) = (credentials, path.file_name()) {
        let c = dir.join(name);
        if c.is_file() {
            return c;
        }
    }
    path.to_path_buf()
}

/// The credentials directory systemd gave this process (`$CREDENTIALS_DIRECTORY`), if any.
pub fn credentials_dir() -> Option<PathBuf> {
    std::env::var_os("CREDENTIALS_DIRECTORY")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}
