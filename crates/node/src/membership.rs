//! Shared farm state over gossip (quickwit's `chitchat`: scuttlebutt reconciliation over UDP).
//!
//! Each node advertises, as chitchat keys of its own node state:
//! `url`, `status` (`UP`/`DOWN`/`DRAINING`), `users`, `sse_users` (those of them on server-sent
//! events, listed as the entry's `sse_users` for dashboards), `priority`, `capacity`, `join_rate`
//! and `relay` (the url of its relay endpoint). Its chitchat id is `(name, generation, gossip address)`
//! with the generation = start time in milliseconds, so a restarted node is a new generation and
//! its old state is superseded.
//!
//! Gossip uses chitchat's protocol V1, whose digests are zstd-compressed: every Syn and SynAck
//! carries the sender's whole digest (about 44 bytes per node uncompressed), so uncompressed a
//! 1000-node farm's datagrams were ~44 KB and the UDP limit came at ~1 500 nodes; compressed they
//! are ~6 KB (see BENCHMARKS.md, *Large farms*). chitchat answers in the version it was asked in.
//!
//! A loop ticking twice per gossip interval
//! 1. writes this node's changed values into its chitchat state (at most once per tick, so a burst
//!    of connections costs one key update, not one per connection), and
//! 2. rebuilds the [`FarmList`] and the relay peer list from every node state, publishing them on
//!    `watch` channels when they change.
//!
//! The loop also watches the chitchat task: if it ends on its own (a fatal socket error, a panic),
//! it logs an error, sets `gossip_up` to 0 (and `/healthz` to 503), counts `gossip_failures`, and
//! restarts chitchat on the same address as a new generation (peers hold the old generation's
//! versions, so the same id would not be heard), with a growing delay while that fails.
//!
//! # Count ages
//! Each live entry of the list says how old its `users` count is (`users_age_ms`): a peer's, the
//! time since its state was last heard; this node's own, listed as of the median instant of its
//! peers' counts (from the counts it kept), so that a client compares counts of one moment and
//! the list server does not look busier than its peers during a burst.
//!
//! # Liveness
//! A peer is listed with its advertised status while its gossip heartbeat keeps advancing, and
//! `DOWN` once the heartbeat has not advanced for `failure_timeout` minus one gossip interval (the
//! age the last heartbeat may already have had when it arrived) — so a node that dies is listed
//! `DOWN` within `failure_timeout` (killed, stopped, cut off).
//! This is a plain timeout rather than chitchat's phi-accrual verdict so that the detection time is
//! exactly the configured one; chitchat's own detector is tuned to the same scale and still
//! decides whom it gossips with. A node first seen through a third party is not listed `UP` until
//! its heartbeat is seen advancing. Of several generations of one name, only one is listed: the
//! newest live one, else the newest (a dead generation is kept an hour, and must not hide the
//! live node of that name).
//!
//! Gossip goes through [`crate::trust::SignedUdp`]: with a farm secret, a datagram that does not
//! carry the farm's authentication tag is dropped before it is decoded, so an outsider can
//! neither forge a node's state nor take its name.
//!
//! The relay's peer list ([`Peers`]) holds the live peers and, for `failure_timeout` after they are
//! first seen, the not-yet-judged ones, so that a just-started node links to a live farm before it
//! confirms subscriptions; it is `settled` once any peer has been heard of (or there is no seed,
//! or `failure_timeout` has passed).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chitchat::transport::Transport;
use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState};
use streamfarm_core::selection::Draws;
use streamfarm_core::{FarmList, ServerEntry, Status};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::NodeConfig;
use crate::hub::Hub;
use crate::metrics::{self, Metrics};
use crate::relay::{LinkEnds, Peers};

/// Dead nodes stay listed `DOWN` this long before chitchat forgets them.
const DEAD_NODE_GRACE: Duration = Duration::from_secs(3600);
/// Longest wait between two attempts to restart gossip.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(5);
/// How long stopping waits for the gossip task before aborting it.
const STOP_GRACE: Duration = Duration::from_millis(500);
/// Window over which the join rate is measured.
const JOIN_RATE_WINDOW: Duration = Duration::from_secs(5);

/// Keys of the node state.
mod key {
    pub(super) const URL: &str = "url";
    pub(super) const STATUS: &str = "status";
    pub(super) const USERS: &str = "users";
    pub(super) const SSE_USERS: &str = "sse_users";
    pub(super) const PRIORITY: &str = "priority";
    pub(super) const CAPACITY: &str = "capacity";
    pub(super) const JOIN_RATE: &str = "join_rate";
    pub(super) const RELAY: &str = "relay";
}

/// What this node says about itself.
#[derive(Debug, Clone)]
pub(crate) struct SelfInfo {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) relay_url: String,
    pub(crate) priority: String,
    pub(crate) capacity: u64,
}

/// A running chitchat instance (its server task), aborted when dropped.
struct Gossip {
    handle: ChitchatHandle,
    /// Resolves when the server task ends, on its own (a fatal socket error, a panic) or not.
    ended: Pin<Box<dyn Future<Output = Result<(), String>> + Send>>,
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Where and how this node gossips: what a (re)start of chitchat needs.
pub(crate) struct GossipSetup {
    pub(crate) config: NodeConfig,
    pub(crate) me: SelfInfo,
    pub(crate) addr: SocketAddr,
    /// The datagram transport: UDP, or a test's.
    pub(crate) transport: Arc<dyn Transport>,
}

/// Starts chitchat as generation `generation`, advertising `mine` (status, users, join rate) from
/// the first round.
async fn start_gossip(
    setup: &GossipSetup,
    generation: u64,
    mine: &[(&'static str, String)],
) -> Result<Gossip, String> {
    let (config, me, gossip_addr) = (&setup.config, &setup.me, setup.addr);
    let chitchat_config = chitchat_config(config, &me.name, generation, gossip_addr);
    let mut initial = fixed_key_values(me);
    initial.extend(mine.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let handle = chitchat::spawn_chitchat(chitchat_config, initial, &*setup.transport)
        .await
        .map_err(|err| format!("{err:#}"))?;
    let ended = handle.termination_watcher();
    let ended = Box::pin(async move { ended.await.map_err(|err| format!("{err:#}")) });
    Ok(Gossip { handle, ended })
}

/// The chitchat settings of a node named `name` gossiping on `gossip_addr` as generation
/// `generation`: what every node runs, and what `streamfarm bench convergence --in-process`
/// runs its in-memory farms with.
pub fn chitchat_config(
    config: &NodeConfig,
    name: &str,
    generation: u64,
    gossip_addr: SocketAddr,
) -> ChitchatConfig {
    let gossip_interval = config.gossip_interval();
    // Chitchat's phi is "time since last heartbeat / mean interval"; heartbeats arrive about once
    // per gossip interval, so this threshold puts its verdict near our own timeout.
    let phi_threshold =
        (config.failure_timeout_ms as f64 / config.gossip_interval_ms as f64).max(3.0);
    ChitchatConfig {
        chitchat_id: ChitchatId::new(name.to_string(), generation, gossip_addr),
        cluster_id: config.cluster.clone(),
        gossip_interval,
        listen_addr: gossip_addr,
        seed_nodes: config.join.clone(),
        failure_detector_config: FailureDetectorConfig {
            phi_threshold,
            sampling_window_size: 100,
            max_interval: config.failure_timeout(),
            initial_interval: gossip_interval,
            dead_node_grace_period: DEAD_NODE_GRACE,
        },
        marked_for_deletion_grace_period: DEAD_NODE_GRACE,
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V1,
    }
}

/// The keys of this node that do not change while it runs.
fn fixed_key_values(me: &SelfInfo) -> Vec<(String, String)> {
    vec![
        (key::URL.to_string(), me.url.clone()),
        (key::PRIORITY.to_string(), me.priority.clone()),
        (key::CAPACITY.to_string(), me.capacity.to_string()),
        (key::RELAY.to_string(), me.relay_url.clone()),
    ]
}

/// The key-value state a node named `name`, streaming at `url` and relaying at `relay_url`,
/// advertises when it starts with `users` users: the same keys and value shapes as a running
/// node, for the in-memory farms of `streamfarm bench convergence --in-process`.
pub fn gossip_key_values(
    name: &str,
    url: &str,
    relay_url: &str,
    users: u64,
) -> Vec<(String, String)> {
    let me = SelfInfo {
        name: name.to_string(),
        url: url.to_string(),
        relay_url: relay_url.to_string(),
        priority: "A".to_string(),
        capacity: 10_000,
    };
    let mut values = fixed_key_values(&me);
    values.extend(
        mine(Status::Up, users, 0, 0.0)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    values
}

/// The gossip key holding a node's number of connected users.
pub const USERS_KEY: &str = key::USERS;

/// A generation number for a chitchat start now: milliseconds since the epoch, above `after`.
fn next_generation(after: u64) -> u64 {
    crate::now_ms().max(after + 1)
}

/// Everything the membership loop reads and writes.
pub(crate) struct Loop {
    pub(crate) setup: GossipSetup,
    pub(crate) metrics: Arc<Metrics>,
    /// The node's connections: their count is the `users` fact, their arrivals the join rate.
    pub(crate) hub: Arc<Hub>,
    pub(crate) status_rx: watch::Receiver<Status>,
    pub(crate) farm_tx: watch::Sender<FarmList>,
    /// Bumped when the farm's membership changes (a server's name, url, status or group), not
    /// its users: what clients watching the list are pushed (see `session`).
    pub(crate) members_tx: watch::Sender<u64>,
    pub(crate) peers_tx: watch::Sender<Peers>,
    pub(crate) gossip_interval: Duration,
    pub(crate) failure_timeout: Duration,
    /// No seeds to join: there is no farm to hear from first.
    pub(crate) alone: bool,
    /// Whether this node is cut off from the farm (see the module docs, *Isolation*).
    pub(crate) isolated_tx: watch::Sender<bool>,
    /// Peers whose relay links ended by their side: they died, this node is not cut off.
    pub(crate) link_ends: Arc<LinkEnds>,
}

/// Last heartbeat seen of one node generation, and when it last advanced.
#[derive(Debug, Clone, Copy)]
struct Seen {
    heartbeat: u64,
    first_seen: Instant,
    advanced_at: Option<Instant>,
}

/// The values of this node that change: status, users (`sse_users` of them on event streams),
/// join rate.
fn mine(status: Status, users: u64, sse_users: u64, join_rate: f64) -> [(&'static str, String); 4] {
    [
        (key::STATUS, status.as_str().to_string()),
        (key::USERS, users.to_string()),
        (key::SSE_USERS, sse_users.to_string()),
        (key::JOIN_RATE, format!("{join_rate:.2}")),
    ]
}

impl Loop {
    /// Starts gossip (a first generation, advertising `UP` and no users), then runs until
    /// `cancel` fires, watching the gossip task and restarting it if it ever stops.
    pub(crate) async fn start(
        self,
        cancel: CancellationToken,
    ) -> Result<impl Future<Output = ()> + Send, String> {
        let first = start_gossip(
            &self.setup,
            next_generation(0),
            &mine(Status::Up, 0, 0, 0.0),
        )
        .await?;
        self.metrics.gossip_up.store(1, Ordering::Relaxed);
        Ok(self.watch(first, cancel))
    }

    /// Runs the node's membership until `cancel` fires: on every turn (a tick, twice per gossip
    /// round, or a status change) it restarts gossip if it died, advertises this node's values,
    /// reads its peers', judges who is alive and whether this node is cut off, and publishes the
    /// farm list and the peers to link to.
    async fn watch(mut self, first: Gossip, cancel: CancellationToken) {
        let mut watch = Watch::new(first, self.gossip_interval);
        // Twice per gossip round, so news and verdicts wait at most half a round here.
        let mut tick = tokio::time::interval(self.gossip_interval / 2);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        while self.next_turn(&mut watch, &mut tick, &cancel).await {
            let now = Instant::now();
            let status = *self.status_rx.borrow_and_update();
            // The load the farm sees is the broker's own count, not a metric.
            let users = self.hub.users();
            let join_rate = join_rate(&mut watch.joins, now, self.hub.accepted());
            let sse_users = self.metrics.sse_connections.load(Ordering::Relaxed);
            let mine = mine(status, users, sse_users, join_rate);
            self.restart_gossip_when_due(&mut watch, &mine, now).await;
            let states = watch.advertise_and_read(mine).await;
            watch.remember_own_count(now, users, self.failure_timeout);
            watch.note_heartbeats(&states, now);
            let newest = self.newest_generations(&watch, &states, now);
            self.warn_of_name_conflicts(&mut watch, &states, &newest, now);
            self.judge_isolation(&mut watch, &states, &newest, now);
            let (mut list, relays) = self.peer_entries(&watch, &states, &newest, now);
            let (own_users, own_age) = own_count_as_of(&watch.own_counts, &list, now);
            let mut own = self_entry(&self.setup.me, status, own_users, join_rate);
            own.users_age_ms = Some(own_age.as_millis() as u64);
            own.extra
                .insert(key::SSE_USERS.to_string(), sse_users.into());
            list.push(own);
            list.sort_by(|a, b| a.name.cmp(&b.name));
            self.publish_list(list);
            self.report_seeds(
                states.is_empty(),
                now,
                watch.started,
                &mut watch.seeds_reported,
            );
            // Settled once a peer has been heard of, or when there is nobody to hear from.
            let peers = Peers {
                settled: self.alone
                    || !states.is_empty()
                    || now.duration_since(watch.started) >= self.failure_timeout,
                relays,
            };
            self.peers_tx.send_if_modified(|current| {
                if *current == peers {
                    return false;
                }
                *current = peers;
                true
            });
        }
        watch.stop_gossip().await;
    }

    /// Waits for the next turn: a tick, a status change (which goes out at once, not at the
    /// next tick), or the end of the gossip task (then noted for a restart). False once the
    /// node stops.
    async fn next_turn(
        &mut self,
        watch: &mut Watch,
        tick: &mut tokio::time::Interval,
        cancel: &CancellationToken,
    ) -> bool {
        let ended = async {
            match watch.gossip.as_mut() {
                Some(gossip) => (&mut gossip.ended).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tick.tick() => true,
            changed = self.status_rx.changed() => changed.is_ok(),
            // Not asked to stop: whatever the reason, this node has left the farm.
            result = ended => {
                let reason = match result {
                    Ok(()) => "it ended".to_string(),
                    Err(err) => err,
                };
                error!(
                    reason = %reason,
                    generation = watch.self_id.generation_id,
                    "gossip stopped: the farm no longer hears from this node; restarting it"
                );
                self.metrics.gossip_up.store(0, Ordering::Relaxed);
                metrics::inc(&self.metrics.gossip_failures);
                watch.gossip = None;
                watch.restart_at = Instant::now();
                true
            }
        }
    }

    /// Starts a new generation of gossip when it is down and its restart is due, advertising
    /// `mine` from the first round; a failed start is tried again later, backing off.
    async fn restart_gossip_when_due(
        &self,
        watch: &mut Watch,
        mine: &[(&'static str, String)],
        now: Instant,
    ) {
        if watch.gossip.is_some() || now < watch.restart_at {
            return;
        }
        // A new generation: peers hold the old one's versions, so a restart under the same id
        // would not be heard.
        let generation = next_generation(watch.self_id.generation_id);
        match start_gossip(&self.setup, generation, mine).await {
            Ok(restarted) => {
                info!(generation, "gossip restarted");
                watch.chitchat = restarted.handle.chitchat();
                watch.self_id = restarted.handle.chitchat_id().clone();
                watch.gossip = Some(restarted);
                watch.advertised = mine.iter().cloned().collect();
                watch.restart_delay = self.gossip_interval;
                self.metrics.gossip_up.store(1, Ordering::Relaxed);
            }
            Err(err) => {
                error!(error = %err, retry_in = ?watch.restart_delay, "gossip cannot restart");
                watch.restart_at = now + watch.restart_delay;
                watch.restart_delay = (watch.restart_delay * 2).min(MAX_RESTART_DELAY);
            }
        }
    }

    /// Whether `record`'s heartbeat advanced within `within` of `now`. The heartbeat seen last
    /// was sent up to a gossip round before it reached this node: that round is allowed for, so
    /// that the verdict comes within `failure_timeout` of the peer's last heartbeat, not later.
    fn alive_within(&self, record: &Seen, within: Duration, now: Instant) -> bool {
        record
            .advanced_at
            .is_some_and(|at| now.duration_since(at) + self.gossip_interval < within)
    }

    /// How a generation ranks for its name: live first, then newest.
    fn rank(&self, watch: &Watch, id: &ChitchatId, now: Instant) -> (bool, u64) {
        let live = watch
            .seen
            .get(id)
            .is_some_and(|r| self.alive_within(r, self.failure_timeout, now));
        (live, id.generation_id)
    }

    /// One generation per name: the newest live one, else the newest. A dead generation (kept
    /// by chitchat for an hour) never hides a live one, even if it is newer: a second node that
    /// took the name for a while, then died, does not keep the real one listed DOWN.
    fn newest_generations<'s>(
        &self,
        watch: &Watch,
        states: &'s [(ChitchatId, Entry)],
        now: Instant,
    ) -> HashMap<&'s str, &'s ChitchatId> {
        let rank = |id: &ChitchatId| self.rank(watch, id, now);
        let mut newest: HashMap<&str, &ChitchatId> = HashMap::new();
        for (id, _) in states {
            let slot = newest.entry(&*id.node_id).or_insert(id);
            if rank(id) > rank(slot) {
                *slot = id;
            }
        }
        newest
    }

    /// Two live generations of one name at different gossip addresses: two processes claim it
    /// (at one address it is a restart: two processes cannot share it). Warned once per name.
    fn warn_of_name_conflicts(
        &self,
        watch: &mut Watch,
        states: &[(ChitchatId, Entry)],
        newest: &HashMap<&str, &ChitchatId>,
        now: Instant,
    ) {
        for (id, _) in states {
            let chosen = newest.get(&*id.node_id).copied();
            if chosen.is_some_and(|c| {
                c != id
                    && c.gossip_advertise_addr != id.gossip_advertise_addr
                    && self.rank(watch, id, now).0
                    && self.rank(watch, c, now).0
            }) && watch.conflicts.insert(id.node_id.to_string())
            {
                warn!(
                    name = %id.node_id,
                    other = %id.gossip_advertise_addr,
                    "two live nodes at different addresses gossip under one name: names must be unique in the farm (a node restarted at another address also looks like this, for up to failure_timeout_ms); the newest is listed"
                );
            }
        }
    }

    /// Whether this node is cut off: every peer fell silent, at least two of them within one
    /// failure timeout of each other, and none of those closed, reset or refused its relay links
    /// (a process that dies leaves its kernel to say so; a network that drops packets says
    /// nothing). Two nodes rarely hang in the same second; one node losing its network loses
    /// them all at once. It lasts until a peer is heard again.
    fn judge_isolation(
        &self,
        watch: &mut Watch,
        states: &[(ChitchatId, Entry)],
        newest: &HashMap<&str, &ChitchatId>,
        now: Instant,
    ) {
        let peers: Vec<&ChitchatId> = states
            .iter()
            .map(|(id, _)| id)
            .filter(|id| newest.get(&*id.node_id) == Some(id) && *id.node_id != *self.setup.me.name)
            .collect();
        let alive_peers = peers
            .iter()
            .filter(|id| {
                watch
                    .seen
                    .get(**id)
                    .is_some_and(|r| self.alive_within(r, self.failure_timeout, now))
            })
            .count();
        let window = self.failure_timeout * 2;
        let vanished_together = peers
            .iter()
            .filter(|id| {
                watch
                    .seen
                    .get(**id)
                    .is_some_and(|r| self.alive_within(r, window, now))
                    && !self.link_ends.ended_within(&id.node_id, window)
            })
            .count()
            >= 2;
        let now_isolated = alive_peers == 0 && (watch.isolated || vanished_together);
        if now_isolated != watch.isolated {
            watch.isolated = now_isolated;
            if now_isolated {
                warn!(
                    peers = peers.len(),
                    "cut off from the farm: every peer fell silent at once; peers stay listed as last seen, clients are sent elsewhere"
                );
            } else {
                info!("back in touch with the farm");
            }
            self.isolated_tx.send_replace(now_isolated);
        }
    }

    /// The peers' entries for the list, as this node judges them now, and the relay urls of
    /// those to link to.
    fn peer_entries(
        &self,
        watch: &Watch,
        states: &[(ChitchatId, Entry)],
        newest: &HashMap<&str, &ChitchatId>,
        now: Instant,
    ) -> (Vec<ServerEntry>, BTreeMap<String, String>) {
        let mut list = Vec::new();
        let mut relays = BTreeMap::new();
        for (id, entry) in states {
            let Some(record) = watch.seen.get(id) else {
                continue;
            };
            if newest.get(&*id.node_id) != Some(&id) || *id.node_id == *self.setup.me.name {
                continue;
            }
            let alive = self.alive_within(record, self.failure_timeout, now);
            let Some(mut server) = entry.server(&id.node_id) else {
                continue;
            };
            // Cut off, a node cannot tell whether its peers live: it lists them as it last saw
            // them, so that clients asking it try them too.
            if !alive && !watch.isolated {
                // Its connections are gone with it: a silent node holds nobody.
                server.status = Status::Down;
                server.users = 0;
                server.join_rate = None;
                server.extra.remove(key::SSE_USERS);
            }
            // Not judged yet: just seen, heartbeat not yet seen advancing. It is linked to
            // meanwhile (a failed dial costs nothing), so that a peer which is in fact live — a
            // peer found at start, or one just restarted — gets this node's interest before this
            // node confirms a subscription (see `Peers`).
            let unjudged = record.advanced_at.is_none()
                && now.duration_since(record.first_seen) < self.failure_timeout;
            if (alive || unjudged)
                && let Some(relay) = &entry.relay
            {
                relays.insert(id.node_id.to_string(), relay.clone());
            }
            if server.status.is_live() {
                server.users_age_ms = Some(self.peer_count_age(record, now).as_millis() as u64);
            }
            list.push(server);
        }
        (list, relays)
    }

    /// Publishes `list` as the farm list, stamped now. Ages change every turn: they are kept
    /// current, but only a change of anything else is news to the list's watchers, and only a
    /// change of a member (name, url, status, group) to the clients watching it.
    fn publish_list(&self, list: Vec<ServerEntry>) {
        let stamp = crate::now_ms();
        let members = |servers: &[ServerEntry]| -> Vec<(String, String, Status, String)> {
            servers
                .iter()
                .map(|s| (s.name.clone(), s.url.clone(), s.status, s.priority.clone()))
                .collect()
        };
        let mut members_changed = false;
        self.farm_tx.send_if_modified(|current| {
            if without_ages(&current.servers) == without_ages(&list) {
                current.servers = list;
                current.generated_at_ms = Some(stamp);
                return false;
            }
            members_changed = members(&current.servers) != members(&list);
            for server in &list {
                let before = current.servers.iter().find(|s| s.name == server.name);
                if before.map(|b| b.status) != Some(server.status) {
                    info!(server = %server.name, status = %server.status, "farm member status");
                }
            }
            current.servers = list;
            current.generated_at_ms = Some(stamp);
            true
        });
        if members_changed {
            self.members_tx.send_modify(|version| *version += 1);
        }
    }
}

/// What the membership loop keeps from one turn to the next.
struct Watch {
    /// The state of the running gossip, or of the last one while it is down: peers fall silent
    /// in it and are listed `DOWN` in time, which is this node's true view.
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    self_id: ChitchatId,
    gossip: Option<Gossip>,
    restart_delay: Duration,
    restart_at: Instant,
    seen: HashMap<ChitchatId, Seen>,
    /// Names seen claimed by two live generations at once (warned once each).
    conflicts: HashSet<String>,
    joins: VecDeque<(Instant, u64)>,
    /// This node's recent counts, to list its own as of the instant of its peers'.
    own_counts: VecDeque<(Instant, u64)>,
    advertised: BTreeMap<&'static str, String>,
    started: Instant,
    isolated: bool,
    /// When a seed that does not answer was last reported (see `report_seeds`).
    seeds_reported: Option<Instant>,
}

impl Watch {
    fn new(first: Gossip, gossip_interval: Duration) -> Self {
        let now = Instant::now();
        Watch {
            chitchat: first.handle.chitchat(),
            self_id: first.handle.chitchat_id().clone(),
            gossip: Some(first),
            restart_delay: gossip_interval,
            restart_at: now,
            seen: HashMap::new(),
            conflicts: HashSet::new(),
            joins: VecDeque::new(),
            own_counts: VecDeque::new(),
            advertised: BTreeMap::new(),
            started: now,
            isolated: false,
            seeds_reported: None,
        }
    }

    /// Sets this node's values that changed in its gossip state, and reads its peers' states.
    async fn advertise_and_read(
        &mut self,
        mine: [(&'static str, String); 4],
    ) -> Vec<(ChitchatId, Entry)> {
        let mut guard = self.chitchat.lock().await;
        for (key, value) in mine {
            if self.advertised.get(key) != Some(&value) {
                guard.self_node_state().set(key, &value);
                self.advertised.insert(key, value);
            }
        }
        guard
            .node_states()
            .iter()
            .filter(|(id, _)| **id != self.self_id)
            .map(|(id, state)| (id.clone(), Entry::read(state)))
            .collect()
    }

    /// Keeps this node's count of `now`, and those of the last `failure_timeout`.
    fn remember_own_count(&mut self, now: Instant, users: u64, failure_timeout: Duration) {
        self.own_counts.push_back((now, users));
        while self
            .own_counts
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > failure_timeout)
        {
            self.own_counts.pop_front();
        }
    }

    /// Notes which peers' heartbeats advanced since the last turn; forgets peers gone from the
    /// state.
    fn note_heartbeats(&mut self, states: &[(ChitchatId, Entry)], now: Instant) {
        self.seen
            .retain(|id, _| states.iter().any(|(s, _)| s == id));
        for (id, entry) in states {
            let record = self.seen.entry(id.clone()).or_insert(Seen {
                heartbeat: entry.heartbeat,
                first_seen: now,
                advanced_at: None,
            });
            if entry.heartbeat > record.heartbeat {
                record.heartbeat = entry.heartbeat;
                record.advanced_at = Some(now);
            }
        }
    }

    /// Stops the gossip task, if one runs. Bounded: a gossip task that does not answer is
    /// aborted (on drop) rather than waited for.
    async fn stop_gossip(self) {
        if let Some(mut gossip) = self.gossip {
            let _ = gossip.handle.initiate_shutdown();
            match tokio::time::timeout(STOP_GRACE, &mut gossip.ended).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => warn!(error = %err, "gossip did not stop cleanly"),
                Err(_) => warn!("gossip did not stop in time: aborted"),
            }
        }
    }
}

impl Loop {
    /// How old a live peer's count is: since its heartbeat last advanced here, plus half a gossip
    /// round for what this node cannot see (the peer writes its count into its state twice a
    /// round, and this loop reads the states twice a round: a quarter round late each, on
    /// average). The time a datagram takes is not counted: well under a millisecond on one
    /// network, up to a round more when the state came through a third node.
    fn peer_count_age(&self, record: &Seen, now: Instant) -> Duration {
        let heard = record.advanced_at.unwrap_or(record.first_seen);
        now.duration_since(heard) + self.gossip_interval / 2
    }
}

/// This node's count as of the instant of its live peers' counts in `list` (the median of their
/// ages), from its recent counts, and that count's age; its count now when it has no live peer.
///
/// A list server knows its own count at once and its peers' only a gossip round or more late.
/// During a burst of arrivals every count grows, so a fresh own count set beside older ones makes
/// the list server look busier than its peers, and the clients it serves avoid it. Listing its
/// own count of the peers' instant makes the counts comparable (`users_age_ms` says that instant
/// to clients, `docs/PROTOCOL.md`).
fn own_count_as_of(
    own_counts: &VecDeque<(Instant, u64)>,
    list: &[ServerEntry],
    now: Instant,
) -> (u64, Duration) {
    let mut ages: Vec<u64> = list
        .iter()
        .filter(|s| s.status.is_live())
        .filter_map(|s| s.users_age_ms)
        .collect();
    let latest = own_counts.back().map_or(0, |(_, users)| *users);
    if ages.is_empty() {
        return (latest, Duration::ZERO);
    }
    ages.sort_unstable();
    let target = Duration::from_millis(ages[ages.len() / 2]);
    // The newest count at or before the target instant; the oldest kept if none is that old.
    let chosen = own_counts
        .iter()
        .rev()
        .find(|(at, _)| now.duration_since(*at) >= target)
        .or(own_counts.front());
    match chosen {
        Some((at, users)) => (*users, now.duration_since(*at)),
        None => (latest, Duration::ZERO),
    }
}

/// When this node handed out its recent lists: what the next one says in `in_flight`; and the
/// sequence its `draw`s come from.
///
/// Bounded: entries older than [`HandedOut::KEEP`] are dropped, and at most [`HandedOut::MAX`]
/// are kept (a list server handing out more than that within its peers' count age reports the
/// most it kept).
#[derive(Debug)]
pub(crate) struct HandedOut {
    state: std::sync::Mutex<Handed>,
}

#[derive(Debug)]
struct Handed {
    at: VecDeque<Instant>,
    draws: Draws,
}

impl Default for HandedOut {
    fn default() -> Self {
        HandedOut {
            state: std::sync::Mutex::new(Handed {
                at: VecDeque::new(),
                // A start of its own per node: through the DNS name, the nodes' sequences are
                // not in step.
                draws: Draws::new(rand::random()),
            }),
        }
    }
}

/// What a list handed to one client says besides the farm.
pub(crate) struct Handout {
    /// Lists handed out since this node's count, this one included.
    pub(crate) in_flight: u64,
    /// This list's own draw.
    pub(crate) draw: f64,
}

impl HandedOut {
    /// Longer than a live peer's count age can be at sane settings (it stays below
    /// `failure_timeout`, 2 s by default): older lists are not in flight any more.
    const KEEP: Duration = Duration::from_secs(10);
    /// 1 MiB of instants.
    const MAX: usize = 65_536;

    /// Records a list handed out `now`: how many were handed out within `since` before it, this
    /// one included, and its draw.
    pub(crate) fn record(&self, now: Instant, since: Duration) -> Handout {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let at = &mut state.at;
        while at
            .front()
            .is_some_and(|t| now.duration_since(*t) > Self::KEEP)
            || at.len() >= Self::MAX
        {
            at.pop_front();
        }
        at.push_back(now);
        let in_flight = at
            .iter()
            .rev()
            .take_while(|t| now.duration_since(**t) <= since)
            .count() as u64;
        Handout {
            in_flight,
            draw: state.draws.next_draw(),
        }
    }
}

/// The entries with their count ages left out: what watchers of the list are told about.
fn without_ages(servers: &[ServerEntry]) -> Vec<ServerEntry> {
    servers
        .iter()
        .map(|s| ServerEntry {
            users_age_ms: None,
            ..s.clone()
        })
        .collect()
}

/// How often a node that has heard from no seed says so again.
const SEED_REPORT_EVERY: Duration = Duration::from_secs(60);

impl Loop {
    /// A node given seeds that has heard from nobody after `failure_timeout` says so (then every
    /// [`SEED_REPORT_EVERY`]) and keeps trying: nodes may start in any order, and the farm forms
    /// when a seed comes up. Once it hears from the farm, it says that too.
    fn report_seeds(
        &self,
        nobody: bool,
        now: Instant,
        started: Instant,
        reported: &mut Option<Instant>,
    ) {
        if self.alone {
            return;
        }
        if !nobody {
            if reported.take().is_some() {
                info!("heard from the farm: joined");
            }
            return;
        }
        let due = match reported {
            None => now.duration_since(started) >= self.failure_timeout,
            Some(at) => now.duration_since(*at) >= SEED_REPORT_EVERY,
        };
        if due {
            *reported = Some(now);
            warn!(
                seeds = ?self.setup.config.join,
                waited = ?now.duration_since(started),
                "no seed has answered: still trying (is a seed up at that address, its UDP port open, its cluster and farm secret the same?)"
            );
        }
    }
}

/// The keys of one node state, as read under the chitchat lock.
#[derive(Debug, Clone)]
struct Entry {
    heartbeat: u64,
    url: Option<String>,
    status: Option<String>,
    users: Option<String>,
    sse_users: Option<String>,
    priority: Option<String>,
    capacity: Option<String>,
    join_rate: Option<String>,
    relay: Option<String>,
}

impl Entry {
    fn read(state: &NodeState) -> Self {
        let get = |key: &str| state.get(key).map(str::to_string);
        Entry {
            heartbeat: state.heartbeat().into(),
            url: get(key::URL),
            status: get(key::STATUS),
            users: get(key::USERS),
            sse_users: get(key::SSE_USERS),
            priority: get(key::PRIORITY),
            capacity: get(key::CAPACITY),
            join_rate: get(key::JOIN_RATE),
            relay: get(key::RELAY),
        }
    }

    /// The list entry a peer advertises; `None` until its url has arrived.
    fn server(&self, name: &str) -> Option<ServerEntry> {
        let url = self.url.clone()?;
        let status = match self.status.as_deref().map(str::parse::<Status>) {
            Some(Ok(status)) => status,
            Some(Err(err)) => {
                warn!(server = name, error = %err, "peer advertises a bad status");
                Status::Down
            }
            None => Status::Down,
        };
        let mut server = ServerEntry::new(
            name,
            url,
            status,
            self.users
                .as_deref()
                .and_then(|u| u.parse().ok())
                .unwrap_or(0),
            self.priority.clone().unwrap_or_else(|| "A".to_string()),
        );
        server.capacity = self.capacity.as_deref().and_then(|c| c.parse().ok());
        server.join_rate = self.join_rate.as_deref().and_then(|r| r.parse().ok());
        if let Some(sse_users) = self
            .sse_users
            .as_deref()
            .and_then(|u| u.parse::<u64>().ok())
        {
            server
                .extra
                .insert(key::SSE_USERS.to_string(), sse_users.into());
        }
        Some(server)
    }
}

pub(crate) fn self_entry(me: &SelfInfo, status: Status, users: u64, join_rate: f64) -> ServerEntry {
    let mut server = ServerEntry::new(&me.name, &me.url, status, users, &me.priority);
    server.capacity = Some(me.capacity);
    server.join_rate = Some((join_rate * 100.0).round() / 100.0);
    server
}

/// Arrivals per second over the last [`JOIN_RATE_WINDOW`], from samples of the accept counter.
fn join_rate(samples: &mut VecDeque<(Instant, u64)>, now: Instant, accepted: u64) -> f64 {
    samples.push_back((now, accepted));
    while samples
        .front()
        .is_some_and(|(at, _)| now.duration_since(*at) > JOIN_RATE_WINDOW)
    {
        samples.pop_front();
    }
    let (first_at, first) = samples.front().copied().unwrap_or((now, accepted));
    let elapsed = now.duration_since(first_at).as_secs_f64();
    if elapsed < 0.5 {
        return 0.0;
    }
    let rate = (accepted - first) as f64 / elapsed;
    (rate * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests;
