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

/// Two topics of one partition, so a test can follow what a second topic of a claimed partition
/// costs.
fn topics_of_one_partition() -> (String, String) {
    use crate::broker::placement::partition;
    let first = "t0".to_string();
    let second = (1..)
        .map(|i| format!("t{i}"))
        .find(|t| partition(t) == partition(&first))
        .expect("some topic shares the partition");
    (first, second)
}

#[test]
fn a_new_topic_of_a_claimed_partition_starts_without_a_claim() {
    let (first, second) = topics_of_one_partition();
    let mut farm = SimFarm::new(3, 1, &[first.clone(), second.clone()]);
    farm.trace = Some(Vec::new());
    let claims = |farm: &SimFarm| {
        farm.trace.as_ref().map_or(0, |t| {
            t.iter().filter(|line| line.contains(" Claim {")).count()
        })
    };
    let mut reply = farm.publish(0, &first, "a", None);
    farm.run_for(2_000);
    assert!(
        matches!(reply.try_recv(), Ok(Ok(_))),
        "the first topic's publish acknowledged"
    );
    let after_first = claims(&farm);
    assert!(
        after_first >= 2,
        "the first topic's partition was claimed from both peers"
    );
    let mut reply = farm.publish(1, &second, "b", None);
    farm.run_for(2_000);
    let position = reply.try_recv();
    assert!(
        matches!(position, Ok(Ok(_))),
        "the second topic's publish acknowledged: {position:?}"
    );
    assert_eq!(claims(&farm), after_first, "the second topic cost no claim");
    let delivered = farm.delivered(2, &second).map(|(_, messages)| messages);
    assert_eq!(
        delivered,
        Some(vec![(1, "b".to_string())]),
        "delivered at offset 1 on every node"
    );
}
