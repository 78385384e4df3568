//! Local topic subscriptions and fan-out to the connections of this node.
//!
//! Each message is serialized once into a `msg` frame ([`Utf8Bytes`], a reference-counted
//! buffer) and the same buffer is queued to every subscriber: fan-out costs one atomic increment
//! and one queue push per subscriber, never a copy or a re-serialization. A publisher that reads
//! several messages at once delivers them with [`Hub::deliver_batched`], which wakes each
//! subscriber's writer once for the whole batch (see [`crate::queue`]'s deferred wake-ups), so
//! the writer sends the batch in one syscall.
//!
//! Every connection has a bounded send queue. A subscriber whose queue is full is not waited for:
//! it is closed with `SLOW_CONSUMER` (4001) and counted, so one slow client never slows the others
//! nor grows the node's memory.
//!
//! The hub also owns the node's *interest* — the set of topics some local connection subscribes
//! to — and bumps a version whenever that set changes, so the relay can tell peer nodes which
//! topics to send here.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::ws::{Message, Utf8Bytes};
use streamfarm_core::protocol::{Encoding, ServerFrame, close};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::{self, Metrics};
use crate::queue::{PushError, SendQueue, Wakes};

/// Writers to wake once a publisher's batch of messages is queued.
pub(crate) type FrameWakes = Wakes<Message>;

/// Identifies one streaming connection within this node.
pub(crate) type ConnId = u64;

/// Asks a connection to close with a code and reason; the first request wins.
#[derive(Debug, Clone, Default)]
pub(crate) struct Closer {
    token: CancellationToken,
    reason: Arc<Mutex<Option<(u16, String)>>>,
}

impl Closer {
    /// Requests the close. Later requests keep the first reason.
    pub(crate) fn close(&self, code: u16, reason: &str) {
        {
            let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some((code, reason.to_string()));
            }
        }
        self.token.cancel();
    }

    /// Resolves once a close is requested.
    pub(crate) async fn closed(&self) {
        self.token.cancelled().await
    }

    /// Whether a close was requested.
    pub(crate) fn is_closed(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The requested close code and reason, if any.
    pub(crate) fn reason(&self) -> Option<(u16, String)> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// What the hub holds of one connection: where to queue frames and how to close it.
#[derive(Debug, Clone)]
pub(crate) struct Outlet {
    pub(crate) queue: Arc<SendQueue<Message>>,
    pub(crate) closer: Closer,
}

impl Outlet {
    /// Queues a frame without waiting; a full queue closes the connection as a slow consumer.
    /// Returns whether the frame was queued.
    pub(crate) fn offer(&self, frame: Message, metrics: &Metrics) -> bool {
        let mut wakes = FrameWakes::default();
        self.offer_deferred(frame, metrics, &mut wakes)
    }

    /// [`Outlet::offer`], leaving the writer's wake-up to `wakes`.
    fn offer_deferred(&self, frame: Message, metrics: &Metrics, wakes: &mut FrameWakes) -> bool {
        match self.queue.push_deferred(frame) {
            Ok(wake) => {
                if wake {
                    wakes.add(&self.queue);
                }
                true
            }
            Err(PushError::Full) => {
                if !self.closer.is_closed() {
                    metrics::inc(&metrics.slow_consumers);
                    warn!("closing slow consumer: send queue full");
                    self.closer
                        .close(close::SLOW_CONSUMER, "slow consumer: send queue full");
                }
                false
            }
            Err(PushError::Closed) => false,
        }
    }
}

/// Topics, subscribers and open connections of this node.
#[derive(Debug)]
pub(crate) struct Hub {
    /// topic → subscribers. Read-locked by every publish, write-locked by (un)subscribe.
    topics: RwLock<HashMap<String, HashMap<ConnId, Outlet>>>,
    /// Every open connection, so drain and shutdown can close them.
    sessions: Mutex<HashMap<ConnId, Closer>>,
    next_id: AtomicU64,
    /// Bumped whenever the set of subscribed topics changes.
    interest_tx: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        Hub {
            topics: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            interest_tx: watch::channel(0).0,
            metrics,
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Registers a new connection; it counts as a user until [`Hub::unregister`].
    pub(crate) fn register(&self, closer: Closer) -> ConnId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock_sessions().insert(id, closer);
        metrics::inc(&self.metrics.connections);
        metrics::inc(&self.metrics.connections_accepted);
        id
    }

    /// Forgets a connection and all its subscriptions.
    pub(crate) fn unregister(&self, id: ConnId, topics: &HashSet<String>) {
        self.unsubscribe(id, topics.iter().map(String::as_str));
        if self.lock_sessions().remove(&id).is_some() {
            metrics::dec(&self.metrics.connections);
        }
    }

    /// Closers of every open connection.
    pub(crate) fn sessions(&self) -> Vec<Closer> {
        self.lock_sessions().values().cloned().collect()
    }

    /// Subscribes a connection; returns the topics that were new for it.
    pub(crate) fn subscribe<'a>(
        &self,
        id: ConnId,
        outlet: &Outlet,
        topics: impl IntoIterator<Item = &'a str>,
    ) -> usize {
        let mut added = 0;
        let mut interest_changed = false;
        {
            let mut map = self.topics.write().unwrap_or_else(|e| e.into_inner());
            for topic in topics {
                let subscribers = map.entry(topic.to_string()).or_insert_with(|| {
                    interest_changed = true;
                    HashMap::new()
                });
                if subscribers.insert(id, outlet.clone()).is_none() {
                    added += 1;
                }
            }
        }
        metrics::add(&self.metrics.subscriptions, added as u64);
        if interest_changed {
            self.interest_tx.send_modify(|v| *v += 1);
        }
        added
    }

    /// Unsubscribes a connection from topics it may or may not hold.
    pub(crate) fn unsubscribe<'a>(&self, id: ConnId, topics: impl IntoIterator<Item = &'a str>) {
        let mut removed = 0u64;
        let mut interest_changed = false;
        {
            let mut map = self.topics.write().unwrap_or_else(|e| e.into_inner());
            for topic in topics {
                if let Some(subscribers) = map.get_mut(topic) {
                    if subscribers.remove(&id).is_some() {
                        removed += 1;
                    }
                    if subscribers.is_empty() {
                        map.remove(topic);
                        interest_changed = true;
                    }
                }
            }
        }
        self.metrics
            .subscriptions
            .fetch_sub(removed, Ordering::Relaxed);
        if interest_changed {
            self.interest_tx.send_modify(|v| *v += 1);
        }
    }

    /// Queues a `msg` frame to every local subscriber of `topic` and wakes their writers;
    /// returns how many got it.
    #[cfg(test)]
    pub(crate) fn deliver(&self, topic: &str, frame: &Utf8Bytes) -> usize {
        let mut wakes = FrameWakes::default();
        self.deliver_batched(topic, frame, &mut wakes)
    }

    /// Queues a `msg` frame to every local subscriber of `topic`; returns how many got it. Their
    /// writers are woken by `wakes`: at the latest once it holds [`Wakes::MAX_MESSAGES`]
    /// messages, or when the caller wakes or drops it.
    pub(crate) fn deliver_batched(
        &self,
        topic: &str,
        frame: &Utf8Bytes,
        wakes: &mut FrameWakes,
    ) -> usize {
        let delivered = {
            let map = self.topics.read().unwrap_or_else(|e| e.into_inner());
            let Some(subscribers) = map.get(topic) else {
                return 0;
            };
            let mut delivered = 0;
            for outlet in subscribers.values() {
                if outlet.offer_deferred(Message::Text(frame.clone()), &self.metrics, wakes) {
                    delivered += 1;
                }
            }
            delivered
        };
        wakes.message_done();
        metrics::add(&self.metrics.messages_delivered, delivered as u64);
        debug!(topic, delivered, "delivered");
        delivered
    }

    /// The topics some local connection subscribes to, with the interest version they belong to.
    pub(crate) fn interest(&self) -> (u64, HashSet<String>) {
        let map = self.topics.read().unwrap_or_else(|e| e.into_inner());
        // Read the version under the lock: writers bump it after releasing the lock, so the
        // version read here is never newer than the set.
        let version = *self.interest_tx.borrow();
        (version, map.keys().cloned().collect())
    }

    /// The current interest version (see [`Hub::interest`]).
    pub(crate) fn interest_version(&self) -> u64 {
        *self.interest_tx.borrow()
    }

    /// Watches the interest version.
    pub(crate) fn interest_watch(&self) -> watch::Receiver<u64> {
        self.interest_tx.subscribe()
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, Closer>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The next item of `stream`; whenever none is ready yet, first wakes the writers of what was
/// delivered so far. A publisher's reader awaits this, so the messages it can read at once are
/// delivered as one batch (see [`crate::queue`]'s deferred wake-ups), and no writer waits while
/// the reader itself waits for input.
pub(crate) fn next_or_wake<'a, S>(
    stream: &'a mut S,
    wakes: &'a mut FrameWakes,
) -> impl std::future::Future<Output = Option<S::Item>> + 'a
where
    S: futures_util::Stream + Unpin,
{
    use futures_util::StreamExt;
    std::future::poll_fn(move |cx| {
        let next = stream.poll_next_unpin(cx);
        if next.is_pending() {
            wakes.wake_all();
        }
        next
    })
}

/// Serializes a `msg` frame once, for every subscriber and peer node.
pub(crate) fn msg_frame(topic: &str, data: String, encoding: Encoding) -> Utf8Bytes {
    let frame = ServerFrame::Msg {
        topic: topic.to_string(),
        data,
        encoding,
    };
    Utf8Bytes::from(serde_json::to_string(&frame).expect("frames always serialize"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlet(capacity: usize) -> (Outlet, Arc<SendQueue<Message>>) {
        let queue = Arc::new(SendQueue::new(capacity));
        (
            Outlet {
                queue: queue.clone(),
                closer: Closer::default(),
            },
            queue,
        )
    }

    #[test]
    fn one_serialized_frame_reaches_every_subscriber() {
        let hub = Hub::new(Arc::default());
        let (a, a_rx) = outlet(4);
        let (b, b_rx) = outlet(4);
        let a_id = hub.register(a.closer.clone());
        let b_id = hub.register(b.closer.clone());
        hub.subscribe(a_id, &a, ["t"]);
        hub.subscribe(b_id, &b, ["t", "u"]);
        let frame = msg_frame("t", "hi".into(), Encoding::Utf8);
        assert_eq!(hub.deliver("t", &frame), 2);
        assert_eq!(hub.deliver("nobody", &frame), 0);
        let (Message::Text(got_a), Message::Text(got_b)) =
            (a_rx.try_pop().unwrap(), b_rx.try_pop().unwrap())
        else {
            panic!("text frames expected")
        };
        // Same buffer, not a copy.
        assert_eq!(got_a.as_str().as_ptr(), got_b.as_str().as_ptr());
        assert_eq!(got_a.as_str(), r#"{"type":"msg","topic":"t","data":"hi"}"#);
    }

    #[test]
    fn full_queue_closes_only_the_slow_subscriber() {
        let hub = Hub::new(Arc::default());
        let (slow, _slow_rx) = outlet(1);
        let (fast, fast_rx) = outlet(8);
        let slow_id = hub.register(slow.closer.clone());
        let fast_id = hub.register(fast.closer.clone());
        hub.subscribe(slow_id, &slow, ["t"]);
        hub.subscribe(fast_id, &fast, ["t"]);
        let frame = msg_frame("t", "x".into(), Encoding::Utf8);
        hub.deliver("t", &frame);
        hub.deliver("t", &frame);
        assert_eq!(
            slow.closer.reason().map(|r| r.0),
            Some(close::SLOW_CONSUMER)
        );
        assert!(!fast.closer.is_closed());
        assert!(fast_rx.try_pop().is_some() && fast_rx.try_pop().is_some());
        assert_eq!(hub.metrics().slow_consumers.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_batch_wakes_each_writer_once() {
        let hub = Hub::new(Arc::default());
        let (a, a_rx) = outlet(8);
        let a_id = hub.register(a.closer.clone());
        hub.subscribe(a_id, &a, ["t"]);
        let frame = msg_frame("t", "x".into(), Encoding::Utf8);
        let mut wakes = FrameWakes::default();
        for _ in 0..3 {
            assert_eq!(hub.deliver_batched("t", &frame, &mut wakes), 1);
        }
        // One wake for the queue that went from empty to not empty, none for the others.
        assert_eq!(wakes.pending(), 1);
        wakes.wake_all();
        assert_eq!(wakes.pending(), 0);
        assert!((0..3).all(|_| a_rx.try_pop().is_some()));
    }

    #[test]
    fn interest_changes_only_when_the_topic_set_changes() {
        let hub = Hub::new(Arc::default());
        let (a, _a_rx) = outlet(1);
        let (b, _b_rx) = outlet(1);
        let a_id = hub.register(a.closer.clone());
        let b_id = hub.register(b.closer.clone());
        hub.subscribe(a_id, &a, ["t"]);
        let (v1, topics) = hub.interest();
        assert_eq!(topics, HashSet::from(["t".to_string()]));
        hub.subscribe(b_id, &b, ["t"]);
        assert_eq!(hub.interest().0, v1);
        hub.unregister(a_id, &HashSet::from(["t".to_string()]));
        assert_eq!(hub.interest().0, v1);
        hub.unregister(b_id, &HashSet::from(["t".to_string()]));
        let (v2, topics) = hub.interest();
        assert!(v2 > v1 && topics.is_empty());
        assert_eq!(hub.metrics().connections.load(Ordering::Relaxed), 0);
        assert_eq!(hub.metrics().subscriptions.load(Ordering::Relaxed), 0);
    }
}
