//! The comparison over seeds (`sim compare --seeds N`): per entry (strategy, or strategy with a
//! policy), the mean and 95% bootstrap interval over seeds of each metric; the paired
//! differences of the first entry (FedSpine) minus each other entry, seed by seed, with their
//! intervals; and, per device class, the arms the bandits settle on (the most played arm over
//! the last third of the rounds) with the late rewards. Written as `compare.json` and
//! `compare.md`; both depend on the runs' reports only, so the same seeds give byte-identical
//! files (the host's CPU goes to `host.json`, see [`crate::host`]). With Byzantine devices,
//! [`byzantine`] sets each poisoned entry against its `+clean` twin.

pub mod byzantine;
pub mod pool;

use std::collections::BTreeMap;
use std::fmt::Write as _;

use aggregator::coordinator::streams::Stream;
use serde::{Deserialize, Serialize};

use crate::experiment::SeedRuns;
use crate::report::Report;
use crate::stats::{self, Interval};

/// Width of the pruning-ratio bins arms are counted in.
pub const RATIO_BIN: f64 = 0.05;

/// The metrics compared, as (key, description, unit).
pub const METRICS: [(&str, &str, &str); 10] = [
    (
        "time_to_target_s",
        "virtual time to the target (seeds that reached it)",
        "s",
    ),
    (
        "final_accuracy_trained",
        "final accuracy, devices that trained",
        "",
    ),
    (
        "final_accuracy_as_trained",
        "final accuracy, devices that trained, as trained (before any was brought to s*)",
        "",
    ),
    (
        "final_accuracy_fleet",
        "final accuracy, every device of the fleet",
        "",
    ),
    (
        "accuracy_auc",
        "panel accuracy averaged over the common virtual-time window",
        "",
    ),
    (
        "mean_sparsity_trained",
        "sparsity as trained, devices that trained",
        "",
    ),
    (
        "inference_ms",
        "inference latency of the final models (as evaluated: at s* where brought there)",
        "ms",
    ),
    ("peak_train_mem_mib", "peak training memory", "MiB"),
    ("megabytes", "bytes moved, up + down", "MB"),
    (
        "late_reward",
        "mean bandit reward over the last third of the rounds",
        "",
    ),
];

/// One entry's values of every metric on one seed (`None`: not available, e.g. target not
/// reached).
fn values(r: &Report, window: Option<(f64, f64)>) -> Vec<Option<f64>> {
    let s = &r.summary;
    vec![
        s.time_to_target_s,
        s.final_accuracy,
        s.evaluation.trained_accuracy_before_target,
        s.evaluation.fleet_accuracy,
        window.and_then(|w| accuracy_auc(r, w)),
        Some(s.mean_sparsity_trained),
        Some(s.mean_inference_ms),
        Some(s.max_peak_mem_mib),
        Some((s.bytes_up + s.bytes_down) as f64 / 1e6),
        late_reward(r, None),
    ]
}

/// Panel evaluations as (virtual seconds, accuracy).
fn curve(r: &Report) -> Vec<(f64, f64)> {
    r.rounds
        .iter()
        .filter_map(|x| x.eval.as_ref())
        .map(|e| (e.time_s, e.accuracy))
        .collect()
}

/// The virtual-time window every run of a seed has evaluations over: from the latest first
/// evaluation to the earliest last one (`None` if empty).
fn common_window(reports: &[Report]) -> Option<(f64, f64)> {
    let mut a = f64::NEG_INFINITY;
    let mut b = f64::INFINITY;
    for r in reports {
        let c = curve(r);
        a = a.max(c.first()?.0);
        b = b.min(c.last()?.0);
    }
    (a < b).then_some((a, b))
}

/// Accuracy linearly interpolated at `t` on a curve sorted by time.
fn at(c: &[(f64, f64)], t: f64) -> f64 {
    match c.iter().position(|p| p.0 >= t) {
        Some(0) => c[0].1,
        Some(i) => {
            let (p, q) = (c[i - 1], c[i]);
            if q.0 > p.0 {
                p.1 + (q.1 - p.1) * (t - p.0) / (q.0 - p.0)
            } else {
                q.1
            }
        }
        None => c.last().map_or(f64::NAN, |p| p.1),
    }
}

/// The time-average of the accuracy curve over `[a, b]` (trapezoids between evaluations).
fn accuracy_auc(r: &Report, (a, b): (f64, f64)) -> Option<f64> {
    let c = curve(r);
    if c.is_empty() || b <= a {
        return None;
    }
    let mut pts = vec![(a, at(&c, a))];
    pts.extend(c.iter().copied().filter(|p| p.0 > a && p.0 < b));
    pts.push((b, at(&c, b)));
    let area: f64 = pts
        .windows(2)
        .map(|w| (w[1].0 - w[0].0) * (w[0].1 + w[1].1) / 2.0)
        .sum();
    Some(area / (b - a))
}

/// The first round of the last third of a run.
fn late_from(r: &Report) -> u64 {
    let n = r.rounds.last().map_or(0, |x| x.round);
    n - n / 3 + 1
}

/// Mean reward of the plays in the last third of the rounds (of one class, if given).
fn late_reward(r: &Report, class: Option<&str>) -> Option<f64> {
    let from = late_from(r);
    let v: Vec<f64> = r
        .rounds
        .iter()
        .filter(|x| x.round >= from)
        .flat_map(|x| &x.plays)
        .filter(|p| class.is_none_or(|c| p.class == c))
        .filter_map(|p| p.reward)
        .collect();
    stats::mean(&v)
}

/// An arm as counted: the ratio's bin centre and the rank.
fn arm_key(ratio: f64, rank: u32) -> (i64, u32) {
    ((ratio / RATIO_BIN).round() as i64, rank)
}

/// The most played arm of a class over the last third of the rounds: (ratio, rank, share of
/// the class's plays there, plays). Ties go to the smaller ratio, then the smaller rank.
fn settled_arm<'a>(reports: impl Iterator<Item = &'a Report>, class: &str) -> Option<SettledArm> {
    let mut counts: BTreeMap<(i64, u32), usize> = BTreeMap::new();
    let mut total = 0;
    for r in reports {
        let from = late_from(r);
        for p in r
            .rounds
            .iter()
            .filter(|x| x.round >= from)
            .flat_map(|x| &x.plays)
        {
            if p.class == class && p.prune_ratio.is_finite() {
                *counts.entry(arm_key(p.prune_ratio, p.rank)).or_default() += 1;
                total += 1;
            }
        }
    }
    let (&(bin, rank), &n) = counts
        .iter()
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))?;
    Some(SettledArm {
        prune_ratio: bin as f64 * RATIO_BIN,
        rank,
        share: n as f64 / total as f64,
        plays: total,
    })
}

/// The arm a class settles on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettledArm {
    /// Centre of the ratio bin ([`RATIO_BIN`] wide).
    pub prune_ratio: f64,
    pub rank: u32,
    /// Share of the class's late plays on this arm.
    pub share: f64,
    /// The class's plays over the last third of the rounds (all seeds).
    pub plays: usize,
}

/// One entry's bandit behaviour on one device class, over all seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassBandit {
    pub class: String,
    pub entry: String,
    /// Over all seeds' late plays together.
    pub settled: Option<SettledArm>,
    /// Each seed's settled arm, in seed order.
    pub settled_per_seed: Vec<Option<SettledArm>>,
    /// Late mean reward per seed, with its interval over seeds.
    pub late_reward: Option<Interval>,
    /// Fewest and mean plays per device of the class (all rounds), over seeds.
    pub min_plays_per_device: u64,
    pub mean_plays_per_device: f64,
}

/// One metric of one entry over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricRow {
    pub metric: String,
    pub entry: String,
    /// Each seed's value (`None`: not available on that seed).
    pub per_seed: Vec<Option<f64>>,
    pub interval: Option<Interval>,
}

/// The whole comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub name: String,
    pub mode: String,
    pub target: String,
    pub seeds: Vec<u64>,
    pub entries: Vec<String>,
    pub resamples: usize,
    pub level: f64,
    pub metrics: Vec<MetricRow>,
    /// First entry minus each other entry, seed by seed.
    pub paired: Vec<MetricRow>,
    pub bandit: Vec<ClassBandit>,
    /// Effective sample size of one final evaluation (items every model shares count once),
    /// and the standard error of the first entry's mean final accuracy from it.
    pub eval_items_effective: usize,
    pub final_accuracy_se: Option<f64>,
    /// Poisoned entries against their clean twins (absent without Byzantine runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub byzantine: Vec<byzantine::ByzantineRow>,
    /// For a comparison pooled from runs of disjoint seeds ([`pool`]): the parts, each as
    /// `folder: seeds` (absent otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pooled_from: Vec<String>,
    /// A pool whose parts ran on different CPU classes (`sim pool --across-classes`; each
    /// part's class is named in `pooled_from`, and `hosts.json` holds them).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub classes_mixed: bool,
}

/// The bootstrap stream of metric `m`'s interval for entry `e` (its paired difference's with
/// `paired`): [`compare`] and [`pool`] draw the same resamples for the same values.
fn interval_stream(m: usize, e: usize, paired: bool) -> u64 {
    (m * 1000 + if paired { 500 } else { 0 } + e) as u64
}

/// The comparison of `runs` (every seed ran `entries` in order). `eval_items` is the
/// effective sample size of one evaluation (see [`Comparison::eval_items_effective`]).
pub fn compare(name: &str, entries: &[String], runs: &[SeedRuns], eval_items: usize) -> Comparison {
    let seeds: Vec<u64> = runs.iter().map(|r| r.seed).collect();
    let level = 0.95;
    let boot = Stream::new(seeds.first().copied().unwrap_or(0), "bootstrap");
    let windows: Vec<Option<(f64, f64)>> = runs.iter().map(|r| common_window(&r.reports)).collect();
    // table[entry][seed][metric]
    let table: Vec<Vec<Vec<Option<f64>>>> = (0..entries.len())
        .map(|e| {
            runs.iter()
                .zip(&windows)
                .map(|(r, w)| {
                    r.reports
                        .get(e)
                        .map_or(vec![None; METRICS.len()], |x| values(x, *w))
                })
                .collect()
        })
        .collect();
    let column =
        |e: usize, m: usize| -> Vec<Option<f64>> { table[e].iter().map(|v| v[m]).collect() };
    let boot_ci = |xs: &[Option<f64>], stream: u64| -> Option<Interval> {
        let v: Vec<f64> = xs.iter().flatten().copied().collect();
        stats::bootstrap_mean(&v, level, stats::RESAMPLES, &mut boot.rng_for(stream))
    };
    let mut metrics = Vec::new();
    let mut paired = Vec::new();
    for (m, (key, _, _)) in METRICS.iter().enumerate() {
        for (e, entry) in entries.iter().enumerate() {
            let per_seed = column(e, m);
            let interval = boot_ci(&per_seed, interval_stream(m, e, false));
            metrics.push(MetricRow {
                metric: key.to_string(),
                entry: entry.clone(),
                per_seed,
                interval,
            });
            if e > 0 {
                let a = column(0, m);
                let b = column(e, m);
                let per_seed: Vec<Option<f64>> = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| stats::paired_differences(&[*x], &[*y]).first().copied())
                    .collect();
                let interval = boot_ci(&per_seed, interval_stream(m, e, true));
                paired.push(MetricRow {
                    metric: key.to_string(),
                    entry: format!("{} - {}", entries[0], entry),
                    per_seed,
                    interval,
                });
            }
        }
    }
    let bandit = bandit_rows(entries, runs, &boot, level);
    let byzantine = byzantine::rows(entries, runs, &boot, level);
    let first: Vec<&Report> = runs.iter().filter_map(|r| r.reports.first()).collect();
    let mode = first
        .first()
        .map_or(String::new(), |r| r.summary.mode.clone());
    let target = first
        .first()
        .map_or(String::new(), |r| r.summary.target.clone());
    let acc: Vec<f64> = first
        .iter()
        .filter_map(|r| r.summary.final_accuracy)
        .collect();
    let final_accuracy_se = stats::mean(&acc).and_then(|p| stats::accuracy_se(p, eval_items));
    Comparison {
        name: name.to_string(),
        mode,
        target,
        seeds,
        entries: entries.to_vec(),
        resamples: stats::RESAMPLES,
        level,
        metrics,
        paired,
        bandit,
        eval_items_effective: eval_items,
        final_accuracy_se,
        byzantine,
        pooled_from: Vec::new(),
        classes_mixed: false,
    }
}

fn bandit_rows(
    entries: &[String],
    runs: &[SeedRuns],
    boot: &Stream,
    level: f64,
) -> Vec<ClassBandit> {
    let mut classes: Vec<String> = runs
        .iter()
        .flat_map(|r| &r.reports)
        .flat_map(|r| r.devices.iter().map(|d| d.class.clone()))
        .collect();
    classes.sort();
    classes.dedup();
    let mut out = Vec::new();
    for (c, class) in classes.iter().enumerate() {
        for (e, entry) in entries.iter().enumerate() {
            let reports: Vec<&Report> = runs.iter().filter_map(|r| r.reports.get(e)).collect();
            let settled = settled_arm(reports.iter().copied(), class);
            let settled_per_seed = reports
                .iter()
                .map(|r| settled_arm(std::iter::once(*r), class))
                .collect();
            let rewards: Vec<f64> = reports
                .iter()
                .filter_map(|r| late_reward(r, Some(class)))
                .collect();
            let late_reward = stats::bootstrap_mean(
                &rewards,
                level,
                stats::RESAMPLES,
                &mut boot.rng_for(1_000_000 + (c * 1000 + e) as u64),
            );
            let plays: Vec<u64> = reports
                .iter()
                .flat_map(|r| &r.devices)
                .filter(|d| &d.class == class)
                .map(|d| d.history.len() as u64)
                .collect();
            out.push(ClassBandit {
                class: class.clone(),
                entry: entry.clone(),
                settled,
                settled_per_seed,
                late_reward,
                min_plays_per_device: plays.iter().copied().min().unwrap_or(0),
                mean_plays_per_device: plays.iter().sum::<u64>() as f64 / plays.len().max(1) as f64,
            });
        }
    }
    out
}

fn fmt_interval(i: &Option<Interval>, digits: usize, of: usize) -> String {
    match i {
        Some(i) => format!(
            "{:.d$} [{:.d$}, {:.d$}] (n {}/{of})",
            i.mean,
            i.lo,
            i.hi,
            i.n,
            d = digits
        ),
        None => format!("- (n 0/{of})"),
    }
}

/// One markdown table: a row per metric, a column per entry in `columns`, each cell the
/// interval of the row in `rows` for that metric and entry.
fn metric_table(s: &mut String, columns: &[String], rows: &[MetricRow], n: usize) {
    let _ = writeln!(s, "| metric | {} |", columns.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(columns.len()));
    for (key, what, unit) in METRICS {
        let cells: Vec<String> = columns
            .iter()
            .map(|e| {
                let row = rows.iter().find(|r| r.metric == key && &r.entry == e);
                fmt_interval(&row.and_then(|r| r.interval), digits(key), n)
            })
            .collect();
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" ({unit})")
        };
        let _ = writeln!(s, "| {what}{unit} | {} |", cells.join(" | "));
    }
}

fn digits(key: &str) -> usize {
    match key {
        "time_to_target_s" | "megabytes" | "peak_train_mem_mib" => 1,
        "inference_ms" => 2,
        _ => 4,
    }
}

impl Comparison {
    pub fn to_json(&self) -> String {
        // Plain data with string keys: serialising cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default() + "\n"
    }

    /// The tables in Markdown.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let n = self.seeds.len();
        if self.mode == "surrogate" {
            s.push_str("**SURROGATE MODE**: losses and accuracies come from a loss-response model fitted to real runs, not from training.\n\n");
        }
        let seeds: Vec<String> = self.seeds.iter().map(u64::to_string).collect();
        let _ = writeln!(
            s,
            "# {}: {} entries on {} seeds ({})\n",
            self.name,
            self.entries.len(),
            n,
            seeds.join(", ")
        );
        let _ = writeln!(
            s,
            "Mean over seeds with a {:.0}% percentile-bootstrap interval ({} resamples over seeds); `n k/{n}`: seeds with a value. Target: {}. {}\n",
            self.level * 100.0,
            self.resamples,
            self.target,
            if self.classes_mixed {
                "The CPU classes these numbers were computed on (one per part below) are in `hosts.json` beside this file."
            } else {
                "The CPU class these numbers were computed on is in `host.json` beside this file."
            }
        );
        if let Some(se) = self.final_accuracy_se {
            let _ = writeln!(
                s,
                "Effective sample size of one final evaluation: {} items (tokens for language modelling; items every model is scored on count once, per-device held-out sets add up): standard error of a final accuracy about {:.3} ({:.1} points), within one seed.\n",
                self.eval_items_effective,
                se,
                se * 100.0
            );
        }
        metric_table(&mut s, &self.entries, &self.metrics, n);
        if self.entries.len() > 1 {
            let others: Vec<String> = self
                .entries
                .iter()
                .skip(1)
                .map(|e| format!("{} - {e}", self.entries[0]))
                .collect();
            let _ = writeln!(
                s,
                "\nPaired differences, seed by seed (an interval excluding 0 is a difference these seeds support):\n"
            );
            metric_table(&mut s, &others, &self.paired, n);
        }
        if !self.pooled_from.is_empty() {
            let classes = if self.classes_mixed {
                "on several CPU classes (every entry of a seed on one class, so each seed's differences stay paired; the seeds are draws over seed and class together, and the class's own effect is not separated from the seeds')"
            } else {
                "on one CPU class"
            };
            let _ = writeln!(
                s,
                "\nPooled from runs of disjoint seeds {classes}: {}. Bandit rows are not pooled (they need each run's plays): see each part's `compare.md`.",
                self.pooled_from.join("; ")
            );
            s.push_str(&byzantine::markdown(
                &self.byzantine,
                n,
                self.mode == "surrogate",
            ));
            return s;
        }
        let _ = writeln!(
            s,
            "\nBandits by device class: the most played arm over the last third of the rounds (ratio in bins of {RATIO_BIN}, all seeds together; share of the class's late plays), each seed's, the late mean reward, and plays per device (fewest / mean).\n"
        );
        s.push_str("| class | entry | settled arm (ratio, rank), share | per seed | late reward | plays per device |\n");
        s.push_str("|---|---|---|---|---|---|\n");
        let arm = |a: &Option<SettledArm>| match a {
            Some(a) => format!("({:.2}, {}) {:.0}%", a.prune_ratio, a.rank, a.share * 100.0),
            None => "-".into(),
        };
        for b in &self.bandit {
            let per: Vec<String> = b.settled_per_seed.iter().map(arm).collect();
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} / {:.1} |",
                b.class,
                b.entry,
                arm(&b.settled),
                per.join("; "),
                fmt_interval(&b.late_reward, 3, n),
                b.min_plays_per_device,
                b.mean_plays_per_device
            );
        }
        s.push_str(&byzantine::markdown(
            &self.byzantine,
            n,
            self.mode == "surrogate",
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_average_interpolates_at_the_window_ends() {
        let c = [(10.0, 0.5), (20.0, 0.7), (40.0, 0.7)];
        assert_eq!(at(&c, 5.0), 0.5);
        assert!((at(&c, 15.0) - 0.6).abs() < 1e-12);
        assert_eq!(at(&c, 50.0), 0.7);
    }
}
