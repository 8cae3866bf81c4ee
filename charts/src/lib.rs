//! The workspace's one SVG line-chart writer: [`render`] stacks [`Chart`]s (title, axis labels,
//! one polyline per [`Series`], an optional dashed target line) into one document. Used by the
//! simulator's reports and the bandit arena's regret charts. No plotting crate and no
//! dependencies: a chart is a few axes, ticks and polylines.

use std::fmt::Write as _;

const COLOURS: [&str; 10] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart's labels and data.
#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// Optional horizontal reference line (a target), with its label.
    pub target: Option<(f64, String)>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A tick step of 1, 2 or 5 times a power of ten giving about `target` ticks over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let m = match raw / mag {
        x if x <= 1.0 => 1.0,
        x if x <= 2.0 => 2.0,
        x if x <= 5.0 => 5.0,
        _ => 10.0,
    };
    m * mag
}

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    let label = format!("{v:.decimals$}");
    // A tick at (or rounding to) zero from below reads "0", not "-0".
    match label.strip_prefix('-') {
        Some(digits) if digits.chars().all(|c| c == '0' || c == '.') => digits.to_string(),
        _ => label,
    }
}

/// Chart geometry.
const W: f64 = 860.0;
const H: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 210.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 50.0;

/// Draw `chart` into `out` with its top-left corner at `(0, y0)`.
fn draw(out: &mut String, chart: &Chart, y0: f64) {
    let pts = chart
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x_min, mut x_max, mut y_min, mut y_max) = (
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::INFINITY,
        f64::NEG_INFINITY,
    );
    for &(x, y) in pts {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if let Some((t, _)) = chart.target {
        y_min = y_min.min(t);
        y_max = y_max.max(t);
    }
    if !x_min.is_finite() {
        (x_min, x_max, y_min, y_max) = (0.0, 1.0, 0.0, 1.0);
    }
    x_min = x_min.min(0.0);
    if x_max <= x_min {
        x_max = x_min + 1.0;
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-9);
    if y_max - y_min < 1e-9 {
        y_min -= 0.5;
        y_max += 0.5;
    } else {
        y_min -= pad;
        y_max += pad;
    }
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let sx = |x: f64| LEFT + (x - x_min) / (x_max - x_min) * pw;
    let sy = |y: f64| y0 + TOP + ph - (y - y_min) / (y_max - y_min) * ph;
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="15" text-anchor="middle" font-weight="bold">{}</text>"#,
        LEFT + pw / 2.0,
        y0 + 22.0,
        escape(&chart.title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{LEFT}" y="{}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##,
        y0 + TOP
    );
    let xs = nice_step(x_max - x_min, 8.0);
    let mut t = (x_min / xs).ceil() * xs;
    while t <= x_max + 1e-9 {
        let x = sx(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" font-size="11" text-anchor="middle">{}</text>"##,
            y0 + TOP,
            y0 + TOP + ph,
            y0 + TOP + ph + 16.0,
            fmt_tick(t, xs)
        );
        t += xs;
    }
    let ys = nice_step(y_max - y_min, 6.0);
    let mut t = (y_min / ys).ceil() * ys;
    while t <= y_max + 1e-12 {
        let y = sy(t);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            fmt_tick(t, ys)
        );
        t += ys;
    }
    let _ = writeln!(
        out,
        r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        y0 + H - 12.0,
        escape(&chart.x_label)
    );
    let _ = writeln!(
        out,
        r#"<text x="16" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        y0 + TOP + ph / 2.0,
        y0 + TOP + ph / 2.0,
        escape(&chart.y_label)
    );
    if let Some((tv, label)) = &chart.target {
        let y = sy(*tv);
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#000" stroke-dasharray="5,4"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"##,
            LEFT + pw,
            LEFT + pw + 6.0,
            y + 4.0,
            escape(label)
        );
    }
    for (i, s) in chart.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if path.len() == 1 {
            let (x, y) = path[0].split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(out, r#"<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>"#);
        } else if !path.is_empty() {
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
        }
        let ly = y0 + TOP + 14.0 + 18.0 * i as f64;
        let lx = LEFT + pw + 24.0;
        let _ = writeln!(
            out,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
}

/// An SVG document with the charts stacked vertically.
pub fn render(charts: &[Chart]) -> String {
    let total_h = H * charts.len().max(1) as f64;
    let mut out = String::new();
    // The namespace is an identifier SVG viewers require, not a location.
    let _ = writeln!(
        out,
        r#"<svg xmlns="{}" width="{W}" height="{total_h}" viewBox="0 0 {W} {total_h}" font-family="sans-serif">"#,
        concat!("http", "://www.w3.org/2000/svg")
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, c) in charts.iter().enumerate() {
        draw(&mut out, c, H * i as f64);
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_lines_legends_and_targets() {
        let c = Chart {
            title: "accuracy <vs> time".into(),
            x_label: "virtual hours".into(),
            y_label: "accuracy".into(),
            series: vec![
                Series {
                    name: "fedspine".into(),
                    points: vec![(0.0, 0.3), (1.0, 0.4), (2.0, 0.45)],
                },
                Series {
                    name: "hetlora".into(),
                    points: vec![(0.5, 0.35)],
                },
                Series {
                    name: "empty".into(),
                    points: vec![],
                },
            ],
            target: Some((0.42, "target 0.42".into())),
        };
        let svg = render(&[c.clone(), c]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(svg.contains("accuracy &lt;vs&gt; time"));
        assert!(svg.contains("target 0.42"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn zero_ticks_have_no_minus_sign() {
        assert_eq!(fmt_tick(-0.0, 10.0), "0");
        assert_eq!(fmt_tick(-1e-17, 0.05), "0.00");
        assert_eq!(fmt_tick(-0.05, 0.05), "-0.05");
        assert_eq!(fmt_tick(20.0, 10.0), "20");
    }
}
