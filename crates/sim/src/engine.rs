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
        if scenario.kind == ScenarioKind::ScaleOut {
            // The new server exists, down and empty, until it is added at 0 s.
            users[n - 1] = 0;
            up[n - 1] = false;
        }
        let list = FarmList::new(
            (0..n)
                .map(|i| {
                    let status = if up[i] { Status::Up } else { Status::Down };
                    let mut entry =
                        ServerEntry::new(format!("s{i}"), url(i), status, users[i], "A");
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
        let first = self.exponential(s.rate);
        self.schedule(first, Event::Arrival);
        match s.kind {
            ScenarioKind::ScaleOut => self.schedule(0.0, Event::Up(s.servers - 1)),
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

    fn sample(&mut self) {
        if self.samples.last().is_some_and(|s| s.time == self.now) {
            self.samples.pop();
        }
        self.samples.push(Sample {
            time: self.now,
            users: self.users.clone(),
            up: self.up.clone(),
        });
    }
}

fn url(i: usize) -> String {
    format!("ws://s{i}/stream")
}
