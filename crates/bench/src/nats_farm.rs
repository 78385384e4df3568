//! A farm of N nodes (20 by default) relaying through NATS, beside the same farm with its
//! embedded relay: the relay links counted, and messages across the farm.
//!
//! For each relay, N `streamfarm serve` processes (one tokio worker each) on 127.0.2.x — with
//! `--relay nats://…` toward one nats-server on 127.0.0.4, or with the embedded relay — form a
//! farm; one subscriber on every node but the first subscribes to one topic; a publisher on the
//! first node sends messages at a steady rate, each carrying its send time. Then:
//! - **relay links** — TCP connections between two nodes of the farm, counted with `ss` (from
//!   the dialing node's side, so each link once), and the nodes' own gauge
//!   (`streamfarm_relay_links`, summed); connections from nodes to nats-server, counted the same
//!   way. The embedded relay links every node to every other: N·(N−1).
//! - **delivery** — messages every subscriber got (each counted once), lost and duplicated
//!   ones, and publish → delivery p50/p99.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::nats::NatsProc;
use crate::proc::{NodeProc, NodeSpec, free_port, http, poll, prometheus_value};
use crate::report::{RowBuilder, Section, quantile};
use crate::wire::{
    msg_data, now_ns, parse_payload, payload, ws_connect, ws_pub_frame, ws_subscribe,
};
use crate::{Options, STREAMFARM, STREAMFARM_NATS};

const TOPIC: &str = "farm";
/// Messages per second the publisher sends.
const RATE: f64 = 200.0;

fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1 + i as u8))
}

/// What one subscriber got.
#[derive(Debug, Default)]
struct Got {
    seqs: Vec<u64>,
    latencies_us: Vec<f64>,
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Section> {
    let n = options.nats_farm_nodes;
    let messages = if options.quick { 50 } else { 1000 };
    let setting = format!("N={n} nodes, {messages} msgs at {RATE}/s");
    let mut section = Section::default();
    let Some(nats) = &options.nats else {
        section
            .notes
            .push("skipped: the NATS relay needs nats-server, not found".into());
        return Ok(section);
    };
    for system in [STREAMFARM, STREAMFARM_NATS] {
        let mut row = RowBuilder::default();
        let outcome = async {
            for _ in 0..options.repeats {
                let relay = (system == STREAMFARM_NATS).then_some(nats.path.as_path());
                once(options, n, messages, relay, &mut row)
                    .await
                    .with_context(|| format!("{system} {setting}"))?;
            }
            anyhow::Ok(())
        }
        .await;
        section.rows.push(row.finish(system, &setting, outcome));
    }
    let get = |sys, fig| section.median(sys, &setting, fig);
    section.notes.push(format!(
        "{setting}: relay links between nodes embedded = {}, through NATS = {} (connections to nats-server: {}); a full mesh is N·(N−1) = {}",
        get(STREAMFARM, "relay_links_ss").map_or("n/a".into(), |v| v.to_string()),
        get(STREAMFARM_NATS, "relay_links_ss").map_or("n/a".into(), |v| v.to_string()),
        get(STREAMFARM_NATS, "nats_connections_ss").map_or("n/a".into(), |v| v.to_string()),
        n * (n - 1),
    ));
    Ok(section)
}

async fn once(
    options: &Options,
    n: usize,
    messages: u64,
    nats_relay: Option<&std::path::Path>,
    row: &mut RowBuilder,
) -> anyhow::Result<()> {
    let relay = match nats_relay {
        Some(bin) => Some(NatsProc::start(bin, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4))).await?),
        None => None,
    };
    let mut nodes: Vec<NodeProc> = Vec::new();
    for i in 0..n {
        let mut spec = NodeSpec::new(format!("n{i}"), free_port(ip(i))?);
        spec.workers = Some(1);
        spec.extra = [
            "--heartbeat-interval-ms",
            "30000",
            "--heartbeat-timeout-ms",
            "90000",
        ]
        .map(String::from)
        .to_vec();
        if let Some(relay) = &relay {
            spec.extra
                .extend(["--relay".to_string(), format!("nats://{}", relay.addr)]);
        }
        if let Some(first) = nodes.first() {
            spec.join = vec![first.listen];
        }
        nodes.push(NodeProc::spawn(&options.exe, &spec)?);
    }
    for node in &mut nodes {
        node.wait_ready(Duration::from_secs(60)).await?;
    }
    let listens: Vec<SocketAddr> = nodes.iter().map(|n| n.listen).collect();
    for at in [listens[0], listens[n - 1]] {
        poll(
            "every node listed UP",
            Duration::from_secs(30 + n as u64),
            Duration::from_millis(200),
            || async move {
                let farm = http(at, "GET", "/farm?format=text", &[], "").await.ok()?;
                (farm.matches(" UP ").count() == n).then_some(())
            },
        )
        .await?;
    }

    // Subscribers on every node but the first; the publisher on the first.
    let got: Vec<Arc<Mutex<Got>>> = (1..n).map(|_| Arc::default()).collect();
    let mut tasks = JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(n);
    for (i, got) in got.iter().enumerate() {
        let at = listens[i + 1];
        let got = got.clone();
        let ready = ready_tx.clone();
        tasks.spawn(async move {
            let mut ws = ws_connect(at, Some(ip(100)), 16 * 1024).await?;
            ws_subscribe(&mut ws, TOPIC).await?;
            ready.send(()).await?;
            while let Some(Ok(message)) = ws.next().await {
                let Message::Text(text) = message else {
                    continue;
                };
                if let Some((seq, sent)) = msg_data(text.as_str()).and_then(parse_payload) {
                    let mut got = got.lock().unwrap_or_else(|e| e.into_inner());
                    got.seqs.push(seq);
                    got.latencies_us
                        .push(now_ns().saturating_sub(sent) as f64 / 1000.0);
                } else if text.contains("\"type\":\"ping\"") {
                    let pong = text.replace("\"ping\"", "\"pong\"");
                    let _ = ws.send(Message::text(pong)).await;
                }
            }
            anyhow::Ok(())
        });
    }
    drop(ready_tx);
    for _ in 1..n {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(())) => {}
            _ => bail!("subscribers did not all subscribe within 60 s"),
        }
    }
    let mut publisher = ws_connect(listens[0], Some(ip(101)), 16 * 1024).await?;
    let start = Instant::now();
    let mut seq = 0u64;
    while seq < messages {
        let due = ((RATE * start.elapsed().as_secs_f64()) as u64).min(messages);
        while seq < due {
            publisher
                .feed(ws_pub_frame(TOPIC, &payload(seq, 64)))
                .await?;
            seq += 1;
        }
        publisher.flush().await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let everyone = || {
        got.iter()
            .all(|g| g.lock().unwrap_or_else(|e| e.into_inner()).seqs.len() >= messages as usize)
    };
    let _ = poll(
        "every subscriber has every message",
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async { everyone().then_some(()) },
    )
    .await;

    // The links, with the messages still flowing through them a moment ago.
    let pids: HashSet<u32> = nodes.iter().map(|n| n.pid()).collect();
    let node_addrs: HashSet<SocketAddr> = listens.iter().copied().collect();
    let nats_addrs: HashSet<SocketAddr> = relay.iter().map(|r| r.addr).collect();
    let (links, to_nats) = count_connections(&pids, &node_addrs, &nats_addrs)?;
    let mut gauge = 0.0;
    for at in &listens {
        let text = http(*at, "GET", "/metrics", &[], "").await?;
        gauge += prometheus_value(&text, "streamfarm_relay_links").unwrap_or(0.0);
    }

    let (mut lost, mut duplicated) = (0u64, 0u64);
    let mut latencies = Vec::new();
    for g in &got {
        let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
        let unique: HashSet<u64> = g.seqs.iter().copied().collect();
        lost += messages - unique.len() as u64;
        duplicated += (g.seqs.len() - unique.len()) as u64;
        latencies.append(&mut g.latencies_us);
    }
    latencies.sort_by(f64::total_cmp);
    let ms = |q| quantile(&latencies, q).map_or(f64::NAN, |us| us / 1000.0);
    row.add("relay_links_ss", links as f64);
    row.add("relay_links_gauge", gauge);
    row.add("nats_connections_ss", to_nats as f64);
    row.add("lost", lost as f64);
    row.add("duplicated", duplicated as f64);
    row.add("p50_ms", ms(0.5));
    row.add("p99_ms", ms(0.99));
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    drop(nodes);
    drop(relay);
    Ok(())
}

/// Established TCP connections opened by processes `pids` (the nodes) to `nodes` (relay links,
/// each counted once: on its dialing side) and to `nats` (the nodes' NATS connections), from
/// `ss -tnpH` (iproute2).
fn count_connections(
    pids: &HashSet<u32>,
    nodes: &HashSet<SocketAddr>,
    nats: &HashSet<SocketAddr>,
) -> anyhow::Result<(usize, usize)> {
    let out = std::process::Command::new("ss")
        .args(["-tnpH", "state", "established"])
        .output()
        .context("ss (iproute2) runs")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut links, mut to_nats) = (0, 0);
    for line in text.lines() {
        // Recv-Q Send-Q Local Peer Process (the state column is left out with `state`).
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(peer), Some(process)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let Ok(peer) = peer.parse::<SocketAddr>() else {
            continue;
        };
        let owned = process
            .split("pid=")
            .skip(1)
            .filter_map(|rest| rest.split(',').next()?.parse::<u32>().ok())
            .any(|pid| pids.contains(&pid));
        if !owned {
            continue;
        }
        if nodes.contains(&peer) {
            links += 1;
        } else if nats.contains(&peer) {
            to_nats += 1;
        }
    }
    Ok((links, to_nats))
}
