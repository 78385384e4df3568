//! The `waterfill` policy: pick towards the level that the list's in-flight arrivals will reach.
//!
//! A list `t` seconds old misses the clients who joined in those `t` seconds, and every client
//! that selects from it before a newer list shows its own arrival is in the same position. If
//! they all took the emptiest server (least-users) they would land on it together and overshoot:
//! the herd. Waterfill instead treats the `A = rate × t` clients that will arrive on the same view
//! of the farm, plus this one, as water poured over the servers' loads:
//!
//! 1. `rate` is [`Context::arrival_rate`] when the client gives it, else the sum of the candidates'
//!    `join_rate` fields (servers that do not say count 0); `t` is [`Context::list_age`].
//! 2. Find the level `L` with `Σ max(0, L − u_i) = A + 1` over the candidates' users `u_i`.
//! 3. Choose server `i` with probability `max(0, L − u_i) / (A + 1)`: the emptiest servers get the
//!    most, servers above the level get nothing, and the expected arrivals bring every server they
//!    touch to the same level at once.
//!
//! When every candidate states a capacity `c_i`, loads are compared as fractions: the level solves
//! `Σ max(0, c_i·L − u_i) = A + 1`, and the deficit `c_i·L − u_i` is counted in users.
//!
//! With a fresh list (`A = 0`) the level sits 1/k above the k least-loaded servers, so waterfill is
//! exactly least-users; the staler the list and the busier the farm, the wider it spreads.

use super::Context;
use crate::model::FarmList;

/// The probability of each candidate (in the order of `indices`, which is non-empty).
pub(super) fn weights(list: &FarmList, indices: &[usize], context: &Context) -> Vec<f64> {
    let servers: Vec<_> = indices.iter().map(|&i| &list.servers[i]).collect();
    let rate = context
        .arrival_rate
        .unwrap_or_else(|| servers.iter().filter_map(|s| s.join_rate).map(sane).sum());
    let in_flight = sane(rate) * context.list_age.as_secs_f64();
    let by_capacity = servers.iter().all(|s| s.capacity.is_some_and(|c| c > 0));
    let loads: Vec<Load> = servers
        .iter()
        .map(|s| Load {
            users: s.users as f64,
            weight: if by_capacity {
                s.capacity.unwrap_or(1) as f64
            } else {
                1.0
            },
        })
        .collect();
    let deficits = deficits(&loads, in_flight + 1.0);
    let total: f64 = deficits.iter().sum();
    deficits.iter().map(|d| d / total).collect()
}

/// A negative, NaN or infinite rate from a list (or a confused client) counts as 0.
fn sane(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

/// One candidate's load: users, and the weight its level is measured against (capacity, or 1).
struct Load {
    users: f64,
    weight: f64,
}

impl Load {
    fn level(&self) -> f64 {
        self.users / self.weight
    }
}

/// `max(0, w_i·L − u_i)` for the level `L` at which these deficits add up to `water` (> 0).
///
/// Servers are filled in order of level: with the `k` lowest under water, `L = (water + Σu) / Σw`
/// over those `k`, and `k` grows while the next server's level is below `L`.
fn deficits(loads: &[Load], water: f64) -> Vec<f64> {
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by(|&a, &b| loads[a].level().total_cmp(&loads[b].level()));
    let (mut users, mut weight) = (0.0, 0.0);
    let mut level = f64::INFINITY;
    for (k, &i) in order.iter().enumerate() {
        users += loads[i].users;
        weight += loads[i].weight;
        level = (water + users) / weight;
        match order.get(k + 1) {
            Some(&next) if loads[next].level() < level => continue,
            _ => break,
        }
    }
    loads
        .iter()
        .map(|l| (l.weight * level - l.users).max(0.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::model::{FarmList, ServerEntry, Status};
    use crate::selection::{Context, Policy, probabilities, probabilities_with};

    fn farm(users: &[u64]) -> FarmList {
        FarmList::new(
            users
                .iter()
                .enumerate()
                .map(|(i, &u)| {
                    ServerEntry::new(format!("s{i}"), format!("ws://s{i}/"), Status::Up, u, "A")
                })
                .collect(),
        )
    }

    fn stale(seconds: f64, rate: f64) -> Context {
        Context {
            list_age: Duration::from_secs_f64(seconds),
            arrival_rate: Some(rate),
        }
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-12)
    }

    #[test]
    fn fresh_list_is_least_users() {
        for users in [
            &[5, 3, 3][..],
            &[0, 10, 20],
            &[7],
            &[4, 4, 4, 4],
            &[9, 1, 2, 1],
        ] {
            let list = farm(users);
            let water = probabilities(Policy::Waterfill, &list, &[]).unwrap();
            let least = probabilities(Policy::LeastUsers, &list, &[]).unwrap();
            assert!(close(&water, &least), "{users:?}: {water:?} vs {least:?}");
        }
    }

    #[test]
    fn probabilities_sum_to_one() {
        let list = farm(&[0, 100, 250, 1000, 1000]);
        for (age, rate) in [(0.0, 0.0), (0.5, 10.0), (2.0, 1000.0), (10.0, 1e6)] {
            let p = probabilities_with(Policy::Waterfill, &list, &[], &stale(age, rate)).unwrap();
            let sum: f64 = p.iter().sum();
            assert!((sum - 1.0).abs() < 1e-9, "{age} s, {rate}/s: {p:?}");
        }
    }

    #[test]
    fn emptier_servers_get_more_and_full_ones_nothing() {
        // 0.5 s at 400/s: 200 in flight + 1 over loads 0, 100, 250, 1000 → level 150.33.
        let list = farm(&[1000, 0, 250, 100]);
        let p = probabilities_with(Policy::Waterfill, &list, &[], &stale(0.5, 400.0)).unwrap();
        assert!(p[1] > p[3] && p[3] > 0.0, "{p:?}");
        assert_eq!((p[0], p[2]), (0.0, 0.0), "{p:?}");
        assert!((p[1] - 150.5 / 201.0).abs() < 1e-9, "{p:?}");
    }

    #[test]
    fn a_flood_spreads_nearly_evenly() {
        let list = farm(&[0, 10, 20]);
        let p = probabilities_with(Policy::Waterfill, &list, &[], &stale(1.0, 1e6)).unwrap();
        assert!(p[0] > p[1] && p[1] > p[2] && p[2] > 0.33, "{p:?}");
    }

    #[test]
    fn list_join_rates_are_used_when_the_client_knows_no_better() {
        let mut list = farm(&[0, 100]);
        for s in &mut list.servers {
            s.join_rate = Some(200.0);
        }
        // 400/s × 0.5 s = 200 in flight: level (201 + 100) / 2 = 150.5.
        let context = Context::with_age(Duration::from_millis(500));
        let p = probabilities_with(Policy::Waterfill, &list, &[], &context).unwrap();
        assert!(close(&p, &[150.5 / 201.0, 50.5 / 201.0]), "{p:?}");
    }

    #[test]
    fn a_reconnecting_client_counts_the_lost_servers_users_as_arriving() {
        let mut list = farm(&[1000, 900, 900]);
        list.servers[1].join_rate = Some(10.0);
        list.servers[2].join_rate = Some(30.0);
        let age = Duration::from_secs(2);
        // 40/s listed + 1000 users over a 4 s window.
        let context = Context::reconnecting(&list, "ws://s0/", age, Duration::from_secs(4));
        assert_eq!(context.arrival_rate, Some(290.0));
        assert_eq!(context.list_age, age);
        // A window shorter than the list's age: all 1000 are in flight, 1000 / 2 s.
        let context = Context::reconnecting(&list, "ws://s0/", age, Duration::ZERO);
        assert_eq!(context.arrival_rate, Some(540.0));
        // Spread over both survivors rather than herding onto one.
        let exclude = ["ws://s0/".to_string()];
        let p = probabilities_with(Policy::Waterfill, &list, &exclude, &context).unwrap();
        assert!(p[0] == 0.0 && (p[1] - 0.5).abs() < 1e-12, "{p:?}");
    }

    #[test]
    fn capacities_compare_fill_fractions() {
        let mut list = farm(&[100, 100]);
        list.servers[0].capacity = Some(1000);
        list.servers[1].capacity = Some(200);
        // Fractions 0.1 and 0.5: the big server is emptier and takes everything on a fresh list.
        let p = probabilities(Policy::Waterfill, &list, &[]).unwrap();
        assert_eq!(p, vec![1.0, 0.0]);
    }

    #[test]
    fn nonsense_rates_count_as_zero() {
        let list = farm(&[3, 1]);
        for rate in [f64::NAN, -5.0, f64::INFINITY] {
            let p = probabilities_with(Policy::Waterfill, &list, &[], &stale(1.0, rate)).unwrap();
            assert_eq!(p, vec![0.0, 1.0], "{rate}");
        }
    }
}
