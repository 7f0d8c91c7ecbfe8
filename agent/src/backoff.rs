//! Capped exponential backoff with jitter: the one rule every retry loop in the agent uses.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The bounds the agent's config sets.
    pub fn of(config: &crate::config::AgentConfig) -> Backoff {
        Backoff::new(
            Duration::from_millis(config.lifecycle.min_backoff_ms),
            Duration::from_millis(config.lifecycle.max_backoff_ms),
        )
    }

    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
        }
    }

    /// The wait before retry number `attempt` (0-based): `min * 2^attempt`, capped at `max`, then
    /// scaled by a jitter factor in [0.5, 1.0] so that agents that failed together do not retry
    /// in lockstep. `jitter` is a number in [0, 1).
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        let base = self.min.saturating_mul(factor).min(self.max);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// `delay` with a fresh random jitter.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_doubling_and_caps() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let full: Vec<_> = (0..8).map(|a| b.delay(a, 1.0).as_millis()).collect();
        assert_eq!(full, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
        assert_eq!(b.delay(3, 0.0).as_millis(), 400);
        assert_eq!(b.delay(1000, 0.5), Duration::from_millis(1500));
    }

    #[test]
    fn random_jitter_stays_in_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..10 {
            let d = b.delay_random(attempt);
            let cap = b.delay(attempt, 1.0);
            assert!(
                d >= cap / 2 && d <= cap,
                "{d:?} outside [{:?}, {cap:?}]",
                cap / 2
            );
        }
    }
}
