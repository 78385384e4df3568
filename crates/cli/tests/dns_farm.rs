//! The DNS service name end to end: three `streamfarm serve --dns` processes on
//! 127.0.0.1/.2/.3; `dig` at one of them returns the three addresses, rotated; a SIGKILLed node
//! leaves the answers within the failure-detection time and comes back when restarted.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use streamfarm_localfarm::{NodeProcess, NodeSpec, free_port};
use tokio::process::Command;
use tokio::time::{Instant, timeout};

const SERVICE: &str = "farm.test";
/// Gossip timers of the test farm: a silent node is DOWN after `FAILURE_TIMEOUT_MS`.
const GOSSIP_INTERVAL_MS: u64 = 50;
const FAILURE_TIMEOUT_MS: u64 = 1_000;
/// Time for the farm to form, or a restarted node to be back, on a loaded machine.
const SETTLE: Duration = Duration::from_secs(20);

/// A `streamfarm serve --dns` child process (killed when dropped) and its DNS address.
struct Node {
    process: NodeProcess,
    dns: SocketAddr,
}

impl Node {
    /// Starts node `name` on 127.0.0.`n` with its DNS responder there too, joining `join`, and
    /// waits until it serves.
    async fn start(name: &str, n: u8, join: Option<SocketAddr>) -> Node {
        let ip = IpAddr::from([127, 0, 0, n]);
        let dns = free_port(ip).unwrap();
        let mut spec = NodeSpec::new(name, free_port(ip).unwrap()).flags([
            "--dns",
            &dns.to_string(),
            "--service-name",
            SERVICE,
            "--dns-ttl",
            "1",
            "--gossip-interval-ms",
            &GOSSIP_INTERVAL_MS.to_string(),
            "--failure-timeout-ms",
            &FAILURE_TIMEOUT_MS.to_string(),
            "--shutdown-drain-ms",
            "100",
        ]);
        spec.join.extend(join);
        let exe = Path::new(env!("CARGO_BIN_EXE_streamfarm"));
        let process = timeout(SETTLE, NodeProcess::start(exe, &spec))
            .await
            .expect("node starts in time")
            .expect("node starts");
        Node { process, dns }
    }

    /// The node's gossip address: its listen address, over UDP.
    fn gossip(&self) -> SocketAddr {
        self.process.listen
    }
}

/// `dig @SERVER -p PORT farm.test A +short`: the addresses in answer order.
async fn dig(server: SocketAddr) -> Vec<String> {
    let output = Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string()])
        .args([SERVICE, "A", "+short", "+tries=1", "+time=2"])
        .kill_on_drop(true)
        .output();
    let output = timeout(Duration::from_secs(10), output)
        .await
        .expect("dig finishes")
        .expect("dig runs: install bind9-dnsutils (scripts/test.sh does)");
    assert!(output.status.success(), "dig failed: {output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn sorted(mut addresses: Vec<String>) -> Vec<String> {
    addresses.sort();
    addresses
}

/// Asks `dig` every 50 ms until `check` accepts the answer; returns how long it took.
async fn dig_until(
    server: SocketAddr,
    within: Duration,
    what: &str,
    check: impl Fn(&[String]) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let answer = dig(server).await;
        if check(&answer) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "not within {within:?}: {what}; last answer {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_follows_the_farm_through_a_kill_and_a_restart() {
    let all = vec!["127.0.0.1", "127.0.0.2", "127.0.0.3"];
    let a = Node::start("a", 1, None).await;
    let _b = Node::start("b", 2, Some(a.gossip())).await;
    let mut c = Node::start("c", 3, Some(a.gossip())).await;

    dig_until(a.dns, SETTLE, "the three nodes answered", |answer| {
        sorted(answer.to_vec()) == all
    })
    .await;
    // Round robin: each answer starts one place further.
    let first = dig(a.dns).await;
    let second = dig(a.dns).await;
    let mut expected = first.clone();
    expected.rotate_left(1);
    assert_eq!(second, expected, "rotated");
    // Every node answers the same name for the whole farm.
    dig_until(c.dns, SETTLE, "c answers all three", |answer| {
        sorted(answer.to_vec()) == all
    })
    .await;

    // SIGKILL: no goodbye, only the failure detector can tell.
    c.process.kill();
    let gone = dig_until(
        a.dns,
        Duration::from_millis(FAILURE_TIMEOUT_MS) + Duration::from_secs(4),
        "the killed node gone from the answers",
        |answer| sorted(answer.to_vec()) == ["127.0.0.1", "127.0.0.2"],
    )
    .await;
    eprintln!(
        "killed node left the DNS answers after {gone:?} (failure timeout {FAILURE_TIMEOUT_MS} ms)"
    );
    // And it stays gone, whatever the rotation.
    for _ in 0..3 {
        assert_eq!(sorted(dig(a.dns).await), ["127.0.0.1", "127.0.0.2"]);
    }

    c.process.restart(None).unwrap();
    c.process.wait_ready(SETTLE).await.unwrap();
    let back = dig_until(
        a.dns,
        SETTLE,
        "the restarted node answered again",
        |answer| sorted(answer.to_vec()) == all,
    )
    .await;
    eprintln!("restarted node back in the DNS answers after {back:?}");
}
