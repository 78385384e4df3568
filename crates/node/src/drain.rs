//! Paced closing of every connection: draining (`RECONNECT_ELSEWHERE`) and shutdown (`GOING_AWAY`).
//!
//! Closing thousands of connections at once makes their clients reconnect at once — the
//! thundering herd. Instead the connections are closed one by one over a period: the `i`-th of `n`
//! at `(i + u) / n × period` with `u` uniform in `[0, 1)` — evenly paced, each slot jittered so
//! that farms draining together do not synchronise.
//!
//! ```text
//! n = 4, period = 4 s:  |--x-|x---|---x|-x--|   one close per second, each at a random point of its slot
//! ```

use std::time::Duration;

use rand::Rng;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::hub::Closer;

/// When each of `n` closes happens, as offsets from the start, sorted.
pub(crate) fn schedule(n: usize, period: Duration, rng: &mut impl Rng) -> Vec<Duration> {
    (0..n)
        .map(|i| {
            let slot = (i as f64 + rng.random::<f64>()) / n as f64;
            period.mul_f64(slot)
        })
        .collect()
}

/// Closes `closers` paced over `period` with `code`, unless `cancel` fires first.
pub(crate) async fn run(
    closers: Vec<Closer>,
    period: Duration,
    code: u16,
    reason: &'static str,
    cancel: CancellationToken,
) {
    let start = Instant::now();
    let offsets = schedule(closers.len(), period, &mut rand::rng());
    info!(
        connections = closers.len(),
        period_ms = period.as_millis() as u64,
        code,
        "draining"
    );
    for (closer, offset) in closers.into_iter().zip(offsets) {
        tokio::select! {
            _ = cancel.cancelled() => {
                info!("drain cancelled");
                return;
            }
            _ = sleep_until(start + offset) => closer.close(code, reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn closes_are_paced_one_per_slot() {
        let mut rng = StdRng::seed_from_u64(7);
        let period = Duration::from_secs(10);
        let offsets = schedule(5, period, &mut rng);
        assert_eq!(offsets.len(), 5);
        for (i, offset) in offsets.iter().enumerate() {
            assert!(*offset >= period * i as u32 / 5, "{offsets:?}");
            assert!(*offset < period * (i as u32 + 1) / 5, "{offsets:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn every_connection_is_closed_within_the_period() {
        let closers: Vec<Closer> = (0..10).map(|_| Closer::default()).collect();
        let start = Instant::now();
        run(
            closers.clone(),
            Duration::from_secs(5),
            4000,
            "drain",
            CancellationToken::new(),
        )
        .await;
        assert!(start.elapsed() <= Duration::from_secs(5));
        assert!(
            closers
                .iter()
                .all(|c| c.reason().map(|r| r.0) == Some(4000))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_stops_the_drain() {
        let closers: Vec<Closer> = (0..10).map(|_| Closer::default()).collect();
        let cancel = CancellationToken::new();
        cancel.cancel();
        run(
            closers.clone(),
            Duration::from_secs(5),
            4000,
            "drain",
            cancel,
        )
        .await;
        assert!(closers.iter().all(|c| !c.is_closed()));
    }
}
