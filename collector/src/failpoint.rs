//! Fault injection for the end-to-end fault tests. Built with the cargo feature `failpoints`,
//! `DRIFTWATCH_FAILPOINTS=name[,name...]` makes the process `abort()` when it reaches a named
//! point; without the feature [`hit`] is an empty inline function.
//!
//! Points:
//! - `collector-after-commit-before-ack`: a group commit returned, no ack sent yet (the agent
//!   must resend, the collector must report the resend as a duplicate).

/// The process aborts here if `name` is enabled.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) {
    use std::sync::OnceLock;
    static ENABLED: OnceLock<Vec<String>> = OnceLock::new();
    let enabled = ENABLED.get_or_init(|| {
        std::env::var("DRIFTWATCH_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    if enabled.iter().any(|e| e == name) {
        eprintln!("driftwatch-collector: failpoint {name} reached, aborting");
        std::process::abort();
    }
}

/// The process aborts here if `name` is enabled (never: built without `failpoints`).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) {}
