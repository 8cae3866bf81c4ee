//! Reports of a run: one JSON line per round, a per-strategy summary (time to target, final
//! quality, sparsity, inference latency and peak memory by device class, bytes moved, rejects),
//! per-device histories, a Markdown table over strategies, and the SVG charts.
//!
//! Everything here is a function of the simulation's results only (virtual time, never wall
//! time), so the same seed writes byte-identical files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use charts::{Chart, Series};
use serde::{Deserialize, Serialize};

use crate::error::SimError;

mod read;

/// One selected device's round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Play {
    pub device: u64,
    pub class: String,
    /// NaN (written as `null`) for a missed device that was never sent an arm.
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub prune_ratio: f64,
    pub rank: u32,
    /// `accepted`, `screened_out` (accepted, then left out of the aggregate by norm screening),
    /// `missed` (deadline or round closed first), `dropped` (the device went away during the
    /// round), `out_of_memory`, `error`, or a reject kind.
    pub outcome: String,
    /// Bandit reward the coordinator computed (accepted devices).
    pub reward: Option<f64>,
    /// Sparsity after the round (accepted devices).
    pub sparsity: Option<f64>,
    /// Virtual compute seconds of the local round (devices that trained).
    pub compute_s: Option<f64>,
    /// Round start to update arrival, virtual seconds (accepted devices).
    pub duration_s: Option<f64>,
    pub peak_mem_mib: Option<f64>,
    /// Held-out loss before and after the local round (accepted devices).
    pub loss_pre: Option<f64>,
    pub loss_post: Option<f64>,
    /// Sparsity before the round (accepted devices).
    pub sparsity_prev: Option<f64>,
    /// `|s B A|_F` of the update (accepted devices).
    pub delta_norm: Option<f64>,
    /// Local steps of the round (accepted devices).
    pub steps: Option<u64>,
}

impl Play {
    /// A play with only defaults (fill the known fields with struct update syntax).
    pub fn empty() -> Self {
        Play {
            device: 0,
            class: String::new(),
            prune_ratio: f64::NAN,
            rank: 0,
            outcome: String::new(),
            reward: None,
            sparsity: None,
            compute_s: None,
            duration_s: None,
            peak_mem_mib: None,
            loss_pre: None,
            loss_post: None,
            sparsity_prev: None,
            delta_norm: None,
            steps: None,
        }
    }
}

/// A panel evaluation of the global adapter on devices' own models and held-out data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    pub round: u64,
    pub time_s: f64,
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub loss: f64,
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub accuracy: f64,
    pub perplexity: Option<f64>,
    pub devices: usize,
    /// Evaluated devices of a pruning strategy that were short of the run's target sparsity
    /// and were brought to it (with their own importance scores) before they were scored.
    pub brought_to_target: usize,
    /// The lowest sparsity among the evaluated models, as scored.
    pub min_sparsity: Option<f64>,
}

/// One closed round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    pub started_s: f64,
    pub closed_s: f64,
    pub closed_by: String,
    pub aggregated: bool,
    pub selected: usize,
    pub accepted: usize,
    pub missed: usize,
    pub dropped: usize,
    pub failed: usize,
    pub rejects: BTreeMap<String, u64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub mean_loss_pre: Option<f64>,
    pub mean_loss_post: Option<f64>,
    /// Mean sparsity over every device of the fleet after the round.
    pub fleet_sparsity: f64,
    pub plays: Vec<Play>,
    pub eval: Option<EvalRecord>,
}

/// A device at the end of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceFinal {
    pub device: u64,
    pub profile: String,
    pub class: String,
    pub data: String,
    pub power_mode: f64,
    /// Sparsity and parameters of the model the device holds at the end (as trained).
    pub sparsity: f64,
    pub params: u64,
    pub rounds_trained: u64,
    /// Sparsity of its final model: the one the final evaluation scored, brought to the target
    /// sparsity where it was short of it (else `sparsity`).
    pub final_sparsity: f64,
    /// Inference latency of that final model (prompt of `eval.latency_prompt_tokens`).
    pub inference_ms: f64,
    pub peak_mem_mib: f64,
    /// Quality of the final model (pruned base + global adapter), when evaluated.
    pub quality: Option<crate::compute::Quality>,
    /// Where the device was brought to the target sparsity before it was scored: the quality
    /// of its model as it was, before that.
    pub quality_before_target: Option<crate::compute::Quality>,
    /// (round, ratio, rank, outcome) of every round the device was selected for (the ratio NaN,
    /// written as `null`, where it was never sent an arm).
    #[serde(deserialize_with = "read::history")]
    pub history: History,
}

/// A device's (round, ratio, rank, outcome) per round it was selected for: [`DeviceFinal::history`].
pub type History = Vec<(u64, f64, u32, String)>;

/// Per-class aggregates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ClassSummary {
    pub devices: usize,
    /// Of them, those whose final model the final evaluation scored; the two means below are
    /// over these final models.
    pub final_models: usize,
    pub mean_sparsity: f64,
    pub mean_inference_ms: f64,
    pub max_peak_mem_mib: f64,
    #[serde(deserialize_with = "crate::nan_json::f64_or_nan")]
    pub mean_ratio_played: f64,
    pub mean_rank_played: f64,
    pub plays: usize,
}

/// The final evaluation's coverage and uncertainty (see `driver/final_eval.rs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct EvalSummary {
    /// Devices that trained and were evaluated (all of them unless `eval.final_devices` caps).
    pub trained_evaluated: usize,
    /// Devices the fleet evaluation covers (the evaluated trained ones and every device that
    /// never trained).
    pub fleet_evaluated: usize,
    /// Distinct models evaluated (devices with equal kept maps share one evaluation when every
    /// model is scored on the same global set).
    pub distinct_models: usize,
    /// Items (classification) or tokens (LM) one evaluation scores.
    pub items_per_evaluation: usize,
    /// Whether every model is scored on the same items (a global held-out set); then they
    /// count once in the effective sample size.
    pub shared_items: bool,
    /// Standard error of `final_accuracy` from the effective sample size.
    pub trained_accuracy_se: Option<f64>,
    /// Mean accuracy, loss and perplexity over the whole fleet.
    pub fleet_accuracy: Option<f64>,
    pub fleet_accuracy_se: Option<f64>,
    pub fleet_loss: Option<f64>,
    pub fleet_perplexity: Option<f64>,
    /// Local steps each device brought to the target sparsity got before it was scored, for
    /// every strategy (`prune-after-fl`'s `recovery_steps`).
    pub recovery_steps: u32,
    /// Of the evaluated devices that trained, those brought to the target sparsity first.
    pub trained_brought_to_target: usize,
    /// Mean accuracy of the evaluated devices that trained, each model as it was trained
    /// (its own sparsity): before any was brought to the target sparsity.
    pub trained_accuracy_before_target: Option<f64>,
}

/// One strategy's run in numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub strategy: String,
    /// `real` or `surrogate`; surrogate numbers come from a fitted model, not training.
    pub mode: String,
    /// Real mode: the arithmetic of the frozen base's products (`fp32`, `bf16`); `none` for the
    /// surrogate.
    #[serde(default)]
    pub precision: String,
    pub devices: usize,
    pub rounds_closed: u64,
    pub rounds_aggregated: u64,
    /// Virtual time at the end of the run, seconds.
    pub virtual_s: f64,
    pub target: String,
    /// The final evaluation over the whole fleet and the standard errors.
    pub evaluation: EvalSummary,
    /// Virtual seconds to the first panel evaluation at or past the target.
    pub time_to_target_s: Option<f64>,
    /// Mean final quality over the evaluated devices that trained.
    pub final_accuracy: Option<f64>,
    pub final_loss: Option<f64>,
    pub final_perplexity: Option<f64>,
    pub final_devices_evaluated: usize,
    /// Of those, the devices brought to the run's target sparsity before they were scored
    /// (short of it; `prune-after-fl`: every dense one), and the lowest evaluated sparsity.
    pub final_brought_to_target: usize,
    pub final_min_sparsity: Option<f64>,
    pub last_panel_accuracy: Option<f64>,
    /// Mean sparsity as trained (the kept maps each device holds at the end) over every device,
    /// and over devices that trained at least once.
    pub mean_sparsity: f64,
    pub mean_sparsity_trained: f64,
    pub devices_trained: usize,
    /// Mean inference latency of the final models (at s* where they were brought there), over
    /// the devices the final evaluation scored.
    pub mean_inference_ms: f64,
    pub max_peak_mem_mib: f64,
    /// Bytes on every link over the whole run (every message, late and refused ones included).
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub rejects: u64,
    pub missed: u64,
    pub dropped: u64,
    pub out_of_memory: u64,
    pub jobs_trained: u64,
    pub by_class: BTreeMap<String, ClassSummary>,
    /// Why the run ended: `finished`, `time_limit` or `stalled`.
    pub ended_by: String,
    /// Surrogate mode: where the parameters came from and their validation error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub surrogate_params: Option<String>,
    /// The measurement file the virtual clock was fitted to, where the experiment named one
    /// (`[clock] calibration`; absent: the shipped calibration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock: Option<String>,
    /// Runs with Byzantine devices: who attacked and what became of their updates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub byzantine: Option<crate::byzantine::ByzantineSummary>,
}

/// Everything a run produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub summary: Summary,
    pub rounds: Vec<RoundRecord>,
    pub devices: Vec<DeviceFinal>,
    /// The experiment's configuration, as run.
    pub config: serde_json::Value,
    /// Real mode: every local round's inputs and outcomes (`device_rounds.jsonl`).
    pub device_rounds: Vec<crate::device_rounds::DeviceRound>,
}

/// The file a finished run folder is recognised by (written last).
pub const SUMMARY_FILE: &str = "summary.json";

fn json_line<T: Serialize>(v: &T) -> String {
    // Plain data with string keys: serialising cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

fn write(path: &Path, text: &str) -> Result<(), SimError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| SimError::io(dir, e))?;
    }
    std::fs::write(path, text).map_err(|e| SimError::io(path, e))
}

fn remove_if_there(path: &Path) -> Result<(), SimError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SimError::io(path, e)),
        _ => Ok(()),
    }
}

impl Report {
    /// `rounds.jsonl`, `devices.jsonl`, `device_rounds.jsonl` (real mode), `summary.md`,
    /// `arms.svg`, `metric.svg` and, last, `summary.json` into `dir`: a folder whose
    /// `summary.json` reads back whole holds a finished run ([`Report::read_from`]).
    pub fn write_to(&self, dir: &Path) -> Result<(), SimError> {
        // A run written over an older one: until the new summary lands, the folder must not
        // look finished with the older summary beside the newer files.
        let summary_path = dir.join(SUMMARY_FILE);
        remove_if_there(&summary_path)?;
        if self.device_rounds.is_empty() {
            // Nor may an older run's dataset pass for this run's.
            remove_if_there(&dir.join(crate::device_rounds::FILE_NAME))?;
        }
        let rounds: String = self.rounds.iter().map(|r| json_line(r) + "\n").collect();
        write(&dir.join("rounds.jsonl"), &rounds)?;
        let devices: String = self.devices.iter().map(|d| json_line(d) + "\n").collect();
        write(&dir.join("devices.jsonl"), &devices)?;
        if !self.device_rounds.is_empty() {
            let text = crate::device_rounds::to_jsonl(&self.device_rounds);
            write(&dir.join(crate::device_rounds::FILE_NAME), &text)?;
        }
        write(
            &dir.join("summary.md"),
            &markdown_table(std::slice::from_ref(self)),
        )?;
        write(&dir.join("arms.svg"), &arms_svg(self))?;
        write(
            &dir.join("metric.svg"),
            &metric_svg(std::slice::from_ref(self)),
        )?;
        let summary = serde_json::to_string_pretty(
            &serde_json::json!({ "summary": self.summary, "config": self.config }),
        )
        .unwrap_or_default();
        write(&summary_path, &(summary + "\n"))?;
        Ok(())
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.digits$}"),
        _ => "-".into(),
    }
}

/// Minutes for runs up to two virtual hours, else hours: (unit, seconds per unit).
fn time_unit(reports: &[Report]) -> (&'static str, f64) {
    let longest = reports
        .iter()
        .map(|r| r.summary.virtual_s)
        .fold(0.0, f64::max);
    if longest > 7200.0 {
        ("h", 3600.0)
    } else {
        ("min", 60.0)
    }
}

/// The comparison table (Markdown) over one or more runs, plus per-class latency and sparsity.
pub fn markdown_table(reports: &[Report]) -> String {
    let mut s = String::new();
    if reports.iter().any(|r| r.summary.mode == "surrogate") {
        s.push_str("**SURROGATE MODE**: losses and accuracies come from a loss-response model fitted to real runs, not from training.\n\n");
        if let Some(note) = reports
            .iter()
            .find_map(|r| r.summary.surrogate_params.as_ref())
        {
            let _ = writeln!(s, "Surrogate parameters: {note}\n");
        }
    }
    if let Some(clock) = reports.iter().find_map(|r| r.summary.clock.as_ref()) {
        let _ = writeln!(s, "Virtual clock fitted to {clock}.\n");
    }
    if reports.iter().any(|r| r.summary.precision == "bf16") {
        s.push_str("**bf16 products**: the frozen base's matrix products ran with bf16 operands and fp32 accumulation (`precision = \"bf16\"`, or `\"auto\"` on a CPU with bf16 products); its losses differ from an fp32 run's by rounding, not by method.\n\n");
    }
    if reports.iter().any(|r| r.summary.precision == "int8") {
        s.push_str("**int8 products**: the frozen base's matrix products ran with int8 operands, one scale per row of the activations, the gradients and the weights, each product's largest input columns (up to 32) multiplied in fp32 (`precision = \"int8\"`); its losses differ from an fp32 run's by that quantization (over 40 steps of SmolLM2, up to about 0.06 nats a step, perplexity within 2%, no bias seen in four runs).\n\n");
    }
    let target = reports
        .first()
        .map(|r| r.summary.target.clone())
        .unwrap_or_default();
    let (unit, div) = time_unit(reports);
    let _ = writeln!(s, "| strategy | time to {target} (virtual {unit}) | final accuracy +- SE: trained / fleet | final perplexity | mean sparsity as trained (all / trained) | inference ms, final models (mean) | peak train mem (MiB) | MB up | MB down | rejects | missed | dropped | OOM | rounds | virtual {unit} |");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in reports {
        let m = &r.summary;
        let ttt = match m.time_to_target_s {
            Some(t) => format!("{:.2}", t / div),
            None => "not reached".into(),
        };
        let accuracy = format!(
            "{} +- {} / {} +- {}",
            opt(m.final_accuracy, 4),
            opt(m.evaluation.trained_accuracy_se, 3),
            opt(m.evaluation.fleet_accuracy, 4),
            opt(m.evaluation.fleet_accuracy_se, 3)
        );
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.3} / {:.3} | {:.1} | {:.0} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {:.2} |",
            m.strategy,
            ttt,
            accuracy,
            opt(m.final_perplexity, 2),
            m.mean_sparsity,
            m.mean_sparsity_trained,
            m.mean_inference_ms,
            m.max_peak_mem_mib,
            m.bytes_up as f64 / 1e6,
            m.bytes_down as f64 / 1e6,
            m.rejects,
            m.missed,
            m.dropped,
            m.out_of_memory,
            m.rounds_closed,
            m.virtual_s / div
        );
    }
    if let Some(e) = reports.first().map(|r| &r.summary.evaluation) {
        let _ = writeln!(
            s,
            "\nFinal accuracy: mean over the devices that trained and over the whole fleet; SE from the effective sample size ({} items per evaluation, tokens for language modelling{}).",
            e.items_per_evaluation,
            if e.shared_items { ", shared by every model, so counted once" } else { ", each device's own held-out set" }
        );
    }
    if reports
        .iter()
        .any(|r| r.summary.final_brought_to_target > 0)
    {
        let _ = writeln!(
            s,
            "\nBrought to s* before the final evaluation (own importance, one-shot pruning, then the same recovery steps for every strategy): devices that trained, brought / evaluated, and their mean accuracy as trained -> as scored.\n"
        );
        s.push_str("| strategy | recovery steps | trained devices brought | accuracy as trained | accuracy at s* |\n|---|---|---|---|---|\n");
        for r in reports {
            let (m, e) = (&r.summary, &r.summary.evaluation);
            let _ = writeln!(
                s,
                "| {} | {} | {} / {} | {} | {} |",
                m.strategy,
                e.recovery_steps,
                e.trained_brought_to_target,
                e.trained_evaluated,
                opt(e.trained_accuracy_before_target, 4),
                opt(m.final_accuracy, 4)
            );
        }
    }
    let classes: Vec<String> = {
        let mut v: Vec<String> = reports
            .iter()
            .flat_map(|r| r.summary.by_class.keys().cloned())
            .collect();
        v.sort();
        v.dedup();
        v
    };
    s.push_str("\nBy device class (final models): mean sparsity, mean inference latency (ms), mean arm played (ratio, rank), max peak training memory (MiB)\n\n");
    let _ = writeln!(s, "| strategy | {} |", classes.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(classes.len()));
    for r in reports {
        let cells: Vec<String> = classes
            .iter()
            .map(|c| match r.summary.by_class.get(c) {
                Some(k) => format!(
                    "s {:.2}, {:.1} ms, arm ({:.2}, {:.1}), {:.0} MiB",
                    k.mean_sparsity,
                    k.mean_inference_ms,
                    k.mean_ratio_played,
                    k.mean_rank_played,
                    k.max_peak_mem_mib
                ),
                None => "-".into(),
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", r.summary.strategy, cells.join(" | "));
    }
    s
}

/// Panel accuracy (or perplexity) against virtual time, one line per run.
pub fn metric_svg(reports: &[Report]) -> String {
    let (unit, div) = time_unit(reports);
    let perplexity = reports
        .first()
        .is_some_and(|r| r.summary.target.starts_with("perplexity"));
    let series = reports
        .iter()
        .map(|r| Series {
            name: r.summary.strategy.clone(),
            points: r
                .rounds
                .iter()
                .filter_map(|x| x.eval.as_ref())
                .map(|e| {
                    (
                        e.time_s / div,
                        if perplexity {
                            e.perplexity.unwrap_or(f64::NAN)
                        } else {
                            e.accuracy
                        },
                    )
                })
                .collect(),
        })
        .collect();
    let surrogate = reports.iter().any(|r| r.summary.mode == "surrogate");
    let what = if perplexity {
        "held-out perplexity"
    } else {
        "held-out accuracy"
    };
    let target = reports.first().and_then(|r| {
        let t = &r.summary.target;
        t.rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| (v, format!("target {v}")))
    });
    charts::render(&[Chart {
        title: format!(
            "{what} of the global adapter on device models vs virtual time{}",
            if surrogate { " (SURROGATE)" } else { "" }
        ),
        x_label: format!(
            "virtual time ({})",
            if unit == "h" { "hours" } else { "minutes" }
        ),
        y_label: what.into(),
        series,
        target,
    }])
}

/// Mean pruning ratio and mean rank played per round, one line per device class.
pub fn arms_svg(report: &Report) -> String {
    type Lines = (Vec<(f64, f64)>, Vec<(f64, f64)>);
    let mut by_class: BTreeMap<&str, Lines> = BTreeMap::new();
    for r in &report.rounds {
        let mut acc: BTreeMap<&str, (f64, f64, usize)> = BTreeMap::new();
        for p in &r.plays {
            let e = acc.entry(p.class.as_str()).or_default();
            e.0 += p.prune_ratio;
            e.1 += p.rank as f64;
            e.2 += 1;
        }
        for (c, (ratio, rank, n)) in acc {
            let e = by_class.entry(c).or_default();
            e.0.push((r.round as f64, ratio / n as f64));
            e.1.push((r.round as f64, rank / n as f64));
        }
    }
    let mode = if report.summary.mode == "surrogate" {
        " (SURROGATE)"
    } else {
        ""
    };
    let ratio = Chart {
        title: format!(
            "{}: pruning ratio played, mean per device class{mode}",
            report.summary.strategy
        ),
        x_label: "round".into(),
        y_label: "pruning ratio".into(),
        series: by_class
            .iter()
            .map(|(c, v)| Series {
                name: c.to_string(),
                points: v.0.clone(),
            })
            .collect(),
        target: None,
    };
    let rank = Chart {
        title: format!(
            "{}: LoRA rank played, mean per device class{mode}",
            report.summary.strategy
        ),
        x_label: "round".into(),
        y_label: "LoRA rank".into(),
        series: by_class
            .iter()
            .map(|(c, v)| Series {
                name: c.to_string(),
                points: v.1.clone(),
            })
            .collect(),
        target: None,
    };
    charts::render(&[ratio, rank])
}

/// Write the comparison files (`compare.md`, `metric.svg`) for several runs into `dir`.
pub fn write_comparison(reports: &[Report], dir: &Path) -> Result<(), SimError> {
    write(&dir.join("compare.md"), &markdown_table(reports))?;
    write(&dir.join("metric.svg"), &metric_svg(reports))
}
