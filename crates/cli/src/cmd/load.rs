//! `streamfarm load SERVICE --clients N`: hold N real client connections from this process and
//! show how they spread over the farm and how they fail over.
//!
//! While connecting, a progress bar (on a terminal); then, when standard output is a terminal, a
//! live table of clients per server; on exit (Ctrl-C, SIGTERM or `--duration`) a summary with
//! the failovers and their durations. The [`Swarm`] of clients and its tables are shared with
//! `streamfarm demo`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use streamfarm_client::{Client, ClientOptions, Event, ServiceAddress};
use streamfarm_core::FarmList;
use streamfarm_core::stats::quantile;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::list::{ClientArgs, render_rows};
use super::sub::parse_duration;

/// Connections one source address can hold to one server port, with room to spare: Linux's
/// default ephemeral range has about 28k ports.
const CLIENTS_PER_SOURCE_IP: usize = 20_000;

/// Arguments of `streamfarm load`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The service: a URL, `host:port` (all its addresses), or a comma-separated seed list.
    service: ServiceAddress,
    /// How many client connections to hold.
    #[arg(long, short = 'n')]
    clients: usize,
    /// A topic every client subscribes to (none: connections only).
    #[arg(long)]
    topic: Option<String>,
    /// Stop after this long (e.g. `30s`, `2m`); default: until Ctrl-C or SIGTERM.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// New connections started per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Spread connections over this many local source addresses (127.0.1.1, 127.0.1.2, …);
    /// default: one per 20000 clients when the service is on loopback, else the system's choice.
    #[arg(long)]
    source_ips: Option<usize>,
    #[command(flatten)]
    client: ClientArgs,
}

pub(crate) async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let mut options = args.client.options()?;
    if let Some(topic) = &args.topic {
        options = options.subscribe([topic.clone()]);
    }
    let loopback = args.service.targets().iter().all(|t| {
        t.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) || t.host == "localhost"
    });
    let source_ips = match args.source_ips {
        Some(n) => n,
        None if loopback => args.clients.div_ceil(CLIENTS_PER_SOURCE_IP),
        None => 0,
    };
    let terminal = std::io::stdout().is_terminal();
    let stop = stop_after(args.duration);
    tokio::pin!(stop);

    let mut swarm = Swarm::new();
    let progress = progress_bar(args.clients as u64);
    let started = tokio::time::Instant::now();
    let spawned = async {
        swarm
            .spawn(
                &args.service,
                &options,
                args.clients,
                args.rate,
                source_ips,
                &progress,
            )
            .await;
        swarm.wait_connected(args.clients as u64, &progress).await;
    };
    let interrupted = tokio::select! {
        _ = spawned => false,
        _ = &mut stop => true,
    };
    progress.finish_and_clear();
    eprintln!(
        "{} of {} clients connected in {:.1} s",
        swarm.stats.connected(),
        args.clients,
        started.elapsed().as_secs_f64()
    );
    if !interrupted {
        let farm = FarmWatch::start(args.service.clone(), args.client.options()?);
        let mut table = LiveTable::default();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if terminal {
                        table.draw(&server_table(&swarm.stats, farm.latest().as_ref()));
                    }
                }
                _ = &mut stop => break,
            }
        }
        farm.stop();
    }
    let summary = swarm.stats.summary();
    swarm.stop().await;
    print!("{}", summary.render());
    Ok(ExitCode::SUCCESS)
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} connecting [{bar:40}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Resolves after `duration` (if given), or on Ctrl-C or SIGTERM.
pub(crate) async fn stop_after(duration: Option<Duration>) {
    match duration {
        Some(duration) => {
            tokio::select! {
                _ = tokio::time::sleep(duration) => {}
                _ = shutdown_signal() => {}
            }
        }
        None => shutdown_signal().await,
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What a crowd of clients saw, updated live by their tasks.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Clients connected now, per server url.
    per_server: Mutex<BTreeMap<String, u64>>,
    ever_connected: AtomicU64,
    messages: AtomicU64,
    disconnects: AtomicU64,
    /// Moves at a node's request (make-before-break).
    migrations: AtomicU64,
    retries: AtomicU64,
    /// `Gap` events: messages the clients were told they will never get.
    gaps: AtomicU64,
    /// Messages the clients recovered from history after a failover.
    recovered: AtomicU64,
    /// How long each failover took, from loss to resubscribed.
    failovers: Mutex<Vec<Duration>>,
    /// What each finished client received, by the sequence numbers of the payloads.
    tallies: Mutex<Vec<Tally>>,
}

/// What one client received of a publisher whose payloads end in a sequence number
/// (`tick 17`): which numbers, how often, and in what order — counted from the payloads, not
/// from positions, so that it checks the positions too.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Tally {
    /// Times each number was received.
    pub(crate) received: BTreeMap<u64, u32>,
    /// Messages whose number was lower than one received before.
    pub(crate) out_of_order: u64,
    /// The client failed over at least once.
    pub(crate) failed_over: bool,
    /// The client was moved by a node at least once (make-before-break).
    pub(crate) migrated: bool,
    highest: Option<u64>,
}

impl Tally {
    fn record(&mut self, payload: &[u8]) {
        let Some(n) = std::str::from_utf8(payload)
            .ok()
            .and_then(|text| text.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
        else {
            return;
        };
        if self.highest.is_some_and(|h| n < h) {
            self.out_of_order += 1;
        }
        self.highest = self.highest.max(Some(n));
        *self.received.entry(n).or_default() += 1;
    }

    /// Numbers of `published` (sorted) from the first this client received on, up to `until`,
    /// that it never received.
    pub(crate) fn lost(&self, published: &[u64], until: u64) -> u64 {
        let Some(first) = self.received.keys().next() else {
            return 0;
        };
        published
            .iter()
            .filter(|n| **n >= *first && **n <= until && !self.received.contains_key(n))
            .count() as u64
    }

    /// Messages received more than once (each extra copy counts).
    pub(crate) fn duplicated(&self) -> u64 {
        self.received.values().map(|c| u64::from(c - 1)).sum()
    }
}

impl Stats {
    /// Clients connected now.
    pub(crate) fn connected(&self) -> u64 {
        self.per_server().values().sum()
    }

    /// Clients connected now, per server url.
    pub(crate) fn per_server(&self) -> BTreeMap<String, u64> {
        self.per_server.lock().expect("stats lock").clone()
    }

    /// Messages received by all clients.
    pub(crate) fn messages(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    /// Migrations so far (moves at a node's request).
    pub(crate) fn migrations(&self) -> u64 {
        self.migrations.load(Ordering::Relaxed)
    }

    /// Failovers so far.
    pub(crate) fn failovers(&self) -> usize {
        self.failovers.lock().expect("stats lock").len()
    }

    fn record(&self, event: &Event) {
        match event {
            Event::Connected { server, .. } => {
                *self
                    .per_server
                    .lock()
                    .expect("stats lock")
                    .entry(server.clone())
                    .or_default() += 1;
            }
            Event::Disconnected { server, .. } => {
                self.disconnects.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = self.per_server.lock().expect("stats lock").get_mut(server) {
                    *n = n.saturating_sub(1);
                }
            }
            Event::FailedOver { took, .. } => {
                self.failovers.lock().expect("stats lock").push(*took);
            }
            Event::Migrated { from, to, .. } => {
                self.migrations.fetch_add(1, Ordering::Relaxed);
                let mut per_server = self.per_server.lock().expect("stats lock");
                if let Some(n) = per_server.get_mut(from) {
                    *n = n.saturating_sub(1);
                }
                *per_server.entry(to.clone()).or_default() += 1;
            }
            Event::Message { .. } => {
                self.messages.fetch_add(1, Ordering::Relaxed);
            }
            Event::Retrying { .. } => {
                self.retries.fetch_add(1, Ordering::Relaxed);
            }
            Event::Gap { .. } => {
                self.gaps.fetch_add(1, Ordering::Relaxed);
            }
            Event::Recovered { count, .. } => {
                self.recovered.fetch_add(*count, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    /// A copy of everything, for the summary.
    pub(crate) fn summary(&self) -> Summary {
        let mut failovers = self.failovers.lock().expect("stats lock").clone();
        failovers.sort();
        Summary {
            ever_connected: self.ever_connected.load(Ordering::Relaxed),
            per_server: self.per_server(),
            messages: self.messages(),
            disconnects: self.disconnects.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            gaps: self.gaps.load(Ordering::Relaxed),
            recovered: self.recovered.load(Ordering::Relaxed),
            failovers,
            tallies: self.tallies.lock().expect("stats lock").clone(),
        }
    }
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Summary {
    pub(crate) ever_connected: u64,
    pub(crate) per_server: BTreeMap<String, u64>,
    pub(crate) messages: u64,
    pub(crate) disconnects: u64,
    pub(crate) retries: u64,
    pub(crate) gaps: u64,
    pub(crate) recovered: u64,
    /// Sorted.
    pub(crate) failovers: Vec<Duration>,
    /// One per client that has finished (see [`Swarm::stop`]).
    pub(crate) tallies: Vec<Tally>,
}

impl Summary {
    /// The `q` quantile (0..=1) of the failover durations, nearest rank.
    pub(crate) fn failover_quantile(&self, q: f64) -> Option<Duration> {
        quantile(&self.failovers, q)
    }

    /// `p50 … ms, p99 … ms, max … ms` of the failover durations, if there were failovers.
    pub(crate) fn failover_times(&self) -> Option<String> {
        let (p50, p99, max) = (
            self.failover_quantile(0.5)?,
            self.failover_quantile(0.99)?,
            self.failovers.last()?,
        );
        Some(format!(
            "p50 {} ms, p99 {} ms, max {} ms",
            millis(p50),
            millis(p99),
            millis(*max)
        ))
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::from("clients per server:\n");
        for (server, n) in &self.per_server {
            out.push_str(&format!("  {server}  {n}\n"));
        }
        out.push_str(&format!(
            "connected now {}, ever {}; disconnections {}; failed rounds {}\n",
            self.per_server.values().sum::<u64>(),
            self.ever_connected,
            self.disconnects,
            self.retries
        ));
        out.push_str(&format!("failovers {}", self.failovers.len()));
        if let Some(times) = self.failover_times() {
            out.push_str(&format!(": {times}"));
        }
        out.push('\n');
        out.push_str(&format!(
            "messages received {}; recovered after failovers {}; gaps reported {}\n",
            self.messages, self.recovered, self.gaps
        ));
        out
    }
}

pub(crate) fn millis(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

/// Many clients in this process, each in its own task, reporting into shared [`Stats`].
pub(crate) struct Swarm {
    pub(crate) stats: Arc<Stats>,
    stop_tx: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Swarm {
    pub(crate) fn new() -> Self {
        Swarm {
            stats: Arc::default(),
            stop_tx: watch::channel(false).0,
            tasks: JoinSet::new(),
        }
    }

    /// Starts one client.
    pub(crate) fn add(&mut self, address: ServiceAddress, options: ClientOptions) {
        let stats = self.stats.clone();
        let mut stop = self.stop_tx.subscribe();
        self.tasks.spawn(async move {
            let mut client = Client::start(address, options);
            let mut connected_once = false;
            let mut tally = Tally::default();
            loop {
                tokio::select! {
                    event = client.next_event() => {
                        let Some(event) = event else { break };
                        if !connected_once && matches!(event, Event::Connected { .. }) {
                            connected_once = true;
                            stats.ever_connected.fetch_add(1, Ordering::Relaxed);
                        }
                        match &event {
                            Event::Message { payload, .. } => tally.record(payload),
                            Event::FailedOver { .. } => tally.failed_over = true,
                            Event::Migrated { .. } => tally.migrated = true,
                            _ => {}
                        }
                        stats.record(&event);
                    }
                    _ = stop.wait_for(|stop| *stop) => break,
                }
            }
            stats.tallies.lock().expect("stats lock").push(tally);
            client.close().await;
        });
    }

    /// Starts `n` clients at `rate` per second, from `source_ips` loopback source addresses
    /// (0: the system's choice), advancing `progress` as they connect.
    pub(crate) async fn spawn(
        &mut self,
        address: &ServiceAddress,
        options: &ClientOptions,
        n: usize,
        rate: u32,
        source_ips: usize,
        progress: &ProgressBar,
    ) {
        // Start in small batches every 20 ms, so the rate holds without a timer per client.
        let per_batch = (rate.max(1) as usize).div_ceil(50).max(1);
        let mut batch = tokio::time::interval(Duration::from_millis(20));
        for i in 0..n {
            if i % per_batch == 0 {
                batch.tick().await;
                progress.set_position(self.stats.ever_connected.load(Ordering::Relaxed));
            }
            let mut options = options.clone();
            if source_ips > 0 {
                options = options.source_address(source_ip(i % source_ips));
            }
            self.add(address.clone(), options);
        }
    }

    /// Waits until `n` clients have connected at least once, advancing `progress`.
    pub(crate) async fn wait_connected(&self, n: u64, progress: &ProgressBar) {
        loop {
            let done = self.stats.ever_connected.load(Ordering::Relaxed);
            progress.set_position(done);
            if done >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops every client and waits (a few seconds at most) for their connections to close.
    pub(crate) async fn stop(mut self) {
        self.stop_tx.send_replace(true);
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(5), all)
            .await
            .is_err()
        {
            self.tasks.abort_all();
        }
    }
}

/// The `k`-th extra loopback source address: 127.0.1.(k+1).
fn source_ip(k: usize) -> IpAddr {
    let k = k % 250;
    IpAddr::V4(Ipv4Addr::new(127, 0, 1, k as u8 + 1))
}

/// The farm list, fetched once a second in the background.
pub(crate) struct FarmWatch {
    latest: Arc<Mutex<Option<FarmList>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FarmWatch {
    pub(crate) fn start(address: ServiceAddress, options: ClientOptions) -> Self {
        let latest = Arc::new(Mutex::new(None));
        let task = tokio::spawn({
            let latest = latest.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    if let Ok((list, _)) = streamfarm_client::fetch_list(&address, &options).await {
                        *latest.lock().expect("farm lock") = Some(list);
                    }
                }
            }
        });
        FarmWatch { latest, task }
    }

    pub(crate) fn latest(&self) -> Option<FarmList> {
        self.latest.lock().expect("farm lock").clone()
    }

    pub(crate) fn stop(self) {
        self.task.abort();
    }
}

/// Servers with their status and users as the farm lists them, beside the clients of this
/// process on each, with a bar.
pub(crate) fn server_table(stats: &Stats, farm: Option<&FarmList>) -> String {
    let ours = stats.per_server();
    let mut urls: Vec<String> = farm
        .map(|f| f.servers.iter().map(|s| s.url.clone()).collect())
        .unwrap_or_default();
    for url in ours.keys() {
        if !urls.contains(url) {
            urls.push(url.clone());
        }
    }
    let most = ours.values().copied().max().unwrap_or(0).max(1);
    let mut rows = vec![[
        "SERVER".to_string(),
        "PRIORITY".to_string(),
        "STATUS".to_string(),
        "USERS".to_string(),
        "OURS".to_string(),
        String::new(),
    ]];
    for url in &urls {
        let entry = farm.and_then(|f| f.by_url(url));
        let n = ours.get(url).copied().unwrap_or(0);
        let name = entry
            .filter(|e| !e.name.is_empty())
            .map(|e| format!("{} {url}", e.name))
            .unwrap_or_else(|| url.clone());
        rows.push([
            name,
            entry.map(|e| e.priority.clone()).unwrap_or_default(),
            entry
                .map(|e| e.status.to_string())
                .unwrap_or_else(|| "?".into()),
            entry
                .map(|e| e.users.to_string())
                .unwrap_or_else(|| "?".into()),
            n.to_string(),
            "#".repeat((n * 30).div_ceil(most) as usize),
        ]);
    }
    render_rows(&rows)
}

/// Redraws a block of lines in place on a terminal.
#[derive(Debug, Default)]
pub(crate) struct LiveTable {
    lines: usize,
}

impl LiveTable {
    pub(crate) fn draw(&mut self, text: &str) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if self.lines > 0 {
            // Up to the first line of the previous drawing, then clear to the end of the screen.
            let _ = write!(out, "\x1b[{}A\x1b[J", self.lines);
        }
        let _ = write!(out, "{text}");
        let _ = out.flush();
        self.lines = text.lines().count();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_follow_connections_and_failovers() {
        let stats = Stats::default();
        let a = "ws://a/stream".to_string();
        let b = "ws://b/stream".to_string();
        stats.record(&Event::Connected {
            server: a.clone(),
            transport: streamfarm_client::Transport::WebSocket,
        });
        stats.record(&Event::Connected {
            server: a.clone(),
            transport: streamfarm_client::Transport::WebSocket,
        });
        stats.record(&Event::Disconnected {
            server: a.clone(),
            cause: streamfarm_client::LossCause::HeartbeatTimeout,
        });
        stats.record(&Event::Connected {
            server: b.clone(),
            transport: streamfarm_client::Transport::WebSocket,
        });
        stats.record(&Event::FailedOver {
            from: a.clone(),
            to: b.clone(),
            took: Duration::from_millis(30),
        });
        let summary = stats.summary();
        assert_eq!(summary.per_server, BTreeMap::from([(a, 1), (b, 1)]));
        assert_eq!(summary.disconnects, 1);
        assert!(summary.render().contains("failovers 1: p50 30.0 ms"));
        let table = server_table(&stats, None);
        assert!(table.lines().nth(1).unwrap().starts_with("ws://a/stream"));
    }

    #[test]
    fn source_addresses_are_loopback() {
        assert_eq!(source_ip(0), "127.0.1.1".parse::<IpAddr>().unwrap());
        assert!(source_ip(400).is_loopback());
    }
}
