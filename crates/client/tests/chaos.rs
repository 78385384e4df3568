//! A farm in this process through random kills, hangs and restarts of its nodes while messages are
//! published: every client receives, per topic, the published sequence — each acknowledged
//! message once, in order — or that sequence with a gap it was told about. Nothing else.
//!
//! Nodes are `streamfarm_node::NodeHandle`s on 127.0.0.1–3 with fast timers, each on a runtime
//! and thread of its own. A kill drops the node's runtime at once, as `SIGKILL` ends a process
//! (its sockets close, its gossip stops; the farm lists it `DOWN` after the failure timeout); a
//! hang blocks its thread for a while, as `SIGSTOP` would: its sockets stay open and nothing
//! answers, then it carries on with what it knew; a restart starts a new node of the same name
//! on a new port. At most one node is down or hung at a time (the guarantee is for the loss of
//! any one node). The publisher numbers
//! its messages, sends each again through another node until one acknowledges it (under the same
//! `Idempotency-Key`), and keeps the position each acknowledged one got, so a client's `Gap`
//! events can be checked against exactly the messages they name.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use streamfarm_client::{Client, ClientOptions, Epoch, Event, Position, ServiceAddress};
use streamfarm_core::FarmList;
use streamfarm_node::{NodeConfig, NodeHandle};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

mod support;
use support::eventually;

const TOPIC: &str = "chaos";
const NODES: usize = 3;

fn config(name: &str, i: usize, join: Option<SocketAddr>) -> NodeConfig {
    let mut config = NodeConfig::new(name);
    config.listen = SocketAddr::from(([127, 0, 0, i as u8 + 1], 0));
    config.join = join.iter().map(|a| a.to_string()).collect();
    config.gossip_interval_ms = 50;
    config.failure_timeout_ms = 1_000;
    config.heartbeat_interval_ms = 300;
    config.heartbeat_timeout_ms = 1_000;
    config.shutdown_drain_ms = 100;
    config
}

/// What happens to the farm, one step after another.
#[derive(Debug, Clone)]
enum Step {
    /// Drop node `i` (if every node is up).
    Kill(usize),
    /// Start the dead node again.
    Restart,
    /// Block node `i` for this many milliseconds (if every node is up and none hangs).
    Hang(usize, u64),
    /// Let messages flow for this many milliseconds.
    Flow(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..NODES).prop_map(Step::Kill),
        Just(Step::Restart),
        (0..NODES, 500u64..2500).prop_map(|(i, ms)| Step::Hang(i, ms)),
        (100u64..800).prop_map(Step::Flow),
    ]
}

/// What one client saw: messages with their positions, and gaps.
#[derive(Debug, Default)]
struct Seen {
    messages: Vec<(u64, Option<Position>)>,
    gaps: Vec<(Epoch, u64, Option<u64>)>,
}

/// A node on a runtime and thread of its own, so that it can hang as a stopped process does.
struct Node {
    name: String,
    url: String,
    listen: SocketAddr,
    gossip: SocketAddr,
    farm: watch::Receiver<FarmList>,
    runtime: tokio::runtime::Handle,
    /// Stops the node: its runtime is dropped at once, as `SIGKILL` would end a process.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Node {
    fn start(config: NodeConfig) -> Node {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let node = NodeHandle::start(config).await.expect("node starts");
                let (stop_tx, stop_rx) = oneshot::channel::<()>();
                let _ = ready_tx.send((
                    node.name().to_string(),
                    node.url().to_string(),
                    node.listen_addr(),
                    node.gossip_addr(),
                    node.farm(),
                    tokio::runtime::Handle::current(),
                    stop_tx,
                ));
                let _ = stop_rx.await;
                drop(node);
            });
            // The runtime goes with the thread: every task of the node ends, its sockets close.
        });
        let (name, url, listen, gossip, farm, runtime, stop) =
            ready_rx.recv().expect("the node's thread started it");
        Node {
            name,
            url,
            listen,
            gossip,
            farm,
            runtime,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Blocks the node's only thread for `span`: it reads, writes and decides nothing meanwhile.
    /// Returns once the block has begun.
    async fn hang(&self, span: Duration) {
        let (started_tx, started_rx) = oneshot::channel();
        self.runtime.spawn(async move {
            let _ = started_tx.send(());
            std::thread::sleep(span);
        });
        let _ = started_rx.await;
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Farm {
    nodes: Vec<Option<Node>>,
    /// Until when a node hangs.
    hung_until: Option<Instant>,
}

impl Farm {
    async fn start() -> Farm {
        let mut nodes: Vec<Option<Node>> = Vec::new();
        for i in 0..NODES {
            let join = nodes.first().and_then(|n| n.as_ref()).map(|n| n.gossip);
            let config = config(&format!("n{i}"), i, join);
            let node = tokio::task::spawn_blocking(move || Node::start(config))
                .await
                .expect("node thread");
            nodes.push(Some(node));
        }
        let farm = Farm {
            nodes,
            hung_until: None,
        };
        farm.wait_all_up().await;
        farm
    }

    fn live(&self) -> Vec<&Node> {
        self.nodes.iter().flatten().collect()
    }

    fn hanging(&self) -> bool {
        self.hung_until.is_some_and(|until| Instant::now() < until)
    }

    async fn wait_all_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let live = self.live();
            let all = live.iter().all(|n| {
                let list = n.farm.borrow();
                live.iter().all(|m| {
                    list.servers
                        .iter()
                        .any(|s| s.name == m.name && s.url == m.url && s.status.as_str() == "UP")
                })
            });
            if all {
                return;
            }
            assert!(Instant::now() < deadline, "the farm did not settle");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn apply(&mut self, step: &Step) {
        match step {
            Step::Kill(i) if self.nodes.iter().all(Option::is_some) && !self.hanging() => {
                let node = self.nodes[*i].take();
                tokio::task::spawn_blocking(move || drop(node))
                    .await
                    .expect("node stopped");
            }
            Step::Hang(i, ms) if self.nodes.iter().all(Option::is_some) && !self.hanging() => {
                let span = Duration::from_millis(*ms);
                let Some(node) = &self.nodes[*i] else { return };
                node.hang(span).await;
                self.hung_until = Some(Instant::now() + span);
                // Hung for real: its health check, which a live node answers in a millisecond,
                // gets no answer.
                let health = reqwest::Client::new()
                    .get(format!("http://{}/healthz", node.listen))
                    .timeout(Duration::from_millis(200))
                    .send()
                    .await;
                assert!(health.is_err(), "a hung node answered: {health:?}");
            }
            Step::Restart => {
                let Some(i) = self.nodes.iter().position(Option::is_none) else {
                    return;
                };
                let join = self.live().first().map(|n| n.gossip);
                let config = config(&format!("n{i}"), i, join);
                let node = tokio::task::spawn_blocking(move || Node::start(config))
                    .await
                    .expect("node thread");
                self.nodes[i] = Some(node);
                self.wait_all_up().await;
            }
            Step::Flow(ms) => tokio::time::sleep(Duration::from_millis(*ms)).await,
            Step::Kill(_) | Step::Hang(..) => {}
        }
    }
}

/// Publishes `n 0`, `n 1`, … through the live nodes (over HTTP, the next node on failure) and
/// keeps the position of each acknowledged one.
fn publisher(
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
) -> (
    Arc<Mutex<BTreeMap<u64, Position>>>,
    tokio::task::JoinHandle<()>,
) {
    let acked = Arc::new(Mutex::new(BTreeMap::new()));
    let task = tokio::spawn({
        let acked = acked.clone();
        async move {
            let http = reqwest::Client::new();
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut k = 0usize;
            for n in 0u64.. {
                tick.tick().await;
                let targets = addrs.lock().unwrap().clone();
                for _ in 0..targets.len() * 2 {
                    let addr = targets[k % targets.len()];
                    let answer = http
                        .post(format!("http://{addr}/publish/{TOPIC}"))
                        // Sent again through another node when its node dies before answering:
                        // the key keeps it from being published twice.
                        .header("idempotency-key", format!("chaos-{n}"))
                        .body(format!("n {n}"))
                        .timeout(Duration::from_secs(5))
                        .send()
                        .await;
                    let position = match answer {
                        Ok(r) if r.status().is_success() => r.text().await.ok().and_then(|body| {
                            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
                            Some(Position::new(
                                v["epoch"].as_str()?.parse().ok()?,
                                v["offset"].as_u64()?,
                            ))
                        }),
                        _ => None,
                    };
                    if let Some(position) = position {
                        acked.lock().unwrap().insert(n, position);
                        break;
                    }
                    k += 1;
                }
            }
        }
    });
    (acked, task)
}

/// What is wrong with what `seen` received, given what was acknowledged.
fn problems(seen: &Seen, acked: &BTreeMap<u64, Position>) -> Vec<String> {
    let mut out = Vec::new();
    let numbers: Vec<u64> = seen.messages.iter().map(|(n, _)| *n).collect();
    if let Some(w) = seen.messages.windows(2).find(|w| w[1].0 <= w[0].0) {
        out.push(format!(
            "{} (at {:?}) came after {} (at {:?})",
            w[1].0, w[1].1, w[0].0, w[0].1
        ));
    }
    let Some(first) = numbers.first() else {
        return vec!["received nothing".into()];
    };
    let told = |p: &Position| {
        seen.gaps.iter().any(|(epoch, from, to)| {
            *epoch == p.epoch && p.offset >= *from && to.is_none_or(|to| p.offset <= to)
        })
    };
    for (n, position) in acked.range(first..) {
        if numbers.binary_search(n).is_err() && !told(position) {
            out.push(format!("message {n} (at {position}) lost without a gap"));
        }
    }
    out
}

async fn run(steps: Vec<Step>) {
    // `RUST_LOG=streamfarm_node=info` shows what the nodes did.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut farm = Farm::start().await;
    let addrs = Arc::new(Mutex::new(
        farm.live().iter().map(|n| n.listen).collect::<Vec<_>>(),
    ));
    let seeds: ServiceAddress = addrs
        .lock()
        .unwrap()
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .unwrap();
    let mut clients = Vec::new();
    for i in 0..6 {
        let options = ClientOptions::new()
            .subscribe([TOPIC])
            .seed(i)
            .connect_timeout(Duration::from_millis(500));
        let mut client = Client::start(seeds.clone(), options);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let recorder = seen.clone();
        client
            .wait_connected(Duration::from_secs(10))
            .await
            .expect("client connects");
        let task = tokio::spawn(async move {
            while let Some(event) = client.next_event().await {
                let mut seen = recorder.lock().unwrap();
                match event {
                    Event::Message {
                        payload, position, ..
                    } => {
                        let text = String::from_utf8_lossy(&payload).into_owned();
                        if let Some(n) = text.strip_prefix("n ").and_then(|n| n.parse().ok()) {
                            seen.messages.push((n, position));
                        }
                    }
                    Event::Gap {
                        epoch, from, to, ..
                    } => seen.gaps.push((epoch, from, to)),
                    _ => {}
                }
            }
        });
        clients.push((seen, task));
    }
    let (acked, publisher) = publisher(addrs.clone());
    eventually(
        Duration::from_secs(10),
        "every client received a message",
        || {
            clients
                .iter()
                .all(|(seen, _)| !seen.lock().unwrap().messages.is_empty())
        },
    )
    .await;
    for step in &steps {
        farm.apply(step).await;
        *addrs.lock().unwrap() = farm.live().iter().map(|n| n.listen).collect();
    }
    // A hang ends, and a dead node comes back, before the count.
    if let Some(until) = farm.hung_until {
        tokio::time::sleep_until(until).await;
    }
    farm.apply(&Step::Restart).await;
    *addrs.lock().unwrap() = farm.live().iter().map(|n| n.listen).collect();
    // The farm publishes on, whole again, before the count.
    let before = acked.lock().unwrap().len();
    eventually(
        Duration::from_secs(10),
        "publishes acknowledged after the restart",
        || acked.lock().unwrap().len() >= before + 20,
    )
    .await;
    publisher.abort();
    let acked = acked.lock().unwrap().clone();
    let last = *acked.keys().last().expect("messages acknowledged");
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline
        && !clients.iter().all(|(seen, _)| {
            let seen = seen.lock().unwrap();
            seen.messages.iter().any(|(n, _)| *n == last)
                || problems(&seen, &acked)
                    .iter()
                    .any(|p| p.contains("came after"))
        })
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report: Vec<String> = clients
        .iter()
        .enumerate()
        .flat_map(|(i, (seen, _))| {
            problems(&seen.lock().unwrap(), &acked)
                .into_iter()
                .map(move |p| format!("client {i}: {p}"))
        })
        .collect();
    for (_, task) in clients {
        task.abort();
    }
    tokio::task::spawn_blocking(move || drop(farm.nodes))
        .await
        .expect("nodes stopped");
    eprintln!(
        "{steps:?}: {} messages acknowledged, every client checked",
        acked.len()
    );
    assert!(
        report.is_empty(),
        "{} acknowledged (last {last}); after {steps:?}:\n{}",
        acked.len(),
        report.join("\n")
    );
}

proptest! {
    // Each case runs a real farm for seconds: a few cases, each a different story.
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, .. ProptestConfig::default() })]
    #[test]
    fn every_client_gets_the_published_sequence_or_a_gap_it_was_told(
        first in prop_oneof![
            (0..NODES).prop_map(Step::Kill),
            (0..NODES, 500u64..2500).prop_map(|(i, ms)| Step::Hang(i, ms)),
        ],
        rest in proptest::collection::vec(step(), 1..6)
    ) {
        // Every story starts with a kill or a hang.
        let mut steps = vec![Step::Flow(200), first];
        steps.extend(rest);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(steps));
    }
}

/// A story this test found (one run in about 13 failed): n0, the topic's first-ranked node, is
/// killed twice and restarted; when it returns, n2 (which sequenced meanwhile) stops and n0
/// claims; n1, the replica, is killed at once. n0 continued from n2's delivery stream, whose
/// entries lack the publishers' keys, so a publish retried through another node was numbered
/// twice. Fixed: a node that stopped sequencing fills the publish ids of what its stream
/// delivered from what it numbered (`Core::best_state`). Run a dozen times.
#[test]
fn a_returning_sequencer_with_its_replica_killed_numbers_no_publish_twice() {
    let steps = vec![
        Step::Flow(200),
        Step::Kill(0),
        Step::Restart,
        Step::Kill(0),
        Step::Restart,
        Step::Kill(1),
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for _ in 0..12 {
        runtime.block_on(run(steps.clone()));
    }
}
