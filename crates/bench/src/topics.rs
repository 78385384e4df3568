//! Many topics: what a new topic costs a farm that already holds many, and what a node costs per
//! topic it holds.
//!
//! **Subscribe rate** (`N topics`): a three-node farm; `N / T` clients, spread over the nodes,
//! each subscribes to `T` topics of its own (every topic distinct: all `N` are new to the farm),
//! in one `sub` frame, all clients at once. Figures: time from the first frame to the last
//! `subscribed`, subscriptions per second, and the nodes' CPU per subscription — counted from the
//! first frame until the nodes are quiet again (every per-topic cost: placements, the topic's
//! chain on its sequencer and replica, the interest sent to the peers), and RSS per topic per node
//! (the growth of the three nodes' RSS over the `N` topics, divided by three: the memory of a topic
//! with subscribers and no messages, the session's and hub's share included). nats-server: a
//! three-server cluster, `SUB` lines for the same subjects and a `PING` per client, the `PONG`
//! standing for `subscribed`; CPU counted the same way (routes carry the interest).
//!
//! **Peer restart** (`N topics, peer restarted`): on the same farm holding the `N` topics, a
//! control subscriber on node 1 holds 100 of them (spread over every node's sequencing) while a
//! publisher posts on them through node 3 at 200 messages/s; node 2 (sequencer or replica of
//! two thirds of the topics) is killed and started again. Figures: seconds from the restart
//! until the restarted node relays a message to node 1 again (its relay link carried node 1's
//! whole interest), and messages lost, duplicated or out of order at the control subscriber (every
//! publish acknowledged `2xx` must arrive once, in order per topic).
//!
//! Why these: real feeds have 10^5–10^6 topics and clients holding 50–1 000 each; a farm whose
//! per-topic cost grows with the topics it holds breaks before it gets there. The targets: CPU per
//! subscription at the largest size within 1.25× of the smallest and within 2× of nats-server's;
//! 100 000 new-topic subscriptions/s per node; at most 1 KiB per idle topic per node; the relay
//! surviving a peer restart with 0 lost.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::SinkExt;
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::flow::{client_source, loopback};
use crate::nats::NatsProc;
use crate::proc::{NodeProc, NodeSpec, cpu_seconds, free_port, poll, rss_bytes};
use crate::report::{RowBuilder, Section};
use crate::wire::{Nats, Ws, ws_connect, ws_text};
use crate::{NATS, Options, STREAMFARM, ratio};

/// The longest a subscribe phase may take, every client together.
const SUBSCRIBE_DEADLINE: Duration = Duration::from_secs(120);
/// The nodes are quiet when their CPU over one sample is below this share of one core.
const QUIET_SHARE: f64 = 0.05;
/// How long the nodes are given to become quiet after the last `subscribed`.
const QUIET_DEADLINE: Duration = Duration::from_secs(60);
/// Read buffer of each client: small, many clients.
const READ_BUFFER: usize = 16 * 1024;

/// The `i`-th topic: the shape of an instrument's name in a market-data feed.
fn topic(i: usize) -> String {
    format!("md.xnas.{i:07}.l1")
}

fn setting(total: usize, per_client: usize) -> String {
    format!("{total} topics, {per_client}/client")
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Section> {
    let mut section = Section::default();
    let per_client = options.topics_per_client.max(1);
    for &total in &options.topic_counts {
        let clients = total.div_ceil(per_client);
        let name = setting(total, per_client);
        let mut row = RowBuilder::default();
        let mut outcome = Ok(());
        for _ in 0..options.repeats {
            match streamfarm_subscribe(options, clients, per_client).await {
                Ok(run) => run.add_to(&mut row),
                Err(err) => {
                    outcome = Err(err);
                    break;
                }
            }
        }
        section.rows.push(row.finish(STREAMFARM, &name, outcome));
        if let Some(nats) = &options.nats {
            let mut row = RowBuilder::default();
            let mut outcome = Ok(());
            for _ in 0..options.repeats {
                match nats_subscribe(&nats.path, clients, per_client).await {
                    Ok(run) => run.add_to(&mut row),
                    Err(err) => {
                        outcome = Err(err);
                        break;
                    }
                }
            }
            section.rows.push(row.finish(NATS, &name, outcome));
        }
    }
    notes(&mut section, options, per_client);
    Ok(section)
}

fn notes(section: &mut Section, options: &Options, per_client: usize) {
    let cpu = |system: &str, total: usize| {
        section.median(
            system,
            &setting(total, per_client),
            "node_cpu_us_per_subscription",
        )
    };
    let (Some(&first), Some(&last)) = (options.topic_counts.first(), options.topic_counts.last())
    else {
        return;
    };
    section.notes.push(format!(
        "CPU per subscription at {last} topics / at {first}: {} (target <= 1.25); streamfarm/nats-server at {last}: {} (target <= 2)",
        ratio(cpu(STREAMFARM, last), cpu(STREAMFARM, first)),
        ratio(cpu(STREAMFARM, last), cpu(NATS, last)),
    ));
}

/// One subscribe phase's figures.
struct SubscribeRun {
    seconds: f64,
    subscriptions: usize,
    cpu_seconds: f64,
    rss_growth: f64,
    nodes: usize,
    /// Relay links reset for a full queue during the run (streamfarm only).
    link_resets: Option<f64>,
}

impl SubscribeRun {
    fn add_to(&self, row: &mut RowBuilder) {
        let subs = self.subscriptions as f64;
        row.add("seconds_to_all_subscribed", self.seconds);
        row.add("subscriptions_per_s", subs / self.seconds);
        row.add(
            "subscriptions_per_s_per_node",
            subs / self.seconds / self.nodes as f64,
        );
        row.add(
            "node_cpu_us_per_subscription",
            self.cpu_seconds * 1e6 / subs,
        );
        row.add(
            "rss_bytes_per_topic_per_node",
            self.rss_growth / subs / self.nodes as f64,
        );
        if let Some(resets) = self.link_resets {
            row.add("relay_link_resets_msgs", resets);
        }
    }
}

/// CPU seconds and RSS bytes of `pids`, summed.
fn usage(pids: &[u32]) -> anyhow::Result<(f64, f64)> {
    let mut cpu = 0.0;
    let mut rss = 0.0;
    for pid in pids {
        cpu += cpu_seconds(*pid)?;
        rss += rss_bytes(*pid)? as f64;
    }
    Ok((cpu, rss))
}

/// Waits until `pids` together use less than [`QUIET_SHARE`] of a core over half a second, at
/// most [`QUIET_DEADLINE`]; their CPU seconds and RSS then.
async fn until_quiet(pids: &[u32]) -> anyhow::Result<(f64, f64)> {
    let deadline = Instant::now() + QUIET_DEADLINE;
    let sample = Duration::from_millis(500);
    let (mut cpu, _) = usage(pids)?;
    loop {
        tokio::time::sleep(sample).await;
        let (now, rss) = usage(pids)?;
        if now - cpu < QUIET_SHARE * sample.as_secs_f64() || Instant::now() > deadline {
            return Ok((now, rss));
        }
        cpu = now;
    }
}

/// A three-node farm on 127.0.0.1–3, every node listed UP by the first.
pub(crate) async fn farm(options: &Options, extra: &[&str]) -> anyhow::Result<Vec<NodeProc>> {
    let mut nodes: Vec<NodeProc> = Vec::new();
    for i in 0..3u8 {
        let mut spec = NodeSpec::new(format!("n{}", i + 1), free_port(loopback(1 + i))?);
        spec.extra = extra.iter().map(|s| s.to_string()).collect();
        if let Some(first) = nodes.first() {
            spec.join = vec![first.listen];
        }
        nodes.push(NodeProc::start(&options.exe, &spec).await?);
    }
    let first = nodes[0].listen;
    poll(
        "every node listed UP",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async move {
            let farm = crate::proc::http(first, "GET", "/farm?format=text", &[], "")
                .await
                .ok()?;
            (farm.matches(" UP ").count() == 3).then_some(())
        },
    )
    .await?;
    Ok(nodes)
}

/// The settings every node of these runs gets: interest as large as the largest run needs, no
/// rebalancing (the clients connect to the nodes in turn, so the farm is even; a move would only
/// add its own cost to what is measured), and heartbeats slow enough that clients which read
/// nothing while the nodes settle are not closed for it.
fn node_flags(options: &Options) -> Vec<String> {
    let most = options.topic_counts.iter().max().copied().unwrap_or(0);
    [
        "--max-interest-topics",
        &most.max(1024).to_string(),
        "--rebalance",
        "false",
        "--heartbeat-interval-ms",
        "300000",
        "--heartbeat-timeout-ms",
        "900000",
    ]
    .map(String::from)
    .to_vec()
}

/// The clients' connections once every client's subscription is confirmed, within
/// [`SUBSCRIBE_DEADLINE`]; the first client's failure otherwise.
async fn every_client_subscribed<T: 'static>(
    mut tasks: JoinSet<anyhow::Result<T>>,
) -> anyhow::Result<Vec<T>> {
    let all = async {
        let mut open = Vec::with_capacity(tasks.len());
        while let Some(done) = tasks.join_next().await {
            open.push(done??);
        }
        anyhow::Ok(open)
    };
    tokio::time::timeout(SUBSCRIBE_DEADLINE, all)
        .await
        .context("every client subscribed: timed out")?
}

/// Sends one `sub` frame of `topics` and reads until its `subscribed`.
async fn subscribe_all(ws: &mut Ws, topics: Vec<String>) -> anyhow::Result<()> {
    let frame = serde_json::json!({"type": "sub", "topics": topics}).to_string();
    ws.send(Message::text(frame)).await?;
    loop {
        let text = ws_text(ws).await?;
        if text.contains("\"subscribed\"") {
            return Ok(());
        }
        if text.contains("\"error\"") {
            bail!("the node refused the subscription: {text:.200}");
        }
    }
}

async fn streamfarm_subscribe(
    options: &Options,
    clients: usize,
    per_client: usize,
) -> anyhow::Result<SubscribeRun> {
    let flags = node_flags(options);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let nodes = farm(options, &flags).await?;
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.listen).collect();
    let pids: Vec<u32> = nodes.iter().map(NodeProc::pid).collect();
    let mut sockets = Vec::with_capacity(clients);
    for i in 0..clients {
        let ws = ws_connect(addrs[i % addrs.len()], Some(client_source(i)), READ_BUFFER)
            .await
            .with_context(|| format!("client {i}"))?;
        sockets.push(ws);
    }
    let (cpu_before, rss_before) = until_quiet(&pids).await?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, mut ws) in sockets.into_iter().enumerate() {
        let topics: Vec<String> = (0..per_client).map(|j| topic(i * per_client + j)).collect();
        tasks.spawn(async move {
            subscribe_all(&mut ws, topics)
                .await
                .with_context(|| format!("client {i}"))?;
            anyhow::Ok(ws)
        });
    }
    // The sockets stay open until the figures are read: closing them would unsubscribe.
    let open = every_client_subscribed(tasks).await?;
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_after, rss_after) = until_quiet(&pids).await?;
    let mut link_resets = 0.0;
    for node in &nodes {
        link_resets += node.metric("streamfarm_relay_drops_total").await?;
    }
    drop(open);
    Ok(SubscribeRun {
        seconds,
        subscriptions: clients * per_client,
        cpu_seconds: cpu_after - cpu_before,
        rss_growth: rss_after - rss_before,
        nodes: nodes.len(),
        link_resets: Some(link_resets),
    })
}

async fn nats_subscribe(
    bin: &std::path::Path,
    clients: usize,
    per_client: usize,
) -> anyhow::Result<SubscribeRun> {
    let ips: Vec<IpAddr> = (1..=3).map(loopback).collect();
    let servers = NatsProc::cluster(bin, &ips).await?;
    let pids: Vec<u32> = servers.iter().map(|s| s.guard.pid()).collect();
    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        let nats = Nats::connect(servers[i % servers.len()].addr, Some(client_source(i)))
            .await
            .with_context(|| format!("client {i}"))?;
        conns.push(nats);
    }
    let (cpu_before, rss_before) = until_quiet(&pids).await?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, mut nats) in conns.into_iter().enumerate() {
        tasks.spawn(async move {
            let mut lines = String::with_capacity(per_client * 32);
            for j in 0..per_client {
                lines.push_str(&format!("SUB {} {}\r\n", topic(i * per_client + j), j + 1));
            }
            // The PING after the SUBs: its PONG means the server has them all.
            lines.push_str("PING\r\n");
            nats.writer.write_all(lines.as_bytes()).await?;
            nats.until_pong().await?;
            anyhow::Ok(nats)
        });
    }
    let open = every_client_subscribed(tasks).await?;
    let seconds = started.elapsed().as_secs_f64();
    let (cpu_after, rss_after) = until_quiet(&pids).await?;
    drop(open);
    drop(servers);
    Ok(SubscribeRun {
        seconds,
        subscriptions: clients * per_client,
        cpu_seconds: cpu_after - cpu_before,
        rss_growth: rss_after - rss_before,
        nodes: 3,
        link_resets: None,
    })
}
