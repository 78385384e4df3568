//! `streamfarm serve` as real processes on 127.0.0.1 / .2 / .3: a node killed (SIGKILL) or
//! stopped (SIGSTOP) is listed DOWN by the others within the configured detection time and UP
//! again once restarted or continued; SIGTERM announces DOWN and exits cleanly; settings come from
//! the environment.
//!
//! Each test picks a port number free on all three addresses (TCP and UDP); every child process
//! is killed when its guard drops, so a failing test leaves nothing running.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use streamfarm_core::{FarmList, Status};

const GOSSIP_INTERVAL_MS: u64 = 100;
const FAILURE_TIMEOUT_MS: u64 = 1_000;
const IPS: [[u8; 4]; 3] = [[127, 0, 0, 1], [127, 0, 0, 2], [127, 0, 0, 3]];

/// A port number free for TCP and UDP on the three test addresses.
fn free_port() -> u16 {
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let free = IPS.iter().all(|ip| {
            let addr = SocketAddr::from((*ip, port));
            TcpListener::bind(addr).is_ok() && UdpSocket::bind(addr).is_ok()
        });
        if free {
            return port;
        }
    }
    panic!("no port free on 127.0.0.1-3");
}

/// A running `streamfarm serve`; killed (and reaped) on drop.
struct Node {
    name: String,
    listen: SocketAddr,
    args: Vec<String>,
    child: Child,
}

impl Node {
    fn start(name: &str, listen: SocketAddr, join: Option<SocketAddr>, extra: &[&str]) -> Node {
        let mut args: Vec<String> = [
            "serve",
            "--name",
            name,
            "--listen",
            &listen.to_string(),
            "--gossip-interval-ms",
            &GOSSIP_INTERVAL_MS.to_string(),
            "--failure-timeout-ms",
            &FAILURE_TIMEOUT_MS.to_string(),
            "--shutdown-drain-ms",
            "100",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(seed) = join {
            args.extend(["--join".to_string(), seed.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = spawn(&args, &[]);
        let node = Node {
            name: name.to_string(),
            listen,
            args,
            child,
        };
        node.wait_serving();
        node
    }

    fn wait_serving(&self) {
        eventually(Duration::from_secs(10), "node answers /farm", || {
            farm(self.listen).is_some()
        });
    }

    fn pid(&self) -> String {
        self.child.id().to_string()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.args, &[]);
        self.wait_serving();
    }

    fn kill(&mut self) {
        // A stopped process must be continued to die promptly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid()])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(args: &[String], env: &[(&str, String)]) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_streamfarm"));
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (key, value) in env {
        command.env(key, value);
    }
    command.spawn().expect("streamfarm binary runs")
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

fn seen_as(observers: &[&Node], name: &str, status: Status) -> bool {
    observers
        .iter()
        .all(|o| farm(o.listen).is_some_and(|l| status_of(&l, name) == Some(status)))
}

fn three_nodes() -> Vec<Node> {
    let port = free_port();
    let addrs: Vec<SocketAddr> = IPS.iter().map(|ip| SocketAddr::from((*ip, port))).collect();
    let first = Node::start("n1", addrs[0], None, &[]);
    // Gossip shares the listen port number, so n1's listen address is also its gossip address.
    let second = Node::start("n2", addrs[1], Some(addrs[0]), &[]);
    let third = Node::start("n3", addrs[2], Some(addrs[0]), &[]);
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
    nodes[1].child.kill().unwrap();
    let _ = nodes[1].child.wait();
    let took = eventually(detection_bound(), "n2 DOWN on n1 and n3", || {
        seen_as(&[&nodes[0], &nodes[2]], "n2", Status::Down)
    });
    eprintln!("SIGKILL → listed DOWN after {took:?} (failure timeout {FAILURE_TIMEOUT_MS} ms)");
    let list = farm(nodes[0].listen).unwrap();
    let dead = list.servers.iter().find(|s| s.name == "n2").unwrap();
    assert_eq!(dead.users, 0, "a dead node holds nobody");
    nodes[1].restart();
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
    nodes[2].signal("-STOP");
    let took = eventually(detection_bound(), "n3 DOWN on n1 and n2", || {
        seen_as(&[&nodes[0], &nodes[1]], "n3", Status::Down)
    });
    eprintln!("SIGSTOP → listed DOWN after {took:?} (failure timeout {FAILURE_TIMEOUT_MS} ms)");
    nodes[2].signal("-CONT");
    let took = eventually(Duration::from_secs(5), "n3 UP again", || {
        seen_as(&[&nodes[0], &nodes[1]], "n3", Status::Up)
    });
    eprintln!("SIGCONT → listed UP after {took:?}");
}

#[test]
fn sigterm_announces_down_and_exits_cleanly() {
    let mut nodes = three_nodes();
    let start = Instant::now();
    nodes[0].signal("-TERM");
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
        if let Some(status) = nodes[0].child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "n1 did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "exit status {exit}");
}

#[test]
fn settings_come_from_the_environment_and_the_example_config() {
    let port = free_port();
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
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
    let mut child = spawn(&args, &env);
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
    let _ = child.kill();
    let _ = child.wait();
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
