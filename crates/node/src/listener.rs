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
//!   below the process's descriptor limit ([`stream_limit`]: [`RESERVED_FDS`] and
//!   [`MIN_HTTP_SLOTS`] are never theirs), and connections that are not (yet) WebSockets — HTTP
//!   requests, upgrades in progress — may use the descriptors the streams leave (an event stream,
//!   `GET /sse`, leaves their count as it starts: [`HttpSlot`]; on a plain connection it is
//!   served past hyper, `crate::sse::serve_plain`). Only when those
//!   run out is the oldest of them closed for the new one: a flood of silent connections cannot
//!   keep `/healthz` or the admin API out, and a storm of clients reconnecting at once, with
//!   descriptors to spare, loses none.
//! - **TLS under the same bounds.** On a node with a certificate, a connection whose first byte
//!   opens a TLS handshake is taken through it within the same deadline and served the whole
//!   router, every request carrying the connection's [`TlsInfo`]; any other connection is served
//!   the plain router (`/healthz`, and "use TLS" for the rest). A handshake in progress holds a
//!   slot like any connection that is not yet a WebSocket.

use std::collections::VecDeque;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::{Extension, Router};
use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::tls::TlsInfo;

/// Descriptors kept for everything but client connections: relay links, gossip, DNS, files.
pub(crate) const RESERVED_FDS: u64 = 128;
/// Descriptors streams never take: plain HTTP (`/healthz`, admin, publish) always has these.
pub(crate) const MIN_HTTP_SLOTS: u64 = 64;
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

/// How many connections that are not WebSockets fit now, for a descriptor limit of `fds` with
/// `streams` streaming connections open.
pub(crate) fn http_room(fds: Option<u64>, streams: usize) -> usize {
    match fds {
        None => usize::MAX,
        Some(fds) => (fds.saturating_sub(RESERVED_FDS + streams as u64) as usize)
            .max(MIN_HTTP_SLOTS as usize),
    }
}

/// The most streaming connections this node can hold: `max_connections`, lowered so that
/// `/healthz`, admin and the links between nodes always find a descriptor.
pub(crate) fn stream_limit(max_connections: usize, fds: Option<u64>) -> usize {
    let Some(fds) = fds else {
        return max_connections;
    };
    let room = fds.saturating_sub(RESERVED_FDS + MIN_HTTP_SLOTS);
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

/// How many connections that are not WebSockets fit now.
pub(crate) type Room = Arc<dyn Fn() -> usize + Send + Sync>;

/// Connections not upgraded to WebSockets, oldest first.
struct Slots {
    room: Room,
    open: Mutex<VecDeque<(u64, CancellationToken)>>,
}

impl Slots {
    /// Takes a slot for connection `id`, closing the oldest connection if none is free.
    fn take(&self, id: u64) -> CancellationToken {
        let token = CancellationToken::new();
        let max = (self.room)().max(1);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while open.len() >= max
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

/// A connection's place among those that are not streams. A request that makes its connection a
/// stream without an upgrade (an event stream, `GET /sse`) gives it back, as an upgrade ends the
/// connection's task: a stream holds its place under the streaming limit instead, and is never
/// closed as the oldest HTTP connection for a new one.
#[derive(Clone)]
pub(crate) struct HttpSlot {
    slots: Arc<Slots>,
    id: u64,
    /// Ends the connection's task, and with it the connection.
    connection: CancellationToken,
}

impl HttpSlot {
    /// The connection is a stream from now on.
    pub(crate) fn give_back(&self) {
        self.slots.give_back(self.id);
    }

    /// Drops the connection now, whatever hyper is waiting for (a client that stopped reading).
    pub(crate) fn close_connection(&self) {
        self.connection.cancel();
    }

    /// Fires when [`HttpSlot::close_connection`] is called (or the connection is evicted).
    pub(crate) fn connection_closed(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.connection.clone().cancelled_owned()
    }
}

/// TLS on the listener: the handshake's settings, and what plain connections are served.
pub(crate) struct Tls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) plain_router: Router,
}

/// A connection as its first bytes sort it.
enum Sorted {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// Peeks at the first byte: a TLS handshake (`0x16`) is run, anything else is plain.
async fn sort(tcp: TcpStream, acceptor: &TlsAcceptor) -> std::io::Result<Sorted> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await? {
        1 if first[0] == 0x16 => Ok(Sorted::Tls(Box::new(acceptor.accept(tcp).await?))),
        _ => Ok(Sorted::Plain(tcp)),
    }
}

/// Serves `router` on `listener` until `cancel` fires; see the module docs.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Tls>,
    head_timeout: Duration,
    room: Room,
    cancel: CancellationToken,
) {
    let tls = tls.map(Arc::new);
    let connections = TaskTracker::new();
    let slots = Arc::new(Slots {
        room,
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
        let router = router.clone();
        let tls = tls.clone();
        let stop = cancel.clone();
        let slot = HttpSlot {
            slots: slots.clone(),
            id,
            connection: evicted.clone(),
        };
        connections.spawn(async move {
            let served = async {
                let Some(tls) = tls else {
                    // An event stream is written past hyper, without its buffers.
                    let served = crate::sse::serve_plain(tcp, &router, &slot, head_timeout, &stop);
                    let Some(tcp) = served.await else { return };
                    return http(tcp, router, slot, head_timeout, &remote, &stop).await;
                };
                // The handshake has the request head's deadline: a client silent or slow in
                // it is closed like a slowloris.
                match tokio::time::timeout(head_timeout, sort(tcp, &tls.acceptor)).await {
                    Ok(Ok(Sorted::Tls(stream))) => match TlsInfo::of(stream.get_ref().1) {
                        Ok(info) => {
                            let router = router.layer(Extension(Arc::new(info)));
                            http(*stream, router, slot, head_timeout, &remote, &stop).await
                        }
                        Err(why) => debug!(%remote, why, "TLS connection refused"),
                    },
                    Ok(Ok(Sorted::Plain(tcp))) => {
                        let router = tls.plain_router.clone();
                        http(tcp, router, slot, head_timeout, &remote, &stop).await
                    }
                    Ok(Err(err)) => debug!(%remote, error = %err, "TLS handshake failed"),
                    Err(_) => debug!(%remote, "TLS handshake timed out"),
                }
            };
            tokio::select! {
                () = served => {}
                _ = evicted.cancelled() => {
                    debug!(%remote, "closed: the oldest of too many HTTP connections");
                }
            }
            slots.give_back(id);
        });
    }
    connections.close();
    let _ = tokio::time::timeout(SHUTDOWN_GRACE * 2, connections.wait()).await;
}

/// Serves HTTP/1.1 (with upgrades) on one connection until it ends, or until `stop`, then
/// briefly lets requests in progress finish.
async fn http<Io>(
    io: Io,
    router: Router,
    slot: HttpSlot,
    head_timeout: Duration,
    remote: &std::net::SocketAddr,
    stop: &CancellationToken,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout);
    // Every request can find its connection's slot (see [`HttpSlot`]).
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(slot.clone());
        let mut router = router.clone();
        async move { tower_service::Service::call(&mut router, request).await }
    });
    let mut connection = pin!(
        builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
    );
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                debug!(%remote, error = %err, "HTTP connection ended");
            }
        }
        _ = stop.cancelled() => {
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection.as_mut()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_leave_descriptors_for_the_node() {
        assert_eq!(stream_limit(100_000, None), 100_000);
        assert_eq!(stream_limit(100_000, Some(1024)), 1024 - 128 - 64);
        assert_eq!(stream_limit(10, Some(1024)), 10);
        assert_eq!(stream_limit(100_000, Some(100)), 1);
        // HTTP gets what streams leave, and never less than its minimum.
        assert_eq!(http_room(Some(20_000), 1_000), 20_000 - 128 - 1_000);
        assert_eq!(http_room(Some(1024), 1024 - 128 - 64), 64);
        assert_eq!(http_room(None, 5), usize::MAX);
    }

    #[test]
    fn the_oldest_connection_gives_up_its_slot() {
        let slots = Slots {
            room: Arc::new(|| 2),
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

    #[test]
    fn a_connection_that_became_a_stream_is_never_closed_for_a_newer_one() {
        let slots = Arc::new(Slots {
            room: Arc::new(|| 2),
            open: Mutex::default(),
        });
        let stream = slots.take(1);
        HttpSlot {
            slots: slots.clone(),
            id: 1,
            connection: stream.clone(),
        }
        .give_back();
        for id in 2..10 {
            slots.take(id);
        }
        assert!(!stream.is_cancelled());
    }
}
