//! What happens to the farm in a run: the five scenarios, their parameters and defaults.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// The kinds of perturbation the simulator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScenarioKind {
    /// Arrivals onto an empty farm, nobody leaves.
    Steady,
    /// One empty server added to a loaded farm, then arrivals (the quick model of `DESIGN.md`).
    ScaleOut,
    /// A loaded farm loses a node; its clients all reconnect within the reconnect window.
    Failure,
    /// Every node of a loaded farm with churn is restarted in turn.
    Rolling,
    /// Clients leave as well as arrive: an empty farm fills to a steady population.
    Churn,
    /// One empty server added to a loaded farm, and no arrivals: only rebalancing can fill it.
    ScaleOutIdle,
    /// Half the servers (group A, preferred) are down, the other half (group B) hold every
    /// client; group A comes back, and no client arrives: only rebalancing sends them back.
    Failback,
}

impl ScenarioKind {
    /// Every scenario, in the order of the default run.
    pub const ALL: [ScenarioKind; 5] = [
        ScenarioKind::Steady,
        ScenarioKind::ScaleOut,
        ScenarioKind::Failure,
        ScenarioKind::Rolling,
        ScenarioKind::Churn,
    ];

    /// The scenarios of active rebalancing (`streamfarm sim --rebalance`): the farm out of
    /// balance with no arrivals to fix it, and a rolling restart.
    pub const REBALANCING: [ScenarioKind; 3] = [
        ScenarioKind::ScaleOutIdle,
        ScenarioKind::Rolling,
        ScenarioKind::Failback,
    ];

    /// Every scenario there is.
    pub const EVERY: [ScenarioKind; 7] = [
        ScenarioKind::Steady,
        ScenarioKind::ScaleOut,
        ScenarioKind::Failure,
        ScenarioKind::Rolling,
        ScenarioKind::Churn,
        ScenarioKind::ScaleOutIdle,
        ScenarioKind::Failback,
    ];

    /// The scenario's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::Steady => "steady",
            ScenarioKind::ScaleOut => "scale-out",
            ScenarioKind::Failure => "failure",
            ScenarioKind::Rolling => "rolling",
            ScenarioKind::Churn => "churn",
            ScenarioKind::ScaleOutIdle => "scale-out-idle",
            ScenarioKind::Failback => "failback",
        }
    }
}

impl fmt::Display for ScenarioKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ScenarioKind {
    type Err = ScenarioError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ScenarioKind::EVERY
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| ScenarioError::UnknownScenario(s.to_string()))
    }
}

/// A scenario that cannot be run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The name is not one of [`ScenarioKind::ALL`].
    #[error(
        "unknown scenario {0:?}: expected one of steady, scale-out, failure, rolling, churn, scale-out-idle, failback"
    )]
    UnknownScenario(String),
    /// A knob is out of range for this scenario.
    #[error("{scenario}: {knob} = {value} is out of range: {expected}")]
    OutOfRange {
        /// The scenario.
        scenario: ScenarioKind,
        /// The knob (its command-line name).
        knob: &'static str,
        /// The value given.
        value: f64,
        /// What is allowed.
        expected: &'static str,
    },
}

/// Overrides of a scenario's defaults: the command line's knobs. `None` keeps the default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Knobs {
    /// Servers in the farm (scale-out: counting the one added).
    pub servers: Option<usize>,
    /// New clients: the arrivals of `steady` and `scale-out`, the steady population of `churn`.
    pub clients: Option<u64>,
    /// Users per server at the start of `scale-out`, `failure` and `rolling`.
    pub load: Option<u64>,
    /// Arrivals of new clients per second.
    pub rate: Option<f64>,
    /// Age of the list a client selects from, in seconds.
    pub staleness: Option<f64>,
    /// Clients of a lost node reconnect at uniform random times within this many seconds.
    pub reconnect_window: Option<f64>,
    /// Whether reconnecting clients tell the policy about the surge (default true; see
    /// [`Scenario::reconnect_hint`]).
    pub reconnect_hint: Option<bool>,
    /// Whether the nodes rebalance actively (default false; see [`Rebalancing`]).
    pub rebalance: Option<bool>,
}

/// Active rebalancing as the nodes do it (`crates/node/src/rebalance.rs`), with their defaults:
/// every `tick`, each up server plans with `streamfarm_core::balance` on its (stale) list, its
/// own row exact, and tells at most `rate` clients a second of its surplus to move; a moved
/// client arrives `migration` seconds later (make-before-break: it stays counted on its old
/// server until then). Connections younger than `cooldown` are not moved, and a server that
/// received a moved client within it sends none (unless its share is 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rebalancing {
    /// Moves per second per server.
    pub rate: f64,
    /// Fraction above its share a server may hold.
    pub tolerance: f64,
    /// Seconds: no connection younger is moved; no server that received within it sends.
    pub cooldown: f64,
    /// Seconds between two looks at the plan (jittered ±20 %).
    pub tick: f64,
    /// Seconds from the `migrate` to the switch.
    pub migration: f64,
}

impl Default for Rebalancing {
    fn default() -> Self {
        Rebalancing {
            rate: 50.0,
            tolerance: 0.03,
            cooldown: 10.0,
            tick: 0.25,
            migration: 0.05,
        }
    }
}

/// Everything that defines a run apart from the policy and the seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    /// Which perturbation.
    pub kind: ScenarioKind,
    /// Servers in the farm; in `scale-out` the last one is the server added.
    pub servers: usize,
    /// Users on each server at the start (`scale-out`: on each server but the new one).
    pub load: u64,
    /// New clients arriving, at most (`steady`, `scale-out`); `None`: arrivals go on to the end.
    pub arrivals: Option<u64>,
    /// New clients per second (a Poisson process).
    pub rate: f64,
    /// Mean client lifetime in seconds (exponential), when clients leave.
    pub lifetime: Option<f64>,
    /// How long the run lasts, in seconds of simulated time (arrivals may run a little past it).
    pub duration: f64,
    /// Age in seconds of the list every client selects from: the farm as it was that long ago.
    pub staleness: f64,
    /// Seconds over which a lost node's clients reconnect (full jitter).
    pub reconnect_window: f64,
    /// Whether a client that lost its server selects with
    /// [`Context::reconnecting`](streamfarm_core::selection::Context::reconnecting) (the list's
    /// join rate plus the lost server's users over the reconnect window) rather than with the
    /// list's join rate alone. Only `waterfill` reads it.
    pub reconnect_hint: bool,
    /// Seconds over which each server's `join_rate` in the list is averaged.
    pub rate_window: f64,
    /// When the perturbation starts: the node loss, the first restart, the add; for `steady` and
    /// `churn`, when the farm is past its first tenth of arrivals / first client lifetime.
    /// "Worst" statistics are taken from here on.
    pub perturbation_at: f64,
    /// Rolling restart: seconds a node stays down.
    pub downtime: f64,
    /// Rolling restart: seconds between one node going down and the next.
    pub restart_interval: f64,
    /// Active rebalancing, when the nodes do it.
    pub rebalance: Option<Rebalancing>,
}

impl Scenario {
    /// The scenario with its defaults, changed by `knobs`.
    ///
    /// | scenario | defaults |
    /// |---|---|
    /// | `steady` | 10 servers, 100 000 arrivals at 1000/s, lists 2 s old |
    /// | `scale-out` | 9 servers × 10 000 users + 1 empty, 20 000 arrivals at 1000/s, lists 0.5 s old |
    /// | `failure` | 10 × 10 000 users, 100/s arrivals, node 0 lost at 5 s, reconnects within 2 s, lists 2 s old |
    /// | `rolling` | 10 × 10 000 users, 10 min lifetimes (167/s arrivals), a restart every 30 s (10 s down), lists 2 s old |
    /// | `churn` | empty, 500/s arrivals, 100 s lifetimes (50 000 clients), 300 s, lists 2 s old |
    pub fn new(kind: ScenarioKind, knobs: &Knobs) -> Result<Scenario, ScenarioError> {
        let servers = knobs.servers.unwrap_or(10);
        let staleness = knobs.staleness.unwrap_or(match kind {
            ScenarioKind::ScaleOut => 0.5,
            _ => 2.0,
        });
        let load = knobs.load.unwrap_or(10_000);
        let reconnect_window = knobs.reconnect_window.unwrap_or(2.0);
        let mut scenario = Scenario {
            kind,
            servers,
            load: 0,
            arrivals: None,
            rate: 1000.0,
            lifetime: None,
            duration: 0.0,
            staleness,
            reconnect_window,
            reconnect_hint: knobs.reconnect_hint.unwrap_or(true),
            rate_window: 1.0,
            perturbation_at: 0.0,
            downtime: 10.0,
            restart_interval: 30.0,
            rebalance: knobs.rebalance.unwrap_or(false).then(Rebalancing::default),
        };
        match kind {
            ScenarioKind::Steady | ScenarioKind::ScaleOut => {
                let (clients, rate) = match kind {
                    ScenarioKind::Steady => (100_000, 1000.0),
                    _ => (20_000, 1000.0),
                };
                let clients = knobs.clients.unwrap_or(clients);
                scenario.rate = knobs.rate.unwrap_or(rate);
                scenario.arrivals = Some(clients);
                scenario.duration = clients as f64 / scenario.rate;
                if kind == ScenarioKind::Steady {
                    scenario.perturbation_at = scenario.duration / 10.0;
                } else {
                    scenario.load = load;
                }
            }
            ScenarioKind::Failure => {
                scenario.load = load;
                scenario.rate = knobs.rate.unwrap_or(100.0);
                scenario.perturbation_at = 5.0;
                scenario.duration = scenario.perturbation_at + reconnect_window + 15.0;
            }
            ScenarioKind::Rolling => {
                scenario.load = load;
                // Arrivals balance departures: the population stays near servers × load.
                let population = (servers as u64 * load) as f64;
                scenario.rate = knobs.rate.unwrap_or(population / 600.0);
                scenario.lifetime = Some(population / scenario.rate);
                scenario.perturbation_at = 5.0;
                scenario.duration = scenario.perturbation_at
                    + servers as f64 * scenario.restart_interval
                    + scenario.restart_interval;
            }
            ScenarioKind::ScaleOutIdle | ScenarioKind::Failback => {
                scenario.load = load;
                scenario.arrivals = Some(0);
                scenario.perturbation_at = if kind == ScenarioKind::Failback {
                    5.0
                } else {
                    0.0
                };
                // Ten minutes after the change: long enough to see any ping-pong.
                scenario.duration = scenario.perturbation_at + 600.0;
            }
            ScenarioKind::Churn => {
                scenario.rate = knobs.rate.unwrap_or(500.0);
                let population = knobs.clients.unwrap_or(50_000) as f64;
                let lifetime = population / scenario.rate;
                scenario.lifetime = Some(lifetime);
                scenario.perturbation_at = lifetime;
                scenario.duration = 3.0 * lifetime;
            }
        }
        scenario.check()?;
        Ok(scenario)
    }

    fn check(&self) -> Result<(), ScenarioError> {
        let out = |knob, value: f64, expected| ScenarioError::OutOfRange {
            scenario: self.kind,
            knob,
            value,
            expected,
        };
        let least = match self.kind {
            ScenarioKind::Steady | ScenarioKind::Churn => 1,
            _ => 2,
        };
        if self.servers < least || self.servers > 10_000 {
            let expected = if least == 1 {
                "1 to 10000"
            } else {
                "2 to 10000 (a server must remain)"
            };
            return Err(out("servers", self.servers as f64, expected));
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(out(
                "rate",
                self.rate,
                "a positive number of arrivals per second",
            ));
        }
        if !(self.staleness.is_finite() && self.staleness >= 0.0) {
            return Err(out("staleness", self.staleness, "0 or more seconds"));
        }
        if !(self.reconnect_window.is_finite() && self.reconnect_window >= 0.0) {
            return Err(out("window", self.reconnect_window, "0 or more seconds"));
        }
        let idle = matches!(
            self.kind,
            ScenarioKind::ScaleOutIdle | ScenarioKind::Failback
        );
        if self.arrivals == Some(0) && !idle {
            return Err(out("clients", 0.0, "at least 1"));
        }
        if self.kind == ScenarioKind::Failback && !self.servers.is_multiple_of(2) {
            return Err(out(
                "servers",
                self.servers as f64,
                "an even number (half in group A, half in group B)",
            ));
        }
        // A cap on simulated work, so a typo does not run for hours.
        let events = self.rate * self.duration + (self.servers as u64 * self.load) as f64;
        if events > 5e7 {
            return Err(out(
                "clients",
                events,
                "at most 50 million clients and arrivals in a run",
            ));
        }
        Ok(())
    }

    /// A one-line description of the run, for table headings.
    pub fn describe(&self) -> String {
        let s = self.servers;
        let stale = format!("lists {} s old", self.staleness);
        match self.kind {
            ScenarioKind::Steady => format!(
                "{s} empty servers, {} arrivals at {}/s, {stale}",
                self.arrivals.unwrap_or(0),
                self.rate
            ),
            ScenarioKind::ScaleOut => format!(
                "{} servers × {} users + 1 empty added at 0 s, {} arrivals at {}/s, {stale}",
                s - 1,
                self.load,
                self.arrivals.unwrap_or(0),
                self.rate
            ),
            ScenarioKind::Failure => format!(
                "{s} servers × {} users, {}/s arrivals, node 0 lost at {} s, its clients reconnect within {} s, {stale}",
                self.load, self.rate, self.perturbation_at, self.reconnect_window
            ),
            ScenarioKind::Rolling => format!(
                "{s} servers × {} users, {:.0} s lifetimes with {:.0}/s arrivals, node i down at {} + {}·i s for {} s (clients reconnect within {} s), {stale}",
                self.load,
                self.lifetime.unwrap_or(0.0),
                self.rate,
                self.perturbation_at,
                self.restart_interval,
                self.downtime,
                self.reconnect_window
            ),
            ScenarioKind::Churn => format!(
                "{s} empty servers, {}/s arrivals, {:.0} s mean lifetime ({:.0} clients at steady state), {:.0} s, {stale}",
                self.rate,
                self.lifetime.unwrap_or(0.0),
                self.rate * self.lifetime.unwrap_or(0.0),
                self.duration
            ),
            ScenarioKind::ScaleOutIdle => format!(
                "{} servers × {} users + 1 empty added at 0 s, no arrivals, {:.0} s, {stale}",
                s - 1,
                self.load,
                self.duration
            ),
            ScenarioKind::Failback => format!(
                "{} group-A servers down, {} group-B servers × {} users; group A back at {} s, no arrivals, {:.0} s, {stale}",
                s / 2,
                s / 2,
                self.load,
                self.perturbation_at,
                self.duration
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_out_defaults_are_the_quick_model() {
        let s = Scenario::new(ScenarioKind::ScaleOut, &Knobs::default()).unwrap();
        assert_eq!((s.servers, s.load, s.arrivals), (10, 10_000, Some(20_000)));
        assert_eq!(s.staleness, 0.5);
    }

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for kind in ScenarioKind::ALL {
            assert_eq!(kind.name().parse::<ScenarioKind>().unwrap(), kind);
        }
        let err = "meltdown".parse::<ScenarioKind>().unwrap_err();
        assert!(err.to_string().contains("scale-out"), "{err}");
    }

    #[test]
    fn out_of_range_knobs_name_the_knob() {
        let knobs = Knobs {
            servers: Some(1),
            ..Knobs::default()
        };
        let err = Scenario::new(ScenarioKind::Failure, &knobs).unwrap_err();
        assert!(err.to_string().contains("servers = 1"), "{err}");
        let knobs = Knobs {
            rate: Some(-3.0),
            ..Knobs::default()
        };
        let err = Scenario::new(ScenarioKind::Steady, &knobs).unwrap_err();
        assert!(err.to_string().contains("rate"), "{err}");
    }
}
