//! One streaming connection: the WebSocket protocol of `docs/PROTOCOL.md`, server side.
//!
//! A session is one task, polling one socket for both directions (see [`Session`]):
//! - it parses client frames (`hello`, `sub`, `unsub`, `pub`, `list`, `ping`, `pong`), answers
//!   through the send queue, and closes the connection when the client has sent nothing for the
//!   heartbeat timeout;
//! - it writes the bounded send queue into the socket and sends a `ping` whenever it has sent
//!   nothing for the heartbeat interval, so a client can tell a quiet node from a hung one.
//!
//! Anything that ends the connection (slow consumer, drain, heartbeat timeout, oversized frame,
//! shutdown) goes through the session's [`Closer`], which carries the close code it sends.
//! The session counts as a user from the moment it is registered until it starts closing.
//!
//! Memory: an idle subscribed connection is mostly this task, so its state is kept small (see
//! BENCHMARKS.md, "Idle memory per connection"): one timer, no future per node-wide signal
//! ([`follow_node`] pushes those), the rare large states boxed.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use base64::Engine;
use futures_util::{Sink, Stream};
use streamfarm_core::protocol::{ClientFrame, Encoding, Position, ServerFrame, close, feature};
use tokio::time::{Instant, Sleep, sleep_until, timeout};
use tracing::{debug, info};

use crate::Shared;
use crate::auth::{AuthError, Grant, now_s};
use crate::hub::{Closer, ConnId, FrameWakes, Outlet, Resume, Watch, encode};
use crate::metrics;
use crate::queue::{Cost, SendQueue};

/// Longest topic name accepted, in bytes.
pub(crate) const MAX_TOPIC_BYTES: usize = 256;
/// Normal closure (RFC 6455).
const NORMAL: u16 = 1000;
/// Most frames written between two flushes.
const WRITE_BURST: usize = 64;
/// Most bursts written in one wake-up of the task before it lets the others run.
const BURSTS_PER_POLL: usize = 4;
/// Frames every connection starts with (`hello`, `farm`), written one flush each. tungstenite's
/// write buffer keeps the capacity of the largest burst it ever held, and for an idle connection
/// the greeting is its only burst: written together, the two frames would keep a buffer of
/// their summed size (rounded up) alive for the connection's life, about 200 bytes more.
const GREETING_FRAMES: usize = 2;
/// How long the writer may take to flush queued frames and the close frame before it gives up.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Checks a topic name: non-empty, at most [`MAX_TOPIC_BYTES`], no whitespace or control characters.
pub(crate) fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("topic must not be empty".into());
    }
    if topic.len() > MAX_TOPIC_BYTES {
        return Err(format!("topic longer than {MAX_TOPIC_BYTES} bytes"));
    }
    if topic.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "topic {topic:?} contains whitespace or control characters"
        ));
    }
    Ok(())
}

/// Refuses a connection that was upgraded only to be told why: full, draining or down.
pub(crate) async fn refuse(mut socket: WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = timeout(CLOSE_FLUSH, socket.send(Message::Close(Some(frame)))).await;
}

/// Refuses a connection for its credentials, and reads until the client's close (for at most
/// [`CLOSE_FLUSH`]) so that what it sent meanwhile does not make the kernel reset the
/// connection before the client has read why.
async fn refuse_auth(socket: &mut WebSocket, shared: &Shared, err: &AuthError) {
    if matches!(err, AuthError::Forbidden(_)) {
        metrics::inc(&shared.metrics.auth_forbidden);
    } else {
        metrics::inc(&shared.metrics.auth_failures);
    }
    // The reason never carries the token; it names what was wrong with it.
    info!(code = err.close_code(), reason = %err, "refusing connection");
    let frame = CloseFrame {
        code: err.close_code(),
        reason: Utf8Bytes::from(err.close_reason()),
    };
    let _ = timeout(CLOSE_FLUSH, async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        while let Some(Ok(message)) = socket.recv().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Waits for the `auth` frame of a connection that presented no token in its url or headers
/// (within the heartbeat timeout, like any first frame). `None`: the client went away, or the
/// node is shutting down.
async fn first_frame_auth(
    socket: &mut WebSocket,
    shared: &Shared,
) -> Option<Result<Grant, AuthError>> {
    let wait = timeout(shared.config.heartbeat_timeout(), async {
        loop {
            match socket.recv().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Text(text))) => {
                    return Some(match serde_json::from_str::<ClientFrame>(&text) {
                        Ok(ClientFrame::Auth { token }) => shared.auth.verify(&token),
                        _ => Err(AuthError::Missing),
                    });
                }
                Some(Ok(Message::Binary(_))) => return Some(Err(AuthError::Missing)),
            }
        }
    });
    tokio::select! {
        _ = shared.cancel.cancelled() => None,
        waited = wait => waited.unwrap_or(Some(Err(AuthError::Missing))),
    }
}

/// Longest a token keeps a connection without a refresh, whatever its `exp` says (a year): an
/// `exp` far in the future must not overflow the clock.
const LONGEST_TOKEN: Duration = Duration::from_secs(365 * 24 * 3600);

/// When a connection holding `grant` must be closed for its token's expiry.
fn expiry(grant: &Grant, leeway: Duration) -> Option<Instant> {
    let exp = grant.exp?;
    let left = Duration::from_secs(exp.saturating_sub(now_s())).min(LONGEST_TOKEN);
    Some(Instant::now() + left + leeway)
}

/// Serves one accepted streaming connection until it closes. `token` is the one presented in
/// the url or the `Authorization` header; `permit` is the connection's place under the node's
/// connection limit, held until the session ends.
///
/// Not an `async fn`: an `async fn` moves its arguments into locals of its own, and the socket
/// (a few hundred bytes) would then be kept twice in every session's state (rustc 1.95: a
/// 400-byte argument makes an `async fn`'s future 840 bytes, an `async move` block's 440). The
/// `async move` block below uses the captured socket in place.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would hold the socket twice"
)]
pub(crate) fn serve<P: Send + 'static>(
    mut socket: WebSocket,
    shared: Arc<Shared>,
    token: Option<String>,
    permit: P,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let _permit = permit;
        // Rarely taken, and their state is large: boxed, they cost nothing to the sessions that
        // never take them.
        let grant = match shared.auth.admit(token.as_deref()) {
            Ok(Some(grant)) => grant,
            Ok(None) => match Box::pin(first_frame_auth(&mut socket, &shared)).await {
                Some(Ok(grant)) => grant,
                Some(Err(err)) => return Box::pin(refuse_auth(&mut socket, &shared, &err)).await,
                None => return,
            },
            Err(err) => return Box::pin(refuse_auth(&mut socket, &shared, &err)).await,
        };
        drop(token);
        let mut session = Session::new(shared, grant);
        // Greeted before it is registered: nothing the node pushes to every session (a `feed`
        // frame) can come before its `hello`.
        session.greet();
        session.register();
        debug!(conn = session.id, "connection open");
        // Shutdown closes every registered session; one registered as it began is closed here.
        if session.shared.cancel.is_cancelled() {
            session
                .outlet
                .closer
                .close(close::GOING_AWAY, "node shutting down");
        }
        let end = session.run(&mut socket).await;
        // A `sub` or `pub` still waiting on the broker is abandoned: unregistering undoes what a
        // half-done subscription reserved. No longer a user from the moment it is closing, even
        // while the close frame is flushed.
        session.unregister();
        // Boxed: only a closing session needs its state.
        Box::pin(session.finish(&mut socket, end)).await;
        session.outlet.queue.close();
    }
}

/// Pushes to the sessions what concerns many of them: the `feed` frame when the node is cut off
/// from the farm or back, the farm list to those that watch it, and the close at shutdown. One
/// task for the node, so that no session keeps a future per node-wide signal in its state.
pub(crate) async fn follow_node(shared: Arc<Shared>) {
    // Watching clients are pushed the list when the membership changes (a server joins,
    // leaves, changes status): not on every change of users, which they refresh themselves.
    let mut members_rx = shared.members_rx.clone();
    members_rx.mark_unchanged();
    let mut farm_rx = shared.farm_rx.clone();
    farm_rx.mark_unchanged();
    let mut isolated_rx = shared.isolated_rx.clone();
    isolated_rx.mark_unchanged();
    let (mut members_open, mut farm_open, mut isolated_open) = (true, true, true);
    let push = |outlets: Vec<Outlet>, frame: Message| {
        for outlet in outlets {
            outlet.offer(frame.clone(), shared.hub.metrics());
        }
    };
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => {
                for closer in shared.hub.sessions() {
                    closer.close(close::GOING_AWAY, "node shutting down");
                }
                return;
            }
            changed = isolated_rx.changed(), if isolated_open => {
                if changed.is_err() {
                    isolated_open = false;
                    continue;
                }
                let complete = !*isolated_rx.borrow_and_update();
                push(shared.hub.outlets(), encode(&ServerFrame::Feed { complete }));
            }
            changed = farm_rx.changed(), if farm_open => {
                if changed.is_err() {
                    farm_open = false;
                    continue;
                }
                farm_rx.mark_unchanged();
                let watchers = shared.hub.watchers(Watch::Users);
                if !watchers.is_empty() {
                    push(watchers, encode(&ServerFrame::Farm(shared.farm_now())));
                }
            }
            changed = members_rx.changed(), if members_open => {
                if changed.is_err() {
                    members_open = false;
                    continue;
                }
                members_rx.mark_unchanged();
                let watchers = shared.hub.watchers(Watch::Members);
                if !watchers.is_empty() {
                    push(watchers, encode(&ServerFrame::Farm(shared.farm_now())));
                }
            }
        }
    }
}

/// A `sub` or `pub` waiting on the broker.
type Pending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How [`Session::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// We are closing; the client may still send.
    Open,
    /// The client closed, went away or sent something unreadable: nothing more to read.
    ReadDone,
    /// The socket failed: nothing more to write.
    WriteFailed,
}

/// What woke [`Session::run`].
enum Event {
    Frame(Message),
    ReadFailed(axum::Error),
    ReadEnded,
    WriteFailed,
    Closing,
    Expired,
    HeartbeatTimeout,
}

/// One connection: one task that reads the client's frames and writes its send queue into the
/// same socket, with one timer for its pings, heartbeat timeout and token expiry. Not split into
/// a reading and a writing half: the halves would share the socket behind a lock (one more
/// allocation) and each keep its own set of futures in the task, on every idle connection.
pub(crate) struct Session {
    id: ConnId,
    shared: Arc<Shared>,
    outlet: Outlet,
    /// Topics this connection subscribes to, to unsubscribe them when it ends.
    topics: TopicSet,
    /// What the connection's token allows; `None` on a node that checks no tokens (everything),
    /// which then keeps no copy of "everything" per connection.
    grant: Option<Box<Grant>>,
    /// When the connection is closed `4012` unless a `refresh` pushes it back.
    expiry: Option<Instant>,
    /// The `sub` or `pub` being served: the client's next frame is read once it is done, and
    /// the writer keeps writing meanwhile.
    pending: Option<Pending>,
    /// When the client last sent a frame (or its last `sub`/`pub` was done).
    heard: Instant,
    writer: Writer,
}

/// The writing side's state.
struct Writer {
    /// [`Cost`](crate::queue::Cost) of the frames handed to the socket since its last flush:
    /// still counted against the send queue's byte bound until the flush.
    unflushed: usize,
    /// Frames handed to the socket since its last flush.
    fed: usize,
    greeting_left: usize,
    next_ping: Instant,
    ping_id: u64,
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, grant: Grant) -> Session {
        let config = &shared.config;
        let queue = Arc::new(SendQueue::new(config.send_queue, config.send_queue_bytes));
        let now = Instant::now();
        Session {
            id: 0,
            outlet: Outlet {
                queue,
                closer: Closer::default(),
            },
            topics: TopicSet::default(),
            expiry: expiry(&grant, shared.auth.leeway()),
            grant: shared.auth.checks_tokens().then(|| Box::new(grant)),
            pending: None,
            heard: now,
            writer: Writer {
                unflushed: 0,
                fed: 0,
                greeting_left: GREETING_FRAMES,
                next_ping: now + config.heartbeat_interval(),
                ping_id: 0,
            },
            shared,
        }
    }

    fn may_subscribe(&self, topic: &str) -> bool {
        self.grant.as_ref().is_none_or(|g| g.may_subscribe(topic))
    }

    fn send(&self, frame: &ServerFrame) {
        self.outlet.offer(encode(frame), self.shared.hub.metrics());
    }

    fn error(&self, code: &str, message: impl Into<String>) {
        metrics::inc(&self.shared.metrics.bad_frames);
        self.send(&ServerFrame::Error {
            code: code.to_string(),
            message: message.into(),
        });
    }

    /// The `hello` frame every connection starts with.
    pub(crate) fn hello(&self) -> ServerFrame {
        let config = &self.shared.config;
        ServerFrame::Hello {
            server: config.name.clone(),
            url: self.shared.url.clone(),
            status: *self.shared.status.borrow(),
            heartbeat_interval_ms: config.heartbeat_interval_ms,
            heartbeat_timeout_ms: config.heartbeat_timeout_ms,
            max_frame_bytes: config.max_frame_bytes,
        }
    }

    /// The `hello` and `farm` frames every connection starts with.
    fn greet(&self) {
        self.greet_with(encode(&self.hello()));
    }

    /// [`Session::greet`] with a `hello` of the transport's own (an event stream's names it).
    pub(crate) fn greet_with(&self, hello: Message) {
        self.outlet.offer(hello, self.shared.hub.metrics());
        // The list of a client that has chosen: neither in flight (it is counted among this
        // node's users) nor given a draw. Taking one would also skew the next list's pick: the
        // draws are a sequence, and those taken here would follow the picks of this node.
        self.send(&ServerFrame::Farm(self.shared.farm_now()));
        if *self.shared.isolated_rx.borrow() {
            self.send(&ServerFrame::Feed { complete: false });
        }
    }

    /// Serves the connection until it ends or is to be closed.
    async fn run(&mut self, socket: &mut WebSocket) -> End {
        let closer = self.outlet.closer.clone();
        let timer = sleep_until(self.deadline());
        tokio::pin!(timer);
        loop {
            let event =
                std::future::poll_fn(|cx| self.poll_event(cx, socket, timer.as_mut())).await;
            match event {
                Event::Frame(message) => {
                    if !self.handle(message) {
                        return End::ReadDone;
                    }
                }
                Event::Closing => return End::Open,
                Event::ReadEnded => {
                    closer.close(NORMAL, "");
                    return End::ReadDone;
                }
                Event::ReadFailed(err) => {
                    self.read_failed(err);
                    return End::ReadDone;
                }
                Event::WriteFailed => {
                    closer.close(NORMAL, "write failed");
                    return End::WriteFailed;
                }
                Event::Expired => {
                    metrics::inc(&self.shared.metrics.auth_failures);
                    info!(conn = self.id, "closing: token expired");
                    let err = AuthError::Expired;
                    closer.close(err.close_code(), &err.close_reason());
                    return End::Open;
                }
                Event::HeartbeatTimeout => {
                    metrics::inc(&self.shared.metrics.heartbeat_timeouts);
                    info!(conn = self.id, "closing: heartbeat timeout");
                    closer.close(close::HEARTBEAT_TIMEOUT, "heartbeat timeout");
                    return End::Open;
                }
            }
            // A refresh may have brought the expiry forward.
            let deadline = self.deadline();
            if deadline < timer.deadline() {
                timer.as_mut().reset(deadline);
            }
        }
    }

    /// The earliest of the next ping, the heartbeat timeout and the token's expiry. The timer
    /// is set to it, and only brought forward, never pushed back, when one of them moves: it
    /// may fire early, and is then set again (one timer reset per heartbeat interval, rather
    /// than one per frame read or written).
    fn deadline(&self) -> Instant {
        let deadline = self.ping_or_expiry();
        if self.pending.is_none() {
            deadline.min(self.heard + self.shared.config.heartbeat_timeout())
        } else {
            deadline
        }
    }

    /// The earlier of the next ping and the token's expiry: the deadlines of a connection whose
    /// client sends nothing on it (an event stream), which is not closed for its silence.
    pub(crate) fn ping_or_expiry(&self) -> Instant {
        match self.expiry {
            Some(expiry) => self.writer.next_ping.min(expiry),
            None => self.writer.next_ping,
        }
    }

    /// Whether the token has expired by `now`.
    pub(crate) fn expired(&self, now: Instant) -> bool {
        self.expiry.is_some_and(|at| at <= now)
    }

    /// Queues a `ping` when nothing was sent for a heartbeat interval, so that the client can
    /// tell a quiet node from a hung one.
    pub(crate) fn ping_if_quiet(&mut self, now: Instant) {
        if self.writer.next_ping <= now {
            self.writer.ping_id += 1;
            let ping = encode(&ServerFrame::Ping {
                id: Some(self.writer.ping_id),
            });
            self.outlet.offer(ping, self.shared.hub.metrics());
            self.writer.next_ping = now + self.shared.config.heartbeat_interval();
        }
    }

    /// Frames were written at `now`: the next ping is a heartbeat interval away.
    pub(crate) fn sent(&mut self, now: Instant) {
        self.writer.next_ping = now + self.shared.config.heartbeat_interval();
    }

    /// Completes the `sub` or `pub` in progress, if it is done.
    pub(crate) fn poll_pending(&mut self, cx: &mut Context<'_>) {
        if let Some(pending) = &mut self.pending
            && pending.as_mut().poll(cx).is_ready()
        {
            self.pending = None;
            self.heard = Instant::now();
        }
    }

    /// A `sub` or `pub` is in progress: the client's next frame waits for it.
    pub(crate) fn busy(&self) -> bool {
        self.pending.is_some()
    }

    /// Registers the connection with the hub: a user from now on.
    pub(crate) fn register(&mut self) {
        self.id = self.shared.hub.register(self.outlet.clone());
    }

    /// Forgets the connection's subscriptions and registration (a `sub` or `pub` in progress
    /// is abandoned): no longer a user.
    pub(crate) fn unregister(&mut self) {
        self.pending = None;
        self.shared.hub.unregister(self.id, self.topics.iter());
        self.shared
            .move_clock
            .gone(self.id, &self.outlet.closer, &self.shared.metrics);
    }

    pub(crate) fn id(&self) -> ConnId {
        self.id
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn outlet(&self) -> &Outlet {
        &self.outlet
    }

    pub(crate) fn closer(&self) -> &Closer {
        &self.outlet.closer
    }

    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
        socket: &mut WebSocket,
        mut timer: Pin<&mut Sleep>,
    ) -> Poll<Event> {
        if self.outlet.closer.poll_closed(cx).is_ready() {
            return Poll::Ready(Event::Closing);
        }
        self.poll_pending(cx);
        while timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            if self.expiry.is_some_and(|at| at <= now) {
                return Poll::Ready(Event::Expired);
            }
            if self.pending.is_none() && self.heard + self.shared.config.heartbeat_timeout() <= now
            {
                return Poll::Ready(Event::HeartbeatTimeout);
            }
            self.ping_if_quiet(now);
            let deadline = self.deadline();
            timer.as_mut().reset(deadline);
        }
        if self.write(cx, socket).is_err() {
            return Poll::Ready(Event::WriteFailed);
        }
        if self.pending.is_some() {
            return Poll::Pending;
        }
        match Pin::new(&mut *socket).poll_next(cx) {
            Poll::Ready(Some(Ok(message))) => {
                self.heard = Instant::now();
                Poll::Ready(Event::Frame(message))
            }
            Poll::Ready(Some(Err(err))) => Poll::Ready(Event::ReadFailed(err)),
            Poll::Ready(None) => Poll::Ready(Event::ReadEnded),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Writes what is queued, as far as the socket takes it: bursts of frames, one flush (one
    /// syscall) each. Returns with the task's waker registered wherever it has to wait.
    fn write(&mut self, cx: &mut Context<'_>, socket: &mut WebSocket) -> Result<(), axum::Error> {
        let queue = &self.outlet.queue;
        let writer = &mut self.writer;
        for _ in 0..BURSTS_PER_POLL {
            // The greeting is written one frame a flush (see [`GREETING_FRAMES`]).
            let burst = if writer.greeting_left > 0 {
                1
            } else {
                WRITE_BURST
            };
            while writer.fed < burst {
                match Pin::new(&mut *socket).poll_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(err)) => return Err(err),
                    Poll::Pending => break,
                }
                // The waker is registered only once the queue is found empty, not per frame.
                let message = match queue.try_pop() {
                    Some(message) => message,
                    None => match queue.poll_pop(cx) {
                        Poll::Ready(Some(message)) => message,
                        Poll::Ready(None) | Poll::Pending => break,
                    },
                };
                writer.unflushed += message.cost();
                writer.fed += 1;
                Pin::new(&mut *socket).start_send(message)?;
            }
            if writer.fed == 0 && writer.unflushed == 0 {
                return Ok(());
            }
            match Pin::new(&mut *socket).poll_flush(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Err(err),
                Poll::Pending => return Ok(()),
            }
            queue.written(writer.unflushed);
            writer.unflushed = 0;
            writer.fed = 0;
            writer.greeting_left = writer.greeting_left.saturating_sub(1);
            writer.next_ping = Instant::now() + self.shared.config.heartbeat_interval();
        }
        // More is queued: the task yields to the others, and comes back.
        cx.waker().wake_by_ref();
        Ok(())
    }

    /// Sends what is left and the close frame, and reads until the client's close so that
    /// unread input does not make the kernel reset the connection — a reset discards what the
    /// client has not read yet, our close frame included.
    async fn finish(&mut self, socket: &mut WebSocket, end: End) {
        if end == End::WriteFailed {
            return;
        }
        let (code, reason) = self
            .outlet
            .closer
            .reason()
            .unwrap_or((NORMAL, String::new()));
        // A slow consumer's socket is full: it gets nothing more, and its close frame goes out
        // only once it reads again, which it gets a heartbeat timeout to do. Anyone else gets
        // what was queued before the close (an error frame explaining it, the last messages).
        let slow = code == close::SLOW_CONSUMER;
        if slow {
            // What it had queued is freed now rather than once its close is through.
            self.outlet.queue.close();
            while self.outlet.queue.try_pop().is_some() {}
        }
        let time = if slow {
            self.shared.config.heartbeat_timeout()
        } else {
            CLOSE_FLUSH
        };
        let mut frame = Some(if code != NORMAL || !reason.is_empty() {
            Message::Close(Some(CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            }))
        } else {
            Message::Close(None)
        });
        let mut reading = end == End::Open;
        let queue = self.outlet.queue.clone();
        let flushed = std::future::poll_fn(|cx| {
            if reading {
                reading = discard(cx, socket).is_pending();
            }
            let mut socket = Pin::new(&mut *socket);
            if frame.is_some() {
                if !slow {
                    loop {
                        match socket.as_mut().poll_ready(cx) {
                            Poll::Ready(Ok(())) => {}
                            // The socket takes nothing more: only the close frame is still tried.
                            Poll::Ready(Err(_)) => break,
                            Poll::Pending => return Poll::Pending,
                        }
                        let Some(message) = queue.try_pop() else {
                            break;
                        };
                        if socket.as_mut().start_send(message).is_err() {
                            break;
                        }
                    }
                }
                if socket.as_mut().poll_ready(cx).is_pending() {
                    return Poll::Pending;
                }
                // Fails when the client closed first; the flush below then sends the reply to
                // its close that the WebSocket library queued.
                let _ = socket
                    .as_mut()
                    .start_send(frame.take().expect("checked above"));
            }
            socket.poll_flush(cx).map(|_| ())
        });
        let _ = timeout(time, flushed).await;
        if reading {
            let _ = timeout(time, std::future::poll_fn(|cx| discard(cx, socket))).await;
        }
    }
    fn read_failed(&self, err: axum::Error) {
        let closer = &self.outlet.closer;
        // axum hides tungstenite's error type; the capacity error is the one that says "too long".
        let text = err.to_string();
        if text.contains("too long") || text.contains("Space limit") || text.contains("capacity") {
            metrics::inc(&self.shared.metrics.oversized_frames);
            info!(conn = self.id, error = %text, "closing: frame too big");
            self.send(&ServerFrame::Error {
                code: "too_big".into(),
                message: format!(
                    "frame larger than max_frame_bytes ({})",
                    self.shared.config.max_frame_bytes
                ),
            });
            closer.close(close::MESSAGE_TOO_BIG, "frame too big");
        } else {
            debug!(conn = self.id, error = %text, "read failed");
            closer.close(close::POLICY_VIOLATION, "read error");
        }
    }

    /// Serves one message; returns false when the connection is over.
    pub(crate) fn handle(&mut self, message: Message) -> bool {
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                self.error("bad_frame", "frames are JSON text messages, not binary");
                return true;
            }
            // WebSocket-level pings are answered by the library; any frame counts as a heartbeat.
            Message::Ping(_) | Message::Pong(_) => return true,
            Message::Close(_) => {
                self.outlet.closer.close(NORMAL, "");
                return false;
            }
        };
        if text.len() > self.shared.config.max_frame_bytes {
            metrics::inc(&self.shared.metrics.oversized_frames);
            info!(conn = self.id, bytes = text.len(), "closing: frame too big");
            self.send(&ServerFrame::Error {
                code: "too_big".into(),
                message: format!(
                    "frame of {} bytes is larger than max_frame_bytes ({})",
                    text.len(),
                    self.shared.config.max_frame_bytes
                ),
            });
            self.outlet
                .closer
                .close(close::MESSAGE_TOO_BIG, "frame too big");
            return true;
        }
        let frame = match serde_json::from_str::<ClientFrame>(&text) {
            Ok(frame) => frame,
            Err(err) => {
                self.error("bad_frame", format!("not a client frame: {err}"));
                return true;
            }
        };
        // `subscribe` and `publish` wait on the broker; their futures are large (about 1 and 2
        // KB) and kept boxed in `pending` only while one runs, rather than in every session's
        // state for its whole life.
        match frame {
            ClientFrame::Hello {
                features,
                migrating,
            } => {
                let migrates = features.iter().any(|f| f == feature::MIGRATE);
                self.shared.hub.hello(self.id, migrates, migrating);
            }
            ClientFrame::Sub { topics, positions } => self.subscribe(topics, positions),
            ClientFrame::Unsub { topics } => {
                self.shared
                    .broker
                    .unsubscribe(self.id, topics.iter().map(String::as_str));
                for topic in &topics {
                    self.topics.remove(topic);
                }
                self.send(&ServerFrame::Unsubscribed { topics });
            }
            ClientFrame::Pub {
                topic,
                data,
                encoding,
            } => self.publish(topic, data, encoding),
            ClientFrame::List { watch, users } => {
                let watch = match (watch, users) {
                    (false, _) => Watch::Nothing,
                    (true, false) => Watch::Members,
                    (true, true) => Watch::Users,
                };
                self.shared.hub.watch(self.id, watch);
                // A client that watches the list has chosen this node: its list takes no draw
                // and counts in no flight. One that asks once may choose from it.
                let list = if watch == Watch::Nothing {
                    self.shared.list_for_client()
                } else {
                    self.shared.farm_now()
                };
                self.send(&ServerFrame::Farm(list));
            }
            ClientFrame::Auth { token } | ClientFrame::Refresh { token } => self.refresh(&token),
            ClientFrame::Ping { id } => self.send(&ServerFrame::Pong { id }),
            ClientFrame::Pong { .. } => {}
        }
        true
    }

    /// A new token for this connection (`refresh`, or `auth` after an anonymous start).
    fn refresh(&mut self, token: &str) {
        if !self.shared.auth.checks_tokens() {
            self.send(&ServerFrame::Refreshed { exp: None });
            return;
        }
        let checked = self.shared.auth.verify(token).and_then(|grant| {
            let subject = self.grant.as_ref().and_then(|g| g.subject.as_ref());
            if subject.is_some() && grant.subject.as_ref() != subject {
                return Err(AuthError::Forbidden(
                    "the token names another subject".into(),
                ));
            }
            if let Some(topic) = self.topics.iter().find(|t| !grant.may_subscribe(t)) {
                return Err(AuthError::Forbidden(format!(
                    "the token does not allow {topic:?}"
                )));
            }
            Ok(grant)
        });
        match checked {
            Ok(grant) => {
                self.expiry = expiry(&grant, self.shared.auth.leeway());
                let exp = grant.exp;
                self.grant = Some(Box::new(grant));
                debug!(conn = self.id, exp, "token refreshed");
                self.send(&ServerFrame::Refreshed { exp });
            }
            Err(err) => {
                if matches!(err, AuthError::Forbidden(_)) {
                    metrics::inc(&self.shared.metrics.auth_forbidden);
                } else {
                    metrics::inc(&self.shared.metrics.auth_failures);
                }
                info!(conn = self.id, reason = %err, "closing: refresh refused");
                self.outlet
                    .closer
                    .close(err.close_code(), &err.close_reason());
            }
        }
    }

    /// Refuses a frame that the connection's token does not allow; the connection stays open.
    fn forbidden(&self, message: String) {
        metrics::inc(&self.shared.metrics.auth_forbidden);
        self.send(&ServerFrame::Error {
            code: "forbidden".to_string(),
            message,
        });
    }

    pub(crate) fn subscribe(&mut self, topics: Vec<String>, positions: BTreeMap<String, Position>) {
        // Nothing of ours waits while we wait for the peers.
        if let Some(problem) = topics.iter().find_map(|t| check_topic(t).err()) {
            self.error("bad_topic", problem);
            return;
        }
        if let Some(topic) = topics.iter().find(|t| !self.may_subscribe(t)) {
            self.forbidden(format!("the token does not allow subscribing to {topic:?}"));
            return;
        }
        let max = self.shared.config.max_subscriptions;
        let new = topics.iter().filter(|t| !self.topics.contains(t)).count();
        if self.topics.len() + new > max {
            self.error(
                "too_many_topics",
                format!("a connection may subscribe to at most {max} topics"),
            );
            return;
        }
        // The node's interest is bounded too: every peer holds it, for every node.
        let limit = self.shared.config.max_interest_topics;
        let (growth, held) = self
            .shared
            .hub
            .interest_growth(topics.iter().map(String::as_str));
        if growth > 0 && held + growth > limit {
            self.error(
                "too_many_topics",
                format!("this node delivers at most {limit} topics (max_interest_topics)"),
            );
            return;
        }
        self.topics.extend(topics.iter().map(String::as_str));
        let wanted: Vec<(String, Resume)> = topics
            .into_iter()
            .map(|topic| {
                let resume = positions
                    .get(&topic)
                    .map_or(Resume::Live, |p| Resume::After(*p));
                (topic, resume)
            })
            .collect();
        // The broker answers `subscribed` (with positions), then what was missed, then live.
        let (id, shared, outlet) = (self.id, self.shared.clone(), self.outlet.clone());
        let asked = std::time::Instant::now();
        self.pending = Some(Box::pin(async move {
            // Dropped at the end, it wakes what the subscription queued.
            let mut wakes = FrameWakes::default();
            shared
                .broker
                .subscribe(id, &outlet, &wanted, &mut wakes)
                .await;
            record_subscribe(&shared, asked, &wanted);
        }));
    }

    fn publish(&mut self, topic: String, data: String, encoding: Encoding) {
        if !self.shared.config.allow_client_publish {
            self.error("not_allowed", "this node does not accept pub frames");
            return;
        }
        if let Err(problem) = check_topic(&topic) {
            self.error("bad_topic", problem);
            return;
        }
        if !self.grant.as_ref().is_none_or(|g| g.may_publish(&topic)) {
            self.forbidden(format!("the token does not allow publishing on {topic:?}"));
            return;
        }
        if encoding == Encoding::Base64
            && base64::engine::general_purpose::STANDARD
                .decode(&data)
                .is_err()
        {
            self.error("bad_frame", "data is not valid base64");
            return;
        }
        let shared = self.shared.clone();
        self.pending = Some(Box::pin(async move {
            shared
                .broker
                .publish_unconfirmed(&topic, data, encoding)
                .await;
        }));
    }
}

/// Records a `sub` served: its time, and for a resuming one the messages each topic's history
/// caught it up with (read from the positions: the broker queues exactly those).
fn record_subscribe(shared: &Shared, asked: std::time::Instant, wanted: &[(String, Resume)]) {
    let m = &shared.metrics;
    metrics::observe_since(&m.subscribe_seconds, asked);
    let mut resumed = false;
    for (topic, resume) in wanted {
        let Resume::After(after) = *resume else {
            continue;
        };
        resumed = true;
        if let Some(sent) = shared.hub.with_log(topic, |log| {
            recovered_from_history(log.position(), log.first(), after)
        }) {
            m.recovery_messages.observe(sent);
        }
    }
    if resumed {
        metrics::inc(&m.resubscriptions);
    }
}

/// Messages a history whose newest is `newest` and oldest held is `first` sends to a client that
/// resumes after `after`: those after it in the same epoch, all it holds of a newer epoch.
fn recovered_from_history(newest: Position, first: u64, after: Position) -> u64 {
    let from = if after.epoch == newest.epoch {
        after.offset.max(first.saturating_sub(1))
    } else {
        first.saturating_sub(1)
    };
    newest.offset.saturating_sub(from)
}

/// The topics of one connection: a sorted vector, one allocation plus one per topic. A hash
/// set of one topic takes a table of several buckets, more than the topic itself, on every
/// connection.
#[derive(Debug, Default)]
struct TopicSet(Vec<Box<str>>);

impl TopicSet {
    fn contains(&self, topic: &str) -> bool {
        self.0.binary_search_by(|t| (**t).cmp(topic)).is_ok()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    /// Adds `topics`: one sort for the lot, not one shift per topic.
    fn extend<'a>(&mut self, topics: impl IntoIterator<Item = &'a str>) {
        self.0.extend(topics.into_iter().map(Box::from));
        self.0.sort_unstable();
        self.0.dedup();
        self.0.shrink_to_fit();
    }

    fn remove(&mut self, topic: &str) {
        if let Ok(at) = self.0.binary_search_by(|t| (**t).cmp(topic)) {
            self.0.remove(at);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|t| &**t)
    }
}

/// Reads and drops client frames: `Ready` at the client's close frame or the end of the stream.
fn discard(cx: &mut Context<'_>, socket: &mut WebSocket) -> Poll<()> {
    loop {
        match Pin::new(&mut *socket).poll_next(cx) {
            Poll::Ready(Some(Ok(Message::Close(_))) | Some(Err(_)) | None) => {
                return Poll::Ready(());
            }
            Poll::Ready(Some(Ok(_))) => continue,
            Poll::Pending => return Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exp_far_in_the_future_does_not_overflow_the_clock() {
        let mut grant = Grant::everything();
        grant.exp = Some(u64::MAX);
        let at = expiry(&grant, Duration::from_secs(300)).unwrap();
        assert!(at > Instant::now() + Duration::from_secs(300 * 24 * 3600));
        grant.exp = Some(0);
        assert!(expiry(&grant, Duration::ZERO).unwrap() <= Instant::now());
    }

    /// Size of what `f` returns, without calling it.
    fn returned_size<A, B, C, D, F>(_: fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    #[test]
    fn a_session_keeps_little_state() {
        // Every open connection holds one of these for its whole life (plus the task's header):
        // it was 2 024 bytes before the session stopped splitting the socket.
        let size = returned_size(serve::<tokio::sync::OwnedSemaphorePermit>);
        println!(
            "session future: {size} bytes; WebSocket {}, Sleep {}, Session {}, Grant {}, Writer {}",
            std::mem::size_of::<WebSocket>(),
            std::mem::size_of::<Sleep>(),
            std::mem::size_of::<Session>(),
            std::mem::size_of::<Grant>(),
            std::mem::size_of::<Writer>()
        );
        assert!(size <= 1024, "the session future takes {size} bytes");
    }

    #[test]
    fn recovery_counts_what_history_holds_after_the_position() {
        let epoch = streamfarm_core::protocol::Epoch(7);
        let newest = Position::new(epoch, 100);
        // Behind by 10, all held.
        assert_eq!(
            recovered_from_history(newest, 50, Position::new(epoch, 90)),
            10
        );
        // Up to date.
        assert_eq!(recovered_from_history(newest, 50, newest), 0);
        // Behind further than history reaches: only what is held is sent (after a gap).
        assert_eq!(
            recovered_from_history(newest, 50, Position::new(epoch, 10)),
            51
        );
        // Another epoch: everything held of this one.
        let older = streamfarm_core::protocol::Epoch(3);
        assert_eq!(
            recovered_from_history(newest, 50, Position::new(older, 99)),
            51
        );
    }

    #[test]
    fn a_topic_set_keeps_each_topic_once_and_finds_it() {
        let mut set = TopicSet::default();
        set.extend(["b", "a", "b"]);
        set.extend(["c", "a"]);
        assert_eq!(set.iter().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(set.contains("b") && !set.contains("d"));
        set.remove("b");
        set.remove("d");
        assert_eq!(set.len(), 2);
        assert!(!set.contains("b"));
    }

    #[test]
    fn topics_are_checked() {
        assert!(check_topic("prices.eur").is_ok());
        assert!(check_topic("").is_err());
        assert!(check_topic("a b").is_err());
        assert!(check_topic(&"x".repeat(MAX_TOPIC_BYTES + 1)).is_err());
    }
}
