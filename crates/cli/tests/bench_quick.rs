//! `streamfarm bench all --quick` against the built binary: every benchmark runs end to end
//! (child nodes, nats-server when installed) and writes JSON with every section and sane figures.
//! No timing assertions: the figures of a smoke run only have to exist, be finite and be non-zero.

use std::process::Command;

const SECTIONS: [&str; 8] = [
    "idle",
    "fanout",
    "cross-node",
    "failover",
    "convergence",
    "connect-cost",
    "auth",
    "rebalance",
];

#[test]
fn bench_all_quick_writes_every_section_with_sane_figures() {
    let dir = std::env::temp_dir().join(format!("streamfarm-bench-quick-{}", std::process::id()));
    let out = dir.join("quick.json");
    let output = Command::new(env!("CARGO_BIN_EXE_streamfarm"))
        .args(["bench", "all", "--quick", "--out"])
        .arg(&out)
        .output()
        .expect("run streamfarm bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&out).expect("results file");
    let report: serde_json::Value = serde_json::from_str(&text).expect("results are JSON");
    assert_eq!(report["quick"], true);
    let nats = report["nats_server"].is_string();
    for name in SECTIONS {
        let section = &report["sections"][name];
        let rows = section["rows"]
            .as_array()
            .unwrap_or_else(|| panic!("section {name} missing:\n{stdout}"));
        assert!(!rows.is_empty(), "section {name} has no rows:\n{stdout}");
        for row in rows {
            let figures = row["figures"].as_object().expect("figures");
            assert!(!figures.is_empty(), "{name}: a row without figures: {row}");
            for (figure, value) in figures {
                let median = value["median"].as_f64().expect("median is a number");
                // Counts (failed dials, attempts on a dead address, lost messages) and fractions
                // (clients back after a short hang) may well be 0.
                // … and the longest a client went without a server: 0 when none lost it.
                let count = figure.ends_with("_per_client")
                    || figure.ends_with("_msgs")
                    || figure.ends_with("_fraction")
                    || figure == "longest_without_server_ms";
                assert!(
                    median.is_finite() && (median > 0.0 || (count && median == 0.0)),
                    "{name} {} {figure}: median {median}",
                    row["system"]
                );
            }
        }
        // The peer is in every section it can be in, whenever it is installed.
        if nats && name != "convergence" && name != "rebalance" {
            assert!(
                rows.iter().any(|r| r["system"] == "nats-server"),
                "{name}: no nats-server row although it is installed"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
