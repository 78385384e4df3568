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

mod harness;
mod nats;
mod streamfarm;

use std::time::Duration;

use anyhow::Context;
use streamfarm_client::{Dials, RetryMode};

use self::nats::nats_once;
use self::streamfarm::streamfarm_once;
use crate::flow::{Ledger, Tally};
use crate::report::{RowBuilder, Section, quantile};
use crate::{NATS, Options, STREAMFARM, ratio};
use streamfarm_localfarm::partition::Partition;

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
