//! One streaming connection: the WebSocket protocol of `docs/PROTOCOL.md`, server side.
//!
//! A session is one task running two halves side by side:
//! - the **reader** parses client frames (`hello`, `sub`, `unsub`, `pub`, `list`, `ping`, `pong`), answers
//!   through the send queue, and closes the connection when the client has sent nothing for the
//!   heartbeat timeout;
//! - the **writer** drains the bounded send queue into the socket and sends a `ping` whenever it
//!   has sent nothing for the heartbeat interval, so a client can tell a quiet node from a hung one.
//!
//! Anything that ends the connection (slow consumer, drain, heartbeat timeout, oversized frame,
//! shutdown) goes through the session's [`Closer`], which carries the close code the writer sends.
//! The session counts as a user from the moment it is registered until it returns.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use streamfarm_core::protocol::{ClientFrame, Encoding, Position, ServerFrame, close, feature};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info};

use crate::Shared;
use crate::auth::{AuthError, Grant, now_s};
use crate::hub::{Closer, ConnId, FrameWakes, Outlet, Resume, encode, next_or_wake};
use crate::metrics;
use crate::queue::SendQueue;

/// Longest topic name accepted, in bytes.
pub(crate) const MAX_TOPIC_BYTES: usize = 256;
/// Normal closure (RFC 6455).
const NORMAL: u16 = 1000;
/// Most frames written between two flushes.
const WRITE_BURST: usize = 64;
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
async fn refuse_auth(mut socket: WebSocket, shared: &Shared, err: &AuthError) {
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
/// the url or the `Authorization` header.
pub(crate) async fn serve(mut socket: WebSocket, shared: Arc<Shared>, token: Option<String>) {
    let grant = match shared.auth.admit(token.as_deref()) {
        Ok(Some(grant)) => grant,
        Ok(None) => match first_frame_auth(&mut socket, &shared).await {
            Some(Ok(grant)) => grant,
            Some(Err(err)) => return refuse_auth(socket, &shared, &err).await,
            None => return,
        },
        Err(err) => return refuse_auth(socket, &shared, &err).await,
    };
    drop(token);
    let closer = Closer::default();
    let queue = Arc::new(SendQueue::new(
        shared.config.send_queue,
        shared.config.send_queue_bytes,
    ));
    let outlet = Outlet {
        queue: queue.clone(),
        closer: closer.clone(),
    };
    let id = shared.hub.register(outlet.clone());
    debug!(conn = id, "connection open");
    let (sink, stream) = socket.split();
    let mut reader = Reader {
        id,
        shared: shared.clone(),
        outlet,
        topics: HashSet::new(),
        watching_farm: false,
        watching_users: false,
        wakes: FrameWakes::default(),
        expiry: expiry(&grant, shared.auth.leeway()),
        grant,
    };
    reader.greet();
    let hub = shared.hub.clone();
    // Set once the writer is done (the close frame written, or given up).
    let written = tokio_util::sync::CancellationToken::new();
    let (stream, ()) = tokio::join!(
        async {
            let stream = reader.run(stream).await;
            reader.wakes.wake_all();
            // No longer a user from the moment it is closing, even while the writer still
            // flushes the close frame.
            hub.unregister(id, &reader.topics);
            // Keep reading while the writer flushes: a client blocked sending (heartbeats,
            // say) would never read our close frame otherwise.
            let mut stream = stream?;
            let client_closed = tokio::select! {
                _ = written.cancelled() => false,
                () = discard_until_close(&mut stream) => true,
            };
            (!client_closed).then_some(stream)
        },
        async {
            write(
                sink,
                &queue,
                closer.clone(),
                shared.config.heartbeat_interval(),
                shared.config.heartbeat_timeout(),
            )
            .await;
            written.cancel();
        }
    );
    queue.close();
    let (code, reason) = closer.reason().unwrap_or((NORMAL, String::new()));
    // We closed first: read until the client's close so that unread input does not make the
    // kernel reset the connection — a reset discards what the client has not read yet, our
    // close frame included. A slow consumer has a backlog to read before it: it gets a
    // heartbeat timeout.
    if let Some(mut stream) = stream {
        let linger = if code == close::SLOW_CONSUMER {
            shared.config.heartbeat_timeout()
        } else {
            CLOSE_FLUSH
        };
        let _ = timeout(linger, discard_until_close(&mut stream)).await;
    }
    debug!(conn = id, code, reason, "connection closed");
}

/// Reads and drops client frames until the client's close frame or the end of the stream.
async fn discard_until_close(stream: &mut futures_util::stream::SplitStream<WebSocket>) {
    while let Some(Ok(message)) = stream.next().await {
        if matches!(message, Message::Close(_)) {
            return;
        }
    }
}

/// The reading half and the session's state.
struct Reader {
    id: ConnId,
    shared: Arc<Shared>,
    outlet: Outlet,
    /// Topics this connection subscribes to, to unsubscribe them when it ends.
    topics: HashSet<String>,
    /// Whether the client asked for farm list updates: on membership changes, or on every change.
    watching_farm: bool,
    watching_users: bool,
    /// Subscribers' writers to wake for the messages this connection published and that are
    /// not yet woken: woken once no more input is ready (see [`next_or_wake`]).
    wakes: FrameWakes,
    /// What the connection's token allows (everything on a node that checks no tokens).
    grant: Grant,
    /// When the connection is closed `4012` unless a `refresh` pushes it back.
    expiry: Option<Instant>,
}

impl Reader {
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

    /// The `hello` and `farm` frames every connection starts with.
    fn greet(&self) {
        let config = &self.shared.config;
        self.send(&ServerFrame::Hello {
            server: config.name.clone(),
            url: self.shared.url.clone(),
            status: *self.shared.status.borrow(),
            heartbeat_interval_ms: config.heartbeat_interval_ms,
            heartbeat_timeout_ms: config.heartbeat_timeout_ms,
            max_frame_bytes: config.max_frame_bytes,
        });
        self.send(&ServerFrame::Farm(self.shared.farm_rx.borrow().clone()));
        if *self.shared.isolated_rx.borrow() {
            self.send(&ServerFrame::Feed { complete: false });
        }
    }

    /// Reads until the connection ends; returns the stream if it is still open (we are closing).
    /// The caller wakes what is left in [`Reader::wakes`].
    async fn run(
        &mut self,
        mut stream: futures_util::stream::SplitStream<WebSocket>,
    ) -> Option<futures_util::stream::SplitStream<WebSocket>> {
        let closer = self.outlet.closer.clone();
        let heartbeat_timeout = self.shared.config.heartbeat_timeout();
        // Watching clients are pushed the list when the membership changes (a server joins,
        // leaves, changes status): not on every change of users, which they refresh themselves.
        let mut members_rx = self.shared.members_rx.clone();
        members_rx.mark_unchanged();
        let mut farm_rx = self.shared.farm_rx.clone();
        farm_rx.mark_unchanged();
        let mut isolated_rx = self.shared.isolated_rx.clone();
        isolated_rx.mark_unchanged();
        let mut following_isolation = true;
        loop {
            let expiry = self.expiry;
            let expired = async move {
                match expiry {
                    Some(at) => sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = closer.closed() => return Some(stream),
                () = expired => {
                    metrics::inc(&self.shared.metrics.auth_failures);
                    info!(conn = self.id, "closing: token expired");
                    let err = AuthError::Expired;
                    closer.close(err.close_code(), &err.close_reason());
                    return Some(stream);
                }
                _ = self.shared.cancel.cancelled() => {
                    closer.close(close::GOING_AWAY, "node shutting down");
                    return Some(stream);
                }
                changed = isolated_rx.changed(), if following_isolation => {
                    if changed.is_err() {
                        following_isolation = false;
                        continue;
                    }
                    let complete = !*isolated_rx.borrow_and_update();
                    self.send(&ServerFrame::Feed { complete });
                }
                changed = farm_rx.changed(), if self.watching_users => {
                    if changed.is_err() {
                        self.watching_users = false;
                        continue;
                    }
                    farm_rx.mark_unchanged();
                    self.send(&ServerFrame::Farm(self.shared.farm_now()));
                }
                changed = members_rx.changed(), if self.watching_farm && !self.watching_users => {
                    if changed.is_err() {
                        self.watching_farm = false;
                        continue;
                    }
                    members_rx.mark_unchanged();
                    self.send(&ServerFrame::Farm(self.shared.farm_now()));
                }
                next = timeout(heartbeat_timeout, next_or_wake(&mut stream, &mut self.wakes)) => match next {
                    Err(_) => {
                        metrics::inc(&self.shared.metrics.heartbeat_timeouts);
                        info!(conn = self.id, "closing: heartbeat timeout");
                        closer.close(close::HEARTBEAT_TIMEOUT, "heartbeat timeout");
                        return Some(stream);
                    }
                    Ok(None) => {
                        closer.close(NORMAL, "");
                        return None;
                    }
                    Ok(Some(Err(err))) => {
                        self.read_failed(err);
                        return None;
                    }
                    Ok(Some(Ok(message))) => {
                        if !self.handle(message).await {
                            return None;
                        }
                        if closer.is_closed() {
                            return Some(stream);
                        }
                    }
                },
            }
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
    async fn handle(&mut self, message: Message) -> bool {
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
        // `subscribe` and `publish` wait on the broker, and their futures are large (about 1 and 2
        // KB): awaited inline, they would make every session's task that much larger for its
        // whole life, idle or not. Boxed, they cost a small allocation only while one runs.
        match frame {
            ClientFrame::Hello {
                features,
                migrating,
            } => {
                let migrates = features.iter().any(|f| f == feature::MIGRATE);
                self.shared.hub.hello(self.id, migrates, migrating);
            }
            ClientFrame::Sub { topics, positions } => {
                Box::pin(self.subscribe(topics, positions)).await
            }
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
            } => Box::pin(self.publish(topic, data, encoding)).await,
            ClientFrame::List { watch, users } => {
                self.watching_farm = watch;
                self.watching_users = watch && users;
                self.send(&ServerFrame::Farm(self.shared.farm_rx.borrow().clone()));
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
            if self.grant.subject.is_some() && grant.subject != self.grant.subject {
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
                self.grant = grant;
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

    async fn subscribe(&mut self, topics: Vec<String>, positions: BTreeMap<String, Position>) {
        // Nothing of ours waits while we wait for the peers.
        self.wakes.wake_all();
        if let Some(problem) = topics.iter().find_map(|t| check_topic(t).err()) {
            self.error("bad_topic", problem);
            return;
        }
        if let Some(topic) = topics.iter().find(|t| !self.grant.may_subscribe(t)) {
            self.forbidden(format!("the token does not allow subscribing to {topic:?}"));
            return;
        }
        let max = self.shared.config.max_subscriptions;
        let new = topics.iter().filter(|t| !self.topics.contains(*t)).count();
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
        self.topics.extend(topics.iter().cloned());
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
        self.shared
            .broker
            .subscribe(self.id, &self.outlet, &wanted, &mut self.wakes)
            .await;
        self.wakes.wake_all();
    }

    async fn publish(&mut self, topic: String, data: String, encoding: Encoding) {
        if !self.shared.config.allow_client_publish {
            self.error("not_allowed", "this node does not accept pub frames");
            return;
        }
        if let Err(problem) = check_topic(&topic) {
            self.error("bad_topic", problem);
            return;
        }
        if !self.grant.may_publish(&topic) {
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
        self.shared
            .broker
            .publish_unconfirmed(&topic, data, encoding)
            .await;
    }
}

/// The writing half: queue → socket, pings when idle, and the close frame at the end.
async fn write(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    queue: &SendQueue<Message>,
    closer: Closer,
    heartbeat_interval: Duration,
    heartbeat_timeout: Duration,
) {
    let mut next_ping = Instant::now() + heartbeat_interval;
    let mut ping_id = 0u64;
    let mut greeting_left = GREETING_FRAMES;
    loop {
        let message = tokio::select! {
            biased;
            _ = closer.closed() => break,
            message = queue.pop() => match message {
                Some(message) => message,
                None => break,
            },
            _ = sleep_until(next_ping) => {
                ping_id += 1;
                encode(&ServerFrame::Ping { id: Some(ping_id) })
            }
        };
        // Write what is queued behind this frame too, then flush once: one syscall per burst
        // rather than per frame.
        let most = if greeting_left > 0 {
            greeting_left -= 1;
            1
        } else {
            WRITE_BURST
        };
        let burst = async {
            sink.feed(message).await?;
            for _ in 1..most {
                let Some(next) = queue.try_pop() else { break };
                sink.feed(next).await?;
            }
            sink.flush().await
        };
        let sent = tokio::select! {
            sent = burst => sent,
            _ = closer.closed() => break,
        };
        if sent.is_err() {
            closer.close(NORMAL, "write failed");
            return;
        }
        next_ping = Instant::now() + heartbeat_interval;
    }
    let Some((code, reason)) = closer.reason() else {
        return;
    };
    // A slow consumer's socket is full: its close frame goes out only once it reads again, which
    // it gets as long as a heartbeat timeout to do.
    let flush_time = if code == close::SLOW_CONSUMER {
        heartbeat_timeout
    } else {
        CLOSE_FLUSH
    };
    let _ = timeout(flush_time, async {
        // A slow consumer gets nothing more; anyone else gets what was queued before the close
        // (an error frame explaining it, the last messages).
        if code != close::SLOW_CONSUMER {
            while let Some(message) = queue.try_pop() {
                if sink.feed(message).await.is_err() {
                    return;
                }
            }
        }
        if code != NORMAL || !reason.is_empty() {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from(reason),
            };
            let _ = sink.send(Message::Close(Some(frame))).await;
        } else {
            let _ = sink.close().await;
        }
    })
    .await;
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

    #[test]
    fn topics_are_checked() {
        assert!(check_topic("prices.eur").is_ok());
        assert!(check_topic("").is_err());
        assert!(check_topic("a b").is_err());
        assert!(check_topic(&"x".repeat(MAX_TOPIC_BYTES + 1)).is_err());
    }
}
