//! Convergence: how long a change of one node's users or status takes to reach every node of a
//! farm of N (3, 10, 50, 100), and how long a SIGKILLed node takes to be listed DOWN everywhere.
//!
//! The nodes are N `streamfarm serve` child processes on 127.0.1.1 … 127.0.1.N, all joining
//! through the first, with the default gossip (100 ms rounds, 2 s failure timeout). One process
//! per node because every node keeps a relay link to every other: at 100 nodes that is ~10 000
//! WebSockets, two descriptors each, which would not fit one process's RLIMIT_NOFILE here. To keep
//! 100 nodes feasible on 2 cores, farms above 10 nodes run each node on one Tokio worker thread
//! (`TOKIO_WORKER_THREADS=1`).
//!
//! Observation: this process holds one WebSocket per node with `{"type":"list","watch":true,"users":true}`,
//! so each node pushes its farm list whenever it changes; a change has reached a node when that
//! node's pushed list shows it. Changes: a new client connection to node k (users + 1), `POST
//! /admin/status DOWN` on node k (then `UP` again), and SIGKILL of node k (failure detection).
//!
//! A watch the node closes (a node starved of CPU closes it for heartbeat timeout: it did not get
//! to read the pings in time) is opened again and counted (`watches_reopened`); a phase that
//! fails says how many nodes did not agree and, for the first few, what their last list showed
//! and why their watch ended.
//!
//! Also: `settle_ms`, from every node ready to every node listing every node UP;
//! `udp_rcvbuf_dropped_msgs`, the datagrams the kernel dropped on full socket receive buffers
//! during the farm's life (machine-wide: /proc/net/snmp `RcvbufErrors`) — gossip that does not
//! settle loses its datagrams there; and `nodes_cpu_cores` and `bench_cpu_cores`, the cores the
//! nodes and this process used while watched (the nodes' own gossip, relay links and lists: on a
//! shared machine, what they could get).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::proc::{NodeProc, NodeSpec, cpu_seconds, free_port, http, poll};
use crate::report::{RowBuilder, Section, quantile};
use crate::wire::ws_connect;
use crate::{Options, STREAMFARM};

const TOKEN: &str = "bench-admin-token-0123";
/// The `Authorization` header value of [`TOKEN`].
const BEARER: &str = "Bearer bench-admin-token-0123";
/// Longest wait for one change to reach every node.
const REACH: Duration = Duration::from_secs(30);

/// A change being watched for.
#[derive(Debug, Clone)]
enum Probe {
    UsersAtLeast(String, u64),
    Status(String, &'static str),
}

impl Probe {
    fn seen_in(&self, view: &HashMap<String, (String, u64)>) -> bool {
        match self {
            Probe::UsersAtLeast(name, n) => view.get(name).is_some_and(|(_, u)| u >= n),
            Probe::Status(name, status) => view.get(name).is_some_and(|(s, _)| s == status),
        }
    }
}

/// Every node's latest pushed list and when each saw the current probe.
#[derive(Debug, Default)]
struct Views {
    latest: Vec<HashMap<String, (String, u64)>>,
    /// Lists each node has pushed so far.
    pushes: Vec<u64>,
    /// Why each node's watch last ended (its error, or the node's close); it is opened again.
    ended: Vec<Option<String>>,
    /// Times each node's watch was opened again.
    reopened: Vec<u64>,
    probe: Option<Probe>,
    seen: Vec<Option<Instant>>,
}

impl Views {
    fn new(n: usize) -> Self {
        Views {
            latest: vec![HashMap::new(); n],
            pushes: vec![0; n],
            ended: vec![None; n],
            reopened: vec![0; n],
            probe: None,
            seen: vec![None; n],
        }
    }

    fn update(&mut self, i: usize, view: HashMap<String, (String, u64)>) {
        if let Some(probe) = &self.probe
            && self.seen[i].is_none()
            && probe.seen_in(&view)
        {
            self.seen[i] = Some(Instant::now());
        }
        self.latest[i] = view;
        self.pushes[i] += 1;
    }

    /// Why a wait failed: how many nodes do not `agree`, and for the first few what their last
    /// list showed (`shows`), how many lists they pushed, and how their watch ended if it did.
    fn disagreeing(
        &self,
        agrees: impl Fn(usize, &HashMap<String, (String, u64)>) -> bool,
        shows: impl Fn(&HashMap<String, (String, u64)>) -> String,
    ) -> String {
        let behind: Vec<usize> = (0..self.latest.len())
            .filter(|&i| !agrees(i, &self.latest[i]))
            .collect();
        let ended = self.ended.iter().filter(|e| e.is_some()).count();
        let mut out = format!(
            "{} of {} nodes do not agree ({ended} watches ended and were opened again)",
            behind.len(),
            self.latest.len()
        );
        for &i in behind.iter().take(5) {
            let _ = write!(
                out,
                "; n{i}: {} lists pushed, the last shows {}",
                self.pushes[i],
                shows(&self.latest[i])
            );
            if let Some(end) = &self.ended[i] {
                let _ = write!(
                    out,
                    ", watch opened again {} times, last ended: {end}",
                    self.reopened[i]
                );
            }
        }
        if let Some((i, end)) = self
            .ended
            .iter()
            .enumerate()
            .find_map(|(i, e)| e.as_ref().map(|e| (i, e)))
            .filter(|(i, _)| !behind.iter().take(5).any(|b| b == i))
        {
            let _ = write!(out, "; the watch of n{i} ended: {end}");
        }
        out
    }
}

/// What a list shows of `names` that are not `UP` in it (at most 5 named), and how many it lists.
fn not_up(view: &HashMap<String, (String, u64)>, names: &[String]) -> String {
    let missing: Vec<String> = names
        .iter()
        .filter_map(|name| match view.get(name) {
            Some((status, _)) if status == "UP" => None,
            Some((status, _)) => Some(format!("{name} {status}")),
            None => Some(format!("{name} absent")),
        })
        .collect();
    format!(
        "{} servers, {} not UP ({})",
        view.len(),
        missing.len(),
        missing
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// What a list shows of server `name`.
fn entry_of(view: &HashMap<String, (String, u64)>, name: &str) -> String {
    match view.get(name) {
        Some((status, users)) => format!("{name} {status} with {users} users"),
        None => format!("no {name}"),
    }
}

type Shared = Arc<Mutex<Views>>;

fn lock(views: &Shared) -> std::sync::MutexGuard<'_, Views> {
    views.lock().unwrap_or_else(|e| e.into_inner())
}

fn parse_farm(text: &str) -> Option<HashMap<String, (String, u64)>> {
    let value: serde_json::Value = serde_json::from_str(text).ok()?;
    let servers = value.get("servers")?.as_array()?;
    Some(
        servers
            .iter()
            .filter_map(|s| {
                Some((
                    s.get("name")?.as_str()?.to_string(),
                    (
                        s.get("status")?.as_str()?.to_string(),
                        s.get("users")?.as_u64()?,
                    ),
                ))
            })
            .collect(),
    )
}

/// Watches node `i`'s pushed lists until aborted. A watch that ends (a node too starved of CPU to
/// read the watcher's pings closes it for heartbeat timeout) is recorded and opened again: the
/// node answers a new watch with its current list, so no change is missed, only seen late.
async fn watcher(i: usize, addr: SocketAddr, views: Shared) {
    loop {
        let end = match watch(i, addr, &views).await {
            Ok(never) => match never {},
            Err(err) => format!("{err:#}"),
        };
        {
            let mut views = lock(&views);
            views.ended[i] = Some(end);
            views.reopened[i] += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Follows node `i`'s pushed lists, pinging every second to stay alive; returns only on failure.
async fn watch(
    i: usize,
    addr: SocketAddr,
    views: &Shared,
) -> anyhow::Result<std::convert::Infallible> {
    let mut ws = ws_connect(addr, None, 256 * 1024).await?;
    ws.send(Message::text(
        r#"{"type":"list","watch":true,"users":true}"#,
    ))
    .await?;
    let mut ping = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ping.tick() => ws.send(Message::text(r#"{"type":"ping"}"#)).await?,
            message = ws.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    if text.contains("\"type\":\"farm\"") {
                        if let Some(view) = parse_farm(text.as_str()) {
                            lock(views).update(i, view);
                        }
                    } else if text.contains("\"type\":\"ping\"") {
                        ws.send(Message::text(text.replace("\"ping\"", "\"pong\""))).await?;
                    }
                }
                Some(Ok(Message::Close(frame))) => anyhow::bail!("node {addr} closed the watch: {frame:?}"),
                Some(Ok(_)) => {}
                Some(Err(err)) => return Err(anyhow::Error::new(err).context(format!("watch of {addr}"))),
                None => anyhow::bail!("node {addr} ended the watch without a close"),
            },
        }
    }
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Section> {
    if options.in_process {
        return crate::gossip::run(options).await;
    }
    crate::proc::raise_nofile();
    let mut section = Section::default();
    for &n in &options.farm_sizes {
        // A farm that does not converge is a failed row; the other farm sizes still run.
        let row = match farm_once(options, n).await {
            Ok(row) => row,
            Err(err) => RowBuilder::default().finish(
                STREAMFARM,
                format!("N={n}"),
                Err(err.context(format!("farm of {n}"))),
            ),
        };
        section.rows.push(row);
    }
    for row in &section.rows {
        let every = ["users_every_node_ms", "status_every_node_ms"]
            .iter()
            .filter_map(|f| row.figures.get(*f).map(|f| f.max))
            .fold(f64::NAN, f64::max);
        let target = if row.setting == "N=3" {
            Some(1000.0)
        } else if row.setting == "N=100" {
            Some(2000.0)
        } else {
            None
        };
        if let Some(target) = target {
            section.notes.push(format!(
                "{}: slowest change to reach every node {every:.0} ms (worst run); target <= {target:.0} ms: {}",
                row.setting,
                if every <= target { "met" } else { "NOT met" }
            ));
        }
    }
    section.notes.push(
        "no nats-server row: its cluster has no per-server users/status list to converge (clients learn only urls)"
            .to_string(),
    );
    Ok(section)
}

/// The kernel's count of UDP datagrams dropped because a socket's receive buffer was full
/// (`RcvbufErrors` of /proc/net/snmp): machine-wide, so other processes' drops count too.
fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(at)?.parse().ok()
}

async fn farm_once(options: &Options, n: usize) -> anyhow::Result<crate::Row> {
    let drops_before = udp_rcvbuf_errors();
    let mut nodes = Vec::new();
    let ip = |i: usize| IpAddr::V4(Ipv4Addr::new(127, 0, 1, 1 + i as u8));
    for i in 0..n {
        let mut spec = NodeSpec::new(format!("n{i}"), free_port(ip(i))?);
        spec.extra = vec!["--admin-token".into(), TOKEN.into()];
        if let Some(ms) = options.gossip_interval_ms {
            spec.extra
                .extend(["--gossip-interval-ms".into(), ms.to_string()]);
        }
        if n > 10 {
            spec.workers = Some(1);
        }
        if let Some(first) = nodes.first() {
            let first: &NodeProc = first;
            spec.join = vec![first.listen];
        }
        nodes.push(NodeProc::spawn(&options.exe, &spec)?);
    }
    for node in &mut nodes {
        node.wait_ready(Duration::from_secs(60)).await?;
    }
    let views: Shared = Arc::new(Mutex::new(Views::new(n)));
    let watching = Instant::now();
    let nodes_cpu = farm_cpu(&nodes);
    let own_cpu = cpu_seconds(std::process::id());
    let mut watchers = JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        watchers.spawn(watcher(i, node.listen, views.clone()));
    }
    let names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    let settling = Instant::now();
    poll(
        "every node lists every node UP",
        Duration::from_secs(30 + n as u64),
        Duration::from_millis(100),
        || {
            let all = lock(&views).latest.iter().all(|v| {
                names
                    .iter()
                    .all(|name| v.get(name).is_some_and(|(s, _)| s == "UP"))
            });
            async move { all.then_some(()) }
        },
    )
    .await
    .with_context(|| {
        lock(&views).disagreeing(
            |_, v| {
                names
                    .iter()
                    .all(|name| v.get(name).is_some_and(|(s, _)| s == "UP"))
            },
            |v| not_up(v, &names),
        )
    })?;

    let mut row = RowBuilder::default();
    row.add("settle_ms", settling.elapsed().as_secs_f64() * 1000.0);
    let repeats = options.repeats;
    let mut alive: Vec<bool> = vec![true; n];
    for r in 0..repeats {
        let k = (1 + r) % n;
        let name = names[k].clone();
        // Users: wait until every node agrees on k's users, then connect one more client.
        let users = poll(
            "nodes agree on users",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let views = lock(&views);
                let counts: Vec<u64> = views
                    .latest
                    .iter()
                    .map(|v| v.get(&name).map_or(u64::MAX, |(_, u)| *u))
                    .collect();
                let agreed = counts.windows(2).all(|w| w[0] == w[1]).then(|| counts[0]);
                async move { agreed }
            },
        )
        .await
        .with_context(|| {
            let views = lock(&views);
            let first = views.latest[0].get(&name).map(|(_, u)| *u);
            views.disagreeing(
                |_, v| v.get(&name).map(|(_, u)| *u) == first,
                |v| entry_of(v, &name),
            )
        })?;
        let addr = nodes[k].listen;
        let (times, extra) = measure(
            &views,
            &alive,
            Probe::UsersAtLeast(name.clone(), users + 1),
            || async { ws_connect(addr, None, 4096).await },
        )
        .await?;
        record(&mut row, "users", &times);
        drop(extra);

        // Status: DOWN by the admin API, then back UP.
        let set = |status: &'static str| async move {
            http(
                addr,
                "POST",
                "/admin/status",
                &[("Authorization", BEARER)],
                status,
            )
            .await
        };
        let (times, _) = measure(&views, &alive, Probe::Status(name.clone(), "DOWN"), || {
            set("DOWN")
        })
        .await?;
        record(&mut row, "status", &times);
        set("UP").await?;
        let (_, _) = measure(
            &views,
            &alive,
            Probe::Status(name.clone(), "UP"),
            || async { anyhow::Ok(()) },
        )
        .await?;
    }
    // Watches opened again, and cores the nodes and this process used while watched, until the
    // kills below (the watches of killed nodes end for good).
    let reopened: u64 = lock(&views).reopened.iter().sum();
    row.add("watches_reopened", reopened as f64);
    let wall = watching.elapsed().as_secs_f64();
    if let (Some(before), Some(after)) = (nodes_cpu, farm_cpu(&nodes)) {
        row.add("nodes_cpu_cores", (after - before) / wall);
    }
    if let (Ok(before), Ok(after)) = (own_cpu, cpu_seconds(std::process::id())) {
        row.add("bench_cpu_cores", (after - before) / wall);
    }
    // Failure detection: SIGKILL, no goodbye.
    for r in 0..repeats.min(n - 1) {
        let k = n - 1 - r;
        alive[k] = false;
        let name = names[k].clone();
        let node = &mut nodes[k];
        let (times, _) = measure(&views, &alive, Probe::Status(name, "DOWN"), || {
            node.guard.kill();
            async { anyhow::Ok(()) }
        })
        .await?;
        record(&mut row, "detect", &times);
    }
    watchers.abort_all();
    if let (Some(before), Some(after)) = (drops_before, udp_rcvbuf_errors()) {
        row.add(
            "udp_rcvbuf_dropped_msgs",
            after.saturating_sub(before) as f64,
        );
    }
    Ok(row.build(STREAMFARM, format!("N={n}")))
}

/// CPU seconds the nodes have used so far, in all (`None` when one cannot be read).
fn farm_cpu(nodes: &[NodeProc]) -> Option<f64> {
    nodes.iter().map(|n| cpu_seconds(n.guard.pid()).ok()).sum()
}

fn record(row: &mut RowBuilder, what: &str, times: &[f64]) {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    if let (Some(p50), Some(max)) = (quantile(&sorted, 0.5), quantile(&sorted, 1.0)) {
        row.add(&format!("{what}_median_node_ms"), p50);
        row.add(&format!("{what}_every_node_ms"), max);
    }
}

/// Arms `probe`, runs `change`, and waits until every live node's list shows the probe; returns
/// each live node's delay (ms) and what `change` returned.
async fn measure<T, F, Fut>(
    views: &Shared,
    alive: &[bool],
    probe: Probe,
    change: F,
) -> anyhow::Result<(Vec<f64>, T)>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    {
        let mut v = lock(views);
        v.seen = vec![None; alive.len()];
        v.probe = Some(probe.clone());
    }
    let started = Instant::now();
    let out = change().await?;
    poll(
        &format!("{probe:?} seen by every node"),
        REACH,
        Duration::from_millis(5),
        || {
            let v = lock(views);
            let done = v.seen.iter().zip(alive).all(|(s, a)| !a || s.is_some());
            async move { done.then_some(()) }
        },
    )
    .await
    .with_context(|| {
        let v = lock(views);
        let name = match &probe {
            Probe::UsersAtLeast(name, _) | Probe::Status(name, _) => name.clone(),
        };
        v.disagreeing(
            |i, _| !alive[i] || v.seen[i].is_some(),
            |view| entry_of(view, &name),
        )
    })?;
    let mut v = lock(views);
    v.probe = None;
    let times = v
        .seen
        .iter()
        .zip(alive)
        .filter(|(_, a)| **a)
        .filter_map(|(s, _)| s.map(|t| t.saturating_duration_since(started).as_secs_f64() * 1000.0))
        .collect();
    Ok((times, out))
}
