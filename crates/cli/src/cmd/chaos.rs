//! `streamfarm chaos`: the farm's deterministic simulation, seed after seed
//! (`streamfarm_node::chaos`).
//!
//! `--seeds N` runs N seeds and prints a line per seed (with `--json`, an object per seed, then a
//! summary object); on a violation it prints the seed, the guarantee broken and the trace of the
//! run shrunk to the fewest faults that still show it, and exits 1. `--seed S --trace` replays
//! one seed with every event: the same output, byte for byte, every time.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::bail;
use serde_json::json;
use streamfarm_node::chaos::{self, Fault, Options, Outcome};

/// Arguments of `streamfarm chaos`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// How many seeds to run.
    #[arg(long, default_value_t = 100, conflicts_with = "seed")]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    seed_start: u64,
    /// Run this one seed only (with --trace, every event of it).
    #[arg(long)]
    seed: Option<u64>,
    /// Print every event of the run (with --seed).
    #[arg(long, requires = "seed")]
    trace: bool,
    /// Nodes in the simulated farm.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(2..=64))]
    nodes: u64,
    /// Publishing clients, each on a node, moving to the next one to publish again under their
    /// key when unanswered.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    clients: u64,
    /// Faults per seed.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    faults: u64,
    /// Publishes per seed.
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    publishes: u64,
    /// Topics published on.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    topics: u64,
    /// The kinds of fault to draw from, comma-separated (default every kind): kill, hang,
    /// partition, one-way, partial, drop, duplicate, delay, reorder, clock-skew.
    #[arg(long, value_delimiter = ',')]
    kinds: Vec<String>,
    /// One JSON object per seed, then a summary object.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut kinds = Vec::new();
    for name in &args.kinds {
        match Fault::parse(name.trim()) {
            Some(kind) => kinds.push(kind),
            None => bail!(
                "--kinds: unknown fault {name:?}; the kinds are {}",
                Fault::ALL.map(Fault::name).join(", ")
            ),
        }
    }
    let options = Options {
        nodes: args.nodes as usize,
        clients: args.clients as usize,
        topics: args.topics as usize,
        publishes: args.publishes as usize,
        faults: args.faults as usize,
        kinds: if kinds.is_empty() {
            Fault::ALL.to_vec()
        } else {
            kinds
        },
    };
    // The simulation is one thread of pure computation: off the async runtime.
    tokio::task::spawn_blocking(move || simulate(&args, &options)).await?
}

fn simulate(args: &Args, options: &Options) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    if let Some(seed) = args.seed {
        let outcome = chaos::run(seed, options, args.trace);
        print_outcome(&mut out, args.json, &outcome)?;
        if args.trace || outcome.violation.is_some() {
            for line in &outcome.trace {
                writeln!(out, "{line}")?;
            }
        }
        return Ok(exit_code(&outcome));
    }
    let started = std::time::Instant::now();
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut violations = 0;
    let mut ran = 0;
    // Seeds run on every core, a batch at a time, and are reported in seed order: each seed's run
    // is its own, so the output is the same whatever the number of cores.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let end = args.seed_start.saturating_add(args.seeds);
    let mut next = args.seed_start;
    'batches: while next < end {
        let batch: Vec<u64> = (next..end.min(next.saturating_add(threads))).collect();
        next = batch.last().map_or(end, |last| last + 1);
        let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
            let runs: Vec<_> = batch
                .iter()
                .map(|seed| scope.spawn(move || chaos::run(*seed, options, false)))
                .collect();
            runs.into_iter()
                .map(|run| run.join().expect("a simulation thread panicked"))
                .collect()
        });
        for outcome in outcomes {
            ran += 1;
            for (kind, count) in &outcome.faults {
                *faults.entry(kind).or_default() += count;
            }
            print_outcome(&mut out, args.json, &outcome)?;
            if outcome.violation.is_some() {
                violations += 1;
                for line in &outcome.trace {
                    writeln!(out, "{line}")?;
                }
                break 'batches;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if args.json {
        let summary = json!({
            "seeds": ran,
            "violations": violations,
            "faults": faults,
            "seconds": (seconds * 1000.0).round() / 1000.0,
        });
        writeln!(out, "{summary}")?;
    } else {
        writeln!(
            out,
            "{ran} seeds, {violations} violations, {:.1} s ({:.0} seeds/min); faults: {}",
            seconds,
            ran as f64 / seconds.max(1e-9) * 60.0,
            counts(&faults)
        )?;
    }
    Ok(if violations > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn exit_code(outcome: &Outcome) -> ExitCode {
    if outcome.violation.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn counts(faults: &BTreeMap<&'static str, u64>) -> String {
    faults
        .iter()
        .map(|(kind, count)| format!("{kind} {count}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One seed's line (or JSON object); nothing in it depends on the machine, so a replay prints
/// the same bytes.
fn print_outcome(out: &mut impl Write, json: bool, outcome: &Outcome) -> std::io::Result<()> {
    if json {
        let violation = outcome
            .violation
            .as_ref()
            .map(|v| json!({"invariant": v.invariant, "detail": v.detail, "at_ms": v.at_ms}));
        let line = json!({
            "seed": outcome.seed,
            "ok": outcome.violation.is_none(),
            "publishes": outcome.publishes,
            "acknowledged": outcome.acknowledged,
            "retries": outcome.retries,
            "faults": outcome.faults,
            "simulated_ms": outcome.simulated_ms,
            "violation": violation,
        });
        return writeln!(out, "{line}");
    }
    let verdict = match &outcome.violation {
        None => "ok".to_string(),
        Some(v) => format!("VIOLATION at {} ms: {}: {}", v.at_ms, v.invariant, v.detail),
    };
    writeln!(
        out,
        "seed {}: {verdict}; {} publishes, {} acknowledged, {} sent again; {:.1} s simulated; faults: {}",
        outcome.seed,
        outcome.publishes,
        outcome.acknowledged,
        outcome.retries,
        outcome.simulated_ms as f64 / 1000.0,
        counts(&outcome.faults)
    )
}
