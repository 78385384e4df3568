//! A farm of broker cores in one thread, on a simulated clock and network.
//!
//! Each node is a [`Core`] and its [`Hub`]. Frames travel on links, one per ordered pair of
//! nodes, each keeping its frames in order as the socket under a relay link does; which link
//! delivers next is drawn from the seed, so frames of different links overtake each other.
//! Membership is modelled as gossip: a node lists a peer `UP` while it hears from it, directly or
//! through others, and `DOWN` after [`FAILURE_MS`] of silence; a killed node's links end at once
//! (its kernel resets them), a hung or cut-off node's only fall silent.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use streamfarm_core::protocol::{Encoding, Position, ServerFrame};
use tokio::sync::oneshot;

use crate::broker::log::{Entry, Limits, PublishId};
use crate::broker::wire::PeerFrame;
use crate::broker::{Core, CoreConfig, Input, Network, Now, PublishError, TICK};
use crate::hub::{FrameWakes, Hub};

/// How long a node hears nothing from a peer before listing it `DOWN` (the membership's
/// failure timeout).
pub(crate) const FAILURE_MS: u64 = 3_000;
/// How often the simulated gossip carries who hears whom.
const GOSSIP_MS: u64 = 100;
/// How long a frame takes on a link without faults.
const LATENCY_MS: u64 = 1;

/// What travels on a link.
#[derive(Debug, Clone)]
enum Carried {
    Frame(PeerFrame),
    /// A replica's message sent out to a node that delivers the topic.
    Msg {
        topic: String,
        frame: Utf8Bytes,
    },
}

/// A frame on a link, with when it arrives.
#[derive(Debug)]
struct InFlight {
    from: usize,
    to: usize,
    at: u64,
    carried: Carried,
}

/// What is wrong with a link for a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkFault {
    /// Every frame lost (a partition: the link stays open, nothing comes through).
    Cut,
    /// Frames lost one by one, each with probability 1/`n`.
    Drop(u32),
    /// Frames delivered twice, each with probability 1/`n`.
    Duplicate(u32),
    /// Frames held this many milliseconds longer.
    Delay(u64),
}

/// The network every simulated node shares.
#[derive(Default)]
struct Wires {
    ms: u64,
    size: usize,
    in_flight: Vec<InFlight>,
    /// The newest arrival time per link: a link keeps its frames in order.
    last_at: BTreeMap<(usize, usize), u64>,
    /// Nodes whose process is gone: their links are refused.
    killed: BTreeSet<usize>,
    faults: BTreeMap<(usize, usize), LinkFault>,
    rng: Option<StdRng>,
    /// Counts of what the link faults did (frames dropped, duplicated, delayed).
    effects: BTreeMap<&'static str, u64>,
}

impl Wires {
    fn push(&mut self, from: usize, to: usize, carried: Carried) -> bool {
        if self.killed.contains(&to) || self.killed.contains(&from) {
            return false;
        }
        let mut at = self.ms + LATENCY_MS;
        let mut copies = 1;
        let rng = self.rng.as_mut().expect("the farm seeds the wires");
        match self.faults.get(&(from, to)) {
            Some(LinkFault::Cut) => {
                *self.effects.entry("cut").or_default() += 1;
                return true;
            }
            Some(LinkFault::Drop(n)) if rng.random_ratio(1, *n) => {
                *self.effects.entry("dropped").or_default() += 1;
                return true;
            }
            Some(LinkFault::Duplicate(n)) if rng.random_ratio(1, *n) => {
                *self.effects.entry("duplicated").or_default() += 1;
                copies = 2;
            }
            Some(LinkFault::Delay(ms)) => {
                *self.effects.entry("delayed").or_default() += 1;
                at += ms;
            }
            _ => {}
        }
        let last = self.last_at.entry((from, to)).or_default();
        at = at.max(*last);
        *last = at;
        for _ in 0..copies {
            self.in_flight.push(InFlight {
                from,
                to,
                at,
                carried: carried.clone(),
            });
        }
        true
    }
}

/// One node's end of the [`Wires`].
struct SimNetwork {
    me: usize,
    wires: Arc<Mutex<Wires>>,
}

fn index(name: &str) -> usize {
    name.trim_start_matches('n')
        .parse::<usize>()
        .map_or(usize::MAX, |n| n - 1)
}

/// The name of node `i`.
pub(crate) fn name(i: usize) -> String {
    format!("n{}", i + 1)
}

impl Network for SimNetwork {
    fn send(&self, to: &str, frame: &PeerFrame) -> bool {
        let to = index(to);
        let mut wires = self.wires.lock().expect("one thread");
        to < wires.size && wires.push(self.me, to, Carried::Frame(frame.clone()))
    }

    fn fanout(&self, topic: &str, frame: &Utf8Bytes) {
        let mut wires = self.wires.lock().expect("one thread");
        for to in (0..wires.size).filter(|to| *to != self.me) {
            let carried = Carried::Msg {
                topic: topic.to_string(),
                frame: frame.clone(),
            };
            wires.push(self.me, to, carried);
        }
    }
}

/// One simulated node.
pub(crate) struct SimNode {
    pub(crate) core: Option<Core>,
    pub(crate) hub: Arc<Hub>,
    /// Its process stopped (SIGSTOP): it handles nothing; what reaches it waits.
    pub(crate) hung: bool,
    /// How far its wall clock is off, in milliseconds.
    pub(crate) skew_ms: i64,
    /// The farm list as it sees it, as last told to its core.
    listed: Vec<String>,
    /// When it last heard from each peer (directly or through others).
    heard: Vec<Option<u64>>,
    run: u64,
}

/// A publish's reply channel.
pub(crate) type Reply = oneshot::Receiver<Result<Position, PublishError>>;

/// A farm of cores on one simulated clock.
pub(crate) struct SimFarm {
    pub(crate) nodes: Vec<SimNode>,
    wires: Arc<Mutex<Wires>>,
    pub(crate) rng: StdRng,
    start: Instant,
    pub(crate) ms: u64,
    topics: Vec<String>,
    seed: u64,
    publish_timeout: Duration,
    /// Every event, when tracing.
    pub(crate) trace: Option<Vec<String>>,
    #[cfg(test)]
    breaks: crate::broker::Breaks,
}

impl SimFarm {
    /// `size` nodes, every one delivering `topics`, each listing every node `UP`.
    pub(crate) fn new(size: usize, seed: u64, topics: &[String]) -> SimFarm {
        let wires = Arc::new(Mutex::new(Wires {
            size,
            rng: Some(StdRng::seed_from_u64(seed ^ 0x5eed)),
            ..Wires::default()
        }));
        let mut farm = SimFarm {
            nodes: Vec::new(),
            wires,
            rng: StdRng::seed_from_u64(seed),
            start: Instant::now(),
            ms: 0,
            topics: topics.to_vec(),
            seed,
            publish_timeout: Duration::from_secs(5),
            trace: None,
            #[cfg(test)]
            breaks: crate::broker::Breaks::default(),
        };
        for i in 0..size {
            let node = farm.fresh_node(i, 1);
            farm.nodes.push(node);
        }
        for i in 0..size {
            farm.nodes[i].heard = vec![Some(0); size];
            farm.start_core(i);
        }
        farm
    }

    /// A farm whose cores have faults put in on purpose.
    #[cfg(test)]
    pub(crate) fn new_broken(
        size: usize,
        seed: u64,
        topics: &[String],
        breaks: crate::broker::Breaks,
    ) -> SimFarm {
        let mut farm = SimFarm::new(size, seed, topics);
        farm.breaks = breaks;
        for node in &mut farm.nodes {
            if let Some(core) = &mut node.core {
                core.breaks = breaks;
            }
        }
        farm
    }

    fn limits() -> Limits {
        Limits {
            bytes: 8 << 20,
            age: Duration::from_secs(3600),
        }
    }

    fn fresh_node(&self, i: usize, run: u64) -> SimNode {
        let hub = Arc::new(Hub::new(Arc::default(), Self::limits()));
        // A reservation for a connection that is not open: the topic's stream exists, so the
        // node delivers it, and its history is what this node's subscribers are sent.
        hub.reserve(0, self.topics.iter().map(String::as_str));
        let core = Core::new(
            CoreConfig {
                me: name(i),
                run,
                seed: self.seed.wrapping_mul(31).wrapping_add(i as u64 * 7 + run),
                metrics: Arc::default(),
                hub: hub.clone(),
                net: Box::new(SimNetwork {
                    me: i,
                    wires: self.wires.clone(),
                }),
                limits: Self::limits(),
                publish_timeout: self.publish_timeout,
            },
            self.now_of(0),
        );
        #[cfg(test)]
        let core = {
            let mut core = core;
            core.breaks = self.breaks;
            core
        };
        SimNode {
            core: Some(core),
            hub,
            hung: false,
            skew_ms: 0,
            listed: Vec::new(),
            heard: vec![None; self.nodes.len().max(i + 1)],
            run,
        }
    }

    /// Tells node `i`'s new core what membership knows.
    fn start_core(&mut self, i: usize) {
        let size = self.nodes.len();
        let known: Vec<String> = (0..size).filter(|j| *j != i).map(name).collect();
        let killed: HashSet<String> = self.killed().into_iter().map(name).collect();
        let listed = self.listing(i);
        let now = self.now_of(i);
        let node = &mut self.nodes[i];
        node.listed = listed.clone();
        let core = node.core.as_mut().expect("started");
        core.handle(
            now,
            Input::Peers {
                settled: true,
                known,
            },
        );
        core.handle(now, Input::LinksEnded(killed));
        core.handle(now, Input::Farm(listed));
    }

    fn killed(&self) -> BTreeSet<usize> {
        self.wires.lock().expect("one thread").killed.clone()
    }

    /// The clocks of node `i`, its skew included.
    fn now_of(&self, i: usize) -> Now {
        let skew = self.nodes.get(i).map_or(0, |n| n.skew_ms);
        Now {
            at: self.start + Duration::from_millis(self.ms),
            unix_ms: (1_700_000_000_000 + self.ms as i64 + skew) as u64,
        }
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if let Some(trace) = &mut self.trace {
            trace.push(format!("{:>7} ms  {}", self.ms, line()));
        }
    }

    /// Whether node `i` handles inputs now.
    pub(crate) fn running(&self, i: usize) -> bool {
        self.nodes[i].core.is_some() && !self.nodes[i].hung
    }

    /// Hands `input` to node `i`, if it runs.
    pub(crate) fn input(&mut self, i: usize, input: Input) {
        if !self.running(i) {
            return;
        }
        let now = self.now_of(i);
        if let Some(core) = self.nodes[i].core.as_mut() {
            core.handle(now, input);
        }
    }

    /// Hands over one frame due now: the oldest on a link drawn at random; false when none is.
    fn step(&mut self) -> bool {
        let envelope = {
            let mut wires = self.wires.lock().expect("one thread");
            wires.ms = self.ms;
            let is_due = |f: &InFlight| f.at <= self.ms && !self.nodes[f.to].hung;
            let due = wires.in_flight.iter().filter(|f| is_due(f)).count();
            if due == 0 {
                return false;
            }
            let nth = self.rng.random_range(0..due);
            let Some(drawn) = wires
                .in_flight
                .iter()
                .enumerate()
                .filter(|(_, f)| is_due(f))
                .nth(nth)
                .map(|(k, _)| k)
            else {
                return false;
            };
            let link = (wires.in_flight[drawn].from, wires.in_flight[drawn].to);
            let oldest = wires
                .in_flight
                .iter()
                .position(|f| (f.from, f.to) == link)
                .unwrap_or(drawn);
            wires.in_flight.remove(oldest)
        };
        let InFlight {
            from, to, carried, ..
        } = envelope;
        if self.nodes[to].core.is_none() {
            return true;
        }
        match carried {
            Carried::Frame(frame) => {
                self.log(|| format!("n{} -> n{}  {frame:?}", from + 1, to + 1));
                self.input(
                    to,
                    Input::Peer {
                        from: name(from),
                        frame,
                    },
                );
            }
            Carried::Msg { topic, frame } => {
                self.log(|| format!("n{} -> n{}  msg {frame}", from + 1, to + 1));
                let Some(position) = ServerFrame::from_json(&frame)
                    .ok()
                    .and_then(|f| f.position())
                else {
                    return true;
                };
                let entry = Entry {
                    offset: position.offset,
                    id: PublishId::default(),
                    frame,
                    stored: self.now_of(to).at,
                };
                let mut wakes = FrameWakes::default();
                let hub = self.nodes[to].hub.clone();
                let delivered = hub.deliver(&topic, position.epoch, entry, &mut wakes);
                if let Some(after) = delivered.missing_after {
                    self.input(
                        to,
                        Input::Fetch {
                            topic,
                            after: Some(after),
                            done: None,
                        },
                    );
                }
            }
        }
        true
    }

    /// Hands over every frame due, then moves the clock on to the next thing that happens — a
    /// frame arriving, a [`TICK`] (every running node ticks), a gossip round ([`GOSSIP_MS`]) —
    /// or to `limit`, whichever comes first.
    pub(crate) fn advance_to(&mut self, limit: u64) {
        while self.step() {}
        let tick = TICK.as_millis() as u64;
        let next_tick = (self.ms / tick + 1) * tick;
        let next_gossip = (self.ms / GOSSIP_MS + 1) * GOSSIP_MS;
        let next_frame = {
            let wires = self.wires.lock().expect("one thread");
            wires
                .in_flight
                .iter()
                .filter(|f| f.at > self.ms && !self.nodes[f.to].hung)
                .map(|f| f.at)
                .min()
                .unwrap_or(u64::MAX)
        };
        self.ms = limit
            .min(next_tick)
            .min(next_gossip)
            .min(next_frame)
            .max(self.ms + 1);
        self.wires.lock().expect("one thread").ms = self.ms;
        if self.ms.is_multiple_of(tick) {
            for i in 0..self.nodes.len() {
                self.input(i, Input::Tick);
            }
        }
        if self.ms.is_multiple_of(GOSSIP_MS) {
            self.gossip();
        }
    }

    /// Runs `ms` milliseconds of simulated time.
    pub(crate) fn run_for(&mut self, ms: u64) {
        let end = self.ms + ms;
        while self.ms < end {
            self.advance_to(end);
        }
        while self.step() {}
    }

    /// Who hears whom: a running node hears every running node with a path of links not cut to
    /// it (gossip goes through any node); each lists `UP` those it heard within [`FAILURE_MS`].
    fn gossip(&mut self) {
        let size = self.nodes.len();
        let faults = self.wires.lock().expect("one thread").faults.clone();
        let alive: Vec<bool> = (0..size).map(|i| self.running(i)).collect();
        let open = |a: usize, b: usize| {
            alive[a] && alive[b] && faults.get(&(a, b)) != Some(&LinkFault::Cut)
        };
        for to in 0..size {
            if !alive[to] {
                continue;
            }
            // Every node with a path to `to`.
            let mut reached = vec![false; size];
            reached[to] = true;
            let mut changed = true;
            while changed {
                changed = false;
                for a in 0..size {
                    if reached[a] {
                        continue;
                    }
                    if (0..size).any(|b| reached[b] && open(a, b)) {
                        reached[a] = true;
                        changed = true;
                    }
                }
            }
            for (from, reached) in reached.iter().enumerate() {
                if *reached {
                    self.nodes[to].heard[from] = Some(self.ms);
                }
            }
            let listed = self.listing(to);
            if listed != self.nodes[to].listed {
                self.log(|| format!("n{} lists {listed:?}", to + 1));
                self.nodes[to].listed = listed.clone();
                self.input(to, Input::Farm(listed));
            }
        }
    }

    /// The nodes node `i` lists live: itself, and those it heard from lately.
    fn listing(&self, i: usize) -> Vec<String> {
        let node = &self.nodes[i];
        (0..self.nodes.len())
            .filter(|j| {
                *j == i
                    || node.heard.get(*j).copied().flatten().is_some_and(|at| {
                        self.ms.saturating_sub(at) <= FAILURE_MS && self.nodes[*j].core.is_some()
                    })
            })
            .map(name)
            .collect()
    }

    /// Publishes on node `i`; the reply says where it went, once acknowledged.
    pub(crate) fn publish(
        &mut self,
        i: usize,
        topic: &str,
        data: &str,
        key: Option<String>,
    ) -> Reply {
        let (done, reply) = oneshot::channel();
        self.log(|| format!("n{} publishes {data} on {topic} (key {key:?})", i + 1));
        self.input(
            i,
            Input::Publish {
                topic: topic.to_string(),
                data: data.to_string(),
                encoding: Encoding::Utf8,
                key,
                done: Some(done),
            },
        );
        reply
    }

    /// Node `i`'s process ends: its links are refused at once, its state is gone.
    pub(crate) fn kill(&mut self, i: usize) {
        self.log(|| format!("n{} killed", i + 1));
        self.nodes[i].core = None;
        self.nodes[i].hung = false;
        let mut wires = self.wires.lock().expect("one thread");
        wires.killed.insert(i);
        wires.in_flight.retain(|f| f.to != i && f.from != i);
        let killed: HashSet<String> = wires.killed.iter().copied().map(name).collect();
        drop(wires);
        for j in 0..self.nodes.len() {
            self.input(j, Input::LinksEnded(killed.clone()));
        }
    }

    /// Node `i` starts again, with nothing of its previous run.
    pub(crate) fn restart(&mut self, i: usize) {
        self.log(|| format!("n{} restarts", i + 1));
        let run = self.nodes[i].run + 1;
        let skew = self.nodes[i].skew_ms;
        let mut wires = self.wires.lock().expect("one thread");
        wires.killed.remove(&i);
        let killed: HashSet<String> = wires.killed.iter().copied().map(name).collect();
        drop(wires);
        let mut node = self.fresh_node(i, run);
        node.skew_ms = skew;
        node.heard = vec![None; self.nodes.len()];
        node.heard[i] = Some(self.ms);
        self.nodes[i] = node;
        self.start_core(i);
        // The others link to it again: their links reopen, and they catch up.
        for j in 0..self.nodes.len() {
            self.input(j, Input::LinksEnded(killed.clone()));
        }
    }

    /// Node `i` stops handling anything (SIGSTOP), or goes on (SIGCONT).
    pub(crate) fn hang(&mut self, i: usize, hung: bool) {
        self.log(|| format!("n{} {}", i + 1, if hung { "hangs" } else { "resumes" }));
        if self.nodes[i].core.is_some() {
            self.nodes[i].hung = hung;
        }
    }

    /// Sets (or clears) a fault on the link from `from` to `to`. A link that heals reopens: both
    /// ends catch up, as the relay does when a link is made again.
    pub(crate) fn link_fault(&mut self, from: usize, to: usize, fault: Option<LinkFault>) {
        self.log(|| format!("link n{} -> n{}: {fault:?}", from + 1, to + 1));
        let was = {
            let mut wires = self.wires.lock().expect("one thread");
            match fault {
                Some(fault) => wires.faults.insert((from, to), fault),
                None => wires.faults.remove(&(from, to)),
            }
        };
        if was == Some(LinkFault::Cut) && fault.is_none() {
            self.input(from, Input::CatchUp);
            self.input(to, Input::CatchUp);
        }
    }

    /// Sets node `i`'s wall clock off by `skew_ms`.
    pub(crate) fn skew(&mut self, i: usize, skew_ms: i64) {
        self.log(|| format!("n{} clock off by {skew_ms} ms", i + 1));
        self.nodes[i].skew_ms = skew_ms;
    }

    /// What the link faults did so far.
    pub(crate) fn link_effects(&self) -> BTreeMap<&'static str, u64> {
        self.wires.lock().expect("one thread").effects.clone()
    }

    /// The messages node `i` delivered of `topic`: its stream's epoch and (offset, data) in order.
    pub(crate) fn delivered(&self, i: usize, topic: &str) -> Option<(u64, Vec<(u64, String)>)> {
        let state = self.nodes[i].hub.state(topic, None)?;
        Some((
            state.epoch.0,
            state
                .entries
                .iter()
                .map(|e| (e.offset, e.data.clone()))
                .collect(),
        ))
    }
}
