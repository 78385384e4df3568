//! Fan-out and cross-node delivery: S subscribers on one topic, one publisher.
//!
//! Two phases per run, for each message size:
//! 1. **Saturation** — the publisher keeps at most `WINDOW` messages in flight (sent minus the
//!    average delivered per subscriber) for one phase, then waits for the tail; deliveries/s is
//!    every delivery of every subscriber over that time. The window keeps the subscribers within
//!    the node's per-connection queue, so the figure is the sustained rate, not a burst into
//!    buffers that ends in slow-consumer closes (those are counted, and noted if any).
//! 2. **Latency at half load** — the publisher sends at half the measured message rate, evenly
//!    (a catch-up schedule checked every millisecond); each payload carries its send time, and
//!    every subscriber records publish→delivery for a bounded sample of messages.
//!
//! Shapes: [`Shape::OneNode`] — publisher and subscribers on one server; [`Shape::CrossNode`] —
//! publisher on server 1, subscribers split over servers 2 and 3 (a streamfarm farm of three
//! child nodes; a three-server nats-server cluster), so every delivery crossed a link between
//! servers. Publisher and subscribers are this process's minimal clients (`wire`).
//!
//! With nats-server found, streamfarm runs twice: with its embedded relay (`streamfarm`), and
//! relaying through one nats-server on 127.0.0.4 (`streamfarm+nats`, `relay = "nats://…"`; that
//! server's CPU is counted with the nodes'). On one node the NATS relay carries nothing to other
//! nodes: its row shows what relaying through NATS costs a node that publishes.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::nats::NatsProc;
use crate::proc::{NodeProc, NodeSpec, free_port, poll};
use crate::report::{RowBuilder, Section, quantile};
use crate::wire::{
    Nats, NatsEvent, msg_data, nats_pub, now_ns, parse_payload, payload, sse_connect, ws_connect,
    ws_pub_frame, ws_subscribe,
};
use crate::{NATS, Options, STREAMFARM, STREAMFARM_NATS, STREAMFARM_SSE, ratio};

/// Which servers publisher and subscribers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Everything on one server.
    OneNode,
    /// Publisher on server 1, subscribers on servers 2 and 3.
    CrossNode,
}

/// Messages in flight during saturation (below the node's default send queue of 1024 frames).
const WINDOW: u64 = 256;
/// Sequence numbers of the latency phase start here, so the two phases never mix.
const LATENCY_SEQ: u64 = 1 << 40;
/// Latency samples kept in all, over every subscriber.
const SAMPLES: usize = 400_000;
/// Longest wait for the last messages of a phase.
const TAIL: Duration = Duration::from_secs(3);
const TOPIC: &str = "fan";
/// Read buffer of each streamfarm subscriber. tungstenite zero-fills the free part of its read
/// buffer before every read, so a 64 KiB buffer cost a 64 KiB `memset` per read: 17% of the
/// load generator's CPU in a profile, a cost the NATS subscribers (a plain `BufReader`) do not
/// pay. 8 KiB still holds a 64-frame burst of 64-byte messages in one read.
const SUBSCRIBER_READ_BUFFER: usize = 8 * 1024;

/// What the subscribers share.
#[derive(Debug, Default)]
struct Counters {
    delivered: AtomicU64,
    closed: AtomicU64,
    latencies_us: Mutex<Vec<f64>>,
}

/// One subscriber's latency samples, handed to [`Counters`] in small batches (a subscriber is
/// aborted at the end, so what it holds back is lost).
#[derive(Debug)]
struct Samples {
    batch: Vec<f64>,
    recorded: usize,
    cap: usize,
}

impl Samples {
    fn new(cap: usize) -> Samples {
        Samples {
            batch: Vec::with_capacity(32),
            recorded: 0,
            cap,
        }
    }
}

impl Counters {
    fn on_payload(&self, bytes: &[u8], samples: &mut Samples) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some((seq, sent)) = parse_payload(bytes)
            && seq >= LATENCY_SEQ
            && samples.recorded < samples.cap
        {
            samples
                .batch
                .push(now_ns().saturating_sub(sent) as f64 / 1000.0);
            samples.recorded += 1;
            if samples.batch.len() >= 32 || samples.recorded == samples.cap {
                self.keep(samples);
            }
        }
    }

    fn keep(&self, samples: &mut Samples) {
        if let Ok(mut all) = self.latencies_us.lock() {
            all.append(&mut samples.batch);
        }
    }
}

/// A publisher of either system.
enum Publisher {
    Ws(crate::wire::Ws),
    Nats(Nats),
}

impl Publisher {
    async fn send(&mut self, seqs: std::ops::Range<u64>, size: usize) -> anyhow::Result<()> {
        match self {
            Publisher::Ws(ws) => {
                for seq in seqs {
                    ws.feed(ws_pub_frame(TOPIC, &payload(seq, size))).await?;
                }
                ws.flush().await?;
            }
            Publisher::Nats(nats) => {
                let mut buf = Vec::new();
                for seq in seqs {
                    nats_pub(&mut buf, TOPIC, &payload(seq, size));
                }
                nats.writer.write_all(&buf).await?;
            }
        }
        Ok(())
    }
}

/// Results of one run at one size.
struct Run {
    deliveries_per_s: f64,
    msgs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    closed: u64,
    /// Server CPU (all servers of the run) per delivery during saturation, nanoseconds.
    server_cpu_ns_per_delivery: f64,
    /// Server CPU during saturation, in cores.
    server_cores: f64,
}

/// Servers of one system for one run: where to publish, where the subscribers go, and the guards
/// that kill them.
struct Servers {
    publish_at: SocketAddr,
    subscribe_at: Vec<SocketAddr>,
    /// Process ids of the servers, for their CPU time.
    pids: Vec<u32>,
    _nodes: Vec<NodeProc>,
    _nats: Vec<NatsProc>,
}

impl Servers {
    fn cpu_seconds(&self) -> f64 {
        self.pids
            .iter()
            .filter_map(|p| crate::proc::cpu_seconds(*p).ok())
            .sum()
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A streamfarm farm for `shape`: with its embedded relay, or relaying through a nats-server
/// started from `nats_relay` on 127.0.0.4.
async fn streamfarm_servers(
    options: &Options,
    shape: Shape,
    nats_relay: Option<&std::path::Path>,
) -> anyhow::Result<Servers> {
    let count = if shape == Shape::OneNode { 1 } else { 3 };
    let relay = match nats_relay {
        Some(bin) => Some(NatsProc::start(bin, ip(4)).await?),
        None => None,
    };
    let mut nodes: Vec<NodeProc> = Vec::new();
    for i in 0..count {
        let mut spec = NodeSpec::new(format!("n{i}"), free_port(ip(1 + i as u8))?);
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
        nodes.push(NodeProc::start(&options.exe, &spec).await?);
    }
    if count > 1 {
        let first = nodes[0].listen;
        poll(
            "every node listed UP",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || async move {
                let farm = crate::proc::http(first, "GET", "/farm?format=text", &[], "")
                    .await
                    .ok()?;
                (farm.matches(" UP ").count() == count).then_some(())
            },
        )
        .await?;
    }
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.listen).collect();
    Ok(Servers {
        publish_at: addrs[0],
        subscribe_at: if count == 1 {
            addrs
        } else {
            addrs[1..].to_vec()
        },
        pids: nodes
            .iter()
            .map(|n| n.guard.pid())
            .chain(relay.iter().map(|r| r.guard.pid()))
            .collect(),
        _nodes: nodes,
        _nats: relay.into_iter().collect(),
    })
}

async fn nats_servers(bin: &std::path::Path, shape: Shape) -> anyhow::Result<Servers> {
    let ips: Vec<IpAddr> = if shape == Shape::OneNode {
        vec![ip(1)]
    } else {
        vec![ip(1), ip(2), ip(3)]
    };
    let servers = NatsProc::cluster(bin, &ips).await?;
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    Ok(Servers {
        publish_at: addrs[0],
        subscribe_at: if addrs.len() == 1 {
            addrs
        } else {
            addrs[1..].to_vec()
        },
        pids: servers.iter().map(|s| s.guard.pid()).collect(),
        _nodes: Vec::new(),
        _nats: servers,
    })
}

pub(crate) async fn run(options: &Options, shape: Shape) -> anyhow::Result<Section> {
    let (subscribers, sizes): (usize, Vec<usize>) = match shape {
        Shape::OneNode => (options.subscribers, options.message_sizes.clone()),
        Shape::CrossNode => (2 * options.cross_subscribers, vec![64]),
    };
    let mut section = Section::default();
    for size in sizes {
        let setting = format!("S={subscribers} {size} B");
        let mut systems: Vec<&str> = if options.nats.is_some() {
            vec![STREAMFARM, STREAMFARM_NATS, NATS]
        } else {
            vec![STREAMFARM]
        };
        // On one node, the same fan-out to subscribers reading event streams.
        if shape == Shape::OneNode {
            systems.insert(1, STREAMFARM_SSE);
        }
        for system in systems {
            let mut row = RowBuilder::default();
            let mut closed = 0;
            // A run that fails (a subscriber timing out at a size the machine cannot hold) marks
            // this row failed; the runs before it, the other rows and sections are kept.
            let outcome = async {
                for _ in 0..options.repeats {
                    let servers = match (system, &options.nats) {
                        (NATS, Some(nats)) => nats_servers(&nats.path, shape).await?,
                        (STREAMFARM_NATS, Some(nats)) => {
                            streamfarm_servers(options, shape, Some(&nats.path)).await?
                        }
                        _ => streamfarm_servers(options, shape, None).await?,
                    };
                    let run = run_once(&servers, system, subscribers, size, options.phase)
                        .await
                        .with_context(|| format!("{system} {setting}"))?;
                    row.add("deliveries_per_s", run.deliveries_per_s);
                    row.add("msgs_per_s", run.msgs_per_s);
                    row.add("half_load_p50_ms", run.p50_ms);
                    row.add("half_load_p99_ms", run.p99_ms);
                    row.add("server_cpu_ns_per_delivery", run.server_cpu_ns_per_delivery);
                    row.add("server_cores_at_saturation", run.server_cores);
                    closed += run.closed;
                }
                anyhow::Ok(())
            }
            .await;
            if closed > 0 {
                section.notes.push(format!(
                    "{system} {setting}: {closed} subscriber connections closed by the server during the runs (slow consumers)"
                ));
            }
            section.rows.push(row.finish(system, &setting, outcome));
        }
        let get = |sys, fig| section.median(sys, &setting, fig);
        match shape {
            Shape::OneNode => {
                let rate = get(STREAMFARM, "deliveries_per_s");
                let sse = get(STREAMFARM_SSE, "deliveries_per_s");
                let sse_note = format!(
                    "{setting}: deliveries/s event streams/WebSockets = {}, p99 at half load event streams/WebSockets = {}; target >= 0.7: {}",
                    ratio(sse, rate),
                    ratio(
                        get(STREAMFARM_SSE, "half_load_p99_ms"),
                        get(STREAMFARM, "half_load_p99_ms")
                    ),
                    match (sse, rate) {
                        (Some(e), Some(w)) if e >= 0.7 * w => "met",
                        (Some(_), Some(_)) => "NOT met",
                        _ => "n/a",
                    }
                );
                section.notes.push(format!(
                    "{setting}: deliveries/s streamfarm/nats = {}, p99 at half load streamfarm/nats = {}; target >= 1M deliveries/s and >= nats: {}",
                    ratio(rate, get(NATS, "deliveries_per_s")),
                    ratio(get(STREAMFARM, "half_load_p99_ms"), get(NATS, "half_load_p99_ms")),
                    match (rate, get(NATS, "deliveries_per_s")) {
                        (Some(r), Some(n)) if r >= 1e6 && r >= n => "met",
                        (Some(r), None) if r >= 1e6 => "1M met, no nats",
                        (Some(_), _) => "NOT met",
                        _ => "n/a",
                    }
                ));
                section.notes.push(sse_note);
            }
            Shape::CrossNode => {
                let through_nats = format!(
                    "{setting}: relaying through NATS: relayed msgs/s streamfarm+nats/streamfarm = {}, p99 streamfarm+nats/streamfarm = {}",
                    ratio(
                        get(STREAMFARM_NATS, "msgs_per_s"),
                        get(STREAMFARM, "msgs_per_s")
                    ),
                    ratio(
                        get(STREAMFARM_NATS, "half_load_p99_ms"),
                        get(STREAMFARM, "half_load_p99_ms")
                    ),
                );
                let p99 = get(STREAMFARM, "half_load_p99_ms");
                let against_nats = format!(
                    "{setting}: relayed msgs/s streamfarm/nats = {}, p99 streamfarm/nats = {}; target p99 <= 5 ms at half load: {}",
                    ratio(get(STREAMFARM, "msgs_per_s"), get(NATS, "msgs_per_s")),
                    ratio(p99, get(NATS, "half_load_p99_ms")),
                    match p99 {
                        Some(p) if p <= 5.0 => "met",
                        Some(_) => "NOT met",
                        None => "n/a",
                    }
                );
                section.notes.extend([through_nats, against_nats]);
            }
        }
    }
    Ok(section)
}

async fn run_once(
    servers: &Servers,
    system: &str,
    subscribers: usize,
    size: usize,
    phase: Duration,
) -> anyhow::Result<Run> {
    let counters = Arc::new(Counters::default());
    let cap = (SAMPLES / subscribers).max(100);
    let mut tasks = JoinSet::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(subscribers);
    for i in 0..subscribers {
        let at = servers.subscribe_at[i % servers.subscribe_at.len()];
        let source = Some(ip(10 + (i % 8) as u8));
        let counters = counters.clone();
        let ready = ready_tx.clone();
        if system == NATS {
            tasks.spawn(async move {
                let mut nats = Nats::connect(at, source).await?;
                nats.subscribe(TOPIC, 1).await?;
                ready.send(()).await?;
                let mut samples = Samples::new(cap);
                let mut buf = Vec::new();
                loop {
                    match nats.next(&mut buf).await {
                        Ok(NatsEvent::Msg) => counters.on_payload(&buf, &mut samples),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                counters.closed.fetch_add(1, Ordering::Relaxed);
                counters.keep(&mut samples);
                anyhow::Ok(())
            });
        } else if system == STREAMFARM_SSE {
            tasks.spawn(async move {
                let mut sse = sse_connect(at, source, TOPIC, SUBSCRIBER_READ_BUFFER).await?;
                ready.send(()).await?;
                let mut samples = Samples::new(cap);
                // Pings are events like the others; an event stream's client answers none.
                while let Ok(data) = sse.next_data().await {
                    if let Some(data) = msg_data(data) {
                        counters.on_payload(data, &mut samples);
                    }
                }
                counters.closed.fetch_add(1, Ordering::Relaxed);
                counters.keep(&mut samples);
                anyhow::Ok(())
            });
        } else {
            tasks.spawn(async move {
                let mut ws = ws_connect(at, source, SUBSCRIBER_READ_BUFFER).await?;
                ws_subscribe(&mut ws, TOPIC).await?;
                ready.send(()).await?;
                let mut samples = Samples::new(cap);
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Text(text) = message {
                        if let Some(data) = msg_data(text.as_str()) {
                            counters.on_payload(data, &mut samples);
                        } else if text.contains("\"type\":\"ping\"") {
                            let pong = text.replace("\"ping\"", "\"pong\"");
                            let _ = ws.send(Message::text(pong)).await;
                        }
                    }
                }
                counters.closed.fetch_add(1, Ordering::Relaxed);
                counters.keep(&mut samples);
                anyhow::Ok(())
            });
        }
    }
    drop(ready_tx);
    for _ in 0..subscribers {
        let ready = tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await;
        if !matches!(ready, Ok(Some(()))) {
            // A subscriber failed: its error says why.
            tasks.abort_all();
            while let Some(result) = tasks.join_next().await {
                if let Ok(Err(err)) = result {
                    return Err(err.context("subscriber"));
                }
            }
            bail!("subscribers did not all subscribe within 60 s");
        }
    }
    let mut publisher = if system == NATS {
        Publisher::Nats(Nats::connect(servers.publish_at, Some(ip(9))).await?)
    } else {
        Publisher::Ws(ws_connect(servers.publish_at, Some(ip(9)), 64 * 1024).await?)
    };
    let s = subscribers as u64;

    // Saturation: a window of messages in flight.
    let cpu_before = servers.cpu_seconds();
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < phase {
        let delivered = counters.delivered.load(Ordering::Relaxed);
        let in_flight = sent.saturating_sub(delivered / s);
        if in_flight < WINDOW {
            let batch = (WINDOW - in_flight).min(64);
            publisher.send(sent..sent + batch, size).await?;
            sent += batch;
        } else {
            tokio::task::yield_now().await;
        }
    }
    let tail_end = Instant::now() + TAIL;
    let alive = |c: &Counters| s - c.closed.load(Ordering::Relaxed).min(s);
    while counters.delivered.load(Ordering::Relaxed) < sent * alive(&counters)
        && Instant::now() < tail_end
    {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let delivered = counters.delivered.load(Ordering::Relaxed);
    let server_cpu = servers.cpu_seconds() - cpu_before;
    let deliveries_per_s = delivered as f64 / elapsed;
    let msgs_per_s = deliveries_per_s / s as f64;

    // Latency at half load: an even schedule.
    let rate = (msgs_per_s / 2.0).max(1.0);
    let start = Instant::now();
    let mut seq = 0u64;
    while start.elapsed() < phase {
        let due = (rate * start.elapsed().as_secs_f64()) as u64;
        if due > seq {
            publisher
                .send(LATENCY_SEQ + seq..LATENCY_SEQ + due, size)
                .await?;
            seq = due;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let target = delivered + seq * alive(&counters);
    let tail_end = Instant::now() + TAIL;
    while counters.delivered.load(Ordering::Relaxed) < target && Instant::now() < tail_end {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let closed = counters.closed.load(Ordering::Relaxed);
    drop(publisher);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let mut latencies = std::mem::take(
        &mut *counters
            .latencies_us
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    // Subscribers aborted mid-batch lose at most 31 samples each; enough remain.
    latencies.sort_by(f64::total_cmp);
    let p = |q| quantile(&latencies, q).map_or(f64::NAN, |us| us / 1000.0);
    Ok(Run {
        deliveries_per_s,
        msgs_per_s,
        p50_ms: p(0.5),
        p99_ms: p(0.99),
        closed,
        server_cpu_ns_per_delivery: server_cpu * 1e9 / delivered.max(1) as f64,
        server_cores: server_cpu / elapsed,
    })
}
