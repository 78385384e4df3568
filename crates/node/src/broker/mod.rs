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
//!   holds every message that went out. It **claims** the topic's partition: every live node
//!   stops accepting the partition's topics from older sequencers (a *term*) and sends back what
//!   it holds of them; the claimant continues each from the newest log in the same epoch. Publishes sent to the dead sequencer were
//!   never acknowledged: their origins send them again to the new one, which recognizes those it
//!   already sequenced by their [`PublishId`] and does not number them twice;
//! - a node **returns** or **joins** and ranks first: it claims the partition the same way, from the
//!   node that sequenced it meanwhile. A node that stops sequencing keeps what it numbered aside:
//!   the publish ids of what its stream delivered come from it, so the next claimant still
//!   recognizes a publish sent again under its key when the replica dies in the handover.
//!
//! A node leaves the placements when the farm lists it `DOWN`, or at once when its relay links
//! were reset or refused by its side (a killed process's kernel does that; a hung or cut-off node
//! only falls silent, and waits for the failure timeout).
//!
//! A new epoch starts only when a claim answered by every live node finds none holding the
//! topic: its history is truly gone. Cost on the publish path: up to three hops between nodes
//! (origin → sequencer → replica → subscribers' node) instead of one, measured in BENCHMARKS.md.
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
//! - the **interest** between nodes travels as changes (`crate::interest`);
//! - **claims, terms and fencing** are per partition too ([`claims`]): a claim asks every live
//!   node once for all it holds of a partition, answered in bounded frames; once every live node
//!   has answered, a topic none of them holds is new, and starts at once — a first subscription
//!   or publish costs no claim — and a node failure moves 4 096 / N claims, not one per topic.
//!   A new topic costs a `prime` to its sequencer, a `sync` to its replica and the fetch that
//!   asked (`streamfarm bench topics` in BENCHMARKS.md);
//! - a **view change** looks only at the partitions whose sequencer or replica moved.
//!
//! # A state machine, and the task around it
//! The broker's [`Core`] reads no clock, draws no random number of its own and does no I/O:
//! publishes, peers' frames, fetches, the farm list, membership, ended links and the passing of
//! time all reach it as an [`Input`] handled at a [`Now`] ([`Core::handle`]); it reaches other
//! nodes through a [`Network`] and this node's subscribers through the [`Hub`]. On a node, the
//! task in [`task`] feeds it from sockets and timers; in a test, a farm of cores runs in one
//! thread on a simulated clock and network, in an order drawn from a seed (`crate::chaos`).
//!
//! # Layout
//! - this module — the [`Core`], its inputs, and what every job shares: a topic's [`Chain`] on
//!   this node, placements, sending.
//! - [`publishing`] — publishes made here, until their acknowledgement.
//! - [`sequencing`] — numbering publishes and keeping a topic's log, as its sequencer.
//! - [`replication`] — storing, sending out and acknowledging, as a topic's replica; fencing.
//! - [`claims`] — claiming a partition: raising its term, continuing each topic from the newest
//!   log.
//! - [`chains`] — this node's part in each topic's chain, by name and by partition.
//! - [`fetches`] — what subscriptions and holes need from the replica, and the answers.
//! - [`catch_up`] — catching up from every live node in bounded frames.
//! - [`view`] — following the farm list: placements move, what was sent goes again.
//! - [`timers`] — what is due at each tick; housekeeping.
//! - [`task`] — the node's task around the core, and the handles sessions and the relay call.
//! - [`log`] — one topic's bounded history ([`log::Log`]).
//! - [`placement`] — the partition, sequencer and replica of a topic.
//! - [`wire`] — the frames between nodes about topics.

mod catch_up;
mod chains;
mod claims;
mod fetches;
pub(crate) mod log;
pub(crate) mod placement;
mod publishing;
mod replication;
mod sequencing;
mod task;
mod timers;
mod view;
pub(crate) mod wire;

use chains::{Chains, Part};
use fetches::{FetchWait, HeldFetch};
use publishing::Pending;
use sequencing::Sequencing;
pub(crate) use task::{Broker, BrokerInput, deliver_from_peer};
use timers::{Timers, due};

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use rand::{Rng, SeedableRng, rngs::StdRng};
use streamfarm_core::FarmList;
use streamfarm_core::protocol::{Encoding, Epoch, Position, ServerFrame};
use tokio::sync::{mpsc, oneshot, watch};
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
pub(crate) const TICK: Duration = Duration::from_millis(50);
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

/// What the broker's core is asked to do: everything that reaches it, time and the farm's
/// changes included, arrives as one of these (see [`Core::handle`]).
#[derive(Debug)]
pub(crate) enum Input {
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
    /// Time passed: retry, time out and trim what is due (every [`TICK`]).
    Tick,
    /// The live nodes of the farm list (`DOWN` ones left out), this one included while it is
    /// not `DOWN`.
    Farm(Vec<String>),
    /// What membership knows of the peers: whether it has heard from the farm yet, and every
    /// peer it knows a relay address of (live or not yet judged).
    Peers { settled: bool, known: Vec<String> },
    /// The peers whose relay links their side ended (reset or refused): left out of placements
    /// until linked again.
    LinksEnded(HashSet<String>),
}

/// The time an input is handled at: the core reads no clock of its own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now {
    /// For every deadline and age.
    pub(crate) at: Instant,
    /// The wall clock in milliseconds since the Unix epoch: only for new epochs, which must
    /// compare greater than those of an earlier run.
    pub(crate) unix_ms: u64,
}

impl Now {
    /// The clocks of this moment.
    pub(crate) fn clocks() -> Self {
        Now {
            at: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }
}

/// How the core reaches other nodes: the relay on a node, a simulated network in a simulation.
pub(crate) trait Network: Send {
    /// Sends `frame` to node `to` (never this node); false when there is no link to it now.
    fn send(&self, to: &str, frame: &PeerFrame) -> bool;
    /// Sends a topic's message, as its replica sends it out, to every other node that wants it.
    fn fanout(&self, topic: &str, frame: &Utf8Bytes);
}

/// This node's part in one topic's chain.
#[derive(Default)]
struct Chain {
    /// Set while this node sequences the topic.
    seq: Option<Sequencing>,
    /// Publishes waiting for this node's claim of the topic's partition to finish.
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

/// The broker's core (see the module docs): a state machine that reads no clock, draws no random
/// number of its own and does no I/O. Everything reaches it as an [`Input`] with the time it
/// happens at ([`Core::handle`]); it answers through [`Network`], the [`Hub`] (this node's
/// delivery streams) and the reply channels its inputs carry.
pub(crate) struct Core {
    me: String,
    /// This run of the node (publish ids of an earlier run are told apart from this one's).
    run: u64,
    /// Draws the low bits of new epochs.
    rng: StdRng,
    /// The time of the input being handled.
    now: Instant,
    unix_ms: u64,
    metrics: Arc<Metrics>,
    hub: Arc<Hub>,
    net: Box<dyn Network>,
    limits: Limits,
    /// The farm list's live nodes, as last told ([`Input::Farm`]).
    farm_live: Vec<String>,
    /// Whether membership has heard from the farm: a node claims nothing before (it would find
    /// no history, and start a new epoch beside the farm's).
    settled: bool,
    /// Every peer membership knows a relay address of ([`Input::Peers`]).
    known: Vec<String>,
    /// Peers whose links ended by their side ([`Input::LinksEnded`]).
    ended: HashSet<String>,
    /// When to fetch every delivered topic once more (see [`Core::links_ended`]).
    catch_up_at: Option<Instant>,
    /// Live nodes of the farm list, this one included while it is not `DOWN`, less those whose
    /// links ended.
    live: Vec<String>,
    /// The placement of each partition on `live`, computed when first needed (cleared whenever
    /// `live` changes).
    /// Shared, not copied: a placement is read several times for every frame.
    placements: std::cell::RefCell<Vec<Option<Arc<Placement>>>>,
    chains: Chains,
    /// Each partition's claim term and this node's claim of it, by partition.
    parts: Vec<Part>,
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
    /// Faults put in on purpose, to show that the simulation finds them.
    #[cfg(test)]
    pub(crate) breaks: Breaks,
}

/// Faults a test puts into a core on purpose (see `crate::chaos`'s tests).
#[cfg(test)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Breaks {
    /// A replica stores what any sequencer sends, whatever its term.
    pub(crate) skip_fencing: bool,
    /// A claimant continues from its own log, not the newest one the farm holds.
    pub(crate) ignore_claim_answers: bool,
}

/// What a [`Core`] is made of.
pub(crate) struct CoreConfig {
    pub(crate) me: String,
    /// This run of the node: the wall clock's milliseconds at its start on a node.
    pub(crate) run: u64,
    /// Seeds the core's random numbers.
    pub(crate) seed: u64,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) net: Box<dyn Network>,
    pub(crate) limits: Limits,
    pub(crate) publish_timeout: Duration,
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
/// not), so that a publish sent again is still recognized. The ids the newer one lacks are taken
/// from the other where it holds the same message (same epoch, offset and payload): the newest
/// state a claim finds may be a delivery stream, and the only ids of its messages in another
/// node's log.
fn newer(a: Option<LogState>, b: Option<LogState>) -> Option<LogState> {
    let rank = |s: &LogState| {
        let known = s.entries.iter().filter(|e| !e.id.origin.is_empty()).count();
        (s.epoch, s.last, known)
    };
    let (mut kept, other) = match (a, b) {
        (Some(a), Some(b)) if rank(&b) > rank(&a) => (b, a),
        (Some(a), Some(b)) => (a, b),
        (a, b) => return a.or(b),
    };
    take_ids(&mut kept, &other);
    Some(kept)
}

/// Gives the entries of `into` that lack a publish id (a delivery stream's) the id `from` holds
/// for the same message: the same epoch, offset and payload.
fn take_ids(into: &mut LogState, from: &LogState) {
    if into.epoch != from.epoch {
        return;
    }
    let known: HashMap<u64, &WireEntry> = from
        .entries
        .iter()
        .filter(|e| !e.id.origin.is_empty())
        .map(|e| (e.offset, e))
        .collect();
    for entry in into.entries.iter_mut().filter(|e| e.id.origin.is_empty()) {
        if let Some(found) = known.get(&entry.offset)
            && found.data == entry.data
            && found.encoding == entry.encoding
        {
            entry.id = found.id.clone();
        }
    }
}

impl Core {
    pub(crate) fn new(config: CoreConfig, now: Now) -> Core {
        Core {
            me: config.me,
            run: config.run,
            rng: StdRng::seed_from_u64(config.seed),
            now: now.at,
            unix_ms: now.unix_ms,
            metrics: config.metrics,
            hub: config.hub,
            net: config.net,
            limits: config.limits,
            farm_live: Vec::new(),
            settled: false,
            known: Vec::new(),
            ended: HashSet::new(),
            catch_up_at: None,
            live: Vec::new(),
            placements: std::cell::RefCell::new(vec![None; PARTITIONS]),
            chains: Chains::default(),
            parts: (0..PARTITIONS).map(|_| Part::default()).collect(),
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
            publish_timeout: config.publish_timeout,
            housekeeping_at: now.at + HOUSEKEEPING,
            #[cfg(test)]
            breaks: Breaks::default(),
        }
    }

    /// Handles one input at `now`, and every frame it makes this node send itself.
    pub(crate) fn handle(&mut self, now: Now, input: Input) {
        // Time never goes back for the core, whatever the caller's clocks do.
        self.now = self.now.max(now.at);
        self.unix_ms = self.unix_ms.max(now.unix_ms);
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
            Input::Tick => self.tick(),
            Input::Farm(live) => {
                self.farm_live = live;
                self.view_changed();
            }
            Input::Peers { settled, known } => {
                self.settled = settled;
                self.known = known;
            }
            Input::LinksEnded(ended) => self.links_ended(ended),
        }
        self.drain_self();
    }

    /// Wakes the writers of the subscribers that messages were queued to since the last call:
    /// once per batch of inputs (see `crate::queue`'s deferred wake-ups).
    pub(crate) fn wake_writers(&mut self) {
        self.wakes.wake_all();
    }

    /// Whether frames are queued for subscribers and their writers not yet woken.
    pub(crate) fn writers_to_wake(&self) -> usize {
        self.wakes.pending()
    }

    /// Answers every publish waiting for its acknowledgement: the node is stopping.
    pub(crate) fn stop(&mut self) {
        for (_, pending) in self.pending.drain() {
            if let Some(done) = pending.done {
                let _ = done.send(Err(PublishError::Stopping));
            }
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
        self.net.send(to, &frame)
    }

    /// The topic's sequencer and replica as this node sees the farm: its partition's, computed
    /// once per partition until the farm changes.
    fn placement(&self, topic: &str) -> Arc<Placement> {
        self.partition_placement(partition(topic))
    }

    /// The sequencer and replica of partition `p` as this node sees the farm (this node alone
    /// when no node is live), computed once until the farm changes.
    fn partition_placement(&self, p: usize) -> Arc<Placement> {
        let mut cache = self.placements.borrow_mut();
        cache[p]
            .get_or_insert_with(|| {
                Arc::new(place_partition(p, &self.live).unwrap_or_else(|| Placement {
                    sequencer: self.me.clone(),
                    replica: self.me.clone(),
                }))
            })
            .clone()
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
            } => self.on_ack(&id, Position::new(epoch, offset)),
            PeerFrame::Nack { topic: _, id } => self.on_nack(&id),
            PeerFrame::Stored {
                topic,
                epoch,
                offset,
            } => self.on_stored(&topic, epoch, offset),
            PeerFrame::Fenced { topic, term } => self.on_fenced(topic, term),
            PeerFrame::Prime { topic } => self.on_prime(topic),
            PeerFrame::Claim { partition, term } => self.on_claim(from, partition, term),
            PeerFrame::ClaimReply {
                partition,
                term,
                granted,
                states,
                done,
            } => self.on_claim_reply(from, partition, term, granted, states, done),
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
}
