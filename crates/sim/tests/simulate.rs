//! The simulator's promises on small farms: determinism, conservation of clients, and rankings
//! that are certain (or as near as makes no difference at these sizes).

use streamfarm_core::Policy;
use streamfarm_sim::{Balance, Knobs, Outcome, Scenario, ScenarioKind, plot, report, simulate};

fn small(kind: ScenarioKind, staleness: f64) -> Scenario {
    // Rolling keeps its own rate (population / 600 s), or the run would turn over 20 times.
    let knobs = Knobs {
        servers: Some(5),
        clients: Some(if kind == ScenarioKind::ScaleOut {
            1000
        } else {
            3000
        }),
        load: Some(600),
        rate: (kind != ScenarioKind::Rolling).then_some(300.0),
        staleness: Some(staleness),
        ..Knobs::default()
    };
    Scenario::new(kind, &knobs).unwrap()
}

fn all_small(staleness: f64) -> Vec<Scenario> {
    ScenarioKind::ALL
        .iter()
        .map(|&k| small(k, staleness))
        .collect()
}

fn one(scenario: Scenario, policy: Policy, seed: u64) -> Outcome {
    simulate(&[scenario], &[policy], seed).remove(0)
}

#[test]
fn same_seed_same_tables_other_seed_other_tables() {
    let scenarios = all_small(1.0);
    let a = report::markdown(&simulate(&scenarios, &Policy::ALL, 11));
    let b = report::markdown(&simulate(&scenarios, &Policy::ALL, 11));
    let c = report::markdown(&simulate(&scenarios, &Policy::ALL, 12));
    assert_eq!(a, b);
    assert_ne!(a, c, "the seed must matter");
}

#[test]
fn clients_are_conserved_in_every_scenario_and_policy() {
    for outcome in simulate(&all_small(1.0), &Policy::ALL, 3) {
        let counts = outcome.trace.counts;
        let last = outcome.trace.samples.last().unwrap();
        let on_servers: u64 = last.users.iter().sum();
        let name = format!("{} / {}", outcome.scenario.kind, outcome.policy);
        assert_eq!(
            on_servers,
            counts.initial + counts.arrivals - counts.departures,
            "{name}: {counts:?}"
        );
        // Every arrival and every disconnected client ends up connected exactly once.
        assert_eq!(
            counts.connections,
            counts.arrivals + counts.disconnected,
            "{name}: {counts:?}"
        );
        let users_on_down_servers: u64 = last
            .users
            .iter()
            .zip(&last.up)
            .filter(|(_, up)| !**up)
            .map(|(u, _)| u)
            .sum();
        assert_eq!(users_on_down_servers, 0, "{name}");
    }
}

#[test]
fn scenarios_do_what_they_say() {
    let s = small(ScenarioKind::Steady, 1.0);
    assert_eq!(one(s, Policy::Random, 1).trace.counts.arrivals, 3000);
    let failure = one(small(ScenarioKind::Failure, 1.0), Policy::Weighted, 1);
    // Node 0 had its 600 and its share of 5 s of arrivals.
    let lost = failure.trace.counts.disconnected;
    assert!((600..600 + 1500).contains(&lost), "{lost}");
    let rolling = one(small(ScenarioKind::Rolling, 1.0), Policy::Weighted, 1);
    assert!(
        rolling.trace.counts.disconnected > 5 * 500,
        "{:?}",
        rolling.trace.counts
    );
    let churn = one(small(ScenarioKind::Churn, 1.0), Policy::Weighted, 1);
    assert!(
        churn.trace.counts.departures > 3000,
        "{:?}",
        churn.trace.counts
    );
}

#[test]
fn least_users_and_waterfill_on_fresh_lists_are_perfectly_balanced() {
    for policy in [Policy::LeastUsers, Policy::Waterfill] {
        let outcome = one(small(ScenarioKind::Steady, 0.0), policy, 5);
        for sample in &outcome.trace.samples {
            let max = sample.users.iter().max().unwrap();
            let min = sample.users.iter().min().unwrap();
            assert!(
                max - min <= 1,
                "{policy} at {}: {:?}",
                sample.time,
                sample.users
            );
        }
    }
    // Random has no such luck: the test can tell the difference.
    let random = one(small(ScenarioKind::Steady, 0.0), Policy::Random, 5);
    let end = &random.trace.samples.last().unwrap().users;
    assert!(
        end.iter().max().unwrap() - end.iter().min().unwrap() > 1,
        "{end:?}"
    );
}

#[test]
fn a_new_server_fills_under_waterfill_and_not_under_weighted() {
    let share = |policy| {
        let outcome = one(small(ScenarioKind::ScaleOut, 0.5), policy, 9);
        outcome.summary.new_server.unwrap().share_at_end
    };
    let (weighted, p2c, waterfill) = (
        share(Policy::Weighted),
        share(Policy::P2c),
        share(Policy::Waterfill),
    );
    assert!(weighted < 0.5, "weighted {weighted}");
    assert!(
        weighted < p2c && p2c < waterfill,
        "{weighted} {p2c} {waterfill}"
    );
    assert!(waterfill > 0.95, "waterfill {waterfill}");
}

#[test]
fn waterfill_spreads_a_failed_nodes_clients_where_least_users_herds() {
    let worst = |policy| {
        let outcome = one(small(ScenarioKind::Failure, 2.0), policy, 4);
        outcome.summary.worst.max_over_mean
    };
    let (least, waterfill) = (worst(Policy::LeastUsers), worst(Policy::Waterfill));
    assert!(least > 1.2, "least-users {least}");
    assert!(waterfill < 1.05, "waterfill {waterfill}");
}

#[test]
fn worst_point_is_the_highest_max_over_mean_after_the_perturbation() {
    let outcome = one(small(ScenarioKind::Steady, 2.0), Policy::LeastUsers, 2);
    let from = outcome.scenario.perturbation_at;
    let highest = outcome
        .trace
        .samples
        .iter()
        .filter(|s| s.time >= from)
        .map(|s| Balance::of(s).max_over_mean)
        .fold(0.0, f64::max);
    assert_eq!(outcome.summary.worst.max_over_mean, highest);
    assert!(outcome.summary.worst.time >= from);
}

#[test]
fn json_has_a_row_per_run() {
    let outcomes = simulate(&all_small(1.0)[..2], &[Policy::Weighted, Policy::P2c], 1);
    let rows: serde_json::Value = serde_json::from_str(&report::json(&outcomes)).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[1]["policy"], "p2c");
    assert_eq!(rows[0]["scenario"]["kind"], "steady");
    assert!(rows[0]["summary"]["end"]["max_over_mean"].as_f64().unwrap() >= 1.0);
}

#[test]
fn plot_writes_an_svg_with_a_line_per_server() {
    let outcome = one(small(ScenarioKind::ScaleOut, 0.5), Policy::Waterfill, 1);
    let dir = std::env::temp_dir().join(format!("streamfarm-sim-plot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scale-out.svg");
    plot::svg(&outcome, &path).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
    for i in 0..5 {
        let label = format!("s{i}");
        assert!(
            svg.lines().any(|l| l.trim() == label),
            "no legend for {label}"
        );
    }
    assert!(!svg.lines().any(|l| l.trim() == "s5"));
    let err = plot::svg(&outcome, &dir.join("plot.png")).unwrap_err();
    assert!(err.to_string().contains(".svg"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Active rebalancing on a small farm with no arrivals: the empty server fills to the mean with
/// close to the fewest moves, nothing moves once even, and nothing is sent back; failback empties
/// group B. Without rebalancing nothing moves at all.
#[test]
fn rebalancing_evens_an_idle_farm_with_the_fewest_moves_and_no_ping_pong() {
    for (kind, servers) in [(ScenarioKind::ScaleOutIdle, 5), (ScenarioKind::Failback, 4)] {
        let knobs = Knobs {
            servers: Some(servers),
            load: Some(2000),
            rebalance: Some(true),
            ..Knobs::default()
        };
        let on = Scenario::new(kind, &knobs).unwrap();
        let off = Scenario::new(
            kind,
            &Knobs {
                rebalance: None,
                ..knobs
            },
        )
        .unwrap();
        let runs = simulate(&[off, on], &[Policy::Waterfill], 3);
        let (off, on) = (&runs[0], &runs[1]);
        assert_eq!(
            off.trace.counts.moves, 0,
            "{kind}: nothing moves without rebalancing"
        );
        let moves = on.summary.moves.expect("rebalancing figures");
        assert!(moves.minimal > 0, "{kind}: {moves:?}");
        assert!(
            moves.moved >= moves.minimal && moves.moved as f64 <= 1.1 * moves.minimal as f64,
            "{kind}: {} moves for a minimum of {}",
            moves.moved,
            moves.minimal
        );
        assert!(moves.balanced_at.is_some(), "{kind}: never balanced");
        assert_eq!(moves.last_5_min, 0, "{kind}: still moving once even");
        assert_eq!(moves.reversals, 0, "{kind}: ping-pong");
        assert!(
            on.summary.end.max_over_mean < 1.05,
            "{kind}: {:?}",
            on.summary.end
        );
        let total: u64 = on.trace.samples.last().unwrap().users.iter().sum();
        let start: u64 = on.trace.samples[0].users.iter().sum();
        assert_eq!(total, start, "{kind}: moves lose no client");
    }
}
