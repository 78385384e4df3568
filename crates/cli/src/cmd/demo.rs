//! `streamfarm demo`: a whole farm on this machine in under a minute.
//!
//! Three nodes — child processes of this same binary (`streamfarm serve`), on 127.0.0.1, .2 and
//! .3, priority groups A, A and B — a publisher sending ten messages a second, and a few hundred
//! clients in this process. The farm table is shown as the clients arrive (they choose the two A
//! nodes); then the A node holding the most clients is killed with SIGKILL, and its clients fail
//! over to the other A node. Then a fourth node (group A) joins, and the farm evens itself out:
//! the survivor moves half its clients to it, make-before-break (active rebalancing). A summary
//! closes: clients per server before and after, failover times, moves, messages received, and
//! what each moved client lost or received twice. Ctrl-C or SIGTERM stops it early, children
//! included.
//!
//! The clients reach the farm as the seeds describe: through one service name
//! (`demo.streamfarm`), which node c's built-in DNS responder answers with the UP servers (SRV
//! records carry each node's port); the demo's clients resolve it through that responder.

use std::io::IsTerminal;
use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use streamfarm_client::{ClientOptions, ServiceAddress};
use streamfarm_core::{FarmList, Status};
use streamfarm_localfarm::{NodeProcess, NodeSpec, free_port};
use tokio::time::Instant;

use super::load::{FarmWatch, LiveTable, Summary, Swarm, millis, server_table, shutdown_signal};
use super::sub::parse_duration;

/// The topic the demo publishes on and its clients subscribe to.
const TOPIC: &str = "demo";
/// The farm's service name, answered by node c's DNS responder.
const SERVICE_NAME: &str = "demo.streamfarm";

/// Arguments of `streamfarm demo`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Clients to run in this process.
    #[arg(long, default_value_t = 300)]
    clients: usize,
    /// How long the balanced farm runs before a node is killed.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    hold: Duration,
    /// Longest wait, after the kill, for every client to be back.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    after: Duration,
    /// Node heartbeat timeout in milliseconds (a hung node is left after this long).
    #[arg(long, default_value_t = 1500)]
    heartbeat_timeout_ms: u64,
}

/// One child node and its priority group.
struct Node {
    priority: &'static str,
    process: NodeProcess,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut nodes = Vec::new();
    let result = tokio::select! {
        result = demo(&args, &mut nodes) => result,
        _ = shutdown_signal() => {
            eprintln!("interrupted: stopping the nodes");
            // The shell's convention for a run ended by SIGINT.
            Ok(ExitCode::from(130))
        }
    };
    // Dropping the nodes kills and reaps them.
    drop(nodes);
    result
}

async fn demo(args: &Args, nodes: &mut Vec<Node>) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let terminal = std::io::stdout().is_terminal();
    println!(
        "streamfarm demo: 3 nodes (groups A, A, B), a publisher, {} clients; a 4th node later",
        args.clients
    );

    // 1. The farm. Its nodes move clients that have been connected for 2 s (10 s by default),
    //    so that the demo shows a scale-out within seconds of the failover.
    let exe = std::env::current_exe().context("cannot find this program to start the nodes")?;
    let layout = [("a", "A", 1u8), ("b", "A", 2), ("c", "B", 3)];
    let node_flags = |priority: &str| {
        [
            "--priority".to_string(),
            priority.to_string(),
            "--heartbeat-interval-ms".to_string(),
            (args.heartbeat_timeout_ms / 3).max(1).to_string(),
            "--heartbeat-timeout-ms".to_string(),
            args.heartbeat_timeout_ms.to_string(),
            "--rebalance-cooldown-ms".to_string(),
            "2000".to_string(),
        ]
    };
    let mut first_gossip = None;
    // Node c (group B, never the one killed) answers the service name.
    let dns =
        free_port(IpAddr::from([127, 0, 0, 3])).context("no free port for the DNS responder")?;
    for (name, priority, last_octet) in layout {
        let ip = IpAddr::from([127, 0, 0, last_octet]);
        let listen = free_port(ip)
            .with_context(|| format!("no free port on {ip} (is 127.0.0.{last_octet} usable?)"))?;
        let mut spec = NodeSpec::new(name, listen).flags(node_flags(priority));
        if let Some(seed) = first_gossip {
            spec = spec.join(seed);
        }
        if name == "c" {
            spec = spec.flags(["--dns", &dns.to_string(), "--service-name", SERVICE_NAME]);
        }
        // The gossip address defaults to the listen address over UDP.
        first_gossip.get_or_insert(listen);
        let process = NodeProcess::spawn(&exe, &spec)?;
        println!(
            "  node {name}: group {priority}, {} (pid {})",
            process.url(),
            process.guard.pid()
        );
        nodes.push(Node { priority, process });
    }
    let seeds = nodes
        .iter()
        .map(|n| n.process.listen.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let seeds: ServiceAddress = seeds.parse()?;
    wait_for_farm(
        &seeds,
        &ClientOptions::new(),
        nodes,
        Duration::from_secs(20),
    )
    .await?;
    // From here on everything goes through the service name.
    let service: ServiceAddress = SERVICE_NAME.parse()?;
    let options = ClientOptions::new().dns_server(dns);
    println!(
        "  farm up in {:.1} s; service address {SERVICE_NAME} (DNS on {dns})",
        started.elapsed().as_secs_f64()
    );

    // 2. The publisher: each message numbered, and the numbers the farm acknowledged kept, so
    //    that every client's losses and duplicates can be counted at the end.
    let published = Arc::new(Mutex::new(Vec::new()));
    let publisher = tokio::spawn({
        let (service, options, published) = (service.clone(), options.clone(), published.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for n in 0u64.. {
                tick.tick().await;
                let message = format!("tick {n}").into_bytes();
                if streamfarm_client::publish(&service, &options, TOPIC, message)
                    .await
                    .is_ok()
                {
                    published.lock().expect("publisher lock").push(n);
                }
            }
        }
    });

    // 3. The clients arrive.
    let farm = FarmWatch::start(service.clone(), options.clone());
    let mut swarm = Swarm::new();
    let client_options = options.clone().subscribe([TOPIC]);
    let arrival = Instant::now();
    swarm
        .spawn(
            &service,
            &client_options,
            args.clients,
            1000,
            0,
            &ProgressBar::hidden(),
        )
        .await;
    let mut table = LiveTable::default();
    let everyone = |swarm: &Swarm| swarm.stats.connected() >= args.clients as u64;
    watch(
        &swarm,
        &farm,
        &mut table,
        terminal,
        Duration::from_secs(20),
        everyone,
    )
    .await;
    if !everyone(&swarm) {
        bail!(
            "only {} of {} clients connected",
            swarm.stats.connected(),
            args.clients
        );
    }
    println!(
        "\n{} clients connected in {:.2} s",
        args.clients,
        arrival.elapsed().as_secs_f64()
    );
    tokio::time::sleep(args.hold).await;
    let before = swarm.stats.per_server();
    let table_before = server_table(&swarm.stats, farm.latest().as_ref());
    if !terminal {
        print!("{table_before}");
    }

    // 4. Kill the busiest node of group A.
    let victim = nodes
        .iter_mut()
        .filter(|n| n.priority == "A")
        .max_by_key(|n| before.get(&n.process.url()).copied().unwrap_or(0))
        .context("no node in group A")?;
    let held = before.get(&victim.process.url()).copied().unwrap_or(0);
    victim.process.guard.kill();
    let killed_url = victim.process.url();
    println!(
        "\nSIGKILL node {} ({killed_url}), which held {held} clients",
        victim.process.name
    );
    let failovers_before = swarm.stats.failovers();
    let killed_at = Instant::now();
    table = LiveTable::default();
    let recovered = |swarm: &Swarm| {
        let now = swarm.stats.per_server();
        now.get(&killed_url).copied().unwrap_or(0) == 0
            && now.values().sum::<u64>() >= args.clients as u64
            && swarm.stats.failovers() >= failovers_before + held as usize
    };
    watch(&swarm, &farm, &mut table, terminal, args.after, recovered).await;
    let all_back = recovered(&swarm);
    let recovery = killed_at.elapsed();
    // Let the farm notice the dead node (its status report goes missing) and the clients take
    // a second of messages on their new servers before the final table.
    let noticed = Instant::now() + Duration::from_secs(5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    while Instant::now() < noticed && !listed_down(farm.latest().as_ref(), &killed_url) {
        if terminal {
            table.draw(&server_table(&swarm.stats, farm.latest().as_ref()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if terminal {
        table.draw(&server_table(&swarm.stats, farm.latest().as_ref()));
    }
    let table_after = server_table(&swarm.stats, farm.latest().as_ref());
    if !terminal {
        print!("{table_after}");
    }

    // 5. Scale out: a new node of group A joins, empty; the farm evens itself out.
    // It joins through a node that is alive (the killed one may have been the first).
    let seed = nodes
        .iter()
        .map(|n| n.process.listen)
        .find(|addr| n_url(*addr) != killed_url)
        .context("a live node to join")?;
    let listen = free_port(IpAddr::from([127, 0, 0, 4]))
        .context("no free port on 127.0.0.4 (is it usable?)")?;
    let spec = NodeSpec::new("d", listen).flags(node_flags("A")).join(seed);
    let process = NodeProcess::spawn(&exe, &spec)?;
    let new_url = process.url();
    println!(
        "\nnode d joins (group A, {new_url}, pid {}): the farm evens itself out",
        process.guard.pid()
    );
    nodes.push(Node {
        priority: "A",
        process,
    });
    let migrations_before = swarm.stats.migrations();
    let joined_at = Instant::now();
    table = LiveTable::default();
    let group_a: Vec<String> = nodes
        .iter()
        .filter(|n| n.priority == "A" && n.process.url() != killed_url)
        .map(|n| n.process.url())
        .collect();
    let even = |swarm: &Swarm| {
        let now = swarm.stats.per_server();
        let counts: Vec<u64> = group_a
            .iter()
            .map(|u| now.get(u).copied().unwrap_or(0))
            .collect();
        let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
        counts
            .iter()
            .all(|c| (*c as f64 - mean).abs() <= (0.05 * mean).max(1.0))
    };
    watch(
        &swarm,
        &farm,
        &mut table,
        terminal,
        Duration::from_secs(20),
        even,
    )
    .await;
    let evened = even(&swarm).then(|| joined_at.elapsed());
    let moves = swarm.stats.migrations() - migrations_before;
    let table_scaled = server_table(&swarm.stats, farm.latest().as_ref());
    if !terminal {
        print!("{table_scaled}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 6. Summary, once the last messages had time to arrive.
    publisher.abort();
    farm.stop();
    let per_server = swarm.stats.per_server();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = swarm.stats.clone();
    swarm.stop().await;
    let mut summary = stats.summary();
    summary.per_server = per_server;
    let published = published.lock().expect("publisher lock").clone();
    println!();
    let failover = Failover {
        held,
        recovery,
        all_back,
    };
    let scale_out = ScaleOut {
        node: new_url,
        moves,
        evened,
    };
    print!(
        "{}",
        render_summary(&before, &summary, &published, &failover, &scale_out)
    );
    println!("demo finished in {:.1} s", started.elapsed().as_secs_f64());
    Ok(if all_back && scale_out.evened.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the failover step saw.
struct Failover {
    /// Clients the killed node held.
    held: u64,
    /// From the kill until every client was back (or the wait ended).
    recovery: Duration,
    all_back: bool,
}

/// What the scale-out step saw.
struct ScaleOut {
    /// The new node's url.
    node: String,
    /// Clients moved by the nodes.
    moves: u64,
    /// From the join until group A was even, if it got there.
    evened: Option<Duration>,
}

fn render_summary(
    before: &std::collections::BTreeMap<String, u64>,
    after: &Summary,
    published: &[u64],
    failover: &Failover,
    scale_out: &ScaleOut,
) -> String {
    let Failover {
        held,
        recovery,
        all_back,
    } = *failover;
    let mut out = String::from("summary\n  clients per server   before  after\n");
    let mut urls: Vec<&String> = before.keys().chain(after.per_server.keys()).collect();
    urls.sort();
    urls.dedup();
    for url in urls {
        out.push_str(&format!(
            "  {url:<28}  {:>5}  {:>5}\n",
            before.get(url).copied().unwrap_or(0),
            after.per_server.get(url).copied().unwrap_or(0)
        ));
    }
    out.push_str(&format!(
        "  failovers: {} of the {held} clients of the killed node",
        after.failovers.len()
    ));
    if let Some(times) = after.failover_times() {
        out.push_str(&format!("; took {times}"));
    }
    out.push('\n');
    out.push_str(&format!(
        "  {} back on a live server {} ms after the kill\n",
        if all_back {
            "every client"
        } else {
            "NOT every client"
        },
        millis(recovery)
    ));
    match scale_out.evened {
        Some(took) => out.push_str(&format!(
            "  scale-out: {} filled to the mean of group A in {} ms by {} moves, make-before-break\n",
            scale_out.node,
            millis(took),
            scale_out.moves
        )),
        None => out.push_str(&format!(
            "  scale-out: {} did NOT fill to the mean of group A ({} moves)\n",
            scale_out.node, scale_out.moves
        )),
    }
    out.push_str(&format!(
        "  messages: {} published, {} received, {} recovered from history after failovers, {} gaps reported\n",
        published.len(),
        after.messages,
        after.recovered,
        after.gaps
    ));
    // Counted from the payloads' numbers, not from positions: a check of the positions.
    let until = published.last().copied().unwrap_or(0);
    let moved: Vec<_> = after
        .tallies
        .iter()
        .filter(|t| t.failed_over || t.migrated)
        .collect();
    let lost: Vec<u64> = moved.iter().map(|t| t.lost(published, until)).collect();
    let duplicated: Vec<u64> = moved.iter().map(|t| t.duplicated()).collect();
    let out_of_order: u64 = moved.iter().map(|t| t.out_of_order).sum();
    out.push_str(&format!(
        "  each of the {} clients that failed over or migrated lost {} and received {} twice (at most; {} out of order in all)\n",
        moved.len(),
        lost.iter().max().copied().unwrap_or(0),
        duplicated.iter().max().copied().unwrap_or(0),
        out_of_order
    ));
    out
}

/// The streaming url of the node listening on `addr`.
fn n_url(addr: std::net::SocketAddr) -> String {
    format!("ws://{addr}/stream")
}

fn listed_down(list: Option<&FarmList>, url: &str) -> bool {
    list.and_then(|l| l.by_url(url))
        .is_some_and(|s| s.status == Status::Down)
}

/// Redraws the table (on a terminal) until `done` or `limit`.
async fn watch(
    swarm: &Swarm,
    farm: &FarmWatch,
    table: &mut LiveTable,
    terminal: bool,
    limit: Duration,
    done: impl Fn(&Swarm) -> bool,
) {
    let deadline = Instant::now() + limit;
    loop {
        if terminal {
            table.draw(&server_table(&swarm.stats, farm.latest().as_ref()));
        }
        if done(swarm) || Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a node lists every node UP.
async fn wait_for_farm(
    service: &ServiceAddress,
    options: &ClientOptions,
    nodes: &mut [Node],
    limit: Duration,
) -> anyhow::Result<FarmList> {
    let deadline = Instant::now() + limit;
    loop {
        for node in nodes.iter_mut() {
            node.process.guard.check_alive()?;
        }
        if let Ok((list, _)) = streamfarm_client::fetch_list(service, options).await {
            let up = list
                .servers
                .iter()
                .filter(|s| s.status == Status::Up)
                .count();
            if up == nodes.len() {
                return Ok(list);
            }
        }
        if Instant::now() >= deadline {
            bail!("the farm did not come up within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
