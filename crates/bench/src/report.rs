//! Results: figures with their spread, grouped in rows and sections, printed as tables and saved
//! as JSON.
//!
//! A [`Figure`] is one quantity measured over several runs: its median, min and max. A [`Row`] is
//! one system (streamfarm or nats-server) under one setting; a [`Section`] is one benchmark.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// One quantity over repeated runs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Figure {
    /// Median of the runs (the mean of the two middle ones for an even count).
    pub median: f64,
    /// Smallest run.
    pub min: f64,
    /// Largest run.
    pub max: f64,
    /// Number of runs.
    pub runs: usize,
}

impl Figure {
    /// The median and spread of `values`; `None` when there are none or one is not finite.
    pub fn of(values: &[f64]) -> Option<Figure> {
        if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Some(Figure {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            runs: n,
        })
    }
}

/// The value at quantile `q` of `sorted`, by nearest rank (the CLI's load runs use the same).
pub use streamfarm_core::stats::quantile;

/// One system under one setting, with its figures by name (units in the name: `_ms`, `_per_s`, …).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    /// `streamfarm` or `nats-server`.
    pub system: String,
    /// The setting, e.g. `S=1000 64 B`.
    pub setting: String,
    /// Figures by name.
    pub figures: BTreeMap<String, Figure>,
    /// Why this row's measurement failed, when it did: its figures are then those of the runs
    /// that finished before the failure (none when the first failed). The other rows and
    /// sections are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

/// Collects the per-run values of a row's figures, then turns them into [`Figure`]s.
#[derive(Debug, Default)]
pub(crate) struct RowBuilder {
    values: BTreeMap<String, Vec<f64>>,
}

impl RowBuilder {
    /// Adds one run's value of `name`.
    pub(crate) fn add(&mut self, name: &str, value: f64) {
        self.values.entry(name.to_string()).or_default().push(value);
    }

    /// The row, with every figure that has finite values.
    pub(crate) fn build(self, system: &str, setting: impl Into<String>) -> Row {
        Row {
            system: system.to_string(),
            setting: setting.into(),
            figures: self
                .values
                .into_iter()
                .filter_map(|(name, values)| Figure::of(&values).map(|f| (name, f)))
                .collect(),
            failed: None,
        }
    }

    /// The row of a measurement that ended in `outcome`: built from the runs that finished, and
    /// marked failed (with the error's whole chain) when `outcome` is an error. Printed at once,
    /// so a failure is seen when it happens.
    pub(crate) fn finish(
        self,
        system: &str,
        setting: impl Into<String>,
        outcome: anyhow::Result<()>,
    ) -> Row {
        let mut row = self.build(system, setting);
        if let Err(err) = outcome {
            let why = format!("{err:#}");
            eprintln!("failed: {} {}: {why}", row.system, row.setting);
            row.failed = Some(why);
        }
        row
    }
}

/// One benchmark's results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Section {
    /// One row per system and setting.
    pub rows: Vec<Row>,
    /// What a reader must know: limits hit, what was skipped and why, ratios, targets.
    pub notes: Vec<String>,
}

impl Section {
    /// Whether a row or the whole section failed.
    pub fn has_failure(&self) -> bool {
        self.rows.iter().any(|r| r.failed.is_some())
            || self.notes.iter().any(|n| n.starts_with("failed:"))
    }

    /// The median of `figure` in the first row of `system` whose setting is `setting`.
    pub fn median(&self, system: &str, setting: &str, figure: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.system == system && r.setting == setting)
            .and_then(|r| r.figures.get(figure))
            .map(|f| f.median)
    }

    /// The section as a plain-text table: one line per row and figure.
    pub fn render(&self, title: &str) -> String {
        let mut out = format!("== {title} ==\n");
        let _ = writeln!(
            out,
            "{:<12} {:<32} {:<32} {:>12} {:>25}",
            "system", "setting", "figure", "median", "spread (min-max)"
        );
        for row in &self.rows {
            for (name, f) in &row.figures {
                let _ = writeln!(
                    out,
                    "{:<12} {:<32} {:<32} {:>12} {:>25}",
                    row.system,
                    row.setting,
                    name,
                    number(f.median),
                    format!("{}-{} (n={})", number(f.min), number(f.max), f.runs)
                );
            }
            if let Some(why) = &row.failed {
                let _ = writeln!(out, "{:<12} {:<32} FAILED: {why}", row.system, row.setting);
            }
        }
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out
    }
}

/// A number as a person reads it: integers for big values, three significant digits otherwise.
pub fn number(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Where the benchmarks ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// `MemTotal` of /proc/meminfo, KiB.
    pub memory_kib: u64,
    /// /proc/version.
    pub kernel: String,
    /// /proc/loadavg when the run started: the machine is shared, so this says how noisy it was.
    pub loadavg_at_start: String,
    /// The soft and hard RLIMIT_NOFILE the run had.
    pub nofile_limit: (u64, u64),
}

impl Machine {
    /// Reads /proc.
    pub fn detect() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("")
            .trim()
            .to_string();
        let memory_kib = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_kib,
            kernel: read("/proc/version").trim().to_string(),
            loadavg_at_start: read("/proc/loadavg").trim().to_string(),
            nofile_limit: rlimit::Resource::NOFILE.get().unwrap_or((0, 0)),
        }
    }
}

/// Everything one `streamfarm bench` run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// The nats-server version beside which it ran, or `None` when none was found.
    pub nats_server: Option<String>,
    /// Whether this was a `--quick` smoke run (tiny sizes, figures meaningless).
    pub quick: bool,
    /// Results by benchmark name (`idle`, `fanout`, `cross-node`, `failover`, `convergence`,
    /// `connect-cost`).
    pub sections: BTreeMap<String, Section>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figure_is_median_and_spread() {
        let f = Figure::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((f.median, f.min, f.max, f.runs), (2.0, 1.0, 3.0, 3));
        assert_eq!(Figure::of(&[1.0, 2.0, 3.0, 10.0]).unwrap().median, 2.5);
        assert!(Figure::of(&[]).is_none());
        assert!(Figure::of(&[1.0, f64::NAN]).is_none());
    }

    #[test]
    fn a_failed_row_keeps_the_finished_runs_and_says_why() {
        let mut row = RowBuilder::default();
        row.add("rate_per_s", 10.0);
        let row = row.finish("nats-server", "S=10", Err(anyhow::anyhow!("timed out")));
        assert_eq!(row.figures["rate_per_s"].runs, 1);
        assert_eq!(row.failed.as_deref(), Some("timed out"));
        let section = Section {
            rows: vec![row],
            notes: Vec::new(),
        };
        assert!(section.has_failure());
        assert!(section.render("x").contains("FAILED: timed out"));
        let json = serde_json::to_string(&section).unwrap();
        let back: Section = serde_json::from_str(&json).unwrap();
        assert_eq!(back.rows[0].failed.as_deref(), Some("timed out"));
        let ok = RowBuilder::default().finish("a", "b", Ok(()));
        assert!(!serde_json::to_string(&ok).unwrap().contains("failed"));
    }
}
