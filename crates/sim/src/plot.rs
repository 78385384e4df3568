//! Users per server over time of one run, drawn with `plotters` as SVG.

use std::path::Path;

use plotters::prelude::*;

use crate::Outcome;

/// The plot could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the plot {path}: {message}")]
pub struct PlotError {
    /// The file asked for.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// Draws users per server over time for `outcome` into `path` (SVG; the name should end `.svg`).
pub fn svg(outcome: &Outcome, path: &Path) -> Result<(), PlotError> {
    let fail = |message: String| PlotError {
        path: path.display().to_string(),
        message,
    };
    if path.extension().and_then(|e| e.to_str()) != Some("svg") {
        return Err(fail(
            "only SVG is supported: give a file name ending in .svg".into(),
        ));
    }
    draw(
        outcome,
        SVGBackend::new(path, (1000, 560)).into_drawing_area(),
    )
    .map_err(|e| fail(e.to_string()))
}

fn draw<DB: DrawingBackend>(
    outcome: &Outcome,
    root: DrawingArea<DB, plotters::coord::Shift>,
) -> Result<(), Box<dyn std::error::Error + '_>>
where
    DB::ErrorType: 'static,
{
    let samples = &outcome.trace.samples;
    let end = samples.last().map_or(1.0, |s| s.time).max(1e-9);
    let top = samples
        .iter()
        .flat_map(|s| s.users.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.05;
    root.fill(&WHITE)?;
    let title = format!(
        "{} with {}: users per server (seed {})",
        outcome.scenario.kind, outcome.policy, outcome.seed
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..end, 0.0..top)?;
    chart
        .configure_mesh()
        .x_desc("simulated time (s)")
        .y_desc("connected users")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()?;
    let servers = samples.first().map_or(0, |s| s.users.len());
    for i in 0..servers {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                samples.iter().map(|s| (s.time, s.users[i] as f64)),
                color.stroke_width(2),
            ))?
            .label(format!("s{i}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
