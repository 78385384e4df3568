//! Failover with messages flowing: C clients on one server, a publisher at a steady rate on
//! another, and one of four failures; how long until each client is subscribed on a survivor,
//! how many connection attempts that took, and what each client lost, received twice or out of
//! order (see [`crate::flow`] for how messages are counted, from their sequence numbers).
//!
//! The four cases, each a row (streamfarm and nats-server in the same run):
//! - **node killed** (`C=N`; streamfarm also `C=N retry-once`): SIGKILL of the server holding the
//!   clients.
//! - **publisher's node killed** (`C=N publisher's node killed`): SIGKILL of the server the
//!   publisher publishes on, which holds no clients: every message goes through it, so it is the
//!   worst server to lose for the publish path. The publisher then publishes on the next server.
//! - **node hung** (`C=N hung T s`): SIGSTOP of the clients' server for T s (no close, no reset),
//!   then SIGCONT.
//! - **node partitioned** (`C=N partitioned T s`): the clients' server cut off from the other
//!   servers for T s while its clients still reach it ([`crate::partition`], nftables on loopback;
//!   root only, else the row is skipped with the reason in a note).
//!
//! Why these: a failover is where a push system loses messages, and the four are the ways a
//! server fails — dies, dies under the publish path, hangs, or is cut off. The targets are 0 lost,
//! 0 duplicated, 0 out of order, and a failover as fast as nats-server's.
//!
//! streamfarm: three child nodes; the clients' node (127.0.0.3) starts alone, so every client (the
//! real `streamfarm-client`, seeded with all three addresses) lands on it; then the two others
//! (127.0.0.1, 127.0.0.2) join and the farm is listed whole. The publisher posts to 127.0.0.1
//! (`POST /publish/fo`, keep-alive). nats-server: a three-server cluster on the same addresses;
//! the clients (this crate's minimal client) connect to the first and learn the others from
//! `INFO` `connect_urls`; on loss each tries the learned urls in random order with the lost one
//! last, as nats.go does (reconnect at once to another server; wait 2 s only before retrying one
//! already tried). Neither the streamfarm client nor nats.go's defaults detect a hung server
//! within a 10 s hang the same way: the streamfarm client's heartbeat times out in about 3 s,
//! nats.go pings every 2 minutes, so the nats-server clients simply wait.
//!
//! Timeline of a run: clients connect; the farm forms; the publisher starts; once every client
//! has received a message, counting starts (so the set-up of the interest between servers is
//! not counted as loss); the clients are given [`LEARN_THE_FARM`] to refresh their lists (as they
//! do on their heartbeats); the failure; every client back (or the failure over); one more
//! second of publishing; the publisher stops; then the run waits until no message arrived for
//! [`QUIET`] (at most [`QUIET_DEADLINE`]), so that late deliveries are counted.
//!
//! Attempts: after a kill, the dead server's address is taken over by a listener (on its own
//! thread, so it answers at once) that closes every connection and counts it, so attempts on the
//! dead server are counted like the refused connections they stand for; attempts on the survivors
//! are their accepted-connection counters (`streamfarm_connections_accepted_total`, `/varz`
//! `total_connections`), sampled every 100 ms, which also give the peak connections/s per
//! survivor. Both are reported apart (`dead_attempts_per_client`,
//! `survivor_attempts_per_client`) besides their sum: an attempt on a dead address costs the
//! survivors nothing. The streamfarm clients also count their own dials by purpose
//! ([`streamfarm_client::Dials`]): list fetches, connects to the chosen server, and lists whose
//! connection was kept (`client_*` figures, from the failure until each client is back; and
//! `first_contact_dials_per_client` before it).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rand::seq::SliceRandom;
use streamfarm_client::{ClientOptions, Dials, Event, LossCause, RetryMode, ServiceAddress};
use streamfarm_core::protocol::close;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::flow::{
    Ledger, Publisher, Receipts, Tally, Target, client_source, loopback, now_ms, now_us, tally,
};
use crate::nats::NatsProc;
use crate::proc::{Guard, NodeProc, NodeSpec, Signal, free_port, http, poll};
use crate::report::{RowBuilder, Section, quantile};
use crate::wire::Nats;
use crate::{NATS, Options, STREAMFARM, ratio};
use streamfarm_localfarm::partition::{ISOLATED_GID, Isolated, Partition, interruptible, v4};

/// Longest wait for every client to be back after a kill.
const RECOVERY: Duration = Duration::from_secs(30);
/// After a hang or a partition ends, how long clients still moving are waited for.
const SETTLE: Duration = Duration::from_secs(3);
/// After the farm is whole, how long the streamfarm clients are given to learn it: their list
/// refresh (5 s by default, on a heartbeat of 1 s) plus a margin. Clients in a real farm have
/// held their connections far longer than that when a node dies. Not in `--quick` runs.
const LEARN_THE_FARM: Duration = Duration::from_millis(6500);
/// Publishing goes on this long after the clients are back (or the failure is over).
const AFTER: Duration = Duration::from_secs(1);
/// The run ends once no message arrived for this long…
const QUIET: Duration = Duration::from_millis(500);
/// …or this long after the publisher stopped.
const QUIET_DEADLINE: Duration = Duration::from_secs(15);
/// Longest wait for every client's first message once the publisher started.
const WARM_UP: Duration = Duration::from_secs(20);
/// Survivors' counters are sampled this often.
const SAMPLE: Duration = Duration::from_millis(100);
const TOPIC: &str = "fo";
/// Where the clients' server listens; the two others are on 127.0.0.1 and 127.0.0.2. Not
/// 127.0.0.1: that is every process's default source address, which a partition must cut.
const CLIENTS_SERVER: u8 = 3;
const OTHER_SERVERS: [u8; 2] = [1, 2];

/// The failures measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Case {
    /// SIGKILL of the clients' server.
    NodeKilled,
    /// SIGKILL of the publisher's server (no clients on it).
    PublisherNodeKilled,
    /// SIGSTOP of the clients' server, SIGCONT after the hang.
    NodeHung,
    /// The clients' server cut off from the others for the hang.
    NodePartitioned,
}

impl Case {
    const ALL: [Case; 4] = [
        Case::NodeKilled,
        Case::PublisherNodeKilled,
        Case::NodeHung,
        Case::NodePartitioned,
    ];

    /// The name `--cases` selects it by.
    fn name(self) -> &'static str {
        match self {
            Case::NodeKilled => "killed",
            Case::PublisherNodeKilled => "publisher-killed",
            Case::NodeHung => "hung",
            Case::NodePartitioned => "partitioned",
        }
    }

    /// The row's setting.
    fn setting(self, c: usize, hang: Duration) -> String {
        let secs = hang.as_secs_f64();
        match self {
            Case::NodeKilled => format!("C={c}"),
            Case::PublisherNodeKilled => format!("C={c} publisher's node killed"),
            Case::NodeHung => format!("C={c} hung {secs} s"),
            Case::NodePartitioned => format!("C={c} partitioned {secs} s"),
        }
    }

    /// Whether the failing server is the clients' own (so they may move).
    fn hits_clients(self) -> bool {
        self != Case::PublisherNodeKilled
    }

    /// Whether the failure lasts (a hang, a partition) rather than being a kill.
    fn lasts(self) -> bool {
        matches!(self, Case::NodeHung | Case::NodePartitioned)
    }
}

/// What one run measured.
struct Run {
    /// Failure → subscribed on a survivor, per client that made it, ms.
    times_ms: Vec<f64>,
    /// Connections the dead address took over from the victim saw.
    dead_attempts: f64,
    /// Connections the survivors accepted.
    survivor_attempts: f64,
    /// The streamfarm clients' own counts: before the failure, and from it until back.
    dials: Option<(Dials, Dials)>,
    peak_per_s: f64,
    clients: usize,
    /// Messages, per client.
    tallies: Vec<Tally>,
    /// The publisher's record and where counting started.
    ledger: Ledger,
    from_seq: u64,
    /// When the failure started, µs on the bench clock.
    loss_us: u64,
    /// Connections the servers closed as too slow a consumer.
    slow_consumer_closes: u64,
    /// Failure → a surviving node lists the failed one as not UP (streamfarm), ms.
    listed_down_ms: Option<f64>,
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
    let mut section = Section::default();
    let partition_unavailable = Partition::unavailable();
    if let Some(unknown) = options
        .failover_cases
        .iter()
        .find(|name| !Case::ALL.iter().any(|case| case.name() == name.as_str()))
    {
        anyhow::bail!(
            "unknown failover case {unknown:?}: the cases are {}",
            Case::ALL.map(Case::name).join(", ")
        );
    }
    let chosen = |case: &Case| {
        options.failover_cases.is_empty()
            || options
                .failover_cases
                .iter()
                .any(|name| name == case.name())
    };
    for case in Case::ALL.into_iter().filter(chosen) {
        let setting = case.setting(c, options.hang);
        if case == Case::NodePartitioned
            && let Some(why) = &partition_unavailable
        {
            let note = format!("{setting}: skipped: {why}");
            println!("failover: {note}");
            section.notes.push(note);
            continue;
        }
        let mut systems = vec![(STREAMFARM, RetryMode::default(), setting.clone())];
        let retry_once = format!("C={c} retry-once");
        if case == Case::NodeKilled {
            systems.push((STREAMFARM, RetryMode::RetryOnce, retry_once.clone()));
        }
        if options.nats.is_some() {
            systems.push((NATS, RetryMode::default(), setting.clone()));
        }
        for (system, retry, label) in systems {
            let mut row = RowBuilder::default();
            let outcome = async {
                for _ in 0..options.repeats {
                    let run = match (system, &options.nats) {
                        (NATS, Some(nats)) => nats_once(options, &nats.path, case).await,
                        _ => streamfarm_once(options, retry, case).await,
                    }
                    .with_context(|| format!("{system} failover ({label})"))?;
                    add_figures(&mut row, case, &run);
                }
                anyhow::Ok(())
            }
            .await;
            section.rows.push(row.finish(system, &label, outcome));
        }
        let labels: &[&String] = if case == Case::NodeKilled {
            &[&setting, &retry_once]
        } else {
            &[&setting]
        };
        for label in labels {
            section
                .notes
                .push(verdicts(&section, case, label, &setting));
        }
    }
    let behind: Vec<String> = section
        .rows
        .iter()
        .filter_map(|row| {
            let rate = row.figures.get("publish_rate_per_s")?.median;
            (rate < 0.9 * options.publish_rate)
                .then(|| format!("{} {} ({rate:.0}/s)", row.system, row.setting))
        })
        .collect();
    if !behind.is_empty() {
        section.notes.push(format!(
            "the publisher fell behind the {}/s asked in: {}; see delivery_delay_before_failure_max_ms: seconds there mean the load generator could not keep up and losses include its backlog",
            options.publish_rate,
            behind.join(", ")
        ));
    }
    if options.quick {
        section.notes.push(
            "quick: no time for the clients to learn the farm, hang and partition shortened"
                .to_string(),
        );
    }
    Ok(section)
}

/// One run's figures, added to its row.
fn add_figures(row: &mut RowBuilder, case: Case, run: &Run) {
    let per_client = |n: f64| n / run.clients as f64;
    let sum = |f: fn(&Tally) -> u64| run.tallies.iter().map(f).sum::<u64>() as f64;
    row.add("lost_per_client", per_client(sum(|t| t.lost)));
    let worst = run.tallies.iter().map(|t| t.lost).max().unwrap_or(0);
    row.add("lost_max_per_client", worst as f64);
    let ms = |us: Option<u64>| us.unwrap_or(0) as f64 / 1000.0;
    let delay = run.tallies.iter().map(|t| t.delay_max_us).max();
    row.add("delivery_delay_max_ms", ms(delay));
    let steady = run.tallies.iter().map(|t| t.steady_delay_max_us).max();
    row.add("delivery_delay_before_failure_max_ms", ms(steady));
    row.add("duplicated_per_client", per_client(sum(|t| t.duplicated)));
    row.add(
        "out_of_order_per_client",
        per_client(sum(|t| t.out_of_order)),
    );
    row.add("declared_per_client", per_client(sum(|t| t.declared)));
    row.add(
        "slow_consumer_closes_per_client",
        per_client(run.slow_consumer_closes as f64),
    );
    row.add(
        "published_msgs",
        run.ledger.accepted_since(run.from_seq) as f64,
    );
    row.add(
        "not_accepted_msgs",
        run.ledger.not_accepted_since(run.from_seq) as f64,
    );
    row.add("publish_moved_msgs", run.ledger.moved as f64);
    row.add("publish_rate_per_s", run.ledger.rate_since(run.from_seq));
    if let Some(ms) = run.listed_down_ms {
        row.add("listed_down_ms", ms);
    }
    if case == Case::PublisherNodeKilled {
        if let Some(gap) = run.ledger.first_accepted_after(run.loss_us) {
            row.add("publish_gap_ms", gap);
        }
        return;
    }
    let mut caught: Vec<f64> = run.tallies.iter().filter_map(|t| t.caught_up_ms).collect();
    caught.sort_by(f64::total_cmp);
    let mut times = run.times_ms.clone();
    times.sort_by(f64::total_cmp);
    let q = |v: &[f64], p| quantile(v, p).unwrap_or(f64::NAN);
    row.add("resubscribed_p50_ms", q(&times, 0.5));
    row.add("resubscribed_p99_ms", q(&times, 0.99));
    row.add("resubscribed_max_ms", q(&times, 1.0));
    row.add("back_fraction", times.len() as f64 / run.clients as f64);
    if !times.is_empty() {
        row.add(
            "caught_up_fraction",
            caught.len() as f64 / times.len() as f64,
        );
    }
    row.add("caught_up_p99_ms", q(&caught, 0.99));
    if times.is_empty() {
        // Nobody moved (a short hang, a partition): no failover whose cost to count.
        return;
    }
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

/// The targets beside the figures of `label` (a streamfarm row), against nats-server's row of
/// `nats_label`.
fn verdicts(section: &Section, case: Case, label: &str, nats_label: &str) -> String {
    let get = |sys, setting: &str, fig| section.median(sys, setting, fig);
    let zero = |fig| {
        let ours = get(STREAMFARM, label, fig);
        let theirs = get(NATS, nats_label, fig).map_or("n/a".to_string(), |v| format!("{v:.3}"));
        format!(
            "{} {}: {} (nats-server {theirs})",
            fig.trim_end_matches("_per_client"),
            ours.map_or("n/a".to_string(), |v| format!("{v:.3}")),
            verdict(ours, 0.0),
        )
    };
    let mut out = format!(
        "{label}: per client, target 0: {}; {}; {}",
        zero("lost_per_client"),
        zero("duplicated_per_client"),
        zero("out_of_order_per_client"),
    );
    if case.hits_clients() {
        let nats_p99 = get(NATS, nats_label, "resubscribed_p99_ms");
        let p99 = get(STREAMFARM, label, "resubscribed_p99_ms");
        let caught = get(STREAMFARM, label, "caught_up_p99_ms");
        let attempts = get(STREAMFARM, label, "attempts_per_client");
        let survivors = get(STREAMFARM, label, "survivor_attempts_per_client");
        let within = |v: Option<f64>| match (v, nats_p99) {
            (Some(v), Some(n)) => verdict(Some(v), n),
            (None, _) => "n/a (no client moved, or none caught up)",
            (Some(_), None) => "n/a (no nats-server figure)",
        };
        out.push_str(&format!(
            "; p99 resubscribed streamfarm/nats = {} (target <= nats: {}); p99 caught up {} (target <= nats p99 resubscribed: {}); attempts/client {} (target <= 1.2: {}; survivors only: {})",
            ratio(p99, nats_p99),
            within(p99),
            caught.map_or("n/a".to_string(), |v| format!("{v:.0} ms")),
            within(caught),
            attempts.map_or("n/a".to_string(), |v| format!("{v:.2}")),
            verdict(attempts, 1.2),
            verdict(survivors, 1.2),
        ));
    }
    out
}

fn verdict(value: Option<f64>, at_most: f64) -> &'static str {
    match value {
        Some(v) if v <= at_most => "met",
        Some(_) => "NOT met",
        None => "n/a",
    }
}

/// What one client saw, shared between its task and the run.
#[derive(Debug, Default)]
struct ClientLog {
    receipts: Receipts,
    /// When it was subscribed on a survivor after the failure, ms on the bench clock.
    back_ms: Option<u32>,
    slow_consumer_closes: u64,
}

/// Messages arriving at all the clients: how many have had one, and when the last came.
#[derive(Debug, Default)]
struct Activity {
    warm: AtomicUsize,
    last_ms: AtomicU32,
    /// Set when the failure starts.
    failed: AtomicBool,
}

impl Activity {
    /// Notes a message received by `log` at `at_ms`.
    fn received(&self, log: &mut ClientLog, payload: &[u8], at_ms: u32) {
        let first = !log.receipts.any();
        let steady = !self.failed.load(Ordering::Relaxed);
        if log.receipts.record(payload, at_ms, steady) {
            if first {
                self.warm.fetch_add(1, Ordering::Relaxed);
            }
            self.last_ms.store(at_ms, Ordering::Relaxed);
        }
    }

    /// Waits until each of `clients` has received a message.
    async fn until_warm(&self, clients: usize) -> anyhow::Result<()> {
        poll(
            "every client received a first message",
            WARM_UP,
            Duration::from_millis(20),
            || {
                let warm = self.warm.load(Ordering::Relaxed);
                async move { (warm >= clients).then_some(()) }
            },
        )
        .await
    }

    /// Waits until no message arrived for [`QUIET`], at most [`QUIET_DEADLINE`]; false if
    /// messages were still arriving then.
    async fn until_quiet(&self) -> bool {
        poll("quiet", QUIET_DEADLINE, Duration::from_millis(50), || {
            let last = self.last_ms.load(Ordering::Relaxed);
            let quiet = now_ms().saturating_sub(last) >= QUIET.as_millis() as u32;
            async move { quiet.then_some(()) }
        })
        .await
        .is_ok()
    }
}

/// Counts every client's messages.
fn tally_all(
    logs: &[Arc<Mutex<ClientLog>>],
    ledger: &Ledger,
    from_seq: u64,
    loss_ms: u32,
) -> (Vec<Tally>, Vec<f64>, u64) {
    let mut tallies = Vec::with_capacity(logs.len());
    let mut times = Vec::new();
    let mut slow = 0;
    for log in logs {
        let log = log.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let moved = log.back_ms.map(|back| (loss_ms, back));
        if let Some(back) = log.back_ms {
            times.push(f64::from(back.saturating_sub(loss_ms)));
        }
        tallies.push(tally(&log.receipts, ledger, from_seq, moved));
        slow += log.slow_consumer_closes;
    }
    (tallies, times, slow)
}

/// The failure of `case` to the server of `guard` (listening on `addr`); returns once it is over
/// (at once for a kill, after `hang` for a hang or a partition), with the listener that took over
/// a killed server's address when `black_hole` is set. A partition cuts `addr` off from `others`.
async fn inflict(
    case: Case,
    guard: &mut Guard,
    addr: SocketAddr,
    others: &[IpAddr],
    hang: Duration,
    black_hole: bool,
) -> anyhow::Result<Option<BlackHole>> {
    match case {
        Case::NodeKilled | Case::PublisherNodeKilled => {
            guard.kill();
            // `STREAMFARM_BENCH_NO_BLACK_HOLE=1`: leave the dead address refusing (RST at once),
            // as a killed process on a live host does; attempts on it are then not counted.
            if black_hole && std::env::var_os("STREAMFARM_BENCH_NO_BLACK_HOLE").is_none() {
                return Ok(Some(BlackHole::start(addr)?));
            }
        }
        Case::NodeHung => {
            guard.signal(Signal::STOP)?;
            let hung = interruptible(hang).await;
            guard.signal(Signal::CONT)?;
            hung?;
        }
        Case::NodePartitioned => {
            let others = others
                .iter()
                .map(|ip| v4(*ip))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let isolated = Isolated {
                ip: v4(addr.ip())?,
                pid: guard.pid(),
            };
            let partition = Partition::isolate(isolated, &others)?;
            let cut = interruptible(hang).await;
            partition.heal()?;
            cut?;
        }
    }
    Ok(None)
}

/// The failure of `case` to `failing` (a server and its address) and what follows, with the
/// clients' count of those `back` on a survivor: every client back or the failure over, one more
/// second of publishing ([`AFTER`]), the publisher stopped, and the deliveries quiet. Returns the
/// listener on a killed server's address (see [`inflict`]) and the publisher's ledger.
async fn through_failure(
    options: &Options,
    case: Case,
    failing: (&mut Guard, SocketAddr),
    others: &[IpAddr],
    back: &AtomicUsize,
    publisher: Publisher,
    activity: &Activity,
) -> anyhow::Result<(Option<BlackHole>, Ledger)> {
    let c = options.failover_clients;
    let counted = || back.load(Ordering::Relaxed);
    let black_hole = case == Case::NodeKilled;
    let (guard, addr) = failing;
    let (hole, ()) = tokio::join!(
        inflict(case, guard, addr, others, options.hang, black_hole),
        async {
            if !case.lasts() {
                until_back(case, options.quick, c, counted).await;
            }
        }
    );
    let hole = hole?;
    if case.lasts() {
        until_back(case, options.quick, c, counted).await;
    }
    tokio::time::sleep(if options.quick { AFTER / 5 } else { AFTER }).await;
    let ledger = publisher.stop().await?;
    if !activity.until_quiet().await {
        eprintln!(
            "failover: messages still arriving {QUIET_DEADLINE:?} after the publisher stopped"
        );
    }
    Ok((hole, ledger))
}

/// Waits until `done` reaches `c`: within [`RECOVERY`] of `loss` after a kill, or [`SETTLE`]
/// after the failure is over for a hang or a partition (clients that stayed are not waited for).
async fn until_back(case: Case, quick: bool, c: usize, done: impl Fn() -> usize) {
    if !case.hits_clients() {
        return;
    }
    let within = match (case.lasts(), quick) {
        (false, _) => RECOVERY,
        (true, false) => SETTLE,
        (true, true) => Duration::ZERO,
    };
    let _ = poll(
        "every client back",
        within,
        Duration::from_millis(20),
        || {
            let n = done();
            async move { (n >= c).then_some(()) }
        },
    )
    .await;
}

/// Waits until the survivors' counters were read once, so that no attempt escapes the count.
async fn until_baseline(baselined: &AtomicBool) -> anyhow::Result<()> {
    poll(
        "the survivors' counters read",
        Duration::from_secs(10),
        Duration::from_millis(10),
        || {
            let done = baselined.load(Ordering::Relaxed);
            async move { done.then_some(()) }
        },
    )
    .await
}

/// From `at` until the node at `observer` lists one node as not UP (of three); `None` after 15 s.
async fn listed_down(observer: SocketAddr, at: Instant) -> Option<f64> {
    poll(
        "a node listed down",
        Duration::from_secs(15),
        Duration::from_millis(20),
        || async move {
            let farm = http(observer, "GET", "/farm?format=text", &[], "")
                .await
                .ok()?;
            (farm.matches(" UP ").count() < 3).then_some(())
        },
    )
    .await
    .ok()
    .map(|()| at.elapsed().as_secs_f64() * 1000.0)
}

/// Takes over a dead server's address and counts every connection attempt on it, closing each at
/// once. It runs on its own OS thread, not on the runtime the thousands of clients share: a
/// connection the kernel completed but nobody closed promptly would leave its client waiting up
/// to its connect timeout, where a dead server refuses at once.
struct BlackHole {
    addr: SocketAddr,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
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
        // Blocking: the thread sleeps in `accept` (a poll loop would take CPU from the clients
        // it measures); `drop` wakes it with a connection of its own.
        listener.set_nonblocking(false)?;
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (counter, stopped) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        if stopped.load(Ordering::Relaxed) {
                            break;
                        }
                        counter.fetch_add(1, Ordering::Relaxed);
                        let _ = stream.shutdown(std::net::Shutdown::Both);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Ok(BlackHole { addr, count, stop })
    }

    fn attempts(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Samples `counter` of each survivor every [`SAMPLE`] until `done`; returns the total increase
/// and the highest per-survivor rate seen, per second.
async fn watch_survivors<F, Fut>(
    survivors: usize,
    read: F,
    done: Arc<tokio::sync::Notify>,
    baseline: Arc<AtomicBool>,
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
        if first.iter().all(Option::is_some) {
            baseline.store(true, Ordering::Relaxed);
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

async fn streamfarm_once(options: &Options, retry: RetryMode, case: Case) -> anyhow::Result<Run> {
    let c = options.failover_clients;
    let clients_addr = free_port(loopback(CLIENTS_SERVER))?;
    let others = [
        free_port(loopback(OTHER_SERVERS[0]))?,
        free_port(loopback(OTHER_SERVERS[1]))?,
    ];
    let mut spec = NodeSpec::new("v", clients_addr);
    if case == Case::NodePartitioned {
        spec.gid = Some(ISOLATED_GID);
    }
    let mut victim = NodeProc::start(&options.exe, &spec).await?;
    let victim_url = victim.url();
    let service: ServiceAddress = [clients_addr, others[0], others[1]]
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
        .parse()
        .context("service address")?;
    let lost_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let activity = Arc::new(Activity::default());
    let logs: Vec<Arc<Mutex<ClientLog>>> = (0..c).map(|_| Arc::default()).collect();
    let back = Arc::new(AtomicUsize::new(0));
    // Dials before the failure, and from it until back, summed over the clients.
    let dials = Arc::new(Mutex::new((Dials::default(), Dials::default())));
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel(c);
    let mut clients = JoinSet::new();
    for (i, log) in logs.iter().enumerate() {
        let client_options = ClientOptions::new()
            .subscribe([TOPIC])
            .source_address(client_source(i))
            .retry(retry)
            .seed(i as u64 + 1);
        let mut client = streamfarm_client::Client::start(service.clone(), client_options);
        let (lost_at, activity, log, back, dials, connected, victim_url) = (
            lost_at.clone(),
            activity.clone(),
            log.clone(),
            back.clone(),
            dials.clone(),
            connected_tx.clone(),
            victim_url.clone(),
        );
        clients.spawn(async move {
            let mut before = Dials::default();
            let mut first = true;
            while let Some(event) = client.next_event().await {
                let server = {
                    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                    match &event {
                        Event::Message { payload, .. } => {
                            activity.received(&mut log, payload, now_ms());
                            continue;
                        }
                        Event::Disconnected {
                            cause: LossCause::Closed { code, .. },
                            ..
                        } if *code == close::SLOW_CONSUMER => log.slow_consumer_closes += 1,
                        _ => log.receipts.event(&event),
                    }
                    match event {
                        Event::Connected { server, .. } => server,
                        Event::FailedOver { to, .. } => to,
                        _ => continue,
                    }
                };
                let lost = *lost_at.lock().unwrap_or_else(|p| p.into_inner());
                match lost {
                    None if first => {
                        first = false;
                        before = client.dials();
                        let _ = connected.send(()).await;
                    }
                    Some(_) if server != victim_url => {
                        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                        if log.back_ms.is_none() {
                            log.back_ms = Some(now_ms());
                            back.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut d) = dials.lock() {
                                add_dials(&mut d.0, &before);
                                add_dials(&mut d.1, &dials_since(&before, &client.dials()));
                            }
                        }
                    }
                    _ => {}
                }
            }
        });
    }
    drop(connected_tx);
    for _ in 0..c {
        tokio::time::timeout(Duration::from_secs(60), connected_rx.recv())
            .await
            .context("clients did not all connect to the first node within 60 s")?;
    }
    let mut survivors = Vec::new();
    for (i, addr) in others.iter().enumerate() {
        let mut spec = NodeSpec::new(format!("s{i}"), *addr);
        spec.join = vec![clients_addr];
        survivors.push(NodeProc::start(&options.exe, &spec).await?);
    }
    poll(
        "all three nodes listed UP",
        Duration::from_secs(20),
        Duration::from_millis(100),
        || async {
            let farm = http(clients_addr, "GET", "/farm?format=text", &[], "")
                .await
                .ok()?;
            (farm.matches(" UP ").count() == 3).then_some(())
        },
    )
    .await?;
    let users = victim.metric("streamfarm_connections").await?;
    anyhow::ensure!(users as usize == c, "victim holds {users} of {c} clients");
    // The publisher never publishes on the clients' node: a message then always crosses a link.
    let mut nodes = others.to_vec();
    if case == Case::PublisherNodeKilled {
        nodes.push(clients_addr);
    }
    let target = Target::Streamfarm {
        nodes,
        topic: TOPIC.to_string(),
    };
    let publisher = Publisher::start(target, options.publish_rate)?;
    activity.until_warm(c).await?;
    let from_seq = publisher.next_seq();
    if !options.quick {
        tokio::time::sleep(LEARN_THE_FARM).await;
    }

    let done = Arc::new(tokio::sync::Notify::new());
    let survivor_addrs: Vec<SocketAddr> = survivors.iter().map(|s| s.listen).collect();
    let baselined = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let baseline = baselined.clone();
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
                baseline,
            )
            .await
        })
    };
    until_baseline(&baselined).await?;
    let at = Instant::now();
    *lost_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(at);
    let loss_us = now_us();
    activity.failed.store(true, Ordering::Relaxed);
    let observer = tokio::spawn(listed_down(others[1], at));
    let (failing, failing_addr) = match case {
        Case::PublisherNodeKilled => (&mut survivors[0].guard, others[0]),
        _ => (&mut victim.guard, clients_addr),
    };
    let other_ips: Vec<IpAddr> = others.iter().map(SocketAddr::ip).collect();
    let (hole, ledger) = through_failure(
        options,
        case,
        (failing, failing_addr),
        &other_ips,
        &back,
        publisher,
        &activity,
    )
    .await?;
    // Let late attempts land in the counters.
    tokio::time::sleep(SAMPLE * 3).await;
    done.notify_one();
    let (accepted, peak) = watcher.await?;
    // Not waited for: a node hung or cut off for less than the failure timeout is never listed
    // down, and the run is over.
    let listed_down_ms = if observer.is_finished() {
        observer.await.ok().flatten()
    } else {
        observer.abort();
        None
    };
    let dead_attempts = hole.as_ref().map_or(0, BlackHole::attempts);
    drop(hole);
    clients.abort_all();
    while clients.join_next().await.is_some() {}
    let loss_ms = (loss_us / 1000) as u32;
    let (tallies, times_ms, slow_consumer_closes) = tally_all(&logs, &ledger, from_seq, loss_ms);
    let dials = dials.lock().map(|d| *d).ok();
    Ok(Run {
        times_ms,
        dead_attempts: dead_attempts as f64,
        survivor_attempts: accepted,
        dials,
        peak_per_s: peak,
        clients: c,
        tallies,
        ledger,
        from_seq,
        loss_us,
        slow_consumer_closes,
        listed_down_ms,
    })
}

async fn nats_once(options: &Options, bin: &std::path::Path, case: Case) -> anyhow::Result<Run> {
    let c = options.failover_clients;
    let ips = [
        loopback(CLIENTS_SERVER),
        loopback(OTHER_SERVERS[0]),
        loopback(OTHER_SERVERS[1]),
    ];
    let gid = (case == Case::NodePartitioned).then_some(ISOLATED_GID);
    let mut servers = NatsProc::cluster_with_gid(bin, &ips, gid).await?;
    let victim_addr = servers[0].addr;
    let lost_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let activity = Arc::new(Activity::default());
    let logs: Vec<Arc<Mutex<ClientLog>>> = (0..c).map(|_| Arc::default()).collect();
    let back = Arc::new(AtomicUsize::new(0));
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::channel(c);
    let mut clients: JoinSet<anyhow::Result<()>> = JoinSet::new();
    for (i, log) in logs.iter().enumerate() {
        let (lost_at, activity, log, back, connected) = (
            lost_at.clone(),
            activity.clone(),
            log.clone(),
            back.clone(),
            connected_tx.clone(),
        );
        clients.spawn(async move {
            let mut nats = Nats::connect(victim_addr, Some(client_source(i))).await?;
            nats.subscribe(TOPIC, 1).await?;
            connected.send(()).await?;
            drop(connected);
            let mut buf = Vec::new();
            loop {
                while let Ok(event) = nats.next(&mut buf).await {
                    if event == crate::wire::NatsEvent::Msg {
                        let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                        activity.received(&mut log, &buf, now_ms());
                    }
                }
                let Some(at) = *lost_at.lock().unwrap_or_else(|p| p.into_inner()) else {
                    anyhow::bail!("lost nats-server before the failure");
                };
                // The pool: learned urls, shuffled, the lost server last.
                let lost = nats.writer.peer_addr().unwrap_or(victim_addr);
                let mut pool: Vec<SocketAddr> = nats
                    .connect_urls
                    .iter()
                    .filter_map(|u| u.parse().ok())
                    .filter(|a| *a != lost)
                    .collect();
                pool.shuffle(&mut rand::rng());
                pool.push(lost);
                let deadline = at + RECOVERY;
                let mut fresh = None;
                'rounds: while Instant::now() < deadline {
                    for addr in &pool {
                        if let Ok(mut conn) = Nats::connect(*addr, Some(client_source(i))).await
                            && conn.subscribe(TOPIC, 1).await.is_ok()
                        {
                            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                            if log.back_ms.is_none() && *addr != victim_addr {
                                log.back_ms = Some(now_ms());
                                back.fetch_add(1, Ordering::Relaxed);
                            }
                            fresh = Some(conn);
                            break 'rounds;
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                match fresh {
                    Some(conn) => nats = conn,
                    None => anyhow::bail!("no nats-server within {RECOVERY:?}"),
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
    let mut publish_on = vec![servers[1].addr, servers[2].addr];
    if case == Case::PublisherNodeKilled {
        publish_on.push(victim_addr);
    }
    let target = Target::Nats {
        servers: publish_on,
        subject: TOPIC.to_string(),
    };
    let publisher = Publisher::start(target, options.publish_rate)?;
    activity.until_warm(c).await?;
    let from_seq = publisher.next_seq();

    let done = Arc::new(tokio::sync::Notify::new());
    let survivors: Vec<(SocketAddr, SocketAddr)> =
        servers[1..].iter().map(|s| (s.addr, s.monitor)).collect();
    let baselined = Arc::new(AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        let baseline = baselined.clone();
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
                baseline,
            )
            .await
        })
    };
    until_baseline(&baselined).await?;
    *lost_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    let loss_us = now_us();
    activity.failed.store(true, Ordering::Relaxed);
    let failing = if case == Case::PublisherNodeKilled {
        1
    } else {
        0
    };
    let failing_addr = servers[failing].addr;
    let other_ips = [ips[1], ips[2]];
    let (hole, ledger) = through_failure(
        options,
        case,
        (&mut servers[failing].guard, failing_addr),
        &other_ips,
        &back,
        publisher,
        &activity,
    )
    .await?;
    // Let late attempts land in the counters.
    tokio::time::sleep(SAMPLE * 3).await;
    done.notify_one();
    let (accepted, peak) = watcher.await?;
    let dead_attempts = hole.as_ref().map_or(0, BlackHole::attempts);
    drop(hole);
    clients.abort_all();
    while clients.join_next().await.is_some() {}
    let loss_ms = (loss_us / 1000) as u32;
    let (tallies, times_ms, slow_consumer_closes) = tally_all(&logs, &ledger, from_seq, loss_ms);
    Ok(Run {
        times_ms,
        dead_attempts: dead_attempts as f64,
        survivor_attempts: accepted,
        dials: None,
        peak_per_s: peak,
        clients: c,
        tallies,
        ledger,
        from_seq,
        loss_us,
        slow_consumer_closes,
        listed_down_ms: None,
    })
}
