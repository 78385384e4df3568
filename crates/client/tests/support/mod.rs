//! What the client's integration tests share: waiting for a condition with a deadline.

use std::time::Duration;

use tokio::time::Instant;

/// Waits until `check` holds, polling every 20 ms; fails the test, naming `what`, when it does not
/// within `within`.
pub(crate) async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
