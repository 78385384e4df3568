//! `BALANCE.md` says its tables are the default run's output, unedited: hold it to that for the
//! scenarios that are cheap to run in a debug build (the quick model and the node loss).
//!
//! If this fails after a change to selection or to the simulator, the tables are stale:
//! regenerate them with `cargo run --release -p streamfarm -- sim`, paste them into `BALANCE.md`,
//! and re-read the prose around them.

use streamfarm_core::Policy;
use streamfarm_sim::{Knobs, Scenario, ScenarioKind, report, simulate};

#[test]
fn balance_md_shows_the_default_runs_tables() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../BALANCE.md");
    let balance = std::fs::read_to_string(path).expect("BALANCE.md at the repository root");
    for kind in [ScenarioKind::ScaleOut, ScenarioKind::Failure] {
        let scenario = Scenario::new(kind, &Knobs::default()).unwrap();
        let table = report::markdown(&simulate(&[scenario], &Policy::ALL, 1));
        assert!(
            balance.contains(&table),
            "BALANCE.md does not show the current {kind} table; it should contain:\n{table}"
        );
    }
}
