//! Shared by the client tests of the `streamfarm` binary: real nodes as child processes
//! (`streamfarm serve`) on 127.0.0.x, and a crowd of library clients that records what each saw.

#![allow(dead_code)] // Each test binary uses part of it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use streamfarm_client::{Client, ClientOptions, Event, ServiceAddress};
use streamfarm_core::{FarmList, Status};
use streamfarm_localfarm::{NodeProcess, NodeSpec, Signal, free_port};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// One real-node test at a time per test binary: the CI box has two cores.
pub(crate) static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Node timings short enough for tests: heartbeat 300/1000 ms, failure detection 1 s, drain 1 s.
pub(crate) const NODE_FLAGS: &[&str] = &[
    "--heartbeat-interval-ms",
    "300",
    "--heartbeat-timeout-ms",
    "1000",
    "--failure-timeout-ms",
    "1000",
    "--drain-period-ms",
    "1000",
    "--admin-token",
    "test-admin-token-0123",
];

pub(crate) fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_streamfarm")
}

/// A node process with [`NODE_FLAGS`]; killed when dropped. The rest of its interface is
/// [`NodeProcess`]'s (`name`, `listen`, `url()`, `kill()`, …).
pub(crate) struct Node(NodeProcess);

impl Deref for Node {
    type Target = NodeProcess;
    fn deref(&self) -> &NodeProcess {
        &self.0
    }
}

impl DerefMut for Node {
    fn deref_mut(&mut self) -> &mut NodeProcess {
        &mut self.0
    }
}

impl Node {
    /// Starts the node without waiting for it.
    pub(crate) fn start(
        name: &str,
        listen: SocketAddr,
        priority: &str,
        join: Option<SocketAddr>,
    ) -> Node {
        Node::start_as(name, listen, priority, join, None)
    }

    /// [`Node::start`], with the group id `gid` (root only): firewall rules can tell its packets
    /// apart (see `streamfarm_localfarm::partition`).
    pub(crate) fn start_as(
        name: &str,
        listen: SocketAddr,
        priority: &str,
        join: Option<SocketAddr>,
        gid: Option<u32>,
    ) -> Node {
        let mut spec = NodeSpec::new(name, listen)
            .flags(["--priority", priority])
            .flags(NODE_FLAGS);
        spec.join.extend(join);
        spec.gid = gid;
        Node(NodeProcess::spawn(Path::new(exe()), &spec).expect("start streamfarm serve"))
    }

    /// Starts the node again, same name and address, joining the farm through `join`.
    pub(crate) fn restart(&mut self, join: SocketAddr) {
        self.0
            .restart(Some(join))
            .expect("restart streamfarm serve");
    }

    /// Sends `SIGSTOP`, `SIGCONT`, … by name (`"STOP"`).
    pub(crate) fn signal(&self, signal: &str) {
        let signal = match signal {
            "STOP" => Signal::STOP,
            "CONT" => Signal::CONT,
            "TERM" => Signal::TERM,
            "KILL" => Signal::KILL,
            other => panic!("no signal {other} in the tests"),
        };
        self.0.signal(signal).expect("signal the node");
    }

    /// Sets the node's status through its admin API.
    pub(crate) async fn set_status(&self, status: &str) {
        let response = reqwest::Client::new()
            .post(format!("http://{}/admin/status", self.listen))
            .bearer_auth("test-admin-token-0123")
            .body(status.to_string())
            .send()
            .await
            .expect("admin request");
        assert!(response.status().is_success(), "{}", response.status());
    }

    /// The farm list as this node serves it.
    pub(crate) async fn farm(&self) -> Option<FarmList> {
        let address: ServiceAddress = self.listen.to_string().parse().unwrap();
        streamfarm_client::fetch_list(&address, &ClientOptions::new())
            .await
            .ok()
            .map(|(list, _)| list)
    }
}

/// A port free for TCP and UDP on `ip` (the node gossips on the same number over UDP).
pub(crate) fn free_addr(ip: [u8; 4]) -> SocketAddr {
    free_port(IpAddr::from(ip)).expect("a free port")
}

/// Polls `condition` every 50 ms until it holds or `limit` passes; true when it held.
pub(crate) async fn eventually<F, Fut>(limit: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A farm of nodes; node `i` listens on 127.0.0.(i+1) and joins the first.
pub(crate) struct Farm {
    pub(crate) nodes: Vec<Node>,
}

impl Farm {
    /// Starts one node per `(name, priority)` and waits until every node lists all of them UP.
    pub(crate) async fn start(spec: &[(&str, &str)]) -> Farm {
        Farm::start_with_gid(spec, None).await
    }

    /// [`Farm::start`], node `i` of `gid` running with group id `gid.1` (see [`Node::start_as`]).
    pub(crate) async fn start_with_gid(spec: &[(&str, &str)], gid: Option<(usize, u32)>) -> Farm {
        let mut nodes: Vec<Node> = Vec::new();
        for (i, (name, priority)) in spec.iter().enumerate() {
            let listen = free_addr([127, 0, 0, i as u8 + 1]);
            let join = nodes.first().map(|n| n.listen);
            let node_gid = gid.filter(|(which, _)| *which == i).map(|(_, g)| g);
            nodes.push(Node::start_as(name, listen, priority, join, node_gid));
        }
        let farm = Farm { nodes };
        let ready = eventually(Duration::from_secs(20), || {
            farm.all_see(spec.len(), Status::Up)
        })
        .await;
        assert!(ready, "the farm did not come up");
        farm
    }

    /// Every running node lists `n` servers with `status`.
    async fn all_see(&self, n: usize, status: Status) -> bool {
        for node in &self.nodes {
            match node.farm().await {
                Some(list) if list.servers.iter().filter(|s| s.status == status).count() == n => {}
                _ => return false,
            }
        }
        true
    }

    pub(crate) fn seeds(&self) -> ServiceAddress {
        let seeds: Vec<String> = self.nodes.iter().map(|n| n.listen.to_string()).collect();
        seeds.join(",").parse().unwrap()
    }

    pub(crate) fn node(&mut self, url: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.url() == url)
            .expect("a node of the farm")
    }
}

/// What one client saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct Seen {
    pub(crate) server: Option<String>,
    pub(crate) messages: Vec<String>,
    pub(crate) failovers: Vec<(String, String, Duration)>,
    /// Moves at a node's request (make-before-break): from, to, reason.
    pub(crate) migrations: Vec<(String, String, String)>,
    pub(crate) retries: u32,
    /// `Recovered` events (one per topic per resubscription).
    pub(crate) recovered: u32,
    /// `Gap` events.
    pub(crate) gaps: u32,
    /// Why each connection ended, in order.
    pub(crate) losses: Vec<String>,
    /// Each `Feed` event's `complete`, in order.
    pub(crate) feeds: Vec<bool>,
}

/// Library clients in this process, each in a task recording what it saw.
pub(crate) struct Crowd {
    pub(crate) seen: Vec<Arc<Mutex<Seen>>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Crowd {
    pub(crate) fn new() -> Crowd {
        Crowd {
            seen: Vec::new(),
            stop: watch::channel(false).0,
            tasks: JoinSet::new(),
        }
    }

    /// Starts `n` clients at `per_second`, as users arrive rather than all in one instant.
    pub(crate) async fn arrive(
        &mut self,
        n: usize,
        per_second: u32,
        service: &ServiceAddress,
        options: &ClientOptions,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
        for _ in 0..n {
            tick.tick().await;
            self.add(1, service, options);
        }
    }

    /// Starts `n` clients of `service` with `options`.
    pub(crate) fn add(&mut self, n: usize, service: &ServiceAddress, options: &ClientOptions) {
        for _ in 0..n {
            let seen = Arc::new(Mutex::new(Seen::default()));
            self.seen.push(seen.clone());
            let mut client = Client::start(service.clone(), options.clone());
            let mut stop = self.stop.subscribe();
            self.tasks.spawn(async move {
                loop {
                    let event = tokio::select! {
                        event = client.next_event() => event,
                        _ = stop.wait_for(|s| *s) => break,
                    };
                    let Some(event) = event else { break };
                    let mut seen = seen.lock().unwrap();
                    match event {
                        Event::Connected { server, .. } => seen.server = Some(server),
                        Event::Disconnected { server, cause } => {
                            seen.server = None;
                            seen.losses.push(format!("{server}: {cause}"));
                        }
                        Event::FailedOver { from, to, took } => {
                            seen.failovers.push((from, to, took))
                        }
                        Event::Migrated {
                            from, to, reason, ..
                        } => {
                            seen.server = Some(to.clone());
                            seen.migrations.push((from, to, reason));
                        }
                        Event::Message { payload, .. } => seen
                            .messages
                            .push(String::from_utf8_lossy(&payload).into_owned()),
                        Event::Retrying { .. } => seen.retries += 1,
                        Event::Recovered { .. } => seen.recovered += 1,
                        Event::Gap { .. } => seen.gaps += 1,
                        Event::Feed { complete, .. } => seen.feeds.push(complete),
                        _ => {}
                    }
                }
                client.close().await;
            });
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<Seen> {
        self.seen
            .iter()
            .map(|s| s.lock().unwrap().clone())
            .collect()
    }

    /// Clients connected now, per server url.
    pub(crate) fn per_server(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for seen in self.snapshot() {
            if let Some(server) = seen.server {
                *counts.entry(server).or_default() += 1;
            }
        }
        counts
    }

    /// Waits until all clients are connected.
    pub(crate) async fn all_connected(&self, limit: Duration) -> bool {
        eventually(limit, || async {
            self.snapshot().iter().all(|s| s.server.is_some())
        })
        .await
    }

    pub(crate) async fn stop(mut self) {
        self.stop.send_replace(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
    }
}

/// Publishes `message` on `topic` through `node`.
pub(crate) async fn publish(node: &Node, topic: &str, message: &str) {
    let address: ServiceAddress = node.listen.to_string().parse().unwrap();
    streamfarm_client::publish(
        &address,
        &ClientOptions::new(),
        topic,
        message.as_bytes().to_vec(),
    )
    .await
    .expect("publish");
}

/// Publishes numbered messages (`n 0`, `n 1`, …) on a topic at a steady pace through the given
/// nodes (the next one whenever a publish fails), and keeps the numbers the farm acknowledged.
pub(crate) struct Publisher {
    acked: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    pub(crate) fn start(via: Vec<SocketAddr>, topic: &str, every: Duration) -> Publisher {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (acked, topic) = (acked.clone(), topic.to_string());
            async move {
                let http = reqwest::Client::new();
                let mut tick = tokio::time::interval(every);
                let mut node = 0;
                for n in 0u64.. {
                    tick.tick().await;
                    // Until acknowledged or given up: a publish that failed was not published.
                    for _attempt in 0..via.len() * 2 {
                        let sent = http
                            .post(format!("http://{}/publish/{topic}", via[node % via.len()]))
                            .header("idempotency-key", format!("{topic}-{n}"))
                            .body(format!("n {n}"))
                            .timeout(Duration::from_secs(5))
                            .send()
                            .await;
                        if sent.is_ok_and(|r| r.status().is_success()) {
                            acked.lock().unwrap().push(n);
                            break;
                        }
                        node += 1;
                    }
                }
            }
        });
        Publisher { acked, task }
    }

    /// The numbers acknowledged so far.
    pub(crate) fn acked(&self) -> Vec<u64> {
        self.acked.lock().unwrap().clone()
    }

    /// Stops publishing; returns every number acknowledged.
    pub(crate) fn stop(self) -> Vec<u64> {
        self.task.abort();
        self.acked()
    }
}

/// What went wrong with one client's messages against the numbers `acked`: from the first number
/// it received on, every acknowledged number exactly once and in order. `None` when all is well.
pub(crate) fn losses(seen: &Seen, acked: &[u64]) -> Option<String> {
    let got: Vec<u64> = seen
        .messages
        .iter()
        .filter_map(|m| m.strip_prefix("n ")?.parse().ok())
        .collect();
    let first = *got.first()?;
    let expected: Vec<u64> = acked.iter().copied().filter(|n| *n >= first).collect();
    let mut sorted = got.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let lost: Vec<u64> = expected
        .iter()
        .filter(|n| sorted.binary_search(n).is_err())
        .copied()
        .collect();
    let duplicated = got.len() - sorted.len();
    let out_of_order = got.windows(2).filter(|w| w[1] < w[0]).count();
    (!lost.is_empty() || duplicated > 0 || out_of_order > 0 || seen.gaps > 0).then(|| {
        format!(
            "lost {lost:?}, {duplicated} duplicated, {out_of_order} out of order, {} gaps",
            seen.gaps
        )
    })
}
