//! Active rebalancing, draining and graceful shutdown: moving this node's clients to other
//! servers, make-before-break.
//!
//! Every node computes the farm's [`Plan`](streamfarm_core::balance::Plan) from the list it
//! already has (`streamfarm_core::balance`: fair shares by capacity within the preferred group,
//! and flows from the servers above theirs to those below) and carries out its own row: while it
//! holds more than its target plus the tolerance, it tells clients to move (`migrate`, naming
//! their new server), at most `rebalance_rate` a second, until it is at its target. A client that
//! announced the `migrate` feature connects to its new server, resumes every topic there from its
//! positions, and closes this connection once caught up; this node keeps delivering meanwhile and
//! closes it with `4000` if it is still here after `migrate_deadline_ms`. A client without the
//! feature is closed with `4000` at once (it picks a server itself and resumes there).
//!
//! Stability: a connection younger than the cooldown is not moved (so no client moves twice
//! within it), a node that received a moved client within the cooldown sends none unless its
//! share is 0 (so no node switches from receiving to sending within it), and the plan itself never sends a client back
//! (see `streamfarm_core::balance`). Clients already told to move count as gone when the node
//! plans, so it never sends more than its surplus.
//!
//! `DRAINING` and shutdown use the same moves for every client, paced over their period
//! (`drain::schedule`): the draining node's target is 0, and its clients go to the servers below
//! their share.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rand::seq::SliceRandom;
use serde::Serialize;
use streamfarm_core::balance::{self, Tolerance};
use streamfarm_core::protocol::{ServerFrame, close};
use streamfarm_core::{FarmList, Status};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::Shared;
use crate::drain;
use crate::hub::{Closer, ConnId, Mover, encode};
use crate::metrics::{self, Metrics};

/// How often the rebalancer looks at the plan (jittered by ±20 %).
const TICK: Duration = Duration::from_millis(250);
/// How far back the rebalancer looks for the farm's total users (`balance::PlacedWindow`): a
/// few gossip rounds, for every row of a list to show the moves in flight.
const PLACED_WINDOW: Duration = Duration::from_secs(3);

/// Why a client is told to move, as the `migrate` frame's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    Rebalance,
    Drain,
    Shutdown,
    /// The node is cut off from the farm (`crate::membership`).
    CutOff,
}

impl Why {
    fn as_str(self) -> &'static str {
        match self {
            Why::Rebalance => "rebalance",
            Why::Drain => "drain",
            Why::Shutdown => "shutdown",
            Why::CutOff => "cut_off",
        }
    }

    /// The close reason for a client that cannot follow a `migrate`.
    fn close_reason(self) -> &'static str {
        match self {
            Why::Rebalance => "rebalancing: reconnect elsewhere",
            Why::Drain => "node draining: reconnect elsewhere",
            Why::Shutdown => "node shutting down: reconnect elsewhere",
            Why::CutOff => "node cut off from the farm: reconnect elsewhere",
        }
    }
}

impl Shared {
    /// The tolerance the plan uses on this node.
    fn tolerance(&self) -> Tolerance {
        Tolerance {
            fraction: self.config.rebalance_tolerance,
            ..Tolerance::default()
        }
    }

    /// The farm list the rebalancer plans on: this node's own status as it is now, and peers
    /// whose relay links their side ended taken as `DOWN` — a killed node is gone at once, not a
    /// failure timeout later, and no client is sent to it meanwhile (the broker's placement does
    /// the same). Users are as listed, a consistent snapshot: every node computes the same
    /// targets from it — but for this node's own, which the list gives as of its peers' instant
    /// (for clients to compare, see `membership`) and the plan takes as it is now.
    fn balance_view(&self) -> FarmList {
        let mut list = self.farm_now();
        let status = *self.status.borrow();
        for server in &mut list.servers {
            if server.url == self.url {
                server.status = status;
                server.users = self.hub.users();
            } else if self.link_ends.is_ended(&server.name) {
                server.status = Status::Down;
            }
        }
        list
    }

    /// The clients this node holds now, less those already told to move.
    fn holding(&self) -> u64 {
        self.hub.users().saturating_sub(self.hub.moving() as u64)
    }

    /// This node's row of the plan on `list` (`sending`: it started, and goes on to its target;
    /// `floor`: users to place at least, see `balance::PlacedWindow`).
    fn own_moves(&self, list: &FarmList, sending: bool, floor: u64) -> balance::OwnMoves {
        balance::own_moves(
            list,
            &self.url,
            self.holding(),
            self.tolerance(),
            sending,
            floor,
        )
    }
}

/// When each client still here was told to move: how long migrations take
/// (`streamfarm_migration_seconds`). An entry lives from the `migrate` frame to the connection's
/// end, so there are never more than the node's connections.
#[derive(Debug, Default)]
pub(crate) struct MoveClock(std::sync::Mutex<std::collections::HashMap<ConnId, Instant>>);

impl MoveClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<ConnId, Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Connection `id` was just told to move.
    fn told(&self, id: ConnId) {
        self.lock().insert(id, Instant::now());
    }

    /// Connection `id` ended: a move is recorded if it was told to move and left by itself (not
    /// closed by this node at the deadline or at shutdown).
    pub(crate) fn gone(&self, id: ConnId, closer: &Closer, metrics: &Metrics) {
        let Some(told) = self.lock().remove(&id) else {
            return;
        };
        let closed_here = matches!(
            closer.reason(),
            Some((code, _)) if code == close::RECONNECT_ELSEWHERE || code == close::GOING_AWAY
        );
        if !closed_here {
            metrics::observe_since(&metrics.migration_seconds, told.into_std());
        }
    }

    /// Forgets every move asked and not made (those clients stay: a cut-off node back in touch).
    pub(crate) fn forget(&self) {
        self.lock().clear();
    }
}

/// Tells one client to move to `to` (or to a server of its choosing), or closes it with `4000`
/// when it cannot follow a `migrate`.
fn tell(shared: &Shared, mover: &Mover, to: Option<String>, why: Why) {
    if mover.migrates {
        metrics::inc(&shared.metrics.migrations_started);
        shared.move_clock.told(mover.id);
        let frame = ServerFrame::Migrate {
            to,
            reason: why.as_str().to_string(),
            deadline_ms: shared.config.migrate_deadline_ms,
        };
        mover.outlet.offer(encode(&frame), &shared.metrics);
    } else {
        metrics::inc(&shared.metrics.migrations_closed);
        mover
            .outlet
            .closer
            .close(close::RECONNECT_ELSEWHERE, why.close_reason());
    }
}

/// `n` destinations over `receivers` in proportion to what each lacks (never more than that), in
/// a random order; `None` (the client chooses) for those beyond.
fn destinations(receivers: &[(String, u64)], n: usize, rng: &mut impl Rng) -> Vec<Option<String>> {
    let lacking: Vec<u64> = receivers.iter().map(|(_, d)| *d).collect();
    let room: u64 = lacking.iter().sum();
    let split = balance::apportion((n as u64).min(room), &lacking);
    let mut out: Vec<Option<String>> = receivers
        .iter()
        .zip(split)
        .flat_map(|((to, _), k)| std::iter::repeat_n(Some(to.clone()), k as usize))
        .collect();
    out.resize(n, None);
    out.shuffle(rng);
    out
}

/// The rebalancing loop: every tick, closes the clients that outstayed their `migrate`, and
/// moves this node's surplus, paced.
pub(crate) async fn run(shared: Arc<Shared>) {
    let rate = shared.config.rebalance_rate;
    let cooldown = shared.config.rebalance_cooldown();
    let mut budget = 0.0f64;
    let mut last = Instant::now();
    // Started sending: goes on to its target, without the tolerance.
    let mut sending = false;
    let mut placed = balance::PlacedWindow::new(PLACED_WINDOW.as_secs_f64());
    let started = Instant::now();
    loop {
        let jitter = rand::rng().random_range(0.8..1.2);
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = sleep(TICK.mul_f64(jitter)) => {}
        }
        // A cut-off node's clients that could not move (they reach no other node) stay, and are
        // told the feed is partial: none is closed for not moving.
        let cut_off = *shared.isolated_rx.borrow();
        for outlet in shared
            .hub
            .overdue(shared.config.migrate_deadline())
            .into_iter()
            .filter(|_| !cut_off)
        {
            metrics::inc(&shared.metrics.migrations_timed_out);
            outlet.closer.close(
                close::RECONNECT_ELSEWHERE,
                "did not move in time: reconnect elsewhere",
            );
        }
        let list = shared.balance_view();
        let floor = placed.record(started.elapsed().as_secs_f64(), &list);
        let own = shared.own_moves(&list, sending, floor);
        shared
            .metrics
            .rebalance_target
            .store(own.target, std::sync::atomic::Ordering::Relaxed);
        sending = own.sends;
        let now = Instant::now();
        // Moves per second, as a token bucket holding at most one second's worth.
        budget = (budget + rate * now.duration_since(last).as_secs_f64()).min(rate.max(1.0));
        last = now;
        // A node that just received moved clients does not send any, unless its share is 0
        // (a less preferred group giving its clients back): the plan never sends to it.
        let receiving = own.target > 0
            && shared
                .hub
                .last_migrant()
                .is_some_and(|at| at.elapsed() < cooldown);
        if !shared.config.rebalance
            || *shared.status.borrow() != Status::Up
            || *shared.isolated_rx.borrow()
            || receiving
            || !own.sends
        {
            continue;
        }
        let n = (budget.floor() as u64).min(own.count) as usize;
        if n == 0 {
            continue;
        }
        let opened_before = now.into_std().checked_sub(cooldown);
        let Some(opened_before) = opened_before else {
            continue;
        };
        let movers = shared.hub.pick_movers(n, Some(opened_before));
        budget -= movers.len() as f64;
        let targets = destinations(&own.receivers, movers.len(), &mut rand::rng());
        debug!(moving = movers.len(), target = own.target, "rebalancing");
        for (mover, to) in movers.iter().zip(targets) {
            tell(&shared, mover, to, Why::Rebalance);
        }
    }
}

/// Moves every client off this node, paced over `period` (draining, shutdown), unless `cancel`
/// fires first. Clients keep being served until they leave; those still here at the migrate
/// deadline are closed by the rebalancing loop (or by shutdown).
pub(crate) async fn move_all(
    shared: Arc<Shared>,
    period: Duration,
    why: Why,
    cancel: CancellationToken,
) {
    let start = Instant::now();
    let n = shared.hub.users() as usize;
    let own = shared.own_moves(&shared.balance_view(), true, 0);
    let (targets, offsets) = {
        let mut rng = rand::rng();
        (
            destinations(&own.receivers, n, &mut rng),
            drain::schedule(n, period, &mut rng),
        )
    };
    info!(
        connections = n,
        period_ms = period.as_millis() as u64,
        reason = why.as_str(),
        "moving every client off this node"
    );
    for (offset, to) in offsets.into_iter().zip(targets) {
        tokio::select! {
            _ = cancel.cancelled() => {
                info!("moving clients off cancelled");
                return;
            }
            _ = sleep_until(start + offset) => {}
        }
        let Some(mover) = shared.hub.pick_movers(1, None).pop() else {
            return;
        };
        tell(&shared, &mover, to, why);
    }
}

/// The plan as `GET /rebalance` shows it: every server's share, the flows, and this node's moves.
#[derive(Debug, Serialize)]
pub(crate) struct PlanView {
    /// The node answering.
    server: String,
    tolerance: f64,
    shares: Vec<ShareView>,
    flows: Vec<FlowView>,
    /// Clients the plan moves, and the fewest moves that would even the farm out.
    moves: u64,
    minimal_moves: u64,
    /// This node's clients told to move and still here.
    moving: usize,
    migrations_started: u64,
    migrations_completed: u64,
    migrations_timed_out: u64,
    migrations_closed: u64,
    migrations_received: u64,
}

#[derive(Debug, Serialize)]
struct ShareView {
    name: String,
    url: String,
    status: Status,
    priority: String,
    users: u64,
    target: u64,
    surplus: i64,
    role: &'static str,
    sends: bool,
}

#[derive(Debug, Serialize)]
struct FlowView {
    from: String,
    to: String,
    count: u64,
}

/// This node's view of the plan, for `GET /rebalance`.
pub(crate) fn view(shared: &Shared) -> PlanView {
    let list = shared.balance_view();
    let plan = balance::plan(&list, shared.tolerance());
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let m = &shared.metrics;
    PlanView {
        server: shared.config.name.clone(),
        tolerance: shared.config.rebalance_tolerance,
        shares: list
            .servers
            .iter()
            .zip(&plan.shares)
            .map(|(server, share)| ShareView {
                name: server.name.clone(),
                url: share.url.clone(),
                status: server.status,
                priority: server.priority.clone(),
                users: share.users,
                target: share.target,
                surplus: share.surplus(),
                role: share.role.as_str(),
                sends: share.sends,
            })
            .collect(),
        flows: plan
            .flows
            .iter()
            .map(|f| FlowView {
                from: f.from.clone(),
                to: f.to.clone(),
                count: f.count,
            })
            .collect(),
        moves: plan.moves(),
        minimal_moves: balance::minimal_moves(&plan),
        moving: shared.hub.moving(),
        migrations_started: get(&m.migrations_started),
        migrations_completed: get(&m.migrations_completed),
        migrations_timed_out: get(&m.migrations_timed_out),
        migrations_closed: get(&m.migrations_closed),
        migrations_received: get(&m.migrations_received),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use streamfarm_core::ServerEntry;

    #[test]
    fn destinations_follow_the_flows_and_leave_the_rest_to_the_client() {
        let entry = |name: &str, users| {
            ServerEntry::new(name, format!("ws://{name}"), Status::Up, users, "A")
        };
        let list = FarmList::new(vec![entry("a", 90), entry("b", 0), entry("c", 30)]);
        let own = balance::own_moves(&list, "ws://a", 90, Tolerance::default(), false, 0);
        assert_eq!(own.count, 50);
        let mut rng = StdRng::seed_from_u64(1);
        let picked = destinations(&own.receivers, 50, &mut rng);
        let to_b = picked
            .iter()
            .filter(|t| t.as_deref() == Some("ws://b"))
            .count();
        let to_c = picked
            .iter()
            .filter(|t| t.as_deref() == Some("ws://c"))
            .count();
        // a sends 50: 40 to b, 10 to c.
        assert_eq!((to_b, to_c), (40, 10));
        let more = destinations(&own.receivers, 60, &mut rng);
        assert_eq!(more.iter().filter(|t| t.is_none()).count(), 10);
    }
}
