//! Storage of the image registry: every baseline pushed for an image id, checked by
//! `crate::registry::verify_push` before it gets here. The newest version of an image id is
//! its registered baseline; a push whose version is not newer is refused inside the same
//! transaction that would record it, so two concurrent pushes cannot both win.

use super::StoreFuture;
use super::audit::AuditEntry;

/// One registered baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredBaseline {
    pub image_id: String,
    pub image_version: String,
    pub merkle_root: [u8; 32],
    /// Fingerprint of the trusted key that signed it.
    pub signer: String,
    pub created_unix: i64,
    pub expires_unix: Option<i64>,
    pub entry_count: u64,
    pub pushed_ms: i64,
    /// Who pushed it (`token:<id>`, `local:<user>`).
    pub actor: String,
}

/// The registry part of the collector's storage.
pub trait RegistryStore: Send + Sync {
    /// Records `b` with `audit` in one transaction. `Conflict` when its version is not newer
    /// (`crate::registry::compare_versions`) than every registered version of its image id.
    fn register_baseline(&self, b: RegisteredBaseline, audit: AuditEntry) -> StoreFuture<'_, ()>;
    /// Every registered baseline, by image id, newest version first.
    fn registered_baselines(&self) -> StoreFuture<'_, Vec<RegisteredBaseline>>;
}

/// Sorts baselines by image id, newest version first (the order `registered_baselines`
/// returns, computed in Rust because SQL cannot order by the registry's version order).
pub(crate) fn sort_newest_first(v: &mut [RegisteredBaseline]) {
    v.sort_by(|a, b| {
        a.image_id
            .cmp(&b.image_id)
            .then_with(|| crate::registry::compare_versions(&b.image_version, &a.image_version))
    });
}

/// The `Conflict` error of a push that is not newer than `newest`.
pub(crate) fn check_newer(
    b: &RegisteredBaseline,
    versions: &[String],
) -> Result<(), super::StorageError> {
    if let Some(newest) = versions
        .iter()
        .max_by(|x, y| crate::registry::compare_versions(x, y))
        && crate::registry::compare_versions(&b.image_version, newest)
            != std::cmp::Ordering::Greater
    {
        return Err(super::StorageError::Conflict(format!(
            "image {:?} version {:?} is not newer than the registered version {:?}",
            b.image_id, b.image_version, newest
        )));
    }
    Ok(())
}
