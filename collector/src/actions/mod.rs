//! Rebuild actions: turning a flagged host into a rebuild request, with guard rails.
//!
//! ```text
//! lifecycle: flagged ──▶ dispatcher (decide: limits, cool-down, approval, dry run)
//!                          │ trigger: host → rebuild_requested, action → triggered
//!                          ▼
//!                        executor: webhook POST (Standard Webhooks signature) or command
//!                          │ 2xx / exit 0 → delivered; else retry with backoff → failed
//!                          ▼
//!                        the receiver rebuilds; the successor enrolls (same role, image)
//!                          → host replaced → action completed, slot free
//! ```
//!
//! - [`config`] — the `[actions]` section (raw → validated).
//! - [`webhook`] — Standard Webhooks signing and verification (pure).
//! - [`payload`] — the request body `driftwatch.rebuild.requested` (pure).
//! - [`executor`] — one delivery attempt over HTTP(S) or as a command; the backoff (pure).
//! - [`dispatcher`] — the pure decision of a round ([`dispatcher::decide`]) and the task that
//!   runs rounds under the store's dispatch lock.
//!
//! Actions are stored by `crate::storage::actions` (with an audit record per change) and shown
//! by `GET /api/v1/rebuilds`; operators approve or reject them there. The payload and the
//! receiver's side are documented in `docs/rebuild-actions.md`.

pub mod config;
pub mod dispatcher;
pub mod executor;
pub mod payload;
pub mod webhook;

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::ConfigError;
use crate::storage::Storage;

pub use config::ActionSettings;

/// Loads the executor (secret, CA) and spawns the dispatcher; it stops when `stop` is set.
/// A bad secret or CA file is a configuration error naming its key.
pub fn spawn(
    store: Arc<dyn Storage>,
    settings: ActionSettings,
    stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ConfigError> {
    let executor = executor::Executor::load(&settings)?;
    let dispatcher = dispatcher::Dispatcher::new(store, settings, executor);
    Ok(tokio::spawn(dispatcher.run(stop)))
}
