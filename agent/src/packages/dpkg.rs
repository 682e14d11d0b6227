//! dpkg database reader (being written).
use std::path::Path;

use super::{Manifest, PackageError};

pub fn read(root: &Path) -> Result<Manifest, PackageError> {
    Err(PackageError::Other(format!("dpkg reader not available yet for {}", root.display())))
}
