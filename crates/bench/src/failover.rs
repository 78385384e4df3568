//! Failover: C clients on one server that is SIGKILLed; how long until each is subscribed on a
//! survivor, how many connection attempts that took, and the peak connect rate the survivors saw.
//!
//! streamfarm: three child nodes; the victim starts alone, so every client (the real
//! `streamfarm-client`, seeded with all three addresses) lands on it; then the two others join
//! and the farm is listed whole. nats-server: a three-server cluster; the clients (this crate's
//! minimal client) connect to server 1 and learn the others from `INFO` `connect_urls`; on loss
//! each tries the learned urls in random order with the lost one last, as nats.go does
//! (reconnect at once to another server; wait 2 s only before retrying one already tried).
//!
//! Attempts: after the kill, the victim's address is taken over by a listener (on its own thread,
//! so it answers at once) that closes every connection and counts it, so attempts on the dead
//! server are counted like the refused connections they stand for; attempts on the survivors are
//! their accepted-connection counters (`streamfarm_connections_accepted_total`, `/varz`
//! `total_connections`), sampled every 100 ms, which also give the peak connections/s per
//! survivor. Both are reported apart (`dead_attempts_per_client`,
//! `survivor_attempts_per_client`) besides their sum: an attempt on a dead address costs the
//! survivors nothing. The streamfarm clients also count their own dials by purpose
//! ([`streamfarm_client::Dials`]): list fetches, connects to the chosen server, and lists whose
//! connection was kept (`client_*` figures, from the kill until each client is back; and
//! `first_contact_dials_per_client` before it).
//!
//! The streamfarm clients are given [`LEARN_THE_FARM`] after the survivors join to refresh their
//! lists (as they do on their heartbeats) before the kill.
//!
//! streamfarm runs twice: in the default retry-once mode (setting `C=N`) and in `immediate` mode
//! (`C=N immediate`), which re-requests the list at once instead of retrying the dead server.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use rand::seq::SliceRandom;
use streamfarm_client::{ClientOptions, Dials, Event, RetryMode, ServiceAddress};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::nats::NatsProc;
use crate::proc::{NodeProc, NodeSpec, free_port, http, poll};
use crate::report::{RowBuilder, Section, quantile};
use crate::wire::Nats;
use crate::{NATS, Options, STREAMFARM, ratio};

/// Longest wait for every client to be back.
const RECOVERY: Duration = Duration::from_secs(30);
/// After the farm is whole, how long the streamfarm clients are given to learn it: their list
/// refresh (5 s by default, on a heartbeat of 1 s) plus a margin. Clients in a real farm have
/// held their connections far longer than that when a node dies.
const LEARN_THE_FARM: Duration = Duration::from_millis(6500);
/// Survivors' counters are sampled this often.
const SAMPLE: Duration = Duration::from_millis(100);
const TOPIC: &str = "fo";

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn source(i: usize) -> IpAddr {
    ip(20 + (i % 8) as u8)
}

/// What one run measured.
struct Run {
    /// Kill → subscribed on a survivor, per client that made it, ms.
    times_ms: Vec<f64>,
    /// Connections the dead address took over from the victim saw.
    dead_attempts: f64,
    /// Connections the survivors accepted.
    survivor_attempts: f64,
    /// The streamfarm clients' own counts: before the kill, and from the kill until back.
    dials: Option<(Dials, Dials)>,
    peak_per_s: f64,
    clients: usize,
}

/// Adds `b` to `a`, field by field.
fn add_dials(a: &mut Dials, b: &Dials) {
    a.list += b.list;
    a.list_failed += b.list_failed;
    a.stream += b.stream;
    a.stream_failed += b.stream_failed;
    a.reused += b.reused;
}

/// `b - a`, field by field.
fn dials_since(a: &Dials, b: &Dials) -> Dials {
    Dials {
        list: b.list - a.list,
        list_failed: b.list_failed - a.list_failed,
        stream: b.stream - a.stream,
        stream_failed: b.stream_failed - a.stream_failed,
        reused: b.reused - a.reused,
    }
}

pub(crate) async fn run(options: &Options) -> anyhow::Result<Section> {
    crate::proc::raise_nofile();
    let c = options.failover_clients;
    let setting = format!("C={c}");
    let mut section = Section::default();
    let immediate = format!("C={c} immediate");
    let mut systems = vec![
        (STREAMFARM, RetryMode::RetryOnce, setting.clone()),
        (STREAMFARM, RetryMode::Immediate, immediate.clone()),
    ];
    if options.nats.is_some() {
        systems.push((NATS, RetryMode::default(), setting.clone()));
    }
    for (system, retry, label) in systems {
        let mut row = RowBuilder::default();
        for _ in 0..options.repeats {
            let run = match (system, &options.nats) {
                (NATS, Some(nats)) => nats_once(&nats.path, c).await,
                _ => streamfarm_once(options, c, retry).await,
            }
            .with_context(|| format!("{system} failover ({label})"))?;
            let per_client = |n: f64| n / run.clients as f64;
            let mut times = run.times_ms;
            times.sort_by(f64::total_cmp);
            let q = |p| quantile(&times, p).unwrap_or(f64::NAN);
            row.add("resubscribed_p50_ms", q(0.5));
            row.add("resubscribed_p99_ms", q(0.99));
            row.add("resubscribed_max_ms", q(1.0));
            row.add("back_fraction", times.len() as f64 / run.clients as f64);
            let total = run.dead_attempts + run.survivor_attempts;
            row.add("attempts_per_client", per_client(total));
            row.add("dead_attempts_per_client", per_client(run.dead_attempts));
            row.add(
                "survivor_attempts_per_client",
                per_client(run.survivor_attempts),
            );
            if let Some((first, failover)) = &run.dials {
                let n = |v: u64| per_client(v as f64);
                row.add(
                    "first_contact_dials_per_client",
                    n(first.list + first.stream),
                );
                row.add("client_list_dials_per_client", n(failover.list));
                row.add("client_list_failed_per_client", n(failover.list_failed));
                row.add("client_stream_dials_per_client", n(failover.stream));
                row.add("client_stream_failed_per_client", n(failover.stream_failed));
                row.add("client_list_kept_per_client", n(failover.reused));
            }
            row.add("survivor_peak_conn_per_s", run.peak_per_s);
        }
        section.rows.push(row.build(system, &label));
    }
    let mut notes = Vec::new();
    let get = |sys, setting: &str, fig| section.median(sys, setting, fig);
    for label in [&setting, &immediate] {
        let p99 = get(STREAMFARM, label, "resubscribed_p99_ms");
        let attempts = get(STREAMFARM, label, "attempts_per_client");
        let survivors = get(STREAMFARM, label, "survivor_attempts_per_client");
        notes.push(format!(
            "{label}: p99 streamfarm/nats = {}, attempts streamfarm/nats = {} (survivors only: {}); target p99 <= 1000 ms: {}; target <= 1.2 attempts/client: {} (survivors only: {})",
            ratio(p99, get(NATS, &setting, "resubscribed_p99_ms")),
            ratio(attempts, get(NATS, &setting, "attempts_per_client")),
            ratio(survivors, get(NATS, &setting, "survivor_attempts_per_client")),
            verdict(p99, 1000.0),
            verdict(attempts, 1.2),
            verdict(survivors, 1.2),
        ));
    }
    section.notes.extend(notes);
    Ok(section)
}

fn verdict(value: Option<f64>, at_most: f64) -> &'static str {
    match value {
        Some(v) if v <= at_most => "met",
        Some(_) => "NOT met",
        None => "n/a",
    }
}

/// Takes over a dead server's address and counts every connection attempt on it, closing each at
/// once. It runs on its own OS thread, not on the runtime the thousands of clients share: a
/// connection the kernel completed but nobody closed promptly would leave its client waiting up
/// to its connect timeout, where a dead server refuses at once.
struct BlackHole {
    count: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl BlackHole {
    fn start(addr: SocketAddr) -> anyhow::Result<BlackHole> {
        // A backlog as deep as the kernel allows (`somaxconn`): thousands of clients retry at
        // once, and with std's 128 the kernel would drop their SYNs and each would wait out the
        // 1 s SYN retransmission, where a dead server's address refuses at once.
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket
            .bind(addr)
            .with_context(|| format!("cannot take over {addr}"))?;
        let listener = socket.listen(4096)?.into_std()?;
        listener.set_nonblocking(true)?;
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (counter, stopped) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        counter.fetch_add(1, Ordering::Relaxed);
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                    Err(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        Ok(BlackHole { count, stop })
    }

    fn attempts(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Samples `counter` of each survivor every [`SAMPLE`] until `done`; returns the total increase
/// and the highest per-survivor rate seen, per second.
async fn watch_survivors<F, Fut>(
    survivors: usize,
    read: F,
    done: Arc<tokio::sync::Notify>,
) -> (f64, f64)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Option<f64>>,
{
    let mut first = vec![None; survivors];
    let mut last = vec![None::<f64>; survivors];
    let mut peak = 0.0f64;
    let mut tick = tokio::time::interval(SAMPLE);
    let deadline = Instant::now() + RECOVERY + Duration::from_secs(2);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.notified() => break,
        }
        for (i, (f, l)) in first.iter_mut().zip(last.iter_mut()).enumerate() {
            if let Some(v) = read(i).await {
                if let Some(prev) = *l {
                    peak = peak.max((v - prev) / SAMPLE.as_secs_f64());
                }
                f.get_or_insert(v);
                *l = Some(v);
            }
        }
        if Instant::now() > deadline {
            break;
        }
    }
    let total = first
        .iter()
        .zip(&last)
        .map(|(f, l)| l.unwrap_or(0.0) - f.unwrap_or(0.0))
        .sum();
    (total, peak)
}

async fn streamfarm_once(options: &Options, c: usize, retry: RetryMode) -> anyhow::Result<Run> {
    let addrs = [free_port(ip(1))?, free_port(ip(2))?, free_port(ip(3))?];
    let mut victim = NodeProc::start(&options.exe, &NodeSpec::new("v", addrs[0])).await?;
    let victim_url = victim.url();
    let service: ServiceAddress = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .context("service address")?;
    let killed_at: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let times = Arc::new(Mutex::new(Vec::new()));
    // Dials before the kill, and from the kill until back, summed over the clients.
    let dials = Arc::new(Mutex::new((Dials::default(), Dials::default())));
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel(c);
    let mut clients = JoinSet::new();
    for i in 0..c {
        let client_options = ClientOptions::new()
            .subscribe([TOPIC])
            .source_address(source(i))
            .retry(retry)
            .seed(i as u64 + 1);
        let mut client = streamfarm_client::Client::start(service.clone(), client_options);
        let (killed_at, times, dials, connected, victim_url) = (
            killed_at.clone(),
            times.clone(),
            dials.clone(),
            connected_tx.clone(),
            victim_url.clone(),
        );
        clients.spawn(async move {
            let mut before = Dials::default();
            while let Some(event) = client.next_event().await {
                let server = match event {
                    Event::Connected { server } => server,
                    Event::FailedOver { to, .. } => to,
                    _ => continue,
                };
                match killed_at.get() {
                    None => {
                        before = client.dials();
                        let _ = connected.send(()).await;
                    }
                    Some(at) if server != victim_url => {
                        if let Ok(mut t) = times.lock() {
                            t.push(at.elapsed().as_secs_f64() * 1000.0);
                        }
                        if let Ok(mut d) = dials.lock() {
                            add_dials(&mut d.0, &before);
                            add_dials(&mut d.1, &dials_since(&before, &client.dials()));
                        }
                        break;
                    }
                    Some(_) => {}
                }
            }
            // Keep the client (and its connection) until the run ends.
            std::future::pending::<()>().await;
            drop(client);
        });
    }
    drop(connected_tx);
    for _ in 0..c {
        tokio::time::timeout(Duration::from_secs(60), connected_rx.recv())
            .await
            .context("clients did not all connect to the first node within 60 s")?;
    }
    let mut survivors = Vec::new();
    for (i, addr) in addrs[1..].iter().enumerate() {
        let mut spec = NodeSpec::new(format!("s{i}"), *addr);
        spec.join = vec![addrs[0]];
        survivors.push(NodeProc::start(&options.exe, &spec).await?);
    }
    poll(
        "all three nodes listed UP",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let farm = http(addrs[0], "GET", "/farm?format=text", &[], "")
                .await
                .ok()?;
            (farm.matches(" UP ").count() == 3).then_some(())
        },
    )
    .await?;
    let users = victim.metric("streamfarm_connections").await?;
    anyhow::ensure!(users as usize == c, "victim holds {users} of {c} clients");
    tokio::time::sleep(LEARN_THE_FARM).await;

    let done = Arc::new(tokio::sync::Notify::new());
    let survivor_addrs: Vec<SocketAddr> = survivors.iter().map(|s| s.listen).collect();
    let watcher = {
        let done = done.clone();
        tokio::spawn(async move {
            watch_survivors(
                survivor_addrs.len(),
                |i| {
                    let addr = survivor_addrs[i];
                    async move {
                        let text = http(addr, "GET", "/metrics", &[], "").await.ok()?;
                        crate::proc::prometheus_value(
                            &text,
                            "streamfarm_connections_accepted_total",
                        )
                    }
                },
                done,
            )
            .await
        })
    };
    tokio::time::sleep(SAMPLE * 2).await;
    let _ = killed_at.set(Instant::now());
    victim.guard.kill();
    // `STREAMFARM_BENCH_NO_BLACK_HOLE=1`: leave the dead address refusing (RST at once), as a
    // killed process on a live host does; attempts on it are then not counted.
    let hole = match std::env::var_os("STREAMFARM_BENCH_NO_BLACK_HOLE") {
        Some(_) => None,
        None => Some(BlackHole::start(addrs[0])?),
    };
    let _ = poll(
        "every client back",
        RECOVERY,
        Duration::from_millis(20),
        || {
            let n = times.lock().map_or(0, |t| t.len());
            async move { (n >= c).then_some(()) }
        },
    )
    .await;
    // Let late attempts land in the counters.
    tokio::time::sleep(SAMPLE * 3).await;
    done.notify_one();
    let (accepted, peak) = watcher.await?;
    let dead_attempts = hole.as_ref().map_or(0, BlackHole::attempts);
    drop(hole);
    clients.abort_all();
    let times_ms = times.lock().map(|t| t.clone()).unwrap_or_default();
    let dials = dials.lock().map(|d| *d).ok();
    Ok(Run {
        times_ms,
        dead_attempts: dead_attempts as f64,
        survivor_attempts: accepted,
        dials,
        peak_per_s: peak,
        clients: c,
    })
}

async fn nats_once(bin: &std::path::Path, c: usize) -> anyhow::Result<Run> {
    let mut servers = NatsProc::cluster(bin, &[ip(1), ip(2), ip(3)]).await?;
    let victim_addr = servers[0].addr;
    let killed_at: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let times = Arc::new(Mutex::new(Vec::new()));
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel(c);
    let mut clients: JoinSet<anyhow::Result<()>> = JoinSet::new();
    for i in 0..c {
        let (killed_at, times, connected) =
            (killed_at.clone(), times.clone(), connected_tx.clone());
        clients.spawn(async move {
            let mut nats = Nats::connect(victim_addr, Some(source(i))).await?;
            nats.subscribe(TOPIC, 1).await?;
            connected.send(()).await?;
            drop(connected);
            let mut buf = Vec::new();
            while nats.next(&mut buf).await.is_ok() {}
            let Some(at) = killed_at.get().copied() else {
                anyhow::bail!("lost nats-server before the kill");
            };
            // The pool: learned urls, shuffled, the lost server last.
            let mut pool: Vec<SocketAddr> = nats
                .connect_urls
                .iter()
                .filter_map(|u| u.parse().ok())
                .filter(|a| *a != victim_addr)
                .collect();
            pool.shuffle(&mut rand::rng());
            pool.push(victim_addr);
            let deadline = at + RECOVERY;
            'rounds: while Instant::now() < deadline {
                for addr in &pool {
                    if let Ok(mut fresh) = Nats::connect(*addr, Some(source(i))).await
                        && fresh.subscribe(TOPIC, 1).await.is_ok()
                    {
                        if let Ok(mut t) = times.lock() {
                            t.push(at.elapsed().as_secs_f64() * 1000.0);
                        }
                        nats = fresh;
                        break 'rounds;
                    }
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            // Hold the connection until the run ends.
            loop {
                if nats.next(&mut buf).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        });
    }
    drop(connected_tx);
    for _ in 0..c {
        tokio::time::timeout(Duration::from_secs(60), connected_rx.recv())
            .await
            .context("nats clients did not all connect within 60 s")?;
    }
    let done = Arc::new(tokio::sync::Notify::new());
    let survivors: Vec<(SocketAddr, SocketAddr)> =
        servers[1..].iter().map(|s| (s.addr, s.monitor)).collect();
    let watcher = {
        let done = done.clone();
        tokio::spawn(async move {
            watch_survivors(
                survivors.len(),
                |i| {
                    let monitor = survivors[i].1;
                    async move {
                        let body = http(monitor, "GET", "/varz", &[], "").await.ok()?;
                        let varz: serde_json::Value = serde_json::from_str(&body).ok()?;
                        varz.get("total_connections")?.as_f64()
                    }
                },
                done,
            )
            .await
        })
    };
    tokio::time::sleep(SAMPLE * 2).await;
    let _ = killed_at.set(Instant::now());
    servers[0].guard.kill();
    let hole = BlackHole::start(victim_addr)?;
    let _ = poll(
        "every client back",
        RECOVERY,
        Duration::from_millis(20),
        || {
            let n = times.lock().map_or(0, |t| t.len());
            async move { (n >= c).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(SAMPLE * 3).await;
    done.notify_one();
    let (accepted, peak) = watcher.await?;
    let dead_attempts = hole.attempts();
    drop(hole);
    clients.abort_all();
    let times_ms = times.lock().map(|t| t.clone()).unwrap_or_default();
    Ok(Run {
        times_ms,
        dead_attempts: dead_attempts as f64,
        survivor_attempts: accepted,
        dials: None,
        peak_per_s: peak,
        clients: c,
    })
}
