//! One streaming connection: the WebSocket protocol of `docs/PROTOCOL.md`, server side.
//!
//! A session is one task running two halves side by side:
//! - the **reader** parses client frames (`sub`, `unsub`, `pub`, `list`, `ping`, `pong`), answers
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
use streamfarm_core::protocol::{ClientFrame, Encoding, Position, ServerFrame, close};
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info};

use crate::Shared;
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

/// Serves one accepted streaming connection until it closes.
pub(crate) async fn serve(socket: WebSocket, shared: Arc<Shared>) {
    let closer = Closer::default();
    let id = shared.hub.register(closer.clone());
    let queue = Arc::new(SendQueue::new(shared.config.send_queue));
    let outlet = Outlet {
        queue: queue.clone(),
        closer: closer.clone(),
    };
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
    };
    reader.greet();
    let hub = shared.hub.clone();
    let (stream, ()) = tokio::join!(
        async {
            let stream = reader.run(stream).await;
            reader.wakes.wake_all();
            // No longer a user from the moment it is closing, even while the writer still
            // flushes the close frame.
            hub.unregister(id, &reader.topics);
            stream
        },
        write(
            sink,
            &queue,
            closer.clone(),
            shared.config.heartbeat_interval(),
            shared.config.heartbeat_timeout()
        )
    );
    queue.close();
    let (code, reason) = closer.reason().unwrap_or((NORMAL, String::new()));
    // We closed first: read until the client's close so that unread input does not make the
    // kernel reset the connection before the client has read our close frame.
    if let Some(mut stream) = stream
        && code != close::SLOW_CONSUMER
    {
        let _ = timeout(CLOSE_FLUSH, async {
            while let Some(Ok(message)) = stream.next().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
    debug!(conn = id, code, reason, "connection closed");
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
            tokio::select! {
                _ = closer.closed() => return Some(stream),
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
            ClientFrame::Ping { id } => self.send(&ServerFrame::Pong { id }),
            ClientFrame::Pong { .. } => {}
        }
        true
    }

    async fn subscribe(&mut self, topics: Vec<String>, positions: BTreeMap<String, Position>) {
        // Nothing of ours waits while we wait for the peers.
        self.wakes.wake_all();
        if let Some(problem) = topics.iter().find_map(|t| check_topic(t).err()) {
            self.error("bad_topic", problem);
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
    fn topics_are_checked() {
        assert!(check_topic("prices.eur").is_ok());
        assert!(check_topic("").is_err());
        assert!(check_topic("a b").is_err());
        assert!(check_topic(&"x".repeat(MAX_TOPIC_BYTES + 1)).is_err());
    }
}
