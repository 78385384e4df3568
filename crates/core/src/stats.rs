//! Order statistics of measurements: the quantiles the CLI's load runs and the benchmarks report.

/// The value at quantile `q` (0..=1, clamped) of `sorted` (ascending), by nearest rank: the
/// smallest value with at least a fraction `q` of the values at or below it. `None` when empty.
///
/// ```
/// use streamfarm_core::stats::quantile;
/// let v: Vec<u32> = (1..=10).collect();
/// assert_eq!(quantile(&v, 0.5), Some(5));
/// assert_eq!(quantile(&v, 0.99), Some(10));
/// ```
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), Some(50.0));
        assert_eq!(quantile(&v, 0.99), Some(99.0));
        assert_eq!(quantile(&v, 1.0), Some(100.0));
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile::<f64>(&[], 0.5), None);
    }

    #[test]
    fn out_of_range_quantiles_are_the_extremes() {
        let ms: Vec<Duration> = (1..=10).map(Duration::from_millis).collect();
        assert_eq!(quantile(&ms, 0.5), Some(Duration::from_millis(5)));
        assert_eq!(quantile(&ms, -1.0), Some(Duration::from_millis(1)));
        assert_eq!(quantile(&ms, 2.0), Some(Duration::from_millis(10)));
        assert_eq!(quantile(&ms, f64::NAN), Some(Duration::from_millis(1)));
    }
}
