//! Convergence of large farms without a process per node (`streamfarm bench convergence
//! --in-process`): N chitchat instances in this process, gossiping over chitchat's in-memory
//! `ChannelTransport` with exactly the settings and key-value state a `streamfarm serve` node
//! uses ([`streamfarm_node::chitchat_config`], [`streamfarm_node::gossip_key_values`]).
//!
//! **Simulated time.** Each farm runs on its own single-threaded Tokio runtime whose clock is
//! paused: when every task waits, the clock jumps to the next timer. So a gossip round costs no
//! time however long its CPU work takes, and the figures are those of the protocol with every
//! node on a CPU of its own and a network without delay — what a farm of N machines would see,
//! not what N nodes squeezed onto this machine's cores would. The CPU that work costs is reported
//! beside it (`cpu_us_per_node_round`), so the real cost per machine can be read too.
//!
//! The transport keeps the UDP limit: a datagram above 65 507 bytes is not delivered, as it could
//! not be sent, and each node's inbox holds 100 datagrams (chitchat's), like a socket buffer.
//! Nodes start 10 ms apart (100 a second: a farm being rolled out), or closer so that all start
//! within a second, all joining through the first, as in the multi-process benchmark.
//!
//! Measured per farm size N:
//! - `settle_ms`: from the last start until every node holds every node's state;
//! - `change_{p50,p99,every}_node_ms`: a new `users` value written on node k (what a node does
//!   when a client connects), until each node's chitchat holds it — the median node, the 99th
//!   percentile node, the last node. A running node adds up to one gossip interval on top: it
//!   writes its own value and reads its peers' at ticks of half an interval (see `membership`);
//! - per node and gossip round, in a steady farm: datagrams sent and bytes sent; the largest Syn
//!   (a full digest), SynAck (digest + delta) and Ack seen; CPU time.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{ChitchatEnvelope, ChitchatHandle, ChitchatMessage, ListenerHandle};
use streamfarm_node::NodeConfig;
use tokio::time::Instant;

use crate::report::{RowBuilder, Section, quantile};
use crate::{Options, ratio};

/// What the in-process rows are called.
pub(crate) const SYSTEM: &str = "in-process";
/// The largest UDP payload: chitchat's own limit, kept by the in-memory transport.
const MAX_DATAGRAM: usize = 65_507;
/// Time between two node starts: 10 ms, or less so that a farm starts within a second.
fn stagger(n: usize) -> Duration {
    Duration::from_millis(10).min(Duration::from_secs(1) / n as u32)
}
/// Longest wait for one change to reach every node (simulated time).
const REACH: Duration = Duration::from_secs(30);
/// Steady window over which bytes, datagrams and CPU per round are measured (simulated time).
const STEADY: Duration = Duration::from_secs(1);

/// Counts of one kind of datagram.
#[derive(Debug, Default)]
struct Kind {
    count: AtomicU64,
    bytes: AtomicU64,
    max: AtomicU64,
}

impl Kind {
    fn record(&self, bytes: usize) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.max.fetch_max(bytes as u64, Ordering::Relaxed);
    }
}

/// What went over the wire, by kind of message.
#[derive(Debug, Default)]
struct Traffic {
    syn: Kind,
    syn_ack: Kind,
    ack: Kind,
    /// Datagrams above [`MAX_DATAGRAM`]: not delivered.
    too_big: AtomicU64,
}

impl Traffic {
    fn totals(&self) -> (u64, u64) {
        let kinds = [&self.syn, &self.syn_ack, &self.ack];
        (
            kinds.iter().map(|k| k.count.load(Ordering::Relaxed)).sum(),
            kinds.iter().map(|k| k.bytes.load(Ordering::Relaxed)).sum(),
        )
    }

    fn reset_max(&self) {
        for kind in [&self.syn, &self.syn_ack, &self.ack] {
            kind.max.store(0, Ordering::Relaxed);
        }
    }
}

/// chitchat's in-memory transport, with every datagram counted by kind.
struct Measured {
    inner: ChannelTransport,
    traffic: Arc<Traffic>,
}

struct MeasuredSocket {
    inner: Box<dyn Socket>,
    traffic: Arc<Traffic>,
}

#[async_trait]
impl Transport for Measured {
    async fn open(&self, addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(MeasuredSocket {
            inner: self.inner.open(addr).await?,
            traffic: self.traffic.clone(),
        }))
    }
}

#[async_trait]
impl Socket for MeasuredSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let kind = match &envelope.message {
            ChitchatMessage::Syn { .. } => Some(&self.traffic.syn),
            ChitchatMessage::SynAck { .. } => Some(&self.traffic.syn_ack),
            ChitchatMessage::Ack { .. } => Some(&self.traffic.ack),
            _ => None,
        };
        match self.inner.send(to, envelope).await {
            Ok(outcome) => {
                if let Some(kind) = kind {
                    kind.record(outcome.num_bytes_sent);
                }
                Ok(outcome)
            }
            Err(err) => {
                // The channel transport refuses a datagram over its MTU, as UDP would.
                self.traffic.too_big.fetch_add(1, Ordering::Relaxed);
                Err(err)
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.inner.recv().await
    }
}

/// The change being watched for, and when each node saw it.
#[derive(Debug, Default)]
struct Probe {
    node: Option<Arc<str>>,
    value: String,
    seen: Vec<Option<Instant>>,
}

fn lock(probe: &Mutex<Probe>) -> std::sync::MutexGuard<'_, Probe> {
    probe.lock().unwrap_or_else(|e| e.into_inner())
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8)),
        7946,
    )
}

/// The settings of the gossip under test: the node's defaults, or the interval asked for.
fn node_config(options: &Options, name: &str, seed: Option<SocketAddr>) -> NodeConfig {
    let mut config = NodeConfig::new(name);
    if let Some(ms) = options.gossip_interval_ms {
        config.gossip_interval_ms = ms;
        config.failure_timeout_ms = config.failure_timeout_ms.max(2 * ms);
    }
    config.join = seed.iter().map(ToString::to_string).collect();
    config
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Section> {
    let mut section = Section::default();
    for &n in &options.farm_sizes {
        let options = options.clone();
        // Its own runtime, with a paused clock, on a thread of its own.
        let outcome = tokio::task::spawn_blocking(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .context("simulated-time runtime")?;
            let mut row = RowBuilder::default();
            let outcome = runtime.block_on(farm(&options, n, &mut row));
            anyhow::Ok((row, outcome))
        })
        .await
        .context("in-process farm")
        .and_then(|r| r);
        let row = match outcome {
            Ok((row, outcome)) => row.finish(
                SYSTEM,
                format!("N={n}"),
                outcome.context(format!("farm of {n}")),
            ),
            Err(err) => RowBuilder::default().finish(SYSTEM, format!("N={n}"), Err(err)),
        };
        println!(
            "{}",
            Section {
                rows: vec![row.clone()],
                notes: Vec::new()
            }
            .render("convergence --in-process (so far)")
        );
        section.rows.push(row);
    }
    for row in &section.rows {
        let p99 = row.figures.get("change_p99_node_ms").map(|f| f.max);
        let target = match row.setting.as_str() {
            "N=1000" => Some(3000.0),
            "N=300" => Some(2000.0),
            _ => None,
        };
        if let (Some(p99), Some(target)) = (p99, target) {
            section.notes.push(format!(
                "{}: p99 node saw a change after {p99:.0} ms (worst run, simulated time); target <= {target:.0} ms: {}",
                row.setting,
                if p99 <= target { "met" } else { "NOT met" }
            ));
        }
    }
    let interval = options
        .gossip_interval_ms
        .unwrap_or_else(|| NodeConfig::new("x").gossip_interval_ms);
    section.notes.push(format!(
        "in-process: chitchat instances over an in-memory transport in simulated time (a CPU per node, no network delay), gossip interval {interval} ms; a running node adds up to one interval (its own ticks); cpu_us_per_node_round is this process's CPU per node and round"
    ));
    if let (Some(a), Some(b)) = (
        section.median(SYSTEM, "N=1000", "bytes_per_node_round"),
        section.median(SYSTEM, "N=100", "bytes_per_node_round"),
    ) {
        section.notes.push(format!(
            "bytes per node and round N=1000/N=100 = {}",
            ratio(Some(a), Some(b))
        ));
    }
    Ok(section)
}

/// One farm of `n`, measured into `row`.
async fn farm(options: &Options, n: usize, row: &mut RowBuilder) -> anyhow::Result<()> {
    anyhow::ensure!(n >= 2, "a farm needs two nodes");
    let traffic = Arc::new(Traffic::default());
    let transport = Measured {
        inner: ChannelTransport::with_mtu(MAX_DATAGRAM),
        traffic: traffic.clone(),
    };
    let probe = Arc::new(Mutex::new(Probe {
        seen: vec![None; n],
        ..Probe::default()
    }));
    let names: Vec<Arc<str>> = (0..n).map(|i| Arc::from(format!("n{i}"))).collect();
    let mut handles: Vec<ChitchatHandle> = Vec::with_capacity(n);
    let mut listeners: Vec<ListenerHandle> = Vec::with_capacity(n);
    let interval = node_config(options, "x", None).gossip_interval();
    for (i, name) in names.iter().enumerate() {
        let seed = (i > 0).then(|| addr(0));
        let config = node_config(options, name, seed);
        let at = addr(i);
        let chitchat_config = streamfarm_node::chitchat_config(&config, name, 1, at);
        let values = streamfarm_node::gossip_key_values(
            name,
            &format!("ws://{}:7400/stream", at.ip()),
            &format!("ws://{}:7400/internal/relay", at.ip()),
            0,
        );
        let handle = chitchat::spawn_chitchat(chitchat_config, values, &transport)
            .await
            .with_context(|| format!("node {i}"))?;
        let seen = probe.clone();
        let listener = handle.chitchat().lock().await.subscribe_event(
            streamfarm_node::USERS_KEY,
            move |event| {
                let mut probe = lock(&seen);
                if probe.seen[i].is_none()
                    && probe.node.as_deref() == Some(&*event.node.node_id)
                    && probe.value == event.value
                {
                    probe.seen[i] = Some(Instant::now());
                }
            },
        );
        listeners.push(listener);
        handles.push(handle);
        tokio::time::sleep(stagger(n)).await;
    }

    // Settled: every node holds every node's state.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        let mut settled = true;
        for handle in &handles {
            let chitchat = handle.chitchat();
            let guard = chitchat.lock().await;
            let known = guard
                .node_states()
                .values()
                .filter(|s| s.get(streamfarm_node::USERS_KEY).is_some())
                .count();
            if known < n {
                settled = false;
                break;
            }
        }
        if settled {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the farm did not settle within {:?} (simulated); datagrams over the UDP limit: {}",
            deadline - started,
            traffic.too_big.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    row.add("settle_ms", started.elapsed().as_secs_f64() * 1000.0);

    // A steady window: what each node sends per round, and what that costs.
    traffic.reset_max();
    let (count0, bytes0) = traffic.totals();
    let cpu0 = crate::proc::cpu_seconds(std::process::id()).unwrap_or(0.0);
    let wall0 = std::time::Instant::now();
    tokio::time::sleep(STEADY).await;
    let cpu = crate::proc::cpu_seconds(std::process::id()).unwrap_or(0.0) - cpu0;
    let (count1, bytes1) = traffic.totals();
    let node_rounds = n as f64 * (STEADY.as_secs_f64() / interval.as_secs_f64());
    row.add(
        "datagrams_per_node_round",
        (count1 - count0) as f64 / node_rounds,
    );
    row.add(
        "bytes_per_node_round",
        (bytes1 - bytes0) as f64 / node_rounds,
    );
    row.add(
        "syn_max_bytes",
        traffic.syn.max.load(Ordering::Relaxed) as f64,
    );
    row.add(
        "synack_max_bytes",
        traffic.syn_ack.max.load(Ordering::Relaxed) as f64,
    );
    row.add(
        "ack_max_bytes",
        traffic.ack.max.load(Ordering::Relaxed) as f64,
    );
    row.add("cpu_us_per_node_round", cpu * 1e6 / node_rounds);
    row.add(
        "wall_s_per_simulated_s",
        wall0.elapsed().as_secs_f64() / STEADY.as_secs_f64(),
    );

    // Changes: a new users value on node k, until every node holds it.
    for r in 0..options.repeats.max(1) {
        let k = 1 + r % (n - 1);
        let value = (1000 + r).to_string();
        {
            let mut probe = lock(&probe);
            probe.node = Some(names[k].clone());
            probe.value = value.clone();
            probe.seen = vec![None; n];
            probe.seen[k] = Some(Instant::now());
        }
        let t0 = Instant::now();
        handles[k]
            .with_chitchat(|c| c.self_node_state().set(streamfarm_node::USERS_KEY, &value))
            .await;
        let deadline = t0 + REACH;
        loop {
            let missing = lock(&probe).seen.iter().filter(|s| s.is_none()).count();
            if missing == 0 {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "a change on node {k} did not reach {missing} of {n} nodes within {REACH:?} (simulated)"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut times: Vec<f64> = lock(&probe)
            .seen
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != k)
            .filter_map(|(_, s)| s.map(|t| t.duration_since(t0).as_secs_f64() * 1000.0))
            .collect();
        times.sort_by(f64::total_cmp);
        for (name, q) in [
            ("change_p50_node_ms", 0.5),
            ("change_p99_node_ms", 0.99),
            ("change_every_node_ms", 1.0),
        ] {
            if let Some(v) = quantile(&times, q) {
                row.add(name, v);
            }
        }
    }
    let too_big = traffic.too_big.load(Ordering::Relaxed);
    row.add("datagrams_over_udp_limit", too_big as f64);
    drop(listeners);
    for handle in handles {
        handle.abort();
    }
    Ok(())
}
