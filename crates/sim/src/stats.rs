//! Balance figures of a run: how evenly users sit on the servers that are up.

use serde::Serialize;

use crate::engine::{Sample, Trace};
use crate::scenario::{Scenario, ScenarioKind};

/// The spread of users over the servers that are up, at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Balance {
    /// Simulated seconds since the start.
    pub time: f64,
    /// Most users on one up server, over the mean of the up servers.
    pub max_over_mean: f64,
    /// Fewest users on one up server, over the mean.
    pub min_over_mean: f64,
    /// Coefficient of variation: standard deviation (population) over mean.
    pub cv: f64,
    /// Mean users per up server.
    pub mean: f64,
}

impl Balance {
    /// The balance of one sample. An empty farm (or none up) counts as perfectly balanced.
    pub fn of(sample: &Sample) -> Balance {
        let live: Vec<f64> = sample
            .users
            .iter()
            .zip(&sample.up)
            .filter(|(_, up)| **up)
            .map(|(&u, _)| u as f64)
            .collect();
        let n = live.len() as f64;
        let mean = live.iter().sum::<f64>() / n;
        if live.is_empty() || mean == 0.0 {
            return Balance {
                time: sample.time,
                max_over_mean: 1.0,
                min_over_mean: 1.0,
                cv: 0.0,
                mean: 0.0,
            };
        }
        let max = live.iter().copied().fold(f64::MIN, f64::max);
        let min = live.iter().copied().fold(f64::MAX, f64::min);
        let variance = live.iter().map(|u| (u - mean).powi(2)).sum::<f64>() / n;
        Balance {
            time: sample.time,
            max_over_mean: max / mean,
            min_over_mean: min / mean,
            cv: variance.sqrt() / mean,
            mean,
        }
    }
}

/// How the server added by `scale-out` filled.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NewServer {
    /// Its users over the mean of the up servers, at the end.
    pub share_at_end: f64,
    /// When it first held 95 % of the mean (seconds), if it did.
    pub reached_95_at: Option<f64>,
    /// The most it held over the mean at any sample: above 1, it overshot.
    pub peak_share: f64,
}

/// The figures of one run, as the tables show them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    /// At the end of the run.
    pub end: Balance,
    /// The worst point: the sample, from the perturbation on, with the highest max/mean (the
    /// first such sample on a tie). Its min/mean and cv are those of that same moment.
    pub worst: Balance,
    /// Only for `scale-out` and `scale-out-idle`.
    pub new_server: Option<NewServer>,
    /// Only with rebalancing: what the moves did.
    pub moves: Option<Moves>,
}

/// What active rebalancing did in a run.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Moves {
    /// Clients moved.
    pub moved: u64,
    /// The fewest moves that would have evened the farm out after the perturbation (0 when the
    /// scenario has no single perturbation to count from).
    pub minimal: u64,
    /// When the farm was first balanced after the perturbation: the new server at 95 % of the
    /// mean (`scale-out-idle`), group B empty (`failback`); none if never.
    pub balanced_at: Option<f64>,
    /// Moves in the last five minutes of the run (the second half of the ten minutes after the
    /// perturbation): churn in a farm that has long been even, which must be none.
    pub last_5_min: u64,
    /// Moves to a server that had sent one within the cooldown, or from one that had received
    /// one within it: ping-pong.
    pub reversals: u64,
}

impl Summary {
    /// Summarises a run of `scenario`.
    pub fn of(scenario: &Scenario, trace: &Trace) -> Summary {
        if scenario.kind == ScenarioKind::Failback {
            // Group B is meant to empty: balance is group A's.
            let a_only: Vec<Sample> = trace
                .samples
                .iter()
                .map(|s| {
                    let mut s = s.clone();
                    for up in &mut s.up[scenario.servers / 2..] {
                        *up = false;
                    }
                    s
                })
                .collect();
            let mut summary = Summary::of_samples(scenario, &a_only, trace);
            if let Some(moves) = &mut summary.moves {
                let b_empty = trace.samples.iter().find(|s| {
                    s.time >= scenario.perturbation_at
                        && s.users[scenario.servers / 2..].iter().all(|&u| u == 0)
                });
                moves.balanced_at = b_empty.map(|s| s.time);
            }
            return summary;
        }
        Summary::of_samples(scenario, &trace.samples, trace)
    }

    fn of_samples(scenario: &Scenario, samples: &[Sample], trace: &Trace) -> Summary {
        let last = samples.last().expect("a run has a final sample");
        let end = Balance::of(last);
        let worst = samples
            .iter()
            .filter(|s| s.time >= scenario.perturbation_at)
            .map(Balance::of)
            .fold(None::<Balance>, |worst, b| match worst {
                Some(w) if w.max_over_mean >= b.max_over_mean => Some(w),
                _ => Some(b),
            })
            .unwrap_or(end);
        let new_server = matches!(
            scenario.kind,
            ScenarioKind::ScaleOut | ScenarioKind::ScaleOutIdle
        )
        .then(|| {
            let new = scenario.servers - 1;
            let share = |s: &Sample| {
                let mean = Balance::of(s).mean;
                if mean > 0.0 {
                    s.users[new] as f64 / mean
                } else {
                    0.0
                }
            };
            NewServer {
                share_at_end: share(last),
                reached_95_at: samples
                    .iter()
                    .find(|s| s.up[new] && share(s) >= 0.95)
                    .map(|s| s.time),
                peak_share: samples.iter().map(share).fold(0.0, f64::max),
            }
        });
        let moves = scenario.rebalance.map(|_| {
            let five_min_before_end = last.time - 300.0;
            let then = samples
                .iter()
                .find(|s| s.time >= five_min_before_end)
                .map_or(0, |s| s.moves);
            Moves {
                moved: trace.counts.moves,
                minimal: trace.counts.minimal_moves,
                balanced_at: new_server.and_then(|n| n.reached_95_at),
                last_5_min: trace.counts.moves - then,
                reversals: trace.counts.reversals,
            }
        });
        Summary {
            end,
            worst,
            new_server,
            moves,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(users: &[u64], up: &[bool]) -> Sample {
        Sample {
            time: 1.0,
            users: users.to_vec(),
            up: up.to_vec(),
            moves: 0,
        }
    }

    #[test]
    fn balance_counts_only_up_servers() {
        let b = Balance::of(&sample(&[90, 110, 0], &[true, true, false]));
        assert_eq!(b.mean, 100.0);
        assert!((b.max_over_mean - 1.1).abs() < 1e-12 && (b.min_over_mean - 0.9).abs() < 1e-12);
        assert!((b.cv - 0.1).abs() < 1e-12);
    }

    #[test]
    fn an_empty_farm_is_balanced() {
        let b = Balance::of(&sample(&[0, 0], &[true, true]));
        assert_eq!((b.max_over_mean, b.min_over_mean, b.cv), (1.0, 1.0, 0.0));
    }
}
