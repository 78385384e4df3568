//! Wall-clock instants as the farm's lists, frames and tickets carry them: milliseconds since the
//! Unix epoch. The caller reads the clock (`SystemTime::now()`) and passes it in, so this crate
//! stays free of time and its users convert in one way.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch at `at`: 0 for an instant before 1970, `u64::MAX` past the
/// year 584 million.
///
/// ```
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use streamfarm_core::time::unix_ms;
/// assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)), 1_700_000_000_123);
/// assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
/// ```
pub fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
