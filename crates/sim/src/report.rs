//! Outcomes as Markdown tables (one per scenario, a row per policy) and as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::Outcome;
use crate::engine::Counts;
use crate::scenario::{Scenario, ScenarioKind};
use crate::stats::Summary;

/// Markdown: a heading per scenario, its description, and a table with a row per policy.
pub fn markdown(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let mut rest = outcomes;
    while let Some(first) = rest.first() {
        // One table per scenario: runs with and without rebalancing side by side.
        let same = rest
            .iter()
            .take_while(|o| o.scenario.kind == first.scenario.kind)
            .count();
        let (group, tail) = rest.split_at(same);
        table(&mut out, &first.scenario, group);
        rest = tail;
    }
    out
}

fn table(out: &mut String, scenario: &Scenario, group: &[Outcome]) {
    let kind = scenario.kind;
    let _ = writeln!(
        out,
        "### {kind}\n\n{} (seed {}).\n",
        scenario.describe(),
        group[0].seed
    );
    let mut head = String::from(
        "| policy | end max/mean | end min/mean | end cv | worst at (s) | worst max/mean | worst min/mean | worst cv |",
    );
    let mut rule = String::from("|---|---:|---:|---:|---:|---:|---:|---:|");
    match kind {
        ScenarioKind::ScaleOut => {
            head.push_str(" new/mean at end | new ≥ 0.95·mean at (s) | new/mean peak |");
            rule.push_str("---:|---:|---:|");
        }
        ScenarioKind::Failure | ScenarioKind::Rolling => {
            head.push_str(" failed picks / disconnected |");
            rule.push_str("---:|");
        }
        ScenarioKind::ScaleOutIdle
        | ScenarioKind::Failback
        | ScenarioKind::Steady
        | ScenarioKind::Churn => {}
    }
    let rebalancing = group.iter().any(|o| o.summary.moves.is_some());
    if rebalancing {
        head.push_str(" balanced at (s) | moves | minimal | moves/minimal | moves in the last 5 min | reversals |");
        rule.push_str("---:|---:|---:|---:|---:|---:|");
    }
    let _ = writeln!(out, "{head}\n{rule}");
    for o in group {
        let (e, w) = (o.summary.end, o.summary.worst);
        let policy = match o.scenario.rebalance {
            Some(_) => format!("{} + rebalancing", o.policy),
            None => o.policy.to_string(),
        };
        let _ = write!(
            out,
            "| {policy} | {:.3} | {:.3} | {:.4} | {:.1} | {:.3} | {:.3} | {:.4} |",
            e.max_over_mean, e.min_over_mean, e.cv, w.time, w.max_over_mean, w.min_over_mean, w.cv
        );
        match (kind, o.summary.new_server) {
            (ScenarioKind::ScaleOut, Some(new)) => {
                let reached = new
                    .reached_95_at
                    .map_or_else(|| "never".to_string(), |t| format!("{t:.1}"));
                let _ = write!(
                    out,
                    " {:.3} | {reached} | {:.3} |",
                    new.share_at_end, new.peak_share
                );
            }
            (ScenarioKind::Failure | ScenarioKind::Rolling, _) => {
                let c = o.trace.counts;
                let per = c.failed_attempts as f64 / c.disconnected.max(1) as f64;
                let _ = write!(out, " {per:.3} |");
            }
            _ => {}
        }
        if rebalancing {
            match o.summary.moves {
                Some(m) => {
                    let at = m
                        .balanced_at
                        .map_or_else(|| "never".to_string(), |t| format!("{t:.1}"));
                    let (minimal, ratio) = if m.minimal > 0 {
                        (
                            m.minimal.to_string(),
                            format!("{:.3}", m.moved as f64 / m.minimal as f64),
                        )
                    } else {
                        ("-".to_string(), "-".to_string())
                    };
                    let _ = write!(
                        out,
                        " {at} | {} | {minimal} | {ratio} | {} | {} |",
                        m.moved, m.last_5_min, m.reversals
                    );
                }
                None => out.push_str(" - | 0 | - | - | - | - |"),
            }
        }
        out.push('\n');
    }
    out.push('\n');
}

#[derive(Serialize)]
struct Row<'a> {
    scenario: &'a Scenario,
    policy: String,
    seed: u64,
    summary: &'a Summary,
    counts: &'a Counts,
}

/// JSON: an array with one object per run — scenario parameters, policy, seed, summary, counts.
pub fn json(outcomes: &[Outcome]) -> String {
    let rows: Vec<Row<'_>> = outcomes
        .iter()
        .map(|o| Row {
            scenario: &o.scenario,
            policy: o.policy.to_string(),
            seed: o.seed,
            summary: &o.summary,
            counts: &o.trace.counts,
        })
        .collect();
    serde_json::to_string_pretty(&rows).expect("plain data serialises")
}
