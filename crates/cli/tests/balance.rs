//! The simulator against a live farm: `streamfarm bench balance` on three real nodes (rebalancing
//! off), a burst of clients arriving through one list server, and the simulator's figure for the
//! same case beside each live one. The model must match what the farm does: its max/mean within
//! 0.03 of the live one.

use std::process::Command;

/// Runs one case of `streamfarm bench balance` and returns the live and the simulated median
/// max/mean, and the printed output.
fn live_and_simulated(policy: &str, farm: &str, rate: &str) -> (f64, f64, String) {
    let dir = std::env::temp_dir().join(format!("streamfarm-balance-{}", std::process::id()));
    let out = dir.join(format!("{policy}-{farm}-{rate}.json"));
    let output = Command::new(env!("CARGO_BIN_EXE_streamfarm"))
        .args(["bench", "balance", "--farms", farm, "--arrival-rates", rate])
        .args([
            "--via",
            "list-server",
            "--policy",
            policy,
            "--repeats",
            "3",
            "--out",
        ])
        .arg(&out)
        .output()
        .expect("run streamfarm bench balance");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "bench failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&out).expect("results file");
    let _ = std::fs::remove_dir_all(&dir);
    let report: serde_json::Value = serde_json::from_str(&text).expect("results are JSON");
    let row = &report["sections"]["balance"]["rows"][0];
    assert!(row["failed"].is_null(), "the run failed: {row}\n{stdout}");
    let figure = |name: &str| {
        row["figures"][name]["median"]
            .as_f64()
            .unwrap_or_else(|| panic!("no {name} in {row}\n{stdout}"))
    };
    (figure("max_over_mean"), figure("sim_max_over_mean"), stdout)
}

#[test]
fn simulated_balance_matches_a_live_burst_within_three_hundredths() {
    // 900 clients on three nodes at 1000/s through one list server, uniform picks. The Rust
    // client picks from its list connection's greeting, which carries no draw: each client draws
    // for itself, from its seed, so the live split is the binomial one (about 1.05), and so is the
    // simulator's. A model that gave the greeting the list server's draws would read 1.003.
    let (live, simulated, stdout) = live_and_simulated("random", "3x900", "1000");
    assert!(
        (live - simulated).abs() <= 0.03,
        "live {live:.3} against simulated {simulated:.3}:\n{stdout}"
    );
}
