//! The `waterfill` policy: pick towards the level that the list's in-flight arrivals will reach.
//!
//! A list `t` seconds old misses the clients who joined in those `t` seconds, and every client
//! that selects from it before a newer list shows its own arrival is in the same position. If
//! they all took the emptiest server (least-users) they would land on it together and overshoot:
//! the herd. Waterfill instead treats the `A = rate × t` clients that will arrive on the same view
//! of the farm, plus this one, as water poured over the servers' loads:
//!
//! 1. `rate` is [`Context::arrival_rate`] when the client gives it, else the sum of the candidates'
//!    `join_rate` fields (servers that do not say count 0); `t` is [`Context::list_age`] plus the
//!    age of the counts (`users_age_ms`, after they are brought to one instant).
//!    When the list states `in_flight` (the lists its server handed out since its counts, this
//!    one included), `A + 1` is at least that: through one list server it is every client in
//!    flight, known at once, where a join rate lags a burst by its window.
//! 2. Find the level `L` with `Σ max(0, L − u_i) = A + 1` over the candidates' users `u_i`.
//! 3. Choose server `i` with probability `max(0, L − u_i) / (A + 1)`: the emptiest servers get the
//!    most, servers above the level get nothing, and the expected arrivals bring every server they
//!    touch to the same level at once.

//! 4. **Overshoot guard.** Step 3 assumes the `A` clients in flight were spread the way this pick
//!    is. When the farm changes fast (a new server filling during a flash crowd) they were not:
//!    older lists showed the new server emptier still, so they all went there. A server's own
//!    `join_rate` says how many it has been taking: its projected load `û_i = u_i + join_rate_i·t`.
//!    Each deficit is capped at `w_i·(L + m) − û_i`, with a margin `m = 2(A + 1)/Σw` (two fair
//!    shares of the water per unit of weight), so a server projected past the level by more than
//!    that gets no more clients. In steady state the projections sit within a share of the level
//!    and the cap never binds; it only cuts the overshoot. (If it would leave nobody, it is
//!    dropped.) Projecting every server always, without the margin, was tried and is worse: a
//!    join rate is a noisy count, late by the list's age, and steering on it oscillates.
//!
//! When every candidate states a capacity `c_i`, loads are compared as fractions: the level solves
//! `Σ max(0, c_i·L − u_i) = A + 1`, and the deficit `c_i·L − u_i` is counted in users (`w_i = c_i`
//! above; otherwise `w_i = 1`).
//!
//! With a fresh list (`A = 0`, `t = 0`) the level sits 1/k above the k least-loaded servers and the
//! guard cannot bind, so waterfill is exactly least-users; the staler the list and the busier the
//! farm, the wider it spreads. `BALANCE.md` has what it achieves in the simulator.

use super::Context;
use crate::model::FarmList;

/// The probability of each candidate (in the order of `indices`, which is non-empty), given
/// their `users` at one instant and a context whose age counts from that instant.
pub(super) fn weights(
    list: &FarmList,
    indices: &[usize],
    users: &[f64],
    context: Context,
) -> Vec<f64> {
    let servers: Vec<_> = indices.iter().map(|&i| &list.servers[i]).collect();
    let rate = context
        .arrival_rate
        .unwrap_or_else(|| servers.iter().filter_map(|s| s.join_rate).map(sane).sum());
    let age = context.list_age.as_secs_f64();
    // A list server that says how many lists it handed out since its counts knows the clients
    // in flight through it at once; the join rates take their window to catch up with a burst.
    let water = (sane(rate) * age + 1.0).max(list.in_flight.unwrap_or(0) as f64);
    let by_capacity = servers.iter().all(|s| s.capacity.is_some_and(|c| c > 0));
    let loads: Vec<Load> = servers
        .iter()
        .zip(users)
        .map(|(s, &users)| Load {
            users,
            weight: if by_capacity {
                s.capacity.unwrap_or(1) as f64
            } else {
                1.0
            },
            projected: users + s.join_rate.map_or(0.0, sane) * age,
        })
        .collect();
    let (level, open) = deficits(&loads, water);
    let margin = GUARD_SHARES * water / loads.iter().map(|l| l.weight).sum::<f64>();
    let guarded: Vec<f64> = loads
        .iter()
        .zip(&open)
        .map(|(l, d)| d.min(l.weight * (level + margin) - l.projected).max(0.0))
        .collect();
    let chosen = if guarded.iter().sum::<f64>() > 0.0 {
        guarded
    } else {
        open
    };
    let total: f64 = chosen.iter().sum();
    chosen.iter().map(|d| d / total).collect()
}

/// How many fair shares of the water a server's projected load may exceed the level by before
/// the guard stops sending it clients. Chosen with the simulator: 1 already binds in steady state
/// (and costs balance there), 2 and 3 leave steady state untouched; 2 cuts the flash-crowd
/// overshoot more.
const GUARD_SHARES: f64 = 2.0;

/// A negative, NaN or infinite rate from a list (or a confused client) counts as 0.
fn sane(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

/// One candidate's load: users, the weight its level is measured against (capacity, or 1), and
/// its users projected over the list's age at its own join rate.
struct Load {
    users: f64,
    weight: f64,
    projected: f64,
}

impl Load {
    fn level(&self) -> f64 {
        self.users / self.weight
    }
}

/// The level `L` at which the deficits `max(0, w_i·L − u_i)` add up to `water` (> 0), and those
/// deficits.
///
/// Servers are filled in order of level: with the `k` lowest under water, `L = (water + Σu) / Σw`
/// over those `k`, and `k` grows while the next server's level is below `L`.
fn deficits(loads: &[Load], water: f64) -> (f64, Vec<f64>) {
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
    let deficits = loads
        .iter()
        .map(|l| (l.weight * level - l.users).max(0.0))
        .collect();
    (level, deficits)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::model::test_farm as farm;
    use crate::selection::{Context, Policy, probabilities, probabilities_with};

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
    fn the_guard_holds_back_a_server_that_took_the_in_flight_clients() {
        // 0.5 s at 10 000/s: 5000 in flight + 1 over 8000, 10000, 10000 → level 11000.33, open
        // deficits 3000.33, 1000.33, 1000.33. But s0 took all 10 000/s: projected 13000, above
        // the level by more than the margin 2·5001/3 = 3334 allows, so it is capped at 1334.33.
        let mut list = farm(&[8000, 10_000, 10_000]);
        list.servers[0].join_rate = Some(10_000.0);
        list.servers[1].join_rate = Some(0.0);
        list.servers[2].join_rate = Some(0.0);
        let context = Context::with_age(Duration::from_millis(500));
        let p = probabilities_with(Policy::Waterfill, &list, &[], &context).unwrap();
        let capped = 11_000.0 + 1.0 / 3.0 + 2.0 * 5001.0 / 3.0 - 13_000.0;
        let others = 1000.0 + 1.0 / 3.0;
        let total = capped + 2.0 * others;
        assert!(
            close(&p, &[capped / total, others / total, others / total]),
            "{p:?}"
        );
        // Spread evenly, the same joins leave the guard idle: the open deficits decide.
        for s in &mut list.servers {
            s.join_rate = Some(10_000.0 / 3.0);
        }
        let p = probabilities_with(Policy::Waterfill, &list, &[], &context).unwrap();
        assert!((p[0] - (3000.0 + 1.0 / 3.0) / 5001.0).abs() < 1e-9, "{p:?}");
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
