//! Idle connections: C connections, each subscribed to one topic, held open on one server; the
//! server's RSS per connection and the connect rate.
//!
//! The node runs with heartbeats of 30 s / 90 s so that idle clients need not answer pings during
//! the run (nats-server's own default is a ping every 2 minutes). Connections come from
//! 127.0.0.2–127.0.0.9 in turn, so no source address runs out of ephemeral ports.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::nats::NatsProc;
use crate::proc::{NodeProc, NodeSpec, free_port, raise_nofile, rss_bytes};
use crate::report::{RowBuilder, Section};
use crate::wire::{Nats, sse_connect, ws_connect, ws_subscribe};
use crate::{NATS, Options, STREAMFARM, STREAMFARM_SSE, ratio};

/// Connects in flight at once.
const IN_FLIGHT: usize = 256;
/// File descriptors kept for everything else (listeners, gossip, children's pipes).
const FD_RESERVE: u64 = 300;

/// Descriptors the node keeps for itself below its limit, never given to streaming connections
/// (`RESERVED_FDS` + `MIN_HTTP_SLOTS` in `crates/node/src/listener.rs`).
const NODE_RESERVE: u64 = 128 + 64;
/// Time the server is given to settle (allocator, lazy buffers) before its RSS is read.
const SETTLE: Duration = Duration::from_millis(1500);

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8))
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Section> {
    let limit = raise_nofile();
    let connections = options
        .connections
        .min(limit.saturating_sub(FD_RESERVE + NODE_RESERVE) as usize);
    let mut section = Section::default();
    if connections < options.connections {
        section.notes.push(format!(
            "asked for {} connections; RLIMIT_NOFILE here is {limit} (hard), so {connections} were opened \
             (the server and this process each hold one descriptor per connection)",
            options.connections
        ));
    }
    let setting = format!("C={connections}");
    let add = |row: &mut RowBuilder, (rss, base, rate): (u64, u64, f64)| {
        row.add("rss_per_conn_bytes", rss as f64 / connections as f64);
        row.add(
            "rss_delta_per_conn_bytes",
            rss.saturating_sub(base) as f64 / connections as f64,
        );
        row.add("rss_total_mib", rss as f64 / 1048576.0);
        row.add("connects_per_s", rate);
    };
    let mut sf = RowBuilder::default();
    let outcome = async {
        for _ in 0..options.repeats {
            add(&mut sf, streamfarm_once(options, connections, false).await?);
        }
        anyhow::Ok(())
    }
    .await;
    section.rows.push(sf.finish(STREAMFARM, &setting, outcome));
    let mut sse = RowBuilder::default();
    let outcome = async {
        for _ in 0..options.repeats {
            add(&mut sse, streamfarm_once(options, connections, true).await?);
        }
        anyhow::Ok(())
    }
    .await;
    section
        .rows
        .push(sse.finish(STREAMFARM_SSE, &setting, outcome));
    if let Some(nats) = &options.nats {
        let mut row = RowBuilder::default();
        let outcome = async {
            for _ in 0..options.repeats {
                add(&mut row, nats_once(&nats.path, connections).await?);
            }
            anyhow::Ok(())
        }
        .await;
        section.rows.push(row.finish(NATS, &setting, outcome));
    }
    let get = |sys, fig| section.median(sys, &setting, fig);
    let per_conn = get(STREAMFARM, "rss_per_conn_bytes");
    let sse_per_ws = ratio(get(STREAMFARM_SSE, "rss_per_conn_bytes"), per_conn);
    section.notes.push(format!(
        "RSS/connection streamfarm/nats = {}; connects/s streamfarm/nats = {}; target <= 4096 B/conn: {}",
        ratio(per_conn, get(NATS, "rss_per_conn_bytes")),
        ratio(get(STREAMFARM, "connects_per_s"), get(NATS, "connects_per_s")),
        match per_conn {
            Some(b) if b <= 4096.0 => "met",
            Some(_) => "NOT met",
            None => "n/a",
        }
    ));
    section.notes.push(format!(
        "RSS/connection event stream/WebSocket = {sse_per_ws}; target <= 1.5: {}",
        match sse_per_ws.parse::<f64>() {
            Ok(r) if r <= 1.5 => "met",
            Ok(_) => "NOT met",
            Err(_) => "n/a",
        }
    ));
    Ok(section)
}

/// An idle connection of either transport, held open until dropped.
type Held = Box<dyn Send>;

/// One streamfarm run, over WebSockets or (`sse`) event streams: (RSS with C connections, RSS
/// with none, connects/s).
async fn streamfarm_once(
    options: &Options,
    c: usize,
    sse: bool,
) -> anyhow::Result<(u64, u64, f64)> {
    let mut spec = NodeSpec::new("idle", free_port(SERVER_IP.into())?);
    spec.extra = [
        "--heartbeat-interval-ms",
        "30000",
        "--heartbeat-timeout-ms",
        "90000",
        "--max-connections",
        &(c + 100).to_string(),
    ]
    .map(String::from)
    .to_vec();
    let node = NodeProc::start(&options.exe, &spec).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss_bytes(node.guard.pid())?;
    let addr = node.listen;
    let (held, rate) = open_all(c, move |i| async move {
        if sse {
            let stream = sse_connect(addr, Some(source(i)), "idle", 4096).await?;
            return anyhow::Ok(Box::new(stream) as Held);
        }
        let mut ws = ws_connect(addr, Some(source(i)), 4096).await?;
        ws_subscribe(&mut ws, "idle").await?;
        anyhow::Ok(Box::new(ws) as Held)
    })
    .await?;
    tokio::time::sleep(SETTLE).await;
    let users = node.metric("streamfarm_connections").await?;
    anyhow::ensure!(
        users as usize == c,
        "node holds {users} connections, expected {c}"
    );
    let rss = rss_bytes(node.guard.pid())?;
    drop(held);
    Ok((rss, base, rate))
}

/// One nats-server run: (RSS with C connections, RSS with none, connects/s).
async fn nats_once(bin: &std::path::Path, c: usize) -> anyhow::Result<(u64, u64, f64)> {
    let server = NatsProc::start(bin, SERVER_IP.into()).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base = rss_bytes(server.guard.pid())?;
    let addr = server.addr;
    let (held, rate) = open_all(c, move |i| async move {
        let mut nats = Nats::connect(addr, Some(source(i))).await?;
        nats.subscribe("idle", 1).await?;
        anyhow::Ok(nats)
    })
    .await?;
    tokio::time::sleep(SETTLE).await;
    let rss = rss_bytes(server.guard.pid())?;
    drop(held);
    Ok((rss, base, rate))
}

/// Opens `c` connections with `connect(i)`, `IN_FLIGHT` at a time; returns them and the rate.
async fn open_all<T, F, Fut>(c: usize, connect: F) -> anyhow::Result<(Vec<T>, f64)>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for i in 0..c {
        let permit = permits.clone().acquire_owned().await?;
        let fut = connect(i);
        tasks.spawn(async move {
            let result = fut.await;
            drop(permit);
            result
        });
    }
    let mut held = Vec::with_capacity(c);
    while let Some(result) = tasks.join_next().await {
        held.push(result?.context("idle connection")?);
    }
    let rate = c as f64 / started.elapsed().as_secs_f64();
    Ok((held, rate))
}
