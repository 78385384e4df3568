//! `streamfarm serve` as real processes on 127.0.0.1 / .2 / .3: a node killed (SIGKILL) or
//! stopped (SIGSTOP) is listed DOWN by the others within the configured detection time and UP
//! again once restarted or continued; SIGTERM announces DOWN and exits cleanly; settings come from
//! the environment.
//!
//! Each node takes a port free on its address (TCP and UDP: it gossips on the same number); every
//! child process is killed when its guard drops, so a failing test leaves nothing running.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use streamfarm_core::{FarmList, Status};
use streamfarm_localfarm::{NodeProcess, NodeSpec, ProcessGuard, Signal, free_port};

const GOSSIP_INTERVAL_MS: u64 = 100;
const FAILURE_TIMEOUT_MS: u64 = 1_000;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_streamfarm"))
}

/// Starts node `name` on 127.0.0.`last_octet` (a free port), joining `join`, and waits until it
/// answers `/farm`.
fn start(name: &str, last_octet: u8, join: Option<SocketAddr>) -> NodeProcess {
    let listen = free_port(IpAddr::from([127, 0, 0, last_octet])).unwrap();
    let mut spec = NodeSpec::new(name, listen).flags([
        "--gossip-interval-ms",
        &GOSSIP_INTERVAL_MS.to_string(),
        "--failure-timeout-ms",
        &FAILURE_TIMEOUT_MS.to_string(),
        "--shutdown-drain-ms",
        "100",
    ]);
    spec.join.extend(join);
    let node = NodeProcess::spawn(exe(), &spec).unwrap();
    wait_serving(&node);
    node
}

fn wait_serving(node: &NodeProcess) {
    eventually(Duration::from_secs(10), "node answers /farm", || {
        farm(node.listen).is_some()
    });
}

/// `GET /farm` over a plain socket; `None` while the node does not answer.
fn farm(addr: SocketAddr) -> Option<FarmList> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET /farm HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    serde_json::from_str(body).ok()
}

fn status_of(list: &FarmList, name: &str) -> Option<Status> {
    list.servers
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.status)
}

fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn seen_as(observers: &[&NodeProcess], name: &str, status: Status) -> bool {
    observers
        .iter()
        .all(|o| farm(o.listen).is_some_and(|l| status_of(&l, name) == Some(status)))
}

fn three_nodes() -> Vec<NodeProcess> {
    let first = start("n1", 1, None);
    // Gossip shares the listen port number, so n1's listen address is also its gossip address.
    let second = start("n2", 2, Some(first.listen));
    let third = start("n3", 3, Some(first.listen));
    let nodes = vec![first, second, third];
    for node in &nodes {
        eventually(Duration::from_secs(10), "all three UP", || {
            farm(node.listen).is_some_and(|l| {
                l.servers.len() == 3 && l.servers.iter().all(|s| s.status == Status::Up)
            })
        });
    }
    nodes
}

/// The bound on detection: the configured timeout, plus slack for our poll (an HTTP round trip
/// to each observer every 20 ms) and a loaded machine's scheduling.
fn detection_bound() -> Duration {
    Duration::from_millis(FAILURE_TIMEOUT_MS + 2 * GOSSIP_INTERVAL_MS)
}

#[test]
fn a_killed_node_is_listed_down_in_time_and_up_after_restart() {
    let mut nodes = three_nodes();
    nodes[1].kill();
    let took = eventually(detection_bound(), "n2 DOWN on n1 and n3", || {
        seen_as(&[&nodes[0], &nodes[2]], "n2", Status::Down)
    });
    eprintln!("SIGKILL → listed DOWN after {took:?} (failure timeout {FAILURE_TIMEOUT_MS} ms)");
    let list = farm(nodes[0].listen).unwrap();
    let dead = list.servers.iter().find(|s| s.name == "n2").unwrap();
    assert_eq!(dead.users, 0, "a dead node holds nobody");
    nodes[1].restart(None).unwrap();
    wait_serving(&nodes[1]);
    let took = eventually(Duration::from_secs(5), "n2 UP again", || {
        seen_as(&[&nodes[0], &nodes[2]], "n2", Status::Up)
    });
    eprintln!("restart → listed UP after {took:?}");
    // The restarted node is one entry, not two generations.
    let list = farm(nodes[0].listen).unwrap();
    assert_eq!(list.servers.len(), 3);
    assert_eq!(list.servers.iter().filter(|s| s.name == "n2").count(), 1);
}

#[test]
fn a_stopped_node_is_listed_down_in_time_and_up_after_continue() {
    let nodes = three_nodes();
    nodes[2].signal(Signal::STOP).unwrap();
    let took = eventually(detection_bound(), "n3 DOWN on n1 and n2", || {
        seen_as(&[&nodes[0], &nodes[1]], "n3", Status::Down)
    });
    eprintln!("SIGSTOP → listed DOWN after {took:?} (failure timeout {FAILURE_TIMEOUT_MS} ms)");
    nodes[2].signal(Signal::CONT).unwrap();
    let took = eventually(Duration::from_secs(5), "n3 UP again", || {
        seen_as(&[&nodes[0], &nodes[1]], "n3", Status::Up)
    });
    eprintln!("SIGCONT → listed UP after {took:?}");
}

#[test]
fn sigterm_announces_down_and_exits_cleanly() {
    let mut nodes = three_nodes();
    let start = Instant::now();
    nodes[0].signal(Signal::TERM).unwrap();
    // Announced, not detected: well before the failure timeout.
    eventually(
        Duration::from_millis(FAILURE_TIMEOUT_MS - 200),
        "n1 DOWN on n2 and n3",
        || {
            seen_as(
                &[&nodes[1], &nodes[2]],
                &nodes[0].name.clone(),
                Status::Down,
            )
        },
    );
    let exit = loop {
        if let Some(status) = nodes[0].guard.exited() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "n1 did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit}");
}

#[test]
fn settings_come_from_the_environment_and_the_example_config() {
    let listen = free_port(IpAddr::from([127, 0, 0, 1])).unwrap();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../node/node.example.toml");
    let args: Vec<String> = ["serve", "--config", example, "--join", "127.0.0.1:1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let env = [
        ("STREAMFARM_NAME", "from-env".to_string()),
        ("STREAMFARM_LISTEN", listen.to_string()),
        ("STREAMFARM_GOSSIP", listen.to_string()),
        ("STREAMFARM_URL", format!("ws://{listen}/stream")),
        ("STREAMFARM_PRIORITY", "B".to_string()),
    ];
    let mut command = Command::new(exe());
    command.args(&args).envs(env);
    let mut child = ProcessGuard::spawn(command, "node from-env").unwrap();
    let found = (|| {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Some(list) = farm(listen) {
                return Some(list);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    })();
    child.kill();
    let list = found.expect("node from env answers /farm");
    let me = &list.servers[0];
    assert_eq!((me.name.as_str(), me.priority.as_str()), ("from-env", "B"));
    // From the example file, not overridden.
    assert_eq!(me.capacity, Some(50_000));
}

#[test]
fn bad_settings_are_reported_with_their_name() {
    let output = Command::new(env!("CARGO_BIN_EXE_streamfarm"))
        .args([
            "serve",
            "--name",
            "x",
            "--listen",
            "127.0.0.1:0",
            "--failure-timeout-ms",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("failure_timeout_ms"), "{stderr}");
}

#[test]
fn a_bad_relay_is_reported_with_its_name_from_the_flag_and_the_environment() {
    let serve = |flag: Option<&str>, env: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_streamfarm"));
        command.args(["serve", "--name", "x", "--listen", "127.0.0.1:0"]);
        if let Some(relay) = flag {
            command.args(["--relay", relay]);
        }
        if let Some(relay) = env {
            command.env("STREAMFARM_RELAY", relay);
        }
        let output = command.output().unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    let stderr = serve(Some("embeded"), None);
    assert!(stderr.contains("relay"), "{stderr}");
    let stderr = serve(None, Some("nats://user:hunter2@"));
    assert!(stderr.contains("relay"), "{stderr}");
    assert!(
        !stderr.contains("hunter2"),
        "no password in errors: {stderr}"
    );
}
