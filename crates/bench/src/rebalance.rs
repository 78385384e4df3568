//! `streamfarm bench rebalance`: the farm evening itself out with messages flowing, losing none.
//!
//! Three cases, each on child `streamfarm serve` nodes with in-process `streamfarm-client`s
//! (sources 127.0.0.20–27) subscribed to one topic, and a publisher at a steady rate whose
//! payloads carry sequence numbers (`flow`): every client's messages are counted lost, duplicated
//! and out of order from the payloads alone.
//! - **scale-out**: 3 nodes hold the clients; a 4th joins. Time until every node holds within
//!   ±5 % of the mean, moves made against the fewest that could even the farm out (the plan's
//!   `minimal_moves` when the node is first listed), and moves in the settle window after.
//! - **rolling restart**: 4 nodes; each in turn gets SIGTERM (it moves its clients off,
//!   make-before-break), is started again and refilled before the next. Max/mean at the end, and
//!   the longest any client was without a server.
//! - **failback**: the group-A node is stopped (its clients move to group B) and started again:
//!   time until group B is empty.
//!
//! No peer row: nats-server moves no connections by itself (only by hand, `$SYS` kick); the
//! figures stand against the targets of `DESIGN.md`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use streamfarm_client::{ClientOptions, Event, ServiceAddress};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::flow::{Ledger, Publisher, Receipts, Target, client_source, loopback, now_ms, tally};
use crate::proc::{NodeProc, NodeSpec, Signal, free_port, http, poll};
use crate::report::{RowBuilder, Section, quantile};
use crate::{Options, STREAMFARM};

const TOPIC: &str = "rb";
/// Within this fraction of the mean counts as balanced.
const BALANCED: f64 = 0.05;
/// How long a case may take to balance before it is reported as not balanced.
const BALANCE_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    ScaleOut,
    RollingRestart,
    Failback,
}

impl Case {
    const ALL: [Case; 3] = [Case::ScaleOut, Case::RollingRestart, Case::Failback];
}

/// What one client saw, besides its messages.
#[derive(Debug, Default)]
struct ClientLog {
    receipts: Receipts,
    migrations: u64,
    migration_ms: Vec<f64>,
    disconnects: u64,
    /// When it lost its server and has none yet (bench clock, ms).
    away_since: Option<u32>,
    /// The longest it was without a server, ms.
    longest_away_ms: u32,
}

/// The clients of one run.
struct Clients {
    logs: Vec<Arc<Mutex<ClientLog>>>,
    tasks: JoinSet<()>,
}

impl Clients {
    async fn start(service: &ServiceAddress, c: usize) -> anyhow::Result<Clients> {
        let logs: Vec<Arc<Mutex<ClientLog>>> = (0..c).map(|_| Arc::default()).collect();
        let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel(c.max(1));
        let mut tasks = JoinSet::new();
        for (i, log) in logs.iter().enumerate() {
            let options = ClientOptions::new()
                .subscribe([TOPIC])
                .source_address(client_source(i))
                .seed(i as u64 + 7);
            let mut client = streamfarm_client::Client::start(service.clone(), options);
            let (log, connected) = (log.clone(), connected_tx.clone());
            tasks.spawn(async move {
                let mut first = true;
                while let Some(event) = client.next_event().await {
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    let now = now_ms();
                    match &event {
                        Event::Message { payload, .. } => {
                            log.receipts.record(payload, now, true);
                        }
                        Event::Migrated { took, .. } => {
                            log.migrations += 1;
                            log.migration_ms.push(took.as_secs_f64() * 1000.0);
                        }
                        Event::Disconnected { .. } => {
                            log.disconnects += 1;
                            log.away_since.get_or_insert(now);
                        }
                        Event::Connected { .. } | Event::FailedOver { .. } => {
                            if let Some(since) = log.away_since.take() {
                                log.longest_away_ms =
                                    log.longest_away_ms.max(now.saturating_sub(since));
                            }
                            if first {
                                first = false;
                                let _ = connected.try_send(());
                            }
                        }
                        _ => log.receipts.event(&event),
                    }
                }
            });
        }
        drop(connected_tx);
        for _ in 0..c {
            tokio::time::timeout(Duration::from_secs(60), connected_rx.recv())
                .await
                .context("clients did not all connect within 60 s")?;
        }
        Ok(Clients { logs, tasks })
    }

    /// Waits until every client holds the last accepted message (at most 15 s).
    async fn until_delivered(&self, ledger: &Ledger) {
        let Some(last) = ledger.len().checked_sub(1) else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            let all = self.logs.iter().all(|log| {
                let log = log.lock().unwrap_or_else(|p| p.into_inner());
                tally(&log.receipts, ledger, last, None).lost == 0
            });
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Per-client counts into `row`.
    fn add_figures(&self, row: &mut RowBuilder, ledger: &Ledger, from_seq: u64) {
        let c = self.logs.len().max(1) as f64;
        let mut lost = 0;
        let mut duplicated = 0;
        let mut out_of_order = 0;
        let mut declared = 0;
        let mut disconnects = 0;
        let mut longest_away = 0u32;
        let mut migration_ms = Vec::new();
        let mut migrations = 0;
        for log in &self.logs {
            let log = log.lock().unwrap_or_else(|p| p.into_inner());
            let t = tally(&log.receipts, ledger, from_seq, None);
            lost += t.lost;
            duplicated += t.duplicated;
            out_of_order += t.out_of_order;
            declared += t.declared;
            disconnects += log.disconnects;
            longest_away = longest_away.max(log.longest_away_ms);
            migrations += log.migrations;
            migration_ms.extend(log.migration_ms.iter().copied());
        }
        row.add("lost_per_client", lost as f64 / c);
        row.add("duplicated_per_client", duplicated as f64 / c);
        row.add("out_of_order_per_client", out_of_order as f64 / c);
        row.add("declared_per_client", declared as f64 / c);
        row.add("disconnects_per_client", disconnects as f64 / c);
        row.add("migrations_per_client", migrations as f64 / c);
        row.add("longest_without_server_ms", f64::from(longest_away));
        row.add("published_msgs", ledger.accepted_since(from_seq) as f64);
        row.add("publish_rate_per_s", ledger.rate_since(from_seq));
        migration_ms.sort_by(f64::total_cmp);
        if let Some(p50) = quantile(&migration_ms, 0.5) {
            row.add("migration_p50_ms", p50);
            row.add(
                "migration_p99_ms",
                quantile(&migration_ms, 0.99).unwrap_or(p50),
            );
        }
    }

    async fn stop(mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The nodes' users, by their own count.
async fn users(nodes: &[&NodeProc]) -> Vec<f64> {
    let mut out = Vec::new();
    for node in nodes {
        out.push(
            node.metric("streamfarm_connections")
                .await
                .unwrap_or(f64::NAN),
        );
    }
    out
}

/// Max over mean of `users`.
fn max_over_mean(users: &[f64]) -> f64 {
    let mean = users.iter().sum::<f64>() / users.len().max(1) as f64;
    users.iter().copied().fold(0.0, f64::max) / mean
}

/// Every node within ±[`BALANCED`] of the mean (or one client, in farms too small for 5 % to
/// be a whole client).
fn balanced(users: &[f64]) -> bool {
    let mean = users.iter().sum::<f64>() / users.len().max(1) as f64;
    let allowed = (BALANCED * mean).max(1.0);
    mean > 0.0 && users.iter().all(|u| (u - mean).abs() <= allowed)
}

/// Moves made so far: clients told to move plus those closed to move them.
async fn moves(nodes: &[&NodeProc]) -> f64 {
    let mut sum = 0.0;
    for node in nodes {
        sum += node
            .metric("streamfarm_migrations_started_total")
            .await
            .unwrap_or(0.0);
        sum += node
            .metric("streamfarm_migrations_closed_total")
            .await
            .unwrap_or(0.0);
    }
    sum
}

/// Polls until the nodes are balanced; seconds taken, or `None` after [`BALANCE_WITHIN`].
async fn until_balanced(nodes: &[&NodeProc], since: Instant) -> Option<f64> {
    let deadline = since + BALANCE_WITHIN;
    while Instant::now() < deadline {
        if balanced(&users(nodes).await) {
            return Some(since.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Waits until `observer` lists every one of `names` `UP`.
async fn until_listed_up(observer: SocketAddr, names: usize) -> anyhow::Result<()> {
    poll(
        "every node listed UP",
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let farm = http(observer, "GET", "/farm?format=text", &[], "")
                .await
                .ok()?;
            (farm.matches(" UP ").count() == names).then_some(())
        },
    )
    .await
}

fn node_spec(name: &str, addr: SocketAddr, priority: &str, options: &Options) -> NodeSpec {
    let mut spec = NodeSpec::new(name, addr).flags(["--priority", priority]);
    if options.quick {
        spec = spec.flags(["--rebalance-cooldown-ms", "1000"]);
    }
    spec
}

/// The service address of `addrs`.
fn service(addrs: &[SocketAddr]) -> anyhow::Result<ServiceAddress> {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .context("service address")
}

/// The clients' age before the farm changes: the nodes' cooldown (no connection younger is
/// moved), plus a second.
fn cooldown(options: &Options) -> Duration {
    if options.quick {
        Duration::from_secs(2)
    } else {
        Duration::from_secs(11)
    }
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Section> {
    crate::proc::raise_nofile();
    let mut section = Section::default();
    for case in Case::ALL {
        let c = match case {
            Case::ScaleOut => options.rebalance_clients,
            Case::RollingRestart => options.rebalance_clients * 4 / 3,
            Case::Failback => options.rebalance_clients * 2 / 3,
        };
        let mut row = RowBuilder::default();
        let setting = match case {
            Case::ScaleOut => format!("scale-out 3→4 nodes, C={c}"),
            Case::RollingRestart => format!("rolling restart of 4 nodes, C={c}"),
            Case::Failback => format!("failback B→A, C={c}"),
        };
        let result = match case {
            Case::ScaleOut => scale_out(options, c, &mut row).await,
            Case::RollingRestart => rolling_restart(options, c, &mut row).await,
            Case::Failback => failback(options, c, &mut row).await,
        };
        match result {
            Ok(()) => section.rows.push(row.build(STREAMFARM, &setting)),
            Err(err) => section.notes.push(format!("{setting}: failed: {err:#}")),
        }
    }
    section.notes.push(format!(
        "publisher at {}/s on the clients' topic; balanced = every node within ±{}% of the mean; {}",
        options.rebalance_publish_rate,
        BALANCED * 100.0,
        if options.quick {
            "quick: cooldown 1 s, short settle window"
        } else {
            "default node settings (cooldown 10 s, 50 moves/s per node)"
        }
    ));
    Ok(section)
}

async fn scale_out(options: &Options, c: usize, row: &mut RowBuilder) -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> = (1..=4)
        .map(|i| free_port(loopback(i)))
        .collect::<anyhow::Result<_>>()?;
    let mut nodes = Vec::new();
    for (i, addr) in addrs.iter().take(3).enumerate() {
        let mut spec = node_spec(&format!("n{}", i + 1), *addr, "A", options);
        if i > 0 {
            spec = spec.join(addrs[0]);
        }
        nodes.push(NodeProc::start(&options.exe, &spec).await?);
    }
    until_listed_up(addrs[0], 3).await?;
    let clients = Clients::start(&service(&addrs[..3])?, c).await?;
    let target = Target::Streamfarm {
        nodes: addrs[..3].to_vec(),
        topic: TOPIC.to_string(),
    };
    let publisher = Publisher::start(target, options.rebalance_publish_rate)?;
    let from_seq = publisher.next_seq();
    tokio::time::sleep(cooldown(options)).await;
    let three: Vec<&NodeProc> = nodes.iter().collect();
    let before = users(&three).await;
    // Moves the three made among themselves while the clients arrived are not the scale-out's.
    let moved_before = moves(&three).await;
    println!("rebalance scale-out: before {before:?}");

    let spec = node_spec("n4", addrs[3], "A", options).join(addrs[0]);
    nodes.push(NodeProc::start(&options.exe, &spec).await?);
    let joined = Instant::now();
    until_listed_up(addrs[0], 4).await?;
    let plan = http(addrs[0], "GET", "/rebalance", &[], "").await?;
    let plan: serde_json::Value = serde_json::from_str(&plan).context("/rebalance is JSON")?;
    let minimal = plan["minimal_moves"].as_f64().unwrap_or(f64::NAN);
    let all: Vec<&NodeProc> = nodes.iter().collect();
    let balance_s = until_balanced(&all, joined).await;
    let moved = moves(&all).await - moved_before;
    let settle = if options.quick {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(120)
    };
    tokio::time::sleep(settle).await;
    let further = moves(&all).await - moved;
    let after = users(&all).await;
    println!("rebalance scale-out: after {after:?}, moves {moved} (minimal {minimal})");
    let ledger = publisher.stop().await?;
    clients.until_delivered(&ledger).await;
    if let Some(s) = balance_s {
        row.add("balanced_after_s", s);
    }
    row.add(
        "balanced_fraction",
        if balance_s.is_some() { 1.0 } else { 0.0 },
    );
    row.add("moves_msgs", moved);
    row.add("minimal_moves_msgs", minimal);
    row.add("moves_over_minimal", moved / minimal);
    row.add("settle_window_s", settle.as_secs_f64());
    row.add("further_moves_fraction", further / c as f64);
    row.add("max_over_mean_end", max_over_mean(&after));
    clients.add_figures(row, &ledger, from_seq);
    clients.stop().await;
    Ok(())
}

async fn rolling_restart(options: &Options, c: usize, row: &mut RowBuilder) -> anyhow::Result<()> {
    let addrs: Vec<SocketAddr> = (1..=4)
        .map(|i| free_port(loopback(i)))
        .collect::<anyhow::Result<_>>()?;
    let mut nodes = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut spec = node_spec(&format!("r{}", i + 1), *addr, "A", options);
        if i > 0 {
            spec = spec.join(addrs[0]);
        }
        nodes.push(NodeProc::start(&options.exe, &spec).await?);
    }
    until_listed_up(addrs[0], 4).await?;
    let clients = Clients::start(&service(&addrs)?, c).await?;
    let target = Target::Streamfarm {
        nodes: addrs.clone(),
        topic: TOPIC.to_string(),
    };
    let publisher = Publisher::start(target, options.rebalance_publish_rate)?;
    let from_seq = publisher.next_seq();
    tokio::time::sleep(cooldown(options)).await;
    let started = Instant::now();
    let mut refill_s = Vec::new();
    for i in 0..nodes.len() {
        let observer = addrs[(i + 1) % addrs.len()];
        nodes[i].signal(Signal::TERM)?;
        nodes[i]
            .guard
            .wait_exit(Duration::from_secs(20))
            .await
            .with_context(|| format!("{} did not stop within 20 s of SIGTERM", nodes[i].name))?;
        nodes[i].restart(Some(observer))?;
        nodes[i].wait_ready(Duration::from_secs(20)).await?;
        until_listed_up(observer, 4).await?;
        let back = Instant::now();
        let all: Vec<&NodeProc> = nodes.iter().collect();
        if let Some(s) = until_balanced(&all, back).await {
            refill_s.push(s);
        }
        println!(
            "rebalance rolling restart: {} restarted, users {:?}",
            nodes[i].name,
            users(&all).await
        );
    }
    let all: Vec<&NodeProc> = nodes.iter().collect();
    let after = users(&all).await;
    let ledger = publisher.stop().await?;
    clients.until_delivered(&ledger).await;
    row.add("restart_all_s", started.elapsed().as_secs_f64());
    refill_s.sort_by(f64::total_cmp);
    if let Some(p50) = quantile(&refill_s, 0.5) {
        row.add("refilled_p50_s", p50);
    }
    row.add(
        "refilled_fraction",
        refill_s.len() as f64 / nodes.len() as f64,
    );
    row.add("max_over_mean_end", max_over_mean(&after));
    clients.add_figures(row, &ledger, from_seq);
    clients.stop().await;
    Ok(())
}

async fn failback(options: &Options, c: usize, row: &mut RowBuilder) -> anyhow::Result<()> {
    let a_addr = free_port(loopback(1))?;
    let b_addr = free_port(loopback(2))?;
    let mut a = NodeProc::start(&options.exe, &node_spec("a1", a_addr, "A", options)).await?;
    let b = NodeProc::start(
        &options.exe,
        &node_spec("b1", b_addr, "B", options).join(a_addr),
    )
    .await?;
    until_listed_up(b_addr, 2).await?;
    let clients = Clients::start(&service(&[a_addr, b_addr])?, c).await?;
    let target = Target::Streamfarm {
        nodes: vec![b_addr, a_addr],
        topic: TOPIC.to_string(),
    };
    let publisher = Publisher::start(target, options.rebalance_publish_rate)?;
    let from_seq = publisher.next_seq();
    tokio::time::sleep(cooldown(options)).await;
    // Group A's only node stops: its clients move to group B.
    a.signal(Signal::TERM)?;
    a.guard
        .wait_exit(Duration::from_secs(20))
        .await
        .context("a1 did not stop within 20 s of SIGTERM")?;
    let on_b = b.metric("streamfarm_connections").await?;
    a.restart(Some(b_addr))?;
    a.wait_ready(Duration::from_secs(20)).await?;
    until_listed_up(b_addr, 2).await?;
    let back = Instant::now();
    let emptied = poll(
        "group B empties",
        BALANCE_WITHIN,
        Duration::from_millis(100),
        || async {
            let left = b.metric("streamfarm_connections").await.ok()?;
            (left == 0.0).then_some(())
        },
    )
    .await;
    let failback_s = emptied.map(|()| back.elapsed().as_secs_f64()).ok();
    let ledger = publisher.stop().await?;
    clients.until_delivered(&ledger).await;
    row.add("moved_to_b_fraction", on_b / c as f64);
    if let Some(s) = failback_s {
        row.add("failback_s", s);
    }
    row.add(
        "left_on_b_fraction",
        b.metric("streamfarm_connections").await.unwrap_or(f64::NAN) / c as f64,
    );
    clients.add_figures(row, &ledger, from_seq);
    clients.stop().await;
    Ok(())
}
