//! systemd integration: `READY=1`, `STATUS=`, `STOPPING=1` and watchdog pings (`sd-notify`).
//! Every call is a no-op outside systemd (no `NOTIFY_SOCKET`).
//!
//! Watchdog pings come from real progress, never from a free-running timer: the event loops
//! ping on their own ticks, and only while the scan thread is not stalled (a scan that made no
//! progress for a whole watchdog interval lets systemd restart the agent).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;

/// Shared between the scan thread and the event loops.
#[derive(Debug)]
pub struct Liveness {
    /// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
    watchdog: Option<Duration>,
    scanning: AtomicBool,
    /// Monotonic-ish milliseconds (wall clock is fine: only differences matter) of the scan
    /// thread's last progress.
    last_progress_ms: AtomicI64,
    ready: AtomicBool,
}

fn now_ms() -> i64 {
    crate::time::now_unix_ns() / 1_000_000
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new()
    }
}

impl Liveness {
    pub fn new() -> Liveness {
        let mut usec = 0u64;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        Liveness {
            watchdog,
            scanning: AtomicBool::new(false),
            last_progress_ms: AtomicI64::new(now_ms()),
            ready: AtomicBool::new(false),
        }
    }

    /// How often the event loops should tick to keep the watchdog fed.
    pub fn tick_interval(&self) -> Duration {
        self.watchdog.map_or(Duration::from_secs(10), |w| {
            (w / 3).max(Duration::from_millis(200))
        })
    }

    /// The scan thread started or finished a scan.
    pub fn set_scanning(&self, on: bool) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
        self.scanning.store(on, Ordering::Relaxed);
    }

    /// The scan thread made progress (called per scanned object: only an atomic store).
    pub fn progress(&self) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// An event loop made progress: ping the watchdog unless the scan is stalled.
    pub fn tick(&self) {
        let Some(w) = self.watchdog else { return };
        let stalled = self.scanning.load(Ordering::Relaxed)
            && now_ms() - self.last_progress_ms.load(Ordering::Relaxed) > w.as_millis() as i64;
        if !stalled {
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    }

    /// `READY=1`, once.
    pub fn ready(&self) {
        if !self.ready.swap(true, Ordering::Relaxed) {
            let _ = sd_notify::notify(false, &[NotifyState::Ready]);
        }
    }
}

/// `STATUS=...`
pub fn status(text: &str) {
    let _ = sd_notify::notify(false, &[NotifyState::Status(text)]);
}

/// `STOPPING=1`
pub fn stopping() {
    let _ = sd_notify::notify(
        false,
        &[NotifyState::Stopping, NotifyState::Status("stopping")],
    );
}
