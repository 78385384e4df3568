//! Active rebalancing as a pure function of the farm list: every node's fair share, and who moves
//! how many clients where to reach it.
//!
//! Every node reads the same list, so every node computes the same [`Plan`] alone — no
//! coordinator — and carries out only its own row of it. The CLI computes it too
//! (`streamfarm list` shows each server's target and surplus), and so does the simulator.
//!
//! # Targets
//! The users to place are those of every server that is not `DOWN` (a `DOWN` server's clients are
//! failing over by themselves). They are poured into the priority groups in order of preference,
//! each group taking at most its capacity, and within a group shared by capacity (equally when a
//! server states none): largest remainders, ties by url, so the targets sum to the users exactly
//! and every node rounds the same way. `DRAINING` servers, and `UP` servers of a group that the
//! preferred groups leave nothing to, have a target of 0: their clients go back to the preferred
//! group (failback).
//!
//! # Moves
//! A server **sends** when it holds more than its target plus a tolerance
//! (`max(min_surplus, tolerance × target)`; none for a target of 0), and sends its whole surplus
//! — down to its target, never below (once started, a node goes on without the tolerance:
//! [`own_moves`]) — to the servers under their target, in proportion to what
//! each lacks. A server under its target only receives. So a server that received can fall no
//! lower than its target and rise no higher, and a server that sent never has a deficit: after a
//! plan is carried out, no server is ever asked to send clients back (the property test below
//! checks it on random farms). Pacing, cooldowns and the make-before-break migration itself are
//! the node's.
//!
//! ```
//! use streamfarm_core::balance::{plan, Tolerance};
//! use streamfarm_core::{FarmList, ServerEntry, Status};
//! let entry = |name: &str, users| ServerEntry::new(name, format!("ws://{name}/stream"), Status::Up, users, "A");
//! let list = FarmList::new(vec![entry("a", 300), entry("b", 300), entry("c", 300), entry("d", 0)]);
//! let plan = plan(&list, Tolerance::default());
//! assert_eq!(plan.shares.iter().map(|s| s.target).collect::<Vec<_>>(), [225, 225, 225, 225]);
//! assert_eq!(plan.moves(), 225); // the fewest that can even the farm out
//! ```

use std::cmp::Ordering;

use crate::model::{FarmList, Status, group_comparator};

/// How far above its target a server may be before it sends clients away.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// As a fraction of the target (0.03: 3 % above the target is still balanced).
    pub fraction: f64,
    /// At least this many users above the target are tolerated (so that small farms do not move
    /// single clients back and forth over rounding).
    pub min_surplus: u64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Tolerance {
            fraction: 0.03,
            min_surplus: 2,
        }
    }
}

impl Tolerance {
    /// The most users above `target` that still count as balanced.
    pub fn allowance(&self, target: u64) -> u64 {
        if target == 0 {
            return 0;
        }
        let by_fraction = (target as f64 * self.fraction.max(0.0)).floor() as u64;
        by_fraction.max(self.min_surplus)
    }
}

/// Why a server's target is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `UP` in a group that gets users: its share by capacity.
    Serving,
    /// `UP`, but the more preferred groups hold every user: target 0 (failback).
    LessPreferred,
    /// `DRAINING`: target 0.
    Draining,
    /// `DOWN`: not placed, its clients fail over by themselves.
    Down,
}

impl Role {
    /// A word for people.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Serving => "serving",
            Role::LessPreferred => "less-preferred",
            Role::Draining => "draining",
            Role::Down => "down",
        }
    }
}

/// One server's row of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The server's url.
    pub url: String,
    /// Its users as listed.
    pub users: u64,
    /// What it should hold.
    pub target: u64,
    /// Why.
    pub role: Role,
    /// Whether it sends clients away in this plan (it holds more than its target plus the
    /// tolerance).
    pub sends: bool,
}

impl Share {
    /// Users above the target (negative: below).
    pub fn surplus(&self) -> i64 {
        self.users as i64 - self.target as i64
    }
}

/// Clients to move from one server to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    /// The sending server's url.
    pub from: String,
    /// The receiving server's url.
    pub to: String,
    /// How many clients.
    pub count: u64,
}

/// The whole farm's plan: a share per server (list order) and the flows between them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// One row per server of the list, in list order.
    pub shares: Vec<Share>,
    /// Clients to move, by sender then receiver (list order).
    pub flows: Vec<Flow>,
}

impl Plan {
    /// Clients moved by the plan.
    pub fn moves(&self) -> u64 {
        self.flows.iter().map(|f| f.count).sum()
    }

    /// The row of `url`.
    pub fn share(&self, url: &str) -> Option<&Share> {
        self.shares.iter().find(|s| s.url == url)
    }

    /// What `url` sends, and where.
    pub fn flows_from<'a>(&'a self, url: &'a str) -> impl Iterator<Item = &'a Flow> + 'a {
        self.flows.iter().filter(move |f| f.from == url)
    }
}

/// What one server does now, by [`own_moves`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnMoves {
    /// Its share of the farm.
    pub target: u64,
    /// Whether it sends: it holds more than its target plus the tolerance (or, already sending,
    /// more than its target).
    pub sends: bool,
    /// Clients to move now (before pacing).
    pub count: u64,
    /// The servers below their share and what each lacks: where the clients go, in proportion.
    pub receivers: Vec<(String, u64)>,
}

/// The users to place, for [`own_moves`]: the largest total a node's lists showed over the last
/// `window` seconds. Moves conserve the total, but a list's rows change at different times: the
/// sender's count falls in a list before the receiver's rises, and a total read then is short by
/// the clients in flight — targets drop, and every sender sends a little more than its share, to
/// be sent back later. The largest recent total errs the other way (a sender stops a little early,
/// which the tolerance absorbs); clients that really leave lower it within the window.
#[derive(Debug, Clone)]
pub struct PlacedWindow {
    window: f64,
    samples: std::collections::VecDeque<(f64, u64)>,
}

impl PlacedWindow {
    /// A window of `window` seconds.
    pub fn new(window: f64) -> Self {
        PlacedWindow {
            window,
            samples: std::collections::VecDeque::new(),
        }
    }

    /// Records the total of `list` at `now` (seconds, any origin) and returns the largest total
    /// within the window.
    pub fn record(&mut self, now: f64, list: &FarmList) -> u64 {
        let total: u64 = list
            .servers
            .iter()
            .filter(|s| s.status != Status::Down)
            .map(|s| s.users)
            .sum();
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| *t < now - self.window)
        {
            self.samples.pop_front();
        }
        self.samples.push_back((now, total));
        self.samples.iter().map(|(_, n)| *n).max().unwrap_or(total)
    }
}

/// One server's row of the plan, from its own side: targets come from `list` — a consistent
/// snapshot, the server's own row as listed, so that every node computes the same targets —
/// while what it sends is counted on `holding`, the clients it holds right now less those
/// already told to move, so that it never sends more than it has above its share, however old
/// the list. `placed_floor`: place at least this many users ([`PlacedWindow`]).
/// `sending`: it started sending, and goes on to its target without the tolerance —
/// the tolerance decides when a server starts; once started it finishes, or every server would
/// stop at its target plus the tolerance.
pub fn own_moves(
    list: &FarmList,
    me: &str,
    holding: u64,
    tolerance: Tolerance,
    sending: bool,
    placed_floor: u64,
) -> OwnMoves {
    let plan = plan_placing(list, tolerance, placed_floor);
    let Some(share) = plan.share(me) else {
        return OwnMoves {
            target: 0,
            sends: false,
            count: 0,
            receivers: Vec::new(),
        };
    };
    let target = share.target;
    let allowance = if sending {
        0
    } else {
        tolerance.allowance(target)
    };
    let receivers: Vec<(String, u64)> = plan
        .shares
        .iter()
        .filter(|s| s.role == Role::Serving && s.users < s.target && s.url != me)
        .map(|s| (s.url.clone(), s.target - s.users))
        .collect();
    let lacking: u64 = receivers.iter().map(|(_, d)| d).sum();
    let sends = share.role != Role::Down && holding > target + allowance && lacking > 0;
    OwnMoves {
        target,
        sends,
        count: if sends {
            (holding - target).min(lacking)
        } else {
            0
        },
        receivers,
    }
}

/// The fewest moves that bring every server to its target: the sum of the surpluses.
pub fn minimal_moves(plan: &Plan) -> u64 {
    plan.shares
        .iter()
        .filter(|s| s.role != Role::Down)
        .map(|s| s.surplus().max(0) as u64)
        .sum()
}

/// The plan for `list` (see the module documentation).
pub fn plan(list: &FarmList, tolerance: Tolerance) -> Plan {
    plan_placing(list, tolerance, 0)
}

/// [`plan`], placing at least `placed_floor` users (see [`PlacedWindow`]).
fn plan_placing(list: &FarmList, tolerance: Tolerance, placed_floor: u64) -> Plan {
    let servers = &list.servers;
    let targets = targets(list, placed_floor);
    let mut shares: Vec<Share> = servers
        .iter()
        .zip(targets)
        .map(|(server, (target, role))| {
            let sends = role != Role::Down && server.users > target + tolerance.allowance(target);
            Share {
                url: server.url.clone(),
                users: server.users,
                target,
                role,
                sends,
            }
        })
        .collect();
    let excess: Vec<(usize, u64)> = shares
        .iter()
        .enumerate()
        .filter(|(_, s)| s.sends)
        .map(|(i, s)| (i, s.users - s.target))
        .collect();
    let deficits: Vec<(usize, u64)> = shares
        .iter()
        .enumerate()
        .filter(|(_, s)| s.role == Role::Serving && s.users < s.target)
        .map(|(i, s)| (i, s.target - s.users))
        .collect();
    let total_excess: u64 = excess.iter().map(|(_, e)| e).sum();
    let total_deficit: u64 = deficits.iter().map(|(_, d)| d).sum();
    let mut flows = Vec::new();
    if total_excess > 0 && total_deficit > 0 {
        // What moves is the smaller of the surpluses and the deficits, so that neither a sender
        // goes below its target nor a receiver above its own; each sender's part goes to the
        // receivers in proportion to what they still lack.
        let moved = total_excess.min(total_deficit);
        // Exact integer apportionment: each sender's part of `moved`, then each part over the
        // receivers, both by largest remainder.
        let parts = apportion(moved, &excess.iter().map(|&(_, e)| e).collect::<Vec<_>>());
        let mut room: Vec<u64> = deficits.iter().map(|&(_, d)| d).collect();
        for (&(sender, _), part) in excess.iter().zip(parts) {
            let weights: Vec<u64> = room.clone();
            let split = apportion(part, &weights);
            for ((slot, &(receiver, _)), count) in room.iter_mut().zip(&deficits).zip(split) {
                if count == 0 {
                    continue;
                }
                *slot -= count;
                flows.push(Flow {
                    from: shares[sender].url.clone(),
                    to: shares[receiver].url.clone(),
                    count,
                });
            }
        }
    }
    // A sender whose surplus found no receiver has nothing to do.
    for share in &mut shares {
        if share.sends && !flows.iter().any(|f| f.from == share.url) {
            share.sends = false;
        }
    }
    Plan { shares, flows }
}

/// Splits `total` over `weights` in proportion, by largest remainder (ties: earlier first); never
/// gives a slot more than its weight when `total` ≤ the sum of the weights.
pub fn apportion(total: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| w as u128).sum();
    if sum == 0 || total == 0 {
        return vec![0; weights.len()];
    }
    let mut parts: Vec<u64> = weights
        .iter()
        .map(|&w| (total as u128 * w as u128 / sum) as u64)
        .collect();
    let mut left = total - parts.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    // Largest remainder first; equal remainders in slot order.
    order.sort_by(|&a, &b| {
        let ra = total as u128 * weights[a] as u128 % sum;
        let rb = total as u128 * weights[b] as u128 % sum;
        rb.cmp(&ra).then(a.cmp(&b))
    });
    // One more to the largest remainders; a slot already at its weight is passed over unless
    // `total` exceeds the weights altogether (then some slot must take more than its weight).
    let over = total as u128 > sum;
    while left > 0 {
        for &i in &order {
            if left == 0 {
                break;
            }
            if over || parts[i] < weights[i] {
                parts[i] += 1;
                left -= 1;
            }
        }
    }
    parts
}

/// Each server's target and role, in list order, placing at least `placed_floor` users.
fn targets(list: &FarmList, placed_floor: u64) -> Vec<(u64, Role)> {
    let servers = &list.servers;
    let listed: u64 = servers
        .iter()
        .filter(|s| s.status != Status::Down)
        .map(|s| s.users)
        .sum();
    let placed = listed.max(placed_floor);
    let mut result: Vec<(u64, Role)> = servers
        .iter()
        .map(|s| match s.status {
            Status::Down => (0, Role::Down),
            Status::Draining => (0, Role::Draining),
            Status::Up => (0, Role::LessPreferred),
        })
        .collect();
    let compare = group_comparator(servers.iter().map(|s| s.priority.as_str()));
    let mut groups: Vec<&str> = servers
        .iter()
        .filter(|s| s.status == Status::Up)
        .map(|s| s.priority.as_str())
        .collect();
    groups.sort_by(|a, b| compare(a, b));
    groups.dedup_by(|a, b| compare(a, b) == Ordering::Equal);
    let mut left = placed;
    let last = groups.len().saturating_sub(1);
    for (g, group) in groups.iter().enumerate() {
        if left == 0 {
            break;
        }
        let members: Vec<usize> = servers
            .iter()
            .enumerate()
            .filter(|(_, s)| s.status == Status::Up && compare(&s.priority, group).is_eq())
            .map(|(i, _)| i)
            .collect();
        // Shares by capacity when every member states one, else equal shares.
        let by_capacity = members
            .iter()
            .all(|&i| servers[i].capacity.is_some_and(|c| c > 0));
        let weights: Vec<u64> = members
            .iter()
            .map(|&i| {
                if by_capacity {
                    servers[i].capacity.unwrap_or(1)
                } else {
                    1
                }
            })
            .collect();
        let capacity: u64 = if by_capacity {
            weights.iter().sum()
        } else {
            u64::MAX
        };
        // The last group takes whatever is left, over capacity or not.
        let here = if g == last { left } else { left.min(capacity) };
        // Ties in the remainder go by url, so every node rounds alike whatever its list order.
        let mut order: Vec<usize> = (0..members.len()).collect();
        order.sort_by(|&a, &b| servers[members[a]].url.cmp(&servers[members[b]].url));
        let sorted_weights: Vec<u64> = order.iter().map(|&k| weights[k]).collect();
        let parts = apportion(here, &sorted_weights);
        for (&k, part) in order.iter().zip(parts) {
            result[members[k]] = (part, Role::Serving);
        }
        left -= here;
    }
    // Groups after the one that took the last user serve nobody: less preferred.
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServerEntry;
    use proptest::prelude::*;

    fn entry(name: &str, status: Status, users: u64, group: &str) -> ServerEntry {
        ServerEntry::new(name, format!("ws://{name}/stream"), status, users, group)
    }

    fn targets_of(plan: &Plan) -> Vec<u64> {
        plan.shares.iter().map(|s| s.target).collect()
    }

    fn sent(plan: &Plan, from: &str) -> Vec<(String, u64)> {
        plan.flows_from(&format!("ws://{from}/stream"))
            .map(|f| (f.to.clone(), f.count))
            .collect()
    }

    #[test]
    fn scale_out_moves_each_surplus_to_the_new_server() {
        let list = FarmList::new(vec![
            entry("a", Status::Up, 282, "A"),
            entry("b", Status::Up, 323, "A"),
            entry("c", Status::Up, 295, "A"),
            entry("d", Status::Up, 0, "A"),
        ]);
        let plan = plan(&list, Tolerance::default());
        assert_eq!(targets_of(&plan), [225, 225, 225, 225]);
        assert_eq!(sent(&plan, "b"), [("ws://d/stream".to_string(), 98)]);
        assert_eq!(plan.moves(), 225);
        assert_eq!(minimal_moves(&plan), 225);
    }

    #[test]
    fn a_balanced_farm_moves_nothing() {
        let list = FarmList::new(vec![
            entry("a", Status::Up, 231, "A"),
            entry("b", Status::Up, 220, "A"),
            entry("c", Status::Up, 224, "A"),
            entry("d", Status::Up, 225, "A"),
        ]);
        let plan = plan(&list, Tolerance::default());
        assert_eq!(plan.moves(), 0, "{plan:?}");
        assert!(plan.shares.iter().all(|s| !s.sends));
    }

    #[test]
    fn failback_empties_the_less_preferred_group() {
        let list = FarmList::new(vec![
            entry("a1", Status::Up, 0, "A"),
            entry("a2", Status::Up, 100, "A"),
            entry("b1", Status::Up, 100, "B"),
        ]);
        let plan = plan(&list, Tolerance::default());
        assert_eq!(targets_of(&plan), [100, 100, 0]);
        assert_eq!(plan.shares[2].role, Role::LessPreferred);
        assert_eq!(sent(&plan, "b1"), [("ws://a1/stream".to_string(), 100)]);
    }

    #[test]
    fn a_full_preferred_group_leaves_the_overflow_where_it_is() {
        let mut list = FarmList::new(vec![
            entry("a1", Status::Up, 50, "A"),
            entry("b1", Status::Up, 100, "B"),
        ]);
        list.servers[0].capacity = Some(80);
        list.servers[1].capacity = Some(1000);
        let plan = plan(&list, Tolerance::default());
        assert_eq!(targets_of(&plan), [80, 70]);
        assert_eq!(sent(&plan, "b1"), [("ws://a1/stream".to_string(), 30)]);
    }

    #[test]
    fn shares_follow_capacity_and_draining_servers_empty() {
        let mut list = FarmList::new(vec![
            entry("a", Status::Up, 0, "A"),
            entry("b", Status::Up, 0, "A"),
            entry("c", Status::Draining, 300, "A"),
            entry("d", Status::Down, 500, "A"),
        ]);
        list.servers[0].capacity = Some(1000);
        list.servers[1].capacity = Some(2000);
        list.servers[2].capacity = Some(1000);
        let plan = plan(&list, Tolerance::default());
        assert_eq!(targets_of(&plan), [100, 200, 0, 0]);
        assert_eq!(
            sent(&plan, "c"),
            [
                ("ws://a/stream".to_string(), 100),
                ("ws://b/stream".to_string(), 200)
            ]
        );
        assert!(sent(&plan, "d").is_empty());
    }

    #[test]
    fn targets_do_not_depend_on_list_order() {
        let a = FarmList::new(vec![
            entry("a", Status::Up, 10, "A"),
            entry("b", Status::Up, 0, "A"),
            entry("c", Status::Up, 0, "A"),
        ]);
        let mut b = a.clone();
        b.servers.reverse();
        let pa = plan(&a, Tolerance::default());
        let pb = plan(&b, Tolerance::default());
        for share in &pa.shares {
            assert_eq!(pb.share(&share.url).unwrap().target, share.target);
        }
    }

    #[test]
    fn own_moves_count_on_what_the_server_holds_now() {
        let list = FarmList::new(vec![
            entry("a", Status::Up, 300, "A"),
            entry("b", Status::Up, 300, "A"),
            entry("c", Status::Up, 300, "A"),
            entry("d", Status::Up, 0, "A"),
        ]);
        let a = "ws://a/stream";
        // The list is old: a has already sent 50 of its 75.
        let own = own_moves(&list, a, 250, Tolerance::default(), false, 0);
        assert_eq!((own.target, own.sends, own.count), (225, true, 25));
        assert_eq!(own.receivers, [("ws://d/stream".to_string(), 225)]);
        // Within the tolerance it does not start, but once started it goes on to its target.
        let near = own_moves(&list, a, 230, Tolerance::default(), false, 0);
        assert!(!near.sends);
        let on = own_moves(&list, a, 230, Tolerance::default(), true, 0);
        assert_eq!((on.sends, on.count), (true, 5));
        assert!(!own_moves(&list, a, 225, Tolerance::default(), true, 0).sends);
    }

    #[test]
    fn a_list_caught_mid_move_does_not_lower_the_targets() {
        // a has sent 40 to d; the list shows a's new count but not yet d's.
        let before = FarmList::new(vec![
            entry("a", Status::Up, 300, "A"),
            entry("b", Status::Up, 300, "A"),
            entry("c", Status::Up, 300, "A"),
            entry("d", Status::Up, 0, "A"),
        ]);
        let mut mid = before.clone();
        mid.servers[0].users = 260;
        let b = "ws://b/stream";
        let mut window = PlacedWindow::new(3.0);
        window.record(0.0, &before);
        let floor = window.record(1.0, &mid);
        assert_eq!(floor, 900);
        let own = own_moves(&mid, b, 300, Tolerance::default(), false, floor);
        assert_eq!((own.target, own.count), (225, 75));
        // Without the window, b would take 215 as its share and send 10 too many.
        assert_eq!(
            own_moves(&mid, b, 300, Tolerance::default(), false, 0).count,
            85
        );
        // Clients that really left lower the floor once the window has passed.
        assert_eq!(window.record(5.0, &mid), 860);
    }

    #[test]
    fn apportion_is_exact_and_bounded() {
        assert_eq!(apportion(10, &[1, 1, 1]), [4, 3, 3]);
        assert_eq!(apportion(2, &[5, 0, 5]), [1, 0, 1]);
        assert_eq!(apportion(0, &[5, 5]), [0, 0]);
        assert_eq!(apportion(7, &[3, 4]), [3, 4]);
    }

    fn farm() -> impl Strategy<Value = FarmList> {
        let server = (
            prop_oneof![
                6 => Just(Status::Up),
                1 => Just(Status::Draining),
                1 => Just(Status::Down)
            ],
            0u64..2000,
            prop_oneof![Just("A"), Just("B"), Just("C")],
            proptest::option::of(1u64..3000),
        );
        proptest::collection::vec(server, 1..12).prop_map(|servers| {
            let all_capacity = servers.iter().all(|s| s.3.is_some());
            FarmList::new(
                servers
                    .into_iter()
                    .enumerate()
                    .map(|(i, (status, users, group, capacity))| {
                        let mut e = entry(&format!("s{i}"), status, users, group);
                        e.capacity = if all_capacity { capacity } else { None };
                        e
                    })
                    .collect(),
            )
        })
    }

    fn apply(list: &FarmList, plan: &Plan) -> FarmList {
        let mut next = list.clone();
        for flow in &plan.flows {
            for server in &mut next.servers {
                if server.url == flow.from {
                    server.users -= flow.count;
                }
                if server.url == flow.to {
                    server.users += flow.count;
                }
            }
        }
        next
    }

    proptest! {
        #[test]
        fn plans_are_exact_and_never_send_clients_back(list in farm()) {
            let tolerance = Tolerance::default();
            let first = plan(&list, tolerance);
            let placed: u64 = list.servers.iter().filter(|s| s.status != Status::Down).map(|s| s.users).sum();
            let has_up = list.servers.iter().any(|s| s.status == Status::Up);
            let targeted: u64 = first.shares.iter().map(|s| s.target).sum();
            prop_assert_eq!(targeted, if has_up { placed } else { 0 });
            // Nobody sends below its target or receives above it, and nothing goes to a sender.
            for share in &first.shares {
                let out: u64 = first.flows_from(&share.url).map(|f| f.count).sum();
                let inbound: u64 = first.flows.iter().filter(|f| f.to == share.url).map(|f| f.count).sum();
                prop_assert!(out == 0 || inbound == 0);
                prop_assert!(out <= share.users.saturating_sub(share.target));
                if inbound > 0 {
                    prop_assert_eq!(share.role, Role::Serving);
                    prop_assert!(share.users + inbound <= share.target);
                }
            }
            prop_assert!(first.moves() <= minimal_moves(&first));
            // Carried out, the plan leaves no flow back: a receiver never sends, a sender never
            // receives.
            let second = plan(&apply(&list, &first), tolerance);
            for flow in &second.flows {
                prop_assert!(!first.flows.iter().any(|f| f.to == flow.from), "{} received, then sends", flow.from);
                prop_assert!(!first.flows.iter().any(|f| f.from == flow.to), "{} sent, then receives", flow.to);
            }
        }
    }
}
