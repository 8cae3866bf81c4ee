//! Tests of the exposition: the text format checked line by line here and, where Debian's
//! `prometheus` package is installed (CI installs it), by `promtool check metrics`; and the
//! HTTP exchange's answers to good, partial, hostile and wrong requests.

use super::*;
use crate::coordinator::{Assignment, ParticipantSummary};
use protocol::{Arm, DeviceId, RoundId, Timestamp};

fn round(n: u64, secs: u64, arms: &[(f64, u32)]) -> RoundSummary {
    classed(
        n,
        secs,
        &arms
            .iter()
            .map(|&(r, k)| ("unknown", r, k))
            .collect::<Vec<_>>(),
    )
}

/// A round whose device `i` has class `arms[i].0` and played arm `(ratio, rank)`.
fn classed(n: u64, secs: u64, arms: &[(&str, f64, u32)]) -> RoundSummary {
    let arm = |ratio: f64, rank: u32| Arm {
        prune_ratio: ratio,
        rank,
    };
    RoundSummary {
        round: RoundId(n),
        strategy: "fedspine".into(),
        started_at: Timestamp(1_000),
        closed_at: Timestamp(1_000 + secs * 1000),
        selected: (0..arms.len() as u64).map(DeviceId).collect(),
        assigned: arms
            .iter()
            .enumerate()
            .map(|(i, &(class, ratio, rank))| Assignment {
                device: DeviceId(i as u64),
                device_class: class.into(),
                arm: arm(ratio, rank),
            })
            .collect(),
        participants: arms
            .iter()
            .enumerate()
            .map(|(i, &(_, ratio, rank))| ParticipantSummary {
                device: DeviceId(i as u64),
                arm: arm(ratio, rank),
                loss_pre: 3.0,
                loss_post: 2.5,
                sparsity_prev: 0.0,
                sparsity: ratio as f32,
                reward: 0.5,
                compute_ms: 10,
                duration_ms: 20,
                bytes_up: 100,
                bytes_down: 50,
                peak_mem_bytes: 1,
                samples: 8,
                delta_norm: 0.1,
            })
            .collect(),
        missed: vec![],
        failed: vec![],
        rejects: BTreeMap::new(),
        aggregation: "exact".into(),
        quorum: 1,
        quorum_met: true,
        aggregated: true,
        non_finite_aggregate: false,
        gauge: Default::default(),
        samples_clipped: 0,
        screened_out: vec![],
        closed_by: "all_answered".into(),
        bytes_up: 100 * arms.len() as u64,
        bytes_down: 50 * arms.len() as u64,
        mean_loss_pre: Some(3.0),
        mean_loss_post: Some(2.5),
    }
}

fn view() -> MetricsView {
    let mut v = MetricsView {
        connected: 3,
        ..MetricsView::default()
    };
    v.counters.rounds_started = 3;
    v.counters.rounds_aggregated = 2;
    v.counters.rounds_abandoned = 1;
    v.counters.updates_screened_out = 2;
    v.counters.bytes_received = 12_345;
    v.counters.rejects.insert("stale_round".into(), 4);
    v.counters.rejects.insert("non_finite".into(), 1);
    v.observe_round(&round(1, 3, &[(0.05, 4), (0.25, 8)]));
    v.observe_round(&round(2, 70, &[(0.25, 8), (0.95, 16)]));
    v
}

/// Two classes: device 0 and 1 are `jetson-nx`, device 2 is `rpi5`.
fn two_classes() -> MetricsView {
    let mut v = MetricsView::default();
    v.observe_round(&classed(
        1,
        10,
        &[
            ("jetson-nx", 0.25, 8),
            ("jetson-nx", 0.25, 8),
            ("rpi5", 0.55, 2),
        ],
    ));
    v.observe_round(&classed(
        2,
        10,
        &[
            ("jetson-nx", 0.35, 16),
            ("jetson-nx", 0.25, 8),
            ("rpi5", 0.55, 2),
        ],
    ));
    v
}

/// A strict reading of the text format: families declared once with HELP then TYPE before
/// their samples, valid names, parseable values, cumulative histogram buckets ending in +Inf
/// equal to `_count`.
fn check_format(text: &str) -> Result<BTreeMap<String, f64>, String> {
    let valid = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut declared: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = BTreeMap::new();
    let mut last_help = None;
    for (i, line) in text.lines().enumerate() {
        let ln = i + 1;
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or("");
            if !valid(name) || declared.contains_key(name) {
                return Err(format!("line {ln}: bad or repeated HELP {name}"));
            }
            last_help = Some(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut p = rest.split(' ');
            let (name, kind) = (p.next().unwrap_or(""), p.next().unwrap_or(""));
            if last_help.as_deref() != Some(name) {
                return Err(format!("line {ln}: TYPE {name} without its HELP first"));
            }
            if !["counter", "gauge", "histogram"].contains(&kind) {
                return Err(format!("line {ln}: type {kind}"));
            }
            declared.insert(name.to_string(), kind.to_string());
        } else {
            let (series, value) = line
                .rsplit_once(' ')
                .ok_or(format!("line {ln}: no value"))?;
            let v: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().map_err(|_| format!("line {ln}: value {v}"))?,
            };
            let name = series.split('{').next().unwrap_or("");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| declared.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            if !declared.contains_key(family) {
                return Err(format!("line {ln}: sample of undeclared {family}"));
            }
            if declared[family] == "counter" && !family.ends_with("_total") {
                return Err(format!("line {ln}: counter {family} without _total"));
            }
            samples.insert(series.to_string(), v);
        }
    }
    Ok(samples)
}

#[test]
fn the_exposition_is_valid_text_format_with_the_run_s_figures() {
    let text = render(&view());
    let s = check_format(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(s["fedspine_rounds_started_total"], 3.0);
    assert_eq!(s["fedspine_devices_connected"], 3.0);
    assert_eq!(s["fedspine_rejects_total{reason=\"stale_round\"}"], 4.0);
    assert_eq!(s["fedspine_updates_screened_out_total"], 2.0);
    assert_eq!(s["fedspine_samples_clipped_total"], 0.0);
    assert_eq!(s["fedspine_bytes_total{direction=\"received\"}"], 12_345.0);
    assert_eq!(s["fedspine_bytes_total{direction=\"sent\"}"], 200.0);
    // Round durations 3 s and 70 s: cumulative buckets.
    assert_eq!(s["fedspine_round_duration_seconds_bucket{le=\"1\"}"], 0.0);
    assert_eq!(s["fedspine_round_duration_seconds_bucket{le=\"5\"}"], 1.0);
    assert_eq!(s["fedspine_round_duration_seconds_bucket{le=\"60\"}"], 1.0);
    assert_eq!(s["fedspine_round_duration_seconds_bucket{le=\"120\"}"], 2.0);
    assert_eq!(
        s["fedspine_round_duration_seconds_bucket{le=\"+Inf\"}"],
        2.0
    );
    assert_eq!(s["fedspine_round_duration_seconds_count"], 2.0);
    assert_eq!(s["fedspine_round_duration_seconds_sum"], 73.0);
    assert_eq!(
        s["fedspine_arm_plays_total{rank=\"8\",ratio=\"0.2-0.3\"}"],
        2.0
    );
    assert_eq!(
        s["fedspine_arm_plays_total{rank=\"16\",ratio=\"0.9-1.0\"}"],
        1.0
    );
    assert_eq!(s["fedspine_last_round"], 2.0);
    assert_eq!(s["fedspine_last_round_mean_loss{when=\"after\"}"], 2.5);
    promtool_check(&text);
    promtool_check(&render(&two_classes()));
}

/// Debian's promtool, where installed (CI installs the `prometheus` package).
fn promtool_check(text: &str) {
    if let Ok(out) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .expect("piped stdin")
                .write_all(text.as_bytes())?;
            child.wait_with_output()
        })
    {
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("promtool not installed: checked by the built-in reader only");
    }
}

#[test]
fn an_empty_run_still_renders_a_valid_exposition() {
    let text = render(&MetricsView::default());
    let s = check_format(&text).unwrap();
    assert_eq!(s["fedspine_round_duration_seconds_count"], 0.0);
    assert!(!s.keys().any(|k| k.starts_with("fedspine_last_round")));
}

#[test]
fn label_values_are_escaped_and_ratios_bucketed() {
    assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    assert_eq!(ratio_bucket(0.0), "0.0-0.1");
    assert_eq!(ratio_bucket(0.25), "0.2-0.3");
    assert_eq!(ratio_bucket(1.0), "0.9-1.0");
    assert_eq!(ratio_bucket(f64::NAN), "0.0-0.1");
    assert_eq!(ratio_bucket(-3.0), "0.0-0.1");
}

#[test]
fn the_http_exchange_answers_only_get_metrics() {
    let body = || "x 1\n".to_string();
    let ok = respond(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n", body).unwrap();
    let ok = String::from_utf8(ok).unwrap();
    assert!(
        ok.starts_with("HTTP/1.1 200 OK\r\n") && ok.ends_with("\r\n\r\nx 1\n"),
        "{ok}"
    );
    assert!(ok.contains("Content-Length: 4\r\n") && ok.contains("version=0.0.4"));
    let q = respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", body).unwrap();
    assert!(q.starts_with(b"HTTP/1.1 200"));
    let head =
        String::from_utf8(respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", body).unwrap()).unwrap();
    assert!(
        head.ends_with("\r\n\r\n") && !head.contains("x 1"),
        "{head}"
    );
    // Still arriving: no answer yet.
    assert!(respond(b"GET /metrics HTTP/1.1\r\nHost:", body).is_none());
    let status = |req: &[u8]| {
        let r = respond(req, body).unwrap();
        String::from_utf8_lossy(&r[..12]).to_string()
    };
    assert_eq!(status(b"POST /metrics HTTP/1.1\r\n\r\n"), "HTTP/1.1 405");
    assert_eq!(status(b"GET /admin HTTP/1.1\r\n\r\n"), "HTTP/1.1 404");
    assert_eq!(status(b"\x00\xff garbage\r\n\r\n"), "HTTP/1.1 400");
    assert_eq!(status(b"GET /metrics SMTP/1.1\r\n\r\n"), "HTTP/1.1 400");
    // A head that never ends is cut off at the bound.
    let long = vec![b'a'; MAX_REQUEST_BYTES];
    assert_eq!(status(&long), "HTTP/1.1 431");
}

#[test]
fn each_device_class_shows_its_own_arms() {
    let text = render(&two_classes());
    let s = check_format(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let assigned = |class: &str, rank: u32, ratio: &str| {
        s.get(&format!(
            "fedspine_arm_assignments_total{{class=\"{class}\",rank=\"{rank}\",ratio=\"{ratio}\"}}"
        ))
        .copied()
    };
    let share = |class: &str, rank: u32, ratio: &str| {
        s.get(&format!(
            "fedspine_class_arm_share_ratio{{class=\"{class}\",rank=\"{rank}\",ratio=\"{ratio}\"}}"
        ))
        .copied()
    };
    // jetson-nx: rank 8 at 0.2-0.3 three times, rank 16 at 0.3-0.4 once; rpi5: rank 2 twice.
    assert_eq!(assigned("jetson-nx", 8, "0.2-0.3"), Some(3.0));
    assert_eq!(assigned("jetson-nx", 16, "0.3-0.4"), Some(1.0));
    assert_eq!(assigned("rpi5", 2, "0.5-0.6"), Some(2.0));
    assert_eq!(assigned("rpi5", 8, "0.2-0.3"), None);
    assert_eq!(assigned("jetson-nx", 2, "0.5-0.6"), None);
    // Now: one jetson on each of its two arms, the rpi on its one.
    assert_eq!(share("jetson-nx", 8, "0.2-0.3"), Some(0.5));
    assert_eq!(share("jetson-nx", 16, "0.3-0.4"), Some(0.5));
    assert_eq!(share("rpi5", 2, "0.5-0.6"), Some(1.0));
    assert_eq!(
        s.keys()
            .filter(|k| k.starts_with("fedspine_class_arm_share_ratio"))
            .count(),
        3
    );
}

#[test]
fn classes_past_the_cap_are_counted_as_other() {
    let mut v = MetricsView::default();
    let names: Vec<String> = (0..MAX_CLASS_LABELS + 8)
        .map(|i| format!("board-{i:02}"))
        .collect();
    let arms: Vec<(&str, f64, u32)> = names.iter().map(|n| (n.as_str(), 0.15, 4)).collect();
    v.observe_round(&classed(1, 5, &arms));
    // A device naming itself "other" joins the overflow label and takes no slot.
    v.observe_round(&classed(2, 5, &[("other", 0.15, 4)]));
    let text = render(&v);
    let s = check_format(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let classes: BTreeSet<String> = s
        .keys()
        .filter_map(|k| k.strip_prefix("fedspine_arm_assignments_total{class=\""))
        .filter_map(|k| k.split('"').next())
        .map(str::to_string)
        .collect();
    assert_eq!(classes.len(), MAX_CLASS_LABELS + 1, "{classes:?}");
    assert!(classes.contains("board-00") && classes.contains("board-31"));
    assert!(!classes.contains("board-32"));
    // The 8 classes past the cap, and the device of round 2 (device 0, now "other").
    assert_eq!(
        s["fedspine_arm_assignments_total{class=\"other\",rank=\"4\",ratio=\"0.1-0.2\"}"],
        9.0
    );
    // Device 0 moved from board-00 to other; shares follow each device's latest class.
    assert_eq!(
        s["fedspine_class_arm_share_ratio{class=\"other\",rank=\"4\",ratio=\"0.1-0.2\"}"],
        1.0
    );
    assert!(!s.contains_key(
        "fedspine_class_arm_share_ratio{class=\"board-00\",rank=\"4\",ratio=\"0.1-0.2\"}"
    ));
    promtool_check(&text);
}
