//! The regret chart of one environment's report: cumulative regret against round, one line per
//! policy, drawn by the workspace's chart writer (`charts`).

use charts::{Chart, Series};

use super::report::{downsample, EnvironmentReport};

/// The most points drawn per policy line.
const MAX_POINTS: usize = 400;

/// The chart for one environment's report as an SVG document; each legend entry carries the
/// policy's final cumulative regret.
pub fn regret_svg(report: &EnvironmentReport) -> String {
    let series = report
        .runs
        .iter()
        .map(|run| Series {
            name: format!("{} ({:.0})", run.name, run.final_regret),
            points: downsample(&run.regret_curve, MAX_POINTS)
                .into_iter()
                .map(|(i, v)| ((i + 1) as f64, v))
                .collect(),
        })
        .collect();
    charts::render(&[Chart {
        title: format!(
            "Cumulative regret per device: {} ({} devices, seed {})",
            report.environment, report.devices, report.seed
        ),
        x_label: "round".into(),
        y_label: "cumulative regret".into(),
        series,
        target: None,
    }])
}
