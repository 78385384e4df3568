//! The balance simulator: selection policies against farm scenarios.
//!
//! A farm of servers, clients that arrive, leave and reconnect, and lists that are `staleness`
//! seconds old: for every (scenario, policy) pair a deterministic discrete-event run, summarised as
//! the spread of users per server at the end and at the worst moment. Clients select with
//! [`streamfarm_core::selection`] itself, so what is measured here is what the clients run.
//!
//! This crate owns the simulation and its outputs (tables, JSON, plots); `streamfarm sim` only
//! parses knobs and prints. It touches no sockets and no clock: time is simulated, randomness is
//! seeded.
//!
//! # Layout
//! - [`scenario`] — the five scenarios ([`ScenarioKind`]), their parameters ([`Scenario`]),
//!   defaults and the command line's overrides ([`Knobs`]).
//! - [`engine`] — the event loop of one run ([`engine::run`]) and what it records ([`Trace`]).
//! - [`stats`] — max/mean, min/mean and coefficient of variation of users per up server
//!   ([`Balance`]), at the end and at the worst point of a run ([`Summary`]).
//! - [`report`] — Markdown tables and JSON of many runs.
//! - [`plot`] — users per server over time, as SVG (with `plotters`).
//! - [`burst`] — bursts of arrivals as a live farm serves them: each count of a list with its own
//!   age, one list server or the DNS name (`streamfarm sim --bursts`, `streamfarm bench balance`).
//!
//! ```
//! use streamfarm_core::Policy;
//! use streamfarm_sim::{Knobs, Scenario, ScenarioKind, simulate};
//! let knobs = Knobs { servers: Some(4), clients: Some(2000), staleness: Some(0.0), ..Knobs::default() };
//! let steady = Scenario::new(ScenarioKind::Steady, &knobs).unwrap();
//! let runs = simulate(&[steady], &[Policy::LeastUsers], 7);
//! // Least-users on fresh lists keeps servers within one user of each other.
//! assert_eq!(runs[0].summary.end.max_over_mean, 1.0);
//! ```

pub mod burst;
pub mod engine;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod stats;

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use streamfarm_core::Policy;

pub use engine::{Counts, Sample, Trace};
pub use scenario::{Knobs, Scenario, ScenarioError, ScenarioKind};
pub use stats::{Balance, NewServer, Summary};

/// One (scenario, policy) run and its figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// What was run.
    pub scenario: Scenario,
    /// How the clients selected.
    pub policy: Policy,
    /// The seed of the run.
    pub seed: u64,
    /// The figures.
    pub summary: Summary,
    /// The samples and counts.
    pub trace: Trace,
}

/// Runs every scenario under every policy from `seed`, scenario-major (the order of the tables).
///
/// Runs are spread over the machine's cores; each run has its own seeded RNGs, so the result does
/// not depend on the number of threads.
pub fn simulate(scenarios: &[Scenario], policies: &[Policy], seed: u64) -> Vec<Outcome> {
    let jobs: Vec<(&Scenario, Policy)> = scenarios
        .iter()
        .flat_map(|s| policies.iter().map(move |&p| (s, p)))
        .collect();
    let results: Vec<Mutex<Option<Outcome>>> = jobs.iter().map(|_| Mutex::new(None)).collect();
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(scenario, policy)) = jobs.get(k) else {
                        break;
                    };
                    let trace = engine::run(scenario, policy, seed);
                    let outcome = Outcome {
                        scenario: scenario.clone(),
                        policy,
                        seed,
                        summary: Summary::of(scenario, &trace),
                        trace,
                    };
                    *results[k].lock().expect("no run panics holding the lock") = Some(outcome);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .expect("no run panics holding the lock")
                .expect("every job ran")
        })
        .collect()
}
