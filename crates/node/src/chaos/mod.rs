//! The deterministic simulation of a farm: `streamfarm chaos`.
//!
//! A seed draws a farm of broker cores ([`farm`]), a schedule of publishes (some under an
//! `Idempotency-Key`, sent again through another node when unanswered) and a schedule of faults;
//! the simulation runs them in one thread on a simulated clock, checking the broker's guarantees
//! ([`invariants`]) after every step and at the end. The same seed runs the same schedule, frame
//! for frame: a violation is replayed with `--seed S --trace`, and shrunk first to the fewest
//! faults that still show it.
//!
//! Faults, each a kind of [`Fault`]: a node killed (and restarted), hung (and resumed), cut off
//! from every other node; a link cut one way, or both ways between two nodes only; frames on a
//! link dropped, duplicated, delayed, or overtaken by other links' frames; a node's wall clock
//! off. Node faults come one at a time, each healed before the next (the farm's promise is to
//! survive the loss of any one node); link faults overlap them freely.
//!
//! Not simulated yet: the client's failover machine (a node's delivery stream stands for the
//! subscribers it serves), slow consumers.

mod farm;
mod invariants;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use farm::{LinkFault, SimFarm};
use invariants::History;

/// The kinds of fault a run draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    /// A node's process killed, started again later with nothing.
    Kill,
    /// A node's process stopped, then continued.
    Hang,
    /// A node cut off from every other (both ways).
    Partition,
    /// One link cut one way.
    OneWay,
    /// Two nodes cut from each other, both reaching the rest.
    Partial,
    /// Frames on a link lost now and then.
    Drop,
    /// Frames on a link delivered twice now and then.
    Duplicate,
    /// A link's frames held up to half a second.
    Delay,
    /// A link's frames held a few milliseconds, overtaken by other links'.
    Reorder,
    /// A node's wall clock off by up to two minutes, either way.
    ClockSkew,
}

impl Fault {
    /// Every kind.
    pub const ALL: [Fault; 10] = [
        Fault::Kill,
        Fault::Hang,
        Fault::Partition,
        Fault::OneWay,
        Fault::Partial,
        Fault::Drop,
        Fault::Duplicate,
        Fault::Delay,
        Fault::Reorder,
        Fault::ClockSkew,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Hang => "hang",
            Fault::Partition => "partition",
            Fault::OneWay => "one-way",
            Fault::Partial => "partial",
            Fault::Drop => "drop",
            Fault::Duplicate => "duplicate",
            Fault::Delay => "delay",
            Fault::Reorder => "reorder",
            Fault::ClockSkew => "clock-skew",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether it takes a node out (one at a time) rather than disturbing a link.
    fn on_node(self) -> bool {
        matches!(
            self,
            Fault::Kill | Fault::Hang | Fault::Partition | Fault::OneWay | Fault::Partial
        )
    }
}

/// What one run is made of.
#[derive(Debug, Clone)]
pub struct Options {
    /// Nodes in the farm.
    pub nodes: usize,
    /// Publishing clients, each connected to one node (client `c` to node `c mod nodes`).
    pub clients: usize,
    /// Topics published on.
    pub topics: usize,
    /// Publishes in the run.
    pub publishes: usize,
    /// Faults in the run.
    pub faults: usize,
    /// The kinds faults are drawn from.
    pub kinds: Vec<Fault>,
    /// Faults put into every core on purpose, to show the simulation finds them.
    #[cfg(test)]
    pub(crate) breaks: crate::broker::Breaks,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 5,
            clients: 50,
            topics: 8,
            publishes: 2_000,
            faults: 20,
            kinds: Fault::ALL.to_vec(),
            #[cfg(test)]
            breaks: crate::broker::Breaks::default(),
        }
    }
}

/// One fault of a run's schedule.
#[derive(Debug, Clone)]
struct Planned {
    kind: Fault,
    at: u64,
    lasts: u64,
    a: usize,
    b: usize,
    /// The probability's denominator, the delay or the skew, by kind.
    amount: i64,
}

/// One publish of a run's schedule.
#[derive(Debug, Clone)]
struct PlannedPublish {
    at: u64,
    node: usize,
    topic: usize,
    keyed: bool,
}

/// A seed's whole schedule.
#[derive(Debug, Clone)]
struct Plan {
    faults: Vec<Planned>,
    publishes: Vec<PlannedPublish>,
    /// When publishing ends and every fault has healed.
    end: u64,
}

/// How long the farm is given after every fault healed, before the final checks.
const SETTLE_MS: u64 = 8_000;
/// A publisher with no answer after this long sends its publish again through another node,
/// under the same key.
const RETRY_AFTER_MS: u64 = 6_000;

impl Plan {
    fn draw(seed: u64, options: &Options) -> Plan {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(0x9e37_79b9));
        let nodes = options.nodes.max(2);
        // Node faults one after the other, each healed and recovered from before the next.
        let mut faults = Vec::new();
        let mut at = 500;
        for _ in 0..options.faults {
            if options.kinds.is_empty() {
                break;
            }
            let kind = options.kinds[rng.random_range(0..options.kinds.len())];
            let a = rng.random_range(0..nodes);
            let mut b = rng.random_range(0..nodes - 1);
            if b >= a {
                b += 1;
            }
            let (lasts, amount) = match kind {
                Fault::Kill | Fault::Hang | Fault::Partition | Fault::OneWay | Fault::Partial => {
                    (rng.random_range(200..5_000), 0)
                }
                Fault::Drop | Fault::Duplicate => {
                    (rng.random_range(200..3_000), rng.random_range(2..20))
                }
                Fault::Delay => (rng.random_range(200..3_000), rng.random_range(10..500)),
                Fault::Reorder => (rng.random_range(200..3_000), rng.random_range(1..20)),
                Fault::ClockSkew => (0, rng.random_range(-120_000..120_000)),
            };
            let start = if kind.on_node() {
                let start = at;
                at += lasts + rng.random_range(1_000..4_000);
                start
            } else {
                rng.random_range(0..at.max(1_000))
            };
            faults.push(Planned {
                kind,
                at: start,
                lasts,
                a,
                b,
                amount,
            });
        }
        let end = at.max(10_000);
        let publishes = (0..options.publishes)
            .map(|_| PlannedPublish {
                at: rng.random_range(0..end),
                node: rng.random_range(0..options.clients.max(1)) % nodes,
                topic: rng.random_range(0..options.topics.max(1)),
                keyed: rng.random_ratio(1, 3),
            })
            .collect();
        faults.sort_by_key(|f| f.at);
        Plan {
            faults,
            publishes,
            end,
        }
    }
}

/// A broken guarantee.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Which guarantee.
    pub invariant: &'static str,
    /// What was seen.
    pub detail: String,
    /// At what simulated millisecond.
    pub at_ms: u64,
}

/// What one seed's run did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The seed run.
    pub seed: u64,
    /// The first guarantee broken, if any.
    pub violation: Option<Violation>,
    /// Faults by kind, and what link faults did to frames.
    pub faults: BTreeMap<&'static str, u64>,
    /// Publishes made (publishers' retries aside).
    pub publishes: usize,
    /// Publishes acknowledged.
    pub acknowledged: usize,
    /// Publishes sent again under their key.
    pub retries: usize,
    /// Simulated time the run took.
    pub simulated_ms: u64,
    /// Every event of the run (with `trace`): for a violation, of the run shrunk to the fewest
    /// faults that still show it.
    pub trace: Vec<String>,
}

/// Runs seed `seed`; with `trace`, keeps every event. A violation is shrunk first: faults are
/// left out one by one while the same guarantee still breaks, and the trace is that run's.
pub fn run(seed: u64, options: &Options, trace: bool) -> Outcome {
    let plan = Plan::draw(seed, options);
    let outcome = run_plan(seed, options, &plan, trace);
    let Some(violation) = &outcome.violation else {
        return outcome;
    };
    let mut shrunk = plan.clone();
    let mut k = 0;
    while k < shrunk.faults.len() {
        let mut fewer = shrunk.clone();
        fewer.faults.remove(k);
        let again = run_plan(seed, options, &fewer, false);
        if again
            .violation
            .as_ref()
            .is_some_and(|v| v.invariant == violation.invariant)
        {
            shrunk = fewer;
        } else {
            k += 1;
        }
    }
    let mut traced = run_plan(seed, options, &shrunk, true);
    if traced.violation.is_none() {
        // The shrunk run must show it; if it does not, the whole run's trace does.
        traced = run_plan(seed, options, &plan, true);
    }
    Outcome {
        faults: outcome.faults,
        trace: traced.trace,
        violation: traced.violation.or(outcome.violation),
        ..outcome
    }
}

fn run_plan(seed: u64, options: &Options, plan: &Plan, trace: bool) -> Outcome {
    let topics: Vec<String> = (0..options.topics.max(1))
        .map(|t| format!("t{t}"))
        .collect();
    #[cfg(test)]
    let mut farm = SimFarm::new_broken(options.nodes.max(2), seed, &topics, options.breaks);
    #[cfg(not(test))]
    let mut farm = SimFarm::new(options.nodes.max(2), seed, &topics);
    if trace {
        farm.trace = Some(Vec::new());
    }
    let mut history = History::default();
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    // Events by time: fault starts and ends, publishes.
    let mut starts = plan.faults.iter().peekable();
    let mut ends: Vec<(u64, &Planned)> = Vec::new();
    let mut publishes = plan.publishes.clone();
    publishes.sort_by_key(|p| p.at);
    let mut publishes = publishes.into_iter().enumerate().peekable();
    let mut violation = None;
    let mut healed = false;
    while violation.is_none() {
        let now = farm.ms;
        while let Some(fault) = starts.next_if(|f| f.at <= now) {
            *faults.entry(fault.kind.name()).or_default() += 1;
            begin(&mut farm, fault);
            ends.push((now + fault.lasts, fault));
        }
        ends.sort_by_key(|(at, _)| *at);
        while ends.first().is_some_and(|(at, _)| *at <= now) {
            let (_, fault) = ends.remove(0);
            heal(&mut farm, fault);
        }
        while let Some((i, publish)) = publishes.next_if(|(_, p)| p.at <= now) {
            history.publish(&mut farm, i, &publish, &topics);
        }
        history.retry(&mut farm, RETRY_AFTER_MS);
        // Up to the next scheduled event, or sooner when the farm has something to do.
        let next = [
            starts.peek().map(|f| f.at),
            ends.first().map(|(at, _)| *at),
            publishes.peek().map(|(_, p)| p.at),
            history.next_retry(RETRY_AFTER_MS),
            Some(plan.end),
        ]
        .into_iter()
        .flatten()
        .filter(|at| *at > farm.ms)
        .min()
        .unwrap_or(farm.ms + 1);
        farm.advance_to(next);
        violation = history
            .collect_replies()
            .err()
            .or_else(|| invariants::one_sequencer_per_term(&farm).err());
        if !healed && farm.ms >= plan.end && ends.is_empty() && starts.peek().is_none() {
            healed = true;
            heal_all(&mut farm);
        }
        if healed && farm.ms >= plan.end + SETTLE_MS && publishes.peek().is_none() {
            break;
        }
    }
    if violation.is_none() {
        violation = invariants::at_the_end(&mut farm, &mut history, &topics).err();
    }
    let violation = violation.map(|(invariant, detail)| Violation {
        invariant,
        detail,
        at_ms: farm.ms,
    });
    for (effect, count) in farm.link_effects() {
        faults.insert(effect, count);
    }
    Outcome {
        seed,
        violation,
        faults,
        publishes: plan.publishes.len(),
        acknowledged: history.acknowledged(),
        retries: history.retries,
        simulated_ms: farm.ms,
        trace: farm.trace.take().unwrap_or_default(),
    }
}

fn begin(farm: &mut SimFarm, fault: &Planned) {
    let (a, b) = (fault.a, fault.b);
    match fault.kind {
        Fault::Kill => farm.kill(a),
        Fault::Hang => farm.hang(a, true),
        Fault::Partition => {
            for other in (0..farm.nodes.len()).filter(|o| *o != a) {
                farm.link_fault(a, other, Some(LinkFault::Cut));
                farm.link_fault(other, a, Some(LinkFault::Cut));
            }
        }
        Fault::OneWay => farm.link_fault(a, b, Some(LinkFault::Cut)),
        Fault::Partial => {
            farm.link_fault(a, b, Some(LinkFault::Cut));
            farm.link_fault(b, a, Some(LinkFault::Cut));
        }
        Fault::Drop => farm.link_fault(a, b, Some(LinkFault::Drop(fault.amount as u32))),
        Fault::Duplicate => farm.link_fault(a, b, Some(LinkFault::Duplicate(fault.amount as u32))),
        Fault::Delay | Fault::Reorder => {
            farm.link_fault(a, b, Some(LinkFault::Delay(fault.amount as u64)));
        }
        Fault::ClockSkew => farm.skew(a, fault.amount),
    }
}

fn heal(farm: &mut SimFarm, fault: &Planned) {
    let (a, b) = (fault.a, fault.b);
    match fault.kind {
        Fault::Kill => farm.restart(a),
        Fault::Hang => farm.hang(a, false),
        Fault::Partition => {
            for other in (0..farm.nodes.len()).filter(|o| *o != a) {
                farm.link_fault(a, other, None);
                farm.link_fault(other, a, None);
            }
        }
        Fault::Partial => {
            farm.link_fault(a, b, None);
            farm.link_fault(b, a, None);
        }
        Fault::OneWay | Fault::Drop | Fault::Duplicate | Fault::Delay | Fault::Reorder => {
            farm.link_fault(a, b, None);
        }
        Fault::ClockSkew => {}
    }
}

/// Every node running and every link clear.
fn heal_all(farm: &mut SimFarm) {
    let size = farm.nodes.len();
    for i in 0..size {
        if farm.nodes[i].core.is_none() {
            farm.restart(i);
        }
        if farm.nodes[i].hung {
            farm.hang(i, false);
        }
        for j in (0..size).filter(|j| *j != i) {
            farm.link_fault(i, j, None);
        }
    }
}
