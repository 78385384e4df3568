//! Exponential backoff with full jitter, capped.
//!
//! Before recovery round `n` (counting the failed rounds since the last good connection, from 0)
//! a client waits a uniformly random time in `[0, min(cap, base · 2^n))` — "full jitter", which
//! spreads a crowd of clients that failed at the same moment over the whole window instead of
//! moving the crowd a fixed distance in time. The RNG is passed in, so tests seed it.
//!
//! ```
//! use std::time::Duration;
//! use rand::SeedableRng;
//! use streamfarm_client::Backoff;
//!
//! let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
//! assert_eq!(backoff.ceiling(0), Duration::from_millis(100));
//! assert_eq!(backoff.ceiling(3), Duration::from_millis(800));
//! assert_eq!(backoff.ceiling(30), Duration::from_secs(2));
//! let mut rng = rand::rngs::StdRng::seed_from_u64(1);
//! assert!(backoff.delay(3, &mut rng) < Duration::from_millis(800));
//! ```

use std::time::Duration;

use rand::Rng;

/// The backoff between recovery rounds: `base` doubles each round up to `cap`, fully jittered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s: the first retries are quick, a farm that is down for long is not
    /// hammered by its clients.
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// A backoff that starts at `base` and never exceeds `cap` (a `cap` below `base` wins).
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff { base, cap }
    }

    /// The first window.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The largest window.
    pub fn cap(&self) -> Duration {
        self.cap
    }

    /// The upper bound of the window before round `round`: `min(cap, base · 2^round)`.
    pub fn ceiling(&self, round: u32) -> Duration {
        // Saturate rather than overflow: past 2^31 the cap has long won anyway.
        let factor = 1u32.checked_shl(round.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A delay drawn uniformly from `[0, ceiling(round))` (zero when the ceiling is zero).
    pub fn delay<R: Rng + ?Sized>(&self, round: u32, rng: &mut R) -> Duration {
        let ceiling = self.ceiling(round);
        if ceiling.is_zero() {
            return Duration::ZERO;
        }
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::new(Duration::from_millis(50), Duration::from_millis(1000));
        let ceilings: Vec<u128> = (0..7).map(|n| b.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, vec![50, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.ceiling(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn jitter_stays_within_the_window_and_uses_all_of_it() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        let mut rng = StdRng::seed_from_u64(42);
        for round in 0..10 {
            let ceiling = b.ceiling(round);
            let draws: Vec<Duration> = (0..2000).map(|_| b.delay(round, &mut rng)).collect();
            assert!(draws.iter().all(|d| *d < ceiling), "round {round}");
            // Full jitter: the draws cover the window, not a band near its top.
            let low = draws.iter().filter(|d| **d < ceiling / 10).count();
            let high = draws.iter().filter(|d| **d > ceiling * 9 / 10).count();
            assert!(
                low > 100 && high > 100,
                "round {round}: {low} low, {high} high"
            );
            let mean = draws.iter().sum::<Duration>() / draws.len() as u32;
            assert!(
                mean > ceiling * 2 / 5 && mean < ceiling * 3 / 5,
                "round {round}"
            );
        }
    }

    #[test]
    fn same_seed_same_delays() {
        let b = Backoff::default();
        let a: Vec<Duration> = {
            let mut rng = StdRng::seed_from_u64(7);
            (0..5).map(|n| b.delay(n, &mut rng)).collect()
        };
        let again: Vec<Duration> = {
            let mut rng = StdRng::seed_from_u64(7);
            (0..5).map(|n| b.delay(n, &mut rng)).collect()
        };
        assert_eq!(a, again);
    }

    #[test]
    fn zero_base_means_no_wait() {
        let b = Backoff::new(Duration::ZERO, Duration::from_secs(1));
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(b.delay(5, &mut rng), Duration::ZERO);
    }
}
