//! The revoked-serial cache. Every call that needs a client certificate checks the serial
//! against it, and every open report stream watches it, so revoking a host (possibly from
//! another process, `driftwatch-collector host revoke`) closes its streams within one refresh
//! period (at most 30 s).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::ca::unix_ms;
use crate::storage::{Storage, StorageError};

/// Revoked certificate serials, as last read from storage.
pub type RevokedSerials = Arc<HashSet<Vec<u8>>>;

/// A handle on the cache; cheap to clone. Streams `subscribe` to be woken on changes.
#[derive(Debug, Clone)]
pub struct Revocations {
    rx: watch::Receiver<RevokedSerials>,
}

impl Revocations {
    /// Loads the current set (so nothing is served before it is known) and starts a task that
    /// refreshes it every `period` until `shutdown` turns true.
    pub async fn start(
        store: Arc<dyn Storage>,
        period: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Revocations, StorageError> {
        let initial = load(store.as_ref()).await?;
        // A watch channel: readers only ever need the newest set, and `changed()` wakes the
        // streams that must re-check their serial.
        let (tx, rx) = watch::channel(initial);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = crate::server::stop_requested(&mut shutdown) => return,
                }
                match load(store.as_ref()).await {
                    Ok(set) => {
                        tx.send_if_modified(|cur| {
                            if **cur == *set {
                                false
                            } else {
                                *cur = set;
                                true
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "refreshing revoked certificates failed"),
                }
            }
        });
        Ok(Revocations { rx })
    }

    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.rx.borrow().contains(serial)
    }

    /// A receiver that is woken whenever the set changes.
    pub fn subscribe(&self) -> watch::Receiver<RevokedSerials> {
        self.rx.clone()
    }
}

async fn load(store: &dyn Storage) -> Result<RevokedSerials, StorageError> {
    let serials = store.revoked_serials(unix_ms(SystemTime::now())).await?;
    Ok(Arc::new(serials.into_iter().collect()))
}
