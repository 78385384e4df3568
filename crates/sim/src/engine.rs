//! The discrete-event run of one scenario under one policy.
//!
//! Two views of the farm are kept. The *truth* — users and status of every server — changes as
//! events happen. The *list* is what a list server hands out: a [`FarmList`] that replays every
//! change of the truth `staleness` seconds late (a FIFO of changes), with each server's `join_rate`
//! counted over the `rate_window` seconds before the list's own time. Every client selects from the
//! list with [`streamfarm_core::selection::choose_with`]: the policies are core's, never copies.
//!
//! Departures (churn) are memoryless: with `n` clients connected and mean lifetime `T`, the next
//! departure comes after an exponential time of rate `n / T` and takes a client picked uniformly
//! among all connected ones, which is the same process as giving every client its own lifetime.
//!
//! Randomness comes from two seeded RNGs, one for the farm's events (arrival times, departures,
//! reconnect jitter) and one for the clients' picks, so a seed fixes a run.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use streamfarm_core::balance::{self, Tolerance};
use streamfarm_core::selection::{self, Context};
use streamfarm_core::{FarmList, Policy, ServerEntry, Status};

use crate::scenario::{Scenario, ScenarioKind};

/// Users per server at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Simulated seconds since the start.
    pub time: f64,
    /// Connected users of each server (0 for a server that is down).
    pub users: Vec<u64>,
    /// Whether each server is up (taking clients).
    pub up: Vec<bool>,
    /// Clients moved by rebalancing so far.
    pub moves: u64,
}

/// Counts of what happened in a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Users on the farm at the start.
    pub initial: u64,
    /// New clients that arrived.
    pub arrivals: u64,
    /// Clients that left for good.
    pub departures: u64,
    /// Clients disconnected by a node going down (each then reconnects).
    pub disconnected: u64,
    /// Connections made (arrivals and reconnects that reached an up server).
    pub connections: u64,
    /// Picks of a server that the list showed up but that was down: the client then excludes it
    /// and picks again.
    pub failed_attempts: u64,
    /// Clients moved by rebalancing (arrived on their new server).
    pub moves: u64,
    /// Moves that did not happen: the target was down when the client got there (it stays).
    pub failed_moves: u64,
    /// The fewest moves that would even the farm out, right after the perturbation (the plan's
    /// `minimal_moves` on the true state); 0 when not computed.
    pub minimal_moves: u64,
    /// Moves toward a server that had itself sent a client within the cooldown, and moves from a
    /// server that had received one within it: the ping-pong that must not happen.
    pub reversals: u64,
}

/// The record of one run: samples over time and counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Users per server, sampled at a fixed interval, the last one at the end of the run.
    pub samples: Vec<Sample>,
    /// What happened.
    pub counts: Counts,
}

/// Runs `scenario` with every client selecting by `policy`, from `seed`.
pub fn run(scenario: &Scenario, policy: Policy, seed: u64) -> Trace {
    Engine::new(scenario, policy, seed).run()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    /// A new client arrives (and the next arrival is scheduled).
    Arrival,
    /// A client selects again: after losing server `lost`, or (None) after finding no server.
    Reconnect { lost: Option<usize> },
    /// A server goes down; its clients are disconnected.
    Down(usize),
    /// A server comes up, empty.
    Up(usize),
    /// Record users per server.
    Sample,
    /// Server `i` looks at the rebalancing plan.
    Rebalance(usize),
    /// A client that server `from` (in its `epoch`-th life) told to move arrives on `to`.
    Moved { from: usize, epoch: u64, to: usize },
}

/// A heap entry: earliest time first, then first scheduled first (deterministic ties).
#[derive(Debug, Clone, Copy)]
struct Timed {
    time: f64,
    seq: u64,
    event: Event,
}

impl PartialEq for Timed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Timed {}

impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Timed {
    /// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .time
            .total_cmp(&self.time)
            .then(other.seq.cmp(&self.seq))
    }
}

/// One server's entry changed at `time`: the list applies it `staleness` later.
#[derive(Debug, Clone, Copy)]
struct Change {
    time: f64,
    server: usize,
    users: u64,
    status: Status,
    joined: bool,
}

struct Engine<'a> {
    scenario: &'a Scenario,
    policy: Policy,
    now: f64,
    seq: u64,
    events: BinaryHeap<Timed>,
    /// The truth.
    users: Vec<u64>,
    up: Vec<bool>,
    connected: u64,
    /// The list clients see, and the changes it has not caught up with yet.
    list: FarmList,
    pending: VecDeque<Change>,
    /// Per server, the times (in truth) of the joins the list has seen within its rate window.
    joins: Vec<VecDeque<f64>>,
    farm_rng: StdRng,
    pick_rng: StdRng,
    /// Rebalancing state per server: clients told to move and not yet gone, the times of recent
    /// arrivals (younger than the cooldown), when it last sent and received a moved client, its
    /// move budget and when that was last topped up, and how many times it went down.
    moving: Vec<u64>,
    young: Vec<VecDeque<f64>>,
    last_sent: Vec<f64>,
    last_received: Vec<f64>,
    budget: Vec<f64>,
    budget_at: Vec<f64>,
    epoch: Vec<u64>,
    sending: Vec<bool>,
    placed: Vec<balance::PlacedWindow>,
    arrivals_left: Option<u64>,
    sample_every: f64,
    samples: Vec<Sample>,
    counts: Counts,
    exclude: Vec<String>,
}

impl<'a> Engine<'a> {
    fn new(scenario: &'a Scenario, policy: Policy, seed: u64) -> Self {
        let n = scenario.servers;
        let mut users = vec![scenario.load; n];
        let mut up = vec![true; n];
        if matches!(
            scenario.kind,
            ScenarioKind::ScaleOut | ScenarioKind::ScaleOutIdle
        ) {
            // The new server exists, down and empty, until it is added at 0 s.
            users[n - 1] = 0;
            up[n - 1] = false;
        }
        if scenario.kind == ScenarioKind::Failback {
            // Group A (the first half) is down and empty until it comes back.
            for i in 0..n / 2 {
                users[i] = 0;
                up[i] = false;
            }
        }
        let list = FarmList::new(
            (0..n)
                .map(|i| {
                    let status = if up[i] { Status::Up } else { Status::Down };
                    let mut entry = ServerEntry::new(
                        format!("s{i}"),
                        url(i),
                        status,
                        users[i],
                        group(scenario, i),
                    );
                    entry.join_rate = Some(0.0);
                    entry
                })
                .collect(),
        );
        let connected = users.iter().sum();
        // At most ~1000 samples, and at least four a second so that herds show.
        let sample_every = (scenario.duration / 1000.0).max(0.25);
        Engine {
            scenario,
            policy,
            now: 0.0,
            seq: 0,
            events: BinaryHeap::new(),
            users,
            up,
            connected,
            list,
            pending: VecDeque::new(),
            joins: vec![VecDeque::new(); n],
            farm_rng: StdRng::seed_from_u64(seed),
            pick_rng: StdRng::seed_from_u64(seed ^ 0x5eed_0fc1_1ea7_5eed),
            moving: vec![0; n],
            young: vec![VecDeque::new(); n],
            last_sent: vec![f64::NEG_INFINITY; n],
            last_received: vec![f64::NEG_INFINITY; n],
            budget: vec![0.0; n],
            budget_at: vec![0.0; n],
            epoch: vec![0; n],
            sending: vec![false; n],
            placed: vec![balance::PlacedWindow::new(3.0); n],
            arrivals_left: scenario.arrivals,
            sample_every,
            samples: Vec::new(),
            counts: Counts {
                initial: connected,
                ..Counts::default()
            },
            exclude: Vec::new(),
        }
    }

    fn schedule(&mut self, time: f64, event: Event) {
        self.seq += 1;
        self.events.push(Timed {
            time,
            seq: self.seq,
            event,
        });
    }

    fn exponential(&mut self, rate: f64) -> f64 {
        let u: f64 = self.farm_rng.random();
        -(1.0 - u).ln() / rate
    }

    fn run(mut self) -> Trace {
        let s = self.scenario;
        self.schedule(0.0, Event::Sample);
        if s.arrivals != Some(0) {
            let first = self.exponential(s.rate);
            self.schedule(first, Event::Arrival);
        }
        if let Some(r) = s.rebalance {
            for i in 0..s.servers {
                let first = self.farm_rng.random::<f64>() * r.tick;
                self.schedule(first, Event::Rebalance(i));
            }
        }
        match s.kind {
            ScenarioKind::ScaleOut | ScenarioKind::ScaleOutIdle => {
                self.schedule(0.0, Event::Up(s.servers - 1));
            }
            ScenarioKind::Failback => {
                for i in 0..s.servers / 2 {
                    self.schedule(s.perturbation_at, Event::Up(i));
                }
            }
            ScenarioKind::Failure => self.schedule(s.perturbation_at, Event::Down(0)),
            ScenarioKind::Rolling => {
                for i in 0..s.servers {
                    let at = s.perturbation_at + i as f64 * s.restart_interval;
                    self.schedule(at, Event::Down(i));
                    self.schedule(at + s.downtime, Event::Up(i));
                }
            }
            ScenarioKind::Steady | ScenarioKind::Churn => {}
        }
        while let Some(next) = self.events.peek().copied() {
            if let Some(lifetime) = s.lifetime
                && self.connected > 0
                && self.now < s.duration
            {
                // Memoryless departures: redrawn after every event, which is exact.
                let departure = self.now + self.exponential(self.connected as f64 / lifetime);
                if departure < next.time && departure < s.duration {
                    self.now = departure;
                    self.depart();
                    continue;
                }
            }
            self.events.pop();
            self.now = next.time;
            self.handle(next.event);
        }
        self.sample();
        Trace {
            samples: self.samples,
            counts: self.counts,
        }
    }

    fn handle(&mut self, event: Event) {
        let s = self.scenario;
        match event {
            Event::Arrival => {
                let more = match &mut self.arrivals_left {
                    Some(left) => {
                        *left -= 1;
                        *left > 0
                    }
                    None => self.now < s.duration,
                };
                if more {
                    let next = self.now + self.exponential(s.rate);
                    if s.arrivals.is_some() || next < s.duration {
                        self.schedule(next, Event::Arrival);
                    }
                }
                self.counts.arrivals += 1;
                self.connect(None);
            }
            Event::Reconnect { lost } => self.connect(lost),
            Event::Down(i) => {
                let orphans = self.users[i];
                self.epoch[i] += 1;
                self.moving[i] = 0;
                self.young[i].clear();
                self.up[i] = false;
                self.users[i] = 0;
                self.connected -= orphans;
                self.counts.disconnected += orphans;
                self.record(i, false);
                for _ in 0..orphans {
                    let jitter: f64 = self.farm_rng.random::<f64>() * s.reconnect_window;
                    self.schedule(self.now + jitter, Event::Reconnect { lost: Some(i) });
                }
            }
            Event::Up(i) => {
                self.up[i] = true;
                self.record(i, false);
                if self.counts.minimal_moves == 0
                    && matches!(s.kind, ScenarioKind::ScaleOutIdle | ScenarioKind::Failback)
                {
                    let truth = self.truth();
                    let plan = balance::plan(&truth, Tolerance::default());
                    self.counts.minimal_moves = balance::minimal_moves(&plan);
                }
            }
            Event::Rebalance(i) => {
                self.rebalance(i);
                if let Some(r) = s.rebalance
                    && self.now < s.duration
                {
                    let jitter = 0.8 + 0.4 * self.farm_rng.random::<f64>();
                    self.schedule(self.now + r.tick * jitter, Event::Rebalance(i));
                }
            }
            Event::Moved { from, epoch, to } => {
                if self.epoch[from] != epoch {
                    // Its old server went down meanwhile: it reconnected like the others.
                    return;
                }
                self.moving[from] = self.moving[from].saturating_sub(1);
                if !self.up[to] {
                    self.counts.failed_moves += 1;
                    return;
                }
                let cooldown = s.rebalance.map_or(0.0, |r| r.cooldown);
                if self.now - self.last_sent[to] < cooldown
                    || self.now - self.last_received[from] < cooldown
                {
                    self.counts.reversals += 1;
                }
                self.users[from] -= 1;
                self.users[to] += 1;
                self.young[to].push_back(self.now);
                self.last_received[to] = self.now;
                self.counts.moves += 1;
                self.record(from, false);
                self.record(to, false);
            }
            Event::Sample => {
                self.sample();
                let next = self.now + self.sample_every;
                // Keep sampling to the end, and past it while clients are still arriving.
                if next <= s.duration || !self.events.is_empty() {
                    self.schedule(next, Event::Sample);
                }
            }
        }
    }

    /// A client (new, or one that lost server `lost`) selects a server and connects to it.
    fn connect(&mut self, lost: Option<usize>) {
        self.refresh_list();
        let age = Duration::from_secs_f64(self.scenario.staleness);
        let context = match lost {
            Some(i) if self.scenario.reconnect_hint => Context::reconnecting(
                &self.list,
                &url(i),
                age,
                Duration::from_secs_f64(self.scenario.reconnect_window),
            ),
            _ => Context::with_age(age),
        };
        self.exclude.clear();
        if let Some(i) = lost {
            self.exclude.push(url(i));
        }
        loop {
            let choice = selection::choose_with(
                self.policy,
                &self.list,
                &self.exclude,
                &context,
                &mut self.pick_rng,
            );
            match choice {
                Ok(choice) if self.up[choice.index] => {
                    let i = choice.index;
                    if self.scenario.rebalance.is_some() {
                        self.young[i].push_back(self.now);
                    }
                    self.users[i] += 1;
                    self.connected += 1;
                    self.counts.connections += 1;
                    self.record(i, true);
                    return;
                }
                Ok(choice) => {
                    // The list still shows it up; the client finds out by failing to connect.
                    self.counts.failed_attempts += 1;
                    self.exclude.push(url(choice.index));
                }
                Err(_) => {
                    // Nothing left to try on this list: back off and ask again.
                    let retry = self.now + 1.0;
                    self.schedule(retry, Event::Reconnect { lost: None });
                    return;
                }
            }
        }
    }

    fn depart(&mut self) {
        let mut k = self.farm_rng.random_range(0..self.connected);
        let i = self
            .users
            .iter()
            .position(|&u| {
                if k < u {
                    true
                } else {
                    k -= u;
                    false
                }
            })
            .expect("a connected client is on some server");
        self.users[i] -= 1;
        self.connected -= 1;
        self.counts.departures += 1;
        self.record(i, false);
    }

    /// Queues the change of server `i` for the list.
    fn record(&mut self, i: usize, joined: bool) {
        self.pending.push_back(Change {
            time: self.now,
            server: i,
            users: self.users[i],
            status: if self.up[i] { Status::Up } else { Status::Down },
            joined,
        });
    }

    /// Brings the list to the farm as it was `staleness` seconds ago.
    fn refresh_list(&mut self) {
        let horizon = self.now - self.scenario.staleness;
        while let Some(change) = self.pending.front().copied() {
            if change.time > horizon {
                break;
            }
            self.pending.pop_front();
            let entry = &mut self.list.servers[change.server];
            entry.users = change.users;
            entry.status = change.status;
            if change.joined {
                self.joins[change.server].push_back(change.time);
            }
        }
        let window = self.scenario.rate_window;
        for (entry, joins) in self.list.servers.iter_mut().zip(&mut self.joins) {
            while joins.front().is_some_and(|&t| t <= horizon - window) {
                joins.pop_front();
            }
            entry.join_rate = Some(joins.len() as f64 / window);
        }
    }

    /// The farm as it is now, as a list.
    fn truth(&self) -> FarmList {
        let mut list = self.list.clone();
        for (i, entry) in list.servers.iter_mut().enumerate() {
            entry.users = self.users[i];
            entry.status = if self.up[i] { Status::Up } else { Status::Down };
        }
        list
    }

    /// Server `i` carries out its row of the plan, as a node's rebalancer does.
    fn rebalance(&mut self, i: usize) {
        let Some(r) = self.scenario.rebalance else {
            return;
        };
        let elapsed = self.now - self.budget_at[i];
        self.budget_at[i] = self.now;
        self.budget[i] = (self.budget[i] + r.rate * elapsed).min(r.rate.max(1.0));
        if !self.up[i] {
            return;
        }
        while self.young[i]
            .front()
            .is_some_and(|&t| t <= self.now - r.cooldown)
        {
            self.young[i].pop_front();
        }
        self.refresh_list();
        let tolerance = Tolerance {
            fraction: r.tolerance,
            ..Tolerance::default()
        };
        let holding = self.users[i] - self.moving[i];
        let floor = self.placed[i].record(self.now, &self.list);
        let own = balance::own_moves(
            &self.list,
            &url(i),
            holding,
            tolerance,
            self.sending[i],
            floor,
        );
        self.sending[i] = own.sends;
        let receiving = own.target > 0 && self.now - self.last_received[i] < r.cooldown;
        if !own.sends || receiving {
            return;
        }
        let old_enough = holding.saturating_sub(self.young[i].len() as u64);
        let n = (self.budget[i].floor() as u64)
            .min(own.count)
            .min(old_enough);
        if n == 0 {
            return;
        }
        self.budget[i] -= n as f64;
        let lacking: Vec<u64> = own.receivers.iter().map(|(_, d)| *d).collect();
        let split = balance::apportion(n, &lacking);
        let epoch = self.epoch[i];
        for ((to, _), k) in own.receivers.iter().zip(split) {
            let Some(to) = self.list.servers.iter().position(|s| s.url == *to) else {
                continue;
            };
            for _ in 0..k {
                self.moving[i] += 1;
                self.last_sent[i] = self.now;
                self.schedule(self.now + r.migration, Event::Moved { from: i, epoch, to });
            }
        }
    }

    fn sample(&mut self) {
        if self.samples.last().is_some_and(|s| s.time == self.now) {
            self.samples.pop();
        }
        self.samples.push(Sample {
            time: self.now,
            users: self.users.clone(),
            up: self.up.clone(),
            moves: self.counts.moves,
        });
    }
}

/// Server `i`'s priority group: `A`, or in `failback` `B` for the second half.
fn group(scenario: &Scenario, i: usize) -> &'static str {
    if scenario.kind == ScenarioKind::Failback && i >= scenario.servers / 2 {
        "B"
    } else {
        "A"
    }
}

fn url(i: usize) -> String {
    format!("ws://s{i}/stream")
}
