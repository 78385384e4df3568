use super::*;
use crate::broker::Breaks;

fn small(faults: usize, kinds: &[Fault]) -> Options {
    Options {
        nodes: 3,
        topics: 3,
        publishes: 200,
        faults,
        kinds: kinds.to_vec(),
        ..Options::default()
    }
}

#[test]
fn a_farm_without_faults_delivers_every_publish_everywhere() {
    for seed in 0..5 {
        let outcome = run(seed, &small(0, &[]), false);
        assert_eq!(outcome.violation, None, "seed {seed}");
        assert_eq!(
            outcome.acknowledged, outcome.publishes,
            "seed {seed}: every publish acknowledged"
        );
    }
}

#[test]
fn killed_nodes_lose_nothing_acknowledged() {
    for seed in 0..10 {
        let outcome = run(seed, &small(4, &[Fault::Kill]), false);
        assert_eq!(outcome.violation, None, "seed {seed}");
        assert_eq!(outcome.faults.get("kill"), Some(&4), "seed {seed}");
        assert!(
            outcome.acknowledged > outcome.publishes / 2,
            "seed {seed}: {outcome:?}"
        );
    }
}

#[test]
fn a_seed_replays_the_same_run_event_for_event() {
    let options = small(6, &Fault::ALL);
    let first = run(7, &options, true);
    let again = run(7, &options, true);
    assert!(first.trace.len() > 100, "a trace of the run");
    assert_eq!(first.trace, again.trace);
    assert_eq!(first.acknowledged, again.acknowledged);
}

/// Seeds until one breaks a guarantee, at most `seeds`.
fn first_violation(options: &Options, seeds: u64) -> Option<Outcome> {
    (0..seeds)
        .map(|seed| run(seed, options, false))
        .find(|o| o.violation.is_some())
}

#[test]
fn the_simulation_finds_a_replica_that_skips_fencing() {
    let options = Options {
        breaks: Breaks {
            skip_fencing: true,
            ..Breaks::default()
        },
        ..small(6, &[Fault::Hang, Fault::Partition])
    };
    let found = first_violation(&options, 40).expect("a violation within 40 seeds");
    let violation = found.violation.expect("found");
    assert!(!found.trace.is_empty(), "the shrunk run's trace");
    eprintln!(
        "seed {}: {}: {}",
        found.seed, violation.invariant, violation.detail
    );
}

#[test]
fn the_simulation_finds_a_claimant_that_ignores_the_farms_logs() {
    let options = Options {
        breaks: Breaks {
            ignore_claim_answers: true,
            ..Breaks::default()
        },
        ..small(4, &[Fault::Kill])
    };
    let found = first_violation(&options, 40).expect("a violation within 40 seeds");
    let violation = found.violation.expect("found");
    eprintln!(
        "seed {}: {}: {}",
        found.seed, violation.invariant, violation.detail
    );
}
