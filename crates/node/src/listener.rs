//! The accept loop of the HTTP/WebSocket listener: deadlines and descriptors.
//!
//! hyper serves each connection (HTTP/1.1, with upgrades for the WebSockets), with two bounds an
//! outsider cannot lift:
//! - **A deadline for each request head** (`handshake_timeout_ms`): a connection that sends
//!   nothing, or its head a byte at a time (slowloris), or idles between keep-alive requests, is
//!   closed when it passes. A WebSocket, once upgraded, is the session's: its heartbeat timeout
//!   closes a silent client.
//! - **Descriptors kept for the node itself.** Each connection is a descriptor, and a node out of
//!   descriptors can answer nothing, `/healthz` included. So streaming connections are capped
//!   below the process's descriptor limit ([`stream_limit`]), and connections that are not
//!   (yet) WebSockets — HTTP requests, handshakes in progress — share [`http_slots`] slots: when
//!   they are all taken, the oldest is closed for the new one, so a flood of silent
//!   connections cannot keep `/healthz` or the admin API out for longer than it takes them to
//!   be answered.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Descriptors kept for everything but client connections: relay links, gossip, DNS, files.
const RESERVED_FDS: u64 = 128;
/// How long shutdown waits for HTTP requests in progress.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Pause after a failed accept (out of descriptors, usually), so as not to spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The soft limit on open descriptors of this process, where the platform tells it.
pub(crate) fn descriptor_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Slots for connections that are not WebSockets, for a descriptor limit of `fds`.
pub(crate) fn http_slots(fds: Option<u64>) -> usize {
    fds.map_or(4096, |fds| (fds / 16).clamp(64, 4096) as usize)
}

/// The most streaming connections this node can hold: `max_connections`, lowered so that
/// `/healthz`, admin and the links between nodes always find a descriptor.
pub(crate) fn stream_limit(max_connections: usize, fds: Option<u64>) -> usize {
    let Some(fds) = fds else {
        return max_connections;
    };
    let room = fds.saturating_sub(RESERVED_FDS + http_slots(Some(fds)) as u64);
    let limit = max_connections.min(room.max(1) as usize);
    if limit < max_connections {
        warn!(
            max_connections,
            streaming_connections = limit,
            descriptor_limit = fds,
            "max_connections lowered to fit the descriptor limit (ulimit -n), with descriptors kept for HTTP, admin and the links between nodes"
        );
    }
    limit
}

/// Connections not upgraded to WebSockets, oldest first.
struct Slots {
    max: usize,
    open: Mutex<VecDeque<(u64, CancellationToken)>>,
}

impl Slots {
    /// Takes a slot for connection `id`, closing the oldest connection if none is free.
    fn take(&self, id: u64) -> CancellationToken {
        let token = CancellationToken::new();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= self.max
            && let Some((_, oldest)) = open.pop_front()
        {
            oldest.cancel();
        }
        open.push_back((id, token.clone()));
        token
    }

    fn give_back(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = open.iter().position(|(i, _)| *i == id) {
            open.remove(at);
        }
    }
}

/// Serves `router` on `listener` until `cancel` fires; see the module docs.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    head_timeout: Duration,
    slots: usize,
    cancel: CancellationToken,
) {
    let connections = TaskTracker::new();
    let slots = Arc::new(Slots {
        max: slots.max(1),
        open: Mutex::default(),
    });
    let mut next_id = 0u64;
    let mut accept_failures = 0u64;
    loop {
        let (tcp, remote) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    accept_failures += 1;
                    if accept_failures.is_power_of_two() {
                        warn!(error = %err, failures = accept_failures, "cannot accept a connection");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        // Frames are small and latency matters: no Nagle delay.
        if let Err(err) = tcp.set_nodelay(true) {
            warn!(error = %err, "cannot set TCP_NODELAY");
        }
        next_id += 1;
        let id = next_id;
        let evicted = slots.take(id);
        let slots = slots.clone();
        let service = TowerToHyperService::new(router.clone());
        let stop = cancel.clone();
        connections.spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(head_timeout);
            let mut connection = pin!(
                builder
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
            );
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(err) = result {
                        debug!(%remote, error = %err, "HTTP connection ended");
                    }
                }
                _ = evicted.cancelled() => {
                    debug!(%remote, "closed: the oldest of too many HTTP connections");
                }
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection.as_mut()).await;
                }
            }
            slots.give_back(id);
        });
    }
    connections.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE * 2, connections.wait()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_leave_descriptors_for_the_node() {
        assert_eq!(stream_limit(100_000, None), 100_000);
        assert_eq!(http_slots(Some(1024)), 64);
        assert_eq!(stream_limit(100_000, Some(1024)), 1024 - 128 - 64);
        assert_eq!(stream_limit(10, Some(1024)), 10);
        assert_eq!(stream_limit(100_000, Some(100)), 1);
    }

    #[test]
    fn the_oldest_connection_gives_up_its_slot() {
        let slots = Slots {
            max: 2,
            open: Mutex::default(),
        };
        let first = slots.take(1);
        let second = slots.take(2);
        slots.give_back(2);
        let third = slots.take(3);
        assert!(!first.is_cancelled() && !second.is_cancelled());
        let _fourth = slots.take(4);
        assert!(first.is_cancelled(), "the oldest is closed for the newest");
        assert!(!third.is_cancelled());
    }
}
