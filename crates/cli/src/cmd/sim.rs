//! `streamfarm sim`: run selection policies against farm scenarios and print the balance tables.
//!
//! With no arguments it runs every default scenario under every policy (the tables of
//! `BALANCE.md`). The simulation itself is `streamfarm_sim`; this module parses and prints.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use streamfarm_core::Policy;
use streamfarm_sim::{Knobs, Scenario, ScenarioKind, burst, plot, report, simulate};

/// Arguments of `streamfarm sim`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Scenarios to run (comma-separated or repeated): steady, scale-out, failure, rolling, churn,
    /// scale-out-idle, failback. Default: the first five (with --rebalance: scale-out-idle,
    /// rolling, failback).
    #[arg(long = "scenario", value_delimiter = ',')]
    scenarios: Vec<ScenarioKind>,
    /// Policies to compare (comma-separated or repeated). Default: all.
    #[arg(long = "policy", value_delimiter = ',')]
    policies: Vec<Policy>,
    /// Seed of every run: the same seed gives the same tables.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Servers in the farm (scale-out: counting the one added). Default 10.
    #[arg(long)]
    servers: Option<usize>,
    /// New clients: arrivals of steady (default 100000) and scale-out (20000); the steady
    /// population of churn (50000). The scale-out defaults are DESIGN.md's quick model.
    #[arg(long)]
    clients: Option<u64>,
    /// Users per server at the start of scale-out, failure and rolling. Default 10000.
    #[arg(long)]
    load: Option<u64>,
    /// Arrivals of new clients per second. Default: 1000 (steady, scale-out), 100 (failure),
    /// population/600 s (rolling), 500 (churn).
    #[arg(long)]
    rate: Option<f64>,
    /// Age of the lists clients select from, in seconds. Default 2, scale-out 0.5.
    #[arg(long)]
    staleness: Option<f64>,
    /// Seconds within which a lost node's clients all reconnect (full jitter). Default 2.
    #[arg(long)]
    window: Option<f64>,
    /// Clients that lost their server select from the list's join rates alone, without adding
    /// the lost server's users to the arrival rate (only waterfill reads it).
    #[arg(long)]
    no_reconnect_hint: bool,
    /// Draw users per server over time into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The policy of the plotted run.
    #[arg(long, default_value = "waterfill")]
    plot_policy: Policy,
    /// The scenario of the plotted run.
    #[arg(long, default_value = "scale-out")]
    plot_scenario: ScenarioKind,
    /// Print the results as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Active rebalancing as a dimension: every scenario run without and with the nodes moving
    /// their surplus (as `streamfarm serve` does by default). Default scenarios then:
    /// scale-out-idle, rolling, failback; default policy: waterfill.
    #[arg(long)]
    rebalance: bool,
    /// Bursts of arrivals as a live farm serves them (each count of a list with its own age, one
    /// list server or the DNS name): max/mean when the last client connects, median over 21
    /// seeds, with clients picking from their list connection's greeting (as the Rust client
    /// does), from a list asked for (`GET /farm`: a draw and the clients in flight), and from
    /// one asked for where a connected client's watch request takes no draw. The live runs:
    /// `streamfarm bench balance`.
    #[arg(long)]
    bursts: bool,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.bursts {
        let policies = if args.policies.is_empty() {
            Policy::ALL.to_vec()
        } else {
            args.policies.clone()
        };
        let started = Instant::now();
        let tables = tokio::task::spawn_blocking(move || {
            let watch_without_draw = burst::default_bursts();
            let greeting: Vec<_> = watch_without_draw
                .iter()
                .map(|b| b.from_greeting())
                .collect();
            let asked_for: Vec<_> = watch_without_draw.iter().map(|b| b.asked_for()).collect();
            [
                burst::table(&greeting, &policies, 21),
                burst::table(&asked_for, &policies, 21),
                burst::table(&watch_without_draw, &policies, 21),
            ]
        })
        .await
        .context("the simulation stopped")?;
        let [greeting, asked_for, watch_without_draw] = tables;
        println!(
            "### Bursts: picks from the list connection's greeting (the Rust client)\n\n{greeting}"
        );
        println!(
            "### Bursts: picks from a list asked for, with a draw and in_flight (GET /farm)\n\n{asked_for}"
        );
        println!(
            "### Bursts: a list asked for, the watch request's list taking no draw (the Rust client and the nodes)\n\n{watch_without_draw}"
        );
        println!(
            "max/mean when the last client connects, median over seeds 1-21; {:.1} s.",
            started.elapsed().as_secs_f64()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let kinds = match (args.scenarios.is_empty(), args.rebalance) {
        (true, false) => ScenarioKind::ALL.to_vec(),
        (true, true) => ScenarioKind::REBALANCING.to_vec(),
        (false, _) => args.scenarios.clone(),
    };
    let mut policies = match (args.policies.is_empty(), args.rebalance) {
        (true, false) => Policy::ALL.to_vec(),
        (true, true) => vec![Policy::Waterfill],
        (false, _) => args.policies.clone(),
    };
    let mut kinds_run = kinds.clone();
    if args.plot.is_some() {
        // The plotted run is run even when its table was not asked for.
        if !kinds_run.contains(&args.plot_scenario) {
            kinds_run.push(args.plot_scenario);
        }
        if !policies.contains(&args.plot_policy) {
            policies.push(args.plot_policy);
        }
    }
    let knobs = Knobs {
        servers: args.servers,
        clients: args.clients,
        load: args.load,
        rate: args.rate,
        staleness: args.staleness,
        reconnect_window: args.window,
        reconnect_hint: args.no_reconnect_hint.then_some(false),
        rebalance: None,
    };
    let mut scenarios = Vec::new();
    for &kind in &kinds_run {
        scenarios.push(Scenario::new(kind, &knobs)?);
        if args.rebalance {
            let on = Knobs {
                rebalance: Some(true),
                ..knobs
            };
            scenarios.push(Scenario::new(kind, &on)?);
        }
    }
    let plotted_rebalance = args.rebalance;
    let started = Instant::now();
    let outcomes = tokio::task::spawn_blocking(move || simulate(&scenarios, &policies, args.seed))
        .await
        .context("the simulation stopped")?;
    let elapsed = started.elapsed();
    if let Some(path) = &args.plot {
        let run = outcomes
            .iter()
            .find(|o| {
                o.scenario.kind == args.plot_scenario
                    && o.policy == args.plot_policy
                    && o.scenario.rebalance.is_some() == plotted_rebalance
            })
            .expect("the plotted run was added to the runs");
        plot::svg(run, path)?;
        eprintln!("streamfarm sim: plot written to {}", path.display());
    }
    let shown: Vec<_> = outcomes
        .into_iter()
        .filter(|o| {
            kinds.contains(&o.scenario.kind)
                && (args.policies.is_empty() || args.policies.contains(&o.policy))
        })
        .collect();
    if args.json {
        println!("{}", report::json(&shown));
    } else {
        print!("{}", report::markdown(&shown));
        println!(
            "{} runs in {:.1} s (seed {}).",
            shown.len(),
            elapsed.as_secs_f64(),
            args.seed
        );
    }
    Ok(ExitCode::SUCCESS)
}
