//! Bursts of arrivals onto a live farm's lists: counts of different ages, one list server or many.
//!
//! The scenarios of [`crate::engine`] give every count of a list the same age. A node's list does
//! not: the list server knows its own users at once and its peers' only as of their last gossip.
//! This model follows what the nodes do (`crates/node/src/membership.rs`), so that its figures can
//! be set beside live runs (`streamfarm bench balance`):
//!
//! - **Nodes.** Every node runs its membership loop twice per gossip interval (each with its own
//!   phase): it writes its count and join rate into its gossip state, and builds its list. The
//!   join rate is the node's own measure: accepted connections over the last
//!   [`Burst::join_rate_window`] seconds (0 until half a second of samples).
//! - **Gossip.** A node starts an exchange with up to three peers a round, and either side of an
//!   exchange learns the other's state. So on farms of up to four nodes node `s` hears peer `j`'s
//!   state twice per gossip interval (a phase per pair): the state `j` last wrote. On larger farms
//!   it hears of `j` once per interval, straight from `j` with probability `6 / (n − 1)`, else
//!   `j`'s state as a third node holds it. The loop notices a new state at its next tick and lists
//!   the peer's count with the age the node states: time since noticed plus half an interval.
//! - **The list server's own count.** Listed now with no age ([`Burst::aligned`] false: what the
//!   nodes did before), or as of the median instant of its live peers' counts, with that age
//!   (true: what they do now).
//! - **Clients.** `clients` arrive at `rate` per second, in batches of [`Burst::batch`] started
//!   together (`streamfarm bench balance` starts a batch every 10 ms); each gets its list from one
//!   list server ([`Via::ListServer`]) or from a server drawn at random ([`Via::Dns`], round-robin
//!   DNS with shuffled answers), picks with [`streamfarm_core::selection::choose_with`], and is
//!   counted on its server [`Burst::connect_delay`] seconds later.
//! - **The list a client picks from.** The Rust client picks from the greeting of its list
//!   connection (`hello`, then the list), which a node gives every new connection: the counts with
//!   their ages, but neither a draw nor `in_flight` (a node cannot tell a client that is about to
//!   choose from one that has chosen). A list asked for (`GET /farm`, as the browser client does,
//!   or a `list` frame) carries both: the node's next draw ([`streamfarm_core::selection::Draws`],
//!   from a start of its own) and the lists it handed out since its own count. [`Burst::draws`]
//!   and [`Burst::in_flight`] say which the client picks from; [`Burst::new`] is the greeting.
//!   Once connected, a client asks its server for the list to watch (`list` with `watch`), which
//!   takes one of that server's draws and counts in its `in_flight`.
//!
//! The figure is max/mean of users per server when the last client has connected; [`median`]
//! takes it over seeds.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, VecDeque};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use streamfarm_core::selection::{self, Context, Draws};
use streamfarm_core::{FarmList, Policy, ServerEntry, Status};

/// Where clients get their lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// Every client asks the first server.
    ListServer,
    /// Each client asks a server drawn at random (the farm's DNS name).
    Dns,
}

impl Via {
    /// The name in tables: `list server` or `DNS`.
    pub fn name(self) -> &'static str {
        match self {
            Via::ListServer => "list server",
            Via::Dns => "DNS",
        }
    }
}

/// One burst: a farm of empty servers and the clients that arrive on it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Burst {
    /// Servers, all up, in one group.
    pub servers: usize,
    /// Clients that arrive.
    pub clients: u64,
    /// Arrivals per second.
    pub rate: f64,
    /// Where they get their lists.
    pub via: Via,
    /// The nodes' gossip interval, seconds (the node's default: 0.1).
    pub gossip_interval: f64,
    /// Window of the nodes' join-rate measure, seconds (the node's: 5).
    pub join_rate_window: f64,
    /// Seconds from a client's list request to its connection being counted.
    pub connect_delay: f64,
    /// Clients started at the same instant (at least 1): the next batch starts `batch / rate`
    /// seconds later.
    pub batch: u64,
    /// Whether a list server lists its own count as of its peers' instant.
    pub aligned: bool,
    /// Whether the list a client picks from says how many lists its server handed out since
    /// its own count (`in_flight`): a list asked for does, a greeting does not.
    pub in_flight: bool,
    /// Whether the list a client picks from carries its server's next draw (`draw`): a list
    /// asked for does, a greeting does not.
    pub draws: bool,
    /// Whether the list a connected client asks its server for, to watch, is handed out as a
    /// list to choose from (a draw taken, counted in flight), as the nodes do now.
    pub watch_takes_draw: bool,
}

impl Burst {
    /// A burst as the nodes and the Rust client meet it: gossip every 0.1 s, join rates over 5 s,
    /// counted 5 ms after the list, one client at a time, the list server's own count aligned,
    /// each client picking from a list it asked for on its list connection (the list server's
    /// draw and its clients in flight in it), and the list a connected client watches taking no
    /// draw.
    pub fn new(servers: usize, clients: u64, rate: f64, via: Via) -> Burst {
        Burst {
            servers,
            clients,
            rate,
            via,
            gossip_interval: 0.1,
            join_rate_window: 5.0,
            connect_delay: 0.005,
            batch: 1,
            aligned: true,
            in_flight: true,
            draws: true,
            watch_takes_draw: false,
        }
    }

    /// The same burst with every client picking from its list connection's greeting (no draw,
    /// no `in_flight`) and the watched list taking a draw: how the Rust client and the nodes met
    /// a burst before the client asked for its list, kept to show what the draws are worth.
    pub fn from_greeting(self) -> Burst {
        Burst {
            in_flight: false,
            draws: false,
            watch_takes_draw: true,
            ..self
        }
    }

    /// The same burst with every client picking from a list it asked for, the watched list
    /// taking a draw.
    pub fn asked_for(self) -> Burst {
        Burst {
            in_flight: true,
            draws: true,
            watch_takes_draw: true,
            ..self
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Event {
    /// Client `k` asks for a list.
    Arrival(u64),
    /// A client that got its list from `via` is counted on server `to`.
    Connected { to: usize, via: usize },
    /// Server `i`'s membership loop runs.
    Tick(usize),
    /// Server `to` hears peer `from`'s state.
    Heard { to: usize, from: usize },
}

struct Timed {
    time: f64,
    seq: u64,
    event: Event,
}

impl PartialEq for Timed {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timed {
    /// Reversed: the earliest first, then the first scheduled.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .time
            .total_cmp(&self.time)
            .then(other.seq.cmp(&self.seq))
    }
}

/// What a node wrote into its gossip state at its last tick.
#[derive(Debug, Clone, Copy, Default)]
struct Advertised {
    users: u64,
    join_rate: f64,
}

/// What node `s` holds of peer `j`: the state, and the tick at which it noticed it.
#[derive(Debug, Clone, Copy, Default)]
struct View {
    state: Advertised,
    /// When the state arrived (the loop notices it at its next tick).
    arrived: f64,
    noticed: Option<f64>,
}

/// Max/mean of users per server when the last client of `burst` has connected, picking with
/// `policy`, from `seed`.
pub fn run(burst: &Burst, policy: Policy, seed: u64) -> f64 {
    let n = burst.servers;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pick_rng = StdRng::seed_from_u64(seed ^ 0xb0_05_7e_d5);
    let tick = burst.gossip_interval / 2.0;
    // The farm has been up a while: the burst starts after a join-rate window of quiet.
    let start = burst.join_rate_window + 1.0;
    let mut events = BinaryHeap::new();
    let mut seq = 0;
    let mut push = |events: &mut BinaryHeap<Timed>, time: f64, event: Event| {
        seq += 1;
        events.push(Timed { time, seq, event });
    };
    let hear_every = if n <= 4 {
        burst.gossip_interval / 2.0
    } else {
        burst.gossip_interval
    };
    for i in 0..n {
        push(&mut events, rng.random::<f64>() * tick, Event::Tick(i));
        for j in 0..n {
            if i != j {
                let phase = rng.random::<f64>() * hear_every;
                push(&mut events, phase, Event::Heard { to: i, from: j });
            }
        }
    }
    push(&mut events, start, Event::Arrival(0));
    let mut users = vec![0u64; n];
    let mut accepted = vec![0u64; n];
    let mut advertised = vec![Advertised::default(); n];
    // Per node: its own (tick, users) and (tick, accepted) samples.
    let mut own: Vec<VecDeque<(f64, u64)>> = vec![VecDeque::new(); n];
    let mut accepts: Vec<VecDeque<(f64, u64)>> = vec![VecDeque::new(); n];
    let mut views = vec![vec![View::default(); n]; n];
    let mut lists: Vec<FarmList> = (0..n).map(|_| FarmList::new(Vec::new())).collect();
    // Per node: when it handed out its recent lists.
    let mut served: Vec<VecDeque<f64>> = vec![VecDeque::new(); n];
    let mut draws: Vec<Draws> = (0..n).map(|_| Draws::new(rng.random())).collect();
    let mut connected = 0;
    let direct = if n <= 4 {
        1.0
    } else {
        (6.0 / (n - 1) as f64).min(1.0)
    };
    while let Some(Timed { time, event, .. }) = events.pop() {
        match event {
            Event::Arrival(k) => {
                if k + 1 < burst.clients {
                    let batch = burst.batch.max(1);
                    let next = start + ((k + 1) / batch * batch) as f64 / burst.rate;
                    push(&mut events, next, Event::Arrival(k + 1));
                }
                let server = match burst.via {
                    Via::ListServer => 0,
                    Via::Dns => rng.random_range(0..n),
                };
                // The list comes on a connection the server counts until the client has
                // connected to its pick.
                users[server] += 1;
                accepted[server] += 1;
                let mut list = lists[server].clone();
                list.restamp((time * 1000.0) as u64);
                let in_flight = hand_out(&mut served[server], &list, server, time);
                if burst.in_flight {
                    list.in_flight = Some(in_flight);
                }
                if burst.draws {
                    list.draw = Some(draws[server].next_draw());
                }
                let choice =
                    selection::choose_with(policy, &list, &[], &Context::default(), &mut pick_rng)
                        .expect("every server is up");
                push(
                    &mut events,
                    time + burst.connect_delay,
                    Event::Connected {
                        to: choice.index,
                        via: server,
                    },
                );
            }
            Event::Connected { to, via } => {
                if to != via {
                    // A new connection, greeted with a list that is neither in flight nor given
                    // a draw; then the list's connection closes.
                    users[to] += 1;
                    accepted[to] += 1;
                    users[via] -= 1;
                }
                // The client asks its server for the list to watch: a list handed out there.
                if burst.watch_takes_draw {
                    let mut watched = lists[to].clone();
                    watched.restamp((time * 1000.0) as u64);
                    hand_out(&mut served[to], &watched, to, time);
                    draws[to].next_draw();
                }
                connected += 1;
                if connected == burst.clients {
                    return max_over_mean(&users);
                }
            }
            Event::Tick(i) => {
                own[i].push_back((time, users[i]));
                accepts[i].push_back((time, accepted[i]));
                while own[i].front().is_some_and(|(at, _)| time - at > 2.0) {
                    own[i].pop_front();
                }
                while accepts[i]
                    .front()
                    .is_some_and(|(at, _)| time - at > burst.join_rate_window)
                {
                    accepts[i].pop_front();
                }
                let (first_at, first) = accepts[i][0];
                let elapsed = time - first_at;
                let join_rate = if elapsed < (burst.join_rate_window / 2.0).min(0.5) {
                    0.0
                } else {
                    (accepted[i] - first) as f64 / elapsed
                };
                advertised[i] = Advertised {
                    users: users[i],
                    join_rate,
                };
                for view in views[i].iter_mut() {
                    if view.noticed.is_none() && view.arrived > 0.0 {
                        view.noticed = Some(time);
                    }
                }
                lists[i] = build_list(burst, i, time, &views[i], &own[i], advertised[i]);
                push(&mut events, time + tick, Event::Tick(i));
            }
            Event::Heard { to, from } => {
                // Straight from the owner, or its state of a round ago through a third node.
                let state = if rng.random::<f64>() < direct {
                    advertised[from]
                } else {
                    views[to][from].state.max_with(views_of(&views, from, to))
                };
                views[to][from] = View {
                    state,
                    arrived: time,
                    noticed: None,
                };
                push(&mut events, time + hear_every, Event::Heard { to, from });
            }
        }
    }
    max_over_mean(&users)
}

impl Advertised {
    /// The newer of two states of one node (counts only grow in a burst).
    fn max_with(self, other: Advertised) -> Advertised {
        if other.users > self.users {
            other
        } else {
            self
        }
    }
}

/// Records a list handed out by `server` at `time` and returns its `in_flight`: the lists handed
/// out since the server's own count, this one included.
fn hand_out(log: &mut VecDeque<f64>, list: &FarmList, server: usize, time: f64) -> u64 {
    let since = list
        .servers
        .get(server)
        .and_then(|s| s.users_age_ms)
        .unwrap_or(0) as f64
        / 1000.0;
    while log.front().is_some_and(|&at| time - at > 10.0) {
        log.pop_front();
    }
    log.push_back(time);
    log.iter()
        .rev()
        .take_while(|&&at| at >= time - since)
        .count() as u64
}

/// A state of `from` that some third node holds (the freshest, as gossip spreads the newest).
fn views_of(views: &[Vec<View>], from: usize, to: usize) -> Advertised {
    views
        .iter()
        .enumerate()
        .filter(|&(k, _)| k != from && k != to)
        .map(|(_, v)| v[from].state)
        .fold(Advertised::default(), Advertised::max_with)
}

/// Node `me`'s list at its tick `now`, as the membership loop builds it.
fn build_list(
    burst: &Burst,
    me: usize,
    now: f64,
    views: &[View],
    own: &VecDeque<(f64, u64)>,
    mine: Advertised,
) -> FarmList {
    let mut servers = Vec::with_capacity(views.len());
    let mut ages = Vec::new();
    for (j, view) in views.iter().enumerate() {
        if j == me {
            continue;
        }
        let mut entry =
            ServerEntry::new(format!("s{j}"), url(j), Status::Up, view.state.users, "A");
        entry.join_rate = Some(view.state.join_rate);
        let noticed = view.noticed.unwrap_or(0.0);
        let age = now - noticed + burst.gossip_interval / 2.0;
        entry.users_age_ms = Some((age * 1000.0) as u64);
        ages.push(entry.users_age_ms.unwrap_or(0));
        servers.push(entry);
    }
    let mut entry = ServerEntry::new(format!("s{me}"), url(me), Status::Up, mine.users, "A");
    entry.join_rate = Some(mine.join_rate);
    if burst.aligned {
        ages.sort_unstable();
        let (users, age) = match ages.get(ages.len() / 2) {
            Some(&target) => {
                let target = target as f64 / 1000.0;
                own.iter()
                    .rev()
                    .find(|(at, _)| now - at >= target)
                    .or(own.front())
                    .map_or((mine.users, 0.0), |&(at, u)| (u, now - at))
            }
            None => (mine.users, 0.0),
        };
        entry.users = users;
        entry.users_age_ms = Some((age * 1000.0) as u64);
    }
    servers.insert(me, entry);
    let mut list = FarmList::new(servers);
    list.generated_at_ms = Some((now * 1000.0) as u64);
    list
}

fn url(i: usize) -> String {
    format!("ws://s{i}/stream")
}

fn max_over_mean(users: &[u64]) -> f64 {
    let mean = users.iter().sum::<u64>() as f64 / users.len() as f64;
    let max = users.iter().copied().max().unwrap_or(0) as f64;
    if mean == 0.0 { 1.0 } else { max / mean }
}

/// The median of [`run`] over `seeds` seeds from `first_seed`.
pub fn median(burst: &Burst, policy: Policy, first_seed: u64, seeds: u64) -> f64 {
    let mut figures: Vec<f64> = (first_seed..first_seed + seeds.max(1))
        .map(|seed| run(burst, policy, seed))
        .collect();
    figures.sort_by(f64::total_cmp);
    figures[figures.len() / 2]
}

/// The bursts of `streamfarm sim --bursts` and `streamfarm bench balance`: 3 nodes with 300 and
/// 900 clients, 10 nodes with 1000 and 3000, at 100, 1000 and 10 000 arrivals/s, through one list
/// server and through DNS.
pub fn default_bursts() -> Vec<Burst> {
    let mut bursts = Vec::new();
    for (servers, sizes) in [(3, [300, 900]), (10, [1000, 3000])] {
        for clients in sizes {
            for rate in [100.0, 1000.0, 10_000.0] {
                for via in [Via::ListServer, Via::Dns] {
                    bursts.push(Burst::new(servers, clients, rate, via));
                }
            }
        }
    }
    bursts
}

/// A Markdown table of the median max/mean over `seeds` seeds of every burst (rows) under every
/// policy (columns).
pub fn table(bursts: &[Burst], policies: &[Policy], seeds: u64) -> String {
    let mut out = String::from("| nodes | clients | arrivals/s | lists from |");
    for policy in policies {
        out.push_str(&format!(" {policy} |"));
    }
    out.push_str("\n|---:|---:|---:|---|");
    out.push_str(&"---:|".repeat(policies.len()));
    out.push('\n');
    for burst in bursts {
        out.push_str(&format!(
            "| {} | {} | {} | {} |",
            burst.servers,
            burst.clients,
            burst.rate,
            burst.via.name()
        ));
        for &policy in policies {
            out.push_str(&format!(" {:.3} |", median(burst, policy, 1, seeds)));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_own_count_beside_stale_ones_unbalances_weighted_and_aligning_fixes_it() {
        // The case: 3 nodes, 300 clients at 1000/s through one list server.
        let mut burst = Burst::new(3, 300, 1000.0, Via::ListServer);
        burst.aligned = false;
        let before = median(&burst, Policy::Weighted, 1, 21);
        burst.aligned = true;
        let after = median(&burst, Policy::Weighted, 1, 21);
        assert!(after < before, "before {before}, after {after}");
    }

    #[test]
    fn a_list_servers_draws_spread_a_burst_as_evenly_as_a_trickle() {
        // 300 clients at 1000/s through one list server, uniform picks: each client's own draw
        // leaves the binomial spread (about 1.09); the list server's draws leave a client or two.
        let mut burst = Burst::new(3, 300, 1000.0, Via::ListServer).asked_for();
        burst.watch_takes_draw = false;
        burst.draws = false;
        let own = median(&burst, Policy::Random, 1, 21);
        burst.draws = true;
        let listed = median(&burst, Policy::Random, 1, 21);
        assert!(
            listed <= 1.02 && own > 1.04,
            "own draws {own}, the list's {listed}"
        );
    }

    #[test]
    fn draws_taken_by_watch_requests_undo_the_spread() {
        // A client that picked the list server asks it for the list to watch at once: the draw
        // it takes is the one after a draw that picked that server, so the list server's own
        // share of the sequence is skipped over and it is starved (or flooded), worse than
        // independent draws.
        let mut burst = Burst::new(3, 300, 1000.0, Via::ListServer).asked_for();
        burst.draws = false;
        let own = median(&burst, Policy::Random, 1, 21);
        burst.draws = true;
        let skipped = median(&burst, Policy::Random, 1, 21);
        assert!(
            skipped > own,
            "own draws {own}, the list's with skips {skipped}"
        );
    }

    #[test]
    fn weighted_spreads_a_burst_once_the_clients_in_flight_are_counted() {
        // The same burst under the default policy: on counts of a few clients each, weighted
        // swings; with the other clients in flight counted in every candidate's users it does not.
        let mut burst = Burst::new(3, 300, 1000.0, Via::ListServer).asked_for();
        burst.watch_takes_draw = false;
        burst.in_flight = false;
        let uncounted = median(&burst, Policy::Weighted, 1, 21);
        burst.in_flight = true;
        let counted = median(&burst, Policy::Weighted, 1, 21);
        assert!(
            counted <= 1.05 && counted < uncounted,
            "in flight counted {counted}, not {uncounted}"
        );
    }

    #[test]
    fn a_slow_trickle_is_even_under_least_users() {
        // Lists catch up between arrivals: every server within a user or two.
        let burst = Burst::new(3, 300, 20.0, Via::ListServer);
        assert!(run(&burst, Policy::LeastUsers, 1) <= 1.02);
    }

    #[test]
    fn the_same_seed_gives_the_same_figure() {
        let burst = Burst::new(10, 1000, 1000.0, Via::Dns);
        assert_eq!(run(&burst, Policy::P2c, 3), run(&burst, Policy::P2c, 3));
    }
}
