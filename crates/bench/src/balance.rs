//! Balance under arrival bursts: live farms and the simulator, side by side.
//!
//! For each case — `N` nodes (group A, `--rebalance false`, so that only the clients' own choice
//! counts), `C` clients arriving at `R` per second, through one list server (every client's
//! service address is the first node) or through the DNS name (every node's address, which the
//! client's resolver shuffles per client as it does the answers of a round-robin name), and a
//! selection policy — the clients are started by this process with `streamfarm-client`, in
//! batches every 10 ms, and each one's server is read from its `Connected` event. The figure is
//! max/mean of clients per node at the moment the last one connects. Beside it: the rate at which
//! the box started clients (a shared 2-core box caps it), the median time from a client's start to
//! its connection, and the simulator's figure for the same case at that rate, batch size and
//! connect time ([`streamfarm_sim::burst`], the median over 21 seeds, clients picking from their
//! list connection's greeting as the Rust client does).
//!
//! Between runs every client closes, and the next run waits until every node lists 0 users and a
//! join rate of 0 (the nodes measure it over 5 s), as the simulator's farm starts.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use streamfarm_client::{ClientOptions, Event, ServiceAddress};
use streamfarm_core::{FarmList, Policy};
use streamfarm_sim::burst::{self, Burst, Via};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::proc::{NodeProc, NodeSpec, free_port, http, poll, raise_nofile};
use crate::report::{RowBuilder, Section};
use crate::{Options, STREAMFARM};

/// Seeds of the simulator per case.
const SIM_SEEDS: u64 = 21;

/// One case of the benchmark.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Case {
    pub(crate) nodes: usize,
    pub(crate) clients: usize,
    pub(crate) rate: f64,
    pub(crate) via: Via,
    pub(crate) policy: Policy,
}

impl Case {
    fn setting(&self) -> String {
        format!(
            "{} nodes, {} clients at {}/s via {}, {}",
            self.nodes,
            self.clients,
            self.rate,
            self.via.name(),
            self.policy
        )
    }
}

/// The cases of a run: every farm size with its client counts × rate × via × policy (by default
/// 3 and 10 nodes, 300 to 3 000 clients, 100 to 10 000 arrivals/s, one list server and DNS, every
/// policy; the quick run: 60 clients on 3 nodes at 200/s, the default policy).
pub(crate) fn cases(options: &Options) -> Vec<Case> {
    let mut cases = Vec::new();
    for (nodes, sizes) in &options.balance_farms {
        let nodes = *nodes;
        for &clients in sizes {
            for &rate in &options.balance_rates {
                for &via in &options.balance_vias {
                    for policy in &options.balance_policies {
                        cases.push(Case {
                            nodes,
                            clients,
                            rate,
                            via,
                            policy: *policy,
                        });
                    }
                }
            }
        }
    }
    cases
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Section> {
    raise_nofile();
    let mut section = Section::default();
    let cases = cases(options);
    let mut sizes: Vec<usize> = cases.iter().map(|c| c.nodes).collect();
    sizes.dedup();
    for nodes in sizes {
        let farm = Farm::start(options, nodes).await?;
        for case in cases.iter().filter(|c| c.nodes == nodes) {
            let mut row = RowBuilder::default();
            let outcome = async {
                for run in 0..options.repeats {
                    let live = farm.burst(case, run as u64).await?;
                    row.add("max_over_mean", live.max_over_mean);
                    row.add("started_per_s", live.rate);
                    let mut model =
                        Burst::new(case.nodes, case.clients as u64, live.rate, case.via);
                    model.connect_delay = live.connect_delay;
                    model.batch = per_batch(case.rate) as u64;
                    row.add(
                        "sim_max_over_mean",
                        burst::median(&model, case.policy, 1, SIM_SEEDS),
                    );
                    row.add("connect_ms", live.connect_delay * 1000.0);
                }
                anyhow::Ok(())
            }
            .await;
            let row = row.finish(STREAMFARM, case.setting(), outcome);
            print_row(&row);
            section.rows.push(row);
        }
    }
    section.notes.push(
        "max/mean of clients per node when the last client connects; sim: the simulator's median \
         over 21 seeds at the achieved rate and the measured connect time; rebalancing off"
            .to_string(),
    );
    Ok(section)
}

/// Clients started together, a batch every 10 ms: as many as `rate` arrivals per second make.
fn per_batch(rate: f64) -> usize {
    ((rate / 100.0).ceil() as usize).max(1)
}

fn print_row(row: &crate::report::Row) {
    let figure = |name: &str| row.figures.get(name).map_or(f64::NAN, |f| f.median);
    println!(
        "  {}: live {:.3}  sim {:.3}  (started {:.0}/s, connected after {:.1} ms)",
        row.setting,
        figure("max_over_mean"),
        figure("sim_max_over_mean"),
        figure("started_per_s"),
        figure("connect_ms"),
    );
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 6, last))
}

/// Clients' source addresses: 127.0.7.1–8, so that many clients do not run out of ports.
fn client_source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 7, 1 + (i % 8) as u8))
}

/// What one live burst gave.
pub(crate) struct Live {
    pub(crate) max_over_mean: f64,
    /// Clients started per second: the rate the box achieved, from the first start to the last.
    pub(crate) rate: f64,
    /// Median seconds from a client's start to its connection.
    pub(crate) connect_delay: f64,
}

/// A farm of `N` nodes that do not rebalance.
pub(crate) struct Farm {
    nodes: Vec<NodeProc>,
}

impl Farm {
    pub(crate) async fn start(options: &Options, n: usize) -> anyhow::Result<Farm> {
        let mut nodes: Vec<NodeProc> = Vec::new();
        for i in 0..n {
            let mut spec = NodeSpec::new(format!("b{i}"), free_port(ip(1 + i as u8))?)
                .flags(["--rebalance", "false"]);
            if let Some(first) = nodes.first() {
                spec = spec.join(first.listen);
            }
            nodes.push(NodeProc::start(&options.exe, &spec).await?);
        }
        let farm = Farm { nodes };
        farm.until_quiet().await?;
        Ok(farm)
    }

    fn addresses(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.listen).collect()
    }

    /// Waits until every node is listed UP with no users and no join rate, on every node's list.
    async fn until_quiet(&self) -> anyhow::Result<()> {
        let addresses = self.addresses();
        let n = addresses.len();
        poll(
            "every node listed UP, empty and quiet",
            Duration::from_secs(60),
            Duration::from_millis(200),
            || {
                let addresses = addresses.clone();
                async move {
                    for address in addresses {
                        let text = http(address, "GET", "/farm", &[], "").await.ok()?;
                        let list: FarmList = serde_json::from_str(&text).ok()?;
                        let quiet = list.servers.len() == n
                            && list.servers.iter().all(|s| {
                                s.status.is_live() && s.users == 0 && s.join_rate == Some(0.0)
                            });
                        if !quiet {
                            return None;
                        }
                    }
                    Some(())
                }
            },
        )
        .await
    }

    /// Starts `case.clients` clients at `case.rate`, waits until all have connected, and reads
    /// where they are; then closes them and waits for the farm to be quiet again. The clients'
    /// seeds differ from one `run` to the next.
    pub(crate) async fn burst(&self, case: &Case, run: u64) -> anyhow::Result<Live> {
        let addresses = self.addresses();
        let service: ServiceAddress = match case.via {
            Via::ListServer => addresses[0].to_string(),
            Via::Dns => addresses
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
        .parse()
        .context("service address")?;
        let (connected_tx, mut connected_rx) =
            mpsc::channel::<(usize, String, Duration)>(case.clients);
        let mut tasks = JoinSet::new();
        let started_count = Arc::new(AtomicUsize::new(0));
        let per_batch = per_batch(case.rate);
        let begin = Instant::now();
        let mut last_start = begin;
        let mut closers = Vec::new();
        for k in 0..case.clients {
            if k > 0 && k % per_batch == 0 {
                let due = begin + Duration::from_secs_f64(k as f64 / case.rate);
                tokio::time::sleep_until(due).await;
            }
            let options = ClientOptions::new()
                .policy(case.policy)
                .source_address(client_source(k))
                .seed(run * case.clients as u64 + k as u64 + 1);
            let mut client = streamfarm_client::Client::start(service.clone(), options);
            let (tx, count) = (connected_tx.clone(), started_count.clone());
            let (close_tx, close_rx) = tokio::sync::oneshot::channel::<()>();
            closers.push(close_tx);
            let started = Instant::now();
            last_start = started;
            count.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(async move {
                let mut close_rx = close_rx;
                loop {
                    tokio::select! {
                        _ = &mut close_rx => break,
                        event = client.next_event() => match event {
                            Some(Event::Connected { server, .. }) => {
                                let _ = tx.try_send((k, server, started.elapsed()));
                            }
                            Some(_) => {}
                            None => break,
                        },
                    }
                }
                client.close().await;
            });
        }
        drop(connected_tx);
        let span = last_start.duration_since(begin).as_secs_f64();
        let mut server_of: Vec<Option<String>> = vec![None; case.clients];
        let mut delays = Vec::with_capacity(case.clients);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut connected = 0;
        while connected < case.clients {
            let (k, server, took) = tokio::time::timeout_at(deadline, connected_rx.recv())
                .await
                .context("clients did not all connect within 60 s")?
                .context("client tasks ended early")?;
            if server_of[k].replace(server).is_none() {
                connected += 1;
                delays.push(took.as_secs_f64());
            }
        }
        let mut per_node = std::collections::BTreeMap::<String, u64>::new();
        for server in server_of.into_iter().flatten() {
            *per_node.entry(server).or_default() += 1;
        }
        let counts: Vec<u64> = (0..self.nodes.len())
            .map(|i| per_node.values().nth(i).copied().unwrap_or(0))
            .collect();
        for close in closers {
            let _ = close.send(());
        }
        while tasks.join_next().await.is_some() {}
        self.until_quiet().await?;
        delays.sort_by(f64::total_cmp);
        let mean = case.clients as f64 / self.nodes.len() as f64;
        Ok(Live {
            max_over_mean: counts.iter().copied().max().unwrap_or(0) as f64 / mean,
            rate: if span > 0.0 {
                (case.clients - 1) as f64 / span
            } else {
                case.rate
            },
            connect_delay: delays[delays.len() / 2],
        })
    }
}
