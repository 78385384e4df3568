//! Benchmarks of a streamfarm farm beside a peer, nats-server, on this machine and in the same
//! run: `streamfarm bench <what>`.
//!
//! Every benchmark starts its own servers as child processes — `streamfarm serve` (the same
//! binary) and `nats-server` — on 127.0.0.x addresses, drives them from this process, and kills
//! them when done (or when it fails: see [`proc`](crate)'s drop guard). Every load loop is bounded
//! in count and in time. Results are medians over repeats with their spread ([`Figure`]), printed
//! as tables and returned as a [`Report`] that serializes to JSON.
//!
//! It owns no server or client code: it drives the node through its documented interfaces
//! (`docs/PROTOCOL.md`), the failover through `streamfarm-client`, and nats-server through its
//! text protocol.
//!
//! # Layout
//! - [`report`] — [`Figure`], [`Row`], [`Section`], [`Report`], [`Machine`]: results and tables.
//! - `proc` — child processes with drop guards, RSS from /proc, tiny HTTP, RLIMIT_NOFILE.
//! - `wire` — the minimal streamfarm WebSocket and NATS clients, timestamped payloads.
//! - [`nats`] — finding/installing nats-server, single servers and routed clusters.
//! - `flow` — a publisher at a steady rate with sequence numbers, and per-client counts of lost,
//!   duplicated and out-of-order messages (failover's messages flowing).
//! - `idle`, `fanout` (also cross-node), `failover`, `convergence`, `connect_cost`, `rebalance`,
//!   `auth` — one module per benchmark, each `run(&Options) -> Section`.
//! - `topics` — subscribe rate, CPU and RSS per topic from 10^4 to 10^6 topics, a peer restart
//!   under a large interest.
//! - `balance` — bursts of arrivals on live farms (rebalancing off), each case beside the
//!   simulator's figure for it (`streamfarm_sim::burst`).
//! - `nats_farm` — a farm of 20 nodes relaying through NATS beside the embedded relay: relay
//!   links counted, messages across.
//! - `gossip` — convergence `--in-process`: chitchat farms of up to thousands of nodes in this
//!   process, over an in-memory transport, in simulated time.

use std::path::PathBuf;
use std::time::Duration;

mod auth;
mod balance;
mod connect_cost;
mod convergence;
mod failover;
mod fanout;
mod flow;
mod gossip;
mod idle;
pub mod nats;
mod nats_farm;
mod proc;
mod rebalance;
pub mod report;
mod topics;
mod wire;

pub use nats::{NatsServer, find_nats};
pub use report::{Figure, Machine, Report, Row, Section};

/// One benchmark, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Idle connections: RSS per connection, connect rate.
    Idle,
    /// One node, S subscribers, one publisher: deliveries/s, latency at half load.
    Fanout,
    /// Publisher on node 1, subscribers on nodes 2 and 3.
    CrossNode,
    /// A node with C clients killed, hung or partitioned, or the publisher's node killed, with
    /// messages flowing: lost/duplicated/out-of-order messages, time to resubscribed, attempts.
    Failover,
    /// Farm state reaching every node, for 3 to 100 nodes; failure detection.
    Convergence,
    /// Connect to the service → subscribed: list then chosen server, against direct.
    ConnectCost,
    /// Scale-out, rolling restart and failback with messages flowing: time to balance, moves
    /// against the minimum, lost/duplicated messages, time without a server.
    Rebalance,
    /// The cost of tokens and TLS: connects/s and fan-out deliveries/s, open vs tokens vs
    /// tokens over TLS.
    Auth,
    /// A farm of N nodes relaying through NATS, beside its embedded relay: relay links counted
    /// (`ss`, `/metrics`), messages lost/duplicated, latency.
    NatsFarm,
    /// Many topics: subscribe rate and CPU per new topic from 10^4 to 10^6 topics, RSS per topic,
    /// a peer restart under a large interest.
    Topics,
    /// Bursts of arrivals on 3 and 10 nodes with rebalancing off, each policy, through one list
    /// server and through the DNS name: max/mean when the last client connects, live and
    /// simulated.
    Balance,
    /// Every benchmark above, in that order.
    All,
}

impl Which {
    /// The benchmarks `self` stands for, with their section names.
    pub fn expand(self) -> Vec<(Which, &'static str)> {
        let all = [
            (Which::Idle, "idle"),
            (Which::Fanout, "fanout"),
            (Which::CrossNode, "cross-node"),
            (Which::Failover, "failover"),
            (Which::Convergence, "convergence"),
            (Which::ConnectCost, "connect-cost"),
            (Which::Rebalance, "rebalance"),
            (Which::Auth, "auth"),
            (Which::NatsFarm, "nats-farm"),
            (Which::Topics, "topics"),
            (Which::Balance, "balance"),
        ];
        all.into_iter()
            .filter(|(w, _)| self == Which::All || *w == self)
            .collect()
    }
}

/// Sizes and settings of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `streamfarm` binary whose `serve` runs the nodes.
    pub exe: PathBuf,
    /// The peer, if found.
    pub nats: Option<NatsServer>,
    /// Smoke mode: tiny sizes, seconds in all; figures meaningless.
    pub quick: bool,
    /// Repeats of each measurement.
    pub repeats: usize,
    /// Idle connections (capped by RLIMIT_NOFILE).
    pub connections: usize,
    /// Fan-out subscribers on one node.
    pub subscribers: usize,
    /// Cross-node subscribers on each of nodes 2 and 3.
    pub cross_subscribers: usize,
    /// Message sizes of fan-out, bytes.
    pub message_sizes: Vec<usize>,
    /// How long each throughput or latency phase runs.
    pub phase: Duration,
    /// Clients on the node killed in the failover benchmark.
    pub failover_clients: usize,
    /// Messages per second the failover benchmark's publisher sends, in all.
    pub publish_rate: f64,
    /// How long a node stays hung (SIGSTOP) or partitioned in the failover benchmark.
    pub hang: Duration,
    /// The failover benchmark's cases to run, by name (`killed`, `publisher-killed`, `hung`,
    /// `partitioned`); empty: all four.
    pub failover_cases: Vec<String>,
    /// Farm sizes of the convergence benchmark.
    pub farm_sizes: Vec<usize>,
    /// Convergence of chitchat instances in this process, in simulated time, instead of one
    /// `streamfarm serve` process per node (see `gossip`).
    pub in_process: bool,
    /// The gossip interval of the convergence benchmark's nodes (default: the node's default).
    pub gossip_interval_ms: Option<u64>,
    /// Samples of the connect-cost benchmark.
    pub connect_samples: usize,
    /// Rebalance: clients of the scale-out case (the rolling restart has 4/3 of it, the
    /// failback 2/3).
    pub rebalance_clients: usize,
    /// Rebalance: messages per second the publisher sends on the clients' topic.
    pub rebalance_publish_rate: f64,
    /// Nodes of the NATS farm benchmark.
    pub nats_farm_nodes: usize,
    /// Topics: the distinct topics of each subscribe run (clients × topics per client).
    pub topic_counts: Vec<usize>,
    /// Topics: topics each client subscribes to.
    pub topics_per_client: usize,
    /// Balance: the farm sizes (3 and 10), each with its client counts.
    pub balance_farms: Vec<(usize, Vec<usize>)>,
    /// Balance: arrivals per second.
    pub balance_rates: Vec<f64>,
    /// Balance: where clients get their lists.
    pub balance_vias: Vec<streamfarm_sim::burst::Via>,
    /// Balance: the policies the clients select with.
    pub balance_policies: Vec<streamfarm_core::Policy>,
}

impl Options {
    /// The full-size run described in BENCHMARKS.md.
    pub fn full(exe: PathBuf, nats: Option<NatsServer>) -> Options {
        Options {
            exe,
            nats,
            quick: false,
            repeats: 3,
            connections: 50_000,
            subscribers: 1000,
            cross_subscribers: 50,
            message_sizes: vec![64, 1024],
            phase: Duration::from_secs(4),
            failover_clients: 2000,
            publish_rate: 1000.0,
            hang: Duration::from_secs(10),
            failover_cases: Vec::new(),
            farm_sizes: vec![3, 10, 50, 100],
            in_process: false,
            gossip_interval_ms: None,
            connect_samples: 200,
            rebalance_clients: 900,
            rebalance_publish_rate: 100.0,
            nats_farm_nodes: 20,
            topic_counts: vec![10_000, 100_000, 1_000_000],
            topics_per_client: 1000,
            balance_farms: vec![(3, vec![300, 900]), (10, vec![1000, 3000])],
            balance_rates: vec![100.0, 1000.0, 10_000.0],
            balance_vias: vec![
                streamfarm_sim::burst::Via::ListServer,
                streamfarm_sim::burst::Via::Dns,
            ],
            balance_policies: streamfarm_core::Policy::ALL.to_vec(),
        }
    }

    /// The smoke run: every code path, tiny sizes.
    pub fn quick(exe: PathBuf, nats: Option<NatsServer>) -> Options {
        Options {
            exe,
            nats,
            quick: true,
            repeats: 1,
            connections: 200,
            subscribers: 10,
            cross_subscribers: 3,
            message_sizes: vec![64],
            phase: Duration::from_millis(300),
            failover_clients: 20,
            publish_rate: 200.0,
            hang: Duration::from_secs(1),
            failover_cases: Vec::new(),
            farm_sizes: vec![3],
            in_process: false,
            gossip_interval_ms: None,
            connect_samples: 5,
            rebalance_clients: 30,
            rebalance_publish_rate: 100.0,
            nats_farm_nodes: 4,
            topic_counts: vec![1_000, 4_000],
            topics_per_client: 200,
            balance_farms: vec![(3, vec![60])],
            balance_rates: vec![200.0],
            balance_vias: vec![
                streamfarm_sim::burst::Via::ListServer,
                streamfarm_sim::burst::Via::Dns,
            ],
            balance_policies: vec![streamfarm_core::Policy::default()],
        }
    }
}

/// Runs `which`, printing each section's table as it completes and handing the report so far to
/// `on_section` after each (the CLI writes its JSON file there, so a run that is cut short keeps
/// what it measured). A measurement that fails is a row marked `failed` (or, when the benchmark
/// cannot start at all, a section with a `failed:` note) and the others still run.
pub async fn run(which: Which, options: &Options, mut on_section: impl FnMut(&Report)) -> Report {
    let mut report = Report {
        machine: Machine::detect(),
        nats_server: options.nats.as_ref().map(|n| n.version.clone()),
        quick: options.quick,
        sections: Default::default(),
    };
    println!(
        "machine: {} cores, {} MiB, load {}; nats-server: {}",
        report.machine.cores,
        report.machine.memory_kib / 1024,
        report.machine.loadavg_at_start,
        report.nats_server.as_deref().unwrap_or("not found")
    );
    for (bench, name) in which.expand() {
        let result = match bench {
            Which::Idle => idle::run(options).await,
            Which::Fanout => fanout::run(options, fanout::Shape::OneNode).await,
            Which::CrossNode => fanout::run(options, fanout::Shape::CrossNode).await,
            Which::Failover => failover::run(options).await,
            Which::Convergence => convergence::run(options).await,
            Which::ConnectCost => connect_cost::run(options).await,
            Which::Rebalance => rebalance::run(options).await,
            Which::Auth => auth::run(options).await,
            Which::NatsFarm => nats_farm::run(options).await,
            Which::Topics => topics::run(options).await,
            Which::Balance => balance::run(options).await,
            Which::All => unreachable!("expand() lists single benchmarks"),
        };
        let mut section = result.unwrap_or_else(|err| Section {
            rows: Vec::new(),
            notes: vec![format!("failed: {err:#}")],
        });
        if options.nats.is_none() {
            section.notes.push("nats-server: not found".to_string());
        }
        println!("{}", section.render(name));
        report.sections.insert(name.to_string(), section);
        on_section(&report);
        if streamfarm_localfarm::partition::was_interrupted() {
            eprintln!("interrupted: the benchmarks after {name} are not run");
            break;
        }
    }
    report
}

/// `a / b` as a note-ready ratio, or `n/a`.
pub(crate) fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}", a / b),
        _ => "n/a".to_string(),
    }
}

/// The name under which a system's rows appear.
pub(crate) const STREAMFARM: &str = "streamfarm";
/// The name under which the rows of streamfarm relaying through a nats-server appear
/// (`relay = "nats://…"`, see `docs/NATS.md`).
pub(crate) const STREAMFARM_NATS: &str = "streamfarm+nats";
/// The name under which the rows of streamfarm's clients over server-sent events appear
/// (`GET /sse`), beside its WebSocket clients' rows.
pub(crate) const STREAMFARM_SSE: &str = "streamfarm-sse";
/// The name under which the peer's rows appear.
pub(crate) const NATS: &str = "nats-server";
