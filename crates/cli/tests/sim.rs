//! `streamfarm sim`, run as the built binary on small farms.

use std::process::{Command, Output};

fn sim(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_streamfarm"))
        .arg("sim")
        .args(args)
        .output()
        .expect("the streamfarm binary runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

const SMALL: &[&str] = &["--servers", "3", "--clients", "300", "--load", "100"];

#[test]
fn prints_a_table_per_scenario_with_a_row_per_policy() {
    let mut args = SMALL.to_vec();
    args.extend(["--scenario", "steady,failure", "--staleness", "0"]);
    // `patent` is the weighted policy's other name: the table names it `weighted`.
    args.extend(["--policy", "least-users", "--policy", "patent"]);
    let out = stdout(&sim(&args));
    assert!(
        out.contains("### steady") && out.contains("### failure"),
        "{out}"
    );
    // 300 clients over 3 servers on fresh lists: exactly 100 each.
    assert!(
        out.contains("| least-users | 1.000 | 1.000 | 0.0000 |"),
        "{out}"
    );
    assert_eq!(out.matches("| weighted |").count(), 2, "{out}");
    assert!(!out.contains("| waterfill |"), "{out}");
    assert!(out.contains("4 runs in"), "{out}");
}

#[test]
fn same_seed_same_tables() {
    let mut args = SMALL.to_vec();
    args.extend(["--scenario", "scale-out,churn", "--seed", "42"]);
    let tables = |out: String| {
        out.lines()
            .filter(|l| !l.contains(" runs in "))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let a = tables(stdout(&sim(&args)));
    let b = tables(stdout(&sim(&args)));
    assert_eq!(a, b);
    args.pop();
    args.push("43");
    assert_ne!(a, tables(stdout(&sim(&args))), "the seed must matter");
}

#[test]
fn json_has_a_row_per_run() {
    let mut args = SMALL.to_vec();
    args.extend([
        "--scenario",
        "steady,rolling",
        "--policy",
        "p2c,waterfill",
        "--json",
    ]);
    let rows: serde_json::Value = serde_json::from_str(&stdout(&sim(&args))).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[3]["scenario"]["kind"], "rolling");
    assert_eq!(rows[3]["policy"], "waterfill");
}

#[test]
fn plot_writes_the_chosen_run_as_svg() {
    let path = std::env::temp_dir().join(format!("streamfarm-sim-cli-{}.svg", std::process::id()));
    let path_arg = path.to_str().unwrap();
    let mut args = SMALL.to_vec();
    args.extend([
        "--scenario",
        "steady",
        "--policy",
        "random",
        "--plot",
        path_arg,
    ]);
    args.extend(["--plot-scenario", "failure", "--plot-policy", "waterfill"]);
    let out = stdout(&sim(&args));
    // The plotted run is simulated, but only the asked-for table is printed.
    assert!(
        !out.contains("### failure") && !out.contains("| waterfill |"),
        "{out}"
    );
    let svg = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("failure with waterfill"));
}

#[test]
fn bad_names_and_knobs_are_refused_clearly() {
    let out = sim(&["--scenario", "meltdown"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("meltdown") && err.contains("scale-out"),
        "{err}"
    );
    let out = sim(&["--scenario", "failure", "--servers", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("servers = 1"), "{err}");
    let out = sim(&["--policy", "fastest"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("waterfill"));
}
