//! A hand-written SVG line chart of cumulative regret against round, one line per policy.

use std::fmt::Write as _;

use super::report::{downsample, EnvironmentReport};

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 500.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 200.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// A step for axis ticks: 1, 2 or 5 times a power of ten, giving about `target` ticks.
fn nice_step(max: f64, target: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / target;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let m = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn label(v: f64) -> String {
    if v == v.round() {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// The chart for one environment's report as an SVG document.
pub fn regret_svg(report: &EnvironmentReport) -> String {
    let rounds = report.rounds.max(1) as f64;
    let y_max = report
        .runs
        .iter()
        .filter_map(|r| r.regret_curve.last().copied())
        .chain(
            report
                .runs
                .iter()
                .flat_map(|r| r.regret_curve.iter().copied()),
        )
        .fold(0.0f64, f64::max);
    let y_step = nice_step(y_max, 6.0);
    let y_top = ((y_max / y_step).ceil() * y_step).max(y_step);
    let x_step = nice_step(rounds, 8.0);
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let px = |round: f64| LEFT + round / rounds * plot_w;
    let py = |v: f64| TOP + plot_h - v / y_top * plot_h;

    let mut s = String::new();
    // The xmlns value is SVG's namespace identifier, which viewers require; it is not fetched.
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="15">Cumulative regret per device: {} ({} devices, seed {})</text>"#,
        LEFT + plot_w / 2.0,
        escape(&report.environment),
        report.devices,
        report.seed
    );
    // Grid and ticks.
    let mut v = 0.0;
    while v <= y_top + y_step * 1e-9 {
        let y = py(v);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            y + 4.0,
            label(v)
        );
        v += y_step;
    }
    let mut r = 0.0;
    while r <= rounds + x_step * 1e-9 {
        let x = px(r);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#f0f0f0"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + plot_h,
            TOP + plot_h + 16.0,
            label(r)
        );
        r += x_step;
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">round</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">cumulative regret</text>"#,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    // Lines and legend.
    for (k, run) in report.runs.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let points: Vec<String> = downsample(&run.regret_curve, 400)
            .into_iter()
            .map(|(i, v)| format!("{:.1},{:.1}", px((i + 1) as f64), py(v)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{}"/>"#,
            points.join(" ")
        );
        let ly = TOP + 10.0 + 20.0 * k as f64;
        let lx = LEFT + plot_w + 14.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{} ({:.0})</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            escape(&run.name),
            run.final_regret
        );
    }
    s.push_str("</svg>\n");
    s
}
