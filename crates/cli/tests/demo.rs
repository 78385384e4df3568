//! `streamfarm demo` runs a farm, kills a node and finishes cleanly by itself.

use std::process::Stdio;
use std::time::Duration;

#[tokio::test]
async fn demo_kills_a_node_and_every_client_fails_over() {
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_streamfarm"))
        .args([
            "demo",
            "--clients",
            "60",
            "--hold",
            "500ms",
            "--after",
            "10s",
        ])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the demo finishes within a minute")
        .expect("the demo ran");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("60 clients connected"), "{text}");
    assert!(text.contains("SIGKILL node"), "{text}");
    assert!(
        text.contains("every client back on a live server"),
        "{text}"
    );
    let failovers = text
        .lines()
        .find(|l| l.contains("failovers:"))
        .expect("a failover line");
    assert!(failovers.contains("p99"), "{failovers}");
    assert!(text.contains("demo finished"), "{text}");
}
