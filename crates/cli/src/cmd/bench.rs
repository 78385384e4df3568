//! `streamfarm bench`: benchmarks beside nats-server (see `BENCHMARKS.md` and `streamfarm-bench`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use streamfarm_bench::{Options, Which, find_nats};

/// Arguments of `streamfarm bench`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// What to measure.
    #[arg(value_enum)]
    what: What,
    /// Tiny sizes, seconds in all: a smoke test, figures meaningless.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON results (default bench/results/<what>-<unix time>.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Repeats of each measurement (default 3, 1 with --quick).
    #[arg(long)]
    repeats: Option<usize>,
    /// Idle connections (default 50000; capped by RLIMIT_NOFILE).
    #[arg(long)]
    connections: Option<usize>,
    /// Fan-out subscribers (default 1000).
    #[arg(long)]
    subscribers: Option<usize>,
    /// Failover clients (default 2000); rebalance: clients of the scale-out case (default 900;
    /// the rolling restart has 4/3 of it, the failback 2/3).
    #[arg(long)]
    clients: Option<usize>,
    /// Failover: messages per second the publisher sends, in all (default 1000; 200 with --quick).
    #[arg(long)]
    rate: Option<f64>,
    /// Failover: seconds a node stays hung (SIGSTOP) or partitioned (default 10; 1 with --quick).
    #[arg(long)]
    hang_secs: Option<f64>,
    /// Failover: the cases to run, comma-separated: killed, publisher-killed, hung, partitioned
    /// (default all four).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Convergence farm sizes, comma-separated (default 3,10,50,100).
    #[arg(long, value_delimiter = ',')]
    farm_sizes: Vec<usize>,
    /// Convergence: chitchat instances in this process over an in-memory transport, in simulated
    /// time, instead of one `streamfarm serve` process per node (for farms of hundreds to
    /// thousands of nodes).
    #[arg(long)]
    in_process: bool,
    /// Convergence: the nodes' gossip interval in ms (default: the node's default).
    #[arg(long)]
    gossip_interval_ms: Option<u64>,
    /// Balance: farms as NODESxCLIENTS, comma-separated (default 3x300,3x900,10x1000,10x3000).
    #[arg(long, value_delimiter = ',')]
    farms: Vec<String>,
    /// Balance: arrivals per second, comma-separated (default 100,1000,10000).
    #[arg(long, value_delimiter = ',')]
    arrival_rates: Vec<f64>,
    /// Balance: where clients get their lists, comma-separated: list-server, dns (default both).
    #[arg(long, value_delimiter = ',')]
    via: Vec<String>,
    /// Balance: the clients' policies, comma-separated (default all).
    #[arg(long, value_delimiter = ',')]
    policy: Vec<streamfarm_core::Policy>,
    /// NATS farm: nodes (default 20; 4 with --quick).
    #[arg(long)]
    nodes: Option<usize>,
    /// Seconds per throughput or latency phase (default 4).
    #[arg(long)]
    phase_secs: Option<f64>,
    /// Topics: the distinct topics of each subscribe run, comma-separated (default
    /// 10000,100000,1000000).
    #[arg(long, value_delimiter = ',')]
    topic_counts: Vec<usize>,
    /// Topics: topics each client subscribes to (default 1000).
    #[arg(long)]
    topics_per_client: Option<usize>,
    /// Do not install nats-server with apt-get when it is not on PATH.
    #[arg(long)]
    no_install: bool,
    /// The binary whose `serve` runs the nodes (default: this one); for before/after comparisons
    /// of a node change with the same harness.
    #[arg(long)]
    node_exe: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum What {
    Idle,
    Fanout,
    CrossNode,
    Failover,
    Convergence,
    ConnectCost,
    Rebalance,
    /// Tokens and TLS on vs off: connects/s, fan-out deliveries/s.
    Auth,
    /// N nodes relaying through NATS beside the embedded relay: relay links counted.
    NatsFarm,
    /// Many topics: subscribe rate and CPU per new topic at 10^4 to 10^6 topics, RSS per topic.
    Topics,
    /// Arrival bursts on live farms, each policy, beside the simulator.
    Balance,
    All,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let exe = match args.node_exe.clone() {
        Some(exe) => exe,
        None => std::env::current_exe().context("cannot find the streamfarm binary")?,
    };
    // The smoke run never installs anything; a full run finds or installs the peer.
    let nats = find_nats(!args.quick && !args.no_install);
    let mut options = if args.quick {
        Options::quick(exe, nats)
    } else {
        Options::full(exe, nats)
    };
    if let Some(r) = args.repeats {
        options.repeats = r.max(1);
    }
    if let Some(c) = args.connections {
        options.connections = c;
    }
    if let Some(s) = args.subscribers {
        options.subscribers = s.max(1);
    }
    if let Some(c) = args.clients {
        options.failover_clients = c.max(1);
        options.rebalance_clients = c.max(3);
    }
    if let Some(rate) = args.rate {
        anyhow::ensure!(rate > 0.0 && rate.is_finite(), "--rate must be above 0");
        options.publish_rate = rate;
    }
    if let Some(secs) = args.hang_secs {
        anyhow::ensure!(
            secs >= 0.0 && secs.is_finite(),
            "--hang-secs must be 0 or more"
        );
        options.hang = std::time::Duration::from_secs_f64(secs);
    }
    options.failover_cases = args.cases.clone();
    if !args.farm_sizes.is_empty() {
        options.farm_sizes = args.farm_sizes.clone();
    }
    options.in_process = args.in_process;
    if !args.topic_counts.is_empty() {
        options.topic_counts = args.topic_counts.clone();
    }
    if let Some(t) = args.topics_per_client {
        anyhow::ensure!(
            (1..=1024).contains(&t),
            "--topics-per-client must be between 1 and 1024"
        );
        options.topics_per_client = t;
    }
    options.gossip_interval_ms = args.gossip_interval_ms;
    if let Some(nodes) = args.nodes {
        anyhow::ensure!(
            (2..=250).contains(&nodes),
            "--nodes must be between 2 and 250"
        );
        options.nats_farm_nodes = nodes;
    }
    if !args.farms.is_empty() {
        let mut farms: Vec<(usize, Vec<usize>)> = Vec::new();
        for farm in &args.farms {
            let parsed = farm
                .split_once('x')
                .and_then(|(n, c)| Some((n.trim().parse().ok()?, c.trim().parse().ok()?)))
                .filter(|&(n, c): &(usize, usize)| n >= 2 && c >= n);
            let Some((nodes, clients)) = parsed else {
                anyhow::bail!(
                    "--farms {farm:?}: expected NODESxCLIENTS with at least 2 nodes and a client per node, e.g. 3x300"
                );
            };
            match farms.iter_mut().find(|(n, _)| *n == nodes) {
                Some((_, sizes)) => sizes.push(clients),
                None => farms.push((nodes, vec![clients])),
            }
        }
        options.balance_farms = farms;
    }
    if !args.arrival_rates.is_empty() {
        anyhow::ensure!(
            args.arrival_rates.iter().all(|r| *r > 0.0 && r.is_finite()),
            "--arrival-rates must be above 0"
        );
        options.balance_rates = args.arrival_rates.clone();
    }
    if !args.via.is_empty() {
        options.balance_vias = args
            .via
            .iter()
            .map(|v| match v.as_str() {
                "list-server" => Ok(streamfarm_sim::burst::Via::ListServer),
                "dns" => Ok(streamfarm_sim::burst::Via::Dns),
                other => Err(anyhow::anyhow!(
                    "--via {other:?}: expected list-server or dns"
                )),
            })
            .collect::<anyhow::Result<_>>()?;
    }
    if !args.policy.is_empty() {
        options.balance_policies = args.policy.clone();
    }
    if let Some(secs) = args.phase_secs {
        options.phase = std::time::Duration::from_secs_f64(secs.max(0.05));
    }
    let which = match args.what {
        What::Idle => Which::Idle,
        What::Fanout => Which::Fanout,
        What::CrossNode => Which::CrossNode,
        What::Failover => Which::Failover,
        What::Convergence => Which::Convergence,
        What::ConnectCost => Which::ConnectCost,
        What::Rebalance => Which::Rebalance,
        What::Auth => Which::Auth,
        What::NatsFarm => Which::NatsFarm,
        What::Topics => Which::Topics,
        What::Balance => Which::Balance,
        What::All => Which::All,
    };
    let out = match args.out {
        Some(path) => path,
        None => {
            let stamp = streamfarm_core::time::unix_ms(std::time::SystemTime::now()) / 1000;
            let name = which.expand().first().map_or("all", |(_, n)| *n);
            let name = if matches!(which, Which::All) {
                "all"
            } else {
                name
            };
            PathBuf::from(format!("bench/results/{name}-{stamp}.json"))
        }
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let write = |report: &streamfarm_bench::Report| -> anyhow::Result<()> {
        std::fs::write(&out, serde_json::to_string_pretty(report)?)
            .with_context(|| format!("cannot write {}", out.display()))
    };
    // Written after every section, so what finished is kept whatever happens to the rest.
    let report = streamfarm_bench::run(which, &options, |report| {
        if let Err(err) = write(report) {
            eprintln!("{err:#}");
        }
    })
    .await;
    write(&report)?;
    println!("results: {}", out.display());
    let failed = report.sections.values().any(|s| s.has_failure());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
