//! How far a comparison's headline ratios move when the device profiles are wrong. The virtual
//! clock rests on two assumptions a user cannot check from a report: how fast each class really
//! computes (a profile's `train_gflops`/`infer_gflops` are derated estimates, scaled from this
//! host's calibrated time model) and how fast its link is. `sim compare --sensitivity` runs the
//! same strategies on the same seeds again with every profile's compute derated x0.5 and x2 and
//! its bandwidth x0.5 and x2, and tabulates the headline ratios under each.
//!
//! A ratio that holds across the rows does not hinge on the profiles; one that flips does. The
//! rows are whole re-runs (timing changes which devices finish, what the bandits learn and when
//! the target is reached), not a rescaling of the base run's times.

use serde::Serialize;

use crate::comparison::{Comparison, MetricRow};
use crate::experiment::Resources;
use crate::stats::{self, Interval};
use aggregator::coordinator::streams::Stream;

/// One way the profiles may be wrong: multipliers on every profile's compute throughput
/// (training and inference) and on its link bandwidth (up and down; the round-trip time stays).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Variant {
    pub label: &'static str,
    pub compute: f64,
    pub bandwidth: f64,
}

/// The base run and the four perturbed ones, in report order.
pub const VARIANTS: [Variant; 5] = [
    Variant {
        label: "as profiled",
        compute: 1.0,
        bandwidth: 1.0,
    },
    Variant {
        label: "compute x0.5",
        compute: 0.5,
        bandwidth: 1.0,
    },
    Variant {
        label: "compute x2",
        compute: 2.0,
        bandwidth: 1.0,
    },
    Variant {
        label: "bandwidth x0.5",
        compute: 1.0,
        bandwidth: 0.5,
    },
    Variant {
        label: "bandwidth x2",
        compute: 1.0,
        bandwidth: 2.0,
    },
];

impl Resources {
    /// The same fleet, model and data with every profile's throughput scaled by
    /// `variant.compute` and its bandwidth by `variant.bandwidth`.
    pub fn perturbed(&self, variant: Variant) -> Resources {
        let mut r = self.clone();
        for p in &mut r.profiles {
            p.train_gflops *= variant.compute;
            p.infer_gflops *= variant.compute;
            p.uplink_mbps *= variant.bandwidth;
            p.downlink_mbps *= variant.bandwidth;
        }
        r
    }
}

/// One headline ratio of the reference entry against one baseline under one variant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HeadlineRow {
    pub variant: String,
    pub baseline: String,
    /// Baseline's time to target over the reference's, per seed where both reached it (> 1:
    /// the reference is faster).
    pub speedup: Option<Interval>,
    /// Reference's inference latency over the baseline's (< 1: the reference is faster).
    pub inference_ratio: Option<Interval>,
    /// Reference minus baseline final accuracy (trained devices), in points.
    pub accuracy_points: Option<Interval>,
    /// Seeds on which both reached the target, of all seeds.
    pub both_reached: usize,
    pub seeds: usize,
}

/// The sensitivity table: one [`Comparison`] per variant, reduced to its headline rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sensitivity {
    pub reference: String,
    pub rows: Vec<HeadlineRow>,
}

fn row<'a>(c: &'a Comparison, metric: &str, entry: &str) -> Option<&'a MetricRow> {
    c.metrics
        .iter()
        .find(|m| m.metric == metric && m.entry == entry)
}

/// Per-seed `f(reference, baseline)` where both are present.
fn paired(c: &Comparison, metric: &str, baseline: &str, f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    let (Some(a), Some(b)) = (row(c, metric, &c.entries[0]), row(c, metric, baseline)) else {
        return Vec::new();
    };
    a.per_seed
        .iter()
        .zip(&b.per_seed)
        .filter_map(|(x, y)| Some(f((*x)?, (*y)?)))
        .filter(|v| v.is_finite())
        .collect()
}

/// Reduces each variant's comparison to the headline ratios of its first entry against every
/// other entry. `comparisons` are in [`VARIANTS`] order.
pub fn headline(comparisons: &[(Variant, Comparison)]) -> Sensitivity {
    let reference = comparisons
        .first()
        .and_then(|(_, c)| c.entries.first().cloned())
        .unwrap_or_default();
    let mut rows = Vec::new();
    for (k, (variant, c)) in comparisons.iter().enumerate() {
        let boot = Stream::new(c.seeds.first().copied().unwrap_or(0), "sensitivity");
        for (e, baseline) in c.entries.iter().enumerate().skip(1) {
            let ci = |xs: &[f64], m: u64| {
                stats::bootstrap_mean(
                    xs,
                    c.level,
                    stats::RESAMPLES,
                    &mut boot.rng_for((k * 100 + e) as u64 * 10 + m),
                )
            };
            let speed = paired(c, "time_to_target_s", baseline, |r, b| b / r);
            let infer = paired(c, "inference_ms", baseline, |r, b| r / b);
            let acc = paired(c, "final_accuracy_trained", baseline, |r, b| {
                (r - b) * 100.0
            });
            rows.push(HeadlineRow {
                variant: variant.label.to_string(),
                baseline: baseline.clone(),
                both_reached: speed.len(),
                speedup: ci(&speed, 0),
                inference_ratio: ci(&infer, 1),
                accuracy_points: ci(&acc, 2),
                seeds: c.seeds.len(),
            });
        }
    }
    Sensitivity { reference, rows }
}

fn cell(i: &Option<Interval>, digits: usize) -> String {
    match i {
        Some(i) if i.n > 1 => format!("{:.d$} [{:.d$}, {:.d$}]", i.mean, i.lo, i.hi, d = digits),
        Some(i) => format!("{:.d$} (1 seed)", i.mean, d = digits),
        None => "-".into(),
    }
}

impl Sensitivity {
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "Sensitivity of the headline ratios to the device profiles ({} against each \
             baseline; every row is a whole re-run on the same seeds; mean over seeds and 95% \
             bootstrap interval of the per-seed paired ratio)\n\n",
            self.reference
        );
        s.push_str(
            "| profiles | baseline | time-to-target speed-up | seeds both reached | \
             inference time ratio | accuracy difference (points) |\n",
        );
        s.push_str("|---|---|---|---|---|---|\n");
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {}/{} | {} | {} |\n",
                r.variant,
                r.baseline,
                cell(&r.speedup, 2),
                r.both_reached,
                r.seeds,
                cell(&r.inference_ratio, 3),
                cell(&r.accuracy_points, 2),
            ));
        }
        s
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(metric: &str, entry: &str, per_seed: Vec<Option<f64>>) -> MetricRow {
        MetricRow {
            metric: metric.into(),
            entry: entry.into(),
            per_seed,
            interval: None,
        }
    }

    fn comparison(ref_t: [Option<f64>; 3], base_t: [Option<f64>; 3]) -> Comparison {
        Comparison {
            name: "t".into(),
            mode: "surrogate".into(),
            target: "accuracy".into(),
            seeds: vec![1, 2, 3],
            entries: vec!["fedspine".into(), "hetlora".into()],
            resamples: stats::RESAMPLES,
            level: 0.95,
            metrics: vec![
                metric("time_to_target_s", "fedspine", ref_t.to_vec()),
                metric("time_to_target_s", "hetlora", base_t.to_vec()),
                metric("inference_ms", "fedspine", vec![Some(50.0); 3]),
                metric("inference_ms", "hetlora", vec![Some(100.0); 3]),
                metric(
                    "final_accuracy_trained",
                    "fedspine",
                    vec![Some(0.80), Some(0.81), Some(0.82)],
                ),
                metric(
                    "final_accuracy_trained",
                    "hetlora",
                    vec![Some(0.80), Some(0.80), Some(0.80)],
                ),
            ],
            paired: Vec::new(),
            bandit: Vec::new(),
            eval_items_effective: 400,
            final_accuracy_se: None,
            byzantine: Vec::new(),
            pooled_from: Vec::new(),
            classes_mixed: false,
        }
    }

    #[test]
    fn ratios_are_paired_per_seed_and_skip_seeds_that_missed_the_target() {
        let c = comparison(
            [Some(100.0), Some(200.0), None],
            [Some(200.0), Some(300.0), Some(50.0)],
        );
        let s = headline(&[(VARIANTS[0], c)]);
        let r = &s.rows[0];
        assert_eq!(s.reference, "fedspine");
        assert_eq!(r.baseline, "hetlora");
        assert_eq!(r.both_reached, 2);
        let speed = r.speedup.unwrap();
        assert!((speed.mean - (2.0 + 1.5) / 2.0).abs() < 1e-12);
        assert!(speed.lo <= speed.mean && speed.mean <= speed.hi);
        assert!((r.inference_ratio.unwrap().mean - 0.5).abs() < 1e-12);
        assert!((r.accuracy_points.unwrap().mean - 1.0).abs() < 1e-9);
        let md = s.to_markdown();
        assert!(md.contains("| as profiled | hetlora | 1.75 ["), "{md}");
        assert!(md.contains("| 2/3 |"), "{md}");
    }

    #[test]
    fn a_baseline_that_never_reached_the_target_gives_no_speedup() {
        let c = comparison([Some(100.0); 3], [None; 3]);
        let s = headline(&[(VARIANTS[3], c)]);
        assert_eq!(s.rows[0].speedup, None);
        assert_eq!(s.rows[0].both_reached, 0);
        assert!(s
            .to_markdown()
            .contains("| bandwidth x0.5 | hetlora | - | 0/3 |"));
    }

    #[test]
    fn perturbation_scales_throughput_and_bandwidth_only() {
        let base = crate::hardware::DeviceProfile::resolve("jetson-tx2", None).unwrap();
        let r = Resources {
            profiles: vec![base.clone()],
            labels: vec![String::new()],
            base: None,
            data: Vec::new(),
            global_test: None,
            surrogate: None,
            clock: crate::timing::Clock::builtin(),
            tok: None,
            seed: 1,
            wall_clock: None,
            wall_ledger: None,
            eval_workers: Default::default(),
        };
        let p = &r.perturbed(VARIANTS[1]).profiles[0];
        assert_eq!(p.train_gflops, base.train_gflops * 0.5);
        assert_eq!(p.infer_gflops, base.infer_gflops * 0.5);
        assert_eq!(p.uplink_mbps, base.uplink_mbps);
        assert_eq!(p.rtt_ms, base.rtt_ms);
        let q = &r.perturbed(VARIANTS[4]).profiles[0];
        assert_eq!(q.downlink_mbps, base.downlink_mbps * 2.0);
        assert_eq!(q.train_gflops, base.train_gflops);
    }
}
