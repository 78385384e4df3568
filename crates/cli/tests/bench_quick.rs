//! `streamfarm bench all --quick` against the built binary: every benchmark runs end to end
//! (child nodes, nats-server when installed) and writes JSON with every section and sane figures.
//! No timing assertions: the figures of a smoke run only have to exist, be finite and be non-zero.

use std::process::Command;

const SECTIONS: [&str; 11] = [
    "idle",
    "fanout",
    "cross-node",
    "failover",
    "convergence",
    "connect-cost",
    "auth",
    "rebalance",
    "nats-farm",
    "topics",
    "balance",
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
        if name == "nats-farm" && !nats {
            // It needs a nats-server to relay through.
            continue;
        }
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
                // … and the NATS farm's links and connections (0 by design on one side each).
                // … and the RSS a smoke run's few topics add, within the allocator's noise, and
                // the CPU they cost nats-server (under one 10 ms tick of /proc's clock).
                if figure == "node_cpu_us_per_subscription" {
                    assert!(
                        median.is_finite() && median >= 0.0,
                        "{name} {figure}: median {median}"
                    );
                    continue;
                }
                if figure.starts_with("rss_bytes_per_topic") {
                    assert!(median.is_finite(), "{name} {figure}: median {median}");
                    continue;
                }
                let count = figure.ends_with("_per_client")
                    || figure.ends_with("_msgs")
                    || figure.ends_with("_fraction")
                    || figure == "longest_without_server_ms"
                    // … and the convergence watches opened again, and the cores a smoke run's
                    // few seconds of farm used (under one tick of /proc's clock).
                    || (name == "convergence"
                        && (figure == "watches_reopened" || figure.ends_with("_cpu_cores")))
                    || (name == "nats-farm"
                        && (figure == "lost"
                            || figure == "duplicated"
                            || figure.starts_with("relay_links")
                            || figure.starts_with("nats_connections")));
                assert!(
                    median.is_finite() && (median > 0.0 || (count && median == 0.0)),
                    "{name} {} {figure}: median {median}",
                    row["system"]
                );
            }
        }
        // The peer is in every section it can be in, whenever it is installed.
        // (Balance has no peer: nats-server's clients choose no server.)
        if nats
            && name != "convergence"
            && name != "rebalance"
            && name != "nats-farm"
            && name != "balance"
        {
            assert!(
                rows.iter().any(|r| r["system"] == "nats-server"),
                "{name}: no nats-server row although it is installed"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A node binary that cannot serve makes every streamfarm measurement fail: each is a row marked
/// failed, nats-server's rows (when installed) keep their figures, the JSON is written anyway and
/// the exit status says a phase failed.
#[test]
fn a_failed_phase_is_reported_and_the_other_figures_are_kept() {
    let dir = std::env::temp_dir().join(format!("streamfarm-bench-failed-{}", std::process::id()));
    let out = dir.join("idle.json");
    let output = Command::new(env!("CARGO_BIN_EXE_streamfarm"))
        .args([
            "bench",
            "idle",
            "--quick",
            "--node-exe",
            "/bin/false",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run streamfarm bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        !output.status.success(),
        "a failed phase must fail the run:\n{stdout}"
    );
    let text = std::fs::read_to_string(&out).expect("results file written despite the failure");
    let report: serde_json::Value = serde_json::from_str(&text).expect("results are JSON");
    let rows = report["sections"]["idle"]["rows"]
        .as_array()
        .expect("idle rows");
    let streamfarm = rows
        .iter()
        .find(|r| r["system"] == "streamfarm")
        .expect("the failed row is kept");
    assert!(
        streamfarm["failed"].as_str().is_some_and(|w| !w.is_empty()),
        "{streamfarm}"
    );
    assert!(stdout.contains("FAILED"), "{stdout}");
    if report["nats_server"].is_string() {
        let nats = rows
            .iter()
            .find(|r| r["system"] == "nats-server")
            .expect("nats-server row");
        assert!(nats.get("failed").is_none(), "{nats}");
        assert!(nats["figures"]["rss_per_conn_bytes"]["median"].as_f64() > Some(0.0));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `convergence --in-process`: a farm of chitchat instances in simulated time settles, every
/// node sees a change, and the traffic per round is measured (no timing assertions).
#[test]
fn in_process_convergence_measures_a_farm_without_processes() {
    let dir = std::env::temp_dir().join(format!("streamfarm-bench-gossip-{}", std::process::id()));
    let out = dir.join("gossip.json");
    let output = Command::new(env!("CARGO_BIN_EXE_streamfarm"))
        .args([
            "bench",
            "convergence",
            "--quick",
            "--in-process",
            "--farm-sizes",
            "2,30",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run streamfarm bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("results")).expect("JSON");
    let rows = report["sections"]["convergence"]["rows"]
        .as_array()
        .expect("rows");
    assert_eq!(rows.len(), 2, "{stdout}");
    for row in rows {
        assert!(row.get("failed").is_none(), "{row}");
        for figure in [
            "change_p99_node_ms",
            "syn_max_bytes",
            "bytes_per_node_round",
        ] {
            let median = row["figures"][figure]["median"].as_f64();
            assert!(median.is_some_and(|m| m > 0.0), "{figure} in {row}");
        }
        assert_eq!(row["figures"]["datagrams_over_udp_limit"]["median"], 0.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
