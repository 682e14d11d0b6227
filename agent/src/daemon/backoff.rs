//! Reconnect backoff and scan-interval jitter: pure arithmetic over a caller-supplied random
//! number, so the bounds are testable.

use std::time::Duration;

/// First reconnect delay.
pub const BASE: Duration = Duration::from_millis(500);
/// Longest reconnect delay.
pub const CAP: Duration = Duration::from_secs(60);

/// Exponential backoff with jitter: attempt n waits a random time in [d/2, d] where
/// d = min(CAP, BASE · 2ⁿ). Never zero, never above the cap, and a fleet that lost its collector
/// does not come back in lockstep.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn new() -> Backoff {
        Backoff::default()
    }

    /// The delay before the next attempt; `random` is any uniformly random u32.
    pub fn next_delay(&mut self, random: u32) -> Duration {
        let exp = BASE.saturating_mul(1u32.checked_shl(self.attempt.min(16)).unwrap_or(u32::MAX));
        let d = exp.min(CAP);
        self.attempt = self.attempt.saturating_add(1);
        let half = d / 2;
        half + half.mul_f64(f64::from(random) / f64::from(u32::MAX))
    }

    /// A connection worked: start again from the base delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A scan interval with ±10 % jitter.
pub fn jittered(interval: Duration, random: u32) -> Duration {
    let f = 0.9 + 0.2 * (f64::from(random) / f64::from(u32::MAX));
    interval.mul_f64(f).max(Duration::from_millis(100))
}

/// A random u32 from the system's generator (ring); 0.5 of the range if it fails.
pub fn random_u32() -> u32 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 4];
    match ring::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => u32::from_le_bytes(b),
        Err(_) => u32::MAX / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_within_bounds() {
        for random in [0, u32::MAX / 3, u32::MAX] {
            let mut b = Backoff::new();
            let mut prev_cap = Duration::ZERO;
            for n in 0..100 {
                let d = b.next_delay(random);
                let cap = BASE.saturating_mul(1 << n.min(16)).min(CAP);
                assert!(d >= cap / 2 && d <= cap, "attempt {n}: {d:?} vs {cap:?}");
                assert!(d > Duration::ZERO && d <= CAP);
                assert!(cap >= prev_cap);
                prev_cap = cap;
            }
            assert_eq!(prev_cap, CAP);
            b.reset();
            assert!(b.next_delay(random) <= BASE);
        }
    }

    #[test]
    fn jitter_is_ten_percent() {
        let i = Duration::from_secs(900);
        assert_eq!(jittered(i, 0), Duration::from_secs(810));
        assert_eq!(jittered(i, u32::MAX), Duration::from_secs(990));
        let mid = jittered(i, u32::MAX / 2);
        assert!(mid > Duration::from_secs(890) && mid < Duration::from_secs(910));
    }
}
