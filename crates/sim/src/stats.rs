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
    /// Only for `scale-out`.
    pub new_server: Option<NewServer>,
}

impl Summary {
    /// Summarises a run of `scenario`.
    pub fn of(scenario: &Scenario, trace: &Trace) -> Summary {
        let last = trace.samples.last().expect("a run has a final sample");
        let end = Balance::of(last);
        let worst = trace
            .samples
            .iter()
            .filter(|s| s.time >= scenario.perturbation_at)
            .map(Balance::of)
            .fold(None::<Balance>, |worst, b| match worst {
                Some(w) if w.max_over_mean >= b.max_over_mean => Some(w),
                _ => Some(b),
            })
            .unwrap_or(end);
        let new_server = (scenario.kind == ScenarioKind::ScaleOut).then(|| {
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
                reached_95_at: trace
                    .samples
                    .iter()
                    .find(|s| s.up[new] && share(s) >= 0.95)
                    .map(|s| s.time),
                peak_share: trace.samples.iter().map(share).fold(0.0, f64::max),
            }
        });
        Summary {
            end,
            worst,
            new_server,
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
