//! The broker: the one owner of publishing and subscribing on a node, and of message positions.
//!
//! Sessions and HTTP talk only to [`Broker`]: [`Broker::publish`], [`Broker::subscribe`] (with
//! its confirmation and recovery), [`Broker::unsubscribe`]. Below it, the [`Hub`] holds the local
//! subscribers and each topic's delivery stream, and the [`Relay`] carries frames between nodes.
//!
//! # Positions: one sequencer and one replica per topic
//! Every message of a topic gets a position — an [`Epoch`] and an offset — that is the same on
//! every node. The live nodes of the farm list rank themselves per topic's partition by
//! rendezvous hashing ([`placement`]): the first is the topic's **sequencer**, the second its
//! **replica**. A message
//! published on any node (its *origin*) goes:
//!
//! ```text
//! origin ──pub──▶ sequencer ──repl──▶ replica ──msg──▶ every node with subscribers (and itself)
//!    ▲                                   │
//!    └───────────────ack─────────────────┘
//! ```
//!
//! The sequencer gives the next offset and keeps the message in its log; the replica stores it,
//! then sends it out and acknowledges it to the origin. Nothing reaches a client before the
//! replica holds it, so losing any one node loses no message that a client may have seen:
//! - the **replica** dies: the sequencer sends its whole log to the next replica (`sync`), which
//!   sends on the newest message; nodes that see a hole fetch it;
//! - the **sequencer** dies: its replica is, by rendezvous hashing, the new sequencer, and already
//!   holds every message that went out. It **claims** the topic: every live node stops accepting
//!   the topic from older sequencers (a *term*) and sends back what it holds; the claimant
//!   continues from the newest log in the same epoch. Publishes sent to the dead sequencer were
//!   never acknowledged: their origins send them again to the new one, which recognizes those it
//!   already sequenced by their [`PublishId`] and does not number them twice;
//! - a node **returns** or **joins** and ranks first: it claims the topic the same way, from the
//!   node that sequenced it meanwhile. A node that stops sequencing keeps what it numbered aside:
//!   the publish ids of what its stream delivered come from it, so the next claimant still
//!   recognizes a publish sent again under its key when the replica dies in the handover.
//!
//! A node leaves the placements when the farm lists it `DOWN`, or at once when its relay links
//! were reset or refused by its side (a killed process's kernel does that; a hung or cut-off node
//! only falls silent, and waits for the failure timeout).
//!
//! A new epoch starts only when a claim finds no node holding the topic: its history is truly
//! gone. Cost on the publish path: up to three hops between nodes (origin → sequencer →
//! replica → subscribers' node) instead of one, measured in BENCHMARKS.md.
//!
//! # Delivery, holes and recovery
//! Each node delivers a topic from one stream ([`Hub`]): in offset order, duplicates dropped,
//! messages after a hole held back while the hole is fetched from the replica — so a link reset
//! between nodes is repaired without a client noticing. A client that subscribes with the
//! position it holds is sent, between two live messages, what it missed: from the node's own
//! stream, or fetched from the replica first; what the farm no longer holds is named in a `gap`.
//! Subscriptions that resume the same topic while a fetch is under way wait on that fetch when
//! it brings what they need (one fetch for the thousands of clients a failover brings at once).
//!
//! # Many topics
//! Feeds have 10^5–10^6 topics, and a failover brings hundreds of thousands of resubscriptions at
//! once, so nothing a node does per topic may cost in proportion to the topics it holds:
//! - **placement** is per partition (4 096 of them): one cached placement per partition, rebuilt
//!   when the farm changes;
//! - the **tick** looks only at what is due — claims at their deadline, fetches to resend or give
//!   up, replicas waiting for a log, logs to report — each queued when it was set ([`Timers`]),
//!   and the housekeeping that does touch every topic (history by age, chains no longer ours) runs
//!   less often the more topics there are;
//! - a subscription finds the fetch it can wait on by topic;
//! - **catching up** after a partition or a link reset asks in bounded frames, a few at a time,
//!   and is answered only with what is newer than the positions sent ([`catch_up`]);
//! - the **interest** between nodes travels as changes (`crate::interest`).
//!
//! Claims, terms and fencing stay per topic. Claiming per partition (as Kafka, Redpanda and
//! JetStream place, elect and fence per partition) would let a sequencer that has claimed a
//! partition answer for every topic of it — a topic it does not hold is one nobody holds — so a
//! first subscription would cost no claim at all, and a node failure would move 4 096 / N claims
//! instead of one per topic. It is the next step: it changes what a claim carries (every topic of
//! the partition, in bounded frames) and what a replica fences, which the chaos test must cover
//! first. Today a new topic costs a claim (two frames per peer), a sync and a fetch: work per
//! topic that does not grow with the topics held (`streamfarm bench topics` in BENCHMARKS.md).
//!
//! # Layout
//! - [`log`] — one topic's bounded history ([`log::Log`]).
//! - [`placement`] — the partition, sequencer and replica of a topic.
//! - [`catch_up`] — catching up from every live node in bounded frames.
//! - [`wire`] — the frames between nodes about topics.
//! - this module — the broker task: sequencing, replication, claims, fetches, retries.

mod catch_up;
pub(crate) mod log;
pub(crate) mod placement;
pub(crate) mod wire;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use streamfarm_core::FarmList;
use streamfarm_core::protocol::{Encoding, Epoch, Position, ServerFrame};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::hub::{self, ConnId, Delivered, FrameWakes, Hub, Outlet, Resume};
use crate::metrics::{self, Metrics};
use crate::relay::Relay;
use log::{Entry, Limits, Log, Offered, PublishId};
use placement::{PARTITIONS, Placement, live_nodes, partition, place_partition};
use wire::{LogState, PeerFrame, WireEntry};

/// After a peer's link opens again, when every delivered topic is fetched once more.
const CATCH_UP_AGAIN: Duration = Duration::from_secs(1);
/// How often the broker task retries, times out and trims.
const TICK: Duration = Duration::from_millis(50);
/// How often the broker trims history by age and forgets chains it no longer has a part in:
/// work in proportion to every topic held, so not every tick, and less often the more topics
/// there are (one more second per [`HOUSEKEEPING_TOPICS`] topics): its cost per topic stays
/// constant. Nothing else the tick does looks at every topic: what is due is queued when it is
/// set (see [`Timers`]).
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// Topics held per extra second between two housekeeping rounds.
const HOUSEKEEPING_TOPICS: usize = 50_000;
/// A publish not acknowledged this long after it was sent is sent again (to the sequencer of
/// the moment; the sequencer does not number a publish twice).
const RESEND_AFTER: Duration = Duration::from_millis(300);
/// How long a replica holding fetches for a topic it has no log of waits before it asks the
/// topic's sequencer again (the sequencer may be claiming the topic meanwhile: asking sooner only
/// adds frames to a busy farm).
const PRIME_AGAIN: Duration = Duration::from_secs(1);
/// How long a claim waits for the live nodes' answers before it goes on with those it has.
const CLAIM_WAIT: Duration = Duration::from_millis(500);
/// How long a fetch waits for its answer.
pub(crate) const FETCH_WAIT: Duration = Duration::from_secs(2);
/// Most bytes of publishes this node holds unacknowledged; beyond, publishing is refused.
const MAX_PENDING_BYTES: usize = 64 << 20;
/// Depth of the broker task's input queue: sessions and relay links wait when it is full.
const INPUT_QUEUE: usize = 4096;

/// Why a publish did not go through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PublishError {
    /// No sequencer acknowledged it in time: it may or may not be delivered.
    #[error("not acknowledged within {0:?}: it may or may not have been delivered")]
    TimedOut(Duration),
    /// Too many publishes are waiting for their acknowledgement.
    #[error("too many publishes waiting for acknowledgement; try again")]
    Overloaded,
    /// The node is stopping.
    #[error("the node is stopping")]
    Stopping,
}

/// What the broker task is asked to do.
#[derive(Debug)]
enum Input {
    Publish {
        topic: String,
        data: String,
        encoding: Encoding,
        /// The publisher's key (`Idempotency-Key`), if it gave one.
        key: Option<String>,
        done: Option<oneshot::Sender<Result<Position, PublishError>>>,
    },
    /// A frame from a peer (or from this node to itself).
    Peer { from: String, frame: PeerFrame },
    /// Fetch what follows `after` into the hub's stream of `topic`; `done` when merged.
    Fetch {
        topic: String,
        after: Option<Position>,
        done: Option<oneshot::Sender<()>>,
    },
    /// Fetch every topic delivered here from every live node (see [`Core::catch_up_all`]).
    CatchUp,
}

/// The broker's handle: what sessions, HTTP and the relay call.
pub(crate) struct Broker {
    pub(crate) hub: Arc<Hub>,
    relay: Arc<dyn Relay>,
    input: mpsc::Sender<Input>,
    publish_timeout: Duration,
}

impl Broker {
    /// The channel into the broker task: its sending end goes to the relay before the broker
    /// starts (the broker sends through the relay, the relay delivers to the broker).
    pub(crate) fn channel() -> (BrokerInput, BrokerInbox) {
        let (input, inbox) = mpsc::channel(INPUT_QUEUE);
        (BrokerInput(input), BrokerInbox(inbox))
    }

    /// Starts the broker task of node `me` on `inbox`; it runs until `cancel`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn start(
        me: String,
        (input, inbox): (BrokerInput, BrokerInbox),
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        relay: Arc<dyn Relay>,
        farm: watch::Receiver<FarmList>,
        peers: watch::Receiver<crate::relay::Peers>,
        link_ends: Arc<crate::relay::LinkEnds>,
        limits: Limits,
        publish_timeout: Duration,
        cancel: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> Arc<Broker> {
        let run = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let live = live_nodes(&farm.borrow());
        let link_changes = link_ends.watch();
        let core = Core {
            me,
            run,
            metrics,
            hub: hub.clone(),
            relay: relay.clone(),
            limits,
            live,
            placements: std::cell::RefCell::new(vec![None; PARTITIONS]),
            farm,
            peers,
            link_ends,
            link_changes,
            ended: HashSet::new(),
            catch_up_at: None,
            chains: HashMap::new(),
            pending: HashMap::new(),
            pending_bytes: 0,
            next_seq: 0,
            fetches: HashMap::new(),
            fetches_by_topic: HashMap::new(),
            timers: Timers::default(),
            catch_ups: catch_up::CatchUps::default(),
            filling: HashMap::new(),
            next_request: 0,
            to_self: Vec::new(),
            wakes: FrameWakes::default(),
            publish_timeout,
            housekeeping_at: Instant::now() + HOUSEKEEPING,
        };
        // The node's name on every line the broker logs: several nodes share a process in tests.
        let span = tracing::info_span!("broker", node = %core.me);
        tracker.spawn(tracing::Instrument::instrument(
            core.run(inbox.0, cancel),
            span,
        ));
        Arc::new(Broker {
            hub,
            relay,
            input: input.0,
            publish_timeout,
        })
    }

    /// Publishes a message farm-wide and waits until it is stored on its topic's replica and
    /// sent out: returns its position.
    /// With a `key`, a message published again under the same key (through any node, while its
    /// first copy is in the topic's history) is not published twice: it answers with the first
    /// copy's position.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        data: String,
        encoding: Encoding,
        key: Option<String>,
    ) -> Result<Position, PublishError> {
        let (done, rx) = oneshot::channel();
        self.send_input(Input::Publish {
            topic: topic.to_string(),
            data,
            encoding,
            key,
            done: Some(done),
        })
        .await?;
        match tokio::time::timeout(self.publish_timeout + TICK * 2, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PublishError::Stopping),
            Err(_) => Err(PublishError::TimedOut(self.publish_timeout)),
        }
    }

    /// Publishes without waiting for the acknowledgement (a client's `pub` frame); waits only
    /// while the broker's queue is full.
    pub(crate) async fn publish_unconfirmed(&self, topic: &str, data: String, encoding: Encoding) {
        let _ = self
            .send_input(Input::Publish {
                topic: topic.to_string(),
                data,
                encoding,
                key: None,
                done: None,
            })
            .await;
    }

    async fn send_input(&self, input: Input) -> Result<(), PublishError> {
        self.input
            .send(input)
            .await
            .map_err(|_| PublishError::Stopping)
    }

    /// Subscribes connection `id` to `topics`, each live or resuming after a position: the
    /// node's peers learn its interest, missing history is fetched, and then — between two
    /// messages of each topic — the `subscribed` frame, any `gap`, the missed messages, and
    /// from then on the live ones are queued to `outlet`. Returns the subscriptions added.
    pub(crate) async fn subscribe(
        &self,
        id: ConnId,
        outlet: &Outlet,
        topics: &[(String, Resume)],
        wakes: &mut FrameWakes,
    ) -> usize {
        self.hub.reserve(id, topics.iter().map(|(t, _)| t.as_str()));
        // Peers that are linked learn the interest before anything else: what they send from
        // then on reaches this node.
        self.relay.sync_interest().await;
        let mut waits = Vec::new();
        for (topic, resume) in topics {
            if self.hub.needs_fetch(topic, *resume) {
                let (done, rx) = oneshot::channel();
                let after = match resume {
                    Resume::Live => None,
                    Resume::After(p) => Some(*p),
                };
                if self
                    .send_input(Input::Fetch {
                        topic: topic.clone(),
                        after,
                        done: Some(done),
                    })
                    .await
                    .is_ok()
                {
                    waits.push(rx);
                }
            }
        }
        for rx in waits {
            let _ = tokio::time::timeout(FETCH_WAIT + TICK * 2, rx).await;
        }
        self.hub.join(id, outlet, topics, wakes)
    }

    /// Fetches, for every topic delivered here, whatever came after its stream's position: what
    /// a node cut off from the farm missed meanwhile.
    pub(crate) async fn catch_up(&self) {
        let _ = self.send_input(Input::CatchUp).await;
    }

    /// The relay this node uses (for its gauges).
    pub(crate) fn relay(&self) -> &Arc<dyn Relay> {
        &self.relay
    }

    /// Unsubscribes connection `id` from `topics`.
    pub(crate) fn unsubscribe<'a>(&self, id: ConnId, topics: impl IntoIterator<Item = &'a str>) {
        self.hub.unsubscribe(id, topics);
    }
}

/// The relay's way into the broker: frames from peers, holes to fill.
#[derive(Clone, Debug)]
pub(crate) struct BrokerInput(mpsc::Sender<Input>);

/// The broker task's end of [`Broker::channel`].
pub(crate) struct BrokerInbox(mpsc::Receiver<Input>);

impl BrokerInput {
    /// A frame from peer `from`. Waits while the broker is busy: the link slows down rather than
    /// anything being dropped.
    pub(crate) async fn peer(&self, from: &str, frame: PeerFrame) {
        let _ = self
            .0
            .send(Input::Peer {
                from: from.to_string(),
                frame,
            })
            .await;
    }

    /// The stream of `topic` has a hole after `after`: fetch it (once at a time per topic).
    pub(crate) fn fill(&self, topic: &str, after: Position) {
        let _ = self.0.try_send(Input::Fetch {
            topic: topic.to_string(),
            after: Some(after),
            done: None,
        });
    }

    /// Fetches, for every topic delivered here, what follows its position from every live node
    /// (see [`Core::catch_up_all`]); waits while the broker's queue is full.
    pub(crate) async fn catch_up(&self) {
        let _ = self.0.send(Input::CatchUp).await;
    }
}

/// Delivers a message received from a replica into the hub, and asks for what is missing.
pub(crate) fn deliver_from_peer(
    hub: &Hub,
    input: &BrokerInput,
    topic: &str,
    epoch: Epoch,
    entry: Entry,
    wakes: &mut FrameWakes,
) -> Delivered {
    let delivered = hub.deliver(topic, epoch, entry, wakes);
    if let Some(after) = delivered.missing_after {
        input.fill(topic, after);
    }
    delivered
}

/// A publish made on this node, until its acknowledgement.
struct Pending {
    topic: String,
    data: String,
    encoding: Encoding,
    /// The sequencer it was last sent to, and when.
    sent_to: String,
    sent_at: Instant,
    deadline: Instant,
    done: Option<oneshot::Sender<Result<Position, PublishError>>>,
}

/// A fetch this node is waiting for.
struct FetchWait {
    topic: String,
    after: Option<Position>,
    sent_to: String,
    /// When it was last sent: sent again after [`RESEND_AFTER`] (links come and go).
    sent_at: Instant,
    deadline: Instant,
    /// A hole in the live stream (one fetch at a time per topic), not a subscription's.
    fill: bool,
    /// The subscriptions waiting for the answer: every one whose messages it brings (see
    /// [`covers`]), however many clients resume at once.
    waiters: Vec<oneshot::Sender<()>>,
}

/// What this node sequences of a topic.
struct Sequencing {
    term: u64,
    log: Log,
    /// The replica that was last sent the whole log.
    synced: Option<String>,
    /// The replica reported everything up to this offset stored: what went out, so this node can
    /// serve fetches up to it (the replica may be the node just lost).
    replicated: u64,
}

/// A claim in progress.
struct Claim {
    term: u64,
    waiting: HashSet<String>,
    /// Live peers the claim could not be sent to (no link now).
    unreached: usize,
    best: Option<LogState>,
}

/// What the broker's tick looks at, each queued when it was set so that a tick costs what is due,
/// not what is held: with a million topics, scanning every chain 20 times a second took all of a
/// node's time. Each queue holds `(when, what)` with a constant delay per queue, so it is in time
/// order; an entry whose subject has moved on since (a claim finished, a fetch answered or sent
/// again) is skipped when it comes due.
#[derive(Default)]
struct Timers {
    /// Claims by deadline, with their term.
    claims: VecDeque<(Instant, (String, u64))>,
    /// Fetches by when they may be sent again ([`RESEND_AFTER`] after they were last sent).
    resends: VecDeque<(Instant, u64)>,
    /// Fetches by deadline.
    fetch_deadlines: VecDeque<(Instant, u64)>,
    /// Topics whose replica holds fetches for a log it has not got: by when to ask the sequencer
    /// again.
    primes: VecDeque<(Instant, String)>,
    /// Topics whose replica holds fetches: by when the oldest is answered empty.
    held_deadlines: VecDeque<(Instant, String)>,
    /// Topics whose claim ended without sequencing them: publishes may wait in their queue.
    stalled: HashSet<String>,
    /// Topics whose replica log grew since it was last reported to the sequencer.
    unreported: HashSet<String>,
}

/// Pops the entries of `queue` due at `now`.
fn due<T>(queue: &mut VecDeque<(Instant, T)>, now: Instant) -> Vec<T> {
    let mut out = Vec::new();
    while queue.front().is_some_and(|(at, _)| *at <= now) {
        if let Some((_, item)) = queue.pop_front() {
            out.push(item);
        }
    }
    out
}

/// A fetch that reached this node as replica before it had the topic's log.
struct HeldFetch {
    from: String,
    request: u64,
    after: Option<Position>,
    deadline: Instant,
}

/// This node's part in one topic's chain.
#[derive(Default)]
struct Chain {
    /// Highest claim term seen: sequencers below it are refused.
    fenced: u64,
    /// Set while this node sequences the topic.
    seq: Option<Sequencing>,
    claim: Option<Claim>,
    /// Publishes waiting for this node's claim to finish.
    queued: Vec<(String, PublishId, String, Encoding, bool)>,
    /// What this node stored as the topic's replica.
    stored: Option<Log>,
    /// What this node numbered when it last sequenced the topic: not a history (some of it may
    /// never have gone out), only where the publish ids of messages its stream delivered are
    /// found (see [`Core::best_state`]).
    numbered: Option<Log>,
    /// The offset last reported stored to the sequencer.
    reported: u64,
    held: Vec<HeldFetch>,
}

/// The broker task's state (see the module docs).
struct Core {
    me: String,
    run: u64,
    metrics: Arc<Metrics>,
    hub: Arc<Hub>,
    relay: Arc<dyn Relay>,
    limits: Limits,
    farm: watch::Receiver<FarmList>,
    /// The membership's peers: a node claims nothing before it has heard from the farm (it
    /// would find no history, and start a new epoch beside the farm's).
    peers: watch::Receiver<crate::relay::Peers>,
    /// Peers whose relay links ended by their side: left out of placements until linked again.
    link_ends: Arc<crate::relay::LinkEnds>,
    link_changes: watch::Receiver<u64>,
    /// Peers whose links had ended, as last seen.
    ended: HashSet<String>,
    /// When to fetch every delivered topic once more (see [`Core::links_changed`]).
    catch_up_at: Option<Instant>,
    /// Live nodes of the farm list, this one included while it is not `DOWN`.
    live: Vec<String>,
    /// The placement of each partition on `live`, computed when first needed (cleared whenever
    /// `live` changes).
    placements: std::cell::RefCell<Vec<Option<Placement>>>,
    chains: HashMap<String, Chain>,
    pending: HashMap<PublishId, Pending>,
    pending_bytes: usize,
    next_seq: u64,
    fetches: HashMap<u64, FetchWait>,
    /// The subscription fetches under way, by topic (a subscription waits on one that covers it).
    fetches_by_topic: HashMap<String, Vec<u64>>,
    /// What the tick must look at, queued when it was set.
    timers: Timers,
    /// Catch-ups under way (see [`catch_up`]).
    catch_ups: catch_up::CatchUps,
    /// Topics whose hole is being fetched, until when.
    filling: HashMap<String, Instant>,
    next_request: u64,
    /// Frames this node sends itself (it is the sequencer, replica or origin of its own).
    to_self: Vec<PeerFrame>,
    wakes: FrameWakes,
    publish_timeout: Duration,
    /// When [`HOUSEKEEPING`] is next due.
    housekeeping_at: Instant,
}

/// A new epoch: the wall clock's milliseconds with random low bits, so newer compares greater.
fn new_epoch() -> Epoch {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Epoch((ms << 16) | u64::from(rand::random::<u16>()))
}

/// A log entry as it travels between nodes (its payload read back from its client frame).
pub(crate) fn entry_to_wire(entry: &Entry) -> WireEntry {
    let (data, encoding, ts) = match ServerFrame::from_json(&entry.frame) {
        Ok(ServerFrame::Msg {
            data, encoding, ts, ..
        }) => (data, encoding, ts),
        _ => (String::new(), Encoding::Utf8, None),
    };
    WireEntry {
        offset: entry.offset,
        id: entry.id.clone(),
        data,
        encoding,
        ts,
    }
}

/// A log holding `state`.
fn log_from_state(topic: &str, state: &LogState) -> Log {
    let mut log = Log::new(state.epoch, state.first() - 1);
    for wire in &state.entries {
        let entry = hub::entry_from_wire(topic, state.epoch, wire);
        if log.offer(state.epoch, entry) != Offered::Appended {
            break;
        }
    }
    log
}

/// The newer of two states: a later epoch, then a later offset; between equals, the one that
/// knows more of its messages' publish ids (a replica's log does, a node's delivery stream does
/// not), so that a publish sent again is still recognized.
fn newer(a: Option<LogState>, b: Option<LogState>) -> Option<LogState> {
    let rank = |s: &LogState| {
        let known = s.entries.iter().filter(|e| !e.id.origin.is_empty()).count();
        (s.epoch, s.last, known)
    };
    match (a, b) {
        (Some(a), Some(b)) => {
            if rank(&b) > rank(&a) {
                Some(b)
            } else {
                Some(a)
            }
        }
        (a, b) => a.or(b),
    }
}

impl Core {
    async fn run(mut self, mut input: mpsc::Receiver<Input>, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Inputs that are ready are handled as one batch, and the subscribers' writers woken
            // once for all of it (see `crate::queue`'s deferred wake-ups): one `send` per batch
            // rather than per message. Before waking them, the task yields once, so that a
            // publisher's next messages, on their way into the queue, join the batch.
            let mut handled = 0;
            while handled < hub::FrameWakes::MAX_MESSAGES * 4 {
                let Ok(next) = input.try_recv() else {
                    if handled > 0 && self.wakes.pending() > 0 {
                        tokio::task::yield_now().await;
                        if !input.is_empty() {
                            continue;
                        }
                    }
                    break;
                };
                self.handle(next);
                self.drain_self();
                handled += 1;
            }
            self.wakes.wake_all();
            let next = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => { self.tick(); None }
                changed = self.farm.changed() => {
                    if changed.is_err() { break }
                    self.view_changed();
                    None
                }
                changed = self.link_changes.changed() => {
                    if changed.is_err() { break }
                    self.link_changes.mark_unchanged();
                    self.links_changed();
                    None
                }
                next = input.recv() => match next {
                    Some(next) => Some(next),
                    None => break,
                },
            };
            if let Some(next) = next {
                self.handle(next);
            }
            self.drain_self();
        }
        for (_, pending) in self.pending.drain() {
            if let Some(done) = pending.done {
                let _ = done.send(Err(PublishError::Stopping));
            }
        }
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Publish {
                topic,
                data,
                encoding,
                key,
                done,
            } => self.publish(topic, data, encoding, key, done),
            Input::Peer { from, frame } => self.peer_frame(from, frame),
            Input::Fetch { topic, after, done } => self.fetch(topic, after, done),
            Input::CatchUp => self.catch_up_all(),
        }
    }

    /// Handles the frames this node sent itself, until none is left.
    fn drain_self(&mut self) {
        while !self.to_self.is_empty() {
            let frames = std::mem::take(&mut self.to_self);
            for frame in frames {
                let me = self.me.clone();
                self.peer_frame(me, frame);
            }
        }
    }

    /// Sends `frame` to node `to` (this node included); false when there is no link to it now.
    fn send(&mut self, to: &str, frame: PeerFrame) -> bool {
        if to == self.me {
            self.to_self.push(frame);
            return true;
        }
        let text = serde_json::to_string(&frame).expect("frames always serialize");
        self.relay.send(to, Utf8Bytes::from(text))
    }

    /// The topic's sequencer and replica as this node sees the farm: its partition's, computed
    /// once per partition until the farm changes.
    fn placement(&self, topic: &str) -> Placement {
        let partition = partition(topic);
        let mut cache = self.placements.borrow_mut();
        cache[partition]
            .get_or_insert_with(|| {
                place_partition(partition, &self.live).unwrap_or_else(|| Placement {
                    sequencer: self.me.clone(),
                    replica: self.me.clone(),
                })
            })
            .clone()
    }

    fn publish(
        &mut self,
        topic: String,
        data: String,
        encoding: Encoding,
        key: Option<String>,
        done: Option<oneshot::Sender<Result<Position, PublishError>>>,
    ) {
        if self.pending_bytes + data.len() > MAX_PENDING_BYTES {
            metrics::inc(&self.metrics.publish_failures);
            if let Some(done) = done {
                let _ = done.send(Err(PublishError::Overloaded));
            }
            return;
        }
        metrics::inc(&self.metrics.messages_published);
        self.next_seq += 1;
        let retry = key.is_some();
        let id = PublishId {
            origin: self.me.clone(),
            seq: self.next_seq,
            run: self.run,
            key,
        };
        let to = self.placement(&topic).sequencer;
        let now = Instant::now();
        self.pending_bytes += data.len();
        self.send(
            &to,
            PeerFrame::Pub {
                topic: topic.clone(),
                id: id.clone(),
                data: data.clone(),
                encoding,
                retry,
            },
        );
        self.pending.insert(
            id,
            Pending {
                topic,
                data,
                encoding,
                sent_to: to,
                sent_at: now,
                deadline: now + self.publish_timeout,
                done,
            },
        );
    }

    fn peer_frame(&mut self, from: String, frame: PeerFrame) {
        match frame {
            PeerFrame::Pub {
                topic,
                id,
                data,
                encoding,
                retry,
            } => self.on_pub(from, topic, id, data, encoding, retry),
            PeerFrame::Repl {
                topic,
                term,
                epoch,
                entry,
            } => self.on_repl(from, topic, term, epoch, entry),
            PeerFrame::Sync { topic, term, state } => self.on_sync(from, topic, term, state),
            PeerFrame::Ack {
                topic: _,
                id,
                epoch,
                offset,
            } => {
                if let Some(pending) = self.pending.remove(&id) {
                    self.pending_bytes -= pending.data.len();
                    if let Some(done) = pending.done {
                        let _ = done.send(Ok(Position::new(epoch, offset)));
                    }
                }
            }
            PeerFrame::Nack { topic: _, id } => {
                // Sent again at the next tick, to the sequencer of the moment.
                if let Some(pending) = self.pending.get_mut(&id) {
                    pending.sent_at = Instant::now() - RESEND_AFTER + TICK;
                }
            }
            PeerFrame::Stored {
                topic,
                epoch,
                offset,
            } => {
                if let Some(seq) = self.chains.get_mut(&topic).and_then(|c| c.seq.as_mut())
                    && seq.log.epoch() == epoch
                {
                    seq.replicated = seq.replicated.max(offset.min(seq.log.position().offset));
                }
            }
            PeerFrame::Fenced { topic, term } => {
                let chain = self.chains.entry(topic.clone()).or_default();
                chain.fenced = chain.fenced.max(term);
                if chain.seq.as_ref().is_some_and(|s| s.term < term) {
                    debug!(%topic, term, "a newer sequencer claimed the topic: no longer sequencing it");
                    self.stop_sequencing(&topic);
                }
            }
            PeerFrame::Prime { topic } => {
                let chain = self.chains.entry(topic.clone()).or_default();
                if let Some(seq) = &mut chain.seq {
                    seq.synced = None;
                    self.sync_replica(&topic);
                } else if self.placement(&topic).sequencer == self.me {
                    self.ensure_active(&topic);
                }
            }
            PeerFrame::Claim { topic, term } => self.on_claim(from, topic, term),
            PeerFrame::ClaimReply {
                topic,
                term,
                granted,
                state,
            } => self.on_claim_reply(from, topic, term, granted, state),
            PeerFrame::Fetch {
                topic,
                request,
                after,
            } => self.on_fetch(from, topic, request, after),
            PeerFrame::FetchReply {
                topic,
                request,
                state,
            } => self.on_fetch_reply(&from, topic, request, state),
            PeerFrame::CatchUp { request, topics } => self.on_catch_up(&from, request, topics),
            PeerFrame::CatchUpReply {
                request,
                states,
                done,
            } => self.on_catch_up_reply(&from, request, states, done),
        }
    }

    /// As sequencer: number the publish, or queue it while the claim runs.
    fn on_pub(
        &mut self,
        from: String,
        topic: String,
        id: PublishId,
        data: String,
        encoding: Encoding,
        retry: bool,
    ) {
        if self.placement(&topic).sequencer != self.me {
            self.send(&from, PeerFrame::Nack { topic, id });
            return;
        }
        let chain = self.chains.entry(topic.clone()).or_default();
        if chain.seq.is_none() {
            chain.queued.push((from, id, data, encoding, retry));
            self.ensure_active(&topic);
            return;
        }
        self.sequence(&topic, id, data, encoding, retry);
    }

    /// Numbers a publish (a `retry` that was numbered before keeps its offset) and sends it to
    /// the replica.
    fn sequence(
        &mut self,
        topic: &str,
        id: PublishId,
        data: String,
        encoding: Encoding,
        retry: bool,
    ) {
        if self
            .chains
            .get(topic)
            .and_then(|c| c.seq.as_ref())
            .and_then(|s| s.synced.as_ref())
            != Some(&self.placement(topic).replica)
        {
            self.sync_replica(topic);
        }
        let replica = self.placement(topic).replica;
        let limits = self.limits;
        let Some(seq) = self.chains.get_mut(topic).and_then(|c| c.seq.as_mut()) else {
            return;
        };
        let epoch = seq.log.epoch();
        let accepted = Some(crate::now_ms());
        // Only a retry can have been numbered before: a first send skips the search.
        let before = if retry { seq.log.offset_of(&id) } else { None };
        let wire = match before {
            // Sequenced before: the replica is sent it again (with this sender's id, so that the
            // acknowledgement reaches it) and acknowledges it without sending it out again.
            Some(offset) => WireEntry {
                offset,
                id,
                data,
                encoding,
                ts: accepted,
            },
            None => {
                let offset = seq.log.position().offset + 1;
                let frame = hub::msg_frame(
                    topic,
                    data.clone(),
                    encoding,
                    Some(Position::new(epoch, offset)),
                    accepted,
                );
                seq.log.push(Entry {
                    offset,
                    id: id.clone(),
                    frame,
                    stored: Instant::now().into_std(),
                });
                seq.log.trim(limits, std::time::Instant::now());
                WireEntry {
                    offset,
                    id,
                    data,
                    encoding,
                    ts: accepted,
                }
            }
        };
        let term = seq.term;
        if replica == self.me {
            // Its own replica (a farm of one): the frame built above goes out as it is.
            let frame = seq
                .log
                .after(wire.offset - 1)
                .next()
                .map(|e| e.frame.clone());
            let frame = frame.unwrap_or_else(|| {
                hub::msg_frame(
                    topic,
                    wire.data.clone(),
                    wire.encoding,
                    Some(Position::new(epoch, wire.offset)),
                    wire.ts,
                )
            });
            let entry = Entry {
                offset: wire.offset,
                id: wire.id,
                frame,
                stored: std::time::Instant::now(),
            };
            let me = self.me.clone();
            self.store(me, topic.to_string(), term, epoch, entry);
            return;
        }
        self.send(
            &replica,
            PeerFrame::Repl {
                topic: topic.to_string(),
                term,
                epoch,
                entry: wire,
            },
        );
    }

    /// Sends the replica the whole log of a topic this node sequences.
    fn sync_replica(&mut self, topic: &str) {
        let replica = self.placement(topic).replica;
        let Some(seq) = self.chains.get_mut(topic).and_then(|c| c.seq.as_mut()) else {
            return;
        };
        let frame = PeerFrame::Sync {
            topic: topic.to_string(),
            term: seq.term,
            state: LogState::of(&seq.log, None),
        };
        seq.synced = Some(replica.clone());
        if !self.send(&replica, frame)
            && let Some(seq) = self.chains.get_mut(topic).and_then(|c| c.seq.as_mut())
        {
            // Not linked yet: tried again with the next publish.
            seq.synced = None;
        }
    }

    /// As replica: store, then send out and acknowledge.
    fn on_repl(&mut self, from: String, topic: String, term: u64, epoch: Epoch, wire: WireEntry) {
        let entry = hub::entry_from_wire(&topic, epoch, &wire);
        self.store(from, topic, term, epoch, entry);
    }

    /// As replica: store the entry (its frame built once), then send it out and acknowledge it.
    fn store(&mut self, from: String, topic: String, term: u64, epoch: Epoch, entry: Entry) {
        if self.fenced_out(&from, &topic, term) {
            return;
        }
        let chain = self.chains.entry(topic.clone()).or_default();
        let (id, offset) = (entry.id.clone(), entry.offset);
        let stored = match &mut chain.stored {
            Some(log) if log.epoch() == epoch => log,
            Some(log) if log.epoch() > epoch => return,
            slot => {
                if offset != 1 {
                    // Not the start and not the log this replica holds: ask for all of it.
                    self.send(&from, PeerFrame::Prime { topic });
                    return;
                }
                slot.insert(Log::new(epoch, 0))
            }
        };
        let limits = self.limits;
        match stored.offer(epoch, entry.clone()) {
            Offered::Appended => {
                stored.trim(limits, std::time::Instant::now());
                self.timers.unreported.insert(topic.clone());
                self.send_out(&topic, epoch, entry);
                self.ack(&topic, id, epoch, offset);
            }
            Offered::Duplicate => self.ack(&topic, id, epoch, offset),
            Offered::Gap { .. } => {
                self.send(&from, PeerFrame::Prime { topic });
            }
            Offered::OtherEpoch => {}
        }
    }

    fn ack(&mut self, topic: &str, id: PublishId, epoch: Epoch, offset: u64) {
        let origin = id.origin.clone();
        self.send(
            &origin,
            PeerFrame::Ack {
                topic: topic.to_string(),
                id,
                epoch,
                offset,
            },
        );
    }

    /// As replica: sends a stored message to every node that wants it, this one included.
    fn send_out(&mut self, topic: &str, epoch: Epoch, entry: Entry) {
        self.relay.fanout(topic, &entry.frame);
        let delivered = self.hub.deliver(topic, epoch, entry, &mut self.wakes);
        if let Some(after) = delivered.missing_after {
            self.fetch(topic.to_string(), Some(after), None);
        }
    }

    /// A sequencer's frame of `term` for `topic`: refused (and the sender told `fenced`) when a
    /// newer claim fenced the topic; otherwise the term is the newest this node has seen.
    fn fenced_out(&mut self, from: &str, topic: &str, term: u64) -> bool {
        let chain = self.chains.entry(topic.to_string()).or_default();
        if term < chain.fenced {
            let fenced = chain.fenced;
            self.send(
                from,
                PeerFrame::Fenced {
                    topic: topic.to_string(),
                    term: fenced,
                },
            );
            return true;
        }
        chain.fenced = term;
        false
    }

    fn on_sync(&mut self, from: String, topic: String, term: u64, state: LogState) {
        if self.fenced_out(&from, &topic, term) {
            return;
        }
        let chain = self.chains.entry(topic.clone()).or_default();
        let current = chain.stored.as_ref().map(|log| LogState::of(log, None));
        let take = current
            .as_ref()
            .is_none_or(|c| (state.epoch, state.last) >= (c.epoch, c.last));
        if take {
            chain.stored = Some(log_from_state(&topic, &state));
            self.timers.unreported.insert(topic.clone());
        }
        let held = std::mem::take(&mut chain.held);
        // The newest message goes out again: a node that missed what came before sees the hole
        // and fetches it; one that has it drops the copy.
        let newest = chain.stored.as_ref().and_then(|log| {
            log.after(log.position().offset.saturating_sub(1))
                .next()
                .cloned()
        });
        let epoch = chain.stored.as_ref().map(Log::epoch);
        if let (Some(entry), Some(epoch)) = (newest, epoch) {
            self.send_out(&topic, epoch, entry);
        }
        for fetch in held {
            self.answer_fetch(&fetch.from, &topic, fetch.request, fetch.after);
        }
    }

    /// Starts a claim of `topic` unless this node sequences it already or is claiming it.
    fn ensure_active(&mut self, topic: &str) {
        if !self.peers.borrow().settled {
            // Retried at the next tick (the publishes wait in the queue).
            self.timers.stalled.insert(topic.to_string());
            return;
        }
        // Every peer that is live or may be (just seen, not yet judged): a node that has just
        // (re)started lists its peers `DOWN` until their heartbeats are seen advancing, and
        // must not conclude meanwhile that nobody holds the topic.
        let mut peers: Vec<String> = self
            .live
            .iter()
            .filter(|n| **n != self.me)
            .cloned()
            .collect();
        for peer in self.peers.borrow().relays.keys() {
            if !peers.contains(peer) {
                peers.push(peer.clone());
            }
        }
        let chain = self.chains.entry(topic.to_string()).or_default();
        if chain.seq.is_some() || chain.claim.is_some() {
            return;
        }
        let term = chain.fenced + 1;
        chain.fenced = term;
        let deadline = Instant::now() + CLAIM_WAIT;
        chain.claim = Some(Claim {
            term,
            waiting: HashSet::new(),
            unreached: 0,
            best: None,
        });
        self.timers
            .claims
            .push_back((deadline, (topic.to_string(), term)));
        let mut waiting = HashSet::new();
        let mut unreached = 0;
        for peer in peers {
            let frame = PeerFrame::Claim {
                topic: topic.to_string(),
                term,
            };
            if self.send(&peer, frame) {
                waiting.insert(peer);
            } else {
                unreached += 1;
            }
        }
        debug!(%topic, term, peers = waiting.len(), unreached, "claiming");
        let empty = waiting.is_empty();
        if let Some(claim) = self.chains.get_mut(topic).and_then(|c| c.claim.as_mut()) {
            claim.waiting = waiting;
            claim.unreached = unreached;
        }
        if empty {
            self.finish_claim(topic);
        }
    }

    /// What this node holds of `topic` that went out: its replica log or its stream, the newer.
    /// Not its sequencer log: what a sequencer numbered but no replica stored never reached a
    /// client (a sequencer cut off from its replica may have numbered many such messages), and
    /// their publishers send them again.
    ///
    /// A delivery stream does not know its messages' publish ids; those this node numbered as
    /// their sequencer, or stored as their replica, are filled in (the same offset of the same
    /// epoch, with the same payload), so that a node continuing from this state recognizes a
    /// publish sent again under its key — the sequencer's replica may die in the handover, and
    /// with it the only other copy of the ids.
    fn best_state(&self, topic: &str) -> Option<LogState> {
        let chain = self.chains.get(topic);
        let stored = chain
            .and_then(|c| c.stored.as_ref())
            .map(|log| LogState::of(log, None));
        let mut best = newer(stored.clone(), self.hub.state(topic, None))?;
        let numbered = chain
            .and_then(|c| c.numbered.as_ref())
            .map(|log| LogState::of(log, None));
        let mut known: HashMap<u64, &WireEntry> = HashMap::new();
        for source in [&numbered, &stored].into_iter().flatten() {
            if source.epoch == best.epoch {
                for entry in &source.entries {
                    known.entry(entry.offset).or_insert(entry);
                }
            }
        }
        for entry in best.entries.iter_mut().filter(|e| e.id.origin.is_empty()) {
            if let Some(found) = known.get(&entry.offset)
                && found.data == entry.data
                && found.encoding == entry.encoding
            {
                entry.id = found.id.clone();
            }
        }
        Some(best)
    }

    /// Stops sequencing `topic`; what it numbered is kept aside, for the publish ids of what
    /// went out (see [`Core::best_state`]). Whether it was sequencing.
    fn stop_sequencing(&mut self, topic: &str) -> bool {
        let Some(chain) = self.chains.get_mut(topic) else {
            return false;
        };
        let Some(seq) = chain.seq.take() else {
            return false;
        };
        chain.numbered = Some(seq.log);
        true
    }

    fn on_claim(&mut self, from: String, topic: String, term: u64) {
        let granted = term > self.chains.entry(topic.clone()).or_default().fenced;
        if granted && self.stop_sequencing(&topic) {
            debug!(%topic, claimant = %from, "topic claimed by another node: no longer sequencing it");
        }
        let state = self.best_state(&topic);
        let chain = self.chains.entry(topic.clone()).or_default();
        if granted {
            chain.fenced = term;
            chain.claim = None;
        }
        let queued = if granted {
            std::mem::take(&mut chain.queued)
        } else {
            Vec::new()
        };
        let fenced = chain.fenced;
        self.send(
            &from,
            PeerFrame::ClaimReply {
                topic: topic.clone(),
                term: if granted { term } else { fenced },
                granted,
                state: if granted { state } else { None },
            },
        );
        for (origin, id, ..) in queued {
            self.send(
                &origin,
                PeerFrame::Nack {
                    topic: topic.clone(),
                    id,
                },
            );
        }
    }

    fn on_claim_reply(
        &mut self,
        from: String,
        topic: String,
        term: u64,
        granted: bool,
        state: Option<LogState>,
    ) {
        let Some(chain) = self.chains.get_mut(&topic) else {
            return;
        };
        let Some(claim) = &mut chain.claim else {
            return;
        };
        if !granted {
            if term >= claim.term {
                // Someone claimed higher: this claim is over; a later publish starts another.
                chain.fenced = chain.fenced.max(term);
                chain.claim = None;
                self.timers.stalled.insert(topic);
            }
            return;
        }
        if term != claim.term {
            return;
        }
        claim.best = newer(claim.best.take(), state);
        claim.waiting.remove(&from);
        if claim.waiting.is_empty() {
            self.finish_claim(&topic);
        }
    }

    /// Ends a claim: sequences from the newest log found (a new epoch if none), syncs the
    /// replica, and numbers the publishes that waited.
    fn finish_claim(&mut self, topic: &str) {
        let own = self.best_state(topic);
        let Some(chain) = self.chains.get_mut(topic) else {
            return;
        };
        let Some(claim) = chain.claim.take() else {
            return;
        };
        let heard_all = claim.waiting.is_empty() && claim.unreached == 0;
        if claim.best.is_none() && own.is_none() && !heard_all {
            // Nobody that answered holds the topic, but not every live peer answered: a new
            // epoch now could start beside one a silent peer holds. Claim again at the next tick
            // (by then the silent peer answers, or is listed DOWN and left out).
            debug!(%topic, term = claim.term, "claim found no history and not every peer answered: again");
            self.timers.stalled.insert(topic.to_string());
            return;
        }
        let log = match newer(claim.best, own) {
            Some(state) => log_from_state(topic, &state),
            None => {
                let epoch = new_epoch();
                debug!(%topic, %epoch, "no node holds the topic: a new epoch");
                Log::new(epoch, 0)
            }
        };
        debug!(%topic, term = claim.term, position = %log.position(), "sequencing");
        chain.seq = Some(Sequencing {
            term: claim.term,
            replicated: log.position().offset,
            log,
            synced: None,
        });
        let queued = std::mem::take(&mut chain.queued);
        self.sync_replica(topic);
        for (_, id, data, encoding, retry) in queued {
            self.sequence(topic, id, data, encoding, retry);
        }
    }

    /// Asks the topic's replica for what follows `after` in the hub's stream of `topic`.
    fn fetch(&mut self, topic: String, after: Option<Position>, done: Option<oneshot::Sender<()>>) {
        let now = Instant::now();
        let Some(done) = done else {
            // A hole: one fetch at a time per topic.
            if self.filling.get(&topic).is_some_and(|until| *until > now) {
                return;
            }
            self.filling.insert(topic.clone(), now + FETCH_WAIT);
            self.send_fetch(topic, after, true, Vec::new());
            return;
        };
        // A subscription waits on a fetch already asked for that brings what it needs: when a
        // node's clients fail over to this one, thousands resume the same topic within
        // milliseconds, and one fetch each would make the replica answer the same history
        // thousands of times — on a farm already busy with the failover — and every answer
        // late past `RESEND_AFTER` be asked again of every live node.
        let under_way = self.fetches_by_topic.get(&topic).and_then(|requests| {
            requests
                .iter()
                .copied()
                .find(|r| self.fetches.get(r).is_some_and(|w| covers(w.after, after)))
        });
        if let Some(wait) = under_way.and_then(|r| self.fetches.get_mut(&r)) {
            wait.waiters.push(done);
            return;
        }
        self.send_fetch(topic, after, false, vec![done]);
    }

    /// Sends a new fetch of what follows `after` in `topic` to its replica and waits for it.
    fn send_fetch(
        &mut self,
        topic: String,
        after: Option<Position>,
        fill: bool,
        waiters: Vec<oneshot::Sender<()>>,
    ) {
        let now = Instant::now();
        self.next_request += 1;
        let request = self.next_request;
        // To the replica, which holds everything that went out; sent again (after
        // `RESEND_AFTER`) to every live node, the sequencer included, when it does not answer.
        let to = self.placement(&topic).replica;
        self.send(
            &to,
            PeerFrame::Fetch {
                topic: topic.clone(),
                request,
                after,
            },
        );
        if !fill {
            self.fetches_by_topic
                .entry(topic.clone())
                .or_default()
                .push(request);
        }
        self.track_fetch(
            request,
            FetchWait {
                topic,
                after,
                sent_to: to,
                sent_at: now,
                deadline: now + FETCH_WAIT,
                fill,
                waiters,
            },
        );
    }

    /// Keeps `wait` as fetch `request` (sent at `wait.sent_at`) until its answer or deadline.
    fn track_fetch(&mut self, request: u64, wait: FetchWait) {
        self.timers
            .resends
            .push_back((wait.sent_at + RESEND_AFTER, request));
        self.timers
            .fetch_deadlines
            .push_back((wait.deadline, request));
        self.fetches.insert(request, wait);
    }

    /// Forgets fetch `request`: answered, or past its deadline.
    fn untrack_fetch(&mut self, request: u64) -> Option<FetchWait> {
        let wait = self.fetches.remove(&request)?;
        if let Some(requests) = self.fetches_by_topic.get_mut(&wait.topic) {
            requests.retain(|r| *r != request);
            if requests.is_empty() {
                self.fetches_by_topic.remove(&wait.topic);
            }
        }
        if wait.fill {
            self.filling.remove(&wait.topic);
        }
        Some(wait)
    }

    /// Sends fetch `request` again, to the topic's replica of the moment.
    ///
    /// Sent again, it goes to every other live node too: the replica may be the node that just
    /// died, still listed, and any node that delivers the topic holds what went out of it.
    fn refetch(&mut self, request: u64) {
        let Some(wait) = self.fetches.get(&request) else {
            return;
        };
        let replica = self.placement(&wait.topic).replica;
        let frame = PeerFrame::Fetch {
            topic: wait.topic.clone(),
            request,
            after: wait.after,
        };
        let others: Vec<String> = self
            .live
            .iter()
            .filter(|n| **n != self.me && **n != replica)
            .cloned()
            .collect();
        for peer in others {
            self.send(&peer, frame.clone());
        }
        self.send(&replica, frame);
        if let Some(wait) = self.fetches.get_mut(&request) {
            wait.sent_to = replica;
            wait.sent_at = Instant::now();
            self.timers
                .resends
                .push_back((wait.sent_at + RESEND_AFTER, request));
        }
    }

    fn on_fetch(&mut self, from: String, topic: String, request: u64, after: Option<Position>) {
        let placement = self.placement(&topic);
        let chain = self.chains.entry(topic.clone()).or_default();
        if chain.stored.is_none() && placement.replica == self.me {
            // The topic's replica has no log yet (nothing published since it became replica):
            // the sequencer sends it one, then the fetch is answered.
            let now = Instant::now();
            chain.held.push(HeldFetch {
                from,
                request,
                after,
                deadline: now + FETCH_WAIT,
            });
            self.timers
                .held_deadlines
                .push_back((now + FETCH_WAIT, topic.clone()));
            self.timers
                .primes
                .push_back((now + PRIME_AGAIN, topic.clone()));
            self.send(&placement.sequencer, PeerFrame::Prime { topic });
            return;
        }
        self.answer_fetch(&from, &topic, request, after);
    }

    /// Answers a fetch from the replica log, or else the stream this node delivers.
    fn answer_fetch(&mut self, to: &str, topic: &str, request: u64, after: Option<Position>) {
        let state = self.fetch_state(topic, after);
        self.send(
            to,
            PeerFrame::FetchReply {
                topic: topic.to_string(),
                request,
                state,
            },
        );
    }

    /// What a fetch of what follows `after` gets here: from the replica log, else the
    /// sequencer's log up to what its replica stored, else the stream this node delivers.
    fn fetch_state(&self, topic: &str, after: Option<Position>) -> Option<LogState> {
        let of = |log: &Log| LogState::answering(log, after);
        let chain = self.chains.get(topic);
        match (
            chain.and_then(|c| c.stored.as_ref()),
            chain.and_then(|c| c.seq.as_ref()),
        ) {
            (Some(log), _) => Some(of(log)),
            // The sequencer serves what its replica reported stored, nothing beyond: a message
            // not yet stored may never go out.
            (None, Some(seq)) => {
                let mut state = of(&seq.log);
                state.entries.retain(|e| e.offset <= seq.replicated);
                state.last = seq.replicated;
                Some(state)
            }
            (None, None) => self.hub.with_log(topic, of),
        }
    }

    fn on_fetch_reply(&mut self, from: &str, topic: String, request: u64, state: Option<LogState>) {
        // The first answer with history wins; an empty one (a node that does not hold the topic)
        // leaves the fetch to the others and its deadline.
        if state.is_none() {
            debug!(%topic, request, "a node holds no history of the topic");
            return;
        }
        // An answer a little behind (a node that delivers the topic a little late, a sequencer
        // whose replica reported a tick ago) is taken: what it lacks comes with the live stream,
        // whose hole is then fetched; waiting for a better one could wait out the failure timeout.
        let Some(wait) = self.untrack_fetch(request) else {
            return;
        };
        debug!(
            %topic,
            %from,
            waiters = wait.waiters.len(),
            took_ms = (wait.deadline - FETCH_WAIT).elapsed().as_millis() as u64,
            "fetch answered"
        );
        if let Some(state) = state {
            self.hub.merge(&topic, &state, &mut self.wakes);
        }
        for done in wait.waiters {
            let _ = done.send(());
        }
    }

    /// A peer's link ended or opened again. Once one opens again, what went out while it was
    /// down may have missed this node, and a message missed at the end of a topic shows no hole
    /// until the next one: every topic delivered here is fetched after its position, now and
    /// once more [`CATCH_UP_AGAIN`] later (for what went out while the peers learned this node's
    /// interest again).
    fn links_changed(&mut self) {
        let ended = self.link_ends.ended_peers();
        let reopened = self.ended.iter().any(|peer| !ended.contains(peer));
        self.ended = ended;
        self.view_changed();
        if reopened {
            self.catch_up_all();
            self.catch_up_at = Some(Instant::now() + CATCH_UP_AGAIN);
        }
    }

    /// Fetches every topic delivered here after its stream's position, from every live node,
    /// merging every answer: after a partition or a link reset, the topic's replica in this
    /// node's view may not be the node that holds what went out meanwhile.
    fn catch_up_all(&mut self) {
        let positions = self.hub.positions();
        debug!(topics = positions.len(), "catching up from every live node");
        self.catch_ups.start(positions);
        self.pump_catch_ups(Instant::now());
    }

    /// Sends the catch-up frames due now (see [`catch_up::CatchUps::due`]).
    fn pump_catch_ups(&mut self, now: Instant) {
        if self.catch_ups.is_idle() {
            return;
        }
        let peers: Vec<String> = self
            .live
            .iter()
            .filter(|n| **n != self.me)
            .cloned()
            .collect();
        for (peer, frame) in self.catch_ups.due(now, &peers, RESEND_AFTER, FETCH_WAIT) {
            self.send(&peer, frame);
        }
    }

    /// Answers a catch-up: the topics whose history here goes beyond the position asked.
    fn on_catch_up(&mut self, from: &str, request: u64, topics: Vec<(String, Position)>) {
        let states: Vec<(String, LogState)> = topics
            .into_iter()
            .filter_map(|(topic, after)| {
                let state = self.fetch_state(&topic, Some(after))?;
                catch_up::is_newer(&state, after).then_some((topic, state))
            })
            .collect();
        for frame in catch_up::reply_frames(request, states) {
            self.send(from, frame);
        }
    }

    fn on_catch_up_reply(
        &mut self,
        from: &str,
        request: u64,
        states: Vec<(String, LogState)>,
        done: bool,
    ) {
        for (topic, state) in states {
            debug!(%topic, %from, last = state.last, "catch-up answer");
            self.hub.merge(&topic, &state, &mut self.wakes);
        }
        if done {
            self.catch_ups.answered(from, request);
            self.pump_catch_ups(Instant::now());
        }
    }

    /// The farm list changed: follow the new placements.
    fn view_changed(&mut self) {
        let mut live = live_nodes(&self.farm.borrow_and_update());
        // A peer whose links its side reset is as good as gone: its process is (a hung or cut-off
        // peer keeps them open, and waits for the failure timeout).
        live.retain(|n| *n == self.me || !self.link_ends.is_ended(n));
        if live == self.live {
            return;
        }
        self.live = live;
        self.placements.borrow_mut().fill(None);
        let topics: Vec<String> = self.chains.keys().cloned().collect();
        // One line for every topic handed over (a node may hand over hundreds of thousands).
        let mut handed_over = 0;
        for topic in topics {
            let placement = self.placement(&topic);
            if placement.sequencer != self.me && self.stop_sequencing(&topic) {
                debug!(%topic, sequencer = %placement.sequencer, "no longer sequencing the topic");
                handed_over += 1;
            }
            let Some(chain) = self.chains.get_mut(&topic) else {
                continue;
            };
            if placement.sequencer != self.me {
                if let Some(claim) = chain.claim.take() {
                    debug!(%topic, term = claim.term, "claim abandoned");
                    self.timers.stalled.insert(topic.clone());
                }
            } else if let Some(seq) = &chain.seq {
                if seq.synced.as_ref() != Some(&placement.replica) {
                    self.sync_replica(&topic);
                }
            } else if let Some(claim) = &mut chain.claim {
                claim.waiting.retain(|peer| self.live.contains(peer));
                if claim.waiting.is_empty() {
                    self.finish_claim(&topic);
                }
            }
        }
        if handed_over > 0 {
            info!(
                topics = handed_over,
                "no longer sequencing topics the farm now places on other nodes"
            );
        }
        // Publishes and fetches sent to a node that is no longer the one: again, now, in the
        // order they were published.
        let mut moved: Vec<PublishId> = self
            .pending
            .iter()
            .filter(|(_, p)| self.placement(&p.topic).sequencer != p.sent_to)
            .map(|(id, _)| id.clone())
            .collect();
        moved.sort_by_key(|id| id.seq);
        for id in moved {
            self.resend(&id);
        }
        let refetch: Vec<u64> = self
            .fetches
            .iter()
            .filter(|(_, f)| self.placement(&f.topic).replica != f.sent_to)
            .map(|(request, _)| *request)
            .collect();
        for request in refetch {
            self.refetch(request);
        }
    }

    fn resend(&mut self, id: &PublishId) {
        let Some(pending) = self.pending.get(id) else {
            return;
        };
        let to = self.placement(&pending.topic).sequencer;
        let frame = PeerFrame::Pub {
            topic: pending.topic.clone(),
            id: id.clone(),
            data: pending.data.clone(),
            encoding: pending.encoding,
            retry: true,
        };
        self.send(&to, frame);
        if let Some(pending) = self.pending.get_mut(id) {
            pending.sent_to = to;
            pending.sent_at = Instant::now();
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self.catch_up_at.is_some_and(|at| now >= at) {
            self.catch_up_at = None;
            self.catch_up_all();
        }
        self.pump_catch_ups(now);
        // Publishes: retried, or given up at their deadline.
        let mut expired = Vec::new();
        let mut again = Vec::new();
        for (id, pending) in &self.pending {
            if now >= pending.deadline {
                expired.push(id.clone());
            } else if now.duration_since(pending.sent_at) >= RESEND_AFTER {
                again.push(id.clone());
            }
        }
        again.sort_by_key(|id| id.seq);
        for id in expired {
            if let Some(pending) = self.pending.remove(&id) {
                self.pending_bytes -= pending.data.len();
                metrics::inc(&self.metrics.publish_failures);
                warn!(topic = %pending.topic, "publish not acknowledged in time");
                if let Some(done) = pending.done {
                    let _ = done.send(Err(PublishError::TimedOut(self.publish_timeout)));
                }
            }
        }
        for id in again {
            self.resend(&id);
        }
        // Claims that waited long enough go on with the answers they have.
        for (topic, term) in due(&mut self.timers.claims, now) {
            let running = self
                .chains
                .get(&topic)
                .and_then(|c| c.claim.as_ref())
                .is_some_and(|claim| claim.term == term);
            if running {
                self.finish_claim(&topic);
            }
        }
        // Publishes queued for a claim that ended without sequencing: claim again, or send them
        // back.
        for topic in std::mem::take(&mut self.timers.stalled) {
            let stalled = self
                .chains
                .get(&topic)
                .is_some_and(|c| !c.queued.is_empty() && c.seq.is_none() && c.claim.is_none());
            if !stalled {
                continue;
            }
            if self.placement(&topic).sequencer == self.me {
                self.ensure_active(&topic);
            } else if let Some(chain) = self.chains.get_mut(&topic) {
                for (origin, id, ..) in std::mem::take(&mut chain.queued) {
                    self.send(
                        &origin,
                        PeerFrame::Nack {
                            topic: topic.clone(),
                            id,
                        },
                    );
                }
            }
        }
        // Fetches not answered yet are sent again (the link may not have been up); those past
        // their deadline are given up.
        for request in due(&mut self.timers.resends, now) {
            let again = self
                .fetches
                .get(&request)
                .is_some_and(|f| now < f.deadline && now.duration_since(f.sent_at) >= RESEND_AFTER);
            if again {
                self.refetch(request);
            }
        }
        for request in due(&mut self.timers.fetch_deadlines, now) {
            if self
                .fetches
                .get(&request)
                .is_some_and(|f| now >= f.deadline)
                && let Some(wait) = self.untrack_fetch(request)
            {
                debug!(topic = %wait.topic, "fetch not answered in time");
            }
        }
        // A replica still waiting for a log asks its sequencer again.
        for topic in due(&mut self.timers.primes, now) {
            let waiting = self
                .chains
                .get(&topic)
                .is_some_and(|c| c.stored.is_none() && !c.held.is_empty());
            if waiting {
                let sequencer = self.placement(&topic).sequencer;
                self.send(
                    &sequencer,
                    PeerFrame::Prime {
                        topic: topic.clone(),
                    },
                );
                self.timers.primes.push_back((now + PRIME_AGAIN, topic));
            }
        }
        // Fetches held for a log that did not come in time are answered empty.
        for topic in due(&mut self.timers.held_deadlines, now) {
            let Some(chain) = self.chains.get_mut(&topic) else {
                continue;
            };
            let (late, kept): (Vec<HeldFetch>, Vec<HeldFetch>) =
                chain.held.drain(..).partition(|f| now >= f.deadline);
            chain.held = kept;
            for fetch in late {
                self.send(
                    &fetch.from,
                    PeerFrame::FetchReply {
                        topic: topic.clone(),
                        request: fetch.request,
                        state: None,
                    },
                );
            }
        }
        // As replica: tell each sequencer how far this node has stored (for its fetches).
        for topic in std::mem::take(&mut self.timers.unreported) {
            let Some(chain) = self.chains.get_mut(&topic) else {
                continue;
            };
            let Some(at) = chain.stored.as_ref().map(Log::position) else {
                continue;
            };
            if at.offset <= chain.reported {
                continue;
            }
            chain.reported = at.offset;
            let sequencer = self.placement(&topic).sequencer;
            self.send(
                &sequencer,
                PeerFrame::Stored {
                    topic,
                    epoch: at.epoch,
                    offset: at.offset,
                },
            );
        }
        // History beyond its age; chains this node no longer has a part in.
        if now < self.housekeeping_at {
            return;
        }
        let rounds = 1 + (self.chains.len() / HOUSEKEEPING_TOPICS) as u32;
        self.housekeeping_at = now + HOUSEKEEPING * rounds;
        let std_now = std::time::Instant::now();
        let limits = self.limits;
        let me = self.me.clone();
        let placements = &self.placements;
        let live = &self.live;
        self.chains.retain(|topic, chain| {
            if let Some(seq) = &mut chain.seq {
                seq.log.trim(limits, std_now);
            }
            if let Some(log) = &mut chain.stored {
                log.trim(limits, std_now);
            }
            let partition = partition(topic);
            let mut cache = placements.borrow_mut();
            let placement = cache[partition].get_or_insert_with(|| {
                place_partition(partition, live).unwrap_or_else(|| Placement {
                    sequencer: me.clone(),
                    replica: me.clone(),
                })
            });
            let involved = placement.sequencer == me || placement.replica == me;
            involved
                || chain.seq.is_some()
                || chain.claim.is_some()
                || !chain.queued.is_empty()
                || chain.stored.as_ref().is_some_and(|l| l.bytes() > 0)
        });
        self.hub.trim(std_now);
    }
}

/// Whether the answer to a fetch of what follows `asked` brings everything a fetch of what
/// follows `needed` would: any answer gives the stream's position (all a live subscription
/// needs), and one from an earlier offset of the same epoch holds the later messages too.
fn covers(asked: Option<Position>, needed: Option<Position>) -> bool {
    match (asked, needed) {
        (_, None) => true,
        (Some(asked), Some(needed)) => asked.epoch == needed.epoch && asked.offset <= needed.offset,
        (None, Some(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_covers_live_subscriptions_and_later_offsets_of_its_epoch() {
        let e1 = Epoch(1);
        let e2 = Epoch(2);
        let at = |epoch, offset| Some(Position { epoch, offset });
        assert!(covers(None, None));
        assert!(covers(at(e1, 5), None));
        assert!(covers(at(e1, 5), at(e1, 5)));
        assert!(covers(at(e1, 5), at(e1, 9)));
        assert!(!covers(at(e1, 5), at(e1, 4)));
        assert!(!covers(at(e1, 5), at(e2, 9)));
        // A fetch of the position alone brings no messages.
        assert!(!covers(None, at(e1, 9)));
    }
}
