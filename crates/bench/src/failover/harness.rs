//! What every failover run shares, whichever system it measures: each client's log and the
//! clients' activity, the tally of what they received, the failure inflicted and waited through,
//! the waits for the clients and for the farm's list, the listener that stands in for a killed
//! server and counts the attempts on it, and the survivors' counters sampled while it lasts.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use super::{AFTER, Case, QUIET, QUIET_DEADLINE, RECOVERY, SAMPLE, SETTLE, WARM_UP};
use crate::Options;
use crate::flow::{Ledger, Publisher, Receipts, Tally, now_ms, tally};
use crate::proc::{Guard, Signal, http, poll};
use streamfarm_localfarm::partition::{Isolated, Partition, interruptible, v4};

/// What one client saw, shared between its task and the run.
#[derive(Debug, Default)]
pub(super) struct ClientLog {
    pub(super) receipts: Receipts,
    /// When it was subscribed on a survivor after the failure, ms on the bench clock.
    pub(super) back_ms: Option<u32>,
    pub(super) slow_consumer_closes: u64,
}

/// Messages arriving at all the clients: how many have had one, and when the last came.
#[derive(Debug, Default)]
pub(super) struct Activity {
    pub(super) warm: AtomicUsize,
    pub(super) last_ms: AtomicU32,
    /// Set when the failure starts.
    pub(super) failed: AtomicBool,
}

impl Activity {
    /// Notes a message received by `log` at `at_ms`.
    pub(super) fn received(&self, log: &mut ClientLog, payload: &[u8], at_ms: u32) {
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
    pub(super) async fn until_warm(&self, clients: usize) -> anyhow::Result<()> {
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
    pub(super) async fn until_quiet(&self) -> bool {
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
pub(super) fn tally_all(
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
pub(super) async fn inflict(
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
pub(super) async fn through_failure(
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
pub(super) async fn until_back(case: Case, quick: bool, c: usize, done: impl Fn() -> usize) {
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
pub(super) async fn until_baseline(baselined: &AtomicBool) -> anyhow::Result<()> {
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
pub(super) async fn listed_down(observer: SocketAddr, at: Instant) -> Option<f64> {
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
pub(super) struct BlackHole {
    pub(super) addr: SocketAddr,
    pub(super) count: Arc<AtomicU64>,
    pub(super) stop: Arc<AtomicBool>,
}

impl BlackHole {
    pub(super) fn start(addr: SocketAddr) -> anyhow::Result<BlackHole> {
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

    pub(super) fn attempts(&self) -> u64 {
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
pub(super) async fn watch_survivors<F, Fut>(
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
