//! Local topic subscriptions, each topic's delivery stream, and fan-out to the connections of
//! this node.
//!
//! Each message is serialized once into a `msg` frame ([`Utf8Bytes`], a reference-counted
//! buffer) and the same buffer is queued to every subscriber: fan-out costs one atomic increment
//! and one queue push per subscriber, never a copy or a re-serialization. A reader that gets
//! several messages at once delivers them with one [`FrameWakes`] batch, which wakes each
//! subscriber's writer once for the whole batch (see [`crate::queue`]'s deferred wake-ups), so
//! the writer sends the batch in one syscall.
//!
//! Each topic has one **stream** ([`Hub::deliver`]): messages are delivered in offset order,
//! a duplicate is dropped, and messages after a hole are held back until the broker has fetched
//! the hole ([`Hub::merge`]). The stream keeps the topic's recent history (a [`Log`]), from
//! which a connection that subscribes with a position is sent what it missed: it **joins**
//! ([`Hub::join`]) under the write lock, between two messages of the stream, so it gets every
//! message after its position exactly once.
//!
//! Every connection has a bounded send queue. A subscriber whose queue is full is not waited for:
//! it is closed with `SLOW_CONSUMER` (4001) and counted, so one slow client never slows the others
//! nor grows the node's memory.
//!
//! The hub also owns the node's *interest* — the set of topics some local connection subscribes
//! to (or is subscribing to) — and bumps a version whenever that set changes, so the relay can
//! tell peer nodes which topics to send here; and the node's users, the count the farm sees.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::ws::{Message, Utf8Bytes};
use futures_util::task::AtomicWaker;
use streamfarm_core::protocol::{Encoding, Epoch, GapReason, Position, ServerFrame, close};
use tokio::sync::{Notify, watch};
use tracing::warn;

use crate::broker::log::{Entry, Limits, Log, Offered};
use crate::broker::placement::{PARTITIONS, partition};
use crate::broker::wire::{LogState, WireEntry};
use crate::interest::InterestLog;
use crate::metrics::{self, Metrics};
use crate::queue::{PushError, SendQueue, Wakes};

/// Writers to wake once a publisher's batch of messages is queued.
pub(crate) type FrameWakes = Wakes<Message>;

/// Identifies one streaming connection within this node.
pub(crate) type ConnId = u64;

/// Asks a connection to close with a code and reason; the first request wins.
///
/// One allocation per connection, and nothing to keep in the waiting task's state: a session
/// polls it ([`Closer::poll_closed`]) with the rest of its connection; relay links await
/// [`Closer::closed`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Closer(Arc<CloseState>);

#[derive(Debug, Default)]
struct CloseState {
    closed: AtomicBool,
    reason: Mutex<Option<(u16, Box<str>)>>,
    /// Tasks waiting in [`Closer::closed`].
    waiters: Notify,
    /// The one task polling [`Closer::poll_closed`].
    poller: AtomicWaker,
}

impl Closer {
    /// Requests the close. Later requests keep the first reason.
    pub(crate) fn close(&self, code: u16, reason: &str) {
        {
            let mut slot = self.0.reason.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_none() {
                *slot = Some((code, reason.into()));
            }
        }
        self.0.closed.store(true, Ordering::Release);
        self.0.waiters.notify_waiters();
        self.0.poller.wake();
    }

    /// Resolves once a close is requested.
    pub(crate) async fn closed(&self) {
        loop {
            let notified = self.0.waiters.notified();
            tokio::pin!(notified);
            // Enabled before looking: a close after the look wakes it.
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// `Ready` once a close is requested; otherwise registers the task's waker (one task only).
    pub(crate) fn poll_closed(&self, cx: &Context<'_>) -> Poll<()> {
        self.0.poller.register(cx.waker());
        if self.is_closed() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Whether a close was requested.
    pub(crate) fn is_closed(&self) -> bool {
        self.0.closed.load(Ordering::Acquire)
    }

    /// The requested close code and reason, if any.
    pub(crate) fn reason(&self) -> Option<(u16, String)> {
        self.0
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|(code, reason)| (*code, reason.to_string()))
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
    pub(crate) fn offer_deferred(
        &self,
        frame: Message,
        metrics: &Metrics,
        wakes: &mut FrameWakes,
    ) -> bool {
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

/// What the hub holds of one open connection besides its topics.
#[derive(Debug)]
struct Session {
    outlet: Outlet,
    opened: Instant,
    /// The client announced the `migrate` feature.
    migrates: bool,
    /// Which farm list changes it is pushed.
    watch: Watch,
    /// Subscriptions under way (reserved, not yet joined): a connection that is subscribing is
    /// not picked to move, nor closed for not moving, until it has its `subscribed`.
    subscribing: u32,
}

/// Which changes of the farm list a connection is pushed (`list` with `watch`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Watch {
    #[default]
    Nothing,
    /// Changes of membership: a server joins, leaves or changes status.
    Members,
    /// Every change, users included.
    Users,
}

/// The open connections, and those told to move.
#[derive(Debug, Default)]
struct Sessions {
    open: HashMap<ConnId, Session>,
    /// Connections told to move (a `migrate` sent, or a `4000` close), with when.
    moving: HashMap<ConnId, Instant>,
    /// When a moved client last arrived here.
    last_migrant: Option<Instant>,
}

/// A connection picked to move.
#[derive(Debug, Clone)]
pub(crate) struct Mover {
    pub(crate) id: ConnId,
    pub(crate) outlet: Outlet,
    /// It follows `migrate` frames (else it is closed with `4000`).
    pub(crate) migrates: bool,
}

/// One topic as this node delivers it: who receives it, and the stream they receive.
#[derive(Debug, Default)]
struct Topic {
    /// Connections receiving the topic live.
    subscribers: HashMap<ConnId, Outlet>,
    /// Connections subscribing but not yet receiving (their missed messages are being fetched):
    /// they count in the node's interest already, so that nothing published meanwhile is lost.
    joining: HashSet<ConnId>,
    stream: Mutex<Stream>,
}

impl Topic {
    fn is_empty(&self) -> bool {
        self.subscribers.is_empty() && self.joining.is_empty()
    }
}

/// The messages of a topic this node has delivered, in order, and those that came early.
#[derive(Debug, Default)]
struct Stream {
    /// What was delivered (and is kept for recovery); `None` until the position is known.
    log: Option<Log>,
    /// Messages that arrived ahead of a hole, by offset, until the hole is filled.
    early: BTreeMap<u64, (Epoch, Entry)>,
}

/// Most messages held back behind one hole of one topic; beyond, the newest are dropped (and
/// fetched again once the hole is filled).
const MAX_EARLY: usize = 4096;

/// What [`Hub::deliver`] did with a message.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Delivered {
    /// Connections that were queued a message (counting each message).
    pub(crate) count: usize,
    /// Messages are missing before this one: the stream's position, to fetch what follows it.
    pub(crate) missing_after: Option<Position>,
}

/// What a connection asks of one topic when it subscribes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// Live messages only.
    Live,
    /// The messages after this position first.
    After(Position),
}

/// Topics, subscribers and open connections of this node.
#[derive(Debug)]
pub(crate) struct Hub {
    /// topic → its subscribers and stream. Read-locked by every delivery, write-locked by
    /// (un)subscribing, so that a connection joins a topic's stream between two messages.
    topics: RwLock<HashMap<String, Topic>>,
    /// The names of `topics` by partition (see `crate::broker::placement`), changed under the
    /// topics' write lock: a claim asks for what this node holds of one partition, and must not
    /// look at every topic to find it.
    by_partition: Mutex<Vec<HashSet<String>>>,
    /// Every open connection, so rebalancing, drain and shutdown can move or close them.
    sessions: Mutex<Sessions>,
    next_id: AtomicU64,
    /// Bumped whenever the set of subscribed topics changes.
    /// The interest version, for the relay links to wake on (see [`Hub::interest_since`]).
    interest_tx: watch::Sender<u64>,
    /// The interest's recent changes, recorded under the topics' write lock so that versions
    /// follow the order of the changes.
    interest_log: Mutex<InterestLog>,
    metrics: Arc<Metrics>,
    limits: Limits,
}

impl Hub {
    pub(crate) fn new(metrics: Arc<Metrics>, limits: Limits) -> Self {
        Hub {
            topics: RwLock::new(HashMap::new()),
            by_partition: Mutex::new(vec![HashSet::new(); PARTITIONS]),
            sessions: Mutex::new(Sessions::default()),
            next_id: AtomicU64::new(1),
            interest_tx: watch::channel(0).0,
            interest_log: Mutex::new(InterestLog::new(
                rand::random::<u64>().max(1),
                crate::interest::LOG_BYTES,
            )),
            metrics,
            limits,
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Registers a new connection; it counts as a user until [`Hub::unregister`].
    pub(crate) fn register(&self, outlet: Outlet) -> ConnId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            outlet,
            opened: Instant::now(),
            migrates: false,
            watch: Watch::Nothing,
            subscribing: 0,
        };
        self.lock_sessions().open.insert(id, session);
        metrics::inc(&self.metrics.connections);
        metrics::inc(&self.metrics.connections_accepted);
        id
    }

    /// Forgets a connection and all its subscriptions. A connection that was told to move and
    /// left by itself (not closed by this node) counts as a completed migration.
    pub(crate) fn unregister<'a>(&self, id: ConnId, topics: impl IntoIterator<Item = &'a str>) {
        self.unsubscribe(id, topics);
        let mut sessions = self.lock_sessions();
        let told = sessions.moving.remove(&id).is_some();
        if let Some(session) = sessions.open.remove(&id) {
            metrics::dec(&self.metrics.connections);
            let closed_here = matches!(
                session.outlet.closer.reason(),
                Some((code, _)) if code == close::RECONNECT_ELSEWHERE || code == close::GOING_AWAY
            );
            if told && !closed_here {
                metrics::inc(&self.metrics.migrations_completed);
            }
        }
    }

    /// The connection's `hello`: whether it follows `migrate` frames, and whether it is the new
    /// end of a migration (this node then counts as receiving moved clients).
    pub(crate) fn hello(&self, id: ConnId, migrates: bool, migrating: bool) {
        let mut sessions = self.lock_sessions();
        if let Some(session) = sessions.open.get_mut(&id) {
            session.migrates = migrates;
        }
        if migrating {
            sessions.last_migrant = Some(Instant::now());
            metrics::inc(&self.metrics.migrations_received);
        }
    }

    /// Which farm list changes connection `id` is pushed from now on.
    pub(crate) fn watch(&self, id: ConnId, watch: Watch) {
        if let Some(session) = self.lock_sessions().open.get_mut(&id) {
            session.watch = watch;
        }
    }

    /// Outlets of the connections that watch `watch`.
    pub(crate) fn watchers(&self, watch: Watch) -> Vec<Outlet> {
        self.lock_sessions()
            .open
            .values()
            .filter(|s| s.watch == watch)
            .map(|s| s.outlet.clone())
            .collect()
    }

    /// Outlets of every open connection.
    pub(crate) fn outlets(&self) -> Vec<Outlet> {
        self.lock_sessions()
            .open
            .values()
            .map(|s| s.outlet.clone())
            .collect()
    }

    /// When a moved client last arrived here.
    pub(crate) fn last_migrant(&self) -> Option<Instant> {
        self.lock_sessions().last_migrant
    }

    /// Up to `n` connections not yet told to move, opened before `opened_before` (all of them
    /// with `None`), marked as told now.
    pub(crate) fn pick_movers(&self, n: usize, opened_before: Option<Instant>) -> Vec<Mover> {
        let now = Instant::now();
        let mut sessions = self.lock_sessions();
        let Sessions { open, moving, .. } = &mut *sessions;
        let picked: Vec<Mover> = open
            .iter()
            .filter(|(id, s)| {
                !moving.contains_key(id)
                    && s.subscribing == 0
                    && !s.outlet.closer.is_closed()
                    && opened_before.is_none_or(|before| s.opened <= before)
            })
            .take(n)
            .map(|(id, s)| Mover {
                outlet: s.outlet.clone(),
                migrates: s.migrates,
                id: *id,
            })
            .collect();
        for mover in &picked {
            moving.insert(mover.id, now);
        }
        picked
    }

    /// Connections told to move that are still here.
    pub(crate) fn moving(&self) -> usize {
        self.lock_sessions().moving.len()
    }

    /// Forgets every move asked and not made: those clients stay (a cut-off node back in touch).
    pub(crate) fn forget_moves(&self) {
        self.lock_sessions().moving.clear();
    }

    /// Connections told to move at least `deadline` ago and still here: to be closed.
    pub(crate) fn overdue(&self, deadline: std::time::Duration) -> Vec<Outlet> {
        let now = Instant::now();
        let sessions = self.lock_sessions();
        sessions
            .moving
            .iter()
            .filter(|(_, told)| now.saturating_duration_since(**told) >= deadline)
            .filter_map(|(id, _)| sessions.open.get(id))
            .filter(|s| s.subscribing == 0 && !s.outlet.closer.is_closed())
            .map(|s| s.outlet.clone())
            .collect()
    }

    /// Closers of every open connection.
    pub(crate) fn sessions(&self) -> Vec<Closer> {
        self.lock_sessions()
            .open
            .values()
            .map(|s| s.outlet.closer.clone())
            .collect()
    }

    /// Open connections (the node's users).
    pub(crate) fn users(&self) -> u64 {
        self.lock_sessions().open.len() as u64
    }

    /// Connections accepted since the node started.
    pub(crate) fn accepted(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed) - 1
    }

    fn write_topics(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Topic>> {
        self.topics.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read_topics(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Topic>> {
        self.topics.read().unwrap_or_else(|e| e.into_inner())
    }

    /// First step of subscribing: the topics join the node's interest for connection `id`,
    /// which receives nothing of them until [`Hub::join`].
    pub(crate) fn reserve<'a>(&self, id: ConnId, topics: impl IntoIterator<Item = &'a str>) {
        if let Some(session) = self.lock_sessions().open.get_mut(&id) {
            session.subscribing += 1;
        }
        let mut added: Vec<&str> = Vec::new();
        let version = {
            let mut map = self.write_topics();
            for topic in topics {
                let entry = map.entry(topic.to_string()).or_insert_with(|| {
                    added.push(topic);
                    Topic::default()
                });
                if !entry.subscribers.contains_key(&id) {
                    entry.joining.insert(id);
                }
            }
            let mut by_partition = lock(&self.by_partition);
            for topic in &added {
                by_partition[partition(topic)].insert(topic.to_string());
            }
            lock(&self.interest_log).record(added.iter().copied(), [])
        };
        if !added.is_empty() {
            self.interest_tx.send_replace(version);
        }
    }

    /// Whether the stream of `topic` cannot serve `resume` from what this node holds: its
    /// position is unknown, or the messages asked for are older than its history.
    pub(crate) fn needs_fetch(&self, topic: &str, resume: Resume) -> bool {
        let map = self.read_topics();
        let Some(entry) = map.get(topic) else {
            return true;
        };
        let stream = lock(&entry.stream);
        match (&stream.log, resume) {
            (None, _) => true,
            (Some(_), Resume::Live) => false,
            (Some(log), Resume::After(p)) => p.epoch != log.epoch() || p.offset + 1 < log.first(),
        }
    }

    /// Second step of subscribing: queues the `subscribed` frame (with each topic's position),
    /// then per topic what `resume` asks for — a `gap` for what is gone, the missed messages —
    /// and makes the connection a live subscriber, all between two messages of each topic.
    /// Returns the number of subscriptions added.
    pub(crate) fn join(
        &self,
        id: ConnId,
        outlet: &Outlet,
        topics: &[(String, Resume)],
        wakes: &mut FrameWakes,
    ) -> usize {
        let mut map = self.write_topics();
        let mut positions = BTreeMap::new();
        let mut backlog: Vec<Message> = Vec::new();
        for (topic, resume) in topics {
            let Some(entry) = map.get(topic) else {
                continue;
            };
            let stream = lock(&entry.stream);
            let Some(log) = &stream.log else {
                // The position could not be learnt: say so for what the client holds.
                if let Resume::After(p) = resume {
                    backlog.push(gap_frame(
                        topic,
                        p.epoch,
                        p.offset + 1,
                        None,
                        GapReason::Unavailable,
                    ));
                }
                continue;
            };
            positions.insert(topic.clone(), log.position());
            let Resume::After(p) = *resume else {
                continue;
            };
            let from = if p.epoch == log.epoch() {
                p.offset
            } else {
                // The client's epoch is gone: the rest of it is lost; this one's is all new.
                backlog.push(gap_frame(
                    topic,
                    p.epoch,
                    p.offset + 1,
                    None,
                    GapReason::EpochLost,
                ));
                0
            };
            if from + 1 < log.first() {
                backlog.push(gap_frame(
                    topic,
                    log.epoch(),
                    from + 1,
                    Some(log.first() - 1),
                    GapReason::HistoryExceeded,
                ));
            }
            backlog.extend(log.after(from).map(|e| Message::Text(e.frame.clone())));
        }
        outlet.offer_deferred(
            encode(&ServerFrame::Subscribed {
                topics: topics.iter().map(|(t, _)| t.clone()).collect(),
                positions,
            }),
            &self.metrics,
            wakes,
        );
        let recovered = backlog.len();
        for frame in backlog {
            outlet.offer_deferred(frame, &self.metrics, wakes);
        }
        metrics::add(&self.metrics.messages_recovered, recovered as u64);
        let mut added = 0;
        for (topic, _) in topics {
            let entry = map.entry(topic.clone()).or_insert_with(|| {
                lock(&self.by_partition)[partition(topic)].insert(topic.clone());
                Topic::default()
            });
            entry.joining.remove(&id);
            if entry.subscribers.insert(id, outlet.clone()).is_none() {
                added += 1;
            }
        }
        drop(map);
        if let Some(session) = self.lock_sessions().open.get_mut(&id) {
            session.subscribing = session.subscribing.saturating_sub(1);
        }
        metrics::add(&self.metrics.subscriptions, added as u64);
        added
    }

    /// Unsubscribes a connection from topics it may or may not hold.
    pub(crate) fn unsubscribe<'a>(&self, id: ConnId, topics: impl IntoIterator<Item = &'a str>) {
        let mut removed = 0u64;
        let mut gone_topics: Vec<&str> = Vec::new();
        let version = {
            let mut map = self.write_topics();
            for topic in topics {
                if let Some(entry) = map.get_mut(topic) {
                    if entry.subscribers.remove(&id).is_some() {
                        removed += 1;
                    }
                    entry.joining.remove(&id);
                    if entry.is_empty() {
                        lock(&self.by_partition)[partition(topic)].remove(topic);
                        if let Some(gone) = map.remove(topic) {
                            let bytes = lock(&gone.stream).log.as_ref().map_or(0, Log::bytes);
                            self.metrics
                                .history_bytes
                                .fetch_sub(bytes as u64, Ordering::Relaxed);
                        }
                        gone_topics.push(topic);
                    }
                }
            }
            lock(&self.interest_log).record([], gone_topics.iter().copied())
        };
        self.metrics
            .subscriptions
            .fetch_sub(removed, Ordering::Relaxed);
        if !gone_topics.is_empty() {
            self.interest_tx.send_replace(version);
        }
    }

    /// Delivers the message at `offset` of `epoch` (its client frame `frame`) to every local
    /// subscriber of `topic`, in order: a duplicate is dropped, a message ahead of a hole is
    /// held until the hole is filled ([`Hub::merge`]). Writers are woken by `wakes`: at the
    /// latest once it holds [`Wakes::MAX_MESSAGES`] messages, or when the caller wakes or drops it.
    pub(crate) fn deliver(
        &self,
        topic: &str,
        epoch: Epoch,
        entry: Entry,
        wakes: &mut FrameWakes,
    ) -> Delivered {
        let map = self.read_topics();
        let Some(topic_entry) = map.get(topic) else {
            return Delivered::default();
        };
        let mut stream = lock(&topic_entry.stream);
        let mut delivered = Delivered::default();
        let stream = &mut *stream;
        let log = stream
            .log
            .get_or_insert_with(|| Log::new(epoch, entry.offset - 1));
        let bytes_before = log.bytes();
        match log.offer(epoch, entry.clone()) {
            Offered::Appended => {
                delivered.count +=
                    fan_out(&topic_entry.subscribers, &entry.frame, &self.metrics, wakes);
                // What came early and now follows on.
                while let Some(next) = stream.early.first_entry() {
                    let (next_epoch, next_entry) = next.get().clone();
                    if next_epoch != log.epoch() || *next.key() > log.position().offset + 1 {
                        break;
                    }
                    next.remove();
                    if log.offer(next_epoch, next_entry.clone()) == Offered::Appended {
                        delivered.count += fan_out(
                            &topic_entry.subscribers,
                            &next_entry.frame,
                            &self.metrics,
                            wakes,
                        );
                    }
                }
                if !stream.early.is_empty() {
                    delivered.missing_after = Some(log.position());
                }
            }
            Offered::Duplicate => {}
            Offered::Gap { .. } | Offered::OtherEpoch => {
                if epoch >= log.epoch() && stream.early.len() < MAX_EARLY {
                    stream.early.insert(entry.offset, (epoch, entry));
                }
                delivered.missing_after = Some(log.position());
            }
        }
        log.trim(self.limits, Instant::now());
        self.account(bytes_before, log.bytes());
        wakes.message_done();
        metrics::add(&self.metrics.messages_delivered, delivered.count as u64);
        delivered
    }

    /// Takes in what a fetch brought for `topic`: sets the stream's position if it had none,
    /// adds older history, and delivers to the live subscribers what they had not been sent —
    /// with a `gap` first for what the farm no longer holds, or a whole epoch that was lost.
    pub(crate) fn merge(&self, topic: &str, state: &LogState, wakes: &mut FrameWakes) {
        let map = self.read_topics();
        let Some(topic_entry) = map.get(topic) else {
            return;
        };
        let mut stream = lock(&topic_entry.stream);
        let stream = &mut *stream;
        let entries: Vec<Entry> = state
            .entries
            .iter()
            .map(|e| entry_from_wire(topic, state.epoch, e))
            .collect();
        let subscribers = &topic_entry.subscribers;
        let mut count = 0;
        let bytes_before = stream.log.as_ref().map_or(0, Log::bytes);
        let log = match &mut stream.log {
            Some(log) if log.epoch() == state.epoch => log,
            Some(log) if log.epoch() > state.epoch => return,
            other => {
                if let Some(old) = other.as_ref() {
                    let frame = gap_frame(
                        topic,
                        old.epoch(),
                        old.position().offset + 1,
                        None,
                        GapReason::EpochLost,
                    );
                    for outlet in subscribers.values() {
                        outlet.offer_deferred(frame.clone(), &self.metrics, wakes);
                    }
                }
                // Delivered from the start of what the state holds: it is all new here.
                let base = if other.is_some() {
                    state.first() - 1
                } else {
                    state.last
                };
                *other = Some(Log::new(state.epoch, base));
                other.as_mut().expect("just set")
            }
        };
        let known = log.position().offset;
        log.prepend(&entries);
        if state.first() > known + 1 && state.last > known {
            // The farm no longer holds what lies between: tell, then go on after it.
            let frame = gap_frame(
                topic,
                state.epoch,
                known + 1,
                Some(state.first() - 1),
                GapReason::HistoryExceeded,
            );
            for outlet in subscribers.values() {
                outlet.offer_deferred(frame.clone(), &self.metrics, wakes);
            }
            *log = Log::new(state.epoch, state.first() - 1);
        }
        let ahead = stream.early.split_off(&0);
        for entry in entries.into_iter().chain(
            ahead
                .into_values()
                .filter(|(e, _)| *e == state.epoch)
                .map(|(_, entry)| entry),
        ) {
            if log.offer(state.epoch, entry.clone()) == Offered::Appended {
                count += fan_out(subscribers, &entry.frame, &self.metrics, wakes);
            }
        }
        log.trim(self.limits, Instant::now());
        let bytes_after = log.bytes();
        self.account(bytes_before, bytes_after);
        wakes.message_done();
        metrics::add(&self.metrics.messages_delivered, count as u64);
    }

    /// What this node holds of `topic` (for a claim), if it knows the topic's position.
    pub(crate) fn state(&self, topic: &str, after: Option<u64>) -> Option<LogState> {
        self.with_log(topic, |log| LogState::of(log, after))
    }

    /// The topics of partition `partition` that some connection here subscribes to.
    pub(crate) fn topics_in_partition(&self, partition: usize) -> Vec<String> {
        lock(&self.by_partition)
            .get(partition)
            .map(|topics| topics.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `f` of the stream of `topic`, if this node knows the topic's position.
    pub(crate) fn with_log<R>(&self, topic: &str, f: impl FnOnce(&Log) -> R) -> Option<R> {
        let map = self.read_topics();
        let stream = lock(&map.get(topic)?.stream);
        stream.log.as_ref().map(f)
    }

    /// The position of every topic's stream that has one.
    pub(crate) fn positions(&self) -> Vec<(String, Position)> {
        let map = self.read_topics();
        map.iter()
            .filter_map(|(topic, entry)| {
                let stream = lock(&entry.stream);
                stream
                    .log
                    .as_ref()
                    .map(|log| (topic.clone(), log.position()))
            })
            .collect()
    }

    /// Drops history beyond the age limit in every stream.
    pub(crate) fn trim(&self, now: Instant) {
        let map = self.read_topics();
        for entry in map.values() {
            let mut stream = lock(&entry.stream);
            if let Some(log) = &mut stream.log {
                let before = log.bytes();
                log.trim(self.limits, now);
                self.account(before, log.bytes());
            }
        }
    }

    fn account(&self, before: usize, after: usize) {
        if after >= before {
            metrics::add(&self.metrics.history_bytes, (after - before) as u64);
        } else {
            self.metrics
                .history_bytes
                .fetch_sub((before - after) as u64, Ordering::Relaxed);
        }
    }

    /// The topics some local connection subscribes to, with the interest's run and the version
    /// they belong to.
    pub(crate) fn interest(&self) -> (u64, u64, Vec<String>) {
        let map = self.read_topics();
        // Read the version under the lock: writers record it under the write lock.
        let log = lock(&self.interest_log);
        (log.run(), log.version(), map.keys().cloned().collect())
    }

    /// The changes `(version, added, removed)` that take a peer holding `version` of the
    /// interest's run `run` to the current version; `None` when only the whole set can (see
    /// [`InterestLog::since`]).
    pub(crate) fn interest_since(
        &self,
        run: u64,
        version: u64,
    ) -> Option<(u64, Vec<String>, Vec<String>)> {
        let log = lock(&self.interest_log);
        let (added, removed) = log.since(run, version)?;
        Some((log.version(), added, removed))
    }

    /// How many of `topics` this node's interest lacks, and how many topics it holds.
    pub(crate) fn interest_growth<'a>(
        &self,
        topics: impl IntoIterator<Item = &'a str>,
    ) -> (usize, usize) {
        let map = self.read_topics();
        let new = topics.into_iter().filter(|t| !map.contains_key(*t)).count();
        (new, map.len())
    }

    /// The current interest version (see [`Hub::interest`]).
    pub(crate) fn interest_version(&self) -> u64 {
        lock(&self.interest_log).version()
    }

    /// Watches the interest version.
    pub(crate) fn interest_watch(&self) -> watch::Receiver<u64> {
        self.interest_tx.subscribe()
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Queues `frame` to every subscriber; returns how many took it. A message some subscriber took
/// is observed once in `delivery_seconds` (see [`Metrics::delivery_seconds`]).
fn fan_out(
    subscribers: &HashMap<ConnId, Outlet>,
    frame: &Utf8Bytes,
    metrics: &Metrics,
    wakes: &mut FrameWakes,
) -> usize {
    let taken = subscribers
        .values()
        .filter(|outlet| outlet.offer_deferred(Message::Text(frame.clone()), metrics, wakes))
        .count();
    if taken > 0
        && let Some(accepted) = accepted_ms(frame)
    {
        metrics::observe_since_unix_ms(&metrics.delivery_seconds, accepted);
    }
    taken
}

fn gap_frame(topic: &str, epoch: Epoch, from: u64, to: Option<u64>, reason: GapReason) -> Message {
    encode(&ServerFrame::Gap {
        topic: topic.to_string(),
        epoch,
        from,
        to,
        reason,
    })
}

/// Serializes a server frame (never fails for our types).
pub(crate) fn encode(frame: &ServerFrame) -> Message {
    Message::Text(frame_text(frame))
}

/// A frame's JSON text in a buffer of its exact size. serde_json grows its buffer by doubling,
/// and a frame keeps its whole buffer alive as long as any queue holds it: up to twice the bytes
/// a send queue's byte bound counts for it. (Shrinking reallocates in place.)
fn frame_text(frame: &ServerFrame) -> Utf8Bytes {
    let mut text = serde_json::to_string(frame).expect("frames always serialize");
    text.shrink_to_fit();
    Utf8Bytes::from(text)
}

/// A message of `topic` received from a peer, as a history entry with its client frame.
pub(crate) fn entry_from_wire(topic: &str, epoch: Epoch, wire: &WireEntry) -> Entry {
    Entry {
        offset: wire.offset,
        id: wire.id.clone(),
        frame: msg_frame(
            topic,
            wire.data.clone(),
            wire.encoding,
            Some(Position::new(epoch, wire.offset)),
            wire.ts,
        ),
        stored: Instant::now(),
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

/// Serializes a `msg` frame once, for every subscriber and peer node; `ts` is when the farm
/// accepted it (its sequencer's wall clock, ms since the Unix epoch).
pub(crate) fn msg_frame(
    topic: &str,
    data: String,
    encoding: Encoding,
    position: Option<Position>,
    ts: Option<u64>,
) -> Utf8Bytes {
    let frame = ServerFrame::Msg {
        topic: topic.to_string(),
        data,
        encoding,
        epoch: position.map(|p| p.epoch),
        offset: position.map(|p| p.offset),
        ts,
    };
    frame_text(&frame)
}

/// The `ts` of a `msg` frame as nodes write it: the last field, so it is read from the frame's
/// end without parsing the payload. `None` when the frame ends otherwise (no `ts`). A string
/// cannot end a frame this way: inside one, every `"` is escaped.
fn accepted_ms(frame: &str) -> Option<u64> {
    let body = frame.strip_suffix('}')?;
    let digits = body.len() - body.bytes().rev().take_while(u8::is_ascii_digit).count();
    if !body[..digits].ends_with(r#","ts":"#) {
        return None;
    }
    body[digits..].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::log::PublishId;

    const E: Epoch = Epoch(9);

    fn hub() -> Hub {
        Hub::new(
            Arc::default(),
            Limits {
                bytes: 1 << 20,
                age: std::time::Duration::from_secs(60),
            },
        )
    }

    fn outlet(capacity: usize) -> (Outlet, Arc<SendQueue<Message>>) {
        let queue = Arc::new(SendQueue::new(capacity, usize::MAX));
        (
            Outlet {
                queue: queue.clone(),
                closer: Closer::default(),
            },
            queue,
        )
    }

    fn entry(topic: &str, offset: u64) -> Entry {
        Entry {
            offset,
            id: PublishId::default(),
            frame: msg_frame(
                topic,
                format!("m{offset}"),
                Encoding::Utf8,
                Some(Position::new(E, offset)),
                None,
            ),
            stored: Instant::now(),
        }
    }

    /// Subscribes connection `id` live (no history asked for) and drains the `subscribed` frame.
    fn subscribe(
        hub: &Hub,
        id: ConnId,
        outlet: &Outlet,
        queue: &SendQueue<Message>,
        topics: &[&str],
    ) {
        hub.reserve(id, topics.iter().copied());
        let wanted: Vec<(String, Resume)> = topics
            .iter()
            .map(|t| (t.to_string(), Resume::Live))
            .collect();
        hub.join(id, outlet, &wanted, &mut FrameWakes::default());
        assert!(text(queue.try_pop().unwrap()).contains("subscribed"));
    }

    fn text(message: Message) -> String {
        match message {
            Message::Text(text) => text.as_str().to_string(),
            other => panic!("a text frame expected, got {other:?}"),
        }
    }

    fn deliver(hub: &Hub, topic: &str, offset: u64) -> Delivered {
        hub.deliver(topic, E, entry(topic, offset), &mut FrameWakes::default())
    }

    #[test]
    fn one_serialized_frame_reaches_every_subscriber() {
        let hub = hub();
        let (a, a_rx) = outlet(4);
        let (b, b_rx) = outlet(4);
        let a_id = hub.register(a.clone());
        let b_id = hub.register(b.clone());
        subscribe(&hub, a_id, &a, &a_rx, &["t"]);
        subscribe(&hub, b_id, &b, &b_rx, &["t", "u"]);
        assert_eq!(deliver(&hub, "t", 1).count, 2);
        assert_eq!(deliver(&hub, "nobody", 1).count, 0);
        let (Message::Text(got_a), Message::Text(got_b)) =
            (a_rx.try_pop().unwrap(), b_rx.try_pop().unwrap())
        else {
            panic!("text frames expected")
        };
        // Same buffer, not a copy.
        assert_eq!(got_a.as_str().as_ptr(), got_b.as_str().as_ptr());
        assert_eq!(
            got_a.as_str(),
            r#"{"type":"msg","topic":"t","data":"m1","epoch":"0000000000000009","offset":1}"#
        );
    }

    #[test]
    fn duplicates_are_dropped_and_a_hole_holds_back_what_follows() {
        let hub = hub();
        let (a, a_rx) = outlet(16);
        let id = hub.register(a.clone());
        subscribe(&hub, id, &a, &a_rx, &["t"]);
        assert_eq!(deliver(&hub, "t", 1).count, 1);
        assert_eq!(deliver(&hub, "t", 1).count, 0, "a duplicate");
        let held = deliver(&hub, "t", 4);
        assert_eq!(held.count, 0);
        assert_eq!(held.missing_after, Some(Position::new(E, 1)));
        // The hole is filled by a fetch: 2 and 3, then 4 follows on.
        let fetched = LogState {
            epoch: E,
            last: 3,
            entries: (2..=3)
                .map(|o| WireEntry {
                    offset: o,
                    id: PublishId::default(),
                    data: format!("m{o}"),
                    encoding: Encoding::Utf8,
                    ts: None,
                })
                .collect(),
        };
        hub.merge("t", &fetched, &mut FrameWakes::default());
        let got: Vec<String> = std::iter::from_fn(|| a_rx.try_pop()).map(text).collect();
        let offsets: Vec<bool> = (1..=4)
            .map(|o| {
                got.iter()
                    .filter(|f| f.contains(&format!("\"offset\":{o}}}")))
                    .count()
                    == 1
            })
            .collect();
        assert_eq!(offsets, vec![true; 4], "{got:?}");
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn a_resuming_connection_gets_what_it_missed_then_live() {
        let hub = hub();
        let (first, first_rx) = outlet(16);
        let first_id = hub.register(first.clone());
        subscribe(&hub, first_id, &first, &first_rx, &["t"]);
        for offset in 1..=5 {
            deliver(&hub, "t", offset);
        }
        let (late, late_rx) = outlet(16);
        let late_id = hub.register(late.clone());
        hub.reserve(late_id, ["t"]);
        let resume = Resume::After(Position::new(E, 3));
        assert!(!hub.needs_fetch("t", resume));
        assert!(hub.needs_fetch("other", Resume::Live));
        hub.join(
            late_id,
            &late,
            &[("t".into(), resume)],
            &mut FrameWakes::default(),
        );
        deliver(&hub, "t", 6);
        let got: Vec<String> = std::iter::from_fn(|| late_rx.try_pop()).map(text).collect();
        assert!(
            got[0].contains(r#""positions":{"t":{"epoch":"0000000000000009","offset":5}}"#),
            "{}",
            got[0]
        );
        assert!(got[1].contains(r#""offset":4"#) && got[2].contains(r#""offset":5"#));
        assert!(got[3].contains(r#""offset":6"#));
        assert_eq!(got.len(), 4);
    }

    #[test]
    fn what_history_no_longer_holds_is_reported_as_a_gap() {
        let hub = Hub::new(
            Arc::default(),
            Limits {
                bytes: entry("t", 10).bytes() * 2,
                age: std::time::Duration::from_secs(60),
            },
        );
        let (first, first_rx) = outlet(64);
        let first_id = hub.register(first.clone());
        subscribe(&hub, first_id, &first, &first_rx, &["t"]);
        for offset in 1..=10 {
            deliver(&hub, "t", offset);
        }
        let (late, late_rx) = outlet(16);
        let late_id = hub.register(late.clone());
        hub.reserve(late_id, ["t"]);
        hub.join(
            late_id,
            &late,
            &[("t".into(), Resume::After(Position::new(E, 2)))],
            &mut FrameWakes::default(),
        );
        let got: Vec<String> = std::iter::from_fn(|| late_rx.try_pop()).map(text).collect();
        assert!(
            got[1].contains(r#""type":"gap","topic":"t","epoch":"0000000000000009","from":3,"to":8,"reason":"history_exceeded""#),
            "{got:?}"
        );
        assert!(got[2].contains(r#""offset":9"#) && got[3].contains(r#""offset":10"#));
        // Another epoch than the node's: the rest of it is lost.
        let (other, other_rx) = outlet(16);
        let other_id = hub.register(other.clone());
        hub.reserve(other_id, ["t"]);
        hub.join(
            other_id,
            &other,
            &[("t".into(), Resume::After(Position::new(Epoch(3), 7)))],
            &mut FrameWakes::default(),
        );
        let got: Vec<String> = std::iter::from_fn(|| other_rx.try_pop())
            .map(text)
            .collect();
        assert!(
            got[1].contains(r#""from":8,"reason":"epoch_lost""#),
            "{got:?}"
        );
    }

    #[test]
    fn full_queue_closes_only_the_slow_subscriber() {
        let hub = hub();
        let (slow, slow_rx) = outlet(2);
        let (fast, fast_rx) = outlet(8);
        let slow_id = hub.register(slow.clone());
        let fast_id = hub.register(fast.clone());
        subscribe(&hub, slow_id, &slow, &slow_rx, &["t"]);
        subscribe(&hub, fast_id, &fast, &fast_rx, &["t"]);
        for offset in 1..=3 {
            deliver(&hub, "t", offset);
        }
        assert_eq!(
            slow.closer.reason().map(|r| r.0),
            Some(close::SLOW_CONSUMER)
        );
        assert!(!fast.closer.is_closed());
        assert_eq!((0..3).filter(|_| fast_rx.try_pop().is_some()).count(), 3);
        assert_eq!(hub.metrics().slow_consumers.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_batch_wakes_each_writer_once() {
        let hub = hub();
        let (a, a_rx) = outlet(8);
        let a_id = hub.register(a.clone());
        subscribe(&hub, a_id, &a, &a_rx, &["t"]);
        let mut wakes = FrameWakes::default();
        for offset in 1..=3 {
            assert_eq!(hub.deliver("t", E, entry("t", offset), &mut wakes).count, 1);
        }
        // One wake for the queue that went from empty to not empty, none for the others.
        assert_eq!(wakes.pending(), 1);
        wakes.wake_all();
        assert_eq!(wakes.pending(), 0);
        assert!((0..3).all(|_| a_rx.try_pop().is_some()));
    }

    #[test]
    fn interest_changes_only_when_the_topic_set_changes() {
        let hub = hub();
        let (a, a_rx) = outlet(4);
        let (b, b_rx) = outlet(4);
        let a_id = hub.register(a.clone());
        let b_id = hub.register(b.clone());
        subscribe(&hub, a_id, &a, &a_rx, &["t"]);
        let (run, v1, topics) = hub.interest();
        assert_eq!(topics, vec!["t".to_string()]);
        subscribe(&hub, b_id, &b, &b_rx, &["t"]);
        assert_eq!(hub.interest().1, v1);
        hub.unregister(a_id, ["t"]);
        assert_eq!(hub.interest().1, v1);
        hub.unregister(b_id, ["t"]);
        let (_, v2, topics) = hub.interest();
        assert!(v2 > v1 && topics.is_empty());
        // A peer that held v1 learns just the removal.
        assert_eq!(
            hub.interest_since(run, v1),
            Some((v2, vec![], vec!["t".to_string()]))
        );
        assert_eq!(hub.users(), 0);
        assert_eq!(hub.metrics().subscriptions.load(Ordering::Relaxed), 0);
    }

    fn stamped(topic: &str, offset: u64, ts: u64) -> Entry {
        Entry {
            frame: msg_frame(
                topic,
                format!("m{offset}"),
                Encoding::Utf8,
                Some(Position::new(E, offset)),
                Some(ts),
            ),
            ..entry(topic, offset)
        }
    }

    #[test]
    fn the_acceptance_time_is_read_from_the_frames_end() {
        let frame = msg_frame(
            "t",
            "x".into(),
            Encoding::Utf8,
            None,
            Some(1_796_659_200_123),
        );
        assert!(frame.as_str().ends_with(r#","ts":1796659200123}"#));
        assert_eq!(accepted_ms(&frame), Some(1_796_659_200_123));
        // No ts: whatever the payload holds is not read as one.
        for data in [r#","ts":5}"#, "7", r#""ts":5"#] {
            let frame = msg_frame("t", data.into(), Encoding::Utf8, None, None);
            assert_eq!(accepted_ms(&frame), None, "{}", frame.as_str());
        }
        let positioned = msg_frame(
            "t",
            "x".into(),
            Encoding::Utf8,
            Some(Position::new(E, 3)),
            None,
        );
        assert_eq!(accepted_ms(&positioned), None);
    }

    #[test]
    fn a_delivered_message_is_timed_once_whatever_its_subscribers() {
        let hub = hub();
        let (a, a_rx) = outlet(4);
        let (b, b_rx) = outlet(4);
        let a_id = hub.register(a.clone());
        let b_id = hub.register(b.clone());
        subscribe(&hub, a_id, &a, &a_rx, &["t"]);
        subscribe(&hub, b_id, &b, &b_rx, &["t"]);
        let delivered = |entry| hub.deliver("t", E, entry, &mut FrameWakes::default()).count;
        let now = crate::now_ms();
        // Accepted 40 ms ago: one observation of about 40 ms for two subscribers.
        assert_eq!(delivered(stamped("t", 1, now - 40)), 2);
        assert_eq!(hub.metrics().delivery_seconds.count(), 1);
        let sum = hub.metrics().delivery_seconds.sum();
        assert!((40_000..10_000_000).contains(&sum), "{sum} us");
        // A sequencer's clock ahead of this node's: counted as 0, not as a huge wrap-around.
        assert_eq!(delivered(stamped("t", 2, now + 60_000)), 2);
        assert_eq!(hub.metrics().delivery_seconds.count(), 2);
        assert_eq!(hub.metrics().delivery_seconds.sum(), sum);
        // Unstamped, or taken by nobody: not observed.
        assert_eq!(delivered(entry("t", 3)), 2);
        assert_eq!(
            hub.deliver("u", E, stamped("u", 1, now), &mut FrameWakes::default())
                .count,
            0
        );
        assert_eq!(hub.metrics().delivery_seconds.count(), 2);
    }
}
