//! Client-side server selection: which server of a [`FarmList`] a client connects to.
//!
//! Every policy starts with the same step, [`candidates`]: a server is *live* when it is `UP` and
//! not in the client's exclusions (servers it has just failed to reach); the client keeps to the
//! most preferred priority group that has a live server. The policies differ only in how they
//! weigh the live servers of that group:
//!
//! - [`Policy::Weighted`] — every live server, weighted by the share of the users that are
//!   elsewhere: `p_i = (1 - users_i / total) / (live - 1)`; 1 for a lone live server, uniform when
//!   nobody is connected anywhere. The default; `patent` is its other name.
//! - [`Policy::Random`] — uniform, what DNS round-robin gives.
//! - [`Policy::LeastUsers`] — uniform among the servers with the fewest users. Herds on stale lists.
//! - [`Policy::P2c`] — power of two choices: two distinct live servers at random, the one with fewer
//!   users wins, a tie is a coin toss.
//! - [`Policy::Waterfill`] — staleness-aware: a list `t` seconds old will have taken about
//!   `rate × t` more clients by the time they arrive; each pick aims at the water level those
//!   arrivals would reach, so the emptiest servers fill first without overshoot (the algorithm is
//!   on [`Policy::Waterfill`]).
//!
//! Each has exact probabilities ([`probabilities`]); [`choose`] samples them with an injected RNG
//! and says why ([`Explanation`]). No clock and no global RNG: the same seed gives the same pick.
//! A list that carries a `draw` (a list server gives each list it hands to a client one, from
//! [`Draws`]) is sampled with that number instead of the RNG: the probabilities are the same, but
//! the clients of one list server split between the servers as evenly as the probabilities allow,
//! where independent draws leave every server a binomial spread.
//!
//! Every policy that compares counts compares them as of one instant: a list whose entries carry
//! `users_age_ms` of different ages has the older counts brought forward by their join rates
//! ([`FarmList::users_at_one_instant`]), so that the list server's fresh count of its own users is
//! not set against its peers' older ones.
//!
//! Only `waterfill` needs more than (list, exclusions, RNG): the age of the list and, when the
//! client knows it better than the list's `join_rate` fields, the farm's arrival rate. It adds
//! the counts' own age (`users_age_ms`) to the list's age. Those come
//! in a [`Context`], through [`probabilities_with`] and [`choose_with`]; [`probabilities`] and
//! [`choose`] use [`Context::default`] (a fresh list), under which `waterfill` is least-users.
//!
//! ```
//! use streamfarm_core::{FarmList, ServerEntry, Status, Policy, selection};
//! let list = FarmList::new(vec![
//!     ServerEntry::new("a", "ws://a/s", Status::Up, 2963, "A"),
//!     ServerEntry::new("b", "ws://b/s", Status::Down, 0, "B"),
//!     ServerEntry::new("n", "ws://n/s", Status::Up, 2979, "A"),
//! ]);
//! let p = selection::probabilities(Policy::Weighted, &list, &[]).unwrap();
//! assert!((p[0] - 0.501).abs() < 0.001 && p[1] == 0.0 && (p[2] - 0.499).abs() < 0.001);
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::Rng;

use crate::model::{FarmList, Status, group_comparator};

mod waterfill;

/// A way of weighing the live servers of the preferred group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Policy {
    /// Every live server, weighted by the share of the users connected elsewhere:
    /// `p_i = (1 − users_i / total) / (live − 1)`. The default.
    ///
    /// Named for what it does: it is the one policy that keeps every live server in the draw
    /// and only tilts it against the busier ones (least-users, p2c and waterfill send nobody to a
    /// server above the others' counts or level; random ignores the counts). The seeds call it
    /// `patent`, after where the formula came from, and clients, config files and scripts name it
    /// so: [`FromStr`] takes `patent` as an alias of `weighted`, in the CLI, configs and the
    /// browser client alike ([`Policy::ALIASES`]).
    #[default]
    Weighted,
    /// Uniform over the live servers.
    Random,
    /// Uniform over the live servers with the fewest users.
    LeastUsers,
    /// Power of two choices.
    P2c,
    /// Staleness-aware: fill the emptiest servers towards the level that the arrivals a stale list
    /// cannot show will reach, in proportion to each server's deficit. Least-users on a fresh list.
    ///
    /// With `A = rate × list_age` clients in flight ([`Context`]; the rate defaults to the sum of
    /// the candidates' `join_rate`), the level `L` solves `Σ max(0, L − u_i) = A + 1` and server
    /// `i` is chosen with probability `∝ max(0, L − u_i)` — over fill fractions `u_i / capacity_i`
    /// when every candidate states a capacity. An overshoot guard caps the share of a server
    /// whose own join rate projects it more than two fair shares of `A` above the level. The
    /// derivation, and what it achieves in the simulator, are in
    /// `crates/core/src/selection/waterfill.rs` and `BALANCE.md`.
    Waterfill,
}

impl Policy {
    /// Every policy, in the order the CLI lists them.
    pub const ALL: [Policy; 5] = [
        Policy::Weighted,
        Policy::Random,
        Policy::LeastUsers,
        Policy::P2c,
        Policy::Waterfill,
    ];

    /// The policy's name on the command line and in config files.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Weighted => "weighted",
            Policy::Random => "random",
            Policy::LeastUsers => "least-users",
            Policy::P2c => "p2c",
            Policy::Waterfill => "waterfill",
        }
    }

    /// Other names that name a policy wherever one is read: `patent`, the seeds' name of
    /// [`Policy::Weighted`], which clients and config files already use.
    pub const ALIASES: [(&'static str, Policy); 1] = [("patent", Policy::Weighted)];
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = SelectionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Policy::ALL
            .into_iter()
            .map(|p| (p.name(), p))
            .chain(Policy::ALIASES)
            .find(|(name, _)| name.eq_ignore_ascii_case(s))
            .map(|(_, p)| p)
            .ok_or_else(|| SelectionError::UnknownPolicy(s.to_string()))
    }
}

/// Why no server could be chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectionError {
    /// No server of the list is `UP` and not excluded.
    #[error(
        "no server available: {listed} listed, {not_up} not UP, {excluded} excluded by the client"
    )]
    NoServerAvailable {
        /// Servers in the list.
        listed: usize,
        /// Servers that are `DOWN` or `DRAINING`.
        not_up: usize,
        /// `UP` servers the client excluded.
        excluded: usize,
    },
    /// The policy name is not one we know.
    #[error(
        "unknown policy {0:?}: expected one of weighted (or patent), random, least-users, p2c, waterfill"
    )]
    UnknownPolicy(String),
}

impl SelectionError {
    /// A stable snake-case code, as used by the shared selection vectors.
    pub fn code(&self) -> &'static str {
        match self {
            SelectionError::NoServerAvailable { .. } => "no_server_available",
            SelectionError::UnknownPolicy(_) => "unknown_policy",
        }
    }
}

/// What the first step made of one server of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Live, in the chosen group: a candidate.
    Candidate,
    /// Not `UP`.
    NotUp(Status),
    /// `UP`, but the client excluded it (it just failed to reach it).
    Excluded,
    /// Live, but in a less preferred group than the chosen one.
    LessPreferredGroup,
}

/// Why the candidates are what they are: the group kept and a verdict per server (list order).
#[derive(Debug, Clone, PartialEq)]
pub struct Explanation {
    /// The priority group the client keeps to: the most preferred with a live server.
    pub group: String,
    /// One verdict per server of the list, in list order.
    pub verdicts: Vec<Verdict>,
}

/// The live servers of the preferred group: indices into the list, with the explanation.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    /// Indices into `list.servers` of the candidates, in list order.
    pub indices: Vec<usize>,
    /// How every server was judged.
    pub explanation: Explanation,
}

/// The first step of every policy: keep the live servers of the most preferred group that has any.
pub fn candidates(list: &FarmList, exclude: &[String]) -> Result<Candidates, SelectionError> {
    let is_excluded = |url: &str| exclude.iter().any(|e| e == url);
    let mut verdicts: Vec<Verdict> = list
        .servers
        .iter()
        .map(|s| {
            if !s.status.is_live() {
                Verdict::NotUp(s.status)
            } else if is_excluded(&s.url) {
                Verdict::Excluded
            } else {
                Verdict::Candidate
            }
        })
        .collect();
    let compare = group_comparator(list.servers.iter().map(|s| s.priority.as_str()));
    let best_group = list
        .servers
        .iter()
        .zip(&verdicts)
        .filter(|(_, v)| **v == Verdict::Candidate)
        .map(|(s, _)| s.priority.as_str())
        .min_by(|a, b| compare(a, b));
    let Some(group) = best_group.map(str::to_string) else {
        let not_up = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::NotUp(_)))
            .count();
        return Err(SelectionError::NoServerAvailable {
            listed: list.servers.len(),
            not_up,
            excluded: list.servers.len() - not_up,
        });
    };
    let mut indices = Vec::new();
    for (i, (server, verdict)) in list.servers.iter().zip(verdicts.iter_mut()).enumerate() {
        if *verdict == Verdict::Candidate {
            if compare(&server.priority, &group).is_eq() {
                indices.push(i);
            } else {
                *verdict = Verdict::LessPreferredGroup;
            }
        }
    }
    Ok(Candidates {
        indices,
        explanation: Explanation { group, verdicts },
    })
}

/// What a client knows about its list besides the list itself. Only [`Policy::Waterfill`] uses it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Context {
    /// How old the list is: the time since the list server made it (its `generated_at_ms`), plus
    /// however long the client will take to connect. Zero for a fresh list.
    pub list_age: Duration,
    /// Farm-wide arrivals per second (new clients joining the candidates), when the client knows
    /// better than the list's `join_rate` fields — e.g. a client whose server just died knows
    /// that server's users are all reconnecting. `None`: the sum of the candidates' `join_rate`.
    pub arrival_rate: Option<f64>,
}

impl Context {
    /// The context of a list this old, with the list's own join rates.
    pub fn with_age(list_age: Duration) -> Self {
        Context {
            list_age,
            arrival_rate: None,
        }
    }

    /// The context of a client whose server `lost` (a url) just went away, holding a list this old.
    ///
    /// Everyone that server had is reconnecting too, spread over the clients' reconnect window
    /// (their jittered backoff), so the farm's arrival rate is the list's join rate plus the users
    /// the list still shows on `lost`, over `reconnect_window` (or over the list's age, when that is
    /// longer: all of them are then in flight). Once the list shows the loss, that
    /// count is gone from it and the surge shows in the survivors' `join_rate` instead.
    pub fn reconnecting(
        list: &FarmList,
        lost: &str,
        list_age: Duration,
        reconnect_window: Duration,
    ) -> Self {
        let listed_rate: f64 = list
            .servers
            .iter()
            .filter(|s| s.status.is_live() && s.url != lost)
            .filter_map(|s| s.join_rate)
            .filter(|r| r.is_finite() && *r > 0.0)
            .sum();
        let orphans = list.by_url(lost).map_or(0, |s| s.users) as f64;
        // The orphans arrive over the window; a list older than the window misses them all.
        let spread = reconnect_window.max(list_age).as_secs_f64();
        let surge = if spread > 0.0 { orphans / spread } else { 0.0 };
        Context {
            list_age,
            arrival_rate: Some(listed_rate + surge),
        }
    }
}

/// The exact probability with which `policy` chooses each server of `list` (list order; 0 for every
/// server that is not a candidate). The probabilities of the candidates add up to 1.
pub fn probabilities(
    policy: Policy,
    list: &FarmList,
    exclude: &[String],
) -> Result<Vec<f64>, SelectionError> {
    probabilities_with(policy, list, exclude, &Context::default())
}

/// [`probabilities`] for a list the client knows more about (its age, the farm's arrival rate).
pub fn probabilities_with(
    policy: Policy,
    list: &FarmList,
    exclude: &[String],
    context: &Context,
) -> Result<Vec<f64>, SelectionError> {
    let candidates = candidates(list, exclude)?;
    Ok(weigh(policy, list, &candidates, context))
}

fn weigh(policy: Policy, list: &FarmList, candidates: &Candidates, context: &Context) -> Vec<f64> {
    // Counts of different ages are compared as of one instant (the freshest among them).
    let (users, count_age) = list.users_at_one_instant(&candidates.indices);
    let weights = match policy {
        Policy::Weighted => weighted_weights(&users),
        Policy::Random => vec![1.0 / users.len() as f64; users.len()],
        Policy::LeastUsers => least_users_weights(&users),
        Policy::P2c => p2c_weights(&users),
        Policy::Waterfill => waterfill::weights(list, &candidates.indices, &users, {
            // Arrivals since the counts were true are unseen too, not only since the list.
            let mut context = *context;
            context.list_age += Duration::from_secs_f64(count_age);
            context
        }),
    };
    let mut all = vec![0.0; list.servers.len()];
    for (&i, w) in candidates.indices.iter().zip(weights) {
        all[i] = w;
    }
    all
}

/// `p_i = (1 - u_i / total) / (n - 1)`; 1 for a lone server; uniform when `total` is 0.
///
/// Counts are whole numbers below 2^53 whenever they came straight from a list, so the sum and
/// the ratios are the same as in integers: the shared vectors hold exactly.
fn weighted_weights(users: &[f64]) -> Vec<f64> {
    let n = users.len();
    let total: f64 = users.iter().sum();
    if n == 1 {
        return vec![1.0];
    }
    if total == 0.0 {
        return vec![1.0 / n as f64; n];
    }
    users
        .iter()
        .map(|&u| (1.0 - u / total) / (n - 1) as f64)
        .collect()
}

fn least_users_weights(users: &[f64]) -> Vec<f64> {
    let fewest = users.iter().copied().fold(f64::INFINITY, f64::min);
    let ties = users.iter().filter(|&&u| u == fewest).count() as f64;
    users
        .iter()
        .map(|&u| if u == fewest { 1.0 / ties } else { 0.0 })
        .collect()
}

/// Each of the `n (n - 1) / 2` pairs is equally likely; server `i` wins a pair against a server with
/// more users, and half of the pairs against one with as many.
fn p2c_weights(users: &[f64]) -> Vec<f64> {
    let n = users.len();
    if n == 1 {
        return vec![1.0];
    }
    let pairs = (n * (n - 1) / 2) as f64;
    users
        .iter()
        .enumerate()
        .map(|(i, &u)| {
            let wins: f64 = users
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &v)| match u.total_cmp(&v) {
                    std::cmp::Ordering::Less => 1.0,
                    std::cmp::Ordering::Equal => 0.5,
                    std::cmp::Ordering::Greater => 0.0,
                })
                .sum();
            wins / pairs
        })
        .collect()
}

/// A server chosen by a policy, with the reasons.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Index of the chosen server in `list.servers`.
    pub index: usize,
    /// The probability of every server of the list under the policy (list order).
    pub probabilities: Vec<f64>,
    /// How each server was judged before weighing.
    pub explanation: Explanation,
}

/// Chooses a server of `list` with `policy`, drawing from `rng`.
pub fn choose<R: Rng + ?Sized>(
    policy: Policy,
    list: &FarmList,
    exclude: &[String],
    rng: &mut R,
) -> Result<Choice, SelectionError> {
    choose_with(policy, list, exclude, &Context::default(), rng)
}

/// [`choose`] for a list the client knows more about (its age, the farm's arrival rate).
pub fn choose_with<R: Rng + ?Sized>(
    policy: Policy,
    list: &FarmList,
    exclude: &[String],
    context: &Context,
    rng: &mut R,
) -> Result<Choice, SelectionError> {
    let candidates = candidates(list, exclude)?;
    let probabilities = weigh(policy, list, &candidates, context);
    let draw = match list.draw {
        Some(draw) if (0.0..1.0).contains(&draw) => draw,
        _ => rng.random(),
    };
    let index = sample(&probabilities, &candidates.indices, draw);
    Ok(Choice {
        index,
        probabilities,
        explanation: candidates.explanation,
    })
}

/// The index whose bucket holds `draw` (in `[0, 1)`), the buckets laid end to end in candidate
/// order with the given probabilities. `candidates` is non-empty and holds every index whose
/// probability is positive; rounding that leaves the draw past the last bucket lands on the last
/// candidate.
fn sample(probabilities: &[f64], candidates: &[usize], draw: f64) -> usize {
    let mut cumulative = 0.0;
    for &i in candidates {
        cumulative += probabilities[i];
        if draw < cumulative {
            return i;
        }
    }
    *candidates
        .iter()
        .rev()
        .find(|&&i| probabilities[i] > 0.0)
        .unwrap_or(&candidates[candidates.len() - 1])
}

/// The draws a list server hands out with its lists (`FarmList::draw`): a golden-ratio sequence,
/// `x_k = x_0 + k·(φ − 1) mod 1`, from a random start.
///
/// Any stretch of `m` consecutive draws falls into every interval of `[0, 1)` about `m ×` its
/// length times, give or take a few (it is the most evenly spread such sequence), so the clients
/// of one list server land on each server about as often as its probability says, with an error
/// that does not grow with their number. Each draw on its own is uniform over `[0, 1)` for a
/// random start, so a client's pick keeps its exact probabilities. Successive draws are not
/// independent: a list pushed to many clients at once must not carry one (they would all pick the
/// same server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Draws {
    /// The next draw in 64-bit fixed point: `x = state / 2^64`.
    state: u64,
}

impl Draws {
    /// `2^64 × (φ − 1)`, odd: the step visits every state before repeating.
    const STEP: u64 = 0x9E37_79B9_7F4A_7C15;

    /// A sequence starting at `start / 2^64` (a random `start` for a list server).
    pub fn new(start: u64) -> Self {
        Draws { state: start }
    }

    /// The next draw, in `[0, 1)`.
    pub fn next_draw(&mut self) -> f64 {
        let draw = (self.state >> 11) as f64 / (1u64 << 53) as f64;
        self.state = self.state.wrapping_add(Self::STEP);
        draw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_farm as farm;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn p2c_probabilities_match_pair_counting() {
        // Pairs of {0,10,20}: (0,10)->0, (0,20)->0, (10,20)->10.
        let p = probabilities(Policy::P2c, &farm(&[0, 10, 20]), &[]).unwrap();
        assert_eq!(p, vec![2.0 / 3.0, 1.0 / 3.0, 0.0]);
    }

    #[test]
    fn least_users_splits_ties() {
        let p = probabilities(Policy::LeastUsers, &farm(&[5, 3, 3]), &[]).unwrap();
        assert_eq!(p, vec![0.0, 0.5, 0.5]);
    }

    #[test]
    fn sampled_frequencies_follow_probabilities() {
        let list = farm(&[100, 200, 700]);
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts = [0u32; 3];
        for _ in 0..20_000 {
            counts[choose(Policy::Weighted, &list, &[], &mut rng)
                .unwrap()
                .index] += 1;
        }
        let expected = [0.45, 0.40, 0.15];
        for (c, e) in counts.iter().zip(expected) {
            assert!((*c as f64 / 20_000.0 - e).abs() < 0.015, "{counts:?}");
        }
    }

    #[test]
    fn a_fresh_count_is_not_set_against_older_ones() {
        // The list server's own 150 users are of now; its peers' 100 are 0.1 s old and they take
        // 500 a second each: at one instant all three hold 150, so every policy is even.
        let mut list = farm(&[150, 100, 100]);
        list.servers[0].users_age_ms = Some(0);
        for s in &mut list.servers[1..] {
            (s.users_age_ms, s.join_rate) = (Some(100), Some(500.0));
        }
        list.servers[0].join_rate = Some(500.0);
        for policy in Policy::ALL {
            let p = probabilities(policy, &list, &[]).unwrap();
            assert!(
                p.iter().all(|x| (x - 1.0 / 3.0).abs() < 1e-9),
                "{policy}: {p:?}"
            );
        }
    }

    #[test]
    fn waterfill_counts_the_age_of_the_counts_as_list_age() {
        // Counts 1 s old at 300/s in all: 300 in flight over 0 and 300, as if the list were 1 s old.
        let mut list = farm(&[0, 300]);
        for s in &mut list.servers {
            (s.users_age_ms, s.join_rate) = (Some(1000), Some(150.0));
        }
        let aged = probabilities(Policy::Waterfill, &list, &[]).unwrap();
        for s in &mut list.servers {
            s.users_age_ms = None;
        }
        let context = Context::with_age(Duration::from_secs(1));
        let stale = probabilities_with(Policy::Waterfill, &list, &[], &context).unwrap();
        assert_eq!(aged, stale);
        assert!(aged[1] > 0.0, "{aged:?}");
    }

    #[test]
    fn a_list_servers_draws_split_its_clients_as_the_probabilities_say() {
        // 300 clients of one list server over three equal servers: independent draws leave some
        // server several clients over 100 most of the time; the sequence's draws at most one or
        // two, from any start.
        let list = farm(&[10, 10, 10]);
        for start in [0, 1, u64::MAX / 3, 0x1234_5678_9abc_def0] {
            let mut draws = Draws::new(start);
            let mut rng = StdRng::seed_from_u64(start);
            let mut counts = [0u32; 3];
            for _ in 0..300 {
                let mut list = list.clone();
                list.draw = Some(draws.next_draw());
                counts[choose(Policy::Weighted, &list, &[], &mut rng)
                    .unwrap()
                    .index] += 1;
            }
            assert!(counts.iter().all(|c| c.abs_diff(100) <= 2), "{counts:?}");
        }
    }

    #[test]
    fn a_draw_out_of_range_is_ignored() {
        let mut list = farm(&[0, 0]);
        for bad in [1.0, -0.5, f64::NAN, f64::INFINITY] {
            list.draw = Some(bad);
            let mut seen = [false; 2];
            let mut rng = StdRng::seed_from_u64(3);
            for _ in 0..64 {
                seen[choose(Policy::Random, &list, &[], &mut rng).unwrap().index] = true;
            }
            assert_eq!(
                seen,
                [true, true],
                "{bad}: the client's own draws pick both"
            );
        }
    }

    #[test]
    fn unknown_policy_names_the_choices() {
        let err = "fastest".parse::<Policy>().unwrap_err();
        assert!(err.to_string().contains("weighted (or patent), random"));
    }

    #[test]
    fn patent_names_the_weighted_policy() {
        for name in ["patent", "PATENT", "weighted"] {
            assert_eq!(name.parse::<Policy>(), Ok(Policy::Weighted), "{name}");
        }
        assert_eq!(Policy::Weighted.to_string(), "weighted");
        for policy in Policy::ALL {
            assert_eq!(policy.name().parse::<Policy>(), Ok(policy));
        }
    }
}
