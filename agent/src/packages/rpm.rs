//! rpm database reader (being written).
use std::path::Path;

use super::{Manifest, PackageError};

pub fn database_present(_root: &Path) -> bool {
    false
}

pub fn read(root: &Path) -> Result<Manifest, PackageError> {
    Err(PackageError::Other(format!("rpm reader not available yet for {}", root.display())))
}
